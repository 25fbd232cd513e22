"""What each op needs in memory besides its inputs and output — the kernels' scratch (decoded
weight panels, im2col bands, attention score tiles, the GEGLU hidden chunk) — as a function of the
kernel parameters the planner may choose, and the menu of those parameters from fastest (the
kernels' defaults) to smallest.

The formulas are the kernels' own ``*_scratch_bytes`` functions; ops without a kernel scratch
either allocate nothing but their output or say here what else they allocate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod

from ..kernels.attention import attention_scratch_bytes, attention_tiles, rel_bias_scratch_bytes
from ..kernels.conv import conv2d_band_slab_rows, conv2d_plan, conv2d_scratch_bytes
from ..kernels.linear import (
    MLP_MIN_ROWS,
    default_panel_rows,
    geglu_scratch_bytes,
    hidden_rows,
    linear_scratch_bytes,
    linear_workers,
    panel_rows_for,
    residual_tile_bytes,
)
from ..kernels.lora import lora_scratch_bytes
from ..models.graph import Graph, Op
from ..weights.dtypes import DTYPES, F32_BYTES
from .streaming import ooc_rows

F32 = F32_BYTES  # bytes of an f32 activation or decoded weight


@dataclass(frozen=True)
class WeightMeta:
    """Stored shape, dtype tag and bytes of one weight (from the checkpoint header)."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    #: summed rank of the LoRA factors carried with this weight (0: none); merged per panel
    lora_rank: int = 0


WeightTable = dict[str, WeightMeta]


def out_bytes(graph: Graph, t: str) -> int:
    """Bytes of an activation (graph tensors are f32; integer inputs are int64: same bound x2)."""
    n = prod(graph.tensors[t])
    return n * (8 if graph.input_dtypes.get(t, "f32") != "f32" else F32)


def _halvings(start: int, floor: int) -> list[int]:
    out = [start]
    v = start
    while v // 2 >= floor:
        v //= 2
        out.append(v)
    return out


# -- per kind: parameter menus and scratch ----------------------------------------------------------
def _linear_options(graph: Graph, op: Op, w: WeightTable) -> list[dict]:
    meta = w[op.weights["weight"]]
    n, k = meta.shape[:2]
    gate = op.attrs.get("gate")
    m = prod(graph.tensors[op.inputs[0]][:-1])
    panels = [None] if meta.dtype == "F32" and not meta.lora_rank else _halvings(default_panel_rows(k, n), min(32, n))
    if gate:
        inner = n // 2 if op.attrs.get("gate") == "geglu" else n
        rows = _halvings(hidden_rows(m, inner), min(16, m))
    else:
        rows = [None]
    out = []
    for i in range(max(len(panels), len(rows))):
        p = panels[min(i, len(panels) - 1)]
        r = rows[min(i, len(rows) - 1)]
        d: dict = {}
        if p is not None and i:
            d["panel_rows"] = p
        if r is not None and i:
            d["row_chunk"] = r
        out.append(d)
    return out


def _linear_scratch(graph: Graph, op: Op, w: WeightTable, params: dict) -> int:
    meta = w[op.weights["weight"]]
    n, k = meta.shape[:2]
    m = prod(graph.tensors[op.inputs[0]][:-1])
    total = 0
    if "bias" in op.weights:
        total += F32 * w[op.weights["bias"]].shape[0]  # decoded bias
    gate = op.attrs.get("gate")
    if gate:
        n = n // 2 if gate == "geglu" else n
        total += geglu_scratch_bytes(m, k, n, meta.dtype, row_chunk=params.get("row_chunk"),
                                     panel_rows=params.get("panel_rows"))
    elif meta.dtype != "F32" or meta.lora_rank:  # a LoRA'd F32 weight is merged into panels too
        total += linear_scratch_bytes(k, panel_rows_for(k, n, params.get("panel_rows")))
    if meta.lora_rank:  # the low-rank product's temporary, per worker
        total += linear_workers() * lora_scratch_bytes(k, meta.lora_rank)
    if len(op.inputs) > 1:  # a residual from disk is accumulated in place, through small tiles
        total += residual_tile_bytes(n)
    return total


def _conv_kw(op: Op) -> dict:
    return {"stride": op.attrs.get("stride", 1), "pad": tuple(op.attrs["pad"]),
            "upsample": op.attrs.get("upsample", False)}


def _conv_options(graph: Graph, op: Op, w: WeightTable) -> list[dict]:
    meta = w[op.weights["weight"]]
    x = graph.tensors[op.inputs[0]]
    plan = conv2d_plan(x, meta.shape, meta.dtype, **_conv_kw(op))
    return [{}] + [{"band_rows": b} for b in _halvings(plan.band_rows, 1)[1:]]


def _conv_scratch(graph: Graph, op: Op, w: WeightTable, params: dict) -> int:
    meta = w[op.weights["weight"]]
    x = graph.tensors[op.inputs[0]]
    total = conv2d_scratch_bytes(x, meta.shape, meta.dtype, band_rows=params.get("band_rows"),
                                 panel_rows=params.get("panel_rows"), **_conv_kw(op))
    if "bias" in op.weights:
        total += F32 * meta.shape[0]
    if meta.lora_rank:  # LoRA'd: panels are decoded even from F32 (the kernel's own plan), + the temporary
        p = conv2d_plan(x, meta.shape, meta.dtype, band_rows=params.get("band_rows"),
                        panel_rows=params.get("panel_rows"), **_conv_kw(op))
        k = prod(meta.shape[1:])
        total += p.workers * ((F32 * p.panel_rows * (p.k if p.pointwise else p.kc) if meta.dtype == "F32" else 0)
                              + lora_scratch_bytes(k, meta.lora_rank))
    return total


def _attention_dims(graph: Graph, op: Op) -> tuple[int, int, int, int]:
    _, nq, width = graph.tensors[op.inputs[0]]
    nk = graph.tensors[op.inputs[1]][1]
    h = op.attrs["heads"]
    return nq, nk, h, width // h


def _attention_options(graph: Graph, op: Op, w: WeightTable) -> list[dict]:
    nq, nk, h, d = _attention_dims(graph, op)
    qt, kt = attention_tiles(nq, nk, d, h)  # the kernel's defaults
    out = [{}]
    for q in _halvings(qt, min(16, qt))[1:]:
        out.append({"q_tile": q, "k_tile": kt})
    for k in _halvings(kt, min(64, kt))[1:]:
        out.append({"q_tile": out[-1].get("q_tile", qt), "k_tile": k})
    return out


def _attention_scratch(graph: Graph, op: Op, w: WeightTable, params: dict) -> int:
    nq, nk, h, d = _attention_dims(graph, op)
    total = attention_scratch_bytes(h, d, *attention_tiles(nq, nk, d, h, params.get("q_tile"), params.get("k_tile")))
    if op.attrs.get("rel_bias"):
        total += rel_bias_scratch_bytes(h, nq, nk)
    return total


# FLUX / T5 fused MLPs (runtime/ops_transformer.py): the [rows, inner] hidden is the only
# intermediate; every inner linear allocates its own decoded panels (freed when it returns).
def _mlp_dims(graph: Graph, op: Op, w: WeightTable) -> tuple[int, int, int, int]:
    """(rows per batch item, input width, inner width, the width the rows step is sized by)."""
    x = graph.tensors[op.inputs[0]]
    inner = w[op.weights["up"]].shape[0]
    n = x[-2] if len(x) >= 3 else prod(x[:-1])
    width = inner if op.kind == "mlp" else inner + graph.tensors[op.inputs[1]][-1]
    return n, x[-1], inner, width


def _mlp_rows(n: int, width: int, params: dict) -> int:
    """Token rows per step: the linear kernel's feed-forward rule, as the runtime op uses it."""
    return hidden_rows(n, width, params.get("row_chunk"), min_rows=MLP_MIN_ROWS)


def _mlp_options(graph: Graph, op: Op, w: WeightTable) -> list[dict]:
    n, _, _, width = _mlp_dims(graph, op, w)
    rows = _halvings(_mlp_rows(n, width, {}), min(16, n))
    wd = w[op.weights["down"]]
    panels = [None] if wd.dtype == "F32" else _halvings(default_panel_rows(wd.shape[1], wd.shape[0]), 32)
    out = []
    for i in range(max(len(rows), len(panels))):
        d = {}
        if i:
            d["row_chunk"] = rows[min(i, len(rows) - 1)]
            p = panels[min(i, len(panels) - 1)]
            if p is not None:
                d["panel_rows"] = p
        out.append(d)
    return out


def _mlp_scratch(graph: Graph, op: Op, w: WeightTable, params: dict) -> int:
    n, dx, inner, width = _mlp_dims(graph, op, w)
    rows = _mlp_rows(n, width, params)
    total = F32 * rows * inner  # hidden
    if op.kind == "mlp" and "up_mul" in op.weights:
        total += F32 * rows * inner  # the gated product
    if op.kind == "parallel_mlp":
        total += F32 * rows * width  # concat(attn, mlp) rows
    panels = 0
    for role in ("up", "up_mul", "down"):
        if role in op.weights and w[op.weights[role]].dtype != "F32":
            nn, kk = w[op.weights[role]].shape[:2]
            panels = max(panels, linear_scratch_bytes(kk, panel_rows_for(kk, nn, params.get("panel_rows"))))
    return total + panels + sum(
        F32 * w[k].shape[0] for r, k in op.weights.items() if r.endswith("_bias"))


def _embedding_scratch(graph: Graph, op: Op, w: WeightTable, params: dict) -> int:
    meta = w[op.weights["weight"]]
    rows = prod(graph.tensors[op.inputs[0]])
    return rows * meta.shape[-1] * DTYPES[meta.dtype].itemsize  # the gathered rows before decoding


def _add_position_scratch(graph: Graph, op: Op, w: WeightTable, params: dict) -> int:
    shape = graph.tensors[op.output]
    return F32 * shape[1] * shape[-1]


def _nothing(graph: Graph, op: Op, w: WeightTable, params: dict) -> int:
    return 0


def _small_vectors(graph: Graph, op: Op, w: WeightTable, params: dict) -> int:
    return sum(F32 * prod(w[k].shape) for k in op.weights.values())


Scratch = Callable[[Graph, Op, WeightTable, dict], int]
Options = Callable[[Graph, Op, WeightTable], list[dict]]

SCRATCH: dict[str, Scratch] = {
    "linear": _linear_scratch,
    "conv2d": _conv_scratch,
    "attention": _attention_scratch,
    "embedding": _embedding_scratch,
    "add_position": _add_position_scratch,
    "group_norm": _small_vectors,
    "layer_norm": _small_vectors,
    "rms_norm": _small_vectors,
    "add": _nothing,
    "unary": _nothing,
    "concat": _nothing,
    "to_tokens": _nothing,
    "to_image": _nothing,
    "timestep_embedding": _nothing,
    "pool_eos": _nothing,
    "scale": _nothing,
    "mlp": _mlp_scratch,
    "parallel_mlp": _mlp_scratch,
    "prefix_attention": lambda g, op, w, p: _attention_scratch(g, op, w, p) + F32 * op.attrs["heads"] * (
        g.tensors[op.inputs[0]][1] + g.tensors[op.inputs[1]][1] + 16),
    "gated_add": _nothing,
    "slice": _nothing,
    "head_norm": _small_vectors,
    "rope_freqs": _nothing,
    "t5_rel_bias": _nothing,
}

OPTIONS: dict[str, Options] = {
    "linear": _linear_options,
    "conv2d": _conv_options,
    "attention": _attention_options,
    "prefix_attention": _attention_options,
    "mlp": _mlp_options,
    "parallel_mlp": _mlp_options,
}


def ooc_scratch(graph: Graph, op: Op, w: WeightTable, params: dict) -> int:
    """Bytes a banded (out-of-core) run of ``op`` allocates: its row bands of input, output and
    residual, and for conv2d the kernel scratch over one band's input slab."""
    shape = graph.tensors[op.output]
    rows = ooc_rows(shape, params, graph.tensors[op.inputs[0]] if op.kind == "conv2d" else None)
    if op.kind == "conv2d":
        meta = w[op.weights["weight"]]
        b, c, _, win = graph.tensors[op.inputs[0]]
        _, co, _, wo = shape
        k = meta.shape[2]
        up = 2 if op.attrs.get("upsample") else 1
        slab_rows = conv2d_band_slab_rows(rows, k, upsample=up == 2)
        slab = (b, c, slab_rows, win)
        y_rows = slab_rows * up + k
        total = F32 * b * c * slab_rows * win + F32 * b * co * (y_rows + 2 * rows) * wo
        if len(op.inputs) > 1:
            total += F32 * b * co * rows * wo
        pad = tuple(op.attrs["pad"])
        total += conv2d_scratch_bytes(slab, meta.shape, meta.dtype, pad=pad, upsample=bool(op.attrs.get("upsample")),
                                      band_rows=params.get("band_rows"), panel_rows=params.get("panel_rows"))
        return total + (F32 * co if "bias" in op.weights else 0)
    per_row = out_bytes(graph, op.output) // max(1, shape[2 if len(shape) == 4 else 1])
    return (2 if op.kind == "add" else 1) * rows * per_row + _small_vectors(graph, op, w, params)


def op_scratch(graph: Graph, op: Op, w: WeightTable, params: dict) -> int:
    """Bytes ``op`` allocates besides its output with these kernel parameters. Kinds without a
    formula are charged one more output's worth (a conservative guess, never zero)."""
    fn = SCRATCH.get(op.kind)
    if fn is None:
        return out_bytes(graph, op.output)
    return fn(graph, op, w, params)


def param_options(graph: Graph, op: Op, w: WeightTable) -> list[dict]:
    """Kernel parameter sets for ``op``, fastest first (``{}`` = the kernel's defaults), each
    needing no more scratch than the one before."""
    fn = OPTIONS.get(op.kind)
    return [{}] if fn is None else fn(graph, op, w)
