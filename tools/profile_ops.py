#!/usr/bin/env python3
"""Where one call's time goes (issue #7): runs a component once to plan and warm up, then once
with the executor's trace, and prints time, FLOPs and GFLOP/s per op kind, the slowest ops, and
the time outside ops (Python between ops, waiting for weights).

    python tools/profile_ops.py                                       # SD 1.5 UNet, 512², batch 2
    python tools/profile_ops.py --component transformer --ckpt /tmp/streamexec-bench/flux-slice-1d1s --size 1024
    python tools/profile_ops.py --component text_encoder_2 --ckpt /tmp/streamexec-bench/t5-slice-2l --size 512
    python tools/profile_ops.py --component text_encoder --ckpt /tmp/streamexec-bench/sd15-clip-l-fp16 --size 2

Inputs are the ones ``tools/bench_peers.py`` uses (``_bench_common.model_inputs``, seeded).
FLOPs come from the planner's cost model (``planner/costs.py``; a Winograd conv is credited
with the direct algorithm's FLOPs, so its GFLOP/s is "effective").
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

from _bench_common import component_inputs, ensure_checkpoint

UNET = Path("/tmp/streamexec-bench-sd15-unet-fp16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=UNET)
    ap.add_argument("--component", default="unet")
    ap.add_argument("--size", type=int, default=512, help="image side (unet, transformer) or tokens (T5)")
    ap.add_argument("--budget", default="2G")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    if args.ckpt == UNET:
        ensure_checkpoint(UNET, "unet", "--preset", "sd15", "--dtype", "fp16", marker="config.json")
    import streamexec
    from streamexec.planner.costs import op_cost

    m = streamexec.load(args.ckpt, component=args.component, memory_budget=args.budget)
    feeds = component_inputs(args.component, args.size)
    m(**feeds)
    t0 = time.perf_counter()
    m(**feeds)
    plain = time.perf_counter() - t0
    m.trace = True
    t0 = time.perf_counter()
    m(**feeds)
    wall = time.perf_counter() - t0
    ex = m.last_executor
    g = ex.graph
    nbytes = {k: m.store.nbytes(k) for k in m.store.tensors}
    shapes = {k: tuple(v.shape) for k, v in m.store.tensors.items()}
    agg: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    cost = {}
    for r in ex.records:
        c = op_cost(g, g.ops[r.index], nbytes, shapes)
        cost[r.index] = c
        a = agg[r.kind]
        a[0] += 1
        a[1] += r.seconds
        a[2] += c.flops / 1e9
    ops_s = sum(a[1] for a in agg.values())
    print(f"python tools/profile_ops.py {' '.join(sys.argv[1:])}")
    print(f"call {plain:.2f} s untraced, {wall:.2f} s traced: ops {ops_s:.2f} s, waiting for weights "
          f"{ex.wait_seconds:.3f} s, outside ops {wall - ops_s - ex.wait_seconds:.2f} s; {len(ex.records)} ops")
    print(f"{'kind':20s} {'ops':>4s} {'seconds':>8s} {'share':>6s} {'GFLOP':>8s} {'GFLOP/s':>8s}")
    for kind, (n, s, gf) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"{kind:20s} {n:4d} {s:8.3f} {100 * s / ops_s:5.1f}% {gf:8.1f} {gf / s if s else 0:8.1f}")
    print("slowest ops:")
    for r in sorted(ex.records, key=lambda r: -r.seconds)[: args.top]:
        c = cost[r.index]
        gemm = " ".join(f"{mm}x{nn}x{kk}" + (f"*{cnt}" if cnt > 1 else "") for mm, nn, kk, cnt in c.gemms[:2])
        print(f"  {r.name[-52:]:52s} {r.kind:12s} {r.seconds:7.3f} s {c.flops / 1e9 / r.seconds:7.1f} GFLOP/s  {gemm}")


if __name__ == "__main__":
    main()
