#!/usr/bin/env python3
"""The budget -> speed curve of one component (issue 15): plan and run it at a ladder of memory
budgets from the smallest that fits to unbounded, each in its own subprocess, with the peak RSS
read by this (parent) process from the child's /proc/<pid>/status (VmHWM, the kernel's counter)
while the child waits after its last call, and the time per call measured in the child.

    python tools/bench_budget_curve.py CKPT --component unet --size 512            # SD 1.5 UNet, batch 2
    python tools/bench_budget_curve.py CKPT --component vae --size 512 --steps 8   # VAE decode 512²
    python tools/bench_budget_curve.py CKPT --component unet --budgets min,300M,2G --markdown
    python tools/bench_budget_curve.py CKPT --component pipeline --budgets min,300M,none --calls 2

CKPT is a pipeline or component folder (``tools/make_checkpoint.py all OUT --preset sd15 --layout
pipeline --dtype fp16`` makes a full-size random one). ``--steps`` is the number of rungs between
the smallest budget and the unbounded peak (both included, plus "none"). Each child makes one
warm-up call (JIT cache, page cache) and then ``--calls`` timed ones; the best is reported.
Timings on a shared machine are noisy: run it under ``nice`` and compare rungs of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 1 << 20

#: component -> (``_bench_common.model_inputs`` kind, how ``--size`` becomes its size argument)
KINDS = {"unet": ("unet", 1), "vae": ("vae", 8), "transformer": ("flux", 1), "text_encoder_2": ("t5", 1),
         "text_encoder": ("clip", 1)}

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from _bench_common import model_inputs
import streamexec
ckpt, comp, budget, kind = sys.argv[2:6]
size, calls = int(sys.argv[6]), int(sys.argv[7])
m = streamexec.load(ckpt, component=comp, memory_budget=None if budget == "none" else budget)
feeds = model_inputs(kind, size)
call = (lambda: m.decode(feeds["z"])) if comp == "vae" else (lambda: m(**feeds))
call()  # warm-up: kernels compiled or loaded, weights in the page cache
times = []
for _ in range(calls):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
f, ex = m.last_fit, m.last_executor
print(json.dumps({"seconds": times, "planned_peak": f.peak, "predicted": f.seconds, "min_budget": f.min_budget,
                  "baseline": f.baseline, "units": len(f.schedule.units), "spill_bytes": ex.spill_bytes_written,
                  "wait_seconds": ex.wait_seconds, "guard_events": len(ex.guard_events)}), flush=True)
sys.stdin.readline()  # the parent reads our VmHWM now
"""


#: The whole text-to-image run (``--component pipeline``), as ``streamexec run MODEL`` does it: the
#: pipeline plans every component in this process (its own baseline), then runs once.
PIPELINE = r"""
import json, sys, time
from streamexec.pipelines.generate import Pipeline, Request
ckpt, budget, size, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
with Pipeline.open(ckpt, memory_budget=None if budget == "none" else budget) as pipe:
    res = pipe(Request("a lighthouse at dusk", seed=1, steps=steps, height=size, width=size))
    seconds = time.perf_counter() - t0
    fits = [m.last_fit for m in pipe.models.values() if m.last_fit is not None]
    execs = [m.last_executor for m in pipe.models.values() if m.last_executor is not None]
    print(json.dumps({"seconds": [seconds], "stages": res.stage_seconds,
                      "planned_peak": max(f.peak for f in fits), "predicted": sum(f.seconds for f in fits),
                      "min_budget": max(f.min_budget for f in fits), "baseline": max(f.baseline for f in fits),
                      "spill_bytes": sum(e.spill_bytes_written for e in execs),
                      "guard_events": sum(len(e.guard_events) for e in execs)}), flush=True)
sys.stdin.readline()
"""


def measure(ckpt: str, comp: str, budget: str, size: int, calls: int) -> dict:
    """One rung in a child process; its JSON plus ``outside_peak`` (VmHWM read by this process).
    For ``comp == "pipeline"``, ``calls`` is the number of denoising steps of one whole run."""
    if comp == "pipeline":
        cmd = [sys.executable, "-c", PIPELINE, ckpt, budget, str(size), str(calls)]
    else:
        kind, div = KINDS[comp]
        cmd = [sys.executable, "-c", CHILD, str(HERE), ckpt, comp, budget, kind, str(size // div), str(calls)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    while line and not line.startswith("{"):  # the CLI's own lines
        line = proc.stdout.readline()
    if not line.startswith("{"):
        _, err = proc.communicate()
        raise SystemExit(f"budget {budget}: the child failed:\n{err[-3000:]}")
    status = Path(f"/proc/{proc.pid}/status").read_text()
    res = json.loads(line)
    res["outside_peak"] = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    proc.communicate("\n", timeout=120)
    return res


def plan_bounds(ckpt: str, comp: str, size: int, vae_mode: str) -> tuple[int, int]:
    """(smallest budget that fits, unbounded planned peak), from ``streamexec plan`` in a child."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("min", ["--memory-budget", "min"]), ("none", [])):
            path = Path(tmp) / f"{label}.yaml"
            which = [] if comp == "pipeline" else ["--component", comp]
            subprocess.run([sys.executable, "-m", "streamexec", "plan", ckpt, *which, "--height",
                            str(size), "--width", str(size), "--vae-mode", vae_mode, "-o", str(path), *extra],
                           check=True, capture_output=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
            import yaml

            out[label] = yaml.safe_load(path.read_text())["memory"]
    return int(out["min"]["min_budget_bytes"]), int(out["none"]["peak_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--component", default="unet", choices=sorted(KINDS) + ["pipeline"],
                    help="a component, or 'pipeline': plan + run the whole text-to-image run per rung")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (tokens for T5, batch for CLIP)")
    ap.add_argument("--steps", type=int, default=5, help="rungs from the smallest budget to the unbounded peak")
    ap.add_argument("--budgets", default=None, help="comma list of sizes, 'min' and 'none' instead of the ladder")
    ap.add_argument("--calls", type=int, default=1, help="timed calls per rung after one warm-up call "
                    "(pipeline: denoising steps of the one timed run, which includes start-up)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    if args.budgets:
        budgets = [b.strip() for b in args.budgets.split(",")]
    else:
        lo, hi = plan_bounds(args.ckpt, args.component, args.size, "decode")
        lo = -(-lo // MIB) * MIB
        n = max(1, args.steps)
        budgets = ["min"] + [str(int(lo + (hi - lo) * k / n)) for k in range(1, n + 1)] + ["none"]
    rows = []
    for b in budgets:
        r = measure(args.ckpt, args.component, b, args.size, args.calls)
        r["budget"] = b
        rows.append(r)
        print(f"  {b}: {min(r['seconds']):.2f} s/call, outside peak {r['outside_peak'] / MIB:.1f} MiB",
              file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    head = ["budget", "planned peak", "outside peak", "predicted s", "s/call", "spilled", "guard"]
    widths = [16, 12, 12, 11, 8, 10, 6]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if args.markdown else [
        " ".join(f"{h:>{w}}" for h, w in zip(head, widths))]
    for r in rows:
        b = r["budget"]
        label = b if not b.isdigit() else f"{int(b) / MIB:.0f} MiB"
        if b == "min":
            label = f"min ({r['planned_peak'] / MIB:.0f} MiB)"
        cells = [label, f"{r['planned_peak'] / MIB:.1f} MiB", f"{r['outside_peak'] / MIB:.1f} MiB",
                 f"{r['predicted']:.2f}", f"{min(r['seconds']):.2f}", f"{r['spill_bytes'] / MIB:.0f} MiB",
                 str(r["guard_events"])]
        lines.append("| " + " | ".join(cells) + " |" if args.markdown else
                     " ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    print(f"python tools/bench_budget_curve.py {' '.join(sys.argv[1:])}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
