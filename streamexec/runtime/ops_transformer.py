"""Op kinds of the transformer models (FLUX.1 transformer, T5 encoder), on the kernels.

Registered into ``ops.OPS`` at the end of ``ops.py``. Semantics of every kind are in the op table
of ``models/graph.py``. What bounds memory here, read from ``ctx.params`` like the other ops:

* ``mlp`` / ``parallel_mlp``: ``row_chunk`` = token rows per step; the [row_chunk, inner] hidden
  activation (FLUX: inner 12288) is the only intermediate, never [N, inner]. ``panel_rows`` goes
  to the linear kernel. Default: ``kernels.linear.hidden_rows`` (~32 MB of hidden rows, at
  least ``MLP_MIN_ROWS``).
* ``prefix_attention``: ``q_tile`` / ``k_tile`` as ``attention``.
* the others make one output-sized array and nothing else.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..kernels import activations as act
from ..kernels import buffers
from ..kernels.attention import attention
from ..kernels.embeddings import apply_rope, rope_freqs
from ..kernels.linear import MLP_MIN_ROWS, hidden_rows, linear
from ..kernels.norms import rms_norm
from ..models.graph import Op

if TYPE_CHECKING:  # ops.py imports this module at its end: no import back at run time
    from .ops import OpContext, OpFn

def _c32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _wargs(ctx: OpContext, op: Op, role: str) -> tuple:
    """(array, dtype) of weight ``role`` and (array, dtype) of ``role + '_bias'`` (or Nones)."""
    w = ctx.weight(op, role)
    b = ctx.weight(op, f"{role}_bias")
    return w.array, w.dtype, (None if b is None else b.array), (None if b is None else b.dtype)


def _rows_per_step(ctx: OpContext, m: int, inner: int) -> int:
    """Token rows per step of a fused MLP: the linear kernel's feed-forward rule (the planner
    sizes the step with the same function)."""
    return hidden_rows(m, inner, ctx.params.get("row_chunk"), min_rows=MLP_MIN_ROWS)


def _activate(h: np.ndarray, name: str | None) -> None:
    """In place; ``relu`` (original T5) is not a fused linear epilogue."""
    if name == "relu":
        np.maximum(h, 0.0, out=h)
    elif name:
        act.apply_activation(h, name, out=h)


def _gated_residual(y: np.ndarray, residual: np.ndarray | None, gate: np.ndarray | None,
                    out: np.ndarray) -> None:
    """out = residual + gate * y (diffusers' order: the gated product is rounded, then added)."""
    if gate is not None:
        np.multiply(y, gate, out=y)
    if residual is not None:
        np.add(residual, y, out=out)
    elif out is not y:
        out[...] = y


# --- FLUX -----------------------------------------------------------------------------------


def op_rope_freqs(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """[2, Ntxt + Nimg, D/2]: cos and sin of the 3-axis RoPE over ids [txt; img]."""
    ids = np.concatenate([np.asarray(a, np.float32).reshape(-1, np.shape(a)[-1]) for a in args], axis=0)
    cos, sin = rope_freqs(ids, tuple(op.attrs["axes_dim"]), float(op.attrs.get("theta", 10000.0)))
    return np.stack([cos, sin])


def op_head_norm(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """RMSNorm over each head's D features of x [B, N, H*D], then RoPE rows ``rope_offset``+."""
    x = _c32(args[0])
    heads = op.attrs["heads"]
    b, n, width = x.shape
    d = width // heads
    out = rms_norm(x.reshape(-1, d), ctx.vector(op, "weight"), op.attrs["eps"]).reshape(b, n, heads, d)
    if len(args) > 1:
        off = int(op.attrs.get("rope_offset", 0))
        rope = args[1]
        cos, sin = rope[0, off : off + n], rope[1, off : off + n]
        for i in range(b):
            apply_rope(out[i], cos, sin)
    return out.reshape(shape)


def op_gated_add(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """a + gate[B, D] * b[B, N, D] (AdaLN-Zero gated residual)."""
    a, b, gate = args
    out = np.multiply(b, np.asarray(gate, np.float32)[:, None, :], dtype=np.float32)
    np.add(a, out, out=out)
    return out


def op_slice(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    x = args[0]
    idx = [slice(None)] * x.ndim
    idx[op.attrs["axis"]] = slice(op.attrs["start"], op.attrs["stop"])
    return x[tuple(idx)]


def _batch_rows(x: np.ndarray) -> tuple[int, int]:
    """(batch, rows per batch item) of a [B, N, D] (or [M, D]) activation."""
    return (x.shape[0], x.shape[1]) if x.ndim == 3 else (1, x.shape[0])


def op_mlp(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """residual + gate * down(act(up(x)) [* up_mul(x)]), ``row_chunk`` token rows at a time."""
    x = _c32(args[0])
    residual = _c32(args[1]) if len(args) > 1 else None
    gate = _c32(args[2]) if len(args) > 2 else None
    a = op.attrs.get("activation")
    wu, du, bu, dbu = _wargs(ctx, op, "up")
    wd, dd, bd, dbd = _wargs(ctx, op, "down")
    mul = ctx.weight(op, "up_mul")
    inner = wu.shape[0]
    nb, n = _batch_rows(x)
    dx, dout = x.shape[-1], shape[-1]
    xf = x.reshape(nb, n, dx)
    out = buffers.empty((nb, n, dout))
    rf = None if residual is None else residual.reshape(nb, n, dout)
    step = _rows_per_step(ctx, n, inner)
    pr = ctx.params.get("panel_rows")
    hid = buffers.empty(step * inner)
    lin = buffers.empty(step * inner) if mul is not None else None
    fused = a not in (None, "relu")
    for i in range(nb):
        g = None if gate is None else gate[i]
        for r0 in range(0, n, step):
            r = min(step, n - r0)
            xs = xf[i, r0 : r0 + r]
            h = hid[: r * inner].reshape(r, inner)
            linear(xs, wu, du, bu, dbu, out=h, panel_rows=pr, activation=a if fused else None)
            if not fused:
                _activate(h, a)
            if mul is not None:  # T5 gated FF: act(x wi_0) * (x wi_1)
                hl = lin[: r * inner].reshape(r, inner)
                linear(xs, mul.array, mul.dtype, out=hl, panel_rows=pr, residual=h, combine="mul")
                h = hl
            o = out[i, r0 : r0 + r]
            if g is None and rf is not None:  # plain residual: fused into the epilogue
                linear(h, wd, dd, bd, dbd, out=o, panel_rows=pr, residual=rf[i, r0 : r0 + r])
            else:
                linear(h, wd, dd, bd, dbd, out=o, panel_rows=pr)
                _gated_residual(o, None if rf is None else rf[i, r0 : r0 + r], g, o)
    return out.reshape(shape)


def op_parallel_mlp(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """FLUX single block: residual + gate * proj_out(concat(attn, act(proj_mlp(x)))), chunked."""
    x, attn, residual, gate = (_c32(a) for a in args)
    a = op.attrs.get("activation", "gelu_tanh")
    wu, du, bu, dbu = _wargs(ctx, op, "up")
    wd, dd, bd, dbd = _wargs(ctx, op, "down")
    inner = wu.shape[0]
    nb, n, dx = x.shape
    da = attn.shape[-1]
    out = buffers.empty(shape)
    step = _rows_per_step(ctx, n, inner + da)
    pr = ctx.params.get("panel_rows")
    hid = buffers.empty(step * inner)
    cat = buffers.empty(step * (da + inner))
    for i in range(nb):
        for r0 in range(0, n, step):
            r = min(step, n - r0)
            h = hid[: r * inner].reshape(r, inner)
            linear(x[i, r0 : r0 + r], wu, du, bu, dbu, out=h, panel_rows=pr, activation=a)
            c = cat[: r * (da + inner)].reshape(r, da + inner)
            c[:, :da] = attn[i, r0 : r0 + r]
            c[:, da:] = h
            o = out[i, r0 : r0 + r]
            linear(c, wd, dd, bd, dbd, out=o, panel_rows=pr)
            _gated_residual(o, residual[i, r0 : r0 + r], gate[i], o)
    return out


# --- T5 -------------------------------------------------------------------------------------


def t5_relative_buckets(rel: np.ndarray, num_buckets: int, max_distance: int, bidirectional: bool = True) -> np.ndarray:
    """transformers ``T5Attention._relative_position_bucket`` (relative = key - query), same f32
    arithmetic so positions on a bucket boundary land where torch puts them."""
    rel = np.asarray(rel, np.int64)
    buckets = np.zeros(rel.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        f = np.log(rel.astype(np.float32) / np.float32(max_exact))
    f = f / np.float32(math.log(max_distance / max_exact))
    f = f * np.float32(num_buckets - max_exact)
    large = max_exact + np.where(rel < max_exact, 0, f).astype(np.int64)  # where: no cast of -inf
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(rel < max_exact, rel, large)


def op_t5_rel_bias(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """[H, Nq + Nk - 1]: bias of relative offset j - i (index j - i + Nq - 1), per head."""
    nq, nk = op.attrs["nq"], op.attrs["nk"]
    table = ctx.vector(op, "weight")  # [buckets, H]
    rel = np.arange(-(nq - 1), nk, dtype=np.int64)
    b = t5_relative_buckets(rel, op.attrs["num_buckets"], op.attrs["max_distance"], op.attrs.get("bidirectional", True))
    return np.ascontiguousarray(table[b].T, dtype=np.float32)


def op_prefix_attention(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """``attention`` where batch item b sees only its first key_len[b] keys (right padding)."""
    q, k, v = (_c32(a) for a in args[:3])
    key_len = np.asarray(args[3]).reshape(-1)
    rel_bias = args[4] if len(args) > 4 else None
    heads = op.attrs["heads"]
    b, nq, width = q.shape
    nk = k.shape[1]
    d = width // heads
    out = buffers.empty(shape)
    for i in range(b):
        L = int(key_len[i])
        if not 0 < L <= nk:
            raise ValueError(f"{op.name}: attention_mask of batch item {i} keeps {L} of {nk} tokens")
        bias = None if rel_bias is None else np.ascontiguousarray(rel_bias[:, : nq + L - 1])
        attention(
            q[i].reshape(nq, heads, d), k[i, :L].reshape(L, heads, d), v[i, :L].reshape(L, heads, d),
            op.attrs["scale"], rel_bias=bias, q_tile=ctx.params.get("q_tile"), k_tile=ctx.params.get("k_tile"),
            out=out[i].reshape(nq, heads, d),
        )
    return out


TRANSFORMER_OPS: dict[str, OpFn] = {
    "rope_freqs": op_rope_freqs,
    "head_norm": op_head_norm,
    "gated_add": op_gated_add,
    "slice": op_slice,
    "mlp": op_mlp,
    "parallel_mlp": op_parallel_mlp,
    "t5_rel_bias": op_t5_rel_bias,
    "prefix_attention": op_prefix_attention,
}
