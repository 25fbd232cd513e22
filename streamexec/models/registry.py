"""Which builder makes the graph of which checkpoint component, the input shapes a text-to-image
run gives each of them (image size, batch, text length), and the model facts everything above the
builders asks about: which components there are, FLUX.1-dev or schnell, T5's text length, the VAE's
scale factor and its latent scaling/shift. The CLI, the planner, the API and the pipelines read
these here rather than keeping their own copies."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from ..errors import StreamexecError
from ..weights.layouts import COMPONENTS
from .graph import Graph, WeightInfo

# COMPONENTS, the component names in pipeline order (every one runnable), is defined with the key
# layouts in weights/layouts.py, because finding a component's files already needs the names.

#: The weight only guidance-distilled FLUX transformers (FLUX.1-dev) have.
GUIDANCE_EMBEDDER_KEY = "time_text_embed.guidance_embedder.linear_1.weight"
#: T5 tokens FLUX.1-dev's pipeline gives the text (schnell: 256); also the most FLUX's T5 takes.
T5_MAX_LEN = 512
#: diffusers' FluxPipeline.default_sample_size (latent pixels): 1024² images with the 8× VAE.
FLUX_SAMPLE_SIZE = 128
#: SD 1.5's latent scaling, diffusers' default when a VAE config does not say (FLUX's says 0.3611).
SD_VAE_SCALING_FACTOR = 0.18215


@dataclass
class RunShape:
    """The sizes a plan is made for. ``batch`` is images per prompt: SD 1.5's UNet and CLIP run
    2 × batch (prompt and negative prompt, classifier-free guidance); FLUX runs batch."""

    height: int
    width: int
    batch: int = 1
    text_len: int | None = None  # CLIP: 77; T5: t5_text_len
    cfg: bool = True


def is_flux(components: Container[str]) -> bool:
    """Whether a checkpoint with these component names is a FLUX.1 pipeline (it has a transformer)."""
    return "transformer" in components


#: The weight every CLIP text encoder has (and T5 has not): tells SDXL's text_encoder_2 from FLUX's.
CLIP_MARKER = "text_model.embeddings.token_embedding.weight"


def is_clip(keys: Container[str]) -> bool:
    """Whether a text encoder with these (internal) weight names is CLIP rather than T5."""
    return CLIP_MARKER in keys


def is_flux_dev(config: dict | None, weight_info: WeightInfo | None = None) -> bool:
    """FLUX.1-dev (guidance-distilled) rather than schnell: the transformer config's
    ``guidance_embeds``, or — a single file without config — a guidance embedder among its weights
    (``weight_info`` of the transformer; without it, a config that does not say means schnell)."""
    if config and "guidance_embeds" in config:
        return bool(config["guidance_embeds"])
    return weight_info is not None and weight_info(GUIDANCE_EMBEDDER_KEY) is not None


def clip_text_len(text_encoder_config: dict | None) -> int:
    """CLIP's text length, the one its position embeddings fix (77)."""
    return int((text_encoder_config or {}).get("max_position_embeddings", 77))


def t5_text_len(dev: bool) -> int:
    """T5 tokens FLUX's pipeline encodes by default (``max_sequence_length``): 512 dev, 256 schnell."""
    return T5_MAX_LEN if dev else 256


def vae_scale(vae_config: dict | None) -> int:
    """Image pixels per latent pixel: 2^(len(block_out_channels) - 1), as diffusers computes it (8 for
    SD 1.5 and FLUX, and when there is no VAE config)."""
    blocks = (vae_config or {}).get("block_out_channels") or [0] * 4
    return 2 ** (len(blocks) - 1)


def vae_scaling_factor(vae_config: dict | None) -> float:
    """The latent scaling the pipelines divide by before decoding (``scaling_factor``)."""
    return float((vae_config or {}).get("scaling_factor", SD_VAE_SCALING_FACTOR))


def vae_shift_factor(vae_config: dict | None) -> float | None:
    """The latent shift FLUX's VAE adds after unscaling (``shift_factor``; None for SD 1.5)."""
    return (vae_config or {}).get("shift_factor")


def tiny_vae_scaling(config: dict | None) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a tiny decoder (AutoencoderTiny): diffusers pipelines decode
    ``latents / scaling_factor + shift_factor``; the published TAESD/TAESDXL/TAEF1 configs say 1.0 and
    0 (they take the denoiser's latents as they are), and so does a file without config."""
    cfg = config or {}
    return float(cfg.get("scaling_factor") or 1.0), float(cfg.get("shift_factor") or 0.0)


def default_size(configs: dict[str, dict]) -> int:
    """The image side a pipeline was trained at: UNet ``sample_size`` (default 64) × VAE scale (512
    for SD 1.5); without a UNet, FLUX's 128 × VAE scale (1024)."""
    if "unet" in configs:
        size = (configs["unet"] or {}).get("sample_size") or 64
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * vae_scale(configs.get("vae"))
    return FLUX_SAMPLE_SIZE * vae_scale(configs.get("vae"))


def default_steps(configs: dict[str, dict]) -> int:
    """Denoising steps the pipelines take when none are asked for: SD 1.5 25, FLUX.1-dev 28,
    FLUX.1-schnell 4."""
    if "transformer" in configs:
        return 28 if is_flux_dev(configs["transformer"]) else 4
    return 25


def build_component(name: str, config: dict, weight_info: WeightInfo, shape: RunShape,
                    configs: dict[str, dict], where: str, vae_mode: str = "decode") -> Graph:
    """The graph of component ``name`` for a run of ``shape``."""
    scale = vae_scale(configs.get("vae") if name != "vae" else config)
    if shape.height % scale or shape.width % scale:
        raise StreamexecError(f"height and width must be multiples of {scale} (got {shape.height}×{shape.width})")
    h, w = shape.height // scale, shape.width // scale
    guided = 2 if shape.cfg else 1
    if name == "unet":
        from .unet import build_unet

        text_len = shape.text_len or clip_text_len(configs.get("text_encoder"))
        return build_unet(config, weight_info, batch=guided * shape.batch, height=h, width=w, seq_len=text_len,
                          where=where)
    if name == "text_encoder" or (name == "text_encoder_2" and weight_info(CLIP_MARKER) is not None):
        from .clip import build_clip_text

        return build_clip_text(config, weight_info, batch=guided * shape.batch,
                               seq_len=clip_text_len(config), where=where)
    if name == "vae":
        from .vae import build_vae_decoder, build_vae_encoder

        if vae_mode == "encode":
            return build_vae_encoder(config, weight_info, batch=shape.batch, height=shape.height, width=shape.width,
                                     where=where)
        return build_vae_decoder(config, weight_info, batch=shape.batch, height=h, width=w, where=where)
    if name == "taesd":
        from .taesd import build_tiny_decoder

        return build_tiny_decoder(config, weight_info, batch=shape.batch, height=h, width=w, where=where)
    if name == "transformer":
        from .flux import build_flux_transformer

        if h % 2 or w % 2:
            raise StreamexecError(f"FLUX needs height and width that are multiples of {2 * scale}")
        txt = shape.text_len or t5_text_len(is_flux_dev(config, weight_info))
        return build_flux_transformer(config, weight_info, batch=shape.batch, img_tokens=(h // 2) * (w // 2),
                                      txt_tokens=txt, where=where)
    if name == "text_encoder_2":
        from .t5 import build_t5_encoder

        # the transformer's config decides (a lone T5 file: schnell's 256 unless --text-len says otherwise)
        txt = shape.text_len or t5_text_len(is_flux_dev(configs.get("transformer")))
        return build_t5_encoder(config, weight_info, batch=shape.batch, seq_len=txt, where=where)
    raise StreamexecError(f"component {name!r} cannot be planned (runnable: {', '.join(COMPONENTS)})")
