"""What a checkpoint holds, in words (``streamexec plan --check``): an architecture guess per
component from its tensor names and shapes, sizes by dtype. Reads the headers an open checkpoint
already has; never weight data."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..sizes import format_size
from .registry import is_clip, is_flux_dev

if TYPE_CHECKING:
    from ..weights.checkpoint import Checkpoint, Component


def _count(comp: Component, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in comp.tensors if (m := rx.match(k))})


def _dim(comp: Component, key: str, axis: int) -> int | None:
    t = comp.tensors.get(key)
    return t.shape[axis] if t is not None and len(t.shape) > axis else None


def architecture(comp: Component) -> str:
    """A one-line guess of what the component is, from its tensor names and shapes."""
    n = comp.name
    if n == "unet":
        blocks = _count(comp, r"down_blocks\.(\d+)\.")
        chans = [
            _dim(comp, f"down_blocks.{i}.resnets.0.conv1.weight", 0) for i in range(blocks)
        ]
        cross = next(
            (t.shape[1] for k, t in comp.tensors.items() if k.endswith("attn2.to_k.weight")), None
        )
        family = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(cross or 0, "UNet")
        return (
            f"{family} UNet: in {_dim(comp, 'conv_in.weight', 1)} ch, blocks "
            f"{'/'.join(str(c) for c in chans)}, cross-attention {cross}"
        )
    if n == "transformer":
        double = _count(comp, r"transformer_blocks\.(\d+)\.")
        single = _count(comp, r"single_transformer_blocks\.(\d+)\.")
        hidden = _dim(comp, "x_embedder.weight", 0)
        dev = is_flux_dev(comp.config, lambda k: None if (t := comp.tensors.get(k)) is None else (t.shape, t.dtype))
        kind = "FLUX.1-dev-like (guidance embed)" if dev else "FLUX.1-schnell-like (no guidance embed)"
        return f"{kind}: {double} double + {single} single blocks, width {hidden}"
    if n == "vae":
        latent = _dim(comp, "decoder.conv_in.weight", 1)
        return f"AutoencoderKL: {latent} latent channels"
    if n == "taesd":
        latent, width = _dim(comp, "decoder.layers.0.weight", 1), _dim(comp, "decoder.layers.0.weight", 0)
        kind = {4: "TAESD / TAESDXL", 16: "TAEF1"}.get(latent or 0, "tiny decoder")
        return f"AutoencoderTiny decoder ({kind}): {latent} latent channels, width {width}"
    if n == "text_encoder" or (n == "text_encoder_2" and is_clip(comp.tensors)):
        layers = _count(comp, r"text_model\.encoder\.layers\.(\d+)\.")
        width = _dim(comp, "text_model.embeddings.token_embedding.weight", 1)
        proj = " with projection" if any(k.startswith("text_projection.") for k in comp.tensors) else ""
        return f"CLIP text encoder{proj}: {layers} layers, width {width}"
    if n == "text_encoder_2":
        layers = _count(comp, r"encoder\.block\.(\d+)\.")
        width = _dim(comp, "shared.weight", 1)
        return f"T5 encoder: {layers} layers, width {width}"
    return n


def describe_checkpoint(ckpt: Checkpoint) -> str:
    """Multi-line summary for ``streamexec plan --check``."""
    layouts = sorted({c.layout for c in ckpt.components.values()})
    lines = [
        f"checkpoint: {ckpt.root}",
        f"  kind: {ckpt.kind} ({', '.join(layouts)} layout), {len(ckpt.files)} file(s), "
        f"{format_size(ckpt.nbytes)}",
    ]
    for comp in ckpt.components.values():
        dtypes = ", ".join(
            f"{d} {format_size(b)}" for d, b in sorted(comp.bytes_by_dtype().items())
        )
        scaled = sum(1 for t in comp.tensors.values() if t.scale is not None)
        if scaled:
            dtypes += f" ({scaled} fp8_e4m3 scaled)"
        paths = sorted({Path(p.path).name for t in comp.tensors.values() for p in t.parts})
        lines.append(
            f"  {comp.name:<15} {architecture(comp)}; {len(comp.tensors)} tensors, {dtypes}; "
            f"{comp.layout} from {', '.join(paths)}"
        )
    if ckpt.ignored:
        lines.append(f"  ignored: {len(ckpt.ignored)} tensors not used for inference")
    return "\n".join(lines)
