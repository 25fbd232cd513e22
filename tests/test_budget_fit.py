"""The budget flag's promise (issue 15): every budget from the reported minimum upward plans, the
planned peak stays within it, and a larger budget never gets a schedule the cost model predicts
slower. Checked as a property over the tiny model families (SD UNet, CLIP, VAE decode and encode,
FLUX transformer, T5) with random budgets, planning only (no kernels run in the loop); a sample
of budgets then runs the whole tiny SD pipeline with its peak RSS measured by the kernel from the
parent process (``wait4``'s ``ru_maxrss``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from streamexec.errors import BudgetError
from streamexec.models.registry import RunShape, build_component
from streamexec.planner.fit import fit_schedule, weight_table
from streamexec.weights.checkpoint import open_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20

#: (preset, component, image side, VAE direction)
FAMILIES = [
    ("tiny-sd15", "unet", 128, "decode"),
    ("tiny-sd15", "text_encoder", 64, "decode"),
    ("tiny-sd15", "vae", 256, "decode"),
    ("tiny-sd15", "vae", 128, "encode"),
    ("tiny-flux-schnell", "transformer", 256, "decode"),
    ("tiny-flux-schnell", "text_encoder_2", 64, "decode"),
]


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name in ("tiny-sd15", "tiny-flux-schnell"):
        path = tmp_path_factory.mktemp("fit") / name
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), "all", str(path), "--preset", name,
                        "--layout", "pipeline", "--dtype", "bf16", "--quiet"], check=True, cwd=ROOT)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def graphs(presets) -> dict[tuple, tuple]:
    out = {}
    for fam in FAMILIES:
        preset, comp, side, mode = fam
        ckpt = open_checkpoint(presets[preset])
        configs = {n: dict(c.config or {}) for n, c in ckpt.components.items()}
        store = ckpt.store(comp)
        table = weight_table(store)
        store.close()

        def info(key: str, table=table):
            m = table.get(key)
            return None if m is None else (m.shape, m.dtype)

        graph = build_component(comp, configs.get(comp, {}), info, RunShape(side, side, 1), configs,
                                str(presets[preset]), vae_mode=mode)
        ckpt.close()
        out[fam] = (graph, table)
    return out


@pytest.mark.parametrize("family", FAMILIES, ids=[f"{c}-{m}" if c == "vae" else c for _, c, _, m in FAMILIES])
def test_every_budget_above_the_minimum_fits_and_more_is_never_slower(graphs, family) -> None:
    graph, table = graphs[family]
    smallest = fit_schedule(graph, table, "min", 0)
    unbounded = fit_schedule(graph, table, None, 0)
    lo, hi = smallest.min_budget, unbounded.peak
    assert smallest.peak <= lo <= hi
    assert smallest.seconds >= unbounded.seconds

    @settings(max_examples=6, deadline=None, derandomize=True)
    @given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=3))
    def prop(fracs: list[float]) -> None:
        budgets = sorted({int(lo + f * (hi - lo)) for f in fracs} | {hi})
        seconds = []
        for b in budgets:
            fit = fit_schedule(graph, table, b, 0)
            assert fit.peak <= b, (b, fit.peak)
            seconds.append(fit.seconds)
        assert all(a >= b for a, b in zip(seconds, seconds[1:])), list(zip(budgets, seconds))

    prop()


@pytest.mark.parametrize("family", FAMILIES[2:5:2], ids=["vae-decode", "transformer"])
def test_too_small_a_budget_names_a_minimum_that_plans(graphs, family) -> None:
    graph, table = graphs[family]
    lo = fit_schedule(graph, table, "min", 0).min_budget
    with pytest.raises(BudgetError) as e:
        fit_schedule(graph, table, lo - 1, 0)
    found = re.search(r"smallest that fits is ([\d.]+) (KiB|MiB)", str(e.value))
    assert found, str(e.value)
    stated = int(float(found.group(1)) * (MiB if found.group(2) == "MiB" else 1024))
    assert stated >= lo - 1024  # the message rounds to what format_size prints, not below the minimum
    fit = fit_schedule(graph, table, max(stated, lo), 0)
    assert fit.peak <= max(stated, lo)


#: Runs the CLI in this process, then reports and waits: the parent reads the child's VmHWM from
#: /proc while the child is still alive (the kernel's counter, not the child's own account).
_HOLD = """
import sys
from streamexec.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("done", code, flush=True)
sys.stdin.readline()
"""


def _run_measured(args: list[str]) -> tuple[int, int]:
    """Run ``streamexec ARGS`` in a child; (its exit code, its peak RSS read from the parent)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, *args], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdin is not None
    line = ""
    while not line.startswith("done"):
        line = proc.stdout.readline()
        assert line, "the child died"
    word = line.split()[1]
    code = 0 if word == "None" else int(word)
    status = Path(f"/proc/{proc.pid}/status").read_text()
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    proc.communicate("\n", timeout=60)
    return code, peak


def test_a_sample_of_budgets_runs_within_them_measured_from_outside(presets, tmp_path: Path) -> None:
    ckpt = presets["tiny-sd15"]
    cli = [sys.executable, "-m", "streamexec"]
    shape = ["--height", "128", "--width", "128"]
    peaks = {}
    for label, budget in (("min", "min"), ("none", None)):
        out = tmp_path / f"{label}.yaml"
        args = cli + ["plan", str(ckpt), *shape, "-o", str(out)] + (["--memory-budget", budget] if budget else [])
        subprocess.run(args, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        peaks[label] = yaml.safe_load(out.read_text())["memory"]["peak_bytes"]
    lo, hi = peaks["min"], peaks["none"]
    assert lo <= hi
    for frac in (0.0, 0.5):
        budget = int(lo + frac * (hi - lo)) + MiB  # + the run-time process's own drift from the planning one
        code, peak = _run_measured(["run", str(ckpt), "--prompt", "a red cube", "--steps", "1", *shape,
                                    "--memory-budget", str(budget), "--strict", "--quiet",
                                    "-o", str(tmp_path / f"{frac}.png")])
        assert code == 0
        assert peak <= budget, (frac, peak / MiB, budget / MiB)
