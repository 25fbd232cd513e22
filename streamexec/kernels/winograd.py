"""Winograd F(2x2, 3x3) transforms for the 3x3 stride-1 convolutions (the bulk of SD 1.5's UNet
and of every VAE): a 2x2 output tile needs 16 multiplies per (input, output) channel pair
instead of 36, so the GEMM work drops 2.25x; the transforms are linear passes over the data.

For a 4x4 input window ``d`` and a 3x3 kernel ``g`` (cross-correlation, like torch):

    V = B^T d B      (input transform,  16 values per tile and input channel)
    U = G g G^T      (weight transform, 16 values per output x input channel)
    M[xi] = sum_ci U[xi, co, ci] * V[xi, ci, tile]     16 GEMMs, one per xi = 4*i + j
    Y = A^T M A      (output transform, the 2x2 outputs)

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]

(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015). F(2, 3)'s matrices
hold only 0, +-1 and +-1/2, so the f32 rounding is that of the direct sum to within a small
factor (measured against float64 torch in ``tests/test_kernels_attention_conv.py``); the larger
F(4x4, 3x3) would save more multiplies but its transforms amplify rounding ~10x.

Layouts (all float32, C-contiguous): ``V[16, ci, t]``, ``U[16, co, ci]``, ``acc[16, co, t]`` with
tile index ``t = (n * tile_rows + ty) * tile_cols + tx``. The kernels are serial and ``nogil``:
the caller runs them on its worker threads (see ``conv.py``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from streamexec.kernels import buffers

__all__ = ["wino_buffer", "wino_buffer_bytes", "wino_input", "wino_weight", "wino_output"]

#: Extra elements between the 16 [rows, cols] slabs of a transform buffer. Each tile or kernel
#: writes (or reads) one value in every slab; with slabs a multiple of 4 KiB apart all 16 land
#: in the same L1 set (the transforms ran several times slower). One cache line of skew puts
#: them in 16 different sets.
_SLAB_SKEW = 16


def wino_buffer(rows: int, cols: int) -> np.ndarray:
    """A float32 [16, rows, cols] array whose slabs are ``rows * cols + 16`` elements apart
    (rows stay contiguous, so every ``buf[xi, :r, :c]`` is a valid sgemm operand)."""
    stride = rows * cols + _SLAB_SKEW
    flat = buffers.empty(16 * stride)
    return np.lib.stride_tricks.as_strided(flat, (16, rows, cols), (4 * stride, 4 * cols, 4))


def wino_buffer_bytes(rows: int, cols: int) -> int:
    """Bytes of :func:`wino_buffer` (rows, cols)."""
    return 4 * 16 * (rows * cols + _SLAB_SKEW)

_FM = {"contract", "reassoc", "nsz", "arcp"}  # no "fast": keeps inf/nan semantics


@njit(inline="always")
def _ld(xf, rowbase, iy_ok, ix, wu, w, up):
    """One input value: row already resolved (``rowbase`` flat offset, ``iy_ok``), column ix."""
    if not iy_ok or ix < 0 or ix >= wu:
        return np.float32(0.0)
    if up:
        ix >>= 1
    return xf[np.uint64(rowbase + ix)]


@njit(cache=True, nogil=True, fastmath=_FM)
def wino_input(x, r0, tile_rows, pt, pl, up, tile_cols, V, ci0, ci1):
    """V[xi, ci - ci0, t] = (B^T d B)[xi] for the 4x4 input window of every 2x2 output tile of
    output rows r0 .. r0 + 2*tile_rows (all images), input channels ci0 <= ci < ci1.

    ``x`` is [N, Cin, H, W] (read as its 2x nearest upsampling if ``up``), zero outside; output
    pixel (oy, ox) reads input (oy + ky - pt, ox + kx - pl). Only the rows the band needs are read.
    """
    n_img, cin, h, w = x.shape
    hu = 2 * h if up else h
    wu = 2 * w if up else w
    xf = x.reshape(-1)
    for ci in range(ci0, ci1):
        c = ci - ci0
        for n in range(n_img):
            plane = (n * cin + ci) * h * w
            for ty in range(tile_rows):
                iy0 = r0 + 2 * ty - pt
                ok0 = 0 <= iy0 < hu
                ok1 = 0 <= iy0 + 1 < hu
                ok2 = 0 <= iy0 + 2 < hu
                ok3 = 0 <= iy0 + 3 < hu
                b0 = plane + ((iy0 >> 1) if up else iy0) * w if ok0 else 0
                b1 = plane + (((iy0 + 1) >> 1) if up else iy0 + 1) * w if ok1 else 0
                b2 = plane + (((iy0 + 2) >> 1) if up else iy0 + 2) * w if ok2 else 0
                b3 = plane + (((iy0 + 3) >> 1) if up else iy0 + 3) * w if ok3 else 0
                tbase = (n * tile_rows + ty) * tile_cols
                for tx in range(tile_cols):
                    ix = 2 * tx - pl
                    d00 = _ld(xf, b0, ok0, ix, wu, w, up)
                    d01 = _ld(xf, b0, ok0, ix + 1, wu, w, up)
                    d02 = _ld(xf, b0, ok0, ix + 2, wu, w, up)
                    d03 = _ld(xf, b0, ok0, ix + 3, wu, w, up)
                    d10 = _ld(xf, b1, ok1, ix, wu, w, up)
                    d11 = _ld(xf, b1, ok1, ix + 1, wu, w, up)
                    d12 = _ld(xf, b1, ok1, ix + 2, wu, w, up)
                    d13 = _ld(xf, b1, ok1, ix + 3, wu, w, up)
                    d20 = _ld(xf, b2, ok2, ix, wu, w, up)
                    d21 = _ld(xf, b2, ok2, ix + 1, wu, w, up)
                    d22 = _ld(xf, b2, ok2, ix + 2, wu, w, up)
                    d23 = _ld(xf, b2, ok2, ix + 3, wu, w, up)
                    d30 = _ld(xf, b3, ok3, ix, wu, w, up)
                    d31 = _ld(xf, b3, ok3, ix + 1, wu, w, up)
                    d32 = _ld(xf, b3, ok3, ix + 2, wu, w, up)
                    d33 = _ld(xf, b3, ok3, ix + 3, wu, w, up)
                    # rows: B^T d
                    t00 = d00 - d20
                    t01 = d01 - d21
                    t02 = d02 - d22
                    t03 = d03 - d23
                    t10 = d10 + d20
                    t11 = d11 + d21
                    t12 = d12 + d22
                    t13 = d13 + d23
                    t20 = d20 - d10
                    t21 = d21 - d11
                    t22 = d22 - d12
                    t23 = d23 - d13
                    t30 = d10 - d30
                    t31 = d11 - d31
                    t32 = d12 - d32
                    t33 = d13 - d33
                    t = tbase + tx
                    # columns: (B^T d) B
                    V[0, c, t] = t00 - t02
                    V[1, c, t] = t01 + t02
                    V[2, c, t] = t02 - t01
                    V[3, c, t] = t01 - t03
                    V[4, c, t] = t10 - t12
                    V[5, c, t] = t11 + t12
                    V[6, c, t] = t12 - t11
                    V[7, c, t] = t11 - t13
                    V[8, c, t] = t20 - t22
                    V[9, c, t] = t21 + t22
                    V[10, c, t] = t22 - t21
                    V[11, c, t] = t21 - t23
                    V[12, c, t] = t30 - t32
                    V[13, c, t] = t31 + t32
                    V[14, c, t] = t32 - t31
                    V[15, c, t] = t31 - t33


@njit(cache=True, nogil=True, fastmath=_FM)
def wino_weight(panel, n_rows, n_ci, U):
    """U[xi, p, c] = (G g G^T)[xi] for the decoded weight rows ``panel`` ([n_rows, n_ci*9],
    row-major 3x3 kernels of input channels c)."""
    half = np.float32(0.5)
    for p in range(n_rows):
        for c in range(n_ci):
            o = c * 9
            g00 = panel[p, o]
            g01 = panel[p, o + 1]
            g02 = panel[p, o + 2]
            g10 = panel[p, o + 3]
            g11 = panel[p, o + 4]
            g12 = panel[p, o + 5]
            g20 = panel[p, o + 6]
            g21 = panel[p, o + 7]
            g22 = panel[p, o + 8]
            # rows: G g (4 x 3)
            u00, u01, u02 = g00, g01, g02
            u10 = (g00 + g10 + g20) * half
            u11 = (g01 + g11 + g21) * half
            u12 = (g02 + g12 + g22) * half
            u20 = (g00 - g10 + g20) * half
            u21 = (g01 - g11 + g21) * half
            u22 = (g02 - g12 + g22) * half
            u30, u31, u32 = g20, g21, g22
            # columns: (G g) G^T (4 x 4)
            U[0, p, c] = u00
            U[1, p, c] = (u00 + u01 + u02) * half
            U[2, p, c] = (u00 - u01 + u02) * half
            U[3, p, c] = u02
            U[4, p, c] = u10
            U[5, p, c] = (u10 + u11 + u12) * half
            U[6, p, c] = (u10 - u11 + u12) * half
            U[7, p, c] = u12
            U[8, p, c] = u20
            U[9, p, c] = (u20 + u21 + u22) * half
            U[10, p, c] = (u20 - u21 + u22) * half
            U[11, p, c] = u22
            U[12, p, c] = u30
            U[13, p, c] = (u30 + u31 + u32) * half
            U[14, p, c] = (u30 - u31 + u32) * half
            U[15, p, c] = u32


@njit(cache=True, nogil=True, fastmath=_FM)
def wino_output(acc, n_rows, tile_rows, tile_cols, n_img, r0, hout, wout, out, co0, bias, has_bias):
    """out[n, co0 + p, oy, ox] = (A^T M A) + bias for the 2x2 tiles of output rows
    r0 .. r0 + 2*tile_rows, M = acc[:, p, t]; outputs past ``hout``/``wout`` are dropped.

    ``out`` is [N, Cout, Hout * Wout] (flat rows); ``bias`` [Cout] f32 (ignored unless
    ``has_bias``)."""
    for p in range(n_rows):
        b = bias[co0 + p] if has_bias else np.float32(0.0)
        for n in range(n_img):
            for ty in range(tile_rows):
                oy = r0 + 2 * ty
                two_rows = oy + 1 < hout
                tbase = (n * tile_rows + ty) * tile_cols
                for tx in range(tile_cols):
                    t = tbase + tx
                    m0 = acc[0, p, t]
                    m1 = acc[1, p, t]
                    m2 = acc[2, p, t]
                    m3 = acc[3, p, t]
                    m4 = acc[4, p, t]
                    m5 = acc[5, p, t]
                    m6 = acc[6, p, t]
                    m7 = acc[7, p, t]
                    m8 = acc[8, p, t]
                    m9 = acc[9, p, t]
                    m10 = acc[10, p, t]
                    m11 = acc[11, p, t]
                    m12 = acc[12, p, t]
                    m13 = acc[13, p, t]
                    m14 = acc[14, p, t]
                    m15 = acc[15, p, t]
                    # A^T M (2 x 4)
                    s0 = m0 + m4 + m8
                    s1 = m1 + m5 + m9
                    s2 = m2 + m6 + m10
                    s3 = m3 + m7 + m11
                    q0 = m4 - m8 - m12
                    q1 = m5 - m9 - m13
                    q2 = m6 - m10 - m14
                    q3 = m7 - m11 - m15
                    ox = 2 * tx
                    o = oy * wout + ox
                    out[n, co0 + p, o] = s0 + s1 + s2 + b
                    if ox + 1 < wout:
                        out[n, co0 + p, o + 1] = s1 - s2 - s3 + b
                    if two_rows:
                        out[n, co0 + p, o + wout] = q0 + q1 + q2 + b
                        if ox + 1 < wout:
                            out[n, co0 + p, o + wout + 1] = q1 - q2 - q3 + b
