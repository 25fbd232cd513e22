"""Per-op cost model: GEMM sizes (M×N×K), FLOPs, weight bytes and activation bytes.

Pure arithmetic on shapes; what ``streamexec inspect`` shows as "how big are the real matrices".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

from ..models.graph import Graph, Op
from ..weights.dtypes import F32_BYTES

F32 = F32_BYTES  # bytes of an f32 activation or decoded weight


@dataclass
class OpCost:
    """What one op costs. ``gemms`` lists (M, N, K, count) of the matrix products it performs."""

    flops: int = 0
    gemms: list[tuple[int, int, int, int]] = field(default_factory=list)
    weight_bytes: int = 0
    out_bytes: int = 0
    in_bytes: int = 0


def op_cost(graph: Graph, op: Op, weight_nbytes: dict[str, int], weight_shape: dict[str, tuple]) -> OpCost:
    """Cost of ``op`` given the stored sizes and shapes of the weights it names."""
    out_shape = graph.tensors[op.output]
    c = OpCost(
        weight_bytes=sum(weight_nbytes[k] for k in op.weights.values()),
        out_bytes=prod(out_shape) * F32,
        in_bytes=sum(prod(graph.tensors[t]) * F32 for t in op.inputs),
    )
    k = op.kind
    if k == "linear":
        x = graph.tensors[op.inputs[0]]
        n, kk = weight_shape[op.weights["weight"]][:2]
        m = prod(x[:-1])
        c.gemms.append((m, n, kk, 1))
        c.flops = 2 * m * n * kk
    elif k == "conv2d":
        co, ci, kh, kw = weight_shape[op.weights["weight"]]
        b, _, ho, wo = out_shape
        m, kk = b * ho * wo, ci * kh * kw
        c.gemms.append((m, co, kk, 1))
        c.flops = 2 * m * co * kk
    elif k in ("mlp", "parallel_mlp"):
        x = graph.tensors[op.inputs[0]]
        m = prod(x[:-1])
        for role in ("up", "up_mul", "down"):
            if role in op.weights:
                n, kk = weight_shape[op.weights[role]][:2]
                c.gemms.append((m, n, kk, 1))
                c.flops += 2 * m * n * kk
    elif k in ("attention", "prefix_attention"):
        b, nq, width = graph.tensors[op.inputs[0]]
        nk = graph.tensors[op.inputs[1]][1]
        h = op.attrs["heads"]
        d = width // h
        c.gemms.append((nq, nk, d, b * h))  # scores  q @ k.T per head
        c.gemms.append((nq, d, nk, b * h))  # output  p @ v per head
        c.flops = 4 * b * h * nq * nk * d
    else:
        # memory-bound ops: count a few flops per output element for the table's sake
        c.flops = 4 * prod(out_shape)
    return c


# -- predicted time ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rates:
    """The planner's time model in one table: what the kernels reach on this project's reference
    machine (2-core Cascade Lake, AVX-512; measured in BENCHMARKS.md: ``bench_kernels`` rows and
    the per-kind profiles). Only ratios matter for choosing between schedules; the absolute
    numbers make ``inspect``'s seconds a rough forecast.

    A GEMM-shaped kernel runs at ``gemm`` FLOP/s scaled by ``rows / (rows + half_rows)`` for the
    rows it multiplies per call (a conv band's columns, a row chunk, a query tile) and by
    ``cols / (cols + half_cols)`` for its output columns per call (a weight panel, a key tile);
    every call also pays ``call`` seconds (packing, dispatch, Python between bands)."""

    gemm: float = 190e9  # FLOP/s: linear / mlp / conv GEMMs on large tiles, both workers
    attention: float = 140e9  # FLOP/s: tiled attention on its default tiles
    winograd: float = 1.6  # effective speed-up of a Winograd 3x3 conv over the direct one
    half_rows: float = 48.0
    half_cols: float = 32.0
    call: float = 40e-6  # seconds per kernel call (band, panel, tile row)
    op: float = 60e-6  # seconds per op (dispatch, allocation, liveness)
    elementwise: float = 12e9  # bytes/s read + written by memory-bound ops (norms, adds, copies)
    weight_map: float = 2.5e9  # bytes/s: weights faulted in from the page cache, nothing overlapped
    spill_write: float = 1.2e9  # bytes/s written to the scratch folder
    spill_read: float = 2.0e9  # bytes/s read back from it (page cache, usually)


RATES = Rates()


def _eff(n: float, half: float) -> float:
    return n / (n + half) if n > 0 else 1.0


def op_seconds(graph: Graph, op: Op, cost: OpCost, params: dict, weight_shape: dict[str, tuple],
               weight_dtype: dict[str, str], rates: Rates = RATES) -> float:
    """Predicted compute seconds of ``op`` with kernel ``params`` (no weight loading, no spills:
    the fit charges those per unit). Bigger tiles are never predicted slower than smaller ones."""
    from ..kernels.attention import default_tiles
    from ..kernels.conv import conv2d_plan
    from ..kernels.linear import default_panel_rows
    from ..kernels.threads import kernel_workers

    k = op.kind
    if k == "conv2d":
        wshape = weight_shape[op.weights["weight"]]
        x = graph.tensors[op.inputs[0]]
        p = conv2d_plan(x, wshape, weight_dtype[op.weights["weight"]], stride=op.attrs.get("stride", 1),
                        pad=tuple(op.attrs["pad"]), upsample=op.attrs.get("upsample", False),
                        band_rows=params.get("band_rows"), panel_rows=params.get("panel_rows"))
        cols = x[0] * p.band_rows * p.wout
        rate = rates.gemm * _eff(cols, rates.half_rows) * _eff(p.panel_rows, rates.half_cols)
        if p.winograd:
            rate *= rates.winograd
        calls = p.n_bands * max(1, p.groups)
        return rates.op + cost.flops / rate + calls * rates.call
    if k == "linear":
        m, n, kk, _ = cost.gemms[0]
        rows = min(m, params.get("row_chunk") or m)
        panel = min(n, params.get("panel_rows") or default_panel_rows(kk, n))
        rate = rates.gemm * _eff(rows, rates.half_rows) * _eff(panel, rates.half_cols)
        calls = -(-m // rows) * -(-n // panel)
        return rates.op + cost.flops / rate + calls * rates.call
    if k in ("mlp", "parallel_mlp"):
        m = cost.gemms[0][0] if cost.gemms else 1
        rows = min(m, params.get("row_chunk") or m)
        t = rates.op
        for _, n, kk, _ in cost.gemms:
            panel = min(n, params.get("panel_rows") or default_panel_rows(kk, n))
            rate = rates.gemm * _eff(rows, rates.half_rows) * _eff(panel, rates.half_cols)
            t += 2 * m * n * kk / rate + -(-m // rows) * -(-n // panel) * rates.call
        return t
    if k in ("attention", "prefix_attention"):
        b, nq, width = graph.tensors[op.inputs[0]]
        nk = graph.tensors[op.inputs[1]][1]
        h = op.attrs["heads"]
        dq, dk = default_tiles(nq, nk, width // h, h, kernel_workers())
        q, kt = min(nq, params.get("q_tile") or dq), min(nk, params.get("k_tile") or dk)
        rate = rates.attention * _eff(q, rates.half_rows) * _eff(kt, rates.half_cols)
        rate /= _eff(min(nq, dq), rates.half_rows) * _eff(min(nk, dk), rates.half_cols)  # the default tiles reach it
        calls = b * h * -(-nq // q) * -(-nk // kt) / 8  # a key tile is an inner loop, cheaper than a call
        return rates.op + cost.flops / rate + calls * rates.call
    return rates.op + (cost.in_bytes + cost.out_bytes) / rates.elementwise
