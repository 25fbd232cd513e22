"""Scalar float32 helpers inlined into the Numba kernels: two LLVM intrinsics and two ``exp``.

Why custom math instead of ``math.exp``: without Intel SVML, LLVM turns it into one scalar libm
call per element, far slower than the GEMM feeding it. These are branch-free f32 arithmetic that
LLVM vectorises with whatever SIMD the host has (SSE2 and up; nothing requires AVX):

* :func:`bits_to_f32`: reinterpret an int32 bit pattern as float32 (an LLVM ``bitcast``), used
  to build ``2**n`` from exponent bits.
* :func:`fmax_f32`: ``llvm.maxnum.f32``; unlike Python ``max`` it lets LLVM vectorise max
  reductions.
* :func:`exp_f32`: exp over the whole f32 range, for the activations. Cody-Waite range reduction
  ``x = n ln2 + r`` (``n ln2`` split into an exactly representable high part and a low part) and
  the degree-7 Taylor polynomial of ``exp(r)`` on ``|r| <= ln2/2`` (truncation error < 6e-9
  relative), scaled by ``2**n``; under 1 ulp against float64 with FMA contraction, ~1.2 without.
  Overflow -> inf, results below ~2.4e-38 -> 0 (no subnormals), NaN -> NaN.
* :func:`exp_neg_f32`: exp for ``x <= 0`` only (Cephes expf, ~1 ulp), for the online softmax of
  attention: exactly 0 below -88 and for -inf, fewer operations than :func:`exp_f32`.

The two ``exp`` are deliberately different functions (range, clamping, rounding of ``n``):
changing either changes results bit for bit.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["bits_to_f32", "exp_f32", "exp_neg_f32", "fmax_f32"]

_F1 = np.float32(1.0)
_HALF = np.float32(0.5)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # 355/512: n * _LN2_HI is exact for |n| < 2**15
_LN2_LO = np.float32(-2.1219444005469057e-4)  # ln2 - _LN2_HI
_EXP_HI = np.float32(89.0)  # exp(89) > FLT_MAX: the scaling overflows to inf by itself
_EXP_LO = np.float32(-87.33654)  # below: result would be subnormal; flushed to 0
_TWO = np.float32(2.0)
_C2 = np.float32(1.0 / 2)
_C3 = np.float32(1.0 / 6)
_C4 = np.float32(1.0 / 24)
_C5 = np.float32(1.0 / 120)
_C6 = np.float32(1.0 / 720)
_C7 = np.float32(1.0 / 5040)

#: Fast-math flags of the attention softmax kernels that inline :func:`exp_neg_f32`. ``nnan``
#: lets LLVM vectorise the max reduction (``llvm.maxnum``); ``ninf`` is deliberately absent
#: because masked scores are -inf.
SOFTMAX_FM = {"reassoc", "contract", "nsz", "arcp", "nnan"}


@intrinsic
def bits_to_f32(typingctx, x):
    """Reinterpret an int32 bit pattern as float32 (an LLVM bitcast; vectorises). A wider
    integer argument is truncated to 32 bits first."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def fmax_f32(typingctx, a, b):
    """``llvm.maxnum.f32``: unlike Python ``max`` this lets LLVM vectorise max reductions."""
    sig = types.float32(types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.maxnum", [f], ir.FunctionType(f, [f, f]))
        return builder.call(fn, args)

    return sig, codegen


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def exp_f32(x):
    """exp for float32 scalars over the whole range, vectorisable (accuracy: module doc)."""
    # clamp: below -87.34 the result flushes to 0; at 89 the 2**n scaling below overflows to inf
    xc = min(max(x, _EXP_LO), _EXP_HI)
    n = np.floor(xc * _LOG2E + _HALF)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = _C6 + r * _C7
    p = _C5 + r * p
    p = _C4 + r * p
    p = _C3 + r * p
    p = _C2 + r * p
    p = _F1 + r * p
    p = _F1 + r * p
    # 2**n = 2**(n-1) * 2 with n in [-126, 128]: n-1+127 fits the exponent field (n = -126 gives
    # the bit pattern 0, i.e. a 0 result: only for x < -86.98, where exp(x) < 2.4e-38)
    s = bits_to_f32(np.int32((np.int32(n) + np.int32(126)) << np.int32(23)))
    res = (p * s) * _TWO
    return x if x != x else res


@njit(inline="always", fastmath=SOFTMAX_FM)
def exp_neg_f32(x):
    """exp(x) for x <= 0 in float32 (Cephes expf, ~1 ulp); exactly 0 below -88 and for -inf.

    Branch-free so LLVM vectorises it (Numba has no vector exp without SVML). Results that
    would be denormal are flushed to 0 — harmless for softmax weights.
    """
    x = fmax_f32(x, np.float32(-88.0))
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
    return p * bits_to_f32((n + np.int32(127)) << np.int32(23))  # * 2**n (n=-127 -> 0)
