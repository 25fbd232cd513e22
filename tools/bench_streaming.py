#!/usr/bin/env python3
"""Walk a checkpoint tensor by tensor through a WeightStore, touching every byte and releasing
each tensor after use (prefetching the next one meanwhile), and report peak RSS and read
bandwidth next to ``cat FILE > /dev/null`` of the same file.

    python tools/bench_streaming.py --make /tmp/walk.safetensors --gib 4   # write a test file
    python tools/bench_streaming.py /tmp/walk.safetensors [--cold] [--json]

``--cold`` drops the page cache before each measurement (needs root). The walk runs in a
subprocess so that its peak RSS (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def make_file(path: Path, gib: float, tensor_mib: int = 16) -> None:
    """A BF16 checkpoint of ``gib`` GiB made of ``tensor_mib`` MiB tensors, written streaming."""
    from streamexec.weights.writer import PendingTensor, write_safetensors

    cols = 2048
    rows = tensor_mib * (1 << 20) // (2 * cols)
    count = max(1, int(gib * 1024 / tensor_mib))
    rng = np.random.default_rng(0)
    block = rng.integers(0, 65535, (rows, cols), dtype=np.uint16)

    def produce(i: int):
        return lambda write: write(block + np.uint16(i))

    write_safetensors(
        path, [PendingTensor(f"layers.{i}.weight", "BF16", (rows, cols), produce(i)) for i in range(count)]
    )


def walk(path: Path) -> dict:
    """The measured walk (run in a fresh process)."""
    from streamexec.weights.refs import StoredTensor, single
    from streamexec.weights.safetensors_file import SafetensorsFile
    from streamexec.weights.store import WeightStore

    f = SafetensorsFile(path)
    tensors = {
        k: single(StoredTensor(str(path), k, t.dtype.tag, t.shape)) for k, t in f.tensors.items()
    }
    store = WeightStore(tensors, {str(path): f})
    keys = list(tensors)
    start_rss = proc_status_kib("VmRSS") * 1024
    max_resident = 0
    t0 = time.perf_counter()
    checksum = 0
    if keys:
        store.prefetch([keys[0]])
    for i, k in enumerate(keys):
        store.wait()
        if i + 1 < len(keys):
            store.prefetch([keys[i + 1]])
        arr = store.get(k).array
        checksum ^= int(arr.view(np.uint8).max())  # touches every byte
        max_resident = max(max_resident, store.measured_resident_bytes())
        store.release([k])
    seconds = time.perf_counter() - t0
    store.close()
    return {
        "bytes": f.size,
        "tensors": len(keys),
        "seconds": seconds,
        "gb_per_s": f.size / seconds / 1e9,
        "start_rss": start_rss,
        "peak_rss": proc_status_kib("VmHWM") * 1024,
        "max_mapped_resident": max_resident,
        "checksum": checksum,
    }


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?")
    ap.add_argument("--make", metavar="FILE", help="write a synthetic BF16 checkpoint and exit")
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--walk-only", action="store_true", help="(internal) run the walk in this process")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.make:
        make_file(Path(args.make), args.gib)
        return
    if not args.file:
        ap.error("give FILE or --make FILE")
    if args.walk_only:
        print(json.dumps(walk(Path(args.file))))
        return

    cold = args.cold and drop_caches()
    t0 = time.perf_counter()
    subprocess.run(["cat", args.file], stdout=subprocess.DEVNULL, check=True)
    cat_s = time.perf_counter() - t0
    if args.cold:
        drop_caches()
    out = subprocess.run(
        [sys.executable, __file__, args.file, "--walk-only"], capture_output=True, text=True, check=True
    )
    res = json.loads(out.stdout)
    res["cat_seconds"] = cat_s
    res["cat_gb_per_s"] = res["bytes"] / cat_s / 1e9
    res["cache"] = "cold" if cold else "warm (page cache as found)"
    if args.json:
        print(json.dumps(res, indent=2))
        return
    mib = 1 << 20
    print(f"file            {res['bytes'] / 2**30:.2f} GiB in {res['tensors']} tensors ({res['cache']})")
    print(f"walk            {res['seconds']:.2f} s  {res['gb_per_s']:.2f} GB/s")
    print(f"cat > /dev/null {cat_s:.2f} s  {res['cat_gb_per_s']:.2f} GB/s")
    print(f"ratio           {res['gb_per_s'] / res['cat_gb_per_s']:.2f} of cat")
    print(f"start RSS       {res['start_rss'] / mib:.1f} MiB")
    print(f"peak RSS        {res['peak_rss'] / mib:.1f} MiB  (+{(res['peak_rss'] - res['start_rss']) / mib:.1f} MiB)")
    print(f"max mapped resident {res['max_mapped_resident'] / mib:.1f} MiB")


if __name__ == "__main__":
    main()
