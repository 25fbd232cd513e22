"""Run the Numba ``parallel=True`` kernels on one thread for small inputs.

A ``prange`` kernel starts an OpenMP team and ends on a barrier that waits for every team
thread — even when there is one chunk of work, and even when the other core is busy with our
own workers' leftovers, the weight prefetch thread or another process. With a static schedule
the caller cannot take over the missing thread's share: it waits until the OS runs it, which
made small kernels in the model cost many times what they cost in isolation (BENCHMARKS.md,
kernels). Below ``SERIAL_MAX_ELEMS`` elements :func:`run` launches the same compiled kernel with
a team of one (``numba.set_num_threads(1)`` for the call: no other thread is woken or waited
for). Same code, same results, no extra compiled specialisation.
"""

from __future__ import annotations

import numba

#: Inputs below this many elements (1 MiB of f32) run on the calling thread alone.
SERIAL_MAX_ELEMS = 1 << 18


def use_serial(n_elems: int) -> bool:
    """Whether a kernel over ``n_elems`` elements should run on the calling thread alone."""
    return n_elems < SERIAL_MAX_ELEMS


def run(kernel, n_elems: int, *args):
    """``kernel(*args)``; on a team of one thread when ``n_elems`` is small."""
    if not use_serial(n_elems):
        return kernel(*args)
    prev = numba.get_num_threads()
    if prev <= 1:
        return kernel(*args)
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(prev)
