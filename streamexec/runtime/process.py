"""What this process costs the OS: resident memory now and at peak, the allocator settings that
make freed arrays leave the process at once, and the baseline (interpreter, libraries, compiled
kernels) that every memory budget starts from."""

from __future__ import annotations

import ctypes
import os

_PAGE = os.sysconf("SC_PAGE_SIZE")
_MIB = 1 << 20


def current_rss() -> int:
    """Resident set size of this process now (bytes), from /proc/self/statm (cheap)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def peak_rss() -> int:
    """Peak resident set size (VmHWM) of this process so far (bytes)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: ``5 > /proc/self/clear_refs``), so the next
    ``peak_rss()`` is the peak since now. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


_TUNED = False


def tune_malloc() -> None:
    """Make glibc return big freed blocks to the OS at once (fixed mmap threshold of 256 KiB,
    trim at 1 MiB). glibc's adaptive threshold would otherwise keep freed arrays of up to 32 MiB
    in the heap, where they still count in RSS and break the budget arithmetic."""
    global _TUNED
    if _TUNED:
        return
    _TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 256 * 1024)
        libc.mallopt(m_trim_threshold, 1 * _MIB)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def warm_up_kernels(dtypes: set[str] | frozenset[str] = frozenset({"F32"})) -> None:
    """Run every kernel once on tiny inputs so its compiled code (Numba cache or JIT) and BLAS'
    buffers are in the process before the baseline is measured."""
    import numpy as np

    from ..kernels import activations as act
    from ..kernels.attention import attention
    from ..kernels.conv import conv2d
    from ..kernels.linear import geglu, linear
    from ..kernels.norms import group_norm, layer_norm, rms_norm

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16), dtype=np.float32)
    for dt in sorted(set(dtypes) | {"F32"}):
        w = _tiny_weight(rng, (16, 16), dt)
        if w is None:
            continue
        linear(x, w, dt, activation="silu")
        geglu(x, w, dt)
        conv2d(rng.standard_normal((1, 4, 5, 5), dtype=np.float32), _tiny_weight(rng, (4, 4, 3, 3), dt), dt,
               pad=(1, 1, 1, 1))
    q = rng.standard_normal((6, 2, 8), dtype=np.float32)
    attention(q, q, q, 0.3)
    attention(q, q, q, 0.3, causal=True)
    group_norm(rng.standard_normal((1, 4, 3, 3), dtype=np.float32), 2, None, None, 1e-5, silu=True)
    layer_norm(x, None, None, 1e-5)
    rms_norm(x, None, 1e-6)
    for fn in ("silu", "gelu", "gelu_tanh", "quick_gelu"):
        act.apply_activation(x, fn)


def _tiny_weight(rng, shape, dtype: str):
    import numpy as np

    from ..weights.dtypes import DTYPES

    a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if dtype == "F32":
        return a
    if dtype == "F16":
        return a.astype(np.float16)
    if dtype == "BF16":
        return (a.view(np.uint32) >> 16).astype(np.uint16)
    if dtype in DTYPES and dtype.startswith("F8"):
        return np.full(shape, 0x30, np.uint8)
    return None


def measure_baseline(dtypes: set[str] | frozenset[str] = frozenset({"F32"})) -> int:
    """RSS of this process once the runtime is loaded and warm: what a budget starts from."""
    tune_malloc()
    warm_up_kernels(dtypes)
    import gc

    gc.collect()
    return current_rss()
