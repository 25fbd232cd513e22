"""Per-op cost model: GEMM sizes (M×N×K), FLOPs, weight bytes and activation bytes.

Pure arithmetic on shapes; what ``streamexec inspect`` shows as "how big are the real matrices".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

from ..models.graph import Graph, Op

F32 = 4


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
