"""The kernels' worker threads: a small pool of Python threads, each running single-threaded
sgemm and single-threaded ``nogil`` Numba kernels on its own scratch.

Why worker threads and not ``prange``: alternating OpenBLAS' thread pool with Numba's OpenMP pool
inside every block makes both pools spin-wait for the same cores, while independent workers need
no barrier per block at all and keep running when another process steals a core. The caller holds
:func:`blas.blas_single_threaded` while the workers run (OpenBLAS on one thread, its pool parked).
If the BLAS library offers no such control the kernels run in the calling thread with BLAS' own
threads (:func:`kernel_workers` is then 1). Calls below :func:`parallel_min_flops` also run in the
calling thread: the hand-off costs more than it saves. Used by attention, conv and linear.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba

from streamexec.kernels.blas import blas_controllable, blas_pinned

__all__ = [
    "PARALLEL_MIN_FLOPS",
    "PARALLEL_MIN_FLOPS_PINNED",
    "kernel_workers",
    "parallel_items",
    "parallel_min_flops",
]

#: Below this many flops a call runs in the calling thread: handing items to workers and
#: parking/re-creating BLAS' pool costs more than it saves (CLIP's 77-token attention).
PARALLEL_MIN_FLOPS = 3e7
#: The same threshold while BLAS is pinned to one thread (:func:`blas.blas_pinned`, the executor
#: does it for a whole run): then there is no BLAS pool to park or re-create, the hand-off to
#: the workers is all that is left, and below this the calling thread alone would not use the
#: second core at all (BLAS runs on one thread).
PARALLEL_MIN_FLOPS_PINNED = 4e6


def parallel_min_flops() -> float:
    """Flops below which a kernel call runs in the calling thread (see ``PARALLEL_MIN_FLOPS``)."""
    return PARALLEL_MIN_FLOPS_PINNED if blas_pinned() else PARALLEL_MIN_FLOPS


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
    if n > 1 and not blas_controllable():
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
