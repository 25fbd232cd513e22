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

Why BLAS for the two products: sgemm runs these block shapes near its peak, and the softmax pass
is a separate vectorised pass over an L2-resident block costing a small fraction of the 4*D GEMM
flops per score (numbers in BENCHMARKS.md, kernels).

Parallelism: the (head, query-tile) items are spread over the kernels' worker threads
(``threads.parallel_items``), each running single-threaded sgemm and ``nogil`` Numba kernels on
its own scratch while OpenBLAS is held on one thread (``blas.blas_single_threaded``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from streamexec.kernels import buffers
from streamexec.kernels.blas import blas_single_threaded
from streamexec.kernels.scalar import SOFTMAX_FM, exp_neg_f32, fmax_f32
from streamexec.kernels.threads import kernel_workers, parallel_items, parallel_min_flops

__all__ = [
    "attention",
    "attention_scratch_bytes",
    "attention_tiles",
    "default_tiles",
    "rel_bias_scratch_bytes",
]

#: Score block budget (elements) for the default tiles: 512 K f32 = 2 MB per worker.
_SCORE_BLOCK_ELEMS = 512 * 1024

#: Zeros after each head's relative-bias row: the softmax select loops read up to 16 past the end.
_BIAS_TAIL = 16


# ============================================================================================
# kernels (single-threaded, nogil: parallelism comes from the worker threads)
# ============================================================================================


@njit(cache=True, nogil=True, fastmath=SOFTMAX_FM)
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
                mx = fmax_f32(mx, S[r, c] * scale + bias[off + np.uint64(c)])
        else:
            for c in range(nv):
                mx = fmax_f32(mx, S[r, c] * scale)
        mo = m[r]
        mn = fmax_f32(mo, mx)
        if mn == neg_inf:  # nothing unmasked yet in this row
            for c in range(tjp):
                S[r, c] = zero
            alpha[r] = np.float32(1.0)
            continue
        a = exp_neg_f32(mo - mn)
        tot = zero
        if has_bias:
            for c in range(nv):
                p = exp_neg_f32(S[r, c] * scale + bias[off + np.uint64(c)] - mn)
                S[r, c] = p
                tot += p
        else:
            for c in range(nv):
                p = exp_neg_f32(S[r, c] * scale - mn)
                S[r, c] = p
                tot += p
        for c in range(nv, tjp):  # causal: masked keys (BLAS reads these as P = 0)
            S[r, c] = zero
        l[r] = l[r] * a + tot
        m[r] = mn
        alpha[r] = a


@njit(cache=True, nogil=True, fastmath=SOFTMAX_FM)
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


@njit(cache=True, nogil=True, fastmath=SOFTMAX_FM)
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

    Query tiles of 1024-2048 with key tiles of 256-512 run single-threaded sgemm near its peak
    for SD 1.5, FLUX and T5 attention shapes; short query tiles lose a lot (BENCHMARKS.md,
    kernels). A key tile covering a short key sequence (cross-attention, 77 text tokens) skips the
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
