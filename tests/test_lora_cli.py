"""``streamexec run --lora FILE[:WEIGHT]`` on the demo model (issue #18): a LoRA changes the image,
weight 0 gives the same bytes as no LoRA, bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def streamexec(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamexec", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def demo_lora(tmp_path_factory) -> Path:
    """A kohya LoRA on the demo UNet's attention q/k and resnet conv1 (LoCon) and the text encoder's
    q_proj (rank 2)."""
    from safetensors.numpy import save_file

    from streamexec.pipelines.demo import ensure_demo_model
    from streamexec.weights.checkpoint import open_checkpoint

    ckpt = open_checkpoint(ensure_demo_model())
    g = np.random.default_rng(0)
    tensors = {}
    for comp, prefix, names in [("unet", "lora_unet_", ("to_q.weight", "to_k.weight")),
                                ("text_encoder", "lora_te_", ("q_proj.weight",))]:
        store = ckpt.store(comp)
        for key in store.keys():
            if key.endswith(names) or (comp == "unet" and key.endswith("conv1.weight")):  # + LoCon on resnets
                n, *k = store.shape(key)
                base = prefix + key[: -len(".weight")].replace(".", "_")
                tensors[base + ".lora_down.weight"] = g.standard_normal((2, *k)).astype(np.float16)
                tensors[base + ".lora_up.weight"] = g.standard_normal((n, 2, *[1] * (len(k) - 1))).astype(np.float16)
                tensors[base + ".alpha"] = np.array(2.0, np.float32)
    path = tmp_path_factory.mktemp("lora") / "demo_lora.safetensors"
    save_file(tensors, str(path))
    return path


def _run(env: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return streamexec("run", "plans/demo.yaml", "--prompt", "a lighthouse", "--seed", "5", "--steps", "2", "--quiet",
                      "-o", str(out), *extra, env=env)


def test_lora_changes_the_image_and_weight_zero_does_not(env: dict, tmp_path: Path, demo_lora: Path) -> None:
    plain, zero, lora = tmp_path / "plain.png", tmp_path / "zero.png", tmp_path / "lora.png"
    for out, extra in [(plain, ()), (zero, ("--lora", f"{demo_lora}:0")), (lora, ("--lora", f"{demo_lora}:0.8"))]:
        res = _run(env, out, *extra)
        assert res.returncode == 0, res.stderr[-2000:]
    import hashlib

    from PIL import Image

    px = {}
    for out in (plain, zero, lora):
        with Image.open(out) as im:
            px[out], params = np.asarray(im), im.text["parameters"]
    assert np.array_equal(px[zero], px[plain])
    assert not np.array_equal(px[lora], px[plain])
    digest = hashlib.sha256(demo_lora.read_bytes()).hexdigest()[:12]
    assert f'Lora hashes: "demo_lora: {digest}@0.8"' in params, params


def test_bad_lora_input_is_one_line_exit_2(env: dict, tmp_path: Path, demo_lora: Path) -> None:
    from safetensors.numpy import save_file

    nowhere = tmp_path / "nowhere.safetensors"
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": np.zeros((2, 8), np.float32),
               "lora_unet_nowhere_to_q.lora_up.weight": np.zeros((8, 2), np.float32)}, str(nowhere))
    out = tmp_path / "x.png"
    for lora, msg in [(f"{demo_lora}:strong", "is not a number"), (str(nowhere), "0 matched; e.g. nowhere_to_q")]:
        res = _run(env, out, "--lora", lora)
        assert res.returncode == 2, res.stderr[-2000:]
        assert msg in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not out.exists()


def test_planner_counts_the_lora_factors_and_scratch(demo_lora: Path) -> None:
    """The fit of a LoRA'd UNet charges the factors (4 bytes per factor element, counted here from
    the file's shapes) on top of the same fit without the LoRA, and more scratch."""
    from safetensors.numpy import load_file

    import streamexec
    from streamexec.models.unet import build_unet
    from streamexec.pipelines.demo import ensure_demo_model

    factors = load_file(str(demo_lora))
    want = sum(4 * a.size for k, a in factors.items()
               if k.startswith("lora_unet_") and not k.endswith(".alpha"))
    fits = []
    for loras in ([], [(demo_lora, 0.5)]):
        m = streamexec.load(ensure_demo_model(), component="unet", loras=loras, baseline=0)
        graph = build_unet(m.config, m.weight_info, batch=1, height=8, width=8, seq_len=7, where="demo")
        fits.append(m.fit(graph))
    assert fits[1].baseline == fits[0].baseline
    assert fits[1].memory[0].baseline - fits[0].memory[0].baseline == want
    assert fits[1].peak >= fits[0].peak + want
    assert sum(m.scratch for m in fits[1].memory) > sum(m.scratch for m in fits[0].memory)


def test_plan_with_lora_records_it_and_run_applies_it(env: dict, tmp_path: Path, demo_lora: Path) -> None:
    import yaml

    from streamexec.pipelines.demo import ensure_demo_model

    model = ensure_demo_model()
    plans = {}
    for name, extra in [("plain", ()), ("lora", ("--lora", f"{demo_lora}:0.8"))]:
        plans[name] = tmp_path / f"{name}.yaml"
        res = streamexec("plan", str(model), "--height", "64", "--width", "64", "--steps", "2", "-o",
                         str(plans[name]), *extra, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
    d = {k: yaml.safe_load(p.read_text()) for k, p in plans.items()}
    assert d["lora"]["run"]["lora"] == [f"{demo_lora.resolve()}:0.8"]
    # above each plan's own (measured, noisy) baseline: the LoRA's factors and scratch are charged
    assert (d["lora"]["memory"]["peak_bytes"] - d["lora"]["memory"]["baseline_bytes"]
            > d["plain"]["memory"]["peak_bytes"] - d["plain"]["memory"]["baseline_bytes"])
    outs = {}
    for name, extra in [("plan", ()), ("flag", ("--lora", f"{demo_lora}:0.8"))]:
        outs[name] = tmp_path / f"{name}.png"
        res = streamexec("run", str(plans["lora" if name == "plan" else "plain"]), "--prompt", "a cat", "--seed", "2",
                         "--quiet", "-o", str(outs[name]), *extra, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
    assert outs["plan"].read_bytes() == outs["flag"].read_bytes()


def test_lcm_lora_template(env: dict, tmp_path: Path, demo_lora: Path) -> None:
    """plans/sd15-lcm-lora.yaml: 4 lcm steps at guidance 1, with --model and --lora."""
    from PIL import Image

    from streamexec.pipelines.demo import ensure_demo_model

    out = tmp_path / "lcm.png"
    res = streamexec("run", "plans/sd15-lcm-lora.yaml", "--model", str(ensure_demo_model()), "--lora", str(demo_lora),
                     "--height", "64", "--width", "64", "--prompt", "a cat", "--quiet", "-o", str(out), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    with Image.open(out) as im:
        params = im.text["parameters"]
    assert "Steps: 4" in params and "lcm" in params.lower() and "CFG scale: 1" in params, params


def test_prompt_lora_syntax(tmp_path: Path) -> None:
    from streamexec.errors import StreamexecError
    from streamexec.weights.lora import prompt_loras

    (tmp_path / "style_v2.safetensors").write_bytes(b"")
    clean, found = prompt_loras("a cat, <lora:style_v2:0.7> in the rain <lora:style_v2>", tmp_path)
    assert clean == "a cat, in the rain"
    assert found == [(str(tmp_path / "style_v2.safetensors"), 0.7), (str(tmp_path / "style_v2.safetensors"), 1.0)]
    assert prompt_loras("no tags", None) == ("no tags", [])
    with pytest.raises(StreamexecError, match=r"no style_v3.safetensors in .* \(close: style_v2\)"):
        prompt_loras("<lora:style_v3:1>", tmp_path)
    with pytest.raises(StreamexecError, match="weight 'lots' is not a number"):
        prompt_loras("<lora:style_v2:lots>", tmp_path)
    with pytest.raises(StreamexecError, match="--lora-dir"):
        prompt_loras("<lora:style_v2:1>", None)


def test_prompt_tag_equals_lora_flag(env: dict, tmp_path: Path, demo_lora: Path) -> None:
    tag, flag = tmp_path / "tag.png", tmp_path / "flag.png"
    res = streamexec("run", "plans/demo.yaml", "--prompt", "a lighthouse <lora:demo_lora:0.8>", "--lora-dir",
                     str(demo_lora.parent), "--seed", "5", "--steps", "2", "--quiet", "-o", str(tag), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert _run(env, flag, "--lora", f"{demo_lora}:0.8").returncode == 0
    assert tag.read_bytes() == flag.read_bytes()  # same prompt, same LoRA, same parameters
