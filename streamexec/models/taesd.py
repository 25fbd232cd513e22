"""The tiny VAE decoders (diffusers' ``AutoencoderTiny`` decoder: madebyollin's TAESD for SD 1.x/2.x,
TAESDXL, TAEF1 with 16 latent channels) as an op graph: plain 3×3 convolutions, ReLUs and nearest
2× upsamples, no norms, no attention. Internal weight names are diffusers' ``decoder.layers.N…``.

The structure is read from the weights: layer ``N`` is a conv (``N.weight``), a residual block
(``N.conv.0.weight``: conv, ReLU, conv, ReLU, conv, plus the input or a 1×1 ``skip``, then ReLU),
or has no weights — the ReLU after the first conv, otherwise a 2× nearest upsample (fused into
the conv that follows). The input is soft-clamped, ``tanh(z / 3) · 3``, and the output mapped
from [0, 1] to [-1, 1], as ``DecoderTiny.forward`` does. Latent scaling is the caller's, as
diffusers pipelines do it (``z / scaling_factor``, 1.0 for the published tiny decoders)."""

from __future__ import annotations

from ..errors import CheckpointError
from .graph import Graph, GraphBuilder, WeightInfo

PREFIX = "decoder.layers"
#: DecoderTiny's input clamp: tanh(z / 3) * 3.
CLAMP = 3.0


def tiny_config_check(config: dict, where: str) -> None:
    """Refuse the AutoencoderTiny options this graph does not implement (other activations or
    upsampling modes than the published decoders use)."""
    act = config.get("act_fn", "relu")
    up = config.get("upsample_fn", "nearest")
    factor = config.get("upsampling_scaling_factor", 2)
    if act != "relu" or up != "nearest" or factor != 2:
        raise CheckpointError(where, f"AutoencoderTiny with act_fn={act!r}, upsample_fn={up!r}, "
                                     f"upsampling_scaling_factor={factor!r} is not supported (relu, nearest, 2)")


def _last_layer(g: GraphBuilder) -> int:
    n, last = 0, -1
    while n <= last + 3:  # at most two weightless layers (ReLU / Upsample) in a row
        if g.has(f"{PREFIX}.{n}.weight") or g.has(f"{PREFIX}.{n}.conv.0.weight"):
            last = n
        n += 1
    return last


def build_tiny_decoder(config: dict, weight_info: WeightInfo, *, batch: int, height: int, width: int,
                       where: str = "taesd") -> Graph:
    """Graph for ``AutoencoderTiny.decode(z).sample``: ``z`` [B, latent, h, w] → image [B, 3, 8h, 8w]
    in [-1, 1] (for 3 upsamples; 2^upsamples in general)."""
    tiny_config_check(config, where)
    g = GraphBuilder("AutoencoderTiny.decode", config, weight_info, where)
    if not g.has(f"{PREFIX}.0.weight"):
        raise CheckpointError(where, f"missing tensor '{PREFIX}.0.weight' (the first conv of a tiny decoder)")
    latent = g.wshape(f"{PREFIX}.0.weight")[1]
    z = g.input("z", (batch, latent, height, width))
    with g.unit("clamp"):
        h = g.unary(z, "soft_clamp", name="clamp")
        g.graph.ops[-1].attrs["bound"] = CLAMP
    last = _last_layer(g)
    upsample = False
    for n in range(last + 1):
        p = f"{PREFIX}.{n}"
        if g.has(f"{p}.weight"):
            with g.unit(p):
                h = g.conv2d(h, p, upsample=upsample)
            upsample = False
        elif g.has(f"{p}.conv.0.weight"):
            with g.unit(p):
                h = _block(g, h, p)
        elif n == 1:
            with g.unit(p):
                h = g.unary(h, "relu", name=p)
        else:
            if upsample:
                raise CheckpointError(where, f"layers {n - 1} and {n} both lack weights (two upsamples in a row?)")
            upsample = True
    if upsample:
        raise CheckpointError(where, f"the tiny decoder ends with a weightless layer {last + 1}")
    if g.shape(h)[1] != 3:
        raise CheckpointError(where, f"the last conv '{PREFIX}.{last}' gives {g.shape(h)[1]} channels, not 3 (RGB)")
    with g.unit("to_signed"):
        h = g.op("scale", [h], g.shape(h), name="to_signed", attrs={"factor": 2.0, "offset": -1.0})
    g.output(h)
    return g.graph


def _block(g: GraphBuilder, x: str, p: str) -> str:
    """AutoencoderTinyBlock: relu(conv(relu(conv(relu(conv(x))))) + skip(x))."""
    h = g.unary(g.conv2d(x, f"{p}.conv.0"), "relu", name=f"{p}.conv.1")
    h = g.unary(g.conv2d(h, f"{p}.conv.2"), "relu", name=f"{p}.conv.3")
    skip = g.conv2d(x, f"{p}.skip") if g.has(f"{p}.skip.weight") else x
    h = g.conv2d(h, f"{p}.conv.4", residual=skip)
    return g.unary(h, "relu", name=f"{p}.fuse")
