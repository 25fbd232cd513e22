"""FluxTransformer2DModel (diffusers semantics) as an op graph: FLUX.1 schnell/dev of any
depth/width — timestep (+ guidance) + pooled-text conditioning, 3-axis RoPE, double-stream
(MMDiT) blocks with joint attention over [text; image] tokens, single-stream blocks with parallel
attention + MLP, AdaLN-continuous output norm.

Layout of the graph: the conditioning vector ``temb`` and its SiLU (the input of every AdaLN
projection) are computed once; the RoPE tables are one tensor ([2, Ntxt + Nimg, head_dim / 2],
cos and sin); the single-stream blocks run on one joint [text; image] stream (diffusers concatenates
and splits it around every block — the same numbers, without the copies). One streaming unit per
block; inside it one op per weight, except the MLPs, whose hidden [tokens, 4·width] activation
exists one row chunk at a time (``mlp`` / ``parallel_mlp``)."""

from __future__ import annotations

from ..errors import CheckpointError
from .graph import Graph, GraphBuilder, WeightInfo

DEFAULTS = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
EPS = 1e-6  # every LayerNorm and q/k RMSNorm of FluxTransformer2DModel
ROPE_THETA = 10000.0
TIME_DIM = 256  # Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)


def _count(g: GraphBuilder, pattern: str) -> int:
    n = 0
    while g.has(pattern.format(n)):
        n += 1
    return n


def flux_config(config: dict, g: GraphBuilder, where: str) -> dict:
    """The config, checked against the weights; what a single file lacks (no config.json) is read
    from the weights: head size (q/k-norm length) and count, depths, guidance embedder, input sizes."""
    given = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
    cfg = {**DEFAULTS, **given}
    width, cin = g.wshape("x_embedder.weight")
    if "attention_head_dim" not in given:  # the q/k RMSNorm weight is one head long
        q_norm = "transformer_blocks.0.attn.norm_q.weight"
        if not g.has(q_norm):
            q_norm = f"single_{q_norm}"
        head = g.wshape(q_norm)[0]
        cfg["attention_head_dim"] = head
        cfg["num_attention_heads"] = width // max(head, 1)
    if "num_layers" not in given:
        cfg["num_layers"] = _count(g, "transformer_blocks.{}.attn.to_q.weight")
    if "num_single_layers" not in given:
        cfg["num_single_layers"] = _count(g, "single_transformer_blocks.{}.attn.to_q.weight")
    if "guidance_embeds" not in given:
        cfg["guidance_embeds"] = g.has("time_text_embed.guidance_embedder.linear_1.weight")
    if "in_channels" not in given:
        cfg["in_channels"] = cin
    if "joint_attention_dim" not in given:
        cfg["joint_attention_dim"] = g.wshape("context_embedder.weight")[1]
    if "pooled_projection_dim" not in given:
        cfg["pooled_projection_dim"] = g.wshape("time_text_embed.text_embedder.linear_1.weight")[1]
    heads, head = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    if heads * head != width:
        raise CheckpointError(where, f"x_embedder width {width} != {heads} heads x {head}")
    if cin != cfg["in_channels"]:
        raise CheckpointError(where, f"x_embedder takes {cin} channels, config says in_channels={cfg['in_channels']}")
    axes = [int(a) for a in cfg["axes_dims_rope"]]
    if sum(axes) != head or any(a % 2 for a in axes):
        how = "from the config" if "axes_dims_rope" in given else "(FLUX.1's; no config.json gives others)"
        raise CheckpointError(where, f"axes_dims_rope {axes} {how} must be even and sum to the head size {head}")
    cfg["axes_dims_rope"] = axes
    return cfg


class _Flux:
    """Emits the blocks; holds the builder and the per-model constants."""

    def __init__(self, g: GraphBuilder, width: int, heads: int, head: int, where: str) -> None:
        self.g, self.width, self.heads, self.head, self.where = g, width, heads, head, where

    def chunks(self, mod: str, n: int, prefix: str) -> list[str]:
        """The n [B, width] pieces of an AdaLN projection ``emb.chunk(n, dim=1)``."""
        b = self.g.shape(mod)[0]
        w = self.width
        return [self.g.op("slice", [mod], (b, w), name=f"{prefix}.chunk{i}",
                          attrs={"axis": 1, "start": i * w, "stop": (i + 1) * w}) for i in range(n)]

    def modulation(self, temb_act: str, prefix: str, n: int) -> list[str]:
        mod = self.g.linear(temb_act, prefix)
        if self.g.shape(mod)[-1] != n * self.width:
            raise CheckpointError(self.where, f"tensor '{prefix}.weight' should have {n} x {self.width} rows")
        return self.chunks(mod, n, prefix)

    def ada_norm(self, x: str, shift: str, scale: str, name: str) -> str:
        """LayerNorm (no affine, eps 1e-6) then ``* (1 + scale) + shift`` per batch item."""
        return self.g.layer_norm(x, None, EPS, shift=shift, scale=scale, name=name)

    def qk(self, x: str, proj: str, norm: str, rope: str, offset: int) -> str:
        """Projection, per-head RMSNorm and RoPE (rows ``offset``.. of the joint tables)."""
        g = self.g
        y = g.linear(x, proj)
        return g.op("head_norm", [y, rope], g.shape(y), name=norm,
                    weights={"weight": g.expect(f"{norm}.weight", (self.head,))},
                    attrs={"heads": self.heads, "eps": EPS, "rope_offset": offset})

    def mlp(self, x: str, up: str, down: str, residual: str, gate: str, name: str) -> str:
        """residual + gate * down(gelu_tanh(up(x))), row-chunked."""
        g = self.g
        weights = linear_weights(g, up, "up", self.width, self.where)
        weights |= linear_weights(g, down, "down", None, self.where)
        if g.wshape(f"{down}.weight")[1] != g.wshape(f"{up}.weight")[0]:
            raise CheckpointError(self.where, f"tensors '{up}.weight' and '{down}.weight' do not chain")
        return g.op("mlp", [x, residual, gate], g.shape(residual), name=name, weights=weights,
                    attrs={"activation": "gelu_tanh"})

    def double_block(self, p: str, img: str, txt: str, temb_act: str, rope: str) -> tuple[str, str]:
        g = self.g
        nt = g.shape(txt)[1]
        scale = self.head ** -0.5
        sh, sc, gate, sh2, sc2, gate2 = self.modulation(temb_act, f"{p}.norm1.linear", 6)
        csh, csc, cgate, csh2, csc2, cgate2 = self.modulation(temb_act, f"{p}.norm1_context.linear", 6)
        ni = self.ada_norm(img, sh, sc, f"{p}.norm1.norm")
        nt_ = self.ada_norm(txt, csh, csc, f"{p}.norm1_context.norm")
        # q, then k, then v: [txt; img] joined one at a time so only one set of pieces is alive
        joined = []
        for proj, cproj, norm, cnorm in (
            ("to_q", "add_q_proj", "norm_q", "norm_added_q"),
            ("to_k", "add_k_proj", "norm_k", "norm_added_k"),
            ("to_v", "add_v_proj", None, None),
        ):
            if norm is None:
                pt, pi = g.linear(nt_, f"{p}.attn.{cproj}"), g.linear(ni, f"{p}.attn.{proj}")
            else:
                pt = self.qk(nt_, f"{p}.attn.{cproj}", f"{p}.attn.{cnorm}", rope, 0)
                pi = self.qk(ni, f"{p}.attn.{proj}", f"{p}.attn.{norm}", rope, nt)
            b, _, w = g.shape(pi)
            joined.append(g.op("concat", [pt, pi], (b, nt + g.shape(pi)[1], w), name=f"{p}.attn.{proj}.join",
                               attrs={"axis": 1}))
        a = g.op("attention", joined, g.shape(joined[0]), name=f"{p}.attn",
                 attrs={"heads": self.heads, "scale": scale, "causal": False})
        b, n, w = g.shape(a)
        at = g.op("slice", [a], (b, nt, w), name=f"{p}.attn.txt", attrs={"axis": 1, "start": 0, "stop": nt})
        ai = g.op("slice", [a], (b, n - nt, w), name=f"{p}.attn.img", attrs={"axis": 1, "start": nt, "stop": n})
        oi = g.linear(ai, f"{p}.attn.to_out.0")
        ot = g.linear(at, f"{p}.attn.to_add_out")
        img = g.op("gated_add", [img, oi, gate], g.shape(img), name=f"{p}.attn.img_residual")
        txt = g.op("gated_add", [txt, ot, cgate], g.shape(txt), name=f"{p}.attn.txt_residual")
        ni = self.ada_norm(img, sh2, sc2, f"{p}.norm2")
        img = self.mlp(ni, f"{p}.ff.net.0.proj", f"{p}.ff.net.2", img, gate2, f"{p}.ff")
        nt_ = self.ada_norm(txt, csh2, csc2, f"{p}.norm2_context")
        txt = self.mlp(nt_, f"{p}.ff_context.net.0.proj", f"{p}.ff_context.net.2", txt, cgate2, f"{p}.ff_context")
        return img, txt

    def single_block(self, p: str, x: str, temb_act: str, rope: str) -> str:
        g = self.g
        sh, sc, gate = self.modulation(temb_act, f"{p}.norm.linear", 3)
        nx = self.ada_norm(x, sh, sc, f"{p}.norm.norm")
        q = self.qk(nx, f"{p}.attn.to_q", f"{p}.attn.norm_q", rope, 0)
        k = self.qk(nx, f"{p}.attn.to_k", f"{p}.attn.norm_k", rope, 0)
        v = g.linear(nx, f"{p}.attn.to_v")
        a = g.op("attention", [q, k, v], g.shape(q), name=f"{p}.attn",
                 attrs={"heads": self.heads, "scale": self.head ** -0.5, "causal": False})
        mlp_w = g.wshape(f"{p}.proj_mlp.weight")[0]
        weights = linear_weights(g, f"{p}.proj_mlp", "up", self.width, self.where)
        weights |= linear_weights(g, f"{p}.proj_out", "down", self.width + mlp_w, self.where)
        return g.op("parallel_mlp", [nx, a, x, gate], g.shape(x), name=f"{p}.proj_out", weights=weights,
                    attrs={"activation": "gelu_tanh"})


def linear_weights(g: GraphBuilder, prefix: str, role: str, k: int | None, where: str) -> dict[str, str]:
    """{role: weight key, role_bias: bias key} of a 2-D linear weight (input size ``k`` if given)."""
    ws = g.wshape(f"{prefix}.weight")
    if len(ws) != 2 or (k is not None and ws[1] != k):
        raise CheckpointError(where, f"tensor '{prefix}.weight' has shape {list(ws)}, expected [*, {k}]")
    out = {role: f"{prefix}.weight"}
    if g.has(f"{prefix}.bias"):
        out[f"{role}_bias"] = g.expect(f"{prefix}.bias", (ws[0],))
    return out


def build_flux_transformer(config: dict, weight_info: WeightInfo, *, batch: int, img_tokens: int, txt_tokens: int,
                           where: str = "transformer") -> Graph:
    """Graph for ``FluxTransformer2DModel.forward(...).sample``.

    Inputs: ``hidden_states`` [B, img_tokens, in_channels] (packed latents), ``encoder_hidden_states``
    [B, txt_tokens, joint_attention_dim], ``pooled_projections`` [B, pooled_dim], ``timestep`` [B]
    (t in [0, 1]; ×1000 inside, as diffusers), ``guidance`` [B] (dev only, ×1000 likewise),
    ``txt_ids`` [txt_tokens, 3], ``img_ids`` [img_tokens, 3]. Output [B, img_tokens, p²·out_channels].
    """
    g = GraphBuilder("FluxTransformer2DModel", dict(config or {}), weight_info, where)
    cfg = flux_config(config, g, where)
    g.graph.config = cfg
    heads, head = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    width = heads * head
    f = _Flux(g, width, heads, head, where)

    x = g.input("hidden_states", (batch, img_tokens, cfg["in_channels"]))
    ctx = g.input("encoder_hidden_states", (batch, txt_tokens, cfg["joint_attention_dim"]))
    pooled = g.input("pooled_projections", (batch, cfg["pooled_projection_dim"]))
    t = g.input("timestep", (batch,))
    guidance = g.input("guidance", (batch,)) if cfg["guidance_embeds"] else None
    txt_ids = g.input("txt_ids", (txt_tokens, len(cfg["axes_dims_rope"])))
    img_ids = g.input("img_ids", (img_tokens, len(cfg["axes_dims_rope"])))

    with g.unit("time_text_embed"):
        def embed(v: str, which: str, residual: str | None) -> str:
            p = f"time_text_embed.{which}"
            v = g.op("scale", [v], (batch,), name=f"{p}.x1000", attrs={"factor": 1000.0})
            v = g.op("timestep_embedding", [v], (batch, TIME_DIM), name=f"{p}.time_proj",
                     attrs={"dim": TIME_DIM, "flip_sin_to_cos": True, "shift": 0, "scale": 1.0})
            v = g.linear(v, f"{p}.linear_1", activation="silu")
            return g.linear(v, f"{p}.linear_2", residual=residual)

        temb = embed(t, "timestep_embedder", None)
        if guidance is not None:
            temb = embed(guidance, "guidance_embedder", temb)
        pe = g.linear(pooled, "time_text_embed.text_embedder.linear_1", activation="silu")
        temb = g.linear(pe, "time_text_embed.text_embedder.linear_2", residual=temb)
        temb_act = g.unary(temb, "silu", name="time_text_embed.silu")  # input of every AdaLN projection
    with g.unit("embedders"):
        img = g.linear(x, "x_embedder")
        txt = g.linear(ctx, "context_embedder")
        rope = g.op("rope_freqs", [txt_ids, img_ids], (2, txt_tokens + img_tokens, head // 2), name="pos_embed",
                    attrs={"axes_dim": list(cfg["axes_dims_rope"]), "theta": ROPE_THETA})

    for i in range(int(cfg["num_layers"])):
        p = f"transformer_blocks.{i}"
        with g.unit(p):
            img, txt = f.double_block(p, img, txt, temb_act, rope)
    nsingle = int(cfg["num_single_layers"])
    if nsingle:
        with g.unit("single_transformer_blocks.0"):
            h = g.op("concat", [txt, img], (batch, txt_tokens + img_tokens, width), name="single.join",
                     attrs={"axis": 1})
        for i in range(nsingle):
            p = f"single_transformer_blocks.{i}"
            with g.unit(p):
                h = f.single_block(p, h, temb_act, rope)
        with g.unit("norm_out"):
            img = g.op("slice", [h], (batch, img_tokens, width), name="single.img",
                       attrs={"axis": 1, "start": txt_tokens, "stop": txt_tokens + img_tokens})
    with g.unit("norm_out"):
        scale, shift = f.modulation(temb_act, "norm_out.linear", 2)  # AdaLayerNormContinuous: scale first
        h = f.ada_norm(img, shift, scale, "norm_out.norm")
        out = g.linear(h, "proj_out")
    g.output(out)
    return g.graph
