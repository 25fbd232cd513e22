"""Normalisations: GroupNorm (whole, or stats + apply for banded / spilled maps), LayerNorm with
FLUX AdaLN modulation, RMSNorm (T5, FLUX q/k).  Numba, multi-threaded, f32 in / f32 out.

All inputs are **C-contiguous float32** (read-only is fine); statistics accumulate in float64:

* GroupNorm statistics are one pass over x (sum and sum of squares in f64, then
  ``var = E[x^2] - mean^2``; f64 keeps that exact enough for any activation map we meet:
  error ~1e-16 * mean^2/var relative).  Apply: ``(x - mean) * (rstd * gamma[c]) + beta[c]``.
* LayerNorm: two passes over each row in cache (mean, then centred sum of squares), f64.
* RMSNorm: ``x * rsqrt(mean(x^2) + eps) * weight`` like torch.nn.RMSNorm / T5LayerNorm, with the
  mean of squares in f64 (torch uses f32: results agree to ~1 ulp).

Reductions use ``fastmath={"reassoc"}`` only (so they vectorise); the GroupNorm apply pass uses
``{"contract"}`` (FMA fusion: ``(x - mean) * scale + shift`` and the fused SiLU); the rest is strict.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from streamexec.kernels import buffers
from streamexec.kernels._serial import run as _run
from streamexec.kernels.activations import silu_f32
from streamexec.kernels.decode import readonly_flat

__all__ = [
    "group_norm",
    "group_norm_stats",
    "group_norm_accumulate",
    "group_norm_finalize",
    "group_norm_apply",
    "layer_norm",
    "rms_norm",
]

_EMPTY = np.empty(0, dtype=np.float32)
_EMPTY.flags.writeable = False
_F1 = np.float32(1.0)

# Default band for group_norm_stats over big (e.g. memmapped) maps: ~32 MB of rows per band.
_BAND_BYTES = 32 << 20


# --- reductions ---------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _sum_sumsq_f64(a):
    s = 0.0
    q = 0.0
    for i in range(a.size):
        v = np.float64(a[i])
        s += v
        q += v * v
    return s, q


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _sum_f64(a):
    s = 0.0
    for i in range(a.size):
        s += np.float64(a[i])
    return s


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _sum_sq_dev_f64(a, mean):
    s = 0.0
    for i in range(a.size):
        d = np.float64(a[i]) - mean
        s += d * d
    return s


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _sum_sq_f64(a):
    s = 0.0
    for i in range(a.size):
        v = np.float64(a[i])
        s += v * v
    return s


# --- GroupNorm ----------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _gn_accumulate(x, n, c, h, w, h0, h1, groups, acc):
    """acc[ni, g] += (sum, sumsq) over rows h0:h1 of the channels of group g; x flat [n,c,h,w]."""
    cpg = c // groups
    plane = h * w
    for item in prange(n * groups):
        ni = item // groups
        g = item % groups
        s = 0.0
        q = 0.0
        for ci in range(g * cpg, (g + 1) * cpg):
            base = (ni * c + ci) * plane
            a, b = _sum_sumsq_f64(x[base + h0 * w : base + h1 * w])
            s += a
            q += b
        acc[item, 0] += s
        acc[item, 1] += q


@njit(cache=True, nogil=True, error_model="numpy", parallel=True, fastmath={"contract"})
def _gn_apply(x, out, n, c, plane, groups, mean, rstd, gamma, beta, silu):
    """out plane (ni, ci) = (x - mean[ni,g]) * rstd[ni,g]*gamma[ci] + beta[ci] (+ SiLU)."""
    cpg = c // groups
    has_g = gamma.size > 0
    has_b = beta.size > 0
    for item in prange(n * c):
        ni = item // c
        ci = item % c
        g = ci // cpg
        mu = np.float32(mean[ni * groups + g])
        sc = rstd[ni * groups + g] * (gamma[ci] if has_g else _F1)
        sh = beta[ci] if has_b else np.float32(0.0)
        src = x[item * plane : (item + 1) * plane]
        dst = out[item * plane : (item + 1) * plane]
        for i in range(plane):
            dst[i] = (src[i] - mu) * sc + sh
        if silu:
            for i in range(plane):
                dst[i] = silu_f32(dst[i])


def _as4d(x: np.ndarray, what: str = "x") -> np.ndarray:
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise TypeError(f"{what} must be a C-contiguous float32 array, got {x.dtype}")
    if x.ndim == 3:
        return x.reshape(1, *x.shape)
    if x.ndim != 4:
        raise ValueError(f"{what} must be [N, C, H, W] or [C, H, W], got shape {x.shape}")
    return x


def _vec(v: np.ndarray | None, n: int, what: str) -> np.ndarray:
    if v is None:
        return _EMPTY
    v = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
    if v.size != n:
        raise ValueError(f"{what} must have {n} elements, got {v.size}")
    return readonly_flat(v)


def group_norm_accumulate(x_band: np.ndarray, num_groups: int, acc: np.ndarray | None = None,
                          rows: tuple[int, int] | None = None) -> np.ndarray:
    """Add the per-(n, group) ``(sum, sum of squares)`` of a band of rows to ``acc``.

    Args:
        x_band: float32 [N, C, h, W] or [C, h, W], C-contiguous (a band read back from a spill
            file, or a whole map/memmap together with ``rows``).
        num_groups: G (C % G == 0).
        acc: float64 [N*G, 2] accumulator (new zeros when None); updated in place.
        rows: optional (h0, h1): only rows h0:h1 of x_band are read (no copy, no temporary).

    Returns:
        ``acc``.  Finish with ``group_norm_finalize(acc, count_per_group, eps)`` where the count
        is ``(C // G) * H * W`` summed over all bands.
    """
    x4 = _as4d(x_band, "x_band")
    n, c, h, w = x4.shape
    if c % num_groups:
        raise ValueError(f"C={c} not divisible by num_groups={num_groups}")
    if acc is None:
        acc = np.zeros((n * num_groups, 2), dtype=np.float64)
    elif acc.shape != (n * num_groups, 2) or acc.dtype != np.float64:
        raise ValueError(f"acc must be float64 [{n * num_groups}, 2]")
    h0, h1 = (0, h) if rows is None else rows
    if not 0 <= h0 <= h1 <= h:
        raise ValueError(f"rows {rows} outside 0..{h}")
    if h1 > h0 and x4.size:
        _run(_gn_accumulate, n * c * (h1 - h0) * w, readonly_flat(np.asarray(x4)), n, c, h, w, h0, h1, num_groups,
             acc)
    return acc


def group_norm_finalize(acc: np.ndarray, count: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, rstd) float32 [N, G] from accumulated sums; ``count`` = elements per group.

    Variance is the biased one (divide by count), as torch.nn.GroupNorm.
    """
    s = acc[:, 0] / count
    var = np.maximum(acc[:, 1] / count - s * s, 0.0)
    rstd = 1.0 / np.sqrt(var + eps)
    return s.astype(np.float32), rstd.astype(np.float32)


def group_norm_stats(x: np.ndarray, num_groups: int, eps: float,
                     band_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-(n, group) mean and rstd of x [N, C, H, W] / [C, H, W] in ONE pass, f64 accumulation.

    x may be huge (e.g. a numpy memmap of a 512-channel 1024x1024 map): rows are visited in bands
    of ``band_rows`` (default ~32 MB per band) straight from x, with no full-size temporary.

    Returns:
        (mean, rstd), each float32 of shape [N, G] (for 3-D x: N = 1).
    """
    x4 = _as4d(np.asarray(x))
    n, c, h, w = x4.shape
    if band_rows is None:
        band_rows = max(1, _BAND_BYTES // max(1, 4 * n * c * w))
    acc = np.zeros((n * num_groups, 2), dtype=np.float64)
    for h0 in range(0, h, band_rows):
        group_norm_accumulate(x4, num_groups, acc, rows=(h0, min(h, h0 + band_rows)))
    mean, rstd = group_norm_finalize(acc, (c // num_groups) * h * w, eps)
    return mean.reshape(n, num_groups), rstd.reshape(n, num_groups)


def group_norm_apply(x_band: np.ndarray, mean: np.ndarray, rstd: np.ndarray,
                     gamma: np.ndarray | None, beta: np.ndarray | None, silu: bool = False,
                     out: np.ndarray | None = None) -> np.ndarray:
    """Normalise a band with precomputed statistics: ``(x - mean) * rstd * gamma + beta`` (+SiLU).

    Args:
        x_band: float32 [N, C, h, W] or [C, h, W], C-contiguous (any number of rows h).
        mean, rstd: [N, G] (or [G]) from ``group_norm_stats`` / ``group_norm_finalize``.
        gamma, beta: optional float32 [C] affine parameters.
        silu: fuse SiLU (the usual ResNet block "norm -> SiLU").
        out: destination like x_band (may be x_band: in place).
    """
    x4 = _as4d(x_band, "x_band")
    n, c, h, w = x4.shape
    mean = np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)
    rstd = np.ascontiguousarray(rstd, dtype=np.float32).reshape(-1)
    if mean.size % n or mean.size != rstd.size:
        raise ValueError("mean/rstd must be [N, G]")
    groups = mean.size // n
    if c % groups:
        raise ValueError(f"C={c} not divisible by G={groups}")
    if out is None:
        out = buffers.empty(x_band.shape)
    elif out.dtype != np.float32 or not out.flags.c_contiguous or out.shape != x_band.shape:
        raise ValueError("out must be a C-contiguous float32 array shaped like x_band")
    if x4.size:
        _run(_gn_apply, x4.size, readonly_flat(x4), out.reshape(-1), n, c, h * w, groups, readonly_flat(mean),
             readonly_flat(rstd), _vec(gamma, c, "gamma"), _vec(beta, c, "beta"), bool(silu))
    return out


def group_norm(x: np.ndarray, num_groups: int, gamma: np.ndarray | None,
               beta: np.ndarray | None, eps: float, silu: bool = False,
               out: np.ndarray | None = None) -> np.ndarray:
    """torch.nn.GroupNorm (+ optional fused SiLU) on float32 [N, C, H, W] or [C, H, W].

    One statistics pass and one apply pass over x; ``out=x`` works in place.
    """
    mean, rstd = group_norm_stats(x, num_groups, eps)
    return group_norm_apply(x, mean, rstd, gamma, beta, silu, out)


# --- LayerNorm / RMSNorm ------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _layer_norm_kernel(x, out, m, d, eps, gamma, beta, shift, scale, rows_per_mod):
    has_g = gamma.size > 0
    has_b = beta.size > 0
    has_shift = shift.size > 0
    has_scale = scale.size > 0
    for r in prange(m):
        src = x[r * d : (r + 1) * d]
        dst = out[r * d : (r + 1) * d]
        mean = _sum_f64(src) / d
        var = _sum_sq_dev_f64(src, mean) / d
        rstd = np.float32(1.0 / math.sqrt(var + eps))
        mu = np.float32(mean)
        for i in range(d):
            dst[i] = (src[i] - mu) * rstd
        if has_g:
            for i in range(d):
                dst[i] *= gamma[i]
        if has_b:
            for i in range(d):
                dst[i] += beta[i]
        b0 = (r // rows_per_mod) * d
        if has_scale:
            sc = scale[b0 : b0 + d]
            for i in range(d):
                dst[i] *= _F1 + sc[i]
        if has_shift:
            sh = shift[b0 : b0 + d]
            for i in range(d):
                dst[i] += sh[i]


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _rms_norm_kernel(x, out, m, d, eps, weight):
    has_w = weight.size > 0
    for r in prange(m):
        src = x[r * d : (r + 1) * d]
        dst = out[r * d : (r + 1) * d]
        ms = _sum_sq_f64(src) / d
        rs = np.float32(1.0 / math.sqrt(ms + eps))
        if has_w:
            for i in range(d):
                dst[i] = (src[i] * rs) * weight[i]
        else:
            for i in range(d):
                dst[i] = src[i] * rs


def _rows(x: np.ndarray) -> tuple[int, int]:
    if x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim == 0:
        raise TypeError(f"x must be a C-contiguous float32 [..., D] array, got {x.dtype}")
    d = x.shape[-1]
    return (x.size // d if d else 0), d


def _out_like(x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return buffers.empty(x.shape)
    if out.dtype != np.float32 or not out.flags.c_contiguous or out.shape != x.shape:
        raise ValueError("out must be a C-contiguous float32 array shaped like x")
    return out


def _modulation(v: np.ndarray | None, m: int, d: int, what: str) -> tuple[np.ndarray, int]:
    """Flatten a [D] or [B, D] shift/scale; return it and the number of x rows per batch entry."""
    if v is None:
        return _EMPTY, max(m, 1)
    v = np.ascontiguousarray(v, dtype=np.float32)
    if v.shape[-1] != d:
        raise ValueError(f"{what} last dim must be {d}, got {v.shape}")
    b = v.size // d
    if b == 0 or m % b:
        raise ValueError(f"{what} has {b} rows, which does not divide the {m} rows of x")
    return readonly_flat(v), max(m // b, 1)


def layer_norm(x: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None, eps: float,
               out: np.ndarray | None = None, shift: np.ndarray | None = None,
               scale: np.ndarray | None = None) -> np.ndarray:
    """LayerNorm over the last axis of float32 x [..., D], optionally AdaLN-modulated.

    ``y = ((x - mean) * rstd * gamma + beta) * (1 + scale) + shift`` (terms that are None are
    skipped): FLUX's ``norm(x) * (1 + scale[:, None]) + shift[:, None]`` with
    ``elementwise_affine=False``.  ``shift``/``scale`` are [D] or [B, D]; with [B, D] the rows of
    x are split into B equal consecutive groups (x as [B, T, D]).  ``out=x`` works in place.
    """
    m, d = _rows(x)
    out = _out_like(x, out)
    sh, rpm = _modulation(shift, m, d, "shift")
    sc, rpm2 = _modulation(scale, m, d, "scale")
    if shift is not None and scale is not None and rpm != rpm2:
        raise ValueError("shift and scale must have the same number of rows")
    rpm = rpm if shift is not None else rpm2
    if m and d:
        _run(_layer_norm_kernel, m * d, readonly_flat(x), out.reshape(-1), m, d, float(eps), _vec(gamma, d, "gamma"),
             _vec(beta, d, "beta"), sh, sc, rpm)
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float,
             out: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm over the last axis: ``x * rsqrt(mean(x^2) + eps) * weight``.

    T5LayerNorm and torch.nn.RMSNorm (FLUX q/k norm on [N, H, D_head]).  ``weight`` is [D] or
    None; ``out=x`` works in place.
    """
    m, d = _rows(x)
    out = _out_like(x, out)
    if m and d:
        _run(_rms_norm_kernel, m * d, readonly_flat(x), out.reshape(-1), m, d, float(eps), _vec(weight, d, "weight"))
    return out
