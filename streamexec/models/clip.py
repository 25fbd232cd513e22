"""CLIPTextModel / CLIPTextModelWithProjection (transformers semantics) as an op graph: causal
self-attention, quick_gelu or gelu MLP, final layer norm, pooled output at the EOS token —
projected by ``text_projection`` when the component has one (SDXL's OpenCLIP bigG) — and, for
SDXL, the penultimate layer's hidden state (``hidden_states[-2]``) instead of the last."""

from __future__ import annotations

from ..errors import CheckpointError
from .graph import Graph, GraphBuilder, WeightInfo

DEFAULTS = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_attention_heads": 12, "eos_token_id": 2}
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def build_clip_text(config: dict, weight_info: WeightInfo, *, batch: int, seq_len: int = 77,
                    where: str = "text_encoder", penultimate: bool = False) -> Graph:
    """Graph for ``CLIPTextModel.forward(input_ids)`` → (last_hidden_state, pooler_output).

    Input ``input_ids`` [B, N] (int64); outputs ``last_hidden_state`` [B, N, D] (``penultimate``:
    ``hidden_states[-2]``, the input of the last layer, without the final norm) and
    ``pooler_output`` [B, D] — ``text_embeds`` [B, P] when the weights include
    ``text_projection.weight`` (CLIPTextModelWithProjection). Layer count and width come from the
    weights; heads, activation and eps from the config (CLIP-L defaults when a single file carries
    no config).
    """
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    act = _ACTS.get(cfg["hidden_act"])
    if act is None:
        raise CheckpointError(where, f"hidden_act {cfg['hidden_act']!r} is not supported")
    g = GraphBuilder("CLIPTextModel", cfg, weight_info, where)
    vocab, width = g.wshape("text_model.embeddings.token_embedding.weight")
    max_pos = g.wshape("text_model.embeddings.position_embedding.weight")[0]
    if seq_len > max_pos:
        raise CheckpointError(where, f"sequence length {seq_len} exceeds the model's {max_pos} positions")
    layers = 0
    while g.has(f"text_model.encoder.layers.{layers}.self_attn.q_proj.weight"):
        layers += 1
    if layers == 0:
        raise CheckpointError(where, "missing tensor 'text_model.encoder.layers.0.self_attn.q_proj.weight'")
    heads = int(cfg["num_attention_heads"])
    eps = float(cfg["layer_norm_eps"])
    if width % heads:
        raise CheckpointError(where, f"width {width} is not divisible by {heads} heads")
    scale = (width // heads) ** -0.5

    ids = g.input("input_ids", (batch, seq_len), dtype="i64")
    with g.unit("text_model.embeddings"):
        h = g.op("embedding", [ids], (batch, seq_len, width), name="text_model.embeddings.token_embedding",
                 weights={"weight": "text_model.embeddings.token_embedding.weight"}, attrs={"vocab": vocab})
        h = g.op("add_position", [h], (batch, seq_len, width), name="text_model.embeddings.position_embedding",
                 weights={"weight": g.expect("text_model.embeddings.position_embedding.weight", (max_pos, width))})
    hidden = h
    for i in range(layers):
        if i == layers - 1 and penultimate:
            hidden = h
        p = f"text_model.encoder.layers.{i}"
        with g.unit(f"{p}.self_attn"):
            n = g.layer_norm(h, f"{p}.layer_norm1", eps)
            h = g.attention_block(n, n, f"{p}.self_attn", heads=heads, scale=scale, causal=True, residual=h,
                                  names=("q_proj", "k_proj", "v_proj", "out_proj"))
        with g.unit(f"{p}.mlp"):
            n = g.layer_norm(h, f"{p}.layer_norm2", eps)
            n = g.linear(n, f"{p}.mlp.fc1", activation=act)
            h = g.linear(n, f"{p}.mlp.fc2", residual=h)
    with g.unit("text_model.final_layer_norm"):
        h = g.layer_norm(h, "text_model.final_layer_norm", eps)
        pooled = g.op("pool_eos", [h, ids], (batch, width), name="text_model.pooler",
                      attrs={"eos_token_id": int(cfg["eos_token_id"])})
    if g.has("text_projection.weight"):
        with g.unit("text_projection"):
            pooled = g.linear(pooled, "text_projection", bias=False)
    elif g.has("text_projection.weight.T"):  # OpenCLIP's single-file orientation, [width, proj]
        proj = g.wshape("text_projection.weight.T")[1]
        with g.unit("text_projection"):
            pooled = g.op("linear", [pooled], (batch, proj), name="text_projection",
                          weights={"weight": g.expect("text_projection.weight.T", (width, proj))},
                          attrs={"transposed": True})
    g.output(h if not penultimate else hidden, pooled)
    return g.graph
