"""Helpers shared by the benchmarks (``bench_unet_budget.py``, ``bench_flux.py``, ``bench_peers.py``,
``bench_overlap.py``, ``profile_ops.py``): run a measurement in its own subprocess and read its
peak RSS from the OS, make missing random-weight checkpoints with ``make_checkpoint.py``, the
seeded model inputs every tool feeds, compare outputs. Standard library only at import time
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
TXT_TOKENS = 256  # FLUX.1-schnell's max_sequence_length


def model_inputs(kind: str, size: int, seed: int = 1, latent_channels: int = 4) -> dict:
    """Seeded random inputs of one model call, as the pipelines make them.

    ``kind``/``size``: "unet" (image side; batch 2 = prompt + negative prompt, t = 500), "vae"
    (latent side; ``latent_channels`` 4 for SD 1.5, 16 for FLUX), "clip" (batch of 77 BOS..EOS
    token ids), "flux" (image side: packed latents [1, (size/16)², 64], T5 states
    [1, 256, 4096], CLIP pooled [1, 768], schnell's first t, image ids (0, row, col), zero text
    ids), "t5" (tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    f32 = np.float32
    if kind == "unet":
        lat = size // 8
        return dict(sample=rng.standard_normal((2, 4, lat, lat), dtype=f32), timestep=np.full(2, 500.0, f32),
                    encoder_hidden_states=rng.standard_normal((2, 77, 768), dtype=f32))
    if kind == "vae":
        return dict(z=rng.standard_normal((1, latent_channels, size, size), dtype=f32))
    if kind == "clip":
        ids = rng.integers(1, 49406, (size, 77), dtype=np.int64)
        ids[:, 0] = 49406  # BOS
        ids[:, -1] = 49407  # EOS (the highest id: the pooled token)
        return dict(input_ids=ids)
    if kind == "flux":
        h2 = size // 16
        img_ids = np.zeros((h2, h2, 3), f32)
        img_ids[..., 1] = np.arange(h2)[:, None]
        img_ids[..., 2] = np.arange(h2)[None, :]
        return dict(hidden_states=rng.standard_normal((1, h2 * h2, 64), dtype=f32),
                    encoder_hidden_states=rng.standard_normal((1, TXT_TOKENS, 4096), dtype=f32),
                    pooled_projections=rng.standard_normal((1, 768), dtype=f32),
                    timestep=np.array([1.0], f32), img_ids=img_ids.reshape(-1, 3),
                    txt_ids=np.zeros((TXT_TOKENS, 3), f32))
    if kind == "t5":
        return dict(input_ids=rng.integers(0, 32128, (1, size), dtype=np.int64))
    raise ValueError(f"no inputs for {kind!r} (unet, vae, clip, flux, t5)")


#: component -> model_inputs kind (what --size means: image side, tokens, or CLIP's batch)
KINDS = {"unet": "unet", "transformer": "flux", "text_encoder_2": "t5", "text_encoder": "clip"}


def component_inputs(component: str, size: int) -> dict:
    """:func:`model_inputs` of a checkpoint component (``KINDS``); exits with a readable line
    for a component that has none."""
    if component not in KINDS:
        raise SystemExit(f"no inputs for component {component!r} ({', '.join(KINDS)})")
    return model_inputs(KINDS[component], size)


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
