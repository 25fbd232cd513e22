"""tools/fuzz_inputs.py runs (a few cases of each target here; the long run is the tool's job) and
reports what it ran: the case count, no failure, no crash, no hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("hypothesis")


def test_fuzz_tool_quick_run_reports_cases_and_no_crash(tmp_path: Path) -> None:
    out = tmp_path / "fuzz-out"
    res = subprocess.run([sys.executable, "tools/fuzz_inputs.py", "--cases", "50", "--chunk", "25", "--seconds", "600",
                          "--out", str(out), "--json"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert set(summary) == {"safetensors", "gguf", "plan"}
    for target, r in summary.items():
        assert r["cases"] == 50, (target, r["cases"])
        assert r["chunks"] == 2
        assert r["failures"] == [] and r["crashes"] == [] and r["hangs"] == [], (target, r)
        assert r["loaded"] + sum(r["errors"].values()) == 50  # every case loaded or was refused in one line
        assert sum(r["modes"].values()) == 50
    assert not out.exists()  # nothing to keep
    assert list(tmp_path.glob("streamexec-fuzz-*")) == []  # the work folder is removed


def test_fuzz_tool_text_summary(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "tools/fuzz_inputs.py", "--target", "safetensors", "--cases", "20",
                          "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("safetensors: 20 cases in ") and "failures 0, crashes 0, hangs 0" in lines[0]
    assert lines[-1] == "total: 20 cases, failures 0, crashes 0, hangs 0"
