"""AutoencoderKL (diffusers semantics) decoder and encoder as op graphs: 4 or 16 latent
channels, with or without quant convs, mid-block attention. Scaling/shift factors are applied by
the caller, as diffusers pipelines do."""

from __future__ import annotations

from ..errors import CheckpointError
from .graph import Graph, GraphBuilder, WeightInfo

DEFAULTS = {
    "block_out_channels": [64], "layers_per_block": 1, "norm_num_groups": 32, "latent_channels": 4,
    "in_channels": 3, "out_channels": 3, "act_fn": "silu", "mid_block_add_attention": True,
    "scaling_factor": 0.18215, "shift_factor": None,
}
EPS = 1e-6


def vae_config(config: dict) -> dict:
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if cfg["act_fn"] != "silu":
        raise CheckpointError("vae config", f"act_fn={cfg['act_fn']!r} is not supported (silu only)")
    return cfg


class _VaeParts:
    def __init__(self, g: GraphBuilder, groups: int) -> None:
        self.g, self.groups = g, groups

    def resnet(self, h: str, prefix: str) -> str:
        g = self.g
        with g.unit(prefix):
            n = g.group_norm(h, f"{prefix}.norm1", self.groups, EPS, silu=True)
            n = g.conv2d(n, f"{prefix}.conv1")
            n = g.group_norm(n, f"{prefix}.norm2", self.groups, EPS, silu=True)
            short = g.conv2d(h, f"{prefix}.conv_shortcut") if g.has(f"{prefix}.conv_shortcut.weight") else h
            return g.conv2d(n, f"{prefix}.conv2", residual=short)

    def attention(self, h: str, prefix: str) -> str:
        g = self.g
        b, c, hh, ww = g.shape(h)
        with g.unit(prefix):
            n = g.group_norm(h, f"{prefix}.group_norm", self.groups, EPS)
            tok = g.op("to_tokens", [n], (b, hh * ww, c), name=f"{prefix}.to_tokens")
            o = g.attention_block(tok, tok, prefix, heads=1, scale=c ** -0.5)
            img = g.op("to_image", [o], (b, c, hh, ww), name=f"{prefix}.to_image", attrs={"height": hh, "width": ww})
            return g.add(img, h, name=f"{prefix}.residual")

    def mid(self, h: str, prefix: str, attn: bool) -> str:
        h = self.resnet(h, f"{prefix}.resnets.0")
        if attn:
            h = self.attention(h, f"{prefix}.attentions.0")
        return self.resnet(h, f"{prefix}.resnets.1")


def _count(g: GraphBuilder, pattern: str) -> int:
    n = 0
    while g.has(pattern.format(n)):
        n += 1
    return n


def build_vae_decoder(config: dict, weight_info: WeightInfo, *, batch: int, height: int, width: int,
                      where: str = "vae") -> Graph:
    """Graph for ``AutoencoderKL.decode(z).sample``: ``z`` [B, latent, h, w] → image [B, 3, 8h, 8w]."""
    cfg = vae_config(config)
    g = GraphBuilder("AutoencoderKL.decode", cfg, weight_info, where)
    latent = g.wshape("decoder.conv_in.weight")[1]
    if g.has("post_quant_conv.weight"):
        latent = g.wshape("post_quant_conv.weight")[1]
    parts = _VaeParts(g, cfg["norm_num_groups"])
    z = g.input("z", (batch, latent, height, width))
    h = z
    if g.has("post_quant_conv.weight"):
        with g.unit("post_quant_conv"):
            h = g.conv2d(h, "post_quant_conv")
    with g.unit("decoder.conv_in"):
        h = g.conv2d(h, "decoder.conv_in")
    h = parts.mid(h, "decoder.mid_block", g.has("decoder.mid_block.attentions.0.to_q.weight"))
    nup = _count(g, "decoder.up_blocks.{}.resnets.0.conv1.weight")
    if nup == 0:
        raise CheckpointError(where, "missing tensor 'decoder.up_blocks.0.resnets.0.conv1.weight'")
    for i in range(nup):
        for j in range(_count(g, f"decoder.up_blocks.{i}.resnets.{{}}.conv1.weight")):
            h = parts.resnet(h, f"decoder.up_blocks.{i}.resnets.{j}")
        if g.has(f"decoder.up_blocks.{i}.upsamplers.0.conv.weight"):
            with g.unit(f"decoder.up_blocks.{i}.upsamplers.0"):
                h = g.conv2d(h, f"decoder.up_blocks.{i}.upsamplers.0.conv", upsample=True)
    with g.unit("decoder.conv_out"):
        h = g.group_norm(h, "decoder.conv_norm_out", cfg["norm_num_groups"], EPS, silu=True)
        h = g.conv2d(h, "decoder.conv_out")
    g.output(h)
    return g.graph


def build_vae_encoder(config: dict, weight_info: WeightInfo, *, batch: int, height: int, width: int,
                      where: str = "vae") -> Graph:
    """Graph for ``AutoencoderKL.encode(x)``: image [B, 3, H, W] → moments [B, 2·latent, H/8, W/8]
    (mean and log-variance stacked on channels, as diffusers' DiagonalGaussianDistribution takes)."""
    cfg = vae_config(config)
    g = GraphBuilder("AutoencoderKL.encode", cfg, weight_info, where)
    parts = _VaeParts(g, cfg["norm_num_groups"])
    cin = g.wshape("encoder.conv_in.weight")[1]
    x = g.input("x", (batch, cin, height, width))
    with g.unit("encoder.conv_in"):
        h = g.conv2d(x, "encoder.conv_in")
    ndown = _count(g, "encoder.down_blocks.{}.resnets.0.conv1.weight")
    if ndown == 0:
        raise CheckpointError(where, "missing tensor 'encoder.down_blocks.0.resnets.0.conv1.weight'")
    for i in range(ndown):
        for j in range(_count(g, f"encoder.down_blocks.{i}.resnets.{{}}.conv1.weight")):
            h = parts.resnet(h, f"encoder.down_blocks.{i}.resnets.{j}")
        if g.has(f"encoder.down_blocks.{i}.downsamplers.0.conv.weight"):
            with g.unit(f"encoder.down_blocks.{i}.downsamplers.0"):
                # diffusers pads (0, 1, 0, 1) then convolves with stride 2 and no padding
                h = g.conv2d(h, f"encoder.down_blocks.{i}.downsamplers.0.conv", stride=2, pad=(0, 1, 0, 1))
    h = parts.mid(h, "encoder.mid_block", g.has("encoder.mid_block.attentions.0.to_q.weight"))
    with g.unit("encoder.conv_out"):
        h = g.group_norm(h, "encoder.conv_norm_out", cfg["norm_num_groups"], EPS, silu=True)
        h = g.conv2d(h, "encoder.conv_out")
    if g.has("quant_conv.weight"):
        with g.unit("quant_conv"):
            h = g.conv2d(h, "quant_conv")
    g.output(h)
    return g.graph
