"""Linear layers over weights kept in their stored dtype: decode a panel, BLAS it, reuse the panel.

``y = act(x @ W.T + bias) + residual`` with ``x`` float32 [M, K] and ``W`` [N, K] stored as
F32/F16/BF16/F8_E4M3/F8_E5M2.  W is never expanded to a full f32 copy: ``panel_rows`` output rows
of W at a time are decoded into a small reused f32 scratch (``linear_scratch_bytes``) and
multiplied with numpy's sgemm (``np.matmul(..., out=...)`` into a column slice of ``y``, which
numpy hands to BLAS directly with ``ldc = N`` — no copy).  Bias, activation and residual are
applied per output tile right after its GEMM, while the tile is still in cache.

Loop order is panel-outer, row-chunk-inner, so every panel of W is decoded exactly once per
call.  ``row_chunk`` bounds the rows of x per GEMM call (and the size of the temporary tile that
is needed when ``residual`` is ``out`` itself).  Everything here takes C-contiguous float32
activations; the weight may be a read-only mmapped view.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from streamexec.kernels.activations import _act_slice, activation_code, geglu_combine, mul_
from streamexec.kernels.decode import DECODE_TAGS, as_f32, decode_to_f32, readonly_flat

__all__ = [
    "linear",
    "geglu",
    "gated_gelu",
    "linear_scratch_bytes",
    "default_panel_rows",
    "geglu_scratch_bytes",
]

# Default panel: enough output rows that each sgemm call has a wide N (BLAS efficiency drops
# below ~256 columns for small K), but the f32 panel stays around L2/L3 size.  Measured on the
# 2-core EPYC (see the module's benchmark notes in the final report): 256-512 rows reach
# >= 0.9 of a full pre-decoded sgemm on SD/FLUX/T5 shapes.
_PANEL_TARGET_BYTES = 4 << 20
_PANEL_MIN_ROWS = 64
_PANEL_MAX_ROWS = 1024
_PANEL_ALIGN = 64
# Tiles needed only when residual aliases out: bound them to this many bytes.
_TILE_TARGET_BYTES = 2 << 20

# Default bound of the GEGLU / gated-GELU intermediate: all of M for T5 (512 x 10240) and
# SD's 2*1024-token levels; larger M is chunked (each chunk decodes W again: cheap vs the GEMM).
_HIDDEN_TARGET_BYTES = 32 << 20

_DECODE_PARALLEL: bool | None = None

_EMPTY = np.empty(0, dtype=np.float32)
_EMPTY.flags.writeable = False


def default_panel_rows(k: int, n: int) -> int:
    """Panel height (output rows of W decoded at once) for a weight of shape [n, k].

    About ``_PANEL_TARGET_BYTES`` of f32 per panel, a multiple of 64 rows, at least 64 and at
    most 1024 (and never more than n).
    """
    rows = _PANEL_TARGET_BYTES // (4 * max(1, k))
    rows = max(_PANEL_MIN_ROWS, min(_PANEL_MAX_ROWS, rows))
    rows = (rows // _PANEL_ALIGN) * _PANEL_ALIGN or _PANEL_ALIGN
    return max(1, min(n, rows))


def linear_scratch_bytes(k: int, panel_rows: int) -> int:
    """Bytes of f32 scratch ``linear`` needs for a panel of ``panel_rows`` rows of length k.

    Pass ``np.empty(linear_scratch_bytes(k, p) // 4, np.float32)`` as ``scratch`` to make the call
    allocation-free (F32 weights need no scratch: 0 is also fine for them).
    """
    return 4 * k * panel_rows


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _epilogue(src, src_ld, src_r0, src_c0, dst, dst_ld, r0, nr, c0, nc, bias, res, code):
    """dst[r0+r, c0:c0+nc] = act(src[src_r0+r, src_c0:+nc] + bias[c0:+nc]) + res[r0+r, c0:+nc].

    All arrays are flat row-major views; ``bias``/``res`` of size 0 mean "none"; ``res`` has the
    layout of ``dst`` and may be ``dst`` itself; ``src`` (the GEMM result) is overwritten with
    act(src + bias).  ``src`` may be ``dst`` (in place, same coordinates).
    """
    has_bias = bias.size > 0
    has_res = res.size > 0
    for r in prange(nr):
        s0 = (src_r0 + r) * src_ld + src_c0
        d0 = (r0 + r) * dst_ld + c0
        s = src[s0 : s0 + nc]
        d = dst[d0 : d0 + nc]
        # bias and activation in place on src (the GEMM result), then combine into dst: res may
        # be dst itself, so each res[j] is read before d[j] is written
        if has_bias:
            b = bias[c0 : c0 + nc]
            for j in range(nc):
                s[j] += b[j]
        if code != 0:
            _act_slice(s, s, code)
        if has_res:
            q = res[d0 : d0 + nc]
            for j in range(nc):
                d[j] = s[j] + q[j]
        elif s0 != d0 or src_ld != dst_ld:
            for j in range(nc):
                d[j] = s[j]


def _check_x(x: np.ndarray, k: int | None = None) -> None:
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise TypeError(f"x must be a C-contiguous float32 [M, K] array, got {x.dtype} {x.shape}")
    if k is not None and x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]}, weight has K={k}")


def _check_w(w: np.ndarray, w_dtype: str) -> None:
    want = DECODE_TAGS.get(w_dtype)
    if want is None:
        raise ValueError(f"unknown weight dtype {w_dtype!r}")
    if w.ndim != 2 or not w.flags.c_contiguous or w.dtype.itemsize != want.itemsize:
        raise TypeError(f"w must be a C-contiguous [N, K] {w_dtype} array, got {w.dtype} {w.shape}")


def _f32_out(out: np.ndarray | None, shape: tuple[int, int], what: str = "out") -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if out.dtype != np.float32 or not out.flags.c_contiguous or out.shape != shape:
        raise ValueError(f"{what} must be a C-contiguous float32 {shape} array")
    return out


def linear(
    x: np.ndarray,
    w: np.ndarray,
    w_dtype: str,
    bias: np.ndarray | None = None,
    bias_dtype: str | None = None,
    out: np.ndarray | None = None,
    *,
    row_chunk: int | None = None,
    panel_rows: int | None = None,
    scratch: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    activation: str | None = None,
) -> np.ndarray:
    """``out = act(x @ W.T + bias) + residual`` without ever materialising W in f32.

    Args:
        x: float32 [M, K], C-contiguous.
        w: [N, K] in its storage dtype (``weights.dtypes``), C-contiguous, may be read-only/mmap.
        w_dtype: "F32", "F16", "BF16", "F8_E4M3" or "F8_E5M2".
        bias: optional [N] vector in ``bias_dtype`` (default: inferred; F32 if float32).
        out: optional float32 [M, N] destination (C-contiguous).  May be ``residual`` itself
            (in-place residual add; a bounded tile buffer is then used), must not overlap ``x``.
        row_chunk: max rows of x per GEMM call (default: all M, or a ~2 MB tile when ``out`` is
            ``residual``).
        panel_rows: rows of W decoded per panel (default ``default_panel_rows(K, N)``; for F32
            weights the default is all N since nothing is decoded).
        scratch: optional float32 buffer with at least ``panel_rows * K`` elements (see
            ``linear_scratch_bytes``); reused for every panel, so the call allocates nothing
            W-sized.  Ignored for F32 weights.
        residual: optional float32 [M, N] added after the activation.
        activation: None, "silu", "gelu", "gelu_tanh" or "quick_gelu", applied after the bias.

    Returns:
        ``out`` (or a new [M, N] array).
    """
    _check_w(w, w_dtype)
    n, k = w.shape
    _check_x(x, k)
    m = x.shape[0]
    out = _f32_out(out, (m, n))
    if np.shares_memory(out, x):
        raise ValueError("out must not overlap x")
    code = activation_code(activation)
    bias_f = as_f32(bias, bias_dtype)
    if bias_f is not None and bias_f.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {bias_f.shape}")
    if residual is not None:
        residual = _f32_out(residual, (m, n), "residual")
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.fill(0.0)
        if bias_f is not None or code or residual is not None:
            _run_epilogue(out, out, 0, 0, m, n, bias_f, residual, code)
        return out

    is_f32 = w_dtype == "F32"
    if panel_rows is None:
        panel_rows = n if is_f32 else default_panel_rows(k, n)
    panel_rows = max(1, min(int(panel_rows), n))
    in_place_res = residual is not None and np.shares_memory(out, residual)
    if row_chunk is None:
        row_chunk = m
        if in_place_res:
            row_chunk = max(1, _TILE_TARGET_BYTES // (4 * panel_rows))
    row_chunk = max(1, min(int(row_chunk), m))

    if not is_f32:
        if scratch is None:
            scratch = np.empty(panel_rows * k, dtype=np.float32)
        elif scratch.dtype != np.float32 or scratch.size < panel_rows * k:
            raise ValueError(f"scratch must be float32 with >= {panel_rows * k} elements")
        scratch = scratch.reshape(-1)
    tile = np.empty((row_chunk, panel_rows), dtype=np.float32) if in_place_res else None
    need_epi = bias_f is not None or code != 0 or residual is not None

    for n0 in range(0, n, panel_rows):
        p = min(panel_rows, n - n0)
        if is_f32:
            panel = w[n0 : n0 + p].view(np.float32)
        else:
            panel = scratch[: p * k].reshape(p, k)
            decode_to_f32(w[n0 : n0 + p], w_dtype, panel, parallel=_DECODE_PARALLEL)
        pt = panel.T
        for m0 in range(0, m, row_chunk):
            r = min(row_chunk, m - m0)
            xs = x[m0 : m0 + r]
            if tile is not None:
                dst = tile[:r, :p]  # rows of a [row_chunk, panel_rows] buffer; ldc = panel_rows
                np.matmul(xs, pt, out=dst)
                _run_epilogue(tile, out, m0, n0, r, p, bias_f, residual, code, src_ld=panel_rows)
            else:
                np.matmul(xs, pt, out=out[m0 : m0 + r, n0 : n0 + p])
                if need_epi:
                    _run_epilogue(out, out, m0, n0, r, p, bias_f, residual, code)
    return out


def _run_epilogue(
    src: np.ndarray,
    dst: np.ndarray,
    r0: int,
    c0: int,
    nr: int,
    nc: int,
    bias: np.ndarray | None,
    residual: np.ndarray | None,
    code: int,
    src_ld: int | None = None,
) -> None:
    """Apply bias/activation/residual to dst[r0:r0+nr, c0:c0+nc] reading the GEMM result in src.

    ``src is dst``: in place at the same coordinates; otherwise ``src`` is a tile whose row i,
    column j hold the result for dst[r0+i, c0+j] (row stride ``src_ld``).
    """
    ld = dst.shape[1]
    b = _EMPTY if bias is None else readonly_flat(bias)
    q = _EMPTY if residual is None else readonly_flat(residual)
    if src is dst:
        _epilogue(dst.reshape(-1), ld, r0, c0, dst.reshape(-1), ld, r0, nr, c0, nc, b, q, code)
    else:
        _epilogue(src.reshape(-1), src_ld, 0, 0, dst.reshape(-1), ld, r0, nr, c0, nc, b, q, code)


def geglu_scratch_bytes(inner: int, row_chunk: int) -> int:
    """Bytes of the [row_chunk, 2*inner] f32 intermediate ``geglu`` allocates (or reuses)."""
    return 4 * row_chunk * 2 * inner


def geglu(
    x: np.ndarray,
    w: np.ndarray,
    w_dtype: str,
    bias: np.ndarray | None = None,
    bias_dtype: str | None = None,
    out: np.ndarray | None = None,
    *,
    row_chunk: int | None = None,
    panel_rows: int | None = None,
    scratch: np.ndarray | None = None,
    hidden: np.ndarray | None = None,
) -> np.ndarray:
    """diffusers GEGLU: ``h = x @ W.T + b`` ([M, 2I]); ``a, gate = h.chunk(2)``; ``a * gelu(gate)``.

    Rows of x are processed ``row_chunk`` at a time so the [rows, 2I] intermediate stays bounded
    (``geglu_scratch_bytes``; pass ``hidden`` to reuse one).  Default row_chunk: ~32 MB
    of intermediate.  Note each row chunk decodes all of W once: pick row_chunk as large as the
    budget allows (W decode is ~0.2 ns/element vs 2*rows flops of GEMM per element).
    """
    _check_w(w, w_dtype)
    n2, k = w.shape
    _check_x(x, k)
    if n2 % 2:
        raise ValueError(f"GEGLU projection must have an even number of rows, got {n2}")
    inner = n2 // 2
    m = x.shape[0]
    out = _f32_out(out, (m, inner))
    if row_chunk is None:
        row_chunk = max(1, _HIDDEN_TARGET_BYTES // (4 * n2))
    row_chunk = max(1, min(int(row_chunk), max(m, 1)))
    if hidden is None:
        hidden = np.empty(row_chunk * n2, dtype=np.float32)
    elif hidden.dtype != np.float32 or hidden.size < row_chunk * n2:
        raise ValueError(f"hidden must be float32 with >= {row_chunk * n2} elements")
    if panel_rows is None:
        panel_rows = default_panel_rows(k, n2)
    if scratch is None and w_dtype != "F32":
        scratch = np.empty(min(panel_rows, n2) * k, dtype=np.float32)
    for m0 in range(0, m, row_chunk):
        r = min(row_chunk, m - m0)
        h = hidden.reshape(-1)[: r * n2].reshape(r, n2)
        linear(x[m0 : m0 + r], w, w_dtype, bias, bias_dtype, h, panel_rows=panel_rows,
               scratch=scratch)
        geglu_combine(h, out[m0 : m0 + r])
    return out


def gated_gelu(
    x: np.ndarray,
    w0: np.ndarray,
    w1: np.ndarray,
    w_dtype: str,
    out: np.ndarray | None = None,
    *,
    w1_dtype: str | None = None,
    row_chunk: int | None = None,
    panel_rows: int | None = None,
    scratch: np.ndarray | None = None,
    hidden: np.ndarray | None = None,
    activation: str = "gelu_tanh",
) -> np.ndarray:
    """T5 v1.1 gated-GELU input half: ``act(x @ wi_0.T) * (x @ wi_1.T)`` -> [M, I].

    ``act`` defaults to "gelu_tanh" (T5's "gelu_new").  The activation is fused into the wi_0
    GEMM epilogue; wi_1's product goes to a [row_chunk, I] buffer (``hidden``, reusable) and is
    multiplied in.  Rows are chunked (default ~32 MB buffer) so memory stays bounded.
    """
    _check_w(w0, w_dtype)
    w1_dtype = w1_dtype or w_dtype
    _check_w(w1, w1_dtype)
    inner, k = w0.shape
    if w1.shape != (inner, k):
        raise ValueError(f"wi_0 {w0.shape} and wi_1 {w1.shape} differ")
    _check_x(x, k)
    m = x.shape[0]
    out = _f32_out(out, (m, inner))
    if row_chunk is None:
        row_chunk = max(1, _HIDDEN_TARGET_BYTES // (4 * inner))
    row_chunk = max(1, min(int(row_chunk), max(m, 1)))
    if hidden is None:
        hidden = np.empty(row_chunk * inner, dtype=np.float32)
    elif hidden.dtype != np.float32 or hidden.size < row_chunk * inner:
        raise ValueError(f"hidden must be float32 with >= {row_chunk * inner} elements")
    if panel_rows is None:
        panel_rows = default_panel_rows(k, inner)
    if scratch is None and not (w_dtype == "F32" and w1_dtype == "F32"):
        scratch = np.empty(min(panel_rows, inner) * k, dtype=np.float32)
    for m0 in range(0, m, row_chunk):
        r = min(row_chunk, m - m0)
        o = out[m0 : m0 + r]
        h = hidden.reshape(-1)[: r * inner].reshape(r, inner)
        xs = x[m0 : m0 + r]
        linear(xs, w0, w_dtype, out=o, panel_rows=panel_rows, scratch=scratch,
               activation=activation)
        linear(xs, w1, w1_dtype, out=h, panel_rows=panel_rows, scratch=scratch)
        mul_(o, h)
    return out
