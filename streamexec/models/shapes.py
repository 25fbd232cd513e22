"""The weights a model config implies, by checkpoint key with shapes (the names diffusers and
transformers give them, which are the builders' names): what ``streamexec inspect`` feeds the
builders when there are no weight files, so a plan's matrices and sizes can be shown from the
published configs alone. Follows the diffusers/transformers module structure; the tests check
every key and shape against those models built on torch's meta device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import StreamexecError

Shapes = dict[str, tuple[int, ...]]


def _per_level(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _lin(out: Shapes, p: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[f"{p}.weight"] = (n_out, n_in)
    if bias:
        out[f"{p}.bias"] = (n_out,)


def _conv(out: Shapes, p: str, n_out: int, n_in: int, k: int) -> None:
    out[f"{p}.weight"] = (n_out, n_in, k, k)
    out[f"{p}.bias"] = (n_out,)


def _norm(out: Shapes, p: str, c: int, bias: bool = True) -> None:
    out[f"{p}.weight"] = (c,)
    if bias:
        out[f"{p}.bias"] = (c,)


def _resnet(out: Shapes, p: str, cin: int, cout: int, temb: int | None) -> None:
    _norm(out, f"{p}.norm1", cin)
    _conv(out, f"{p}.conv1", cout, cin, 3)
    if temb:
        _lin(out, f"{p}.time_emb_proj", cout, temb)
    _norm(out, f"{p}.norm2", cout)
    _conv(out, f"{p}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(out, f"{p}.conv_shortcut", cout, cin, 1)


def _transformer_2d(out: Shapes, p: str, c: int, ctx: int, depth: int, linear: bool) -> None:
    _norm(out, f"{p}.norm", c)
    for name in ("proj_in", "proj_out"):
        if linear:
            _lin(out, f"{p}.{name}", c, c)
        else:
            _conv(out, f"{p}.{name}", c, c, 1)
    for d in range(depth):
        t = f"{p}.transformer_blocks.{d}"
        for attn, kv in (("attn1", c), ("attn2", ctx)):
            _lin(out, f"{t}.{attn}.to_q", c, c, bias=False)
            _lin(out, f"{t}.{attn}.to_k", c, kv, bias=False)
            _lin(out, f"{t}.{attn}.to_v", c, kv, bias=False)
            _lin(out, f"{t}.{attn}.to_out.0", c, c)
        for n in ("norm1", "norm2", "norm3"):
            _norm(out, f"{t}.{n}", c)
        _lin(out, f"{t}.ff.net.0.proj", 8 * c, c)  # GEGLU: value and gate halves of 4c
        _lin(out, f"{t}.ff.net.2", c, 4 * c)


def unet_shapes(cfg: dict) -> Shapes:
    """``UNet2DConditionModel`` (SD 1.x/2.x cross-attention UNets)."""
    chans = list(cfg["block_out_channels"])
    n = len(chans)
    layers = _per_level(cfg.get("layers_per_block", 2), n)
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), n)
    down_attn = ["CrossAttn" in t for t in cfg["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]  # deepest level first
    ctx, linear = cfg.get("cross_attention_dim", 1280), bool(cfg.get("use_linear_projection", False))
    c0 = chans[0]
    temb = cfg.get("time_embedding_dim") or 4 * c0
    out: Shapes = {}
    _conv(out, "conv_in", c0, cfg.get("in_channels", 4), cfg.get("conv_in_kernel", 3))
    _lin(out, "time_embedding.linear_1", temb, c0)
    _lin(out, "time_embedding.linear_2", temb, temb)
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + size/crop conditioning
        _lin(out, "add_embedding.linear_1", temb, cfg["projection_class_embeddings_input_dim"])
        _lin(out, "add_embedding.linear_2", temb, temb)
    skips, ch = [c0], c0
    for i, cout in enumerate(chans):
        for j in range(layers[i]):
            _resnet(out, f"down_blocks.{i}.resnets.{j}", ch, cout, temb)
            ch = cout
            if down_attn[i]:
                _transformer_2d(out, f"down_blocks.{i}.attentions.{j}", ch, ctx, depth[i], linear)
            skips.append(ch)
        if i != n - 1:
            _conv(out, f"down_blocks.{i}.downsamplers.0.conv", ch, ch, 3)
            skips.append(ch)
    _resnet(out, "mid_block.resnets.0", ch, ch, temb)
    _transformer_2d(out, "mid_block.attentions.0", ch, ctx, depth[-1], linear)
    _resnet(out, "mid_block.resnets.1", ch, ch, temb)
    for u, level in enumerate(reversed(range(n))):
        cout = chans[level]
        for j in range(layers[level] + 1):
            _resnet(out, f"up_blocks.{u}.resnets.{j}", ch + skips.pop(), cout, temb)
            ch = cout
            if up_attn[u]:
                _transformer_2d(out, f"up_blocks.{u}.attentions.{j}", ch, ctx, depth[level], linear)
        if level:
            _conv(out, f"up_blocks.{u}.upsamplers.0.conv", ch, ch, 3)
    _norm(out, "conv_norm_out", c0)
    _conv(out, "conv_out", cfg.get("out_channels", 4), c0, cfg.get("conv_out_kernel", 3))
    return out


def _vae_mid(out: Shapes, p: str, c: int, attention: bool) -> None:
    _resnet(out, f"{p}.mid_block.resnets.0", c, c, None)
    if attention:
        a = f"{p}.mid_block.attentions.0"
        _norm(out, f"{a}.group_norm", c)
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            _lin(out, f"{a}.{name}", c, c)
    _resnet(out, f"{p}.mid_block.resnets.1", c, c, None)


def vae_shapes(cfg: dict) -> Shapes:
    """``AutoencoderKL`` (SD 1.x and FLUX VAEs), encoder and decoder."""
    chans = list(cfg["block_out_channels"])
    n, nres, z = len(chans), cfg.get("layers_per_block", 2), cfg.get("latent_channels", 4)
    attention = cfg.get("mid_block_add_attention", True)
    c0, cl = chans[0], chans[-1]
    out: Shapes = {}
    _conv(out, "encoder.conv_in", c0, cfg.get("in_channels", 3), 3)
    ch = c0
    for i, cout in enumerate(chans):
        for j in range(nres):
            _resnet(out, f"encoder.down_blocks.{i}.resnets.{j}", ch, cout, None)
            ch = cout
        if i != n - 1:
            _conv(out, f"encoder.down_blocks.{i}.downsamplers.0.conv", ch, ch, 3)
    _vae_mid(out, "encoder", cl, attention)
    _norm(out, "encoder.conv_norm_out", cl)
    _conv(out, "encoder.conv_out", 2 * z, cl, 3)
    if cfg.get("use_quant_conv", True):
        _conv(out, "quant_conv", 2 * z, 2 * z, 1)
    if cfg.get("use_post_quant_conv", True):
        _conv(out, "post_quant_conv", z, z, 1)
    _conv(out, "decoder.conv_in", cl, z, 3)
    _vae_mid(out, "decoder", cl, attention)
    ch = cl
    for u, level in enumerate(reversed(range(n))):
        for j in range(nres + 1):
            _resnet(out, f"decoder.up_blocks.{u}.resnets.{j}", ch, chans[level], None)
            ch = chans[level]
        if level:
            _conv(out, f"decoder.up_blocks.{u}.upsamplers.0.conv", ch, ch, 3)
    _norm(out, "decoder.conv_norm_out", c0)
    _conv(out, "decoder.conv_out", cfg.get("out_channels", 3), c0, 3)
    return out


def clip_shapes(cfg: dict) -> Shapes:
    """transformers ``CLIPTextModel`` (``text_model.`` keys)."""
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    out: Shapes = {"text_model.embeddings.token_embedding.weight": (cfg["vocab_size"], d),
                   "text_model.embeddings.position_embedding.weight": (cfg["max_position_embeddings"], d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _lin(out, f"{p}.self_attn.{name}", d, d)
        _norm(out, f"{p}.layer_norm1", d)
        _lin(out, f"{p}.mlp.fc1", inter, d)
        _lin(out, f"{p}.mlp.fc2", d, inter)
        _norm(out, f"{p}.layer_norm2", d)
    _norm(out, "text_model.final_layer_norm", d)
    if cfg.get("projection_dim") and "WithProjection" in _class(cfg):
        out["text_projection.weight"] = (cfg["projection_dim"], d)
    return out


def t5_shapes(cfg: dict) -> Shapes:
    """transformers ``T5EncoderModel`` (gated or plain feed-forward)."""
    d, ff, inner = cfg["d_model"], cfg["d_ff"], cfg["num_heads"] * cfg["d_kv"]
    out: Shapes = {"shared.weight": (cfg["vocab_size"], d), "encoder.embed_tokens.weight": (cfg["vocab_size"], d)}
    gated = str(cfg.get("feed_forward_proj", "relu")).startswith("gated")
    for i in range(cfg["num_layers"]):
        p = f"encoder.block.{i}.layer"
        for name in ("q", "k", "v"):
            _lin(out, f"{p}.0.SelfAttention.{name}", inner, d, bias=False)
        _lin(out, f"{p}.0.SelfAttention.o", d, inner, bias=False)
        if i == 0:
            out[f"{p}.0.SelfAttention.relative_attention_bias.weight"] = (
                cfg.get("relative_attention_num_buckets", 32), cfg["num_heads"])
        _norm(out, f"{p}.0.layer_norm", d, bias=False)
        for name in ("wi_0", "wi_1") if gated else ("wi",):
            _lin(out, f"{p}.1.DenseReluDense.{name}", ff, d, bias=False)
        _lin(out, f"{p}.1.DenseReluDense.wo", d, ff, bias=False)
        _norm(out, f"{p}.1.layer_norm", d, bias=False)
    _norm(out, "encoder.final_layer_norm", d, bias=False)
    return out


def flux_shapes(cfg: dict) -> Shapes:
    """diffusers ``FluxTransformer2DModel``."""
    head = cfg.get("attention_head_dim", 128)
    h = cfg.get("num_attention_heads", 24) * head
    mlp = 4 * h
    p = cfg.get("patch_size", 1)
    cin = cfg.get("in_channels", 64)
    out_ch = cfg.get("out_channels") or cin
    out: Shapes = {}
    _lin(out, "x_embedder", h, cin)
    _lin(out, "context_embedder", h, cfg.get("joint_attention_dim", 4096))
    embedders = [("timestep_embedder", 256), ("text_embedder", cfg.get("pooled_projection_dim", 768))]
    if cfg.get("guidance_embeds"):
        embedders.insert(1, ("guidance_embedder", 256))
    for emb, n_in in embedders:
        _lin(out, f"time_text_embed.{emb}.linear_1", h, n_in)
        _lin(out, f"time_text_embed.{emb}.linear_2", h, h)
    for i in range(cfg.get("num_layers", 19)):
        b = f"transformer_blocks.{i}"
        _lin(out, f"{b}.norm1.linear", 6 * h, h)
        _lin(out, f"{b}.norm1_context.linear", 6 * h, h)
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _lin(out, f"{b}.attn.{name}", h, h)
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            _norm(out, f"{b}.attn.{name}", head, bias=False)
        for ff in ("ff", "ff_context"):
            _lin(out, f"{b}.{ff}.net.0.proj", mlp, h)
            _lin(out, f"{b}.{ff}.net.2", h, mlp)
    for i in range(cfg.get("num_single_layers", 38)):
        b = f"single_transformer_blocks.{i}"
        _lin(out, f"{b}.norm.linear", 3 * h, h)
        _lin(out, f"{b}.proj_mlp", mlp, h)
        _lin(out, f"{b}.proj_out", h, h + mlp)
        for name in ("to_q", "to_k", "to_v"):
            _lin(out, f"{b}.attn.{name}", h, h)
        for name in ("norm_q", "norm_k"):
            _norm(out, f"{b}.attn.{name}", head, bias=False)
    _lin(out, "norm_out.linear", 2 * h, h)
    _lin(out, "proj_out", p * p * out_ch, h)
    return out


#: model class (diffusers ``_class_name``, transformers ``architectures[0]``) -> its shapes.
SHAPERS: dict[str, Callable[[dict], Shapes]] = {
    "UNet2DConditionModel": unet_shapes, "AutoencoderKL": vae_shapes, "CLIPTextModel": clip_shapes,
    "CLIPTextModelWithProjection": clip_shapes, "T5EncoderModel": t5_shapes, "FluxTransformer2DModel": flux_shapes,
}
#: a config that names no class: the class the component of that name usually is.
BY_COMPONENT = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                "text_encoder_2": "T5EncoderModel", "transformer": "FluxTransformer2DModel"}


def _class(cfg: dict) -> str:
    archs = cfg.get("architectures")
    return str(cfg.get("_class_name") or (archs[0] if isinstance(archs, list) and archs else ""))


def config_shapes(component: str, config: dict, where: str = "config") -> Shapes:
    """Every weight of ``component`` as its config describes it (by the config's model class, else
    the component's usual one); a config missing a field the shapes need, or holding a wrong
    type, is a one-line ``StreamexecError``."""
    cls = _class(config) or BY_COMPONENT.get(component, "")
    if cls not in SHAPERS:
        raise StreamexecError(f"{where}: no weight shapes known for model class {cls or component!r} "
                              f"(known: {', '.join(SHAPERS)})")
    try:
        shapes = SHAPERS[cls](config)
    except KeyError as e:
        raise StreamexecError(f"{where}: config has no {e.args[0]!r}, which {component} needs") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise StreamexecError(f"{where}: malformed {component} config ({type(e).__name__}: {e})") from None
    bad = next((k for k, s in shapes.items() if not all(isinstance(v, int) and v > 0 for v in s)), None)
    if bad is not None:
        raise StreamexecError(f"{where}: malformed {component} config (it gives {bad} the shape {list(shapes[bad])})")
    return shapes
