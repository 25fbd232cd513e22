"""Key layouts (streamexec.weights.layouts) against diffusers/transformers as the oracle.

Ground truth is always a diffusers/transformers model's ``state_dict()`` (tiny seeded models, or
the real published configs instantiated on the ``meta`` device). Original-format files (LDM, BFL,
ComfyUI) are built by the generators in ``layout_keys.py``, which are first validated by running
them through diffusers' own single-file converters; then our mapping, resolved to arrays by a tiny
resolver here, must give bit-identical tensors to the converter's output for every key.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

sys.path.insert(0, str(Path(__file__).parent))

from helpers import flux_converter, tiny_clip, tiny_flux, tiny_t5, tiny_unet, tiny_vae  # noqa: E402
from layout_keys import bfl_flux_shapes, ldm_unet_shapes, ldm_vae_shapes, open_clip_text_shapes  # noqa: E402

from streamexec.errors import CheckpointError, LayoutError  # noqa: E402
from streamexec.weights.layouts import LayoutResult, detect_layout, map_component  # noqa: E402
from streamexec.weights.refs import MappedTensor, StoredTensor  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # noqa: E402

from streamexec.configs import REFERENCE_DIR  # noqa: E402  (the published configs, shipped)

REFERENCE = REFERENCE_DIR
FILE = "model.safetensors"

# ----------------------------------------------------------------------------------------- helpers


def _tag(a: np.ndarray) -> str:
    return {np.dtype("float32"): "F32", np.dtype("int64"): "I64"}[a.dtype]


def stored(arrays: Mapping[str, np.ndarray], path: str = FILE) -> dict[str, StoredTensor]:
    """StoredTensor records for arrays as a safetensors file would describe them."""
    return {k: StoredTensor(path, k, _tag(a), tuple(a.shape)) for k, a in arrays.items()}


def records(
    shapes: Mapping[str, tuple[int, ...]], prefix: str = "", dtype: str = "BF16"
) -> dict[str, StoredTensor]:
    """Shape-only records (no data), for full-size checks."""
    return {prefix + k: StoredTensor(FILE, prefix + k, dtype, tuple(s)) for k, s in shapes.items()}


def random_arrays(
    shapes: Mapping[str, tuple[int, ...]], prefix: str = "", seed: int = 0
) -> dict[str, np.ndarray]:
    """Distinct random float32 values per tensor, so a swapped or mis-sliced tensor is caught."""
    rng = np.random.default_rng(seed)
    return {prefix + k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def resolve(
    mt: MappedTensor, arrays: Mapping[str, np.ndarray], files: Mapping[str, StoredTensor]
) -> np.ndarray:
    """What the WeightStore does: take each stored array, slice rows, reshape (a view), concat."""
    pieces = []
    for ref in mt.parts:
        st = files[ref.key]
        assert (ref.path, ref.dtype) == (st.path, st.dtype)
        base = arrays[ref.key]
        a = base
        if ref.rows is not None:
            start, stop = ref.rows
            assert 0 <= start < stop <= base.shape[0]
            a = base[start:stop]
        v = a.reshape(ref.shape)
        assert np.shares_memory(v, base), f"{ref} is not a view"
        pieces.append(v)
    out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
    assert out.shape == mt.shape and mt.dtype == files[mt.parts[0].key].dtype
    return out


def resolve_all(mapping: Mapping[str, MappedTensor], arrays, files) -> dict[str, np.ndarray]:
    return {k: resolve(mt, arrays, files) for k, mt in mapping.items()}


def assert_bit_identical(
    ours: Mapping[str, np.ndarray], oracle: Mapping[str, torch.Tensor]
) -> None:
    assert sorted(ours) == sorted(oracle)
    for k, t in oracle.items():
        want = t.detach().contiguous().numpy()
        assert ours[k].shape == want.shape, k
        assert ours[k].dtype == want.dtype, k
        assert np.array_equal(ours[k].view(np.uint8), want.view(np.uint8)), k


def shapes_of(sd: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in sd.items()}


def to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(a) for k, a in arrays.items()}


def load_into(model: torch.nn.Module, tensors: Mapping[str, np.ndarray], strip: str = "") -> None:
    """strict load: the final word that names and shapes are what the model expects."""
    sd = {
        k.removeprefix(strip): torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()
    }
    model.load_state_dict(sd, strict=True)


def ref_config(rel: str) -> dict:
    return json.loads((REFERENCE / rel / "config.json").read_text())


# ------------------------------------------------------------------------------------- tiny models

UNET_CONFIGS = {
    # 2 levels, 1 layer per block, attention only on the top level.
    "lpb1-2levels": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    # SD 1.5 shape at small width: 3 levels, 2 layers per block, DownBlock2D last; 2-deep
    # transformers and a different context width.
    "lpb2-3levels-sd15like": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
        transformer_layers_per_block=2,
    ),
}


#: the tiny FLUX transformer of these tests (``guidance_embeds`` varies)
FLUX_CONFIG = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))


def _unet(name: str) -> UNet2DConditionModel:
    return tiny_unet(0, **UNET_CONFIGS[name])


def _vae(latent: int, quant: bool, levels: int = 2, layers: int = 1) -> AutoencoderKL:
    return tiny_vae((8, 16, 16)[:levels], latent, 1, layers=layers, use_quant_conv=quant, use_post_quant_conv=quant)


def _flux(guidance: bool) -> FluxTransformer2DModel:
    return tiny_flux(2, guidance_embeds=guidance, **FLUX_CONFIG)


@pytest.fixture(scope="module")
def clip() -> CLIPTextModel:
    return tiny_clip(3, vocab_size=64, max_position_embeddings=12, bos_token_id=0, eos_token_id=2, pad_token_id=1)


@pytest.fixture(scope="module")
def t5() -> T5EncoderModel:
    return tiny_t5("gated-gelu", 4, randomized=False, vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                   relative_attention_max_distance=128)


def clip_internal(model: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The CLIP names streamexec uses: ``text_model.*`` as every published checkpoint has them.
    transformers >= 5 dropped that module level and strips it on load (its conversion_mapping
    has ``PrefixChange(prefix_to_remove="text_model")`` for CLIPTextModel)."""
    sd = model.state_dict()
    if all(k.startswith("text_model.") for k in sd):
        return dict(sd)
    return {"text_model." + k: v for k, v in sd.items()}


def clip_strip(model: CLIPTextModel) -> str:
    """What to strip from internal CLIP names to get this transformers version's names."""
    return "" if any(k.startswith("text_model.") for k in model.state_dict()) else "text_model."


# ---------------------------------------------------------------------------------------- LDM UNet


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_ldm_unet_matches_diffusers_converter(name: str) -> None:
    model = _unet(name)
    truth = model.state_dict()
    arrays = random_arrays(ldm_unet_shapes(model.config), "model.diffusion_model.")
    # The generator is right: diffusers' converter turns it into exactly the model's key set.
    oracle = sfu.convert_ldm_unet_checkpoint(to_torch(arrays), model.config)
    assert shapes_of(oracle) == shapes_of(truth)

    files = stored(arrays)
    res = detect_layout(files, "sd.safetensors")
    assert res.layout == "ldm-sd15" and list(res.components) == ["unet"] and res.ignored == []
    ours = resolve_all(res.components["unet"], arrays, files)
    assert_bit_identical(ours, oracle)
    load_into(model, ours)
    assert all(mt.is_view for mt in res.components["unet"].values())


_CHANNELS = hs.sampled_from([8, 16, 24])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chans=hs.lists(_CHANNELS, min_size=1, max_size=4),
    layers=hs.integers(1, 3),
    attn=hs.lists(hs.booleans(), min_size=4, max_size=4),
    depth=hs.integers(1, 2),
    linear=hs.booleans(),
)
def test_ldm_unet_any_shape_maps_like_diffusers(chans, layers, attn, depth, linear) -> None:
    """Depth, width, layers per block and where the attention sits all come from the keys: for
    any architecture, every diffusers key comes from the same LDM key diffusers' converter takes
    it from (the converter only moves values, so keys stand in for tensors)."""
    n = len(chans)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn[:n])
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn[:n]))
    with torch.device("meta"):
        model = UNet2DConditionModel(
            block_out_channels=tuple(chans),
            layers_per_block=layers,
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=16,
            attention_head_dim=2,
            norm_num_groups=4,
            transformer_layers_per_block=depth,
            use_linear_projection=linear,
        )
    shapes = ldm_unet_shapes(model.config)
    prefix = "model.diffusion_model."
    source = sfu.convert_ldm_unet_checkpoint({prefix + k: prefix + k for k in shapes}, model.config)
    res = detect_layout(records(shapes, prefix), "x")
    unet = res.components["unet"]
    assert {k: mt.shape for k, mt in unet.items()} == shapes_of(model.state_dict())
    assert {k: mt.parts[0].key for k, mt in unet.items()} == source
    assert all(mt.is_view and mt.parts[0].rows is None for mt in unet.values())


# ----------------------------------------------------------------------------------------- LDM VAE

VAE_CASES = {
    # (latent channels, quant convs, levels, layers per block, stored key prefix, layout)
    "sd-4ch-quant-in-ldm-file": (4, True, 2, 1, "first_stage_model.", "ldm-sd15"),
    "bfl-ae-16ch-noquant": (16, False, 3, 2, "", "bfl-ae"),
    "ldm-vae-file-4ch-quant": (4, True, 3, 1, "", "ldm-vae"),
    "comfy-vae-prefix-16ch": (16, False, 2, 2, "vae.", "ldm-sd15"),
}


@pytest.mark.parametrize("case", sorted(VAE_CASES))
def test_ldm_vae_matches_diffusers_converter(case: str) -> None:
    latent, quant, levels, layers, prefix, layout = VAE_CASES[case]
    model = _vae(latent, quant, levels, layers)
    truth = model.state_dict()
    arrays = random_arrays(ldm_vae_shapes(model.config), prefix, seed=levels)
    oracle = sfu.convert_ldm_vae_checkpoint(to_torch(arrays), model.config)
    assert shapes_of(oracle) == shapes_of(truth)

    files = stored(arrays)
    res = detect_layout(files, "ae.safetensors")
    assert (res.layout, list(res.components), res.ignored) == (layout, ["vae"], [])
    vae = res.components["vae"]
    assert_bit_identical(resolve_all(vae, arrays, files), oracle)
    # decoder.up.i is stored top-level-first; diffusers numbers up_blocks deepest-first.
    top = vae[f"decoder.up_blocks.{levels - 1}.resnets.0.conv1.weight"].parts[0].key
    assert top == f"{prefix}decoder.up.0.block.0.conv1.weight"
    # the attention's 1x1 convs are linear weights now, as views of the stored bytes
    q = vae["encoder.mid_block.attentions.0.to_q.weight"]
    assert q.is_view and q.shape == truth["encoder.mid_block.attentions.0.to_q.weight"].shape
    assert len(q.parts[0].shape) == 2 and files[q.parts[0].key].shape[2:] == (1, 1)


# ---------------------------------------------------------------------------------------- BFL FLUX


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfy-prefixed"])
@pytest.mark.parametrize("guidance", [False, True], ids=["schnell", "dev"])
def test_bfl_flux_matches_diffusers_converter(guidance: bool, prefix: str) -> None:
    model = _flux(guidance)
    truth = model.state_dict()
    arrays = random_arrays(bfl_flux_shapes(model.config), prefix, seed=5)
    oracle = flux_converter(model.inner_dim)(to_torch(arrays))
    assert shapes_of(oracle) == shapes_of(truth)
    assert any("guidance_embedder" in k for k in oracle) == guidance

    files = stored(arrays)
    res = detect_layout(files, "flux1.safetensors")
    assert (res.layout, list(res.components), res.ignored) == ("bfl-flux", ["transformer"], [])
    tr = res.components["transformer"]
    assert_bit_identical(resolve_all(tr, arrays, files), oracle)
    # fused tensors are split by row ranges (views); only norm_out's swapped halves are a copy
    for k, mt in tr.items():
        if k.startswith("norm_out.linear."):
            assert len(mt.parts) == 2 and mt.parts[0].rows[0] > 0 and mt.parts[1].rows[0] == 0
        else:
            assert mt.is_view, k
    for k in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_v_proj"):
        w = tr[f"transformer_blocks.1.{k}.weight"]
        assert w.is_view and w.parts[0].rows is not None and w.parts[0].key.endswith("qkv.weight")
    for k in ("attn.to_q", "attn.to_v", "proj_mlp"):
        b = tr[f"single_transformer_blocks.2.{k}.bias"]
        assert b.is_view and b.parts[0].key.endswith("single_blocks.2.linear1.bias")


# ----------------------------------------------------------------------------------- text encoders


def test_ldm_clip_matches_diffusers_converter(clip: CLIPTextModel) -> None:
    prefix = "cond_stage_model.transformer."
    arrays = {prefix + k: v.numpy() for k, v in clip_internal(clip).items()}
    arrays[prefix + "text_model.embeddings.position_ids"] = np.arange(12, dtype=np.int64)[None]
    oracle = sfu.convert_ldm_clip_checkpoint(to_torch(arrays))
    oracle.pop("text_model.embeddings.position_ids")
    files = stored(arrays)
    res = detect_layout(files, "sd.safetensors")
    assert res.layout == "ldm-sd15" and list(res.components) == ["text_encoder"]
    assert res.ignored == [prefix + "text_model.embeddings.position_ids"]
    ours = resolve_all(res.components["text_encoder"], arrays, files)
    assert_bit_identical(ours, oracle)
    assert_bit_identical(ours, clip_internal(clip))
    load_into(clip, ours, strip=clip_strip(clip))


@pytest.mark.parametrize(
    "variant", ["text_model", "bare", "transformer_prefix", "comfy_checkpoint"]
)
def test_comfy_clip_l_variants(clip: CLIPTextModel, variant: str) -> None:
    truth = clip_internal(clip)
    bare = {k.removeprefix("text_model."): v.numpy() for k, v in truth.items()}
    prefix = {
        "text_model": "text_model.",
        "bare": "",
        "transformer_prefix": "transformer.text_model.",
        "comfy_checkpoint": "text_encoders.clip_l.transformer.text_model.",
    }[variant]
    arrays = {prefix + k: v for k, v in bare.items()}
    extra = {
        "text_projection.weight": np.ones((16, 16), np.float32),
        "logit_scale": np.ones((), np.float32),
    }
    if variant == "comfy_checkpoint":
        extra = {}
    arrays.update(extra)
    files = stored(arrays)
    res = detect_layout(files, "clip_l.safetensors")
    assert list(res.components) == ["text_encoder"] and res.ignored == sorted(extra)
    assert res.layout == ("ldm-sd15" if variant == "comfy_checkpoint" else "comfy-clip-l")
    assert_bit_identical(resolve_all(res.components["text_encoder"], arrays, files), truth)


@pytest.mark.parametrize("stored_as", ["shared", "embed_tokens", "both", "comfy_checkpoint"])
def test_t5_embedding_exposed_under_both_names(t5: T5EncoderModel, stored_as: str) -> None:
    truth = t5.state_dict()
    assert truth["shared.weight"].data_ptr() == truth["encoder.embed_tokens.weight"].data_ptr()
    arrays = {k: v.numpy() for k, v in truth.items()}
    drop = {"shared": ["encoder.embed_tokens.weight"], "embed_tokens": ["shared.weight"]}.get(
        stored_as, []
    )
    for k in drop:
        del arrays[k]
    if stored_as == "comfy_checkpoint":
        del arrays["encoder.embed_tokens.weight"]
        arrays = {"text_encoders.t5xxl.transformer." + k: v for k, v in arrays.items()}
    files = stored(arrays)
    res = detect_layout(files, "t5xxl_fp16.safetensors")
    assert list(res.components) == ["text_encoder_2"]
    assert res.layout == ("ldm-sd15" if stored_as == "comfy_checkpoint" else "comfy-t5")
    assert res.ignored == (["encoder.embed_tokens.weight"] if stored_as == "both" else [])
    t5m = res.components["text_encoder_2"]
    assert t5m["shared.weight"].parts == t5m["encoder.embed_tokens.weight"].parts
    ours = resolve_all(t5m, arrays, files)
    assert_bit_identical(ours, truth)
    load_into(t5, ours)


def test_full_t5_checkpoint_decoder_is_ignored(t5: T5EncoderModel) -> None:
    arrays = {k: v.numpy() for k, v in t5.state_dict().items()}
    arrays["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((16, 16), np.float32)
    arrays["lm_head.weight"] = np.zeros((40, 16), np.float32)
    res = detect_layout(stored(arrays), "t5.safetensors")
    assert res.ignored == [
        "decoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.embed_tokens.weight",
        "lm_head.weight",
    ]


# ------------------------------------------------------------------------------- whole SD 1.5 file


def test_sd15_single_file_all_components(clip: CLIPTextModel) -> None:
    unet, vae = _unet("lpb1-2levels"), _vae(4, True)
    arrays = random_arrays(ldm_unet_shapes(unet.config), "model.diffusion_model.", seed=7)
    arrays |= random_arrays(ldm_vae_shapes(vae.config), "first_stage_model.", seed=8)
    arrays |= {
        "cond_stage_model.transformer." + k: v.numpy() for k, v in clip_internal(clip).items()
    }
    junk = {
        "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(
            12, dtype=np.int64
        )[None],
        "alphas_cumprod": np.ones(10, np.float32),
        "betas": np.ones(10, np.float32),
        "model_ema.decay": np.ones((), np.float32),
        "model_ema.num_updates": np.ones((), np.int64),
        "model_ema.diffusion_modelinput_blocks00weight": np.ones((32, 4, 3, 3), np.float32),
    }
    arrays |= junk
    files = stored(arrays)
    res = detect_layout(files, "v1-5-pruned.safetensors")
    assert isinstance(res, LayoutResult) and res.layout == "ldm-sd15"
    assert sorted(res.components) == ["text_encoder", "unet", "vae"]
    assert res.ignored == sorted(junk)
    oracle = sfu.convert_ldm_unet_checkpoint(to_torch(arrays), unet.config)
    assert_bit_identical(resolve_all(res.components["unet"], arrays, files), oracle)
    oracle = sfu.convert_ldm_vae_checkpoint(to_torch(arrays), vae.config)
    assert_bit_identical(resolve_all(res.components["vae"], arrays, files), oracle)
    assert_bit_identical(
        resolve_all(res.components["text_encoder"], arrays, files), clip_internal(clip)
    )


def test_sdxl_single_file_all_components(clip: CLIPTextModel) -> None:
    """SGM (SDXL) single files: LDM UNet with ``label_emb`` (text_time), CLIP-L under
    ``conditioner.embedders.0.transformer.``, OpenCLIP bigG under ``conditioner.embedders.1.model.``
    (fused ``in_proj`` split into row views; the projection stays as stored, [width, proj]), LDM
    VAE — each compared with diffusers' own single-file converters."""
    from transformers import CLIPTextModelWithProjection

    unet = tiny_unet(0, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=24,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=(2, 4),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
                     projection_class_embeddings_input_dim=12 + 6 * 4)
    vae = _vae(4, True)
    bigg = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      max_position_embeddings=12, projection_dim=12,
                                                      hidden_act="gelu", bos_token_id=0, eos_token_id=2)).eval()
    arrays = random_arrays(ldm_unet_shapes(unet.config), "model.diffusion_model.", seed=7)
    assert "model.diffusion_model.label_emb.0.0.weight" in arrays
    arrays |= random_arrays(ldm_vae_shapes(vae.config), "first_stage_model.", seed=8)
    arrays |= {"conditioner.embedders.0.transformer." + k: v.numpy() for k, v in clip_internal(clip).items()}
    arrays |= random_arrays(open_clip_text_shapes(16, 2, 64, 12, 12), "conditioner.embedders.1.model.", seed=9)
    files = stored(arrays)
    res = detect_layout(files, "sd_xl_base_1.0.safetensors")
    assert res.layout == "sgm-sdxl"
    assert sorted(res.components) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    assert res.ignored == ["conditioner.embedders.1.model.logit_scale"]
    oracle = sfu.convert_ldm_unet_checkpoint(to_torch(arrays), unet.config)
    assert_bit_identical(resolve_all(res.components["unet"], arrays, files), oracle)
    oracle = sfu.convert_ldm_vae_checkpoint(to_torch(arrays), vae.config)
    assert_bit_identical(resolve_all(res.components["vae"], arrays, files), oracle)
    assert_bit_identical(resolve_all(res.components["text_encoder"], arrays, files), clip_internal(clip))
    te2 = res.components["text_encoder_2"]
    assert te2["text_model.encoder.layers.1.self_attn.k_proj.weight"].parts[0].rows == (16, 32)
    ours = resolve_all(te2, arrays, files)
    ours["text_projection.weight"] = np.ascontiguousarray(ours.pop("text_projection.weight.T").T)
    oracle = sfu.convert_open_clip_checkpoint(bigg, to_torch(arrays), prefix="conditioner.embedders.1.model.")
    oracle.pop("text_model.embeddings.position_ids", None)
    assert_bit_identical(ours, oracle)
    load_into(bigg, ours, strip=clip_strip(bigg))


def test_comfy_all_in_one_flux_checkpoint(clip: CLIPTextModel, t5: T5EncoderModel) -> None:
    """ComfyUI's bundled FLUX checkpoints: BFL transformer under model.diffusion_model., LDM VAE
    under vae., CLIP-L and T5 under text_encoders.*.transformer."""
    flux, ae = _flux(True), _vae(16, False)
    arrays = random_arrays(bfl_flux_shapes(flux.config), "model.diffusion_model.", seed=12)
    arrays |= random_arrays(ldm_vae_shapes(ae.config), "vae.", seed=13)
    arrays |= {
        "text_encoders.clip_l.transformer." + k: v.numpy() for k, v in clip_internal(clip).items()
    }
    arrays["text_encoders.clip_l.transformer.text_projection.weight"] = np.eye(16, dtype=np.float32)
    arrays["text_encoders.clip_l.transformer.logit_scale"] = np.ones((), np.float32)
    t5_sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    arrays |= {"text_encoders.t5xxl.transformer." + k: v.numpy() for k, v in t5_sd.items()}
    files = stored(arrays)
    res = detect_layout(files, "flux1-dev-fp8.safetensors")
    assert res.layout == "bfl-flux"
    assert sorted(res.components) == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    assert res.ignored == [
        "text_encoders.clip_l.transformer.logit_scale",
        "text_encoders.clip_l.transformer.text_projection.weight",
    ]
    comp = {name: resolve_all(m, arrays, files) for name, m in res.components.items()}
    assert_bit_identical(comp["transformer"], flux_converter(flux.inner_dim)(to_torch(arrays)))
    assert_bit_identical(comp["vae"], sfu.convert_ldm_vae_checkpoint(to_torch(arrays), ae.config))
    assert_bit_identical(comp["text_encoder"], clip_internal(clip))
    assert_bit_identical(comp["text_encoder_2"], t5.state_dict())
    # the same file dropped into a diffusers folder yields just the component asked for
    assert map_component("vae", files, "vae/") == res.components["vae"]


# ----------------------------------------------------------------------------- real configs (meta)


def _meta_models() -> dict[str, torch.nn.Module]:
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(ref_config("sd15/unet")),
            "vae": AutoencoderKL.from_config(ref_config("sd15/vae")),
            "clip": CLIPTextModel(CLIPTextConfig.from_pretrained(REFERENCE / "sd15/text_encoder")),
            "schnell": FluxTransformer2DModel.from_config(ref_config("flux-schnell/transformer")),
            "dev": FluxTransformer2DModel.from_config(ref_config("flux-dev/transformer")),
            "ae": AutoencoderKL.from_config(ref_config("flux-schnell/vae")),
            "clip_l": CLIPTextModel(
                CLIPTextConfig.from_pretrained(REFERENCE / "flux-schnell/text_encoder")
            ),
            "t5": T5EncoderModel(
                T5Config.from_pretrained(REFERENCE / "flux-schnell/text_encoder_2")
            ),
        }


@pytest.fixture(scope="module")
def real() -> dict[str, torch.nn.Module]:
    return _meta_models()


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters once


def test_reference_parameter_counts(real: dict[str, torch.nn.Module]) -> None:
    """The counts /work/shared/reference/README.md gives. Its "FLUX transformer" figure is
    FLUX.1-dev's; schnell lacks the guidance embedder (256*3072+3072 + 3072*3072+3072)."""
    assert _numel(real["unet"]) == 859_520_964
    assert _numel(real["vae"]) == 83_653_863
    assert _numel(real["clip"]) == _numel(real["clip_l"]) == 123_060_480
    assert _numel(real["dev"]) == 11_901_408_320
    assert _numel(real["schnell"]) == 11_901_408_320 - (256 * 3072 + 3072 + 3072 * 3072 + 3072)
    assert _numel(real["t5"]) == 4_762_310_656
    assert all(p.is_meta for m in real.values() for p in m.parameters())


def _covers(mapping: dict[str, MappedTensor], model: torch.nn.Module, prefix: str = "") -> None:
    """Every diffusers/transformers key, with its shape; nothing more."""
    assert {k: mt.shape for k, mt in mapping.items()} == shapes_of(model.state_dict(), prefix)


def _meta_tensors(
    shapes: Mapping[str, tuple[int, ...]], prefix: str = ""
) -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_sd15_reference_config_full_size(real: dict[str, torch.nn.Module]) -> None:
    unet, vae, clip_ = real["unet"], real["vae"], real["clip"]
    unet_shapes, vae_shapes = ldm_unet_shapes(unet.config), ldm_vae_shapes(vae.config)
    # generators validated at full size by diffusers' converters (meta tensors: shapes only)
    conv = sfu.convert_ldm_unet_checkpoint(
        _meta_tensors(unet_shapes, "model.diffusion_model."), unet.config
    )
    assert shapes_of(conv) == shapes_of(unet.state_dict())
    conv = sfu.convert_ldm_vae_checkpoint(
        _meta_tensors(vae_shapes, "first_stage_model."), vae.config
    )
    assert shapes_of(conv) == shapes_of(vae.state_dict())

    files = records(unet_shapes, "model.diffusion_model.", "F16")
    files |= records(vae_shapes, "first_stage_model.", "F16")
    clip_shapes = {k: tuple(v.shape) for k, v in clip_internal(clip_).items()}
    files |= records(clip_shapes, "cond_stage_model.transformer.", "F16")
    ignored = ["alphas_cumprod", "cond_stage_model.transformer.text_model.embeddings.position_ids"]
    files |= {k: StoredTensor(FILE, k, "F32", (1000,)) for k in ignored}
    res = detect_layout(files, "v1-5-pruned-emaonly.safetensors")
    assert res.layout == "ldm-sd15" and res.ignored == ignored
    _covers(res.components["unet"], unet)
    _covers(res.components["vae"], vae)
    _covers(res.components["text_encoder"], clip_, clip_strip(clip_))
    assert len(res.components["unet"]) == 686
    mapped = {p.key for comp in res.components.values() for mt in comp.values() for p in mt.parts}
    assert mapped | set(res.ignored) == set(files)
    assert {mt.dtype for comp in res.components.values() for mt in comp.values()} == {"F16"}


@pytest.mark.parametrize("which", ["schnell", "dev"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfy-prefixed"])
def test_flux_reference_config_full_size(
    real: dict[str, torch.nn.Module], which: str, prefix: str
) -> None:
    model = real[which]
    shapes = bfl_flux_shapes(model.config)
    conv = sfu.convert_flux_transformer_checkpoint_to_diffusers(_meta_tensors(shapes, prefix))
    assert shapes_of(conv) == shapes_of(model.state_dict())
    assert len(shapes) == (776 if which == "schnell" else 780)  # 16 + 19 * 24 + 38 * 8 (+4)

    files = records(shapes, prefix)
    res = detect_layout(files, f"flux1-{which}.safetensors")
    assert (res.layout, res.ignored) == ("bfl-flux", [])
    tr = res.components["transformer"]
    _covers(tr, model)
    assert {p.key for mt in tr.values() for p in mt.parts} == set(files)
    q = tr["transformer_blocks.18.attn.to_q.weight"]
    assert q.is_view and q.parts[0].rows == (0, 3072) and q.shape == (3072, 3072)
    mlp = tr["single_transformer_blocks.37.proj_mlp.weight"]
    assert mlp.is_view and mlp.parts[0].rows == (9216, 21504) and mlp.shape == (12288, 3072)
    assert ("time_text_embed.guidance_embedder.linear_1.weight" in tr) == (which == "dev")


def test_flux_ae_and_text_encoders_reference_full_size(real: dict[str, torch.nn.Module]) -> None:
    ae, clip_l, t5 = real["ae"], real["clip_l"], real["t5"]
    shapes = ldm_vae_shapes(ae.config)
    assert "quant_conv.weight" not in shapes
    assert shapes_of(sfu.convert_ldm_vae_checkpoint(_meta_tensors(shapes), ae.config)) == shapes_of(
        ae.state_dict()
    )
    res = detect_layout(records(shapes), "ae.safetensors")
    assert (res.layout, res.ignored) == ("bfl-ae", [])
    _covers(res.components["vae"], ae)
    assert res.components["vae"]["decoder.conv_in.weight"].shape == (512, 16, 3, 3)

    clip_shapes = {k: tuple(v.shape) for k, v in clip_internal(clip_l).items()}
    files = records(clip_shapes) | records({"text_projection.weight": (768, 768)})
    res = detect_layout(files, "clip_l.safetensors")
    assert (res.layout, res.ignored) == ("comfy-clip-l", ["text_projection.weight"])
    assert {k: mt.shape for k, mt in res.components["text_encoder"].items()} == clip_shapes

    t5_shapes = shapes_of(t5.state_dict())
    del t5_shapes["encoder.embed_tokens.weight"]  # t5xxl_fp16.safetensors stores shared.weight only
    res = detect_layout(records(t5_shapes, dtype="F8_E4M3"), "t5xxl_fp8_e4m3fn.safetensors")
    assert (res.layout, res.ignored) == ("comfy-t5", [])
    _covers(res.components["text_encoder_2"], t5)
    assert {mt.dtype for mt in res.components["text_encoder_2"].values()} == {"F8_E4M3"}


# --------------------------------------------------------------------------------- diffusers names


def _sharded(sd: Mapping[str, torch.Tensor]) -> dict[str, StoredTensor]:
    """A diffusers component folder split over two shards."""
    out = {}
    for i, (k, v) in enumerate(sd.items()):
        path = f"model-0000{1 + i % 2}-of-00002.safetensors"
        out[k] = StoredTensor(path, k, "F32", tuple(v.shape))
    return out


def test_map_component_diffusers_folders_are_identity(
    clip: CLIPTextModel, t5: T5EncoderModel
) -> None:
    folders = {
        "unet": _unet("lpb2-3levels-sd15like").state_dict(),
        "vae": _vae(16, False).state_dict(),
        "transformer": _flux(True).state_dict(),
        "text_encoder": clip_internal(clip),
        "text_encoder_2": {
            k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"
        },
    }
    for component, sd in folders.items():
        files = _sharded(sd)
        mapped = map_component(component, files, f"{component}/")
        expect = set(sd) | (
            {"encoder.embed_tokens.weight"} if component == "text_encoder_2" else set()
        )
        assert set(mapped) == expect, component
        for k, mt in mapped.items():
            src = "shared.weight" if k == "encoder.embed_tokens.weight" else k
            assert mt.is_view
            assert (mt.parts[0].key, mt.parts[0].path, mt.shape, mt.parts[0].rows) == (
                src,
                files[src].path,
                files[src].shape,
                None,
            )


def test_map_component_transformers5_clip_names(clip: CLIPTextModel) -> None:
    """transformers >= 5 saves CLIPTextModel without ``text_model.``; internally we keep it."""
    bare = {k.removeprefix("text_model."): v for k, v in clip_internal(clip).items()}
    mapped = map_component("text_encoder", _sharded(bare), "text_encoder/")
    assert set(mapped) == set(clip_internal(clip))


def test_map_component_old_diffusers_vae_attention_names() -> None:
    """VAE folders saved by old diffusers (SD 1.5 era) name the mid-block attention
    query/key/value/proj_attn; diffusers renames them on load (``_fix_state_dict_keys_on_load``) - the oracle here."""
    model = _vae(4, True)
    old = {}
    for k, v in model.state_dict().items():
        for new, was in (
            ("to_q.", "query."),
            ("to_k.", "key."),
            ("to_v.", "value."),
            ("to_out.0.", "proj_attn."),
        ):
            if ".mid_block.attentions." in k and new in k:
                k = k.replace(new, was)
        old[k] = v
    assert any("proj_attn" in k for k in old)
    oracle = model._fix_state_dict_keys_on_load(dict(old))
    arrays = {k: v.numpy() for k, v in old.items()}
    files = stored(arrays)
    assert_bit_identical(resolve_all(map_component("vae", files, "vae/"), arrays, files), oracle)


def test_diffusers_named_single_files_detected() -> None:
    for component, sd in {
        "unet": _unet("lpb1-2levels").state_dict(),
        "vae": _vae(4, True).state_dict(),
        "transformer": _flux(False).state_dict(),
    }.items():
        res = detect_layout(_sharded(sd), "diffusion_pytorch_model.safetensors")
        assert (res.layout, list(res.components), res.ignored) == ("diffusers", [component], [])
        assert {k: mt.shape for k, mt in res.components[component].items()} == shapes_of(sd)


def test_map_component_converts_bfl_file_in_transformer_folder() -> None:
    model = _flux(True)
    arrays = random_arrays(bfl_flux_shapes(model.config), seed=9)
    files = stored(arrays, "transformer/flux1-dev.safetensors")
    mapped = map_component("transformer", files, "transformer/")
    assert_bit_identical(
        resolve_all(mapped, arrays, files), flux_converter(model.inner_dim)(to_torch(arrays))
    )


def test_map_component_wrong_component() -> None:
    files = records(shapes_of(_vae(4, True).state_dict()))
    with pytest.raises(
        LayoutError, match=r"expected unet weights but found vae \(diffusers layout\)"
    ):
        map_component("unet", files, "unet/")
    with pytest.raises(LayoutError, match="unknown component 'unet2'"):
        map_component("unet2", files, "unet2/")


# ------------------------------------------------------------------------------------------ errors


def test_unknown_layout_lists_what_was_recognised() -> None:
    rng = np.random.default_rng(11)
    names = ["".join(rng.choice(list("abcdefgh_."), 12)) + str(i) for i in range(30)]
    files = records({n: (4,) for n in names})
    with pytest.raises(LayoutError) as e:
        detect_layout(files, "mystery.safetensors")
    msg = str(e.value)
    assert isinstance(e.value, CheckpointError) and "\n" not in msg
    assert msg.startswith("mystery.safetensors: unknown checkpoint layout")
    assert "recognised none of the known key patterns" in msg and "double_blocks.*" in msg
    assert "30 of 30 keys not recognised" in msg and repr(sorted(names)[0]) in msg


def test_partly_known_file_reports_counts_and_examples() -> None:
    """An SDXL-style file: the UNet prefix is known, ``conditioner.*`` is not."""
    unet = _unet("lpb1-2levels")
    files = records(ldm_unet_shapes(unet.config), "model.diffusion_model.")
    files |= records({f"conditioner.embedders.0.transformer.x{i}": (2,) for i in range(3)})
    with pytest.raises(LayoutError) as e:
        detect_layout(files, "sdxl.safetensors")
    msg = str(e.value)
    n_unet = len(files) - 3
    assert f"model.diffusion_model.*: {n_unet} keys" in msg
    assert f"3 of {len(files)} keys not recognised" in msg
    assert "'conditioner.embedders.0.transformer.x0'" in msg and "\n" not in msg


def test_unexpected_key_inside_known_layout_is_an_error() -> None:
    model = _flux(False)
    files = records(bfl_flux_shapes(model.config))
    files |= records({"double_blocks.0.img_attn.lora_up.weight": (4, 4)})
    with pytest.raises(LayoutError, match=r"looks like bfl-flux but does not fit.*lora_up"):
        detect_layout(files, "flux.safetensors")


def test_fp8_scaled_files_keep_their_scales() -> None:
    """ComfyUI scaled fp8 (issue 16): each scale goes onto the weight it scales, the marker and
    ``scale_input`` are ignored; a scale that is not f32, or a scaled file's matrix without one,
    is refused (the parity of such files runs in test_roles.py)."""
    weights = {"encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4), "shared.weight": (8, 4)}
    scale = "encoder.block.0.layer.0.SelfAttention.q.scale_weight"
    files = records(weights, dtype="F8_E4M3") | records({scale: (), "scaled_fp8": (0,)}, dtype="F32")
    files |= records({"encoder.block.0.layer.0.SelfAttention.q.scale_input": ()}, dtype="F32")
    res = detect_layout(files, "t5xxl_fp8_e4m3fn_scaled.safetensors")
    t5 = res.components["text_encoder_2"]
    assert t5["encoder.block.0.layer.0.SelfAttention.q.weight"].scale.key == scale
    assert t5["shared.weight"].scale is None
    assert {"scaled_fp8", "encoder.block.0.layer.0.SelfAttention.q.scale_input"} <= set(res.ignored)
    with pytest.raises(LayoutError, match="must be one f32 value"):
        detect_layout(files | records({scale: ()}, dtype="F16"), "t5.safetensors")
    unscaled = {k: v for k, v in files.items() if k != scale}
    with pytest.raises(LayoutError, match="SelfAttention.q.weight' has no scale_weight"):
        detect_layout(unscaled, "t5.safetensors")


def test_bad_fused_shapes_are_reported() -> None:
    model = _flux(False)
    shapes = bfl_flux_shapes(model.config)
    shapes["double_blocks.0.img_attn.qkv.weight"] = (47, 16)
    with pytest.raises(
        LayoutError, match=r"qkv.weight has 47 rows; cannot split it into 16\+16\+16"
    ):
        detect_layout(records(shapes), "flux.safetensors")


def test_empty_file() -> None:
    with pytest.raises(LayoutError, match="no tensors"):
        detect_layout({}, "empty.safetensors")
