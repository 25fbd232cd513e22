"""Helpers shared by the budget benchmarks (``bench_unet_budget.py``, ``bench_flux.py``): run a
measurement in its own subprocess and read its peak RSS from the OS, make missing random-weight
checkpoints with ``make_checkpoint.py``, compare outputs. Standard library only at import time
(numpy is imported where needed), so a child process that imports this costs nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
GIB = 1 << 30


class ChildFailed(RuntimeError):
    """A measurement subprocess exited non-zero or printed no JSON (``stderr`` holds its tail)."""

    def __init__(self, cmd: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(cmd[:4])} ... exited {returncode}:\n{stderr}")
        self.returncode = returncode
        self.stderr = stderr


def threads() -> int:
    """The cores this process may run on (both sides of a comparison get this many threads)."""
    return len(os.sched_getaffinity(0))


def vmhwm() -> int:
    """Peak RSS (VmHWM) of the calling process so far, in bytes, from /proc/self/status."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(cmd: list[str], env: dict[str, str] | None = None, echo: bool = False) -> dict:
    """Run ``cmd`` (a Python process that prints one JSON object as its last stdout line) and
    return that object, plus ``peak_rss_wait4``: the child's maximum RSS as the kernel reports it
    to the parent (``wait4`` rusage; it can include the parent's own RSS at fork time, so the
    child's own VmHWM, which it reports itself, is the primary figure). ``echo`` copies the
    child's stderr through (progress lines)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=None if echo else err,
                                env=None if env is None else os.environ | env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        tail = err.read()[-4000:]
    if proc.returncode != 0 or not lines:
        raise ChildFailed(cmd, proc.returncode, tail)
    res = json.loads(lines[-1])
    res["peak_rss_wait4"] = usage.ru_maxrss * 1024
    return res


def ensure_checkpoint(out: Path, arch: str, *args: str, marker: str | None = None) -> bool:
    """Write ``tools/make_checkpoint.py ARCH OUT ARGS...`` unless ``out`` (or ``out/marker``)
    exists. Returns True if it was written now."""
    if (out / marker if marker else out).exists():
        return False
    print(f"writing {out} (make_checkpoint.py {arch} {' '.join(args)}) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), arch, str(out), *args, "--quiet"], check=True)
    return True


def path_bytes(p: Path) -> int:
    """Size of a file, or of the ``*.safetensors`` files in a folder."""
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.glob("*.safetensors"))


def weight_files(p: Path) -> list[Path]:
    """The safetensors files of a checkpoint (a file, or a folder's ``*.safetensors``)."""
    return [p] if p.is_file() else sorted(p.glob("*.safetensors"))


def page_cache_bytes(p: Path) -> int:
    """Bytes of the checkpoint's files that are in the page cache now (mincore on a mapping;
    nothing is read)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page, step, total = mmap.PAGESIZE, 1 << 30, 0
    for f in weight_files(p):
        size = f.stat().st_size
        fd = os.open(f, os.O_RDONLY)
        try:
            for off in range(0, size, step):
                n = min(step, size - off)
                addr = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, off)
                if addr in (None, ctypes.c_void_p(-1).value):
                    return -1
                vec = ctypes.create_string_buffer((n + page - 1) // page)
                try:
                    if libc.mincore(addr, n, vec) != 0:
                        return -1
                finally:
                    libc.munmap(addr, n)
                total += sum(b & 1 for b in vec.raw) * page
        finally:
            os.close(fd)
    return total


def evict_page_cache(p: Path) -> None:
    """Drop the checkpoint's files from the page cache (POSIX_FADV_DONTNEED: this file's clean,
    unmapped pages only; no root needed), so the next run reads them from storage."""
    for f in weight_files(p):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def free_bytes(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free


def rel_err(ours, ref) -> float:
    """max|ours - ref| / max|ref|."""
    import numpy as np

    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def mib(n: float | None, up: bool = False) -> str:
    """``n`` bytes as MiB (rounded to nearest; ``up``: rounded up, for smallest budgets)."""
    if n is None:
        return ""
    return f"{-(-int(n) // MIB)} MiB" if up else f"{n / MIB:.0f} MiB"
