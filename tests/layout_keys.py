"""Test-only generators of ORIGINAL-format key sets (names -> shapes) from an architecture config.

They follow the original code's module structure (CompVis
``ldm.modules.diffusionmodules.openaimodel`` UNet and ``model.Encoder/Decoder``; BFL
``flux.model.Flux``), not streamexec's mapping, and are validated in the tests by feeding them
through diffusers' own single-file converters and comparing with the diffusers model's
``state_dict()``. Configs are diffusers configs (``model.config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Shapes = dict[str, tuple[int, ...]]


def _per_level(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


# ---------------------------------------------------------------------------- LDM UNet


def _ldm_resblock(out: Shapes, p: str, cin: int, cout: int, temb: int) -> None:
    out[f"{p}.in_layers.0.weight"] = (cin,)
    out[f"{p}.in_layers.0.bias"] = (cin,)
    out[f"{p}.in_layers.2.weight"] = (cout, cin, 3, 3)
    out[f"{p}.in_layers.2.bias"] = (cout,)
    out[f"{p}.emb_layers.1.weight"] = (cout, temb)
    out[f"{p}.emb_layers.1.bias"] = (cout,)
    out[f"{p}.out_layers.0.weight"] = (cout,)
    out[f"{p}.out_layers.0.bias"] = (cout,)
    out[f"{p}.out_layers.3.weight"] = (cout, cout, 3, 3)
    out[f"{p}.out_layers.3.bias"] = (cout,)
    if cin != cout:
        out[f"{p}.skip_connection.weight"] = (cout, cin, 1, 1)
        out[f"{p}.skip_connection.bias"] = (cout,)


def _ldm_spatial_transformer(
    out: Shapes, p: str, c: int, ctx: int, depth: int, linear: bool
) -> None:
    proj = (c, c) if linear else (c, c, 1, 1)
    out[f"{p}.norm.weight"] = (c,)
    out[f"{p}.norm.bias"] = (c,)
    out[f"{p}.proj_in.weight"] = proj
    out[f"{p}.proj_in.bias"] = (c,)
    for d in range(depth):
        t = f"{p}.transformer_blocks.{d}"
        for attn, kv in (("attn1", c), ("attn2", ctx)):
            out[f"{t}.{attn}.to_q.weight"] = (c, c)
            out[f"{t}.{attn}.to_k.weight"] = (c, kv)
            out[f"{t}.{attn}.to_v.weight"] = (c, kv)
            out[f"{t}.{attn}.to_out.0.weight"] = (c, c)
            out[f"{t}.{attn}.to_out.0.bias"] = (c,)
        out[f"{t}.ff.net.0.proj.weight"] = (8 * c, c)  # GEGLU: 2 x 4c
        out[f"{t}.ff.net.0.proj.bias"] = (8 * c,)
        out[f"{t}.ff.net.2.weight"] = (c, 4 * c)
        out[f"{t}.ff.net.2.bias"] = (c,)
        for n in ("norm1", "norm2", "norm3"):
            out[f"{t}.{n}.weight"] = (c,)
            out[f"{t}.{n}.bias"] = (c,)
    out[f"{p}.proj_out.weight"] = proj
    out[f"{p}.proj_out.bias"] = (c,)


def ldm_unet_shapes(cfg: Mapping[str, Any]) -> Shapes:
    """openaimodel.UNetModel key names (without ``model.diffusion_model.``) for a diffusers
    UNet2DConditionModel config."""
    chans = list(cfg["block_out_channels"])
    n = len(chans)
    layers = _per_level(cfg["layers_per_block"], n)
    depth = _per_level(cfg["transformer_layers_per_block"], n)
    down_attn = ["CrossAttn" in t for t in cfg["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in reversed(cfg["up_block_types"])]  # by level, top first
    ctx, linear = cfg["cross_attention_dim"], cfg["use_linear_projection"]
    c0 = chans[0]
    temb = cfg.get("time_embedding_dim") or 4 * c0
    out: Shapes = {
        "time_embed.0.weight": (temb, c0),
        "time_embed.0.bias": (temb,),
        "time_embed.2.weight": (temb, temb),
        "time_embed.2.bias": (temb,),
        "input_blocks.0.0.weight": (c0, cfg["in_channels"], 3, 3),
        "input_blocks.0.0.bias": (c0,),
    }
    skips, ch, b = [c0], c0, 1
    for level, cout in enumerate(chans):
        for _ in range(layers[level]):
            _ldm_resblock(out, f"input_blocks.{b}.0", ch, cout, temb)
            ch = cout
            if down_attn[level]:
                _ldm_spatial_transformer(out, f"input_blocks.{b}.1", ch, ctx, depth[level], linear)
            skips.append(ch)
            b += 1
        if level != n - 1:
            out[f"input_blocks.{b}.0.op.weight"] = (ch, ch, 3, 3)
            out[f"input_blocks.{b}.0.op.bias"] = (ch,)
            skips.append(ch)
            b += 1
    if cfg.get("addition_embed_type") == "text_time":  # SGM's label_emb: linear, SiLU, linear
        adm = cfg["projection_class_embeddings_input_dim"]
        out.update({"label_emb.0.0.weight": (temb, adm), "label_emb.0.0.bias": (temb,),
                    "label_emb.0.2.weight": (temb, temb), "label_emb.0.2.bias": (temb,)})
    _ldm_resblock(out, "middle_block.0", ch, ch, temb)
    _ldm_spatial_transformer(out, "middle_block.1", ch, ctx, depth[-1], linear)
    _ldm_resblock(out, "middle_block.2", ch, ch, temb)
    b = 0
    for level in reversed(range(n)):
        cout = chans[level]
        for j in range(layers[level] + 1):
            _ldm_resblock(out, f"output_blocks.{b}.0", ch + skips.pop(), cout, temb)
            ch = cout
            if up_attn[level]:
                _ldm_spatial_transformer(out, f"output_blocks.{b}.1", ch, ctx, depth[level], linear)
            if level and j == layers[level]:
                up = 2 if up_attn[level] else 1
                out[f"output_blocks.{b}.{up}.conv.weight"] = (ch, ch, 3, 3)
                out[f"output_blocks.{b}.{up}.conv.bias"] = (ch,)
            b += 1
    out["out.0.weight"] = (c0,)
    out["out.0.bias"] = (c0,)
    out["out.2.weight"] = (cfg["out_channels"], c0, 3, 3)
    out["out.2.bias"] = (cfg["out_channels"],)
    return out


def open_clip_text_shapes(width: int, layers: int, vocab: int, positions: int, proj: int) -> Shapes:
    """open_clip ``TextTransformer`` key names (SGM's ``conditioner.embedders.1.model.*``, without
    the prefix): fused attention ``in_proj``, ``mlp.c_fc``/``c_proj``, projection stored [width, proj]."""
    out: Shapes = {"token_embedding.weight": (vocab, width), "positional_embedding": (positions, width),
                   "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, proj),
                   "logit_scale": ()}
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        out.update({f"{p}.ln_1.weight": (width,), f"{p}.ln_1.bias": (width,), f"{p}.ln_2.weight": (width,),
                    f"{p}.ln_2.bias": (width,), f"{p}.attn.in_proj_weight": (3 * width, width),
                    f"{p}.attn.in_proj_bias": (3 * width,), f"{p}.attn.out_proj.weight": (width, width),
                    f"{p}.attn.out_proj.bias": (width,), f"{p}.mlp.c_fc.weight": (4 * width, width),
                    f"{p}.mlp.c_fc.bias": (4 * width,), f"{p}.mlp.c_proj.weight": (width, 4 * width),
                    f"{p}.mlp.c_proj.bias": (width,)})
    return out


# ---------------------------------------------------------------------------- LDM VAE


def _vae_resblock(out: Shapes, p: str, cin: int, cout: int) -> None:
    out[f"{p}.norm1.weight"] = (cin,)
    out[f"{p}.norm1.bias"] = (cin,)
    out[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
    out[f"{p}.conv1.bias"] = (cout,)
    out[f"{p}.norm2.weight"] = (cout,)
    out[f"{p}.norm2.bias"] = (cout,)
    out[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
    out[f"{p}.conv2.bias"] = (cout,)
    if cin != cout:
        out[f"{p}.nin_shortcut.weight"] = (cout, cin, 1, 1)
        out[f"{p}.nin_shortcut.bias"] = (cout,)


def _vae_mid(out: Shapes, p: str, c: int, attention: bool) -> None:
    _vae_resblock(out, f"{p}.mid.block_1", c, c)
    if attention:
        out[f"{p}.mid.attn_1.norm.weight"] = (c,)
        out[f"{p}.mid.attn_1.norm.bias"] = (c,)
        for n in ("q", "k", "v", "proj_out"):
            out[f"{p}.mid.attn_1.{n}.weight"] = (c, c, 1, 1)  # LDM uses 1x1 convs
            out[f"{p}.mid.attn_1.{n}.bias"] = (c,)
    _vae_resblock(out, f"{p}.mid.block_2", c, c)


def ldm_vae_shapes(cfg: Mapping[str, Any]) -> Shapes:
    """LDM ``AutoencoderKL`` (Encoder/Decoder) key names, no prefix, for a diffusers config."""
    chans = list(cfg["block_out_channels"])
    n, nres, z = len(chans), cfg["layers_per_block"], cfg["latent_channels"]
    attention = cfg.get("mid_block_add_attention", True)
    c0, cl = chans[0], chans[-1]
    out: Shapes = {
        "encoder.conv_in.weight": (c0, cfg["in_channels"], 3, 3),
        "encoder.conv_in.bias": (c0,),
    }
    ch = c0
    for i, cout in enumerate(chans):
        for j in range(nres):
            _vae_resblock(out, f"encoder.down.{i}.block.{j}", ch, cout)
            ch = cout
        if i != n - 1:
            out[f"encoder.down.{i}.downsample.conv.weight"] = (ch, ch, 3, 3)
            out[f"encoder.down.{i}.downsample.conv.bias"] = (ch,)
    _vae_mid(out, "encoder", cl, attention)
    out["encoder.norm_out.weight"] = (cl,)
    out["encoder.norm_out.bias"] = (cl,)
    out["encoder.conv_out.weight"] = (2 * z, cl, 3, 3)
    out["encoder.conv_out.bias"] = (2 * z,)
    if cfg.get("use_quant_conv", True):
        out["quant_conv.weight"] = (2 * z, 2 * z, 1, 1)
        out["quant_conv.bias"] = (2 * z,)
    if cfg.get("use_post_quant_conv", True):
        out["post_quant_conv.weight"] = (z, z, 1, 1)
        out["post_quant_conv.bias"] = (z,)
    out["decoder.conv_in.weight"] = (cl, z, 3, 3)
    out["decoder.conv_in.bias"] = (cl,)
    _vae_mid(out, "decoder", cl, attention)
    ch = cl
    for i in reversed(range(n)):  # stored as decoder.up.i with i = resolution level, top = 0
        for j in range(nres + 1):
            _vae_resblock(out, f"decoder.up.{i}.block.{j}", ch, chans[i])
            ch = chans[i]
        if i != 0:
            out[f"decoder.up.{i}.upsample.conv.weight"] = (ch, ch, 3, 3)
            out[f"decoder.up.{i}.upsample.conv.bias"] = (ch,)
    out["decoder.norm_out.weight"] = (c0,)
    out["decoder.norm_out.bias"] = (c0,)
    out["decoder.conv_out.weight"] = (cfg["out_channels"], c0, 3, 3)
    out["decoder.conv_out.bias"] = (cfg["out_channels"],)
    return out


# ---------------------------------------------------------------------------- BFL FLUX


def bfl_flux_shapes(cfg: Mapping[str, Any]) -> Shapes:
    """BFL ``flux.model.Flux`` key names (as in flux1-dev/schnell.safetensors) for a diffusers
    FluxTransformer2DModel config."""
    head = cfg["attention_head_dim"]
    h = cfg["num_attention_heads"] * head
    mlp = int(h * 4.0)
    p = cfg["patch_size"]
    out_ch = cfg.get("out_channels") or cfg["in_channels"]
    out: Shapes = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        out[f"{name}.weight"] = (n_out, n_in)
        out[f"{name}.bias"] = (n_out,)

    linear("img_in", h, cfg["in_channels"])
    linear("txt_in", h, cfg["joint_attention_dim"])
    for emb, n_in in (("time_in", 256), ("vector_in", cfg["pooled_projection_dim"])):
        linear(f"{emb}.in_layer", h, n_in)
        linear(f"{emb}.out_layer", h, h)
    if cfg["guidance_embeds"]:
        linear("guidance_in.in_layer", h, 256)
        linear("guidance_in.out_layer", h, h)
    for i in range(cfg["num_layers"]):
        b = f"double_blocks.{i}"
        for s in ("img", "txt"):
            linear(f"{b}.{s}_mod.lin", 6 * h, h)
            linear(f"{b}.{s}_attn.qkv", 3 * h, h)
            out[f"{b}.{s}_attn.norm.query_norm.scale"] = (head,)
            out[f"{b}.{s}_attn.norm.key_norm.scale"] = (head,)
            linear(f"{b}.{s}_attn.proj", h, h)
            linear(f"{b}.{s}_mlp.0", mlp, h)
            linear(f"{b}.{s}_mlp.2", h, mlp)
    for i in range(cfg["num_single_layers"]):
        b = f"single_blocks.{i}"
        linear(f"{b}.linear1", 3 * h + mlp, h)
        linear(f"{b}.linear2", h, h + mlp)
        out[f"{b}.norm.query_norm.scale"] = (head,)
        out[f"{b}.norm.key_norm.scale"] = (head,)
        linear(f"{b}.modulation.lin", 3 * h, h)
    linear("final_layer.linear", p * p * out_ch, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return out
