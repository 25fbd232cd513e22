#!/usr/bin/env python3
"""Assemble a random-weight FLUX.1-schnell diffusers pipeline folder that ``streamexec run`` takes,
reusing checkpoints that already exist (symlinked, no copy) and writing only what is missing.

    python tools/make_flux_pipeline.py OUT [--link COMP=PATH ...] [--dtype bf16] [--seed 0]

OUT gets ``model_index.json``, ``scheduler/`` (the reference FLUX.1-schnell configs shipped in
``streamexec/configs/flux-schnell``), ``tokenizer/`` (the real CLIP BPE files shipped in
``streamexec/configs/sd15/tokenizer``), ``tokenizer_2/`` (a T5TokenizerFast folder: no real T5
tokenizer is available offline, so a small SentencePiece-style Unigram vocabulary is trained here on
an inline English corpus with the ``tokenizers`` library, ``<pad>``=0, ``</s>``=1, ``<unk>``=2 and the
100 ``<extra_id_*>`` sentinels, every id < 32128 so it fits T5-XXL's embedding; ids are real T5 ids in
format only, the weights are random anyway) and one folder per weight component:

- ``--link COMP=PATH`` reuses an existing checkpoint for ``transformer``, ``text_encoder``,
  ``text_encoder_2`` or ``vae``: a ``.safetensors`` file (e.g. a BFL ``flux1-schnell.safetensors``) is
  symlinked into ``OUT/COMP/`` beside the preset's ``config.json``; a component folder has its
  ``config.json`` and weight files symlinked;
- every other component is written with ``tools/make_checkpoint.py COMP OUT/COMP --preset flux-schnell``
  (CLIP-L 0.25 GB, T5-XXL 9.5 GB, transformer 23.8 GB, VAE 0.17 GB in bf16).

Example (the transformer and T5 a benchmark already wrote)::

    python tools/make_flux_pipeline.py /tmp/flux-schnell-pipe \\
        --link transformer=/tmp/streamexec-bench/flux1-schnell.safetensors \\
        --link text_encoder_2=/tmp/streamexec-bench/text_encoder_2 --link vae=/tmp/streamexec-bench/vae
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "streamexec" / "configs"
PRESET = CONFIGS / "flux-schnell"
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
T5_VOCAB = 32128  # T5-XXL's embedding rows
T5_EXTRA_IDS = 100

_CORPUS = """\
A photograph of a lighthouse at dusk, oil painting, highly detailed, warm light on the waves.
The quick brown fox jumps over the lazy dog while an astronaut rides a horse on the moon.
A portrait of an old fisherman with a grey beard, soft window light, thirty five millimetre film.
A cozy cabin in a snowy forest at night, smoke rising from the chimney, stars in a clear sky.
A bowl of ripe red apples and green pears on a wooden kitchen table, still life, natural colours.
An ancient castle on a cliff above a stormy sea, dramatic clouds, cinematic lighting, wide angle.
A small cat sleeping on a stack of books beside a window, morning sun, dust in the air.
A busy street market in the city with bright umbrellas, people walking, vegetables and flowers.
A watercolour landscape of rolling hills, a winding river, tall trees and a distant village.
A futuristic train crossing a bridge over a canyon, sunset, reflections on glass and steel.
Hello world! What's up? It's a masterpiece in 3.14 seconds, 1,000 times, 50% brighter.
The children played in the garden while their parents talked about the weather and the harvest.
She opened the door, looked at the empty room, and wrote a letter to her brother in the north.
Mountains, lakes, rivers, deserts, islands, beaches, valleys, glaciers, volcanoes and waterfalls.
Red, orange, yellow, green, blue, indigo, violet, black, white, grey, brown, pink and gold.
résumé café naïve straße Ångström über crème brûlée déjà vu façade piñata
"""


def train_t5_tokenizer(out: Path) -> int:
    """Write a T5TokenizerFast folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
    to ``out``; returns the number of ids including the sentinels."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    trainer = trainers.UnigramTrainer(vocab_size=4000, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      shrinking_factor=0.9)
    spm = Tokenizer(models.Unigram())
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.train_from_iterator(lines * 8, trainer)
    vocab = [tuple(piece) for piece in json.loads(spm.to_str())["model"]["vocab"]]
    if [p for p, _ in vocab[:3]] != ["<pad>", "</s>", "<unk>"]:
        raise SystemExit(f"unexpected special tokens {vocab[:3]}")
    if len(vocab) + T5_EXTRA_IDS > T5_VOCAB:
        raise SystemExit(f"vocabulary of {len(vocab)} + {T5_EXTRA_IDS} sentinels exceeds T5's {T5_VOCAB} ids")
    tok = transformers.T5TokenizerFast(vocab=vocab, extra_ids=T5_EXTRA_IDS, model_max_length=512)
    tok.save_pretrained(out)
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "additional_special_tokens": [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    n = len(tok)
    ids = tok("a lighthouse at dusk")["input_ids"]
    if ids[-1] != 1 or max(ids) >= T5_VOCAB or n > T5_VOCAB:
        raise SystemExit(f"bad T5 tokenizer: {n} ids, 'a lighthouse at dusk' -> {ids}")
    return n


def copy_files(src: Path, dst: Path) -> None:
    """Copy a folder's files (not their read-only modes: the package's config folders may be read-only)."""
    dst.mkdir()
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copyfile(f, dst / f.name)


def link_component(comp: str, src: Path, dst: Path) -> None:
    dst.mkdir()
    if src.is_file():
        shutil.copyfile(PRESET / comp / "config.json", dst / "config.json")
        (dst / src.name).symlink_to(src.resolve())
    elif (src / "config.json").is_file():
        for f in sorted(src.iterdir()):
            if f.name == "config.json" or f.name.endswith((".safetensors", ".safetensors.index.json")):
                (dst / f.name).symlink_to(f.resolve())
    else:
        raise SystemExit(f"{src}: neither a .safetensors file nor a component folder with config.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out", type=Path, help="pipeline folder to create (must not exist)")
    ap.add_argument("--link", action="append", default=[], metavar="COMP=PATH",
                    help=f"reuse an existing checkpoint for COMP (one of {', '.join(COMPONENTS)})")
    ap.add_argument("--dtype", default="bf16", help="dtype of the components written (make_checkpoint --dtype)")
    ap.add_argument("--seed", type=int, default=0, help="make_checkpoint --seed for the components written")
    args = ap.parse_args()

    links: dict[str, Path] = {}
    for spec in args.link:
        comp, sep, path = spec.partition("=")
        if not sep or comp not in COMPONENTS:
            ap.error(f"--link {spec!r}: want COMP=PATH with COMP one of {', '.join(COMPONENTS)}")
        if not Path(path).exists():
            ap.error(f"--link {spec!r}: {path} does not exist")
        links[comp] = Path(path)
    out: Path = args.out
    if out.exists():
        ap.error(f"{out} exists")

    out.mkdir(parents=True)
    shutil.copyfile(PRESET / "model_index.json", out / "model_index.json")
    copy_files(PRESET / "scheduler", out / "scheduler")
    copy_files(CONFIGS / "sd15" / "tokenizer", out / "tokenizer")
    n = train_t5_tokenizer(out / "tokenizer_2")
    print(f"tokenizer_2: Unigram T5 tokenizer, {n} ids (< {T5_VOCAB})")
    for comp in COMPONENTS:
        dst = out / comp
        if comp in links:
            link_component(comp, links[comp], dst)
            print(f"{comp}: linked {links[comp]}")
            continue
        cmd = [sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), comp, str(dst), "--preset", "flux-schnell",
               "--dtype", args.dtype, "--seed", str(args.seed), "--quiet"]
        print(f"{comp}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
