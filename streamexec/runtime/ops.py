"""How each op kind of the graph is computed with the kernels. The executor calls ``OPS[kind]``;
this is the only place that knows both the op vocabulary (models/graph.py) and the kernel API."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..kernels import activations as act
from ..kernels import buffers
from ..kernels.attention import attention
from ..kernels.conv import conv2d, conv2d_band_slab
from ..kernels.decode import decode_to_f32
from ..kernels.embeddings import timestep_embedding
from ..kernels.linear import geglu, linear
from ..kernels.norms import (
    group_norm,
    group_norm_accumulate,
    group_norm_apply,
    group_norm_finalize,
    layer_norm,
    rms_norm,
)
from ..models.graph import Op
from ..planner.streaming import BAND_ELEMS, ooc_rows, row_axis
from ..weights.store import WeightStore
from .spill import Spilled, put_rows, rows_of


@dataclass
class OpContext:
    """What an op implementation may use: the weights, the op's schedule parameters, and where
    to put its output when the plan keeps it on disk (``out``: written band by band)."""

    store: WeightStore
    params: dict
    out: Spilled | None = None

    @property
    def banded(self) -> bool:
        return self.out is not None

    def weight(self, op: Op, role: str):
        key = op.weights.get(role)
        return None if key is None else self.store.get(key)

    def vector(self, op: Op, role: str) -> np.ndarray | None:
        key = op.weights.get(role)
        return None if key is None else self.store.get_f32(key)


OpFn = Callable[[OpContext, Op, list[np.ndarray], tuple[int, ...]], np.ndarray]


def _rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


def op_linear(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    if op.attrs.get("transposed"):  # a small [K, N] weight (OpenCLIP's text projection): x @ W, no bias
        return np.matmul(_rows(args[0]), ctx.vector(op, "weight"), dtype=np.float32).reshape(shape)
    x = _rows(args[0])
    w = ctx.weight(op, "weight")
    b = ctx.weight(op, "bias")
    residual = _rows(args[1]) if len(args) > 1 and not isinstance(args[1], Spilled) else None
    out = None
    if len(args) > 1 and isinstance(args[1], Spilled):  # residual read from disk into the output,
        out = buffers.empty((x.shape[0], w.shape[0]))  # then accumulated in place
        args[1].read_into(out)
        residual = out
    row_chunk = ctx.params.get("row_chunk")
    if op.attrs.get("gate") == "geglu":  # the 2I-wide projection exists one row chunk at a time
        return geglu(x, w.array, w.dtype, None if b is None else b.array, None if b is None else b.dtype,
                     row_chunk=row_chunk, panel_rows=ctx.params.get("panel_rows")).reshape(shape)
    y = linear(
        x, w.array, w.dtype, None if b is None else b.array, None if b is None else b.dtype,
        out=out, row_chunk=row_chunk, panel_rows=ctx.params.get("panel_rows"),
        residual=residual, activation=op.attrs.get("activation"),
    )
    return y.reshape(shape)


def op_conv2d(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    if ctx.banded or isinstance(args[0], Spilled):
        return _conv2d_banded(ctx, op, args, shape)
    w = ctx.weight(op, "weight")
    b = ctx.weight(op, "bias")
    y = conv2d(
        np.ascontiguousarray(args[0]), w.array, w.dtype, None if b is None else b.array, None if b is None else b.dtype,
        stride=op.attrs.get("stride", 1), pad=tuple(op.attrs["pad"]), upsample=op.attrs.get("upsample", False),
        band_rows=ctx.params.get("band_rows"), panel_rows=ctx.params.get("panel_rows"),
    )
    if len(args) > 1:
        _add_into(y, args[1])
    return y


def _conv2d_banded(ctx: OpContext, op: Op, args: list, shape: tuple[int, ...]):
    """A stride-1 conv over output row bands: each band reads only the input rows it needs
    (with the kernel's halo, through the fused 2x upsample), from RAM or from disk, and its
    output rows go to RAM or straight to disk. The input map and the output map never need to
    be in memory whole."""
    x = args[0]
    residual = args[1] if len(args) > 1 else None
    w, b = ctx.weight(op, "weight"), ctx.weight(op, "bias")
    k = int(w.shape[2])
    pad = tuple(int(v) for v in op.attrs["pad"])
    upsample = bool(op.attrs.get("upsample"))
    if op.attrs.get("stride", 1) != 1:
        raise ValueError(f"{op.name}: banded conv2d needs stride 1")
    ho = shape[2]
    out = ctx.out if ctx.out is not None else buffers.empty(shape)
    rows = ooc_rows(shape, ctx.params, tuple(x.shape))
    for o0 in range(0, ho, rows):
        o1 = min(ho, o0 + rows)
        s0, s1, slab_pad, j0 = conv2d_band_slab(o0, o1, x.shape[2], k, pad, upsample=upsample)
        y = conv2d(rows_of(x, s0, s1), w.array, w.dtype, None if b is None else b.array,
                   None if b is None else b.dtype, pad=slab_pad, upsample=upsample,
                   band_rows=ctx.params.get("band_rows"), panel_rows=ctx.params.get("panel_rows"))
        if j0 < 0 or j0 + (o1 - o0) > y.shape[2]:
            raise AssertionError(f"{op.name}: band geometry {o0}:{o1} -> {j0} of {y.shape[2]}")
        band = np.ascontiguousarray(y[:, :, j0 : j0 + (o1 - o0)])
        del y
        if residual is not None:
            act.add_(band, rows_of(residual, o0, o1))
        put_rows(out, o0, band)
    return out


def _add_into(y: np.ndarray, b) -> None:
    """y += b, where b is an array or a spilled tensor read back band by band."""
    if not isinstance(b, Spilled):
        act.add_(y, np.ascontiguousarray(b))
        return
    flat = y.reshape(-1)
    band = np.empty(min(BAND_ELEMS, flat.size), np.float32)
    for s0 in range(0, flat.size, band.size):
        n = min(band.size, flat.size - s0)
        b.read_into(band[:n], s0)
        act.add_(flat[s0 : s0 + n], band[:n])


def op_group_norm(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    if ctx.banded or isinstance(args[0], Spilled):
        return _group_norm_banded(ctx, op, args[0], shape)
    return group_norm(
        np.ascontiguousarray(args[0]), op.attrs["groups"], ctx.vector(op, "weight"), ctx.vector(op, "bias"),
        op.attrs["eps"], silu=op.attrs.get("silu", False),
    )


def _group_norm_banded(ctx: OpContext, op: Op, x, shape: tuple[int, ...]):
    """Two passes over row bands (from RAM or disk): statistics in f64, then normalise (+ SiLU)
    each band into the output (RAM or disk)."""
    groups, eps = op.attrs["groups"], op.attrs["eps"]
    n, c, h, w = shape
    rows = ooc_rows(shape, ctx.params)
    acc = None
    for r0 in range(0, h, rows):
        acc = group_norm_accumulate(rows_of(x, r0, min(h, r0 + rows)), groups, acc)
    mean, rstd = group_norm_finalize(acc, (c // groups) * h * w, eps)
    mean, rstd = mean.reshape(n, groups), rstd.reshape(n, groups)
    gamma, beta = ctx.vector(op, "weight"), ctx.vector(op, "bias")
    out = ctx.out if ctx.out is not None else buffers.empty(shape)
    for r0 in range(0, h, rows):
        band = rows_of(x, r0, min(h, r0 + rows))
        put_rows(out, r0, group_norm_apply(band, mean, rstd, gamma, beta, silu=op.attrs.get("silu", False), out=band))
    return out


def op_layer_norm(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    x = np.ascontiguousarray(args[0])
    gamma, beta = ctx.vector(op, "weight"), ctx.vector(op, "bias")
    if not op.attrs.get("modulated"):
        return layer_norm(x.reshape(-1, x.shape[-1]), gamma, beta, op.attrs["eps"]).reshape(shape)
    # AdaLN: shift/scale [B, D] apply to the tokens of their batch item
    shift, scale = (np.ascontiguousarray(a) for a in args[1:3])
    return layer_norm(x.reshape(-1, x.shape[-1]), gamma, beta, op.attrs["eps"], shift=shift,
                      scale=scale).reshape(shape)


def op_rms_norm(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    return rms_norm(np.ascontiguousarray(args[0]), ctx.vector(op, "weight"), op.attrs["eps"])


def op_attention(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    q, k, v = (np.ascontiguousarray(a) for a in args[:3])
    heads = op.attrs["heads"]
    b, nq, width = q.shape
    nk = k.shape[1]
    d = width // heads
    out = buffers.empty(shape)
    rel_bias = args[3] if op.attrs.get("rel_bias") else None
    for i in range(b):
        attention(
            q[i].reshape(nq, heads, d), k[i].reshape(nk, heads, d), v[i].reshape(nk, heads, d), op.attrs["scale"],
            causal=op.attrs.get("causal", False), rel_bias=rel_bias,
            q_tile=ctx.params.get("q_tile"), k_tile=ctx.params.get("k_tile"),
            out=out[i].reshape(nq, heads, d),
        )
    return out


_BROADCAST = {None: lambda b: b, "nchw": lambda b: b[:, :, None, None], "tokens": lambda b: b[:, None, :]}


def op_add(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    a, b = args
    if ctx.banded:  # output on disk: band by band from wherever the inputs are
        rows = ooc_rows(shape, ctx.params)
        ax = row_axis(shape)
        for r0 in range(0, shape[ax], rows):
            r1 = min(shape[ax], r0 + rows)
            band = rows_of(a, r0, r1)
            act.add_(band, rows_of(b, r0, r1))
            put_rows(ctx.out, r0, band)
        return ctx.out
    if isinstance(a, Spilled) or isinstance(b, Spilled):  # no broadcasting here (planner's rule)
        if isinstance(a, Spilled):
            a, b = b, a
        out = buffers.empty(shape)
        if isinstance(a, Spilled):  # both on disk
            a.read_into(out)
        else:
            np.copyto(out, a)
        _add_into(out, b)
        return out
    return np.add(a, _BROADCAST[op.attrs.get("broadcast")](b), dtype=np.float32)


def op_unary(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    fn = op.attrs["fn"]
    if fn == "relu":  # the tiny VAE decoders' activation
        return np.maximum(args[0], np.float32(0), dtype=np.float32)
    if fn == "soft_clamp":  # tanh(x / bound) * bound: the tiny VAE decoders' input clamp
        bound = np.float32(op.attrs["bound"])
        y = np.tanh(np.divide(args[0], bound, dtype=np.float32))
        return np.multiply(y, bound, out=y)
    return act.apply_activation(np.ascontiguousarray(args[0]), fn)


def op_concat(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    if not any(isinstance(a, Spilled) for a in args):
        return np.concatenate(args, axis=op.attrs["axis"])
    axis = op.attrs["axis"] % len(shape)
    out = buffers.empty(shape)
    outer = int(np.prod(shape[:axis]))
    o2 = out.reshape(outer, -1)
    off = 0
    for a in args:  # each input's slot of every outer row is contiguous: read spilled ones straight in
        width = int(np.prod(a.shape[axis:]))
        if isinstance(a, Spilled):
            for r in range(outer):
                a.read_into(o2[r, off : off + width], r * width)
        else:
            o2[:, off : off + width] = np.ascontiguousarray(a).reshape(outer, width)
        off += width
    return out


def op_to_tokens(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    x = args[0]
    b, c = x.shape[:2]
    return np.ascontiguousarray(x.reshape(b, c, -1).transpose(0, 2, 1))


def op_to_image(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    x = args[0]
    return np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(shape)


def op_timestep_embedding(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    a = op.attrs
    return timestep_embedding(
        np.asarray(args[0], np.float32).reshape(-1), a["dim"], flip_sin_to_cos=a["flip_sin_to_cos"],
        downscale_freq_shift=a["shift"], scale=a.get("scale", 1.0),
    ).astype(np.float32, copy=False).reshape(shape)  # [B, T] ids: each id's embedding, side by side


def op_embedding(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    w = ctx.weight(op, "weight")
    ids = np.asarray(args[0]).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise ValueError(f"{op.name}: token id out of range 0..{w.shape[0] - 1}")
    rows = np.ascontiguousarray(w.array[ids.reshape(-1)])  # only the rows used are read
    return decode_to_f32(rows, w.dtype).reshape(shape).astype(np.float32, copy=False)


def op_add_position(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    w = ctx.weight(op, "weight")
    n = shape[1]
    pos = decode_to_f32(np.ascontiguousarray(w.array[:n]), w.dtype)
    return np.add(args[0], pos[None], dtype=np.float32)


def op_pool_eos(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    h, ids = args
    ids = np.asarray(ids)
    eos = op.attrs["eos_token_id"]
    if eos == 2:  # transformers' legacy rule: the EOS token has the highest id
        idx = ids.astype(np.int32).argmax(axis=-1)
    else:
        idx = (ids == eos).astype(np.int32).argmax(axis=-1)
    return np.ascontiguousarray(h[np.arange(h.shape[0]), idx])


def op_scale(ctx: OpContext, op: Op, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    y = np.multiply(args[0], np.float32(op.attrs["factor"]), dtype=np.float32)
    if op.attrs.get("offset"):
        y += np.float32(op.attrs["offset"])
    return y


OPS: dict[str, OpFn] = {
    "linear": op_linear,
    "conv2d": op_conv2d,
    "group_norm": op_group_norm,
    "layer_norm": op_layer_norm,
    "rms_norm": op_rms_norm,
    "attention": op_attention,
    "add": op_add,
    "unary": op_unary,
    "concat": op_concat,
    "to_tokens": op_to_tokens,
    "to_image": op_to_image,
    "timestep_embedding": op_timestep_embedding,
    "embedding": op_embedding,
    "add_position": op_add_position,
    "pool_eos": op_pool_eos,
    "scale": op_scale,
}

from .ops_transformer import TRANSFORMER_OPS  # noqa: E402  (FLUX/T5 op kinds)

OPS.update(TRANSFORMER_OPS)
