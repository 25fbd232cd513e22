"""Faults and hostile inputs (issue #8, first part): a full disk while spilling, SIGTERM mid-run,
a fuzzed plan loader, and the ``auto`` budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from _fuzz_strategies import JUNK, mutate, plan_paths
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamexec.errors import StreamexecError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs (needs root and mount; skipped with the reason otherwise)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.strip() or 'not root'})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_while_spilling_is_one_clean_error(small_tmpfs: Path, tmp_path: Path) -> None:
    from streamexec.pipelines.demo import ensure_demo_model

    os.environ["STREAMEXEC_CACHE"] = str(tmp_path / "cache")
    model = ensure_demo_model()
    env = dict(os.environ, STREAMEXEC_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "x.png"
    res = subprocess.run([sys.executable, "-m", "streamexec", "run", str(model), "--prompt", "x", "--steps", "2",
                          "--memory-budget", "smallest", "--scratch-dir", str(small_tmpfs), "-o", str(out)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("streamexec: error: disk full while") and "--scratch-dir" in last
    assert not out.exists()
    assert list(small_tmpfs.iterdir()) == []  # the scratch folder is gone


def test_sigterm_mid_run_leaves_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, STREAMEXEC_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path))
    out = tmp_path / "out" / "never.png"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "streamexec", "run", "plans/demo.yaml", "--prompt", "x",
                             "--steps", "200", "--memory-budget", "smallest", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if "denoise" in proc.stderr.readline():
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert list(out.parent.iterdir()) == []
    assert list(tmp_path.glob("streamexec-spill-*")) == []


def _plan_text(tmp_path: Path) -> str:
    from streamexec.cli import main

    os.environ["STREAMEXEC_CACHE"] = str(tmp_path / "cache")
    from streamexec.pipelines.demo import ensure_demo_model

    model = ensure_demo_model()
    out = tmp_path / "p.yaml"
    assert main(["plan", str(model), "--component", "text_encoder", "-o", str(out)]) == 0
    return out.read_text()


@pytest.fixture(scope="module")
def plan_dict(tmp_path_factory) -> dict:
    return yaml.safe_load(_plan_text(tmp_path_factory.mktemp("fuzzplan")))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_plans_fail_cleanly(plan_dict: dict, tmp_path_factory, data) -> None:
    """Any edit of a valid plan either still loads or fails with our one-line PlanError — never
    another exception (which the CLI would report as an internal error)."""
    import copy

    from streamexec.planner.plan import graph_from_dict, read_plan_dict

    d = copy.deepcopy(plan_dict)
    paths = list(plan_paths(d))
    for _ in range(data.draw(st.integers(1, 3))):
        p = data.draw(st.sampled_from(paths))
        try:
            mutate(d, list(p), data.draw(JUNK))
        except (KeyError, IndexError, TypeError):
            pass
    f = tmp_path_factory.mktemp("f") / "p.yaml"
    f.write_text(yaml.safe_dump(d))
    try:
        loaded = read_plan_dict(f)
        for name, c in (loaded.get("components") or {}).items():
            graph_from_dict(name, c)
    except StreamexecError:
        pass


def test_auto_budget_is_below_what_the_machine_has() -> None:
    import psutil

    from streamexec.memlimit import auto_budget, memory_limit

    limit, source = memory_limit()
    assert 0 < auto_budget() < limit <= psutil.virtual_memory().total
    assert source
    assert isinstance(np.int64(auto_budget()), np.integer)


def test_resume_checkpoint_is_written_whole_with_signals_held(tmp_path: Path, monkeypatch) -> None:
    """A SIGINT arriving between the checkpoint's files (here: while the latents are written) is
    delivered only after all three are written, so the .json never names older latents."""
    import json

    import streamexec.pipelines.png as png
    from streamexec.run import array_digest, write_checkpoint

    real = png.save_npy

    def save_npy_then_sigint(path, array):
        out = real(path, array)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # time enough for the handler to run
        return out

    monkeypatch.setattr(png, "save_npy", save_npy_then_sigint)
    lat = tmp_path / "L.npy"
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    state = {"old": np.ones(3, np.float32)}
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(str(lat), 4, x, state, {"seed": 1})
    meta = json.loads((tmp_path / "L.npy.json").read_text())
    assert meta["step"] == 4
    assert meta["latents_sha256"] == array_digest({"latents": np.load(lat)})
    with np.load(tmp_path / "L.npy.state.npz") as z:
        assert meta["state_sha256"] == array_digest({k: z[k] for k in z.files})
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the old handler is back
