"""Parity of the FLUX.1 family — FluxTransformer2DModel, the T5 encoder, the 16-channel VAE —
against diffusers/transformers on torch CPU f32, through the public API ``streamexec.load``, at
small seeded configs.

Tolerance, max|ours - ref| / max|ref|, for every storage dtype: T5 encoder and VAE <= 1e-4
(measured 0.8e-6 .. 2.4e-6); FLUX transformer <= 1e-5 (measured 3.6e-7 .. 1e-6): at 1e-4, the
erf GELU in place of the tanh one in FLUX's MLPs (1.2e-5 .. 7e-5 here) would pass unnoticed.
Stored bf16 / fp8 weights do not loosen either: the reference runs in f32 on exactly the values
the file stores (rounded to bf16 / fp8 and back), as our kernels decode them; what is left is f32
summation order and our exp/tanh kernels, as for SD 1.5.

Checkpoints: diffusers folders (``save_pretrained``), a BFL single file (``flux1-*.safetensors``
keys from ``layout_keys.bfl_flux_shapes``, turned into the reference's weights by diffusers' own
BFL converter, as ``test_layouts`` validates it) with no config.json, a ComfyUI
``t5xxl_fp8_e4m3fn``-style file, and a BFL ``ae.safetensors``."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from helpers import FLUX_CONFIGS, flux_converter, flux_inputs, randomize, rel_err, tiny_t5  # noqa: E402
from layout_keys import bfl_flux_shapes, ldm_vae_shapes  # noqa: E402

import streamexec  # noqa: E402
from streamexec.errors import StreamexecError  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import AutoencoderKL, FluxTransformer2DModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

TOL = 1e-4
TOL_FLUX = 1e-5
F8 = torch.float8_e4m3fn


def rounded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model with every parameter rounded to ``dtype`` and back to f32 (what a file stored in
    ``dtype`` holds), in place."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    return model


# ---------------------------------------------------------------------------------------------- FLUX

def run_flux(model: torch.nn.Module, path: Path, inputs: dict, ids_3d: bool = False) -> tuple[np.ndarray, torch.Tensor]:
    """(ours, reference); ``ids_3d``: we get the ids as [1, N, 3], as older pipelines passed them."""
    with torch.no_grad():
        ref = model(**inputs).sample
    feeds = {k: None if v is None else v.numpy() for k, v in inputs.items()}
    if ids_3d:
        feeds["img_ids"], feeds["txt_ids"] = feeds["img_ids"][None], feeds["txt_ids"][None]
    ours = streamexec.load(path, component="transformer")(**feeds)
    return ours, ref


@pytest.mark.parametrize("name", list(FLUX_CONFIGS))
def test_flux_parity(tmp_path: Path, name: str) -> None:
    cfg = FLUX_CONFIGS[name]
    model = FluxTransformer2DModel(**cfg).eval()
    randomize(model, 0)
    model.save_pretrained(tmp_path / "transformer")
    batch, h2, w2, nt = (2, 3, 4, 5) if name == "schnell-like" else (1, 4, 3, 7)
    inputs = flux_inputs(cfg, batch, h2, w2, nt, seed=1, shifted=name == "dev-like")
    ours, ref = run_flux(model, tmp_path / "transformer", inputs, ids_3d=name == "dev-like")
    assert rel_err(ours, ref) <= TOL_FLUX


def test_flux_guidance_argument_is_checked(tmp_path: Path) -> None:
    model = FluxTransformer2DModel(**FLUX_CONFIGS["dev-like"]).eval()
    model.save_pretrained(tmp_path / "transformer")
    inputs = {k: None if v is None else v.numpy()
              for k, v in flux_inputs(FLUX_CONFIGS["dev-like"], 1, 2, 2, 3, seed=2).items()}
    inputs["guidance"] = None
    with pytest.raises(StreamexecError, match="guidance"):
        streamexec.load(tmp_path / "transformer", component="transformer")(**inputs)


def test_flux_parity_bf16_weights(tmp_path: Path) -> None:
    cfg = FLUX_CONFIGS["dev-like"]
    model = FluxTransformer2DModel(**cfg).eval()
    randomize(model, 4)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "transformer")
    ref_model = rounded(model.to(torch.float32), torch.bfloat16)
    inputs = flux_inputs(cfg, 2, 2, 3, 4, seed=5)
    ours, ref = run_flux(ref_model, tmp_path / "transformer", inputs)
    assert rel_err(ours, ref) <= TOL_FLUX


def bfl_values(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random values for original-format keys: ~unit activations through a tiny model (q/k norm
    scales near 1, other vectors small, weights scaled by fan-in)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        if k.endswith(".scale"):
            out[k] = 1 + 0.1 * torch.randn(s, generator=g)
        elif len(s) == 1:
            out[k] = 0.1 * torch.randn(s, generator=g)
        else:
            out[k] = torch.randn(s, generator=g) / math.prod(s[1:]) ** 0.5
    return out


def test_flux_bfl_single_file_fp8(tmp_path: Path) -> None:
    """A bare ``flux1-dev-fp8``-style file: BFL keys, fused qkv / linear1, matrices in fp8 e4m3,
    vectors in bf16, no config.json (head size 128, the FLUX.1 RoPE axes 16/56/56)."""
    cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=128,
               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True)
    model = FluxTransformer2DModel(**cfg).eval()
    values = bfl_values(bfl_flux_shapes(model.config), seed=6)
    stored = {k: v.to(F8 if v.ndim == 2 else torch.bfloat16) for k, v in values.items()}
    save_file(stored, str(tmp_path / "flux1-tiny-fp8.safetensors"))
    oracle = flux_converter(model.inner_dim)({k: v.to(torch.float32) for k, v in stored.items()})
    model.load_state_dict(oracle, strict=True)
    inputs = flux_inputs({**cfg, "axes_dims_rope": (16, 56, 56)}, 1, 4, 4, 6, seed=7, shifted=True)
    ours, ref = run_flux(model, tmp_path / "flux1-tiny-fp8.safetensors", inputs)
    assert rel_err(ours, ref) <= TOL_FLUX


# ------------------------------------------------------------------------------------------------ T5


def test_t5_relative_buckets_match_transformers() -> None:
    """Bucket boundaries (powers of two) must fall where torch's f32 log puts them."""
    from streamexec.runtime.ops_transformer import t5_relative_buckets

    rel = torch.arange(-5000, 5000)
    for buckets, dist in ((32, 128), (8, 16), (16, 64), (64, 256), (6, 7)):
        want = T5Attention._relative_position_bucket(rel, True, buckets, dist).numpy()
        assert np.array_equal(t5_relative_buckets(rel.numpy(), buckets, dist), want), (buckets, dist)


@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_t5_parity(tmp_path: Path, ff: str) -> None:
    """v1.1 (gated-gelu, gelu_new) and original (relu) T5; 13 tokens and 40 (> max_distance 16,
    so the log-spaced and the saturated buckets are used); a right-padded attention mask."""
    model = tiny_t5(ff, seed=8)
    model.save_pretrained(tmp_path / "text_encoder_2")
    t5 = streamexec.load(tmp_path / "text_encoder_2", component="text_encoder_2")
    g = torch.Generator().manual_seed(9)
    for n in (13, 40):
        ids = torch.randint(0, 64, (2, n), generator=g)
        with torch.no_grad():
            ref = model(ids).last_hidden_state
        assert rel_err(t5(input_ids=ids.numpy()), ref) <= TOL
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 29:] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
    assert rel_err(t5(input_ids=ids.numpy(), attention_mask=mask.numpy()), ref) <= TOL


def test_t5_parity_bf16_weights(tmp_path: Path) -> None:
    model = tiny_t5("gated-gelu", seed=10, num_heads=2, d_kv=16)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "text_encoder_2")
    ref_model = rounded(model.to(torch.float32), torch.bfloat16)
    ids = torch.randint(0, 64, (1, 21), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = ref_model(ids).last_hidden_state
    ours = streamexec.load(tmp_path / "text_encoder_2", component="text_encoder_2")(input_ids=ids.numpy())
    assert rel_err(ours, ref) <= TOL


def test_t5_comfy_fp8_file(tmp_path: Path) -> None:
    """A ``t5xxl_fp8_e4m3fn.safetensors``-style file: bare transformers keys, ``shared.weight``
    only, every tensor fp8 e4m3, no config (T5 defaults: 32 buckets, max distance 128), 150 tokens."""
    model = tiny_t5("gated-gelu", seed=12, relative_attention_num_buckets=32, relative_attention_max_distance=128)
    sd = {k: v.to(F8) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(sd, str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"))
    ref_model = rounded(model, F8)
    ids = torch.randint(0, 64, (1, 150), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        ref = ref_model(ids).last_hidden_state
    ours = streamexec.load(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", component="text_encoder_2")(
        input_ids=ids.numpy())
    assert rel_err(ours, ref) <= TOL


# ----------------------------------------------------------------------------------------------- VAE


def test_flux_vae_bfl_ae_file_decode(tmp_path: Path) -> None:
    """FLUX's 16-channel VAE (no quant convs) from a BFL ``ae.safetensors`` (LDM keys, no config),
    decoding latents the way FluxPipeline does: z / scaling_factor + shift_factor."""
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                          latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                          scaling_factor=0.3611, shift_factor=0.1159).eval()
    values = bfl_values(ldm_vae_shapes(model.config), seed=14)
    values = {k: 1 + 0.1 * v if "norm" in k and k.endswith("weight") else v for k, v in values.items()}
    save_file(values, str(tmp_path / "ae.safetensors"))
    model.load_state_dict(sfu.convert_ldm_vae_checkpoint(dict(values), model.config), strict=True)
    z = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(15))
    z = z / model.config.scaling_factor + model.config.shift_factor
    with torch.no_grad():
        ref = model.decode(z).sample
    ours = streamexec.load(tmp_path / "ae.safetensors", component="vae").decode(z.numpy())
    assert rel_err(ours, ref) <= TOL


# ------------------------------------------------------------------------------ kernel chunk params


def test_chunk_params_keep_parity(tmp_path: Path) -> None:
    """The chunk parameters a planner sets on these models' ops (row chunks of the MLP hidden that
    do not divide the token count, attention tiles) change nothing but memory: still parity."""
    from streamexec.models.flux import build_flux_transformer
    from streamexec.models.t5 import build_t5_encoder
    from streamexec.runtime.executor import Executor, Schedule

    def run(m, graph, feeds, params: dict[str, dict]) -> np.ndarray:
        schedule = Schedule.by_unit(graph)
        schedule.op_params.update({i: params[op.kind] for i, op in enumerate(graph.ops) if op.kind in params})
        assert schedule.op_params
        return Executor(graph, m.store, schedule).run(feeds)[0]

    cfg = FLUX_CONFIGS["schnell-like"]
    model = FluxTransformer2DModel(**cfg).eval()
    randomize(model, 0)
    model.save_pretrained(tmp_path / "transformer")
    inputs = flux_inputs(cfg, 2, 3, 4, 5, seed=1)
    with torch.no_grad():
        ref = model(**inputs).sample
    m = streamexec.load(tmp_path / "transformer", component="transformer")
    graph = build_flux_transformer(m.config, m.weight_info, batch=2, img_tokens=12, txt_tokens=5)
    small = {"mlp": {"row_chunk": 5, "panel_rows": 7}, "parallel_mlp": {"row_chunk": 5, "panel_rows": 7},
             "attention": {"q_tile": 3, "k_tile": 4}}
    ours = run(m, graph, {k: v.numpy() for k, v in inputs.items() if v is not None}, small)
    assert rel_err(ours, ref) <= TOL_FLUX

    t5_model = tiny_t5("gated-gelu", seed=8)
    t5_model.save_pretrained(tmp_path / "text_encoder_2")
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(16))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, 33:] = 0
    with torch.no_grad():
        ref = t5_model(ids, attention_mask=mask).last_hidden_state
    m = streamexec.load(tmp_path / "text_encoder_2", component="text_encoder_2")
    graph = build_t5_encoder(m.config, m.weight_info, batch=2, seq_len=40, masked=True)
    ours = run(m, graph, {"input_ids": ids.numpy(), "key_len": mask.sum(1).numpy()},
               {"mlp": {"row_chunk": 7}, "prefix_attention": {"q_tile": 5, "k_tile": 6}})
    assert rel_err(ours, ref) <= TOL
