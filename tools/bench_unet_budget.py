#!/usr/bin/env python3
"""One SD 1.5 UNet step (512², batch 2 = prompt + negative prompt) under several memory budgets,
next to diffusers on the same weights, each side in its own subprocess with its peak RSS read
from the OS (VmHWM). The weights are random with the real SD 1.5 config, stored in fp16
(``tools/make_checkpoint.py unet … --preset sd15 --dtype fp16``; made if missing).

    python tools/bench_unet_budget.py                          # budgets 2G, 512M and the smallest
    python tools/bench_unet_budget.py --budgets 1G,min --json  # machine-readable
    python tools/bench_unet_budget.py --size 256               # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _bench_common import MIB, ChildFailed, ensure_checkpoint, path_bytes, rel_err, run_child

OURS = r"""
import json, sys, time
import numpy as np
from streamexec.runtime.process import peak_rss
t0 = time.perf_counter()
import streamexec
ckpt, budget, out = sys.argv[1], sys.argv[2], sys.argv[5]
repeat = int(sys.argv[6])
m = streamexec.load(ckpt, memory_budget=None if budget == "none" else int(budget))
d = np.load(out + ".in.npz")
times = []
for _ in range(repeat):
    s = time.perf_counter()
    y = m(d["x"], d["t"], d["c"])
    times.append(time.perf_counter() - s)
np.save(out, y)
ex = m.last_executor
print(json.dumps({"step_seconds": times, "peak_rss": peak_rss(), "baseline": m.last_fit.baseline,
                  "planned_peak": m.last_fit.peak, "min_budget": m.last_fit.min_budget,
                  "units": len(m.last_fit.schedule.units), "wait_seconds": ex.wait_seconds,
                  "spill_bytes": ex.spill_bytes_written, "wall": time.perf_counter() - t0}))
"""

THEIRS = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch
from diffusers import UNet2DConditionModel
ckpt, out, repeat, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
m = UNet2DConditionModel.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
d = np.load(out + ".in.npz")
x, t, c = (torch.from_numpy(d[k]) for k in ("x", "t", "c"))
times = []
with torch.no_grad():
    for _ in range(repeat):
        s = time.perf_counter()
        y = m(x, t, encoder_hidden_states=c).sample
        times.append(time.perf_counter() - s)
np.save(out, y.numpy())
rss = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        rss = int(line.split()[1]) * 1024
print(json.dumps({"step_seconds": times, "peak_rss": rss, "wall": time.perf_counter() - t0}))
"""


def run(code: str, *args: str) -> dict:
    try:
        return run_child([sys.executable, "-c", code, *args])
    except ChildFailed as e:
        raise SystemExit(f"subprocess failed:\n{e.stderr[-3000:]}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=os.path.join(tempfile.gettempdir(), "streamexec-bench-sd15-unet-fp16"))
    ap.add_argument("--budgets", default="2G,512M,min", help="comma list of sizes, 'min' and 'none'")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size/8)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="steps per process (the best is reported)")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np

    from streamexec.sizes import parse_size

    ckpt = Path(args.ckpt)
    ensure_checkpoint(ckpt, "unet", "--preset", "sd15", "--dtype", "fp16", marker="config.json")
    ckpt_bytes = path_bytes(ckpt)
    tmp = Path(tempfile.mkdtemp(prefix="bench-unet-"))
    rng = np.random.default_rng(0)
    lat = args.size // 8
    np.savez(tmp / "y.npy.in.npz", x=rng.standard_normal((args.batch, 4, lat, lat), dtype=np.float32),
             t=np.full(args.batch, 500.0, np.float32), c=rng.standard_normal((args.batch, 77, 768), dtype=np.float32))
    out = str(tmp / "y.npy")

    rows = []
    free = run(OURS, str(ckpt), "none", str(args.size), str(args.batch), out, "1")
    smallest = free["min_budget"]
    for b in args.budgets.split(","):
        b = b.strip()
        budget = "none" if b == "none" else str(-(-smallest // MIB) * MIB if b == "min" else parse_size(b))
        r = run(OURS, str(ckpt), budget, str(args.size), str(args.batch), out, str(args.repeat))
        r["label"] = f"streamexec --memory-budget {b}" + (f" ({int(budget) / MIB:.0f} MiB)" if b == "min" else "")
        r["budget"] = None if budget == "none" else int(budget)
        r["output"] = np.load(out)
        rows.append(r)
    if not args.no_diffusers:
        threads = len(os.sched_getaffinity(0))
        r = run(THEIRS, str(ckpt), out, str(args.repeat), str(threads))
        r["label"] = f"diffusers {__import__('diffusers').__version__} / torch f32 ({threads} threads)"
        r["budget"] = None
        r["output"] = np.load(out)
        rows.append(r)
    ref = rows[-1]["output"] if not args.no_diffusers else None
    report = {"checkpoint": str(ckpt), "checkpoint_bytes": ckpt_bytes, "size": args.size, "batch": args.batch,
              "rows": []}
    for r in rows:
        err = None if ref is None else rel_err(r["output"], ref)
        report["rows"].append({k: v for k, v in r.items() if k != "output"} | {"rel_err_vs_diffusers": err})
    if args.json:
        print(json.dumps(report, indent=1))
        return
    theirs = rows[-1] if not args.no_diffusers else None
    print(f"SD 1.5 UNet, one step at {args.size}x{args.size}, batch {args.batch}; checkpoint "
          f"{ckpt_bytes / MIB:.0f} MiB fp16 ({ckpt})")
    print(f"{'run':<52} {'step s':>8} {'peak RSS':>12} {'time/diffusers':>15} {'RSS/diffusers':>14} {'rel err':>9}")
    for r, rep in zip(rows, report["rows"]):
        best = min(r["step_seconds"])
        tr = "" if theirs is None else f"{best / min(theirs['step_seconds']):.2f}"
        rr = "" if theirs is None else f"{r['peak_rss'] / theirs['peak_rss']:.2f}"
        err = "" if rep["rel_err_vs_diffusers"] is None else f"{rep['rel_err_vs_diffusers']:.1e}"
        print(f"{r['label']:<52} {best:>8.2f} {r['peak_rss'] / MIB:>8.0f} MiB {tr:>15} {rr:>14} {err:>9}")
    print(f"smallest budget that fits: {smallest / MIB:.0f} MiB (process baseline {free['baseline'] / MIB:.0f} MiB)")


if __name__ == "__main__":
    main()
