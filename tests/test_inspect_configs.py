"""`streamexec inspect` without weights (issue #20): a preset or a folder of configs gives the
same plan a checkpoint would, and its numbers agree with an independent count — the diffusers /
transformers models built from the same published configs on torch's meta device (shapes only,
no memory): every weight's shape, parameters per layer, GEMM sizes of named layers and the FLOPs
of linear layers computed here from those shapes."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from math import prod
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from PIL import Image

from streamexec.cli import main
from streamexec.configs import REFERENCE_DIR
from streamexec.models.shapes import config_shapes
from streamexec.planner import per_image
from streamexec.planner.memory import WeightMeta
from streamexec.planner.noweights import plan_from_configs, presets
from streamexec.planner.plan import plan_to_dict


def _cfg(rel: str) -> dict:
    return json.loads((REFERENCE_DIR / rel / "config.json").read_text())


def _meta(kind: str, rel: str):
    """The library model of a shipped config, on the meta device."""
    warnings.filterwarnings("ignore")
    cfg = _cfg(rel)
    with torch.device("meta"):
        if kind == "unet":
            from diffusers import UNet2DConditionModel
            return UNet2DConditionModel.from_config(cfg)
        if kind == "vae":
            from diffusers import AutoencoderKL
            return AutoencoderKL.from_config(cfg)
        if kind == "transformer":
            from diffusers import FluxTransformer2DModel
            return FluxTransformer2DModel.from_config(cfg)
        if kind == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel
            return CLIPTextModel(CLIPTextConfig.from_dict(cfg))
        from transformers import T5Config, T5EncoderModel
        return T5EncoderModel(T5Config.from_dict(cfg))


def _state_shapes(model) -> dict[str, tuple[int, ...]]:
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if type(model).__name__.startswith("CLIP") and not k.startswith("text_model."):
            k = "text_model." + k  # transformers versions differ on the CLIP prefix
        out[k] = tuple(v.shape)
    return out


@pytest.mark.parametrize("kind,rel", [
    ("unet", "sd15/unet"), ("vae", "sd15/vae"), ("text_encoder", "sd15/text_encoder"),
    ("transformer", "flux-schnell/transformer"), ("transformer", "flux-dev/transformer"),
    ("text_encoder_2", "flux-schnell/text_encoder_2"), ("vae", "flux-schnell/vae"),
])
def test_config_shapes_are_the_library_models(kind: str, rel: str) -> None:
    assert config_shapes(kind, _cfg(rel)) == _state_shapes(_meta(kind, rel))


@pytest.fixture(scope="module")
def flux_plan() -> dict:
    return plan_to_dict(plan_from_configs("flux-schnell", height=512, width=1024))


@pytest.fixture(scope="module")
def sd_plan() -> dict:
    return plan_to_dict(plan_from_configs("sd15"))


def _ops(plan: dict, comp: str) -> dict[str, dict]:
    return {o["name"]: o for o in plan["components"][comp]["ops"]}


def test_flux_gemms_and_bytes_match_the_meta_model(flux_plan: dict) -> None:
    model = _meta("transformer", "flux-schnell/transformer")
    ops = _ops(flux_plan, "transformer")
    # 1024x512 px -> 128x64 latent -> 64x32 patches of 2x2; schnell's T5 text is 256 tokens
    m = (1024 // 16) * (512 // 16) + 256
    assert m == 2048 + 256
    blk = model.single_transformer_blocks[7]
    for name, mod in (("single_transformer_blocks.7.attn.to_q", blk.attn.to_q),
                      ("single_transformer_blocks.7.attn.to_v", blk.attn.to_v)):
        n, k = mod.weight.shape
        assert ops[name]["gemm"] == [[m, n, k, 1]]
        assert ops[name]["flops"] == 2 * m * n * k
        numel = sum(p.numel() for p in mod.parameters())
        assert ops[name]["weight_bytes"] == 2 * numel  # bf16, the published dtype
    dbl = model.transformer_blocks[3]
    n, k = dbl.attn.add_k_proj.weight.shape
    assert ops["transformer_blocks.3.attn.add_k_proj"]["gemm"] == [[256, n, k, 1]]
    n, k = dbl.attn.to_k.weight.shape
    assert ops["transformer_blocks.3.attn.to_k"]["gemm"] == [[2048, n, k, 1]]
    total = sum(p.numel() for p in model.parameters())
    assert flux_plan["components"]["transformer"]["summary"]["weight_bytes"] == 2 * total
    # BFL's fused single-block linear1 (q, k, v and the MLP's up projection over one input)
    s = per_image.summarize(flux_plan)
    fused = {(g["m"], g["n"], g["k"]) for g in s["components"]["transformer"]["fused_gemms"]}
    n1 = 3 * blk.attn.to_q.weight.shape[0] + blk.proj_mlp.weight.shape[0]
    assert (m, n1, blk.proj_mlp.weight.shape[1]) in fused and n1 == 21504


def test_sd15_gemms_and_bytes_match_the_meta_model(sd_plan: dict) -> None:
    model = _meta("unet", "sd15/unet")
    ops = _ops(sd_plan, "unet")
    tb = model.down_blocks[1].attentions[0].transformer_blocks[0]
    tokens = 2 * (512 // 8 // 2) ** 2  # CFG batch 2, second level: 32x32 latent cells
    for name, mod, rows in (("attn1.to_q", tb.attn1.to_q, tokens), ("attn2.to_k", tb.attn2.to_k, 2 * 77)):
        n, k = mod.weight.shape
        op = ops[f"down_blocks.1.attentions.0.transformer_blocks.0.{name}"]
        assert op["gemm"] == [[rows, n, k, 1]] and op["flops"] == 2 * rows * n * k
        assert op["weight_bytes"] == 4 * sum(p.numel() for p in mod.parameters())  # f32, as published
    conv = model.down_blocks[0].resnets[0].conv1
    co, ci, kh, kw = conv.weight.shape
    assert ops["down_blocks.0.resnets.0.conv1"]["gemm"] == [[2 * 64 * 64, co, ci * kh * kw, 1]]
    total = sum(p.numel() for p in model.parameters())
    assert sd_plan["components"]["unet"]["summary"]["weight_bytes"] == 4 * total
    s = per_image.summarize(sd_plan)
    u = s["components"]["unet"]
    assert s["steps"] == 25 and u["calls_per_image"] == 25 and u["batch_per_call"] == 2
    assert u["evaluations_per_image"] == 50 and s["components"]["text_encoder"]["evaluations_per_image"] == 2
    assert u["gflop_per_image"] == pytest.approx(25 * u["gflop_per_call"])
    assert s["components"]["text_encoder"]["calls_per_image"] == 1
    assert sum(u["flop_share"].values()) == pytest.approx(1.0)


def test_presets_follow_the_config_folders() -> None:
    have = presets()
    assert {"sd15", "flux-schnell", "flux-dev"} <= set(have)
    expect = {p.name for p in REFERENCE_DIR.iterdir() if p.is_dir() and any(p.glob("*/config.json"))}
    assert set(have) == expect
    dev = plan_from_configs("flux-dev", height=256, width=256, components=["text_encoder_2"])
    assert dev.components["text_encoder_2"].graph.inputs["input_ids"][1] == 512  # dev: T5 takes 512 tokens


def test_cli_flux_schnell_1024x512_without_weights(tmp_path: Path, env: dict) -> None:
    res = subprocess.run([sys.executable, "-m", "streamexec", "inspect", "flux-schnell", "--height", "512",
                          "--width", "1024"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.index("per image at 1024x512") < out.index("== transformer")
    assert "2304 x  21504 x   3072" in out and "no weights read" in out


def test_cli_json_scale_table_and_charts(tmp_path: Path, capsys) -> None:
    assert main(["inspect", "sd15", "--json", "--scale-table", "--steps", "10", "--dtype", "f16"]) == 0
    js = json.loads(capsys.readouterr().out)
    a, b = js["per_image"], js["per_image_at_2x"]
    assert (b["width"], b["height"]) == (1024, 1024) and a["steps"] == 10
    ua, ub = a["components"]["unet"], b["components"]["unet"]
    assert ua["weight_bytes_per_image"] == ub["weight_bytes_per_image"]  # weights do not grow with the image
    # conv and linear work grows as the pixels (x4, less the text-side projections), self-attention as their square
    def growth(kind: str) -> float:
        return ub["gflop_per_image"] * ub["flop_share"][kind] / (ua["gflop_per_image"] * ua["flop_share"][kind])

    conv, att = growth("conv"), growth("attention")
    assert 3.9 < conv <= 4.0 and 10 < att <= 16
    params = sum(prod(s) for s in _state_shapes(_meta("unet", "sd15/unet")).values())
    assert js["summary"]["components"]["unet"]["weight_bytes"] == 2 * params  # --dtype f16
    chart = tmp_path / "c.png"
    assert main(["inspect", "sd15", "--height", "256", "--width", "256", "--chart", str(chart)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("wrote")
    for p in (chart, tmp_path / "c-work.png"):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 600


def _one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_is_one_line(tmp_path: Path, capsys) -> None:
    msg = _one_line_error(["inspect", "sd99"], capsys)
    assert "sd15" in msg and "flux-schnell" in msg
    assert "multiples of 16" in _one_line_error(["inspect", "flux-schnell", "--height", "520"], capsys)
    assert "multiples of 8" in _one_line_error(["inspect", "sd15", "--width", "500"], capsys)
    assert "--dtype" in _one_line_error(["inspect", "sd15", "--dtype", "int3"], capsys)
    broken = tmp_path / "broken" / "unet"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    assert "not valid JSON" in _one_line_error(["inspect", str(broken.parent)], capsys)
    (broken / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert "block_out_channels" in _one_line_error(["inspect", str(broken.parent)], capsys)
    (broken / "config.json").write_text(json.dumps({**_cfg("sd15/unet"), "block_out_channels": [320, "x"]}))
    assert "malformed" in _one_line_error(["inspect", str(broken.parent)], capsys)


def test_plan_on_a_folder_without_weights_says_so(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_cfg("sd15/unet")))
    msg = _one_line_error(["plan", str(folder), "-o", str(tmp_path / "p.yaml")], capsys)
    assert "no .safetensors weights" in msg and "streamexec inspect" in msg
    assert not (tmp_path / "p.yaml").exists()
    assert main(["inspect", str(folder), "--height", "256", "--width", "256"]) == 0
    assert "== unet" in capsys.readouterr().out
    assert main(["inspect", "flux-dev", "--component", "transformer", "--height", "256", "--width", "256"]) == 0
    out = capsys.readouterr().out
    assert "== transformer" in out and "== vae" not in out and "28 steps" in out  # dev's default
    assert "no component 'unet'" in _one_line_error(["inspect", "flux-dev", "--component", "unet"], capsys)


def test_smallest_budget_never_exceeds_a_planned_peak() -> None:
    """The demo VAE's smallest-footprint walk peaks higher than a schedule fitted to 512 MiB (the
    plan summary said 193 MiB planned but 200 MiB smallest); the smallest budget is now the lower
    one, and a plan at that budget fits."""
    from streamexec.planner.fit import fit_schedule

    plan = plan_from_configs("demo", components=["vae"], dtype="f16")
    graph = plan.components["vae"].graph
    table = {k: WeightMeta(s, "F16", prod(s) * 2) for k, s in config_shapes("vae", _demo_vae()).items()}
    fit = fit_schedule(graph, table, 512 << 20, plan.baseline)
    assert fit.min_budget <= fit.peak
    small = -(-fit.min_budget // (1 << 20)) << 20
    assert fit_schedule(graph, table, small, plan.baseline).peak <= small


def _demo_vae() -> dict:
    return _cfg("demo/vae")


def test_sdxl_like_unet_and_projected_clip_shapes() -> None:
    """The SDXL-style parts (size/crop conditioning embedding, per-level transformer depth, a
    projected second CLIP) as the libraries build them — small widths, real structure."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64, 64], "layers_per_block": 2,
           "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
           "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
           "transformer_layers_per_block": [1, 2, 3], "cross_attention_dim": 48, "attention_head_dim": [2, 4, 8],
           "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
           "projection_class_embeddings_input_dim": 80, "norm_num_groups": 16}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
        clip_cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  projection_dim=24, vocab_size=100, max_position_embeddings=77)
        clip = CLIPTextModelWithProjection(clip_cfg)
    assert config_shapes("unet", cfg) == _state_shapes(unet)
    want = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): tuple(v.shape)
            for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    got = config_shapes("text_encoder_2", {**clip_cfg.to_dict(), "architectures": ["CLIPTextModelWithProjection"]})
    assert got == want
