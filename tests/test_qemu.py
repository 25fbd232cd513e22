"""The whole pipeline on an emulated 2010 CPU (issue #14): ``qemu-x86_64 -cpu Westmere`` (SSE4.2,
no AVX/AVX2/AVX-512/F16C — a dual-Xeon server of that year) runs the venv's python on the demo
model (2 steps, 64²) and writes the same PNG as the native run (≤ 2/255 per channel).

Both runs compile for a generic x86-64 (``NUMBA_CPU_NAME=generic``, ``NUMBA_CPU_FEATURES=``
empty; DESIGN.md) into one Numba cache: the native run fills it, the emulated one only loads it
(compiling under emulation would take hours) — checked, as is that numpy inside the emulator
sees no AVX. Needs ``qemu-x86_64`` (Debian ``qemu-user``; ``.ci/run`` installs it); skipped with
the reason elsewhere. ~30 s of CPU under emulation (minutes of wall time on a busy machine).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
QEMU = shutil.which("qemu-x86_64")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86-64 CPU on an x86-64 host"),
    pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed (Debian: apt-get install qemu-user)"),
]

RUN = r"""
import sys
from numpy._core._multiarray_umath import __cpu_features__ as f
print("cpu:", " ".join(k for k in ("AVX", "AVX2", "AVX512F", "F16C") if f.get(k)) or "no AVX", file=sys.stderr)
from streamexec.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_demo_under_qemu_westmere_matches_native(tmp_path: Path) -> None:
    cache = tmp_path / "numba-cache"
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CPU_FEATURES="", OPENBLAS_CORETYPE="Nehalem",
               NUMBA_CACHE_DIR=str(cache), STREAMEXEC_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path))

    def run(prefix: list[str], out: Path) -> subprocess.CompletedProcess:
        argv = [*prefix, sys.executable, "-c", RUN, "run", "plans/demo.yaml", "--prompt", "a lighthouse", "--seed",
                "4", "--steps", "2", "--height", "64", "--width", "64", "--quiet", "-o", str(out)]
        res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    native = run([], tmp_path / "native.png")
    assert "cpu: no AVX" not in native.stderr or "avx" not in Path("/proc/cpuinfo").read_text()
    compiled = time.time()
    time.sleep(1.1)  # file times below: anything the emulated run compiles is newer than this
    t0 = time.monotonic()
    emulated = run([QEMU, "-cpu", "Westmere"], tmp_path / "qemu.png")
    print(f"qemu-x86_64 -cpu Westmere: {time.monotonic() - t0:.0f} s wall; {emulated.stderr.splitlines()[0]}")
    assert "cpu: no AVX" in emulated.stderr, emulated.stderr[-2000:]
    late = [p.name for p in cache.rglob("*.nb[ci]") if p.stat().st_mtime > compiled]
    assert not late, f"compiled under emulation: {late}"
    with Image.open(tmp_path / "native.png") as a, Image.open(tmp_path / "qemu.png") as b:
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    assert diff.shape == (64, 64, 3)
    assert diff.max() <= 2, diff.max()
