"""T5EncoderModel (transformers semantics) as an op graph: T5 v1.1 / T5-XXL (gated-GELU
feed-forward with gelu_new) and the original T5 (ReLU feed-forward), RMSNorm (T5LayerNorm), no
1/sqrt(d) attention scaling, bucketed relative position bias computed once from the first layer's
table and shared by every layer, ``final_layer_norm``; output ``last_hidden_state``.

A ComfyUI ``t5xxl_*.safetensors`` has no config: heads and buckets come from the relative bias
table, widths from the weights, the feed-forward kind from ``wi_0`` (gated-gelu) vs ``wi``
(relu), and ``relative_attention_max_distance`` / ``layer_norm_epsilon`` take the T5 defaults
(128, 1e-6)."""

from __future__ import annotations

from ..errors import CheckpointError
from .flux import linear_weights
from .graph import Graph, GraphBuilder, WeightInfo

DEFAULTS = {"relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "is_decoder": False}
#: transformers ACT2FN names -> kernel activations ("relu" is applied by the mlp op itself)
_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
         "silu": "silu", "swish": "silu", "gelu_fast": "gelu_tanh"}
_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def t5_config(config: dict, g: GraphBuilder, where: str) -> dict:
    """Config with what a config-less file lacks read from the weights, checked against them."""
    given = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
    cfg = {**DEFAULTS, **given}
    buckets, heads = g.wshape(_BIAS)
    cfg.setdefault("relative_attention_num_buckets", buckets)
    cfg.setdefault("num_heads", heads)
    if (buckets, heads) != (cfg["relative_attention_num_buckets"], cfg["num_heads"]):
        raise CheckpointError(where, f"tensor {_BIAS!r} has shape {[buckets, heads]}, config says "
                                     f"{[cfg['relative_attention_num_buckets'], cfg['num_heads']]}")
    gated_weights = g.has("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    cfg.setdefault("feed_forward_proj", "gated-gelu" if gated_weights else "relu")
    ff = str(cfg["feed_forward_proj"]).split("-")
    gated = ff[0] == "gated"
    act = "gelu_new" if cfg["feed_forward_proj"] == "gated-gelu" else ff[-1]  # as T5Config does
    if len(ff) > 2 or (len(ff) == 2 and not gated) or act not in _ACTS:
        raise CheckpointError(where, f"feed_forward_proj={cfg['feed_forward_proj']!r} is not supported")
    if gated != gated_weights:
        raise CheckpointError(where, f"feed_forward_proj={cfg['feed_forward_proj']!r} does not match the weights "
                                     f"({'wi_0/wi_1' if gated_weights else 'wi'})")
    if cfg["is_decoder"]:
        raise CheckpointError(where, "a T5 decoder is not supported (encoder only)")
    cfg["_gated"], cfg["_act"] = gated, _ACTS[act]
    return cfg


def build_t5_encoder(config: dict, weight_info: WeightInfo, *, batch: int, seq_len: int, masked: bool = False,
                     where: str = "text_encoder_2") -> Graph:
    """Graph for ``T5EncoderModel.forward(input_ids[, attention_mask]).last_hidden_state``.

    Inputs ``input_ids`` [B, N] (int64) and, with ``masked``, ``key_len`` [B] (int64): item b
    attends to its first key_len[b] tokens only — a right-padded ``attention_mask`` (the FLUX
    pipeline passes none: padding tokens take part). Output [B, N, d_model].
    """
    g = GraphBuilder("T5EncoderModel", dict(config or {}), weight_info, where)
    cfg = t5_config(config, g, where)
    g.graph.config = {k: v for k, v in cfg.items() if not k.startswith("_")}
    emb = "encoder.embed_tokens.weight"
    vocab, d_model = g.wshape(emb)
    heads = int(cfg["num_heads"])
    eps = float(cfg["layer_norm_epsilon"])
    layers = 0
    while g.has(f"encoder.block.{layers}.layer.0.SelfAttention.q.weight"):
        layers += 1
    if "num_layers" in cfg and int(cfg["num_layers"]) != layers:
        raise CheckpointError(where, f"config has num_layers={cfg['num_layers']}, the weights have {layers} blocks")
    inner = g.wshape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    if inner % heads:
        raise CheckpointError(where, f"attention width {inner} is not divisible by {heads} heads")

    def rms(x: str, prefix: str) -> str:
        return g.op("rms_norm", [x], g.shape(x), name=prefix,
                    weights={"weight": g.expect(f"{prefix}.weight", (d_model,))}, attrs={"eps": eps})

    ids = g.input("input_ids", (batch, seq_len), dtype="i64")
    key_len = g.input("key_len", (batch,), dtype="i64") if masked else None
    with g.unit("encoder.embed_tokens"):
        h = g.op("embedding", [ids], (batch, seq_len, d_model), name="encoder.embed_tokens",
                 weights={"weight": emb}, attrs={"vocab": vocab})
        bias = g.op("t5_rel_bias", [], (heads, 2 * seq_len - 1), name=_BIAS.removesuffix(".weight"),
                    weights={"weight": _BIAS}, attrs={
                        "nq": seq_len, "nk": seq_len, "bidirectional": True,
                        "num_buckets": int(cfg["relative_attention_num_buckets"]),
                        "max_distance": int(cfg["relative_attention_max_distance"])})
    for i in range(layers):
        p = f"encoder.block.{i}.layer"
        with g.unit(f"{p}.0"):
            n = rms(h, f"{p}.0.layer_norm")
            a = f"{p}.0.SelfAttention"
            q, k, v = (g.linear(n, f"{a}.{w}") for w in "qkv")
            attrs = {"heads": heads, "scale": 1.0, "rel_bias": True}
            if key_len is None:
                o = g.op("attention", [q, k, v, bias], g.shape(q), name=a, attrs={**attrs, "causal": False})
            else:
                o = g.op("prefix_attention", [q, k, v, key_len, bias], g.shape(q), name=a, attrs=attrs)
            h = g.linear(o, f"{a}.o", residual=h)
        with g.unit(f"{p}.1"):
            n = rms(h, f"{p}.1.layer_norm")
            f = f"{p}.1.DenseReluDense"
            up = linear_weights(g, f"{f}.wi_0" if cfg["_gated"] else f"{f}.wi", "up", d_model, where)
            if cfg["_gated"]:
                up |= linear_weights(g, f"{f}.wi_1", "up_mul", d_model, where)
                g.expect(f"{f}.wi_1.weight", g.wshape(f"{f}.wi_0.weight"))
            down = linear_weights(g, f"{f}.wo", "down", g.wshape(up["up"])[0], where)
            h = g.op("mlp", [n, h], g.shape(h), name=f, weights=up | down, attrs={"activation": cfg["_act"]})
    with g.unit("encoder.final_layer_norm"):
        h = rms(h, "encoder.final_layer_norm")
    g.output(h)
    return g.graph
