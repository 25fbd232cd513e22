"""Element-wise activations, softmax and residual add: Numba, multi-threaded, vectorisable.

All public functions take **C-contiguous float32** arrays (any shape unless stated) and write
into ``out`` (a new array when omitted; pass ``out=x`` to work in place).  Inputs may be
read-only.  They keep the number of compiled specialisations small by flattening to 1-D and
making every input view read-only before calling a kernel.

Why custom math instead of ``math.exp``/``math.erf``: without Intel SVML, LLVM turns those into
one scalar libm call per element, far slower than the GEMM feeding them.  The scalar helpers
below are branch-free f32 arithmetic that LLVM vectorises with whatever SIMD the host has (SSE2
and up; nothing requires AVX):

* ``exp``: :func:`streamexec.kernels.scalar.exp_f32` (range, accuracy and special values there).
* ``erf`` (only inside ``gelu``): the Abramowitz & Stegun 7.1.26 formula, absolute error
  <= 1.5e-7 — the same formula PyTorch's vectorised CPU ``erf`` uses, so ``gelu`` tracks
  ``torch.nn.functional.gelu`` to ~1e-7 absolute.
* ``sigmoid(x) = 1 / (1 + exp(-x))``; ``silu = x * sigmoid(x)``;
  ``gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u)``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``
  (identical in exact arithmetic, no cancellation); ``quick_gelu = x * sigmoid(1.702 x)``.

``fastmath`` is limited to two flags: ``contract`` (FMA fusion) in the element-wise kernels, and
``reassoc`` in the pure reductions (row sums/max) so LLVM can vectorise them (a different
summation order, not lower precision).  Every kernel uses ``error_model="numpy"``: with Python's
error model each ``/`` carries a ZeroDivisionError check that stops LLVM vectorising the loop.
The kernels run on all Numba threads (throughput in BENCHMARKS.md, kernels).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from streamexec.kernels._serial import run as _run
from streamexec.kernels.decode import readonly_flat
from streamexec.kernels.scalar import exp_f32

__all__ = [
    "ACTIVATIONS",
    "activation_code",
    "silu",
    "gelu",
    "gelu_tanh",
    "quick_gelu",
    "apply_activation",
    "softmax",
    "add_",
    "mul_",
    "geglu_combine",
    "gated_gelu_combine",
]

#: activation names accepted by ``apply_activation``/``linear`` -> kernel code.
ACTIVATIONS: dict[str | None, int] = {
    None: 0,
    "silu": 1,
    "gelu": 2,
    "gelu_tanh": 3,
    "quick_gelu": 4,
}

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_HALF = np.float32(0.5)
_INF = np.float32(np.inf)
# Element-wise kernels allow FMA contraction ("contract"), nothing else: it only removes
# intermediate roundings (and is faster on FMA hosts); hosts without FMA compute the same
# expressions unfused.
_FM = {"contract"}
_SQRT1_2 = np.float32(0.7071067811865476)
_SQRT_2_OVER_PI_X2 = np.float32(2.0 * 0.7978845608028654)  # 2 sqrt(2/pi)
_GELU_TANH_C = np.float32(0.044715)
_QUICK = np.float32(1.702)
# Abramowitz & Stegun 7.1.26
_AS_P = np.float32(0.3275911)
_AS_A1 = np.float32(0.254829592)
_AS_A2 = np.float32(-0.284496736)
_AS_A3 = np.float32(1.421413741)
_AS_A4 = np.float32(-1.453152027)
_AS_A5 = np.float32(1.061405429)

# Element counts below which kernels run single-threaded (a parallel launch costs ~5-20 us).
_PAR_MIN = 1 << 15


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def sigmoid_f32(x):
    """1 / (1 + exp(-x)); exact limits 0 and 1, NaN -> NaN."""
    return _F1 / (_F1 + exp_f32(-x))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def silu_f32(x):
    return x * sigmoid_f32(x)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def gelu_f32(x):
    """0.5 x (1 + erf(x / sqrt 2)), erf by A&S 7.1.26 (abs err <= 1.5e-7)."""
    z = x * _SQRT1_2
    az = abs(z)
    t = _F1 / (_F1 + _AS_P * az)
    poly = t * (_AS_A1 + t * (_AS_A2 + t * (_AS_A3 + t * (_AS_A4 + t * _AS_A5))))
    e = _F1 - poly * exp_f32(-(az * az))
    e = -e if z < _F0 else e
    return _HALF * x * (_F1 + e)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def gelu_tanh_f32(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) written as x * sigmoid(2 u)."""
    u2 = _SQRT_2_OVER_PI_X2 * (x + _GELU_TANH_C * x * x * x)
    return x * sigmoid_f32(u2)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def quick_gelu_f32(x):
    return x * sigmoid_f32(_QUICK * x)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def act_f32(x, code):
    """Apply activation ``code`` (see ``ACTIVATIONS``) to one scalar."""
    if code == 1:
        return silu_f32(x)
    if code == 2:
        return gelu_f32(x)
    if code == 3:
        return gelu_tanh_f32(x)
    if code == 4:
        return quick_gelu_f32(x)
    return x


# --- element-wise kernels -----------------------------------------------------------------------
# One loop per activation so each inner loop is branch-free and vectorises; the code test is
# outside the loop.


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _act_slice(src, dst, code):
    """dst[:] = act(src[:]) on 1-D slices; one branch-free loop per activation."""
    n = src.size
    if code == 1:
        for i in range(n):
            dst[i] = silu_f32(src[i])
    elif code == 2:
        for i in range(n):
            dst[i] = gelu_f32(src[i])
    elif code == 3:
        for i in range(n):
            dst[i] = gelu_tanh_f32(src[i])
    elif code == 4:
        for i in range(n):
            dst[i] = quick_gelu_f32(src[i])
    else:
        for i in range(n):
            dst[i] = src[i]


# Inside a prange body, loops must run over *slices* indexed from 0: a loop over range(lo, hi)
# of the parent array is not vectorised by LLVM there (measured 3.5x slower).


@njit(cache=True, nogil=True, error_model="numpy", parallel=True, fastmath=_FM)
def _act_kernel(src, dst, code, nchunks):
    """dst = act(src) over 1-D arrays, split into ``nchunks`` contiguous ranges."""
    n = src.size
    step = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        lo = min(n, c * step)
        hi = min(n, lo + step)
        _act_slice(src[lo:hi], dst[lo:hi], code)


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _add_kernel(a, b, nchunks):
    n = a.size
    step = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        lo = min(n, c * step)
        hi = min(n, lo + step)
        aa = a[lo:hi]
        bb = b[lo:hi]
        for i in range(aa.size):
            aa[i] += bb[i]


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _mul_kernel(a, b, nchunks):
    n = a.size
    step = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        lo = min(n, c * step)
        hi = min(n, lo + step)
        aa = a[lo:hi]
        bb = b[lo:hi]
        for i in range(aa.size):
            aa[i] *= bb[i]


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _sum(a):
    """Sum of a 1-D f32 slice (reassociated so it vectorises)."""
    s = np.float32(0.0)
    for i in range(a.size):
        s += a[i]
    return s


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nnan", "nsz"})
def _max(a):
    """Max of a non-empty 1-D f32 slice (NaNs are caught later by the sum)."""
    m = a[0]
    for i in range(1, a.size):
        v = a[i]
        m = v if v > m else m
    return m


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def softmax_row(src, dst):
    """Stable softmax of one 1-D row ``src`` into ``dst`` (may be the same memory)."""
    m = _max(src)
    if m == -_INF:  # an all -inf row (fully masked): torch gives NaN, so do we
        m = _F0
    for i in range(src.size):
        dst[i] = exp_f32(src[i] - m)
    inv = _F1 / _sum(dst)
    for i in range(dst.size):
        dst[i] *= inv


@njit(cache=True, nogil=True, error_model="numpy", parallel=True, fastmath=_FM)
def _softmax_kernel(src, dst, rows, d):
    """Softmax over each length-``d`` row of flat ``src`` -> ``dst``."""
    for r in prange(rows):
        softmax_row(src[r * d : (r + 1) * d], dst[r * d : (r + 1) * d])


@njit(cache=True, nogil=True, error_model="numpy", parallel=True, fastmath=_FM)
def _geglu_kernel(h, out, rows, inner, code):
    """out[r, j] = h[r, j] * act(h[r, inner + j]) over flat row-major arrays."""
    for r in prange(rows):
        a = h[r * 2 * inner : r * 2 * inner + inner]
        g = h[r * 2 * inner + inner : (r + 1) * 2 * inner]
        o = out[r * inner : (r + 1) * inner]
        if code == 2:
            for j in range(inner):
                o[j] = a[j] * gelu_f32(g[j])
        elif code == 3:
            for j in range(inner):
                o[j] = a[j] * gelu_tanh_f32(g[j])
        else:
            for j in range(inner):
                o[j] = a[j] * act_f32(g[j], code)


@njit(cache=True, nogil=True, error_model="numpy", parallel=True, fastmath=_FM)
def _gated_kernel(a, b, out, nchunks, code):
    """out = act(a) * b over flat arrays (T5 gated-gelu: act on wi_0's output)."""
    n = a.size
    step = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        lo = min(n, c * step)
        hi = min(n, lo + step)
        aa = a[lo:hi]
        bb = b[lo:hi]
        o = out[lo:hi]
        if code == 3:
            for j in range(aa.size):
                o[j] = gelu_tanh_f32(aa[j]) * bb[j]
        elif code == 2:
            for j in range(aa.size):
                o[j] = gelu_f32(aa[j]) * bb[j]
        else:
            for j in range(aa.size):
                o[j] = act_f32(aa[j], code) * bb[j]


# --- Python API -----------------------------------------------------------------------------------


def activation_code(name: str | None) -> int:
    """Kernel code of an activation name (None, "silu", "gelu", "gelu_tanh", "quick_gelu")."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {list(ACTIVATIONS)}") from None


def _check_f32(x: np.ndarray, what: str) -> None:
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise TypeError(f"{what} must be a C-contiguous float32 array (got {x.dtype})")


def _prep_out(x: np.ndarray, out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    _check_f32(out, "out")
    if out.shape != tuple(shape):
        raise ValueError(f"out has shape {out.shape}, expected {tuple(shape)}")
    return out


def _nchunks(n: int) -> int:
    """Work items for an element-wise kernel of n elements (1 = effectively serial)."""
    return 1 if n < _PAR_MIN else max(2, min(64, n // _PAR_MIN))


def apply_activation(x: np.ndarray, name: str | None, out: np.ndarray | None = None) -> np.ndarray:
    """out = act(x) element-wise for a named activation; ``out=x`` works in place."""
    _check_f32(x, "x")
    out = _prep_out(x, out, x.shape)
    if x.size:
        _run(_act_kernel, x.size, readonly_flat(x), out.reshape(-1), activation_code(name), _nchunks(x.size))
    return out


def silu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x * sigmoid(x) (SiLU / swish), as ``torch.nn.functional.silu``."""
    return apply_activation(x, "silu", out)


def gelu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Exact (erf) GELU, as ``torch.nn.functional.gelu(x)`` (|err| ~1e-7)."""
    return apply_activation(x, "gelu", out)


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _finite_probe(a):
    """sum(a * 0): 0 if every element is finite, NaN otherwise (inf * 0 and NaN * 0 are NaN).

    Only ``reassoc`` (no ``nnan``/``ninf``), so LLVM vectorises the sum but cannot fold x*0."""
    s = np.float32(0.0)
    for i in range(a.size):
        s += a[i] * np.float32(0.0)
    return s


def all_finite(x: np.ndarray) -> bool:
    """True if no element of float32 ``x`` is NaN or +-inf: one vectorised pass (the executor's
    check after every op; ``x.max()`` and ``x.min()`` took two)."""
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        return bool(np.isfinite(x).all())
    return x.size == 0 or _finite_probe(readonly_flat(x)) == 0.0


def gelu_tanh(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """tanh-approximate GELU ("gelu_new", ``approximate="tanh"``)."""
    return apply_activation(x, "gelu_tanh", out)


def quick_gelu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x * sigmoid(1.702 x) (CLIP's quick_gelu)."""
    return apply_activation(x, "quick_gelu", out)


def softmax(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Stable softmax over the last axis: exp(x - max) / sum.  ``out=x`` works in place.

    Rows that are entirely -inf give NaN (like torch); +inf or NaN in a row give NaN.
    """
    _check_f32(x, "x")
    out = _prep_out(x, out, x.shape)
    if x.size == 0:
        return out
    d = x.shape[-1] if x.ndim else 1
    # in place (out is x) is fine: each pass reads src[i] before it writes dst[i]
    _run(_softmax_kernel, x.size, readonly_flat(x), out.reshape(-1), x.size // d, d)
    return out


def add_(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a += b in place (residual add); both C-contiguous float32 of the same shape."""
    _check_f32(a, "a")
    _check_f32(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if a.size:
        _run(_add_kernel, a.size, a.reshape(-1), readonly_flat(b), _nchunks(a.size))
    return a


def mul_(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a *= b in place (gating); both C-contiguous float32 of the same shape."""
    _check_f32(a, "a")
    _check_f32(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if a.size:
        _run(_mul_kernel, a.size, a.reshape(-1), readonly_flat(b), _nchunks(a.size))
    return a


def geglu_combine(
    h: np.ndarray, out: np.ndarray | None = None, activation: str = "gelu"
) -> np.ndarray:
    """GEGLU tail: h [M, 2I] -> a * act(gate) [M, I] with ``a, gate = h.chunk(2, -1)``.

    This is diffusers' ``GEGLU``: ``hidden_states, gate = proj(x).chunk(2, dim=-1)``
    then ``hidden_states * gelu(gate)``.
    """
    _check_f32(h, "h")
    if h.ndim != 2 or h.shape[1] % 2:
        raise ValueError(f"h must be [M, 2*I], got {h.shape}")
    m, two_i = h.shape
    inner = two_i // 2
    out = _prep_out(h, out, (m, inner))
    if out.size:
        _run(_geglu_kernel, h.size, readonly_flat(h), out.reshape(-1), m, inner, activation_code(activation))
    return out


def gated_gelu_combine(
    a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, activation: str = "gelu_tanh"
) -> np.ndarray:
    """T5 gated-GELU tail: act(a) * b, ``a = wi_0(x)``, ``b = wi_1(x)``.

    ``activation`` defaults to T5 v1.1's "gelu_new" (tanh approximation).  ``out`` may be ``a``
    or ``b`` (in place).
    """
    _check_f32(a, "a")
    _check_f32(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    out = _prep_out(a, out, a.shape)
    if a.size:
        _run(
            _gated_kernel,
            a.size,
            readonly_flat(a),
            readonly_flat(b),
            out.reshape(-1),
            _nchunks(a.size),
            activation_code(activation),
        )
    return out
