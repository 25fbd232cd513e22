"""Linear layers over weights kept in their stored dtype: decode a panel, BLAS it, reuse the panel.

``y = act(x @ W.T + bias) (+ or *) other`` with ``x`` float32 [M, K] and ``W`` [N, K] stored as
F32/F16/BF16/F8_E4M3/F8_E5M2.  W is never expanded to a full f32 copy: ``panel_rows`` output rows
of W at a time are decoded into a small reused f32 scratch (``linear_scratch_bytes``) and
multiplied with numpy's sgemm (``np.matmul(x, panel.T, out=y[:, cols])``: numpy hands the
strided column slice to BLAS as ``ldc = N`` and the transposed panel as a transpose flag, no
copies).  Bias, activation and residual/gate are applied to each output tile right after its
GEMM by a serial Numba epilogue.

How the work is spread over cores: the output is cut into about two blocks per *worker* (the
calling thread plus ``linear_workers() - 1`` pool threads), handed out dynamically
(``threads.parallel_items``), each worker running **single-threaded** sgemm on its own decoded
panels while OpenBLAS is switched to one thread for the call.  Columns are cut for wide W (T5,
FLUX: each panel decoded once); rows for tall x (SD: M=8192, N=320), after W is decoded once into
the workers' scratch when it fits there (rather than every worker decoding all of W for its
rows).  Why not "decode a panel, then one multi-threaded sgemm": OpenBLAS's spinning worker lands
on the core that decodes, and each freshly decoded panel must migrate to the other core.  Why
dynamic blocks rather than one static block per worker: in the model they stop the prefetch
thread (mapping the next unit's weights) from stalling the other worker at every unit's first
op.  Small products (< ``_PARALLEL_MIN_FLOP`` with less than ``_PARALLEL_MIN_DECODE`` weights)
and numpy builds whose BLAS threads we cannot control run in the calling thread with BLAS's own
threading instead.  Measurements behind these choices: BENCHMARKS.md, kernels.

Panel layout: the panel is decoded as [P, K] and handed to sgemm transposed; decoding it as
[K, P] ("NN" sgemm) gains less in sgemm than a transposing decode costs, and numpy hands a
strided column slice of y to BLAS as ``ldc`` (no copy), so no contiguous tile is needed.

No Numba ``parallel=True`` region runs inside these functions: a worker of a parallel region
would contend with sgemm.  Everything takes C-contiguous float32 activations; the weight may be a
read-only mmapped view.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit

from streamexec.kernels import buffers
from streamexec.kernels.activations import _act_slice, activation_code
from streamexec.kernels.blas import blas_pinned, blas_single_threaded
from streamexec.kernels.decode import as_f32, decode_to_f32, readonly_flat
from streamexec.kernels.dequant import check_weight
from streamexec.kernels.threads import kernel_workers, parallel_items

__all__ = [
    "linear",
    "geglu",
    "gated_gelu",
    "linear_scratch_bytes",
    "linear_workers",
    "default_panel_rows",
    "panel_rows_for",
    "hidden_rows",
    "hidden_scratch_bytes",
    "geglu_scratch_bytes",
    "residual_tile_bytes",
    "HIDDEN_TARGET_BYTES",
    "MLP_MIN_ROWS",
]

# Default panel: ~12 MB of f32 per worker, a multiple of 32 rows in [128, 1024].  Each sgemm
# call re-packs all of x, so narrow panels cost time (table in BENCHMARKS.md, kernels):
# 1024 rows up to K=3072 (<= 12.6 MB), 256 rows at K=12288, 192 at K=15360.
_PANEL_TARGET_BYTES = 12 << 20
_PANEL_MIN_ROWS = 128
_PANEL_MAX_ROWS = 1024
_PANEL_ALIGN = 32
# Below this many flops and decoded weight elements the thread hand-off (plus re-creating
# OpenBLAS's threads at the next multi-threaded BLAS call) is not worth it: one thread +
# multi-threaded BLAS.
_PARALLEL_MIN_FLOP = 150e6
_PARALLEL_MIN_DECODE = 1 << 20
# While BLAS is pinned to one thread (``blas_pinned()``: the executor does it for a whole run) a
# product in the calling thread would use one core only, and there is no BLAS pool to re-create:
# only the hand-off is left.
_PARALLEL_MIN_FLOP_PINNED = 4e6
# Columns per block are multiples of this (keeps sgemm tiles whole).
_COL_ALIGN = 16
# Work is handed out dynamically in about this many blocks per worker (a worker that loses its
# core for a while — the prefetch thread mapping the next unit's weights, another process —
# no longer holds the other back, as it did with one static half each), blocks no smaller than
# these.
_ITEMS_PER_WORKER = 2
_MIN_ROW_BLOCK = 256
_MIN_COL_BLOCK = 128
# Tiles needed only when the residual/gate aliases out: bound them to this many bytes.
_TILE_TARGET_BYTES = 1 << 20
#: Default bound of a feed-forward's [rows, inner] f32 hidden intermediate: GEGLU / gated GELU
#: here, and the fused FLUX/T5 MLPs built on ``linear`` (``runtime/ops_transformer.py``).
HIDDEN_TARGET_BYTES = 32 << 20
#: ... where the fused MLPs never step fewer token rows than this by default (each step
#: re-decodes all the weight panels).
MLP_MIN_ROWS = 256

_EMPTY = np.empty(0, dtype=np.float32)
_EMPTY.flags.writeable = False

_COMBINE = {"add": 1, "mul": 2}


# --- threads --------------------------------------------------------------------------------------

_lock = threading.Lock()


def linear_workers() -> int:
    """How many threads ``linear`` spreads a large product over: ``kernel_workers()`` (Numba's
    thread count, NUMBA_NUM_THREADS, capped by the CPUs this process may use; 1 when the BLAS
    thread count cannot be controlled, then BLAS threads itself).

    It used to be OpenBLAS' current thread count; that reads 1 while the executor keeps BLAS
    pinned to one thread for a whole run, so the worker count no longer follows it.
    """
    return kernel_workers()


# --- sizes ----------------------------------------------------------------------------------------


def default_panel_rows(k: int, n: int) -> int:
    """Panel height (rows of W decoded at once per worker) for a weight of shape [n, k].

    About ``_PANEL_TARGET_BYTES`` (12 MB) of f32, a multiple of 32 rows in [128, 1024], at most n.
    """
    rows = _PANEL_TARGET_BYTES // (4 * max(1, k))
    rows = max(_PANEL_MIN_ROWS, min(_PANEL_MAX_ROWS, rows))
    rows = (rows // _PANEL_ALIGN) * _PANEL_ALIGN
    return max(1, min(n, rows))


def linear_scratch_bytes(k: int, panel_rows: int, workers: int | None = None) -> int:
    """Bytes of f32 panel scratch ``linear`` uses: ``workers * panel_rows * k * 4``.

    ``workers`` defaults to ``linear_workers()``.  Pass ``np.empty(bytes // 4, np.float32)`` as
    ``scratch`` to make the call allocation-free; a smaller scratch (>= one panel) makes linear
    use fewer workers.  F32 weights need no scratch.
    """
    if workers is None:
        workers = linear_workers()
    return 4 * k * panel_rows * max(1, workers)


def hidden_scratch_bytes(inner: int, row_chunk: int) -> int:
    """Bytes of the [row_chunk, inner] f32 intermediate of ``geglu`` / ``gated_gelu``."""
    return 4 * row_chunk * inner


def geglu_scratch_bytes(m: int, k: int, inner: int, w_dtype: str, *, row_chunk: int | None = None,
                        panel_rows: int | None = None, workers: int | None = None) -> int:
    """Bytes ``geglu`` allocates for x [m, k] and W [2 * inner, k] in ``w_dtype`` (besides
    ``out`` and the decoded bias): its hidden rows (:func:`hidden_rows`) and, for a weight that
    is decoded, the panel scratch its two half-products share."""
    total = hidden_scratch_bytes(inner, hidden_rows(m, inner, row_chunk))
    if w_dtype != "F32":
        total += linear_scratch_bytes(k, panel_rows_for(k, inner, panel_rows), workers)
    return total


def residual_tile_bytes(n: int, workers: int | None = None) -> int:
    """Bytes of the output tiles ``linear`` uses when ``out`` is ``residual`` (a residual added
    in place): about ``_TILE_TARGET_BYTES`` per worker (``workers`` defaults to
    ``linear_workers()``), plus one output row for a tile's rounding to whole rows."""
    if workers is None:
        workers = linear_workers()
    return max(1, workers) * _TILE_TARGET_BYTES + 4 * n


# --- epilogue -------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def _epilogue(src, src_ld, src_r0, src_c0, dst, dst_ld, r0, nr, c0, nc, bias, res, code, mode):
    """dst[r0+r, c0+j] = act(src[src_r0+r, src_c0+j] + bias[c0+j]) (+|*) res[r0+r, c0+j].

    Flat row-major views; ``bias``/``res`` of size 0 mean none; ``mode`` 1 adds res, 2 multiplies.
    ``res`` has the layout of ``dst`` and may be ``dst`` itself (each res element is read before
    the dst element is written).  ``src`` (the GEMM result) is overwritten with act(src + bias);
    it may be ``dst`` at the same coordinates.  Serial: it runs inside a worker.
    """
    has_bias = bias.size > 0
    has_res = res.size > 0
    for r in range(nr):
        s0 = (src_r0 + r) * src_ld + src_c0
        d0 = (r0 + r) * dst_ld + c0
        s = src[s0 : s0 + nc]
        d = dst[d0 : d0 + nc]
        if has_bias:
            b = bias[c0 : c0 + nc]
            for j in range(nc):
                s[j] += b[j]
        if code != 0:
            _act_slice(s, s, code)
        if has_res:
            q = res[d0 : d0 + nc]
            if mode == 2:
                for j in range(nc):
                    d[j] = s[j] * q[j]
            else:
                for j in range(nc):
                    d[j] = s[j] + q[j]
        elif s0 != d0 or src_ld != dst_ld:
            for j in range(nc):
                d[j] = s[j]


# --- argument checks ------------------------------------------------------------------------------


def _check_x(x: np.ndarray, k: int | None = None) -> None:
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise TypeError(f"x must be a C-contiguous float32 [M, K] array, got {x.dtype} {x.shape}")
    if k is not None and x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]}, weight has K={k}")


def _check_w(w: np.ndarray, w_dtype: str) -> None:
    # a plain [N, K] array or a block weight (GGUF/NF4/scaled fp8: kernels.dequant.PackedWeight,
    # whose row slices are views and which decode_to_f32 decodes like any other dtype), either
    # possibly wrapped with LoRA factors (kernels.lora.LoraWeight: merged into each panel)
    check_weight(w, w_dtype)


def _f32_2d(a: np.ndarray | None, shape: tuple[int, int], what: str) -> np.ndarray:
    if a is None:
        return buffers.empty(shape)
    if a.dtype != np.float32 or not a.flags.c_contiguous or a.shape != shape:
        raise ValueError(f"{what} must be a C-contiguous float32 {shape} array")
    return a


# --- the product ----------------------------------------------------------------------------------


class _Job:
    """Everything one call needs; ``run`` computes one rectangle of the output."""

    def __init__(self, x, w, w_dtype, out, bias, res, code, mode, panel, row_chunk, tiles):
        self.x, self.w, self.w_dtype, self.out = x, w, w_dtype, out
        self.k = w.shape[1]
        self.bias = _EMPTY if bias is None else readonly_flat(bias)
        self.res = _EMPTY if res is None else readonly_flat(res)
        self.code, self.mode = code, mode
        self.panel, self.row_chunk, self.tiles = panel, row_chunk, tiles
        self.need_epi = bias is not None or code != 0 or res is not None
        self.out_flat = out.reshape(-1)

    def run(self, r_lo: int, r_hi: int, c_lo: int, c_hi: int, scratch: np.ndarray | None) -> None:
        """out[r_lo:r_hi, c_lo:c_hi]: decode each panel of W once, sgemm it row chunk by chunk."""
        x, k, ld = self.x, self.k, self.out.shape[1]
        is_f32 = self.w_dtype == "F32" and isinstance(self.w, np.ndarray)
        tile = np.empty(self.row_chunk * self.panel, dtype=np.float32) if self.tiles else None
        for n0 in range(c_lo, c_hi, self.panel):
            p = min(self.panel, c_hi - n0)
            if is_f32:
                pt = self.w[n0 : n0 + p].view(np.float32).T
            else:
                pan = scratch[: p * k].reshape(p, k)
                decode_to_f32(self.w[n0 : n0 + p], self.w_dtype, pan, parallel=False)
                pt = pan.T
            for m0 in range(r_lo, r_hi, self.row_chunk):
                r = min(self.row_chunk, r_hi - m0)
                if tile is not None:
                    np.matmul(x[m0 : m0 + r], pt, out=tile[: r * p].reshape(r, p))
                    _epilogue(tile, p, 0, 0, self.out_flat, ld, m0, r, n0, p, self.bias,
                              self.res, self.code, self.mode)
                else:
                    np.matmul(x[m0 : m0 + r], pt, out=self.out[m0 : m0 + r, n0 : n0 + p])
                    if self.need_epi:
                        _epilogue(self.out_flat, ld, m0, n0, self.out_flat, ld, m0, r, n0, p,
                                  self.bias, self.res, self.code, self.mode)


def _split(m: int, n: int, parts: int) -> list[tuple[int, int, int, int]]:
    """Output rectangles (r_lo, r_hi, c_lo, c_hi), one per worker.

    Rows are split when x is at least as tall as W is wide and every worker still gets >= 512
    rows (SD's 8192x320 products: a column split makes each sgemm call too narrow, while each
    worker decoding all of W costs little at that M).  Otherwise columns are split (T5/FLUX-up
    shapes: each panel decoded once).
    Column boundaries are multiples of ``_COL_ALIGN``.
    """
    if parts <= 1:
        return [(0, m, 0, n)]
    if m >= n and m // parts >= 512:
        rb = [m * i // parts for i in range(parts + 1)]
        return [(rb[i], rb[i + 1], 0, n) for i in range(parts) if rb[i + 1] > rb[i]]
    cb = [0]
    for i in range(1, parts):
        cb.append(max(cb[-1], (n * i // parts) // _COL_ALIGN * _COL_ALIGN))
    cb.append(n)
    return [(0, m, cb[i], cb[i + 1]) for i in range(parts) if cb[i + 1] > cb[i]]


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
    combine: str = "add",
    workers: int | None = None,
) -> np.ndarray:
    """``out = act(x @ W.T + bias) + residual`` (or ``* residual``) without an f32 copy of W.

    Args:
        x: float32 [M, K], C-contiguous.
        w: [N, K] in its storage dtype (``weights.dtypes``), C-contiguous, may be read-only/mmap;
            or a block weight (``kernels.dequant.PackedWeight``: GGUF, NF4, scaled fp8).
        w_dtype: "F32", "F16", "BF16", "F8_E4M3" or "F8_E5M2", or the PackedWeight's tag.
        bias: optional [N] vector in ``bias_dtype`` (default: float32 as is, float16 -> "F16").
        out: optional float32 [M, N] destination (C-contiguous).  May be ``residual`` itself
            (in-place residual add: small per-worker tiles are then used); must not overlap x.
        row_chunk: max rows of x per sgemm call (default: all rows of a worker; with ``out is
            residual`` a ~1 MB tile).
        panel_rows: rows of W decoded per panel (default ``default_panel_rows(K, N)``).  F32
            weights are not decoded: each worker multiplies its whole column range at once.
        scratch: optional float32 buffer for the decoded panels: ``panel_rows * K`` elements per
            worker (``linear_scratch_bytes``); with less room fewer workers are used.  Without
            it each call allocates its panels (never a full-size W).
        residual: optional float32 [M, N] combined after the activation.
        activation: None, "silu", "gelu", "gelu_tanh" or "quick_gelu", applied after the bias.
        combine: "add" (residual connection) or "mul" (gating: ``act(x W^T + b) * residual``).
        workers: cap on the number of threads (default ``linear_workers()``; 1 = the calling
            thread with multi-threaded BLAS).

    Returns:
        ``out`` (or a new [M, N] array).

    Threads: with more than one worker, OpenBLAS is set to one thread for the call and its idle
    worker threads are shut down first (they would otherwise spin on a core one of our workers
    needs; OpenBLAS re-creates them on its next multi-threaded call).  Do not
    run other BLAS work from other threads at the same time.
    """
    _check_w(w, w_dtype)
    n, k = w.shape
    _check_x(x, k)
    m = x.shape[0]
    out = _f32_2d(out, (m, n), "out")
    if np.shares_memory(out, x):
        raise ValueError("out must not overlap x")
    code = activation_code(activation)
    mode = _COMBINE.get(combine)
    if mode is None:
        raise ValueError(f"combine must be 'add' or 'mul', got {combine!r}")
    bias_f = as_f32(bias, bias_dtype)
    if bias_f is not None and bias_f.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {bias_f.shape}")
    if residual is not None:
        residual = _f32_2d(residual, (m, n), "residual")
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.fill(0.0)
        job = _Job(x, w, w_dtype, out, bias_f, residual, code, mode, n, m, False)
        if job.need_epi:
            _epilogue(job.out_flat, n, 0, 0, job.out_flat, n, 0, m, 0, n, job.bias, job.res,
                      code, mode)
        return out
    is_f32 = w_dtype == "F32" and isinstance(w, np.ndarray)  # not a LoraWeight: merged per panel

    # how many workers: worth it when the product or the decode is big enough
    nw = linear_workers() if workers is None else max(1, int(workers))
    if blas_pinned():
        if 2.0 * m * n * k < _PARALLEL_MIN_FLOP_PINNED:
            nw = 1
    elif 2.0 * m * n * k < _PARALLEL_MIN_FLOP and (is_f32 or n * k < _PARALLEL_MIN_DECODE):
        nw = 1
    panel_rows = panel_rows_for(k, n, panel_rows)
    if not is_f32:
        if scratch is None:
            scratch = buffers.empty(nw * panel_rows * k)
        elif scratch.dtype != np.float32 or scratch.size < panel_rows * k:
            raise ValueError(f"scratch must be float32 with >= {panel_rows * k} elements")
        scratch = scratch.reshape(-1)
        nw = min(nw, scratch.size // (panel_rows * k))
    in_place = residual is not None and np.shares_memory(out, residual)
    if nw == 1:
        if is_f32:
            panel_rows = n
        job = _Job(x, w, w_dtype, out, bias_f, residual, code, mode, panel_rows,
                   _row_chunk(row_chunk, m, panel_rows, in_place), in_place)
        job.run(0, m, 0, n, None if is_f32 else scratch[: panel_rows * k])
        return out

    with _lock, blas_single_threaded():
        if _ITEMS_PER_WORKER <= 0:  # static: one block per worker (for comparisons)
            w_use, dtype_use = w, w_dtype
            rects = _split(m, n, nw)
            if is_f32:
                panel_rows = max(c1 - c0 for _, _, c0, c1 in rects)
        elif _rows_split(m, n, nw):
            if not is_f32 and n * k <= scratch.size:
                # W fits in the workers' scratch together: decode it once (panels in parallel),
                # then hand out row blocks as an f32 product
                wf = scratch[: n * k].reshape(n, k)
                blocks = [(c0, min(n, c0 + panel_rows)) for c0 in range(0, n, panel_rows)]
                parallel_items(len(blocks), nw, lambda _w: None,
                               lambda _st, i: decode_to_f32(w[blocks[i][0] : blocks[i][1]], w_dtype,
                                                            wf[blocks[i][0] : blocks[i][1]], parallel=False))
                w_use, dtype_use, is_f32 = wf, "F32", True
            else:
                w_use, dtype_use = w, w_dtype
            if is_f32:
                rb = max(_MIN_ROW_BLOCK, -(-m // (_ITEMS_PER_WORKER * nw)))
                rects = [(r0, min(m, r0 + rb), 0, n) for r0 in range(0, m, rb)]
                panel_rows = n
            else:  # every worker decodes all of W for its rows: one block each
                rects = _split(m, n, nw)
        else:
            w_use, dtype_use = w, w_dtype
            # a whole number of rounds of equal blocks: 5 panels on 2 workers ran 0.83 of sgemm
            # (one worker idle for the last), 6 equal ones 0.9+
            cw = panel_rows if not is_f32 else -(-n // nw)
            blocks = max(-(-n // cw), _ITEMS_PER_WORKER * nw)
            blocks = -(-blocks // nw) * nw
            cw = max(_MIN_COL_BLOCK, -(-n // blocks))
            cw = min(n, -(-cw // _COL_ALIGN) * _COL_ALIGN)
            rects = [(0, m, c0, min(n, c0 + cw)) for c0 in range(0, n, cw)]
            panel_rows = min(panel_rows, cw) if not is_f32 else cw
        job = _Job(x, w_use, dtype_use, out, bias_f, residual, code, mode, panel_rows,
                   _row_chunk(row_chunk, m, panel_rows, in_place), in_place)
        per = panel_rows * k

        def state(i: int) -> np.ndarray | None:
            return None if is_f32 else scratch[i * per : (i + 1) * per]

        parallel_items(len(rects), nw, state, lambda st, i: job.run(*rects[i], st))
    return out


def panel_rows_for(k: int, n: int, panel_rows: int | None = None) -> int:
    """The panel height ``linear`` uses for a weight of shape [n, k]: ``panel_rows`` (default
    :func:`default_panel_rows`), at most n."""
    if panel_rows is None:
        panel_rows = default_panel_rows(k, n)
    return max(1, min(int(panel_rows), n))


def hidden_rows(m: int, inner: int, row_chunk: int | None = None, *, min_rows: int = 1) -> int:
    """Rows per step of a feed-forward whose [rows, inner] f32 hidden is its intermediate
    (``geglu``, ``gated_gelu``; the fused MLPs pass ``min_rows=MLP_MIN_ROWS``): ``row_chunk``,
    by default ~``HIDDEN_TARGET_BYTES`` of hidden but at least ``min_rows``; at most ``m``."""
    if row_chunk is None:
        row_chunk = max(min_rows, HIDDEN_TARGET_BYTES // (4 * max(inner, 1)))
    return max(1, min(int(row_chunk), max(m, 1)))


def _rows_split(m: int, n: int, nw: int) -> bool:
    """Split the output by rows when x is at least as tall as W is wide and every worker still
    gets >= 512 rows (SD's 8192x320 products: 0.99 of sgemm split by rows, 0.8 by columns,
    whose sgemm calls are then too narrow); columns otherwise (T5, FLUX)."""
    return m >= n and m // nw >= 512


def _row_chunk(row_chunk: int | None, m: int, panel_rows: int, in_place: bool) -> int:
    if row_chunk is None:
        row_chunk = m
        if in_place:
            row_chunk = max(1, _TILE_TARGET_BYTES // (4 * panel_rows))
    return max(1, min(int(row_chunk), m))


# --- gated feed-forward inputs --------------------------------------------------------------------


def _hidden(hidden: np.ndarray | None, rows: int, inner: int) -> np.ndarray:
    if hidden is None:
        return buffers.empty(rows * inner)
    if hidden.dtype != np.float32 or hidden.size < rows * inner:
        raise ValueError(f"hidden must be float32 with >= {rows * inner} elements")
    return hidden.reshape(-1)


def _shared_scratch(scratch: np.ndarray | None, w_dtype: str, k: int, n: int, panel_rows: int | None):
    """One panel scratch for all the linear calls of a gated product (the calls run one after
    the other; each would otherwise allocate and page-fault its own, up to 2 x 12 MB per call:
    munmap + page faults were ~20 % of CLIP's time). Same size as one call's default."""
    if scratch is not None or w_dtype == "F32":
        return scratch
    return buffers.empty(linear_workers() * panel_rows_for(k, n, panel_rows) * k)


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
    activation: str = "gelu",
) -> np.ndarray:
    """diffusers GEGLU: ``h = x @ W.T + b`` [M, 2I]; ``a, gate = h.chunk(2, -1)``; ``a * gelu(gate)``.

    Computed as two half-products so the [M, 2I] intermediate never exists: first
    ``g = gelu(x @ W[I:].T + b[I:])`` into ``hidden`` ([row_chunk, I], reusable; see
    ``hidden_scratch_bytes``), then ``out = (x @ W[:I].T + b[:I]) * g`` with the multiply fused
    into the epilogue.  Rows go ``row_chunk`` at a time (default: ~32 MB of ``hidden``).
    """
    _check_w(w, w_dtype)
    n2, k = w.shape
    _check_x(x, k)
    if n2 % 2:
        raise ValueError(f"GEGLU projection must have an even number of rows, got {n2}")
    inner = n2 // 2
    m = x.shape[0]
    out = _f32_2d(out, (m, inner), "out")
    b = as_f32(bias, bias_dtype)
    if b is not None and b.shape != (n2,):
        raise ValueError(f"bias must have shape ({n2},), got {b.shape}")
    b_a, b_g = (None, None) if b is None else (b[:inner], b[inner:])
    rows = hidden_rows(m, inner, row_chunk)
    hid = _hidden(hidden, rows, inner)
    w_a, w_g = w[:inner], w[inner:]
    scratch = _shared_scratch(scratch, w_dtype, k, inner, panel_rows)
    for m0 in range(0, m, rows):
        r = min(rows, m - m0)
        g = hid[: r * inner].reshape(r, inner)
        xs = x[m0 : m0 + r]
        linear(xs, w_g, w_dtype, b_g, out=g, panel_rows=panel_rows, scratch=scratch,
               activation=activation)
        linear(xs, w_a, w_dtype, b_a, out=out[m0 : m0 + r], panel_rows=panel_rows,
               scratch=scratch, residual=g, combine="mul")
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

    ``act`` defaults to "gelu_tanh" (T5's "gelu_new").  ``act(x @ wi_0.T)`` goes to ``hidden``
    ([row_chunk, I], reusable), then ``x @ wi_1.T`` is multiplied by it in the epilogue.
    Rows go ``row_chunk`` at a time (default: ~32 MB of ``hidden``: all 512 T5 tokens).
    """
    _check_w(w0, w_dtype)
    w1_dtype = w1_dtype or w_dtype
    _check_w(w1, w1_dtype)
    inner, k = w0.shape
    if w1.shape != (inner, k):
        raise ValueError(f"wi_0 {w0.shape} and wi_1 {w1.shape} differ")
    _check_x(x, k)
    m = x.shape[0]
    out = _f32_2d(out, (m, inner), "out")
    rows = hidden_rows(m, inner, row_chunk)
    hid = _hidden(hidden, rows, inner)
    if w1_dtype == w_dtype:
        scratch = _shared_scratch(scratch, w_dtype, k, inner, panel_rows)
    for m0 in range(0, m, rows):
        r = min(rows, m - m0)
        g = hid[: r * inner].reshape(r, inner)
        xs = x[m0 : m0 + r]
        linear(xs, w0, w_dtype, out=g, panel_rows=panel_rows, scratch=scratch,
               activation=activation)
        linear(xs, w1, w1_dtype, out=out[m0 : m0 + r], panel_rows=panel_rows, scratch=scratch,
               residual=g, combine="mul")
    return out
