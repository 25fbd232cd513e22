"""No AVX assumption: the kernels give the same numbers when Numba compiles for a generic x86-64
(SSE2) CPU and OpenBLAS runs its Nehalem kernels, and that machine code holds no AVX instruction;
the demo model's whole UNet gives the same output that way, with OpenBLAS confirmed on its
Nehalem kernels (``openblas_get_corename``). DESIGN.md: ``NUMBA_CPU_FEATURES`` must be set empty
too — the CPU name alone still lets Numba use the host's features."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 only")
def test_sse_only_path_matches(tmp_path: Path) -> None:
    sys.path.insert(0, str(HERE))
    try:
        import no_avx_probe
    finally:
        sys.path.remove(str(HERE))
    host = no_avx_probe.compute()
    env = dict(
        os.environ, NUMBA_CPU_NAME="generic", NUMBA_CPU_FEATURES="", OPENBLAS_CORETYPE="Nehalem",
        NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"),  # never reuse code compiled for the host
    )
    out = tmp_path / "generic.npz"
    r = subprocess.run([sys.executable, str(HERE / "no_avx_probe.py"), str(out), "--scan"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scanned: 0 functions with AVX" in r.stdout, r.stdout[-3000:]
    generic = np.load(out)
    assert set(generic.files) == set(host)
    for k, v in host.items():
        if k.startswith(("decode", "dequant")):  # exact decodes: bit-exact (NaN where NaN)
            np.testing.assert_array_equal(generic[k], v, err_msg=k)
            continue
        # same math, different vector widths: summation order may differ in the last bits
        scale = max(1.0, float(np.abs(v).max()))
        np.testing.assert_allclose(generic[k], v, rtol=2e-6, atol=2e-6 * scale, err_msg=k)


def test_scan_detects_avx_in_host_code(tmp_path: Path) -> None:
    """The scan above must be able to fail: on an AVX host, host-compiled kernels contain AVX."""
    if "avx" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("host has no AVX, nothing to detect")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    r = subprocess.run([sys.executable, str(HERE / "no_avx_probe.py"), str(tmp_path / "h.npz"), "--scan"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scanned: 0 functions" not in r.stdout and "AVX in" in r.stdout


GENERIC = dict(NUMBA_CPU_NAME="generic", NUMBA_CPU_FEATURES="", OPENBLAS_CORETYPE="Nehalem")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 only")
def test_demo_unet_on_the_sse_only_path(tmp_path: Path) -> None:
    """The demo UNet compiled for a generic x86-64 with OpenBLAS on Nehalem kernels: the same
    output as the host build (up to summation order), no AVX in the kernels it compiled, and
    OpenBLAS really on Nehalem (where the host's own choice is another, the check can fail)."""
    def probe(name: str, **extra: str):
        env = dict(os.environ, STREAMEXEC_CACHE=str(tmp_path / "cache"), **extra)
        scan = ["--scan"] if extra else []
        if extra:  # compiled here, in this process, for the generic CPU: its machine code is scanned
            env.update(NUMBA_CACHE_DIR=str(tmp_path / f"numba-{name}"), STREAMEXEC_JIT="inprocess")
        out = tmp_path / f"{name}.npz"
        r = subprocess.run([sys.executable, str(HERE / "no_avx_probe.py"), str(out), "--unet", *scan],
                           env=env, capture_output=True, text=True, timeout=1800, cwd=HERE.parent)
        assert r.returncode == 0, r.stderr[-3000:]
        core = next(line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("openblas core: "))
        return np.load(out)["unet"], core, r.stdout

    host, host_core, _ = probe("host")
    generic, core, report = probe("generic", **GENERIC)
    print(f"OpenBLAS core: host {host_core}, generic run {core}")
    assert core.lower() == "nehalem", core
    assert "scanned: 0 functions with AVX" in report, report[-3000:]
    if "avx" in Path("/proc/cpuinfo").read_text():
        assert host_core.lower() != "nehalem"  # the override took effect, not the host's own choice
    assert np.isfinite(host).all() and np.abs(host).max() > 0
    err = float(np.abs(generic - host).max() / np.abs(host).max())
    assert err <= 1e-5, err
