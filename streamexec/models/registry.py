"""Which builder makes the graph of which checkpoint component, and the input shapes a
text-to-image run gives each of them (image size, batch, text length)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import StreamexecError
from .graph import Graph, WeightInfo

#: Components a run can execute, in pipeline order.
RUNNABLE = ("text_encoder", "text_encoder_2", "unet", "transformer", "vae")


@dataclass
class RunShape:
    """The sizes a plan is made for. ``batch`` is images per prompt: SD 1.5's UNet and CLIP run
    2 × batch (prompt and negative prompt, classifier-free guidance); FLUX runs batch."""

    height: int
    width: int
    batch: int = 1
    text_len: int | None = None  # CLIP: 77; T5: 256 (schnell) / 512 (dev)
    cfg: bool = True


def vae_scale(vae_config: dict | None) -> int:
    """Pixels per latent cell: 2^(len(block_out_channels) - 1), 8 for SD 1.5 and FLUX."""
    if not vae_config:
        return 8
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)


def default_size(configs: dict[str, dict]) -> int:
    """The image side a pipeline was trained at: UNet sample_size × VAE scale (512 for SD 1.5),
    else 1024 (FLUX)."""
    unet = configs.get("unet")
    if unet and unet.get("sample_size"):
        size = unet["sample_size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * vae_scale(configs.get("vae"))
    return 1024


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

        text_len = shape.text_len or int((configs.get("text_encoder") or {}).get("max_position_embeddings", 77))
        return build_unet(config, weight_info, batch=guided * shape.batch, height=h, width=w, seq_len=text_len,
                          where=where)
    if name == "text_encoder":
        from .clip import build_clip_text

        return build_clip_text(config, weight_info, batch=guided * shape.batch,
                               seq_len=int(config.get("max_position_embeddings", 77)), where=where)
    if name == "vae":
        from .vae import build_vae_decoder, build_vae_encoder

        if vae_mode == "encode":
            return build_vae_encoder(config, weight_info, batch=shape.batch, height=shape.height, width=shape.width,
                                     where=where)
        return build_vae_decoder(config, weight_info, batch=shape.batch, height=h, width=w, where=where)
    if name == "transformer":
        from .flux import build_flux_transformer

        if h % 2 or w % 2:
            raise StreamexecError(f"FLUX needs height and width that are multiples of {2 * scale}")
        guided = config.get("guidance_embeds", weight_info("time_text_embed.guidance_embedder.linear_1.weight")
                             is not None)
        txt = shape.text_len or (512 if guided else 256)
        return build_flux_transformer(config, weight_info, batch=shape.batch, img_tokens=(h // 2) * (w // 2),
                                      txt_tokens=txt, where=where)
    if name == "text_encoder_2":
        from .t5 import build_t5_encoder

        txt = shape.text_len or (512 if (configs.get("transformer") or {}).get("guidance_embeds") else 256)
        # (a lone T5 file: schnell's 256 tokens unless --text-len says otherwise)
        return build_t5_encoder(config, weight_info, batch=shape.batch, seq_len=txt, where=where)
    raise StreamexecError(f"component {name!r} cannot be planned (runnable: {', '.join(RUNNABLE)})")
