"""UNet2DConditionModel (diffusers semantics) as an op graph: SD 1.x/2.x/SDXL-style configs of any
width/depth — CrossAttnDown/Down/Up/CrossAttnUp blocks, transformer layers and heads per level,
linear or conv projections, GEGLU feed-forward, skip connections, and SDXL's ``text_time`` added
conditioning (pooled text embeds + sinusoidal embeddings of the six size/crop time ids).
``upcast_attention`` (SD 2.1) changes nothing here: attention already runs in float32."""

from __future__ import annotations

from ..errors import CheckpointError
from .graph import Graph, GraphBuilder, WeightInfo

DEFAULTS = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "use_linear_projection": False,
    "transformer_layers_per_block": 1,
    "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "addition_time_embed_dim": 256,
}
_UNSUPPORTED = {
    "class_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "num_class_embeds": None, "cross_attention_norm": None,
    "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
    "only_cross_attention": False, "dual_cross_attention": False, "center_input_sample": False,
}


def _per_block(value: object, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_config(config: dict) -> dict:
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, default in _UNSUPPORTED.items():
        val = cfg.get(key, default)
        if isinstance(default, bool) and isinstance(val, (list, tuple)):
            val = any(val)
        if val != default and not (val is None and default is None):
            raise CheckpointError("unet config", f"{key}={val!r} is not supported yet")
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        raise CheckpointError("unet config", f"addition_embed_type={cfg['addition_embed_type']!r} is not supported "
                              "(text_time only)")
    if cfg["act_fn"] != "silu":
        raise CheckpointError("unet config", f"act_fn={cfg['act_fn']!r} is not supported (silu only)")
    return cfg


def build_unet(config: dict, weight_info: WeightInfo, *, batch: int, height: int, width: int,
               seq_len: int = 77, where: str = "unet") -> Graph:
    """Graph for ``UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states)``.

    ``height``/``width`` are latent sizes (pixels / 8). Inputs: ``sample`` [B, C, h, w],
    ``timestep`` [B], ``encoder_hidden_states`` [B, seq_len, cross_dim], and with ``text_time``
    (SDXL) ``text_embeds`` [B, P] and ``time_ids`` [B, T] (``added_cond_kwargs``); output ``sample``.
    """
    cfg = unet_config(config)
    g = GraphBuilder("UNet2DConditionModel", cfg, weight_info, where)
    chans = list(cfg["block_out_channels"])
    nblocks = len(chans)
    lpb = _per_block(cfg["layers_per_block"], nblocks)
    heads_cfg = cfg["num_attention_heads"] or cfg["attention_head_dim"]
    heads = _per_block(heads_cfg, nblocks)
    tlayers = _per_block(cfg["transformer_layers_per_block"], nblocks)
    groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
    cross = cfg["cross_attention_dim"]
    linear_proj = cfg["use_linear_projection"]

    x = g.input("sample", (batch, cfg["in_channels"], height, width))
    t = g.input("timestep", (batch,))
    ctx = g.input("encoder_hidden_states", (batch, seq_len, cross))

    # time embedding
    with g.unit("time_embedding"):
        temb = g.op("timestep_embedding", [t], (batch, chans[0]), name="time_proj", attrs={
            "dim": chans[0], "flip_sin_to_cos": cfg["flip_sin_to_cos"], "shift": cfg["freq_shift"], "scale": 1.0,
        })
        emb = g.linear(temb, "time_embedding.linear_1", activation="silu")
        emb = g.linear(emb, "time_embedding.linear_2")
        if cfg.get("addition_embed_type") == "text_time":
            emb = text_time_embedding(g, cfg, emb, batch, where)
        emb_act = g.unary(emb, "silu", name="time_embedding.act_out")

    def resnet(h: str, prefix: str, out_ch: int) -> str:
        with g.unit(prefix):
            n = g.group_norm(h, f"{prefix}.norm1", groups, eps, silu=True)
            n = g.conv2d(n, f"{prefix}.conv1")
            tproj = g.linear(emb_act, f"{prefix}.time_emb_proj")
            n = g.add(n, tproj, name=f"{prefix}.add_temb", broadcast="nchw")
            n = g.group_norm(n, f"{prefix}.norm2", groups, eps, silu=True)
            short = h
            if g.has(f"{prefix}.conv_shortcut.weight"):
                short = g.conv2d(h, f"{prefix}.conv_shortcut")
            elif g.shape(h)[1] != out_ch:
                raise CheckpointError(where, f"missing tensor '{prefix}.conv_shortcut.weight'")
            return g.conv2d(n, f"{prefix}.conv2", residual=short)

    def transformer(h: str, prefix: str, nheads: int, nlayers: int) -> str:
        b, c, hh, ww = g.shape(h)
        with g.unit(f"{prefix}.proj_in"):
            n = g.group_norm(h, f"{prefix}.norm", groups, 1e-6)
            if linear_proj:
                tok = g.op("to_tokens", [n], (b, hh * ww, c), name=f"{prefix}.to_tokens")
                tok = g.linear(tok, f"{prefix}.proj_in")
            else:
                n = g.conv2d(n, f"{prefix}.proj_in")
                tok = g.op("to_tokens", [n], (b, hh * ww, g.shape(n)[1]), name=f"{prefix}.to_tokens")
        inner = g.shape(tok)[-1]
        if inner % nheads:
            raise CheckpointError(where, f"{prefix}: width {inner} is not divisible by {nheads} heads")
        scale = (inner // nheads) ** -0.5
        for li in range(nlayers):
            bp = f"{prefix}.transformer_blocks.{li}"
            with g.unit(f"{bp}.attn1"):
                n = g.layer_norm(tok, f"{bp}.norm1", 1e-5)
                tok = g.attention_block(n, n, f"{bp}.attn1", heads=nheads, scale=scale, residual=tok)
            with g.unit(f"{bp}.attn2"):
                n = g.layer_norm(tok, f"{bp}.norm2", 1e-5)
                tok = g.attention_block(n, ctx, f"{bp}.attn2", heads=nheads, scale=scale, residual=tok)
            with g.unit(f"{bp}.ff"):
                n = g.layer_norm(tok, f"{bp}.norm3", 1e-5)
                proj = f"{bp}.ff.net.0.proj"
                two_i = g.wshape(f"{proj}.weight")[0]
                hid = g.op("linear", [n], g.shape(n)[:-1] + (two_i // 2,), name=proj,
                           weights={"weight": g.expect(f"{proj}.weight", (two_i, inner)),
                                    "bias": g.expect(f"{proj}.bias", (two_i,))},
                           attrs={"gate": "geglu"})
                tok = g.linear(hid, f"{bp}.ff.net.2", residual=tok)
        with g.unit(f"{prefix}.proj_out"):
            if linear_proj:
                tok = g.linear(tok, f"{prefix}.proj_out")
                img = g.op("to_image", [tok], (b, g.shape(tok)[-1], hh, ww), name=f"{prefix}.to_image",
                           attrs={"height": hh, "width": ww})
                return g.add(img, h, name=f"{prefix}.residual")
            img = g.op("to_image", [tok], (b, inner, hh, ww), name=f"{prefix}.to_image",
                       attrs={"height": hh, "width": ww})
            return g.conv2d(img, f"{prefix}.proj_out", residual=h)

    with g.unit("conv_in"):
        h = g.conv2d(x, "conv_in")
    skips = [h]
    for i, btype in enumerate(cfg["down_block_types"]):
        has_attn = btype == "CrossAttnDownBlock2D"
        if btype not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise CheckpointError(where, f"down block type {btype!r} is not supported")
        for j in range(lpb[i]):
            h = resnet(h, f"down_blocks.{i}.resnets.{j}", chans[i])
            if has_attn:
                h = transformer(h, f"down_blocks.{i}.attentions.{j}", heads[i], tlayers[i])
            skips.append(h)
        if i < nblocks - 1:
            with g.unit(f"down_blocks.{i}.downsamplers.0"):
                p = cfg["downsample_padding"]
                h = g.conv2d(h, f"down_blocks.{i}.downsamplers.0.conv", stride=2, pad=(p, p, p, p))
            skips.append(h)

    if cfg["mid_block_type"] != "UNetMidBlock2DCrossAttn":
        raise CheckpointError(where, f"mid block type {cfg['mid_block_type']!r} is not supported")
    h = resnet(h, "mid_block.resnets.0", chans[-1])
    h = transformer(h, "mid_block.attentions.0", heads[-1], tlayers[-1])
    h = resnet(h, "mid_block.resnets.1", chans[-1])

    rev_chans = list(reversed(chans))
    rev_heads = list(reversed(heads))
    rev_lpb = list(reversed(lpb))
    rev_tl = list(reversed(tlayers))
    for i, btype in enumerate(cfg["up_block_types"]):
        has_attn = btype == "CrossAttnUpBlock2D"
        if btype not in ("CrossAttnUpBlock2D", "UpBlock2D"):
            raise CheckpointError(where, f"up block type {btype!r} is not supported")
        for j in range(rev_lpb[i] + 1):
            skip = skips.pop()
            cat = g.op("concat", [h, skip], (batch, g.shape(h)[1] + g.shape(skip)[1]) + g.shape(h)[2:],
                       name=f"up_blocks.{i}.concat.{j}", attrs={"axis": 1})
            h = resnet(cat, f"up_blocks.{i}.resnets.{j}", rev_chans[i])
            if has_attn:
                h = transformer(h, f"up_blocks.{i}.attentions.{j}", rev_heads[i], rev_tl[i])
        if i < nblocks - 1:
            with g.unit(f"up_blocks.{i}.upsamplers.0"):
                h = g.conv2d(h, f"up_blocks.{i}.upsamplers.0.conv", upsample=True)

    with g.unit("conv_out"):
        h = g.group_norm(h, "conv_norm_out", groups, eps, silu=True)
        h = g.conv2d(h, "conv_out")
    g.output(h)
    return g.graph


#: SDXL base's time ids: original height/width, crop top/left, target height/width.
TIME_IDS = 6


def text_time_embedding(g: GraphBuilder, cfg: dict, emb: str, batch: int, where: str) -> str:
    """``emb + add_embedding(cat(text_embeds, add_time_proj(time_ids).reshape(B, -1)))``: SDXL's added
    conditioning. The pooled width (1280) follows from the weights: ``add_embedding.linear_1`` takes
    ``P + 6 * addition_time_embed_dim`` features (the refiner's 5 time ids are not supported)."""
    tdim = int(cfg["addition_time_embed_dim"])
    fan_in = g.wshape("add_embedding.linear_1.weight")[1]
    pooled = fan_in - TIME_IDS * tdim
    if pooled <= 0:
        raise CheckpointError(where, f"add_embedding.linear_1 takes {fan_in} features, too few for "
                                     f"{TIME_IDS} time ids of {tdim}")
    text = g.input("text_embeds", (batch, pooled))
    ids = g.input("time_ids", (batch, TIME_IDS))
    tproj = g.op("timestep_embedding", [ids], (batch, TIME_IDS * tdim), name="add_time_proj", attrs={
        "dim": tdim, "flip_sin_to_cos": cfg["flip_sin_to_cos"], "shift": cfg["freq_shift"], "scale": 1.0,
    })
    cat = g.op("concat", [text, tproj], (batch, fan_in), name="add_embedding.concat", attrs={"axis": 1})
    aug = g.linear(cat, "add_embedding.linear_1", activation="silu")
    aug = g.linear(aug, "add_embedding.linear_2")
    return g.add(emb, aug, name="add_embedding.add")
