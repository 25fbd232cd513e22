"""What several test modules share: the error measure, seeded tiny reference models (diffusers /
transformers, built on torch CPU), their configs and the tiny pipeline folders built from them.

Test modules import from here, never from each other. torch/diffusers/transformers are imported
inside the functions, so the kernel tests that only need :func:`rel_err` do not load them.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import numpy as np

from streamexec.configs import REFERENCE_DIR

ROOT = Path(__file__).resolve().parents[1]


def rel_err(ours: Any, ref: Any) -> float:
    """max |ours - ref| / max |ref|, in float64. Shapes must match and ``ours`` must be finite;
    a torch tensor is accepted for either side."""
    ours, ref = (np.asarray(a.detach().numpy() if hasattr(a, "detach") else a) for a in (ours, ref))
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.isfinite(ours).all()
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max()
    return float(diff / max(float(np.abs(ref).max()), 1e-30))


def randomize(model, seed: int) -> None:
    """Random values everywhere (default inits leave many zeros, e.g. zero-initialised convs);
    norm scales around 1, so every weight matters for a comparison."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)


def _seeded(make, seed: int, randomized: bool):
    """``make()`` in eval mode: default init after ``torch.manual_seed(seed)``, or (randomized)
    :func:`randomize` with ``seed`` after a default init that leaves the global seed alone."""
    import torch

    if not randomized:
        torch.manual_seed(seed)
    model = make().eval()
    if randomized:
        randomize(model, seed)
    return model


# ---------------------------------------------------------------------------------- tiny models


def tiny_unet(seed: int, *, randomized: bool = False, **cfg):
    """diffusers UNet2DConditionModel on 8x8 latents of 4 channels unless ``cfg`` says otherwise."""
    from diffusers import UNet2DConditionModel

    cfg = {"sample_size": 8, "in_channels": 4, "out_channels": 4, **cfg}
    return _seeded(lambda: UNet2DConditionModel(**cfg), seed, randomized)


def tiny_vae(channels: tuple[int, ...], latent: int, seed: int, *, randomized: bool = False, layers: int = 1,
             groups: int = 4, **extra):
    """diffusers AutoencoderKL (RGB) with one level per entry of ``channels``."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return _seeded(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=tuple(channels), down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=layers, latent_channels=latent,
        norm_num_groups=groups, **extra), seed, randomized)


def tiny_pipeline_vae(latent: int, seed: int, **extra):
    """The randomized 2-level VAE of the tiny pipelines, its output conv scaled down so most
    decoded pixels stay inside [-1, 1] (an image comparison then means something)."""
    import torch

    model = tiny_vae((16, 32), latent, seed, randomized=True, groups=8, **extra)
    with torch.no_grad():
        model.decoder.conv_out.weight.mul_(0.3)
        model.decoder.conv_out.bias.mul_(0.1)
    return model


def tiny_clip(seed: int, *, randomized: bool = False, **cfg):
    """transformers CLIPTextModel: 2 layers of width 16, 2 heads unless ``cfg`` says otherwise."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, **cfg}
    return _seeded(lambda: CLIPTextModel(CLIPTextConfig(**cfg)), seed, randomized)


def tiny_pipeline_clip(seed: int):
    """SD 1.5's CLIP text encoder config (the published one) at width 32, randomized."""
    cfg = json.loads((REFERENCE_DIR / "sd15" / "text_encoder" / "config.json").read_text())
    cfg.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    for k in ("_name_or_path", "architectures", "torch_dtype", "transformers_version"):
        cfg.pop(k, None)
    return tiny_clip(seed, randomized=True, **cfg)


def tiny_t5(ff: str, seed: int, *, randomized: bool = True, **kw):
    """transformers T5EncoderModel with feed-forward ``ff``: 3 layers of width 32, 4 heads, 8
    relative-position buckets up to distance 16 unless ``kw`` says otherwise."""
    from transformers import T5Config, T5EncoderModel

    cfg = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj=ff)
    return _seeded(lambda: T5EncoderModel(T5Config(**{**cfg, **kw})), seed, randomized)


def tiny_flux(seed: int, *, randomized: bool = False, **cfg):
    """diffusers FluxTransformer2DModel; ``cfg`` as its constructor takes it."""
    from diffusers import FluxTransformer2DModel

    return _seeded(lambda: FluxTransformer2DModel(**cfg), seed, randomized)


UNET_CONFIGS = {
    "sd15-like": dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
    ),
    "one-layer-linear-proj": dict(
        sample_size=8, in_channels=3, out_channels=5, layers_per_block=1, block_out_channels=(16, 24),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12, attention_head_dim=(2, 3), norm_num_groups=4, use_linear_projection=True,
    ),
}

VAE_CONFIGS = {
    "sd-4ch-quant": dict(latent_channels=4, block_out_channels=(16, 32), use_quant_conv=True,
                         use_post_quant_conv=True),
    "flux-16ch": dict(latent_channels=16, block_out_channels=(16, 32, 32), use_quant_conv=False,
                      use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
}

FLUX_CONFIGS = {
    # schnell-like: no guidance embedder; 3 heads of 8, axes 2/2/4
    "schnell-like": dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8,
                         num_attention_heads=3, joint_attention_dim=12, pooled_projection_dim=10,
                         guidance_embeds=False, axes_dims_rope=(2, 2, 4)),
    # dev-like: guidance embedder; 2 heads of 16, axes 4/6/6, other depths
    "dev-like": dict(patch_size=1, in_channels=12, num_layers=1, num_single_layers=2, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=20, pooled_projection_dim=6,
                     guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
}


def flux_inputs(cfg: dict, batch: int, h2: int, w2: int, nt: int, seed: int, shifted: bool = False) -> dict:
    """Inputs as FluxPipeline makes them: packed latents [B, h2*w2, C], T5 states, CLIP pooled
    vector, t in [0, 1], ``_prepare_latent_image_ids`` and zero text ids. ``shifted``: image ids
    moved on every axis and random text ids, so all three RoPE axes matter."""
    import torch
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, h2, w2, "cpu", torch.float32)
    txt_ids = torch.zeros(nt, 3)
    if shifted:
        img_ids = img_ids + torch.tensor([1.0, 3.0, 5.0])
        txt_ids = torch.randint(0, 7, (nt, 3), generator=g).float()
    inputs = dict(
        hidden_states=torch.randn(batch, h2 * w2, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, nt, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=img_ids, txt_ids=txt_ids,
        guidance=torch.full((batch,), 3.5) if cfg["guidance_embeds"] else None,
    )
    return inputs


def flux_converter(inner_dim: int):
    """diffusers' BFL->diffusers converter with its hard-coded width (3072, FLUX.1's real
    ``inner_dim``, used only to split ``linear1``) re-bound to a tiny model's width. The logic
    is untouched; only that one constant of the code object changes."""
    from diffusers.loaders import single_file_utils as sfu

    f = sfu.convert_flux_transformer_checkpoint_to_diffusers
    consts = f.__code__.co_consts
    assert sum(type(c) is int and c == 3072 for c in consts) == 1
    code = f.__code__.replace(
        co_consts=tuple(inner_dim if type(c) is int and c == 3072 else c for c in consts)
    )
    return types.FunctionType(code, f.__globals__, f.__name__, f.__defaults__, f.__closure__)


# ------------------------------------------------------------------------- tiny pipeline folders


def clip_tokenizer():
    """SD 1.5's published CLIP tokenizer (shipped in streamexec/configs)."""
    import transformers

    return transformers.CLIPTokenizer.from_pretrained(REFERENCE_DIR / "sd15" / "tokenizer")


_T5_CORPUS = [
    "a photograph of a lighthouse at dusk, oil painting, highly detailed",
    "the quick brown fox jumps over the lazy dog while the astronaut rides a horse on mars",
]


def t5_tokenizer():
    """A tiny unigram T5 tokenizer trained on two sentences (no network, no download)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    spm = Tokenizer(models.Unigram())
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.train_from_iterator(_T5_CORPUS * 4, trainer)
    vocab = [tuple(piece) for piece in json.loads(spm.to_str())["model"]["vocab"]]
    return transformers.T5TokenizerFast(vocab=vocab, extra_ids=100)


def flux_folder(root: Path, dev: bool) -> Path:
    """A tiny FLUX.1 (schnell or dev) diffusers pipeline folder under ``root``, seeded."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers import FluxPipeline as RefFlux
    from transformers import T5Config, T5EncoderModel

    from streamexec.pipelines.schedulers import FLUX_DEV_SCHEDULER_CONFIG, FLUX_SCHNELL_SCHEDULER_CONFIG

    t5_cfg = json.loads((REFERENCE_DIR / "flux-schnell" / "text_encoder_2" / "config.json").read_text())
    for k in ("architectures", "torch_dtype"):
        t5_cfg.pop(k)
    t5_cfg.update(vocab_size=240, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=2)
    t5 = T5EncoderModel(T5Config(**t5_cfg)).eval()
    randomize(t5, 10)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=dev, axes_dims_rope=(2, 2, 4)).eval()
    randomize(transformer, 11 + dev)
    sched = FLUX_DEV_SCHEDULER_CONFIG if dev else FLUX_SCHNELL_SCHEDULER_CONFIG
    pipe = RefFlux(scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched),
                   vae=tiny_pipeline_vae(4, 12, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                                         shift_factor=0.1159),
                   text_encoder=tiny_pipeline_clip(13), tokenizer=clip_tokenizer(), text_encoder_2=t5,
                   tokenizer_2=t5_tokenizer(), transformer=transformer)
    folder = root / ("tiny-flux-dev" if dev else "tiny-flux-schnell")
    pipe.save_pretrained(folder)
    return folder


#: Half FLUX.1's width, 1 double + 4 single blocks (462 MiB of bf16 weights): the FLUX slice that
#: test_budget.py and test_cgroup.py run under ``FLUX_BUDGET``.
FLUX_MID = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=4, attention_head_dim=128,
                num_attention_heads=12, joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_BUDGET = 300 << 20


def tiny_autoencoder(latent: int, width: int, blocks: tuple[int, ...], seed: int):
    from diffusers import AutoencoderTiny

    model = AutoencoderTiny(latent_channels=latent, decoder_block_out_channels=(width,) * len(blocks),
                            num_decoder_blocks=blocks, encoder_block_out_channels=(8,) * len(blocks),
                            num_encoder_blocks=(1,) * len(blocks)).eval()
    randomize(model, seed)
    return model


def original_decoder_file(model, path: Path) -> Path:
    """The decoder's weights as madebyollin's taesd_decoder.safetensors names them (index + 1: the
    original Sequential starts with the weightless Clamp)."""
    sd = {}
    for k, v in model.decoder.state_dict().items():
        n, rest = k.removeprefix("layers.").split(".", 1)
        sd[f"{int(n) + 1}.{rest}"] = v.contiguous()
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return path
