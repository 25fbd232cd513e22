"""Tiled multi-head attention with an online softmax (flash-attention style), in f32.

Layout is exactly what a linear projection produces: ``q`` is ``[Nq, H, D]`` and ``k``/``v`` are
``[Nk, H, D]`` (a ``[N, H*D]`` matrix reshaped, no transposes). For every head and every block of
``q_tile`` queries we walk the keys in blocks of ``k_tile``:

    S = q_blk @ k_blk.T                      BLAS sgemm on strided views (no copies)
    S = S*scale (+ bias) (masked)            Numba; running max m and running sum l per query
    P = exp(S - m_new)                       vectorised polynomial exp (no SVML, no AVX needed)
    acc = acc*exp(m_old - m_new) + P @ v_blk BLAS sgemm + Numba combine

so the working set is one ``q_tile x k_tile`` score block plus two ``q_tile x D`` blocks per
worker — never the ``Nq x Nk`` score matrix (FLUX at 1024^2, 4608 tokens x 24 heads: 2 GB).

Why BLAS for the two products: OpenBLAS sgemm runs these block shapes at 85-100 GFLOP/s per core;
the softmax pass costs ~0.3 ns per score against 4*D GEMM flops per score, so a separate
vectorised pass over an L2-resident block costs 5-25 % depending on D.

Parallelism — why worker threads and not ``prange``: the (head, query-tile) items are spread
over a small pool of Python threads, each running single-threaded sgemm and single-threaded
``nogil`` Numba kernels on its own scratch. Measured on the 2-core EPYC: alternating OpenBLAS'
thread pool with Numba's OpenMP pool inside every block costs 3-30x (both pools spin-wait for the
same two cores), while independent workers need no barrier per block at all and keep running
when another process steals a core. OpenBLAS' thread count is process-global in the pthreads
build numpy ships (``openblas_set_num_threads_local`` changes it for every thread), so
:func:`blas_single_threaded` sets it to 1 for the duration of the call and restores it, and parks
OpenBLAS' pool meanwhile (its idle threads otherwise spin ~0.1 s after every multi-threaded sgemm
and took a core from the workers: conv ran at 0.45-0.67 of its speed right after a 2-thread sgemm).
If the BLAS library offers no such control the kernels run in the calling thread with BLAS' own
threads. Calls below ``PARALLEL_MIN_FLOPS`` also run in the calling thread (hand-off costs more).
The helpers here (:func:`blas_single_threaded`, :func:`parallel_items`, :func:`kernel_workers`)
are shared with ``conv.py``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from streamexec.kernels import buffers

__all__ = [
    "attention",
    "attention_scratch_bytes",
    "attention_tiles",
    "blas_pinned",
    "blas_single_threaded",
    "default_tiles",
    "kernel_workers",
    "parallel_items",
    "parallel_min_flops",
    "rel_bias_scratch_bytes",
]

#: Fast-math flags for the softmax kernels. ``nnan`` lets LLVM vectorise the max reduction
#: (``llvm.maxnum``); ``ninf`` is deliberately absent because masked scores are -inf.
_FM = {"reassoc", "contract", "nsz", "arcp", "nnan"}

#: Score block budget (elements) for the default tiles: 512 K f32 = 2 MB per worker.
_SCORE_BLOCK_ELEMS = 512 * 1024

#: Zeros after each head's relative-bias row: the softmax select loops read up to 16 past the end.
_BIAS_TAIL = 16

#: Below this many flops a call runs in the calling thread: handing items to workers and
#: parking/re-creating BLAS' pool costs ~0.1-0.4 ms (CLIP's 77-token attention: 0.36 ms in
#: one thread, 0.76 ms on two workers).
PARALLEL_MIN_FLOPS = 3e7
#: The same threshold while BLAS is pinned to one thread (:func:`blas_pinned`, the executor
#: does it for a whole run): then there is no BLAS pool to park or re-create, the hand-off to
#: the workers is all that is left (~30-60 us), and below this the calling thread alone would
#: not use the second core at all (BLAS runs on one thread).
PARALLEL_MIN_FLOPS_PINNED = 4e6


# ============================================================================================
# threading helpers (shared with conv.py)
# ============================================================================================


class _BlasControl:
    """ctypes handles on the OpenBLAS numpy uses: thread count get/set, pool shutdown."""

    def __init__(self, lib: ctypes.CDLL, set_name: str, get_name: str) -> None:
        self.set_threads = getattr(lib, set_name)
        self.set_threads.argtypes = [ctypes.c_int]
        self.set_threads.restype = None
        self.get_threads = getattr(lib, get_name)
        self.get_threads.argtypes = []
        self.get_threads.restype = ctypes.c_int
        # pthreads builds: stops the pool's threads; the next multi-threaded call (or
        # set_num_threads > 1) re-creates them (the same lazy re-init OpenBLAS uses after fork)
        self.shutdown = getattr(lib, "blas_thread_shutdown_", None)
        if self.shutdown is not None:
            self.shutdown.argtypes = []
            self.shutdown.restype = ctypes.c_int
        # cblas_sgemm with beta (numpy's matmul cannot accumulate into C): only the symbols
        # whose integer width is known from the name (ILP64 "64_" suffix, scipy-openblas32)
        self.sgemm = None
        for name, blasint in (("scipy_cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm64_", ctypes.c_int64),
                              ("scipy_cblas_sgemm", ctypes.c_int32)):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = None
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, blasint, blasint, blasint, ctypes.c_float,
                               ctypes.c_void_p, blasint, ctypes.c_void_p, blasint, ctypes.c_float, ctypes.c_void_p,
                               blasint]
                self.sgemm = fn
                break


def _find_blas_thread_control() -> _BlasControl | None:
    """Control of the OpenBLAS numpy uses, or None if numpy's BLAS is something else."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                p = line.split()[-1]
                if "openblas" in os.path.basename(p).lower() and p not in paths:
                    paths.append(p)
    except OSError:
        pass
    libdir = os.path.dirname(np.__file__) + ".libs"
    if os.path.isdir(libdir):
        paths += [os.path.join(libdir, f) for f in sorted(os.listdir(libdir)) if "openblas" in f.lower()]
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in (
            ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"),
        ):
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                return _BlasControl(lib, set_name, get_name)
    return None


_BLAS_CTL: _BlasControl | None | bool = False
_BLAS_LOCK = threading.Lock()
_BLAS_DEPTH = 0
_BLAS_SAVED = 1

#: Stop OpenBLAS' pool threads while our workers run. After a multi-threaded sgemm, OpenBLAS'
#: idle threads spin for 2**28 cycles (~0.1 s; OPENBLAS_THREAD_TIMEOUT, read once at load)
#: before sleeping; measured: a conv right after a 2-thread sgemm ran at 0.45-0.67 of its
#: speed. Shutting the pool down costs ~50 us per call, the pool is re-created on exit.
PARK_BLAS_POOL = True


def _blas_ctl() -> _BlasControl | None:
    global _BLAS_CTL
    if _BLAS_CTL is False:
        _BLAS_CTL = _find_blas_thread_control()
    return _BLAS_CTL  # type: ignore[return-value]


@contextmanager
def blas_single_threaded() -> Iterator[bool]:
    """Make OpenBLAS single-threaded while the block runs (re-entrant, restores on exit).

    Yields True if BLAS threading is under control (then it is safe to call sgemm from several
    worker threads at once), False otherwise. Process-global: a BLAS call made by some other
    thread meanwhile also runs on one thread, and none may be running multi-threaded when the
    block is entered (the pool is shut down, see ``PARK_BLAS_POOL``).
    """
    global _BLAS_DEPTH, _BLAS_SAVED
    ctl = _blas_ctl()
    if ctl is None:
        yield False
        return
    with _BLAS_LOCK:
        if _BLAS_DEPTH == 0:
            _BLAS_SAVED = max(1, int(ctl.get_threads()))
            ctl.set_threads(1)
            if PARK_BLAS_POOL and _BLAS_SAVED > 1 and ctl.shutdown is not None:
                ctl.shutdown()
        _BLAS_DEPTH += 1
    try:
        yield True
    finally:
        with _BLAS_LOCK:
            _BLAS_DEPTH -= 1
            if _BLAS_DEPTH == 0:
                ctl.set_threads(_BLAS_SAVED)


def blas_pinned() -> bool:
    """True while some caller holds :func:`blas_single_threaded` (BLAS is on one thread and
    its pool is parked): kernels then parallelise even small calls on their own workers, since
    BLAS' own threads are not available to them and re-creating them costs 3-25 ms."""
    return _BLAS_DEPTH > 0


def parallel_min_flops() -> float:
    """Flops below which a kernel call runs in the calling thread (see ``PARALLEL_MIN_FLOPS``)."""
    return PARALLEL_MIN_FLOPS_PINNED if _BLAS_DEPTH > 0 else PARALLEL_MIN_FLOPS


_SGEMM_OK: bool | None = None


def _cblas_sgemm():
    """The BLAS ``cblas_sgemm`` (checked once on a small product), or None."""
    global _SGEMM_OK
    ctl = _blas_ctl()
    fn = None if ctl is None else ctl.sgemm
    if fn is None:
        return None
    if _SGEMM_OK is None:
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((5, 7), dtype=np.float32), rng.standard_normal((7, 9), dtype=np.float32)
        c = np.ones((5, 12), np.float32)
        fn(101, 111, 111, 5, 9, 7, 1.0, a.ctypes.data, 7, b.ctypes.data, 9, 1.0, c.ctypes.data, 12)
        want = a.astype(np.float64) @ b.astype(np.float64) + 1.0
        _SGEMM_OK = bool(np.allclose(c[:, :9], want, rtol=1e-5, atol=1e-5) and np.all(c[:, 9:] == 1.0))
    return fn if _SGEMM_OK else None


def sgemm_into(a: np.ndarray, b: np.ndarray, c: np.ndarray, accumulate: bool) -> None:
    """``c = a @ b`` or ``c += a @ b`` (float32 2-D views with unit inner stride, any row
    stride; ``c`` must not overlap ``a``/``b``): cblas_sgemm with beta 0 or 1, so a K-split
    product accumulates in place. Without a usable cblas_sgemm: numpy matmul (+ an add)."""
    fn = _cblas_sgemm()
    m, k = a.shape
    n = b.shape[1]
    if fn is not None and m and n and k and a.strides[1] == b.strides[1] == c.strides[1] == 4:
        fn(101, 111, 111, m, n, k, 1.0, a.ctypes.data, a.strides[0] // 4, b.ctypes.data, b.strides[0] // 4,
           1.0 if accumulate else 0.0, c.ctypes.data, c.strides[0] // 4)
    elif accumulate:
        c += a @ b
    else:
        np.matmul(a, b, out=c)


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def kernel_workers() -> int:
    """Worker threads the kernels use: ``numba.get_num_threads()`` (NUMBA_NUM_THREADS), capped
    by the CPUs this process may run on; 1 if BLAS threading cannot be controlled."""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ncpu = os.cpu_count() or 1
    n = max(1, min(int(numba.get_num_threads()), ncpu))
    if n > 1 and _blas_ctl() is None:
        return 1
    return n


def _pool(n_extra: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < n_extra:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=n_extra, thread_name_prefix="streamexec-k")
            _POOL_SIZE = n_extra
        return _POOL


def parallel_items(
    n_items: int,
    n_workers: int,
    make_state: Callable[[int], object],
    work: Callable[[object, int], None],
) -> None:
    """Run ``work(state, item)`` for item in range(n_items) on ``n_workers`` threads.

    Items are handed out dynamically (a shared counter), so a worker that loses its core to
    another process does not hold the others back. ``make_state(worker_index)`` builds each
    worker's private scratch once. The calling thread is worker 0. With ``n_workers > 1`` the
    caller must hold :func:`blas_single_threaded`. Exceptions propagate to the caller.
    """
    n_workers = max(1, min(n_workers, n_items))
    if n_workers == 1:
        st = make_state(0)
        for it in range(n_items):
            work(st, it)
        return
    lock = threading.Lock()
    nxt = [0]
    failed: list[BaseException] = []

    def take() -> int:
        with lock:
            it = nxt[0]
            if it >= n_items or failed:
                return -1
            nxt[0] = it + 1
            return it

    def loop(w: int) -> None:
        it = take()
        if it < 0:  # a late worker: nothing left, allocate no scratch
            return
        st = make_state(w)
        while it >= 0:
            try:
                work(st, it)
            except BaseException as e:  # stop the others, re-raise in the caller
                with lock:
                    failed.append(e)
                raise
            it = take()

    futs = [_pool(n_workers - 1).submit(loop, w) for w in range(1, n_workers)]
    try:
        loop(0)
    finally:
        for f in futs:
            f.exception()  # wait for all (avoids scratch being freed under a running worker)
    if failed:
        raise failed[0]


# ============================================================================================
# scalar helpers (inlined into the kernels)
# ============================================================================================


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret an int32 bit pattern as float32 (an LLVM bitcast; vectorises)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _fmax(typingctx, a, b):
    """``llvm.maxnum.f32``: unlike Python ``max`` this lets LLVM vectorise max reductions."""
    sig = types.float32(types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.maxnum", [f], ir.FunctionType(f, [f, f]))
        return builder.call(fn, args)

    return sig, codegen


@njit(inline="always", fastmath=_FM)
def _expf(x):
    """exp(x) for x <= 0 in float32 (Cephes expf, ~1 ulp); exactly 0 below -88 and for -inf.

    Branch-free so LLVM vectorises it (Numba has no vector exp without SVML). Results that
    would be denormal are flushed to 0 — harmless for softmax weights.
    """
    x = _fmax(x, np.float32(-88.0))
    n = -np.int32(np.float32(0.5) - x * np.float32(1.4426950408889634))  # round(x/ln2), x <= 0
    fn = np.float32(n)
    r = x - fn * np.float32(0.693359375)
    r = r - fn * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _bits_to_f32((n + np.int32(127)) << np.int32(23))  # * 2**n (n=-127 -> 0)


# ============================================================================================
# kernels (single-threaded, nogil: parallelism comes from the worker threads)
# ============================================================================================


@njit(cache=True, nogil=True, fastmath=_FM)
def _softmax_block(S, ti, tj, scale, m, l, alpha, i0, j0, causal, bias, boff):
    """Online-softmax update of one score block, in place.

    S[:ti, :tj] holds q.k for queries i0.. and keys j0..; on return it holds
    P = exp(scale*S + bias - m_new) (0 where masked), and per row: alpha = exp(m_old - m_new),
    m = m_new, l = l*alpha + sum(P). ``bias`` is this head's compact relative-bias row, padded
    with >= 16 trailing zeros (length 0: no bias); score(i, j) += bias[j - i + boff].

    Without a causal mask rows are processed over ``tj`` rounded up to 16 columns (S's row
    stride is padded for that), the pad columns set to -inf first: the loops then have no
    scalar remainder, which for 77 text tokens cost more than the vector body. The pad columns
    are outside the ``[:ti, :tj]`` view BLAS reads and writes. The bias is indexed with an
    unsigned offset (j - i + boff >= 0): Numba's wraparound check on a signed index would
    keep the loop scalar (measured 10x slower).
    """
    has_bias = bias.shape[0] > 0
    neg_inf = np.float32(-np.inf)
    zero = np.float32(0.0)
    tjp = tj
    if not causal and scale > 0:
        tjp = min(S.shape[1], (tj + 15) // 16 * 16)
    for r in range(ti):
        i = i0 + r
        for c in range(tj, tjp):
            S[r, c] = neg_inf
        nv = tjp
        if causal:
            nv = min(tj, max(0, i - j0 + 1))
        off = np.uint64(j0 - i + boff) if has_bias else np.uint64(0)
        mx = neg_inf
        if has_bias:
            for c in range(nv):
                mx = _fmax(mx, S[r, c] * scale + bias[off + np.uint64(c)])
        else:
            for c in range(nv):
                mx = _fmax(mx, S[r, c] * scale)
        mo = m[r]
        mn = _fmax(mo, mx)
        if mn == neg_inf:  # nothing unmasked yet in this row
            for c in range(tjp):
                S[r, c] = zero
            alpha[r] = np.float32(1.0)
            continue
        a = _expf(mo - mn)
        tot = zero
        if has_bias:
            for c in range(nv):
                p = _expf(S[r, c] * scale + bias[off + np.uint64(c)] - mn)
                S[r, c] = p
                tot += p
        else:
            for c in range(nv):
                p = _expf(S[r, c] * scale - mn)
                S[r, c] = p
                tot += p
        for c in range(nv, tjp):  # causal: masked keys (BLAS reads these as P = 0)
            S[r, c] = zero
        l[r] = l[r] * a + tot
        m[r] = mn
        alpha[r] = a


@njit(cache=True, nogil=True, fastmath=_FM)
def _combine(acc, tmp, alpha, ti, out, i0, h, l, final):
    """acc = acc*alpha + tmp for the first ti rows; if ``final``: out[i0+r, h] = that / l."""
    d = acc.shape[1]
    for r in range(ti):
        a = alpha[r]
        if final:
            inv = np.float32(0.0)
            if l[r] > 0:
                inv = np.float32(1.0) / l[r]
            for c in range(d):
                out[i0 + r, h, c] = (acc[r, c] * a + tmp[r, c]) * inv
        else:
            for c in range(d):
                acc[r, c] = acc[r, c] * a + tmp[r, c]


@njit(cache=True, nogil=True, fastmath=_FM)
def _finish(acc, ti, out, i0, h, l):
    """out[i0+r, h] = acc[r] / l[r] (rows that saw no unmasked key give 0)."""
    d = acc.shape[1]
    for r in range(ti):
        inv = np.float32(0.0)
        if l[r] > 0:
            inv = np.float32(1.0) / l[r]
        for c in range(d):
            out[i0 + r, h, c] = acc[r, c] * inv


# ============================================================================================
# public API
# ============================================================================================


def default_tiles(nq: int, nk: int, d: int, h: int = 1, workers: int = 1) -> tuple[int, int]:
    """Default (q_tile, k_tile): a ~2 MB score block per worker, 512 keys x 1024 queries.

    Measured on a 2-core EPYC (single-threaded sgemm per worker, D = 40..128): query tiles of
    1024-2048 with key tiles of 256-512 ran at 140-178 GFLOP/s for SD 1.5 (4096 tokens, D=40),
    FLUX (1536 tokens, D=128) and T5 (512 tokens, 64 heads); 64-128 query rows lose 10-40 %.
    A key tile covering a short key sequence (cross-attention, 77 text tokens) skips the
    online rescale, and the query tile then grows to amortise per-block overhead — but not so
    far that there are fewer than ~4 (head, query-tile) items per worker to balance.
    """
    del d
    k_tile = max(1, min(nk, 512))
    q_tile = max(1, min(nq, _SCORE_BLOCK_ELEMS // k_tile, 4096))
    want_items = 4 * max(1, workers)
    per_head = -(-want_items // max(1, h))
    if per_head > 1 and nq > 64:
        q_tile = max(32, min(q_tile, -(-nq // per_head)))
    return min(q_tile, max(nq, 1)), k_tile


def attention_tiles(nq: int, nk: int, d: int, h: int = 1, q_tile: int | None = None, k_tile: int | None = None,
                    workers: int | None = None) -> tuple[int, int]:
    """The (q_tile, k_tile) :func:`attention` runs with: the given tiles or
    :func:`default_tiles`, clamped to 1..Nq and 1..Nk. ``workers`` defaults to
    :func:`kernel_workers`."""
    dq, dk = default_tiles(nq, nk, d, h, kernel_workers() if workers is None else workers)
    return max(1, min(int(q_tile or dq), nq)), max(1, min(int(k_tile or dk), nk))


def rel_bias_scratch_bytes(h: int, nq: int, nk: int) -> int:
    """Bytes of the zero-padded copy of a ``rel_bias`` [H, Nq + Nk - 1] that :func:`attention`
    makes (the select loops read past each row's end)."""
    return 4 * h * (nq + nk - 1 + _BIAS_TAIL)


def attention_scratch_bytes(h: int, d: int, q_tile: int, k_tile: int, workers: int | None = None) -> int:
    """Bytes of scratch :func:`attention` allocates for these tiles (independent of Nq, Nk).

    Per worker thread: one q_tile x k_tile score block, two q_tile x D blocks (accumulator and
    P@V result) and three q_tile vectors (running max, running sum, rescale factor). Heads
    share it (``h`` is accepted for the planner's convenience). ``workers`` defaults to
    :func:`kernel_workers`. Does not include ``out`` nor OpenBLAS' own packing buffers
    (allocated once per process at BLAS start-up).
    """
    del h
    n = kernel_workers() if workers is None else max(1, int(workers))
    return n * 4 * (q_tile * k_tile + 2 * q_tile * d + 3 * q_tile)


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float,
    *,
    causal: bool = False,
    rel_bias: np.ndarray | None = None,
    q_tile: int | None = None,
    k_tile: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """softmax(scale * q.k^T + bias, masked) @ v per head, never materialising Nq x Nk.

    Args:
        q: ``[Nq, H, D]`` float32 (a projection's ``[Nq, H*D]`` output reshaped). Any strides
            with a unit last stride work; C-contiguous is what the caller normally has.
        k, v: ``[Nk, H, D]`` float32, same rules. Nk may differ from Nq (cross-attention).
        scale: multiplies q.k (1/sqrt(D) for CLIP/UNet/FLUX, 1.0 for T5).
        causal: CLIP mask — key j > query i is masked out.
        rel_bias: optional ``[H, Nq + Nk - 1]`` float32; score(i, j) of head h gets
            ``rel_bias[h, j - i + Nq - 1]`` added (T5's bucketed relative bias, O(N) not O(N^2)).
        q_tile, k_tile: block sizes; default :func:`default_tiles`. Scratch is
            :func:`attention_scratch_bytes` of these, whatever Nq and Nk are.
        out: optional ``[Nq, H, D]`` float32 C-contiguous destination (must not overlap q/k/v).

    Returns:
        ``out`` (allocated if not given). Query rows whose every key is masked come out as 0
        (torch gives NaN there).
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError("attention expects q [Nq,H,D], k/v [Nk,H,D]")
    nq, nh, d = q.shape
    nk = k.shape[0]
    if k.shape != (nk, nh, d) or v.shape != (nk, nh, d):
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.dtype != np.float32:
            raise TypeError(f"{name} must be float32, got {a.dtype}")
    if out is None:
        out = np.empty((nq, nh, d), np.float32)
    elif out.shape != (nq, nh, d) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 [Nq, H, D] array")
    if nq == 0 or nh == 0 or d == 0:
        return out
    if nk == 0:
        out[...] = 0.0
        return out
    if rel_bias is not None:
        if rel_bias.shape != (nh, nq + nk - 1):
            raise ValueError(f"rel_bias must be [H, Nq+Nk-1] = {(nh, nq + nk - 1)}")
        padded = np.zeros((nh, nq + nk - 1 + _BIAS_TAIL), np.float32)  # tail read by the select loops
        padded[:, : nq + nk - 1] = rel_bias
        rel_bias = padded
    no_bias = np.empty(0, np.float32)
    boff = nq - 1

    workers = kernel_workers()
    tq, tk = attention_tiles(nq, nk, d, nh, q_tile, k_tile, workers)
    scale32 = np.float32(scale)
    tk_pad = (tk + 15) // 16 * 16
    n_qt = -(-nq // tq)
    n_items = nh * n_qt

    def make_state(_w: int) -> tuple[np.ndarray, ...]:
        return (
            buffers.empty((tq, tk_pad)),  # S / P block, row stride padded to 16
            np.empty((tq, d), np.float32),  # acc
            np.empty((tq, d), np.float32),  # P @ v of the current block
            np.empty(tq, np.float32),  # running max
            np.empty(tq, np.float32),  # running sum
            np.empty(tq, np.float32),  # rescale factor
        )

    def work(state: tuple[np.ndarray, ...], item: int) -> None:
        S, acc, tmp, m, l, alpha = state
        h, qt = divmod(item, n_qt)
        i0 = qt * tq
        i1 = min(nq, i0 + tq)
        ti = i1 - i0
        bias_h = rel_bias[h] if rel_bias is not None else no_bias
        qb = q[i0:i1, h, :]
        kh = k[:, h, :]
        vh = v[:, h, :]
        m[:ti] = -np.inf
        l[:ti] = 0.0
        jend = min(nk, i1) if causal else nk  # causal: keys past the last query are all masked
        starts = range(0, jend, tk)
        last_j0 = starts[-1]
        for j0 in starts:
            j1 = min(jend, j0 + tk)
            sv = S[:ti, : j1 - j0]
            np.matmul(qb, kh[j0:j1].T, out=sv)
            _softmax_block(S, ti, j1 - j0, scale32, m, l, alpha, i0, j0, causal, bias_h, boff)
            if j0 == 0:
                np.matmul(sv, vh[j0:j1], out=acc[:ti])
                if j0 == last_j0:
                    _finish(acc, ti, out, i0, h, l)
            else:
                np.matmul(sv, vh[j0:j1], out=tmp[:ti])
                _combine(acc, tmp, alpha, ti, out, i0, h, l, j0 == last_j0)

    if workers > 1 and n_items > 1 and 4.0 * nq * nk * d * nh >= parallel_min_flops():
        with blas_single_threaded():
            parallel_items(n_items, workers, make_state, work)
    else:
        parallel_items(n_items, 1, make_state, work)
    return out
