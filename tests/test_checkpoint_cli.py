"""Checkpoint discovery (files, component folders, shards, variants, pipelines) and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_clip, tiny_unet, tiny_vae

from streamexec.errors import CheckpointError
from streamexec.weights.checkpoint import open_checkpoint

ROOT = Path(__file__).resolve().parents[1]


#: the tiny SD 1.5-like UNet of these tests
UNET = dict(layers_per_block=1, block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=2,
            norm_num_groups=4)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipe")
    unet, vae = tiny_unet(0, **UNET), tiny_vae((8, 8), 4, 1)
    clip = tiny_clip(2, vocab_size=50, max_position_embeddings=16)
    unet.save_pretrained(root / "unet", max_shard_size="20KB")  # forces shards + index json
    vae.save_pretrained(root / "vae")
    vae.half().save_pretrained(root / "vae", variant="fp16")
    clip.save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir()
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
    }))
    return root


def test_pipeline_folder(pipeline_dir: Path) -> None:
    ckpt = open_checkpoint(pipeline_dir)
    assert ckpt.kind == "pipeline"
    assert set(ckpt.components) == {"unet", "vae", "text_encoder"}
    assert len(list((pipeline_dir / "unet").glob("*.safetensors"))) > 1  # really sharded
    sd = tiny_unet(0, **UNET).state_dict()
    store = ckpt.store("unet")
    assert set(store.keys()) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(store.get(k).array, v.numpy())
    # the non-variant VAE is chosen by default, the fp16 one on request
    assert ckpt.store("vae").dtype("decoder.conv_in.weight") == "F32"
    ckpt16 = open_checkpoint(pipeline_dir, variant="fp16")
    assert ckpt16.store("vae").dtype("decoder.conv_in.weight") == "F16"
    fp = ckpt.fingerprint()
    assert all(len(e["header_sha256"]) == 64 and e["size"] > 0 for e in fp)
    with pytest.raises(CheckpointError, match="several components"):
        ckpt.component()
    with pytest.raises(CheckpointError, match="no component 'transformer'"):
        ckpt.component("transformer")


def test_component_folder_and_single_file(pipeline_dir: Path) -> None:
    ckpt = open_checkpoint(pipeline_dir / "text_encoder")
    assert ckpt.kind == "component" and list(ckpt.components) == ["text_encoder"]
    one = next((pipeline_dir / "text_encoder").glob("*.safetensors"))
    single = open_checkpoint(one)
    assert single.kind == "file" and list(single.components) == ["text_encoder"]


def test_missing_shard_and_variant_errors(pipeline_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "unet"
    shutil.copytree(pipeline_dir / "unet", broken)
    next(broken.glob("*-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard .* is missing"):
        open_checkpoint(broken)
    with pytest.raises(CheckpointError, match="variants present"):
        open_checkpoint(pipeline_dir / "vae", variant="bf16")


def test_index_naming_a_tensor_the_shard_lacks(pipeline_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "unet"
    shutil.copytree(pipeline_dir / "unet", broken)
    index_path = next(broken.glob("*.index.json"))
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"].values()))
    index["weight_map"]["not.a.tensor"] = first
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not.a.tensor"):
        open_checkpoint(broken)


def test_pickle_and_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="arbitrary code"):
        open_checkpoint(tmp_path / "model.ckpt")
    comp = tmp_path / "unet"
    comp.mkdir()
    (comp / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    (comp / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="arbitrary code"):
        open_checkpoint(comp)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a model"):
        open_checkpoint(empty)


# -- CLI ----------------------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "streamexec", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_help_documents_every_command() -> None:
    r = cli("--help")
    assert r.returncode == 0
    for cmd in ("plan", "run", "inspect"):
        assert cmd in r.stdout
    assert "--memory-budget" in cli("plan", "--help").stdout
    run_help = cli("run", "--help").stdout
    for flag in ("--prompt", "--seed", "--sampler", "--latents-in", "--trace", "-o"):
        assert flag in run_help
    assert "--chart" in cli("inspect", "--help").stdout


def test_cli_plan_check_prints_what_it_found(pipeline_dir: Path) -> None:
    r = cli("plan", str(pipeline_dir), "--check")
    assert r.returncode == 0, r.stderr
    assert "pipeline" in r.stdout and "UNet" in r.stdout and "CLIP text encoder: 2 layers" in r.stdout
    assert "F32" in r.stdout


def test_cli_bad_inputs_one_line_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    for args in (
        ("plan", str(bad)),
        ("plan", str(tmp_path / "missing.safetensors")),
        ("plan", str(bad), "--memory-budget", "lots"),
    ):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("streamexec: error:"), r.stderr
        assert "Traceback" not in r.stderr
    r = cli("plan", str(bad), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr
    assert list(tmp_path.iterdir()) == [bad]  # nothing written


def test_cli_unknown_layout_is_refused_with_reason(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "random.safetensors"
    save_file({"foo.bar": np.zeros(3, np.float32), "baz": np.zeros(2, np.float32)}, str(path))
    r = cli("plan", str(path), "--check")
    assert r.returncode == 2
    assert str(path) in r.stderr and len(r.stderr.strip().splitlines()) == 1
