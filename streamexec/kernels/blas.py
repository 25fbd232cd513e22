"""The OpenBLAS numpy uses, reached through ctypes: its thread count and an accumulating sgemm.

OpenBLAS' thread count is process-global in the pthreads build numpy ships
(``openblas_set_num_threads_local`` changes it for every thread), so :func:`blas_single_threaded`
sets it to 1 for the duration of a call and restores it, and parks OpenBLAS' pool meanwhile: the
kernels then run single-threaded sgemm on several worker threads of their own
(``threads.parallel_items``) without OpenBLAS' spinning pool taking their cores. If numpy's BLAS
is something else, nothing here is controllable: :func:`blas_single_threaded` yields False and the
kernels run in the calling thread with BLAS' own threads.

:func:`sgemm_into` is ``cblas_sgemm`` with beta 0 or 1 (numpy's matmul cannot accumulate into
its output), so a K-split product accumulates in place; numpy matmul + add where no usable
``cblas_sgemm`` symbol is found.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

__all__ = ["blas_controllable", "blas_pinned", "blas_single_threaded", "sgemm_into"]


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

#: Stop OpenBLAS' pool threads while our workers run: after a multi-threaded sgemm its idle
#: threads spin for 2**28 cycles (OPENBLAS_THREAD_TIMEOUT, read once at load) before sleeping,
#: on the cores our workers need. The pool is re-created on exit (see BENCHMARKS.md, threads).
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
    BLAS' own threads are not available to them and re-creating them is costly."""
    return _BLAS_DEPTH > 0


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


def blas_controllable() -> bool:
    """Whether numpy's BLAS thread count can be set from here (OpenBLAS found)."""
    return _blas_ctl() is not None
