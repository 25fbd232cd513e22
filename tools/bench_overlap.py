#!/usr/bin/env python3
"""How well weight I/O hides behind compute (issue #7): per call, the wall time, the time the
executor's compute thread sat waiting for weights (``Executor.wait_seconds``), the CPU the process
used against what its threads could have used, and the bytes read from storage — once with the
weights in the page cache (warm) and once after evicting the checkpoint's files from it (cold).

    python tools/bench_overlap.py                                  # SD 1.5 UNet 512², budget 2G
    python tools/bench_overlap.py --component transformer --ckpt /tmp/streamexec-bench/flux-slice-1d1s \\
        --size 1024 --budget 1G                                    # a FLUX slice

"wait" is compute time lost to I/O: the goal is < 5 % of the call with a warm cache. With a cold
cache the call cannot be faster than reading the weights once, so the table also gives the
time to read the evicted weights alone and the share of that read hidden behind compute:
1 - (cold call - warm call) / read alone. The SD 1.5 UNet is written with ``tools/make_checkpoint.py`` if missing
(as ``tools/bench_peers.py`` does); the eviction is ``POSIX_FADV_DONTNEED`` (no root needed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from _bench_common import MIB, component_inputs, ensure_checkpoint, evict_page_cache, path_bytes, weight_files

UNET = Path("/tmp/streamexec-bench-sd15-unet-fp16")


def _io_read_bytes() -> int:
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=UNET)
    ap.add_argument("--component", default="unet", help="unet, transformer, text_encoder_2 or text_encoder")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--budget", default="2G")
    ap.add_argument("--repeat", type=int, default=2, help="calls per cache state")
    args = ap.parse_args()
    if args.ckpt == UNET:
        ensure_checkpoint(UNET, "unet", "--preset", "sd15", "--dtype", "fp16", marker="config.json")
    import numba

    import streamexec

    m = streamexec.load(args.ckpt, component=args.component, memory_budget=args.budget)
    feeds = component_inputs(args.component, args.size)
    m(**feeds)  # plan + warm-up
    nthreads = numba.get_num_threads()
    total = path_bytes(args.ckpt)
    print(f"python tools/bench_overlap.py {' '.join(sys.argv[1:])}   ({nthreads} threads, "
          f"{total / MIB:.0f} MiB of weights, budget {args.budget}, load average {os.getloadavg()[0]:.2f})")
    print(f"{'cache':6s} {'call s':>7s} {'wait s':>7s} {'wait %':>7s} {'CPU use':>8s} {'read MiB':>9s} {'overlap':>8s}")
    warm_best = None
    read_alone = None
    for state in ("warm", "cold"):
        if state == "cold":  # the storage alone: read the evicted files once, no compute
            evict_page_cache(args.ckpt)
            t0 = time.perf_counter()
            for f in weight_files(args.ckpt):
                with open(f, "rb", buffering=0) as fh:
                    while fh.read(16 << 20):
                        pass
            read_alone = time.perf_counter() - t0
            print(f"reading the evicted weights alone: {read_alone:.2f} s ({total / read_alone / 1e6:.0f} MB/s)")
        for _ in range(args.repeat):
            if state == "cold":
                evict_page_cache(args.ckpt)
            r0, c0, t0 = _io_read_bytes(), os.times(), time.perf_counter()
            m(**feeds)
            dt = time.perf_counter() - t0
            c1 = os.times()
            cpu = (c1.user + c1.system - c0.user - c0.system) / (dt * nthreads)
            read = _io_read_bytes() - r0
            wait = m.last_executor.wait_seconds
            overlap = ""
            if state == "warm":
                warm_best = dt if warm_best is None else min(warm_best, dt)
            elif read_alone:
                # serial would be warm + read_alone; the share of the read hidden behind compute
                overlap = f"{100 * min(1.0, max(0.0, 1 - (dt - warm_best) / read_alone)):.0f} %"
            print(f"{state:6s} {dt:7.2f} {wait:7.3f} {100 * wait / dt:6.1f}% {100 * cpu:7.0f}% {read / MIB:9.0f} "
                  f"{overlap:>8s}")


if __name__ == "__main__":
    main()
