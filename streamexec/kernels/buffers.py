"""Large float32 buffers (activations, kernel scratch) backed by 2 MiB-aligned anonymous maps
with transparent huge pages.

A UNet step allocates gigabytes of arrays of 1-20 MB (op outputs, decoded panels, Winograd and
im2col scratch). Through glibc (``mmap`` threshold fixed at 256 KiB so freed arrays leave RSS at
once, see ``runtime.process.tune_malloc``) each is a fresh map at a 4 KiB-aligned address:
numpy's own ``MADV_HUGEPAGE`` then covers only its 2 MiB-aligned interior, and every other page
is a separate fault (system time per step in BENCHMARKS.md, kernels). Here a buffer of >= 2 MiB
is its own map whose length is a multiple of 2 MiB (the kernel aligns such maps to 2 MiB), and
the part the array fully covers is advised as huge pages. The tail past the last whole
2 MiB stays in 4 KiB pages, so RSS is what the array touches, as before (no rounding up).

Freed like any array: the map is unmapped when the last view of it goes away.

tracemalloc does not see these maps (numpy's allocator never made them), so this module counts
them itself: :func:`mapped_bytes` (the arrays alive now) and :func:`mapped_peak` (the most
alive at once since :func:`reset_mapped_peak`), by the bytes of the arrays (the pages they can
touch), for tests that bound a kernel's scratch.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref

import numpy as np

__all__ = ["empty", "mapped_bytes", "mapped_peak", "reset_mapped_peak"]

_HUGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
#: STREAMEXEC_HUGEPAGES=0 turns this off (plain np.empty), e.g. where THP compaction stalls.
_ENABLED = os.environ.get("STREAMEXEC_HUGEPAGES", "1") != "0"

_lock = threading.Lock()
_live = 0
_peak = 0


def _count(delta: int) -> None:
    global _live, _peak
    with _lock:
        _live += delta
        _peak = max(_peak, _live)


def mapped_bytes() -> int:
    """Bytes of the arrays :func:`empty` made from their own maps that are alive now."""
    return _live


def mapped_peak() -> int:
    """The most bytes of such arrays alive at once since the last :func:`reset_mapped_peak`."""
    return _peak


def reset_mapped_peak() -> None:
    """Start :func:`mapped_peak` again from what is alive now."""
    global _peak
    with _lock:
        _peak = _live


def empty(shape: int | tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """``np.empty(shape, dtype)``; from a huge-page-advised anonymous map when >= 2 MiB."""
    dt = np.dtype(dtype)
    shp = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    count = 1
    for s in shp:
        count *= int(s)
    nbytes = count * dt.itemsize
    if nbytes < _HUGE or _MADV_HUGEPAGE is None or not _ENABLED:
        return np.empty(shp, dt)
    try:
        mm = mmap.mmap(-1, -(-nbytes // _HUGE) * _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = (nbytes // _HUGE) * _HUGE
        mm.madvise(_MADV_HUGEPAGE, 0, whole)
    except (OSError, ValueError):  # no THP / no such advice: a plain array
        return np.empty(shp, dt)
    _count(nbytes)
    weakref.finalize(mm, _count, -nbytes)  # the map goes when the last view of it does
    return np.frombuffer(mm, dtype=dt, count=count).reshape(shp)
