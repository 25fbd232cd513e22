"""The budget guard at run time (issue #8): the executor samples the process after every op and,
when the planner was wrong and the process goes over the budget, either stops at that op
(``--strict`` / ``strict=True``) or cuts the rest of the run finer and says so.

Wrong estimates are forced two ways, each in a subprocess so that VmHWM is the run's own:

- an op that needs 96 MiB the planner never counted (a kernel scratch formula that is off):
  ``streamexec run --strict`` stops there with one line naming it, no PNG and no scratch left;
  without ``--strict`` the run finishes, warns, and the image is the same as without the fault;
- a process baseline measured too low (the planner believes it has 60 MiB more than it has): the
  guard switches to one op per unit without mapping ahead and shrinks later kernel parameters,
  and the process peak (sampled from outside by ``tests/outside_memory.py``, not the planner's
  arithmetic) ends lower than the same plan run unguarded, with the same output. The guard
  itself never resets VmHWM (checked: no decrease in the first call's window); the runner
  resets it once, between the two calls, so that the parent reads the second call's own peak.

And a correct plan at its smallest budget makes no guard event at all (no false alarms).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from outside_memory import run_measured

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20

# -- the CLI: an op hungrier than the plan says ------------------------------------------------------
HUNGRY = r"""
import sys
from pathlib import Path
import numpy as np
from streamexec.runtime import ops
from streamexec.cli import main
target, extra, log, scratch = sys.argv[1], int(sys.argv[2]) << 20, Path(sys.argv[3]), Path(sys.argv[4])
conv = ops.OPS["conv2d"]
def hungry(ctx, op, args, shape):  # this op needs `extra` bytes the planner never counted
    out = conv(ctx, op, args, shape)
    if op.name == target:
        hog = np.ones(extra // 8)  # written, so resident
        log.write_text(str(len(list(scratch.glob("streamexec-spill-*/*")))))  # scratch files now
        del hog
    return out
ops.OPS["conv2d"] = hungry
sys.exit(main(sys.argv[5:]))
"""
TARGET = "decoder.up_blocks.2.resnets.0.conv2"


def _hungry_run(env: dict, tmp_path: Path, out: Path, *flags: str, extra_mib: int = 96):
    scratch, log = tmp_path / "scratch", tmp_path / "scratch-files-at-overshoot"
    res = subprocess.run(
        [sys.executable, "-c", HUNGRY, TARGET, str(extra_mib), str(log), str(scratch),
         "run", "plans/demo.yaml", "--prompt", "a lighthouse", "--steps", "2", "--quiet", "--memory-budget", "smallest",
         "--scratch-dir", str(scratch), "-o", str(out), *flags],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    return res, scratch, (int(log.read_text()) if log.exists() else None)


def test_strict_run_stops_at_the_op_that_overshoots(env: dict, tmp_path: Path) -> None:
    out = tmp_path / "img" / "never.png"
    out.parent.mkdir()
    res, scratch, files_then = _hungry_run(env, tmp_path, out, "--strict")
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"streamexec: error: strict memory budget: peak RSS [\d.]+ MiB exceeded the budget [\d.]+ MiB during op "
        + re.escape(TARGET) + r" \(conv2d\) of AutoencoderKL\.decode; the plan estimated [\d.]+ MiB for it "
        r"\(RSS now [\d.]+ MiB\)", last), last
    assert sum("error" in line for line in res.stderr.splitlines()) == 1
    peak, budget = (float(x) for x in re.findall(r"([\d.]+) MiB", last)[:2])
    assert peak > budget
    assert list(out.parent.iterdir()) == []  # no PNG, no partial file
    assert files_then and files_then > 0  # activations were on disk when it stopped ...
    assert list(scratch.iterdir()) == []  # ... and the scratch folder is gone
    assert list(Path(env["TMPDIR"]).glob("streamexec-spill-*")) == []


def test_without_strict_the_guard_warns_and_the_image_is_the_same(env: dict, tmp_path: Path) -> None:
    out, ref = tmp_path / "guarded.png", tmp_path / "ref.png"
    res, scratch, _ = _hungry_run(env, tmp_path, out)
    assert res.returncode == 0, res.stderr[-3000:]
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning: budget guard:")]
    assert warned and all(TARGET in line for line in warned), res.stderr[-3000:]
    assert "over the budget" in warned[0]
    assert list(scratch.iterdir()) == []
    clean = subprocess.run(
        [sys.executable, "-m", "streamexec", "run", "plans/demo.yaml", "--prompt", "a lighthouse", "--steps", "2",
         "--quiet", "--memory-budget", "smallest", "-o", str(ref)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert "budget guard" not in clean.stderr  # a correct plan: no false alarm
    assert out.read_bytes() == ref.read_bytes()


# -- the API: a plan made with a baseline that is too small -----------------------------------------
UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(192, 384, 768),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
)

RUNNER = r"""
import json, sys, time
import numpy as np
import streamexec
import streamexec.api as api
from streamexec.errors import BudgetError
from streamexec.runtime.process import reset_peak_rss
path, budget, under, mode, out = sys.argv[1], sys.argv[2], int(sys.argv[3]) << 20, sys.argv[4], sys.argv[5]
budget = budget if budget in ("min", "none") else int(budget)
m = streamexec.load(path, memory_budget=None if budget == "none" else budget, strict=mode == "strict")
dtypes = {t.dtype for t in m.store.tensors.values()}
real = api.process_baseline(dtypes)
api._BASELINE[frozenset(dtypes)] = real - under  # the planner's view of this process
m.guard = mode != "off"
d = np.load(path + ".in.npz")
call = (lambda: m(d["x"], d["t"], d["c"])) if "x" in d else (lambda: m.decode(d["z"]))
info = {"baseline": real}
try:
    y = call()
except BudgetError as e:
    info["error"] = str(e)
else:
    np.save(out, y)
    info["events"] = [[e.name, e.trigger, e.action] for e in m.last_executor.guard_events]
    info["trace_events"] = len(m.last_executor.trace_json()["guard_events"])
    info["units"] = len(m.last_fit.schedule.units)
    info["min_budget"] = m.last_fit.min_budget
    info["fit_peak"] = m.last_fit.peak
    info["first_end"] = time.monotonic()
    time.sleep(0.1)  # the parent samples the first call's final VmHWM ...
    info["reset"] = reset_peak_rss()  # ... then VmHWM restarts, so it reads the second call's own peak
    info["second_start"] = time.monotonic()
    y2 = call()
    info["second"] = [[e.name, e.trigger, e.action] for e in m.last_executor.guard_events]
    info["same"] = bool(np.abs(y2 - y).max() <= 1e-5 * np.abs(y).max())
print(json.dumps(info))
"""


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    """A UNet with fp16 weights (215 MiB) whose weights, not activations, fill the budget."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("guard") / "unet"
    UNet2DConditionModel(**UNET).eval().half().save_pretrained(path)
    g = np.random.default_rng(1)
    np.savez(str(path) + ".in.npz", x=g.standard_normal((2, 4, 16, 16)).astype(np.float32),
             t=np.array([500.0, 17.0], np.float32), c=g.standard_normal((2, 7, 256)).astype(np.float32))
    return path


def _run(path: Path, budget, under_mib: int, mode: str, out: Path) -> dict:
    """The runner in a child, its memory sampled from outside: ``peak`` of the first call, and
    ``second_peak`` of the second (after the runner's own reset between them)."""
    res = run_measured([sys.executable, "-c", RUNNER, str(path), str(budget), str(under_mib), mode, str(out)],
                       timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["stderr"] = res.stderr
    if "first_end" in info:
        info["peak"], decreased = res.window(0, info["first_end"] + 0.08)
        assert not decreased, f"VmHWM went down during the first call: the guard reset it ({res.describe()})"
        if not info["reset"]:
            pytest.skip("/proc/self/clear_refs is not writable: the second call's own peak cannot be read")
        info["second_peak"] = max(h for t, _, h in res.timeline if t > info["second_start"])
    else:
        info["peak"] = res.peak
        assert not res.hwm_decreased
    print(f"{mode} budget {budget}: first call {info['peak'] / MiB:.1f} MiB"
          + (f", second {info['second_peak'] / MiB:.1f} MiB" if "second_peak" in info else "")
          + f" ({res.describe()})")
    return info


def test_guard_cuts_a_wrong_plan_finer_and_lowers_its_peak(unet_dir: Path, tmp_path: Path) -> None:
    # what the fastest schedule takes, as planned with this process's real baseline
    free = _run(unet_dir, "none", 0, "on", tmp_path / "free.npy")
    fastest = free["fit_peak"]
    # a budget 40 MiB under that, planned by a process that believes it is 60 MiB smaller: the plan
    # maps every next block ahead and keeps blocks whole, and the real process goes over
    budget = fastest - 40 * MiB
    on = _run(unet_dir, budget, 60, "on", tmp_path / "on.npy")
    off = _run(unet_dir, budget, 60, "off", tmp_path / "off.npy")
    strict = _run(unet_dir, budget, 60, "strict", tmp_path / "strict.npy")

    assert off["events"] == [] and off["peak"] > budget  # the wrong plan, unguarded, breaks the budget
    actions = [a for _, _, a in on["events"]]
    assert actions[0] == "stream" and "shrink" in actions, on["events"]
    assert any(t == "over" for _, t, _ in on["events"]) or on["peak"] <= budget
    assert on["trace_events"] == len(on["events"])
    assert on["units"] > off["units"]  # the adapted schedule is kept for the next call ...
    assert all(a != "stream" for _, _, a in on["second"])  # ... which does not start over
    warned = [line for line in on["stderr"].splitlines() if "budget guard:" in line]
    assert len(warned) == len(on["events"]) + len(on["second"])  # one line per adaptation
    print(f"budget {budget / MiB:.1f} MiB: peak {on['peak'] / MiB:.1f} MiB guarded ({len(on['events'])} "
          f"adaptations), {on['second_peak'] / MiB:.1f} MiB in the next call; {off['peak'] / MiB:.1f} MiB unguarded")
    # the guard reacts after the op that overshot: the first call's peak may be that op's; the
    # next call (a UNet's next step) starts from the adapted schedule and stays clearly lower
    assert on["peak"] <= off["peak"] + 2 * MiB
    assert on["second_peak"] < off["peak"] - 8 * MiB
    assert on["same"] and off["same"]
    # kernel parameters change the tiling only: the same numbers up to float reassociation
    ref, ours, plain = np.load(tmp_path / "off.npy"), np.load(tmp_path / "on.npy"), np.load(tmp_path / "free.npy")
    assert np.array_equal(ref, plain)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()

    err = strict["error"]
    assert err.startswith("strict memory budget: peak RSS") and "exceeded the budget" in err, err
    assert re.search(r"during op \S+ \(\w+\) of UNet2DConditionModel; the plan estimated", err), err
    assert "\n" not in err


def test_correct_plan_triggers_no_guard_event(unet_dir: Path, tmp_path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL
    from helpers import VAE_CONFIGS, randomize

    free = _run(unet_dir, "none", 0, "on", tmp_path / "u.npy")
    smallest = -(-free["min_budget"] // MiB) * MiB
    for budget in (smallest, "min"):
        tight = _run(unet_dir, budget, 0, "on", tmp_path / "u.npy")
        assert tight["events"] == [] and tight["second"] == [], tight["events"]
        assert "budget guard" not in tight["stderr"]
        assert tight["peak"] <= (budget if isinstance(budget, int) else free["min_budget"])

    cfg = VAE_CONFIGS["sd-4ch-quant"]
    n = len(cfg["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, norm_num_groups=8, **cfg).eval()
    randomize(vae, 3)
    vae.save_pretrained(tmp_path / "vae")
    z = torch.randn(1, 4, 48, 40, generator=torch.Generator().manual_seed(4)).numpy()
    np.savez(str(tmp_path / "vae") + ".in.npz", z=z)
    tight = _run(tmp_path / "vae", "min", 0, "on", tmp_path / "v.npy")
    assert tight["events"] == [] and tight["second"] == [], tight["events"]
