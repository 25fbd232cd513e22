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


#: The kernel families :func:`warm_up_kernels` calls, in the order it calls them; a child process
#: compiles one family at a time (:func:`compile_in_child`).
WARM_PARTS = ("linear", "conv", "decode", "attention", "norms", "activations")


def warm_up_kernels(dtypes: set[str] | frozenset[str] = frozenset({"F32"}),
                    parts: tuple[str, ...] = WARM_PARTS) -> None:
    """Run every kernel once on tiny inputs so its compiled code (Numba cache or JIT) and BLAS'
    buffers are in the process before the baseline is measured. Every ``cache=True`` kernel a
    run can reach is called here with the argument types a run gives it (one specialisation
    each): a kernel first compiled mid-run would cost its JIT peak inside the budget
    (``tests/test_cold_start.py`` checks a demo run after this compiles nothing more).
    ``parts``: only these families of :data:`WARM_PARTS`."""
    import numpy as np

    from ..kernels import activations as act
    from ..kernels.attention import attention
    from ..kernels.conv import conv2d
    from ..kernels.decode import decode_block_to_f32, decode_to_f32
    from ..kernels.embeddings import apply_rope
    from ..kernels.linear import gated_gelu, geglu, linear
    from ..kernels.norms import group_norm, layer_norm, rms_norm

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16), dtype=np.float32)
    for dt in sorted(set(dtypes) | {"F32"}):
        w = _tiny_weight(rng, (16, 16), dt)
        if w is None:
            continue
        if "linear" in parts:
            linear(x, w, dt, activation="silu")
            linear(x, w, dt, residual=x.copy())
            geglu(x, w, dt)
            gated_gelu(x, w, w, dt)
        if "conv" in parts:
            for algo in ("direct", "winograd"):
                conv2d(rng.standard_normal((1, 4, 5, 5), dtype=np.float32), _tiny_weight(rng, (4, 4, 3, 3), dt), dt,
                       pad=(1, 1, 1, 1), algo=algo)
        if "decode" in parts and dt != "F32":
            for parallel in (False, True):
                decode_to_f32(w, dt, parallel=parallel)
            decode_block_to_f32(w, dt, 0, 8, np.empty(16 * 8, np.float32))
    if "attention" in parts:
        q = rng.standard_normal((6, 2, 8), dtype=np.float32)
        attention(q, q, q, 0.3)
        attention(q, q, q, 0.3, causal=True)
        attention(q, q, q, 0.3, q_tile=2, k_tile=2)
        attention(q, q, q, 0.3, rel_bias=rng.standard_normal((2, 11), dtype=np.float32))
    if "norms" in parts:
        group_norm(rng.standard_normal((1, 4, 3, 3), dtype=np.float32), 2, None, None, 1e-5, silu=True)
        layer_norm(x, None, None, 1e-5)
        layer_norm(x, np.ones(16, np.float32), np.zeros(16, np.float32), 1e-5)
        layer_norm(x, None, None, 1e-6, shift=x[0].copy(), scale=x[1].copy())
        rms_norm(x, None, 1e-6)
        rms_norm(x, np.ones(16, np.float32), 1e-6)
    if "activations" in parts:
        for fn in ("silu", "gelu", "gelu_tanh", "quick_gelu"):
            act.apply_activation(x, fn)
        act.add_(x.copy(), x)
        act.mul_(x.copy(), x)
        act.softmax(x)
        act.all_finite(x)
        act.geglu_combine(x)
        act.gated_gelu_combine(x, x)
        r = rng.standard_normal((4, 2, 8), dtype=np.float32)
        apply_rope(r, np.ones((4, 4), np.float32), np.zeros((4, 4), np.float32))


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


def _compiled_stamp(dtypes: set[str] | frozenset[str]):
    """The file that says the kernels for ``dtypes`` are in Numba's on-disk cache, named by what
    invalidates that cache (kernel sources' size and mtime, Numba, Python, the target CPU), kept in
    the cache folder itself (emptying the cache removes it); None where Numba caches nowhere."""
    import hashlib
    import sys
    from pathlib import Path

    from ..kernels import linear

    try:
        folder = Path(linear._epilogue._cache._cache_path)
        import llvmlite.binding as llvm
        import numba

        key = [numba.__version__, sys.version, sorted(dtypes), os.environ.get("NUMBA_CPU_FEATURES"),
               os.environ.get("NUMBA_CPU_NAME") or llvm.get_host_cpu_name()]  # the CPU Numba compiles for
        for f in sorted(Path(linear.__file__).parent.glob("*.py")):
            st = f.stat()
            key.append((f.name, st.st_size, st.st_mtime_ns))
    except (AttributeError, OSError, ImportError):
        return None
    return folder / f"streamexec-compiled-{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}"


def compile_in_child(dtypes: set[str] | frozenset[str] = frozenset({"F32"})) -> bool:
    """Compile the kernels into Numba's on-disk cache in child processes, once (a stamp file in
    the cache folder says it is done), so that this process only loads compiled code: the
    compiler's memory (+108 MiB for all kernels in one process, measured) is never inside this
    process's budget. One child per family of :data:`WARM_PARTS`, one after the other, so that
    no child holds more than one family's compiled modules either (each peaked at 152-199 MiB
    for the demo's dtypes, against 256 MiB for one child compiling everything) and a tool that
    reads the children's peak too (``/usr/bin/time``: ``wait4``'s ``ru_maxrss``) sees the same.
    True when the kernels are (now) in the cache. ``STREAMEXEC_JIT=inprocess`` compiles here
    instead."""
    import subprocess
    import sys
    import warnings
    from pathlib import Path

    if os.environ.get("STREAMEXEC_JIT") == "inprocess":
        return False
    stamp = _compiled_stamp(dtypes)
    if stamp is None:
        return False
    if stamp.exists():
        return True
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the streamexec package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    code = ("import sys; from streamexec.runtime.process import warm_up_kernels as w; "
            "w(set(sys.argv[2:]), (sys.argv[1],))")
    res, why = None, ""
    for part in WARM_PARTS:
        try:
            res = subprocess.run([sys.executable, "-c", code, part, *sorted(dtypes)], env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            res, why = None, str(e)
            break
        if res.returncode != 0:
            why = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
            break
    if res is None or res.returncode != 0:
        warnings.warn(f"compiling the kernels in a child process failed ({why}); compiling in this process, "
                      f"whose peak RSS then includes the compiler's", RuntimeWarning, stacklevel=2)
        return False
    try:
        stamp.write_text(" ".join(sorted(dtypes)) + "\n")
    except OSError:
        pass
    return True


def measure_baseline(dtypes: set[str] | frozenset[str] = frozenset({"F32"})) -> int:
    """RSS of this process once the runtime is loaded and warm: what a budget starts from. The
    kernels are compiled in a child process first (:func:`compile_in_child`), so the baseline and
    the process peak never hold the compiler."""
    tune_malloc()
    compile_in_child(dtypes)
    warm_up_kernels(dtypes)
    import gc

    gc.collect()
    return current_rss()
