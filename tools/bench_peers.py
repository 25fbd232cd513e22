#!/usr/bin/env python3
"""streamexec against its peers on the same CPU (issue #7): time and peak RSS per call, with
the same weights, the same inputs and the same thread count, each side in its own subprocess.

Cases (random weights, the real published configs; weights stored fp16 for SD 1.5, bf16 for
FLUX/T5, read as stored by streamexec and upcast to f32 by the reference):

- ``unet256``, ``unet512``: one SD 1.5 UNet call, batch 2 (prompt + negative prompt), at 256²
  and 512² (latents 2×4×32² / 2×4×64², text 2×77×768);
- ``vae``: SD 1.5 VAE decode of a 1×4×64×64 latent to 512²;
- ``clip``: CLIP-L text encoder on 2×77 token ids;
- ``flux256``, ``flux1024``: a full-width FLUX.1-schnell slice with one double and one single
  block (plus the embedders and the output projection) at the token counts of a 256² and a
  1024² image (256 / 4096 image tokens + 256 text tokens);
- ``t5``: a full-width T5-XXL encoder with two layers on 512 tokens.

The reference is diffusers / transformers on torch CPU in f32 (``torch.set_num_threads`` = the
same thread count; streamexec gets it through ``NUMBA_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS``).
``stable-diffusion.cpp`` (``pip install stable-diffusion-cpp-python``, optional) is reported as
not installed unless its module imports.

Each child loads its model, runs the call ``--repeat`` times (the first streamexec call includes
planning, the first torch call its allocator warm-up: both reported as ``first``), and reports the
best call and its own peak RSS (VmHWM from /proc/self/status at the end, the whole process:
interpreter, libraries, weights, activations); the parent also records the child's ``ru_maxrss``
from ``wait4``. The two sides alternate for ``--rounds`` rounds (fresh processes each time) and
the fastest round of each side is compared; the load average and the CPU used by other processes
during each call are recorded (the machine is shared). Ratios are ours / theirs: < 1 means
streamexec is faster or smaller.

    python tools/bench_peers.py                       # every case (~25 min on 2 cores)
    python tools/bench_peers.py --cases unet512,flux1024 --rounds 3
    python tools/bench_peers.py --json                # machine-readable
    python tools/bench_peers.py --no-avx              # NUMBA_CPU_NAME=generic OPENBLAS_CORETYPE=Nehalem
                                                      #   vs torch with ATEN_CPU_CAPABILITY=default
    python tools/bench_peers.py --no-avx --no-avx-libs  # ... and torch's MKL/oneDNN capped to SSE4 too

Checkpoints live in ``--ckpt-dir`` (default /tmp/streamexec-bench; the SD 1.5 UNet in
/tmp/streamexec-bench-sd15-unet-fp16, as ``bench_unet_budget.py`` makes it); missing ones are
written with ``tools/make_checkpoint.py`` (seed 0). Helpers come from ``tools/_bench_common.py``
(standard library only at import, so a child costs nothing extra).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench_common import MIB, ChildFailed, ensure_checkpoint, model_inputs, rel_err, threads, vmhwm
from _bench_common import run_child as _run_child

HERE = Path(__file__).resolve().parent
TMP = Path(tempfile.gettempdir())

#: name -> (checkpoint folder, make_checkpoint.py args, streamexec component, reference class)
CKPTS = {
    "unet": (TMP / "streamexec-bench-sd15-unet-fp16", ["unet", "--preset", "sd15", "--dtype", "fp16"], "unet",
             "diffusers:UNet2DConditionModel"),
    "vae": (None, ["vae", "--preset", "sd15", "--dtype", "fp16"], "vae", "diffusers:AutoencoderKL"),
    "clip": (None, ["clip", "--preset", "sd15", "--dtype", "fp16"], "text_encoder", "transformers:CLIPTextModel"),
    "flux": (None, ["flux", "--preset", "flux-schnell", "--dtype", "bf16", "--seed", "0", "--set", "num_layers=1",
                    "--set", "num_single_layers=1"], "transformer", "diffusers:FluxTransformer2DModel"),
    "t5": (None, ["t5", "--preset", "flux-schnell", "--dtype", "bf16", "--seed", "0", "--set", "num_layers=2"],
           "text_encoder_2", "transformers:T5EncoderModel"),
}
#: folder names under --ckpt-dir (the FLUX/T5 slices are the ones tools/bench_flux.py makes)
CKPT_DIRS = {"vae": "sd15-vae-fp16", "clip": "sd15-clip-l-fp16", "flux": "flux-slice-1d1s", "t5": "t5-slice-2l"}

#: case -> (checkpoint, label, default memory budget, input maker args)
CASES = {
    "unet256": ("unet", "SD 1.5 UNet step, batch 2, 256²", "2G", {"size": 256}),
    "unet512": ("unet", "SD 1.5 UNet step, batch 2, 512²", "2G", {"size": 512}),
    "vae": ("vae", "SD 1.5 VAE decode 64×64 -> 512²", "1G", {"latent": 64}),
    "clip": ("clip", "CLIP-L text encoder, 2×77 tokens", "512M", {"batch": 2}),
    "flux256": ("flux", "FLUX 1 double + 1 single block, 256² (256+256 tok)", "1G", {"size": 256}),
    "flux1024": ("flux", "FLUX 1 double + 1 single block, 1024² (4096+256 tok)", "1G", {"size": 1024}),
    "t5": ("t5", "T5-XXL 2 layers, 512 tokens", "512M", {"tokens": 512}),
}

NO_AVX_OURS = {"NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": "", "OPENBLAS_CORETYPE": "Nehalem"}
NO_AVX_TORCH = {"ATEN_CPU_CAPABILITY": "default"}
#: ATEN_CPU_CAPABILITY only limits ATen's own vector kernels: torch's GEMMs (MKL) and convolutions
#: (oneDNN) still pick AVX-512 from CPUID. These cap them too, for a torch that really runs on SSE.
NO_AVX_TORCH_LIBS = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"}


# ---------------------------------------------------------------------------------------- helpers


def _machine_busy() -> float:
    """CPU-seconds the whole machine has been busy so far (/proc/stat)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def wait_idle(limit: float) -> float:
    """Wait (up to ``limit`` seconds) until other processes use < 20 % of the machine over 3 s;
    returns the share measured last (the machine is shared: other benchmarks, test runs)."""
    deadline = time.monotonic() + limit
    while True:
        b0, t0 = _machine_busy(), time.monotonic()
        time.sleep(3)
        share = (_machine_busy() - b0) / (time.monotonic() - t0) / (os.cpu_count() or 1)
        if share < 0.2 or time.monotonic() >= deadline:
            return share
        print(f"  waiting for other jobs ({100 * share:.0f} % CPU busy) ...", file=sys.stderr, flush=True)


def run_child(cmd: list[str], env: dict[str, str]) -> dict:
    """The child's JSON result (with ``peak_rss_wait4``), or {"failed", "stderr"}."""
    try:
        return _run_child(cmd, env)
    except ChildFailed as e:
        return {"failed": f"exit {e.returncode}", "stderr": e.stderr}


# ----------------------------------------------------------------------------------------- inputs


def make_inputs(case: str, path: Path) -> None:
    import numpy as np

    ck, _, _, a = CASES[case]
    size = {"unet": "size", "vae": "latent", "clip": "batch", "flux": "size", "t5": "tokens"}[ck]
    np.savez(path, **model_inputs(ck, a[size]))


# --------------------------------------------------------------------------------------- children


def child(spec: dict) -> dict:
    """One side of one case: load, ``repeat`` calls, VmHWM at the end."""
    t_start = time.perf_counter()
    import numpy as np

    feeds = dict(np.load(spec["inputs"]))
    kind = CASES[spec["case"]][0]
    if spec["side"] == "streamexec":
        import numba

        import streamexec
        from streamexec.sizes import parse_size

        m = streamexec.load(spec["ckpt"], component=CKPTS[kind][2], memory_budget=parse_size(spec["budget"]))
        if kind == "vae":
            def call():
                return m.decode(feeds["z"])
        elif kind == "clip":
            def call():
                return m(feeds["input_ids"])[0]
        else:
            def call():
                return m(**feeds)
        lib, nthreads = f"streamexec {streamexec.__version__}", numba.get_num_threads()
    else:
        import torch

        torch.set_num_threads(spec["threads"])
        mod, cls = CKPTS[kind][3].split(":")
        lib_mod = __import__(mod)
        model = getattr(lib_mod, cls).from_pretrained(spec["ckpt"], torch_dtype=torch.float32).eval()
        tfeeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
        lib, nthreads = f"{mod} {lib_mod.__version__} / torch {torch.__version__} f32", torch.get_num_threads()

        def call():
            with torch.no_grad():
                if kind == "vae":
                    return model.decode(tfeeds["z"]).sample.numpy()
                if kind == "unet":
                    return model(tfeeds["sample"], tfeeds["timestep"],
                                 encoder_hidden_states=tfeeds["encoder_hidden_states"]).sample.numpy()
                if kind == "flux":
                    return model(**tfeeds).sample.numpy()
                return model(input_ids=tfeeds["input_ids"]).last_hidden_state.numpy()
    load_seconds = time.perf_counter() - t_start
    calls = []
    y = None
    for _ in range(spec["repeat"]):
        t0, c0, b0 = time.perf_counter(), _own_cpu(), _machine_busy()
        y = call()
        dt, cpu = time.perf_counter() - t0, _own_cpu() - c0
        calls.append({"seconds": dt, "cpu_seconds": cpu, "others_cpu": max(0.0, _machine_busy() - b0 - cpu) / dt,
                      "loadavg": os.getloadavg()[0]})
    peak = vmhwm()
    np.save(spec["out"], np.asarray(y, np.float32))
    res = {"library": lib, "threads": nthreads, "calls": calls, "peak_rss": peak, "load_seconds": load_seconds,
           "wall": time.perf_counter() - t_start}
    if spec["side"] == "streamexec":
        ex, fit = m.last_executor, m.last_fit
        res |= {"wait_seconds": ex.wait_seconds, "planned_peak": fit.peak, "min_budget": fit.min_budget,
                "baseline": fit.baseline, "ops": len(ex.graph.ops)}
    return res


# ----------------------------------------------------------------------------------------- driver


def checkpoint(kind: str, ckpt_dir: Path) -> Path:
    folder, args, _, _ = CKPTS[kind]
    p = folder or ckpt_dir / CKPT_DIRS[kind]
    ensure_checkpoint(p, args[0], *args[1:], marker="config.json")
    return p


def sdcpp_status() -> str:
    try:
        import stable_diffusion_cpp  # noqa: F401
    except ImportError:
        return ("stable-diffusion.cpp: not installed (stable-diffusion-cpp-python is an sdist on PyPI that builds "
                "ggml from source with cmake; not built here) - no row")
    return "stable-diffusion.cpp: installed, but the SD 1.5 step through it is not wired into this script yet"


def best(r: dict) -> float | None:
    return min(c["seconds"] for c in r["calls"]) if r.get("calls") else None


def bench_case(case: str, args, tmp: Path, env_ours: dict, env_torch: dict) -> dict:
    import numpy as np

    kind, label, budget, _ = CASES[case]
    ckpt = checkpoint(kind, Path(args.ckpt_dir))
    inputs = tmp / f"{case}.npz"
    make_inputs(case, inputs)
    n = threads()
    sides: dict[str, list[dict]] = {"streamexec": [], "torch": []}
    outs = {s: tmp / f"{case}-{s}.npy" for s in sides}
    for rnd in range(args.rounds):
        for side, env in (("streamexec", env_ours), ("torch", env_torch)):
            spec = {"case": case, "side": side, "ckpt": str(ckpt), "inputs": str(inputs), "out": str(outs[side]),
                    "repeat": args.repeat, "threads": n, "budget": args.budget or budget}
            spec_path = tmp / f"spec-{case}-{side}-{rnd}.json"
            spec_path.write_text(json.dumps(spec))
            busy = wait_idle(args.wait_idle) if args.wait_idle > 0 else None
            print(f"[{time.strftime('%H:%M:%S')}] {case} {side} round {rnd + 1}/{args.rounds} "
                  f"(load {os.getloadavg()[0]:.2f}) ...", file=sys.stderr, flush=True)
            r = run_child([sys.executable, __file__, "--child", str(spec_path)], env)
            r["busy_before"] = busy
            if r.get("calls"):
                print(f"  best {best(r):.3f} s, peak RSS {r['peak_rss'] / MIB:.0f} MiB", file=sys.stderr, flush=True)
            else:
                print(f"  FAILED: {r.get('stderr', '')[-1500:]}", file=sys.stderr, flush=True)
            sides[side].append(r)
    row: dict = {"case": case, "label": label, "checkpoint": str(ckpt), "budget": args.budget or budget}
    for side, rs in sides.items():
        ok = [r for r in rs if r.get("calls")]
        if not ok:
            row[side] = {"failed": rs[-1].get("failed"), "stderr": rs[-1].get("stderr", "")[-1500:]}
            continue
        fastest = min(ok, key=best)
        row[side] = fastest | {"best_seconds": best(fastest), "first_seconds": fastest["calls"][0]["seconds"],
                               "rounds_best_seconds": [best(r) for r in ok],
                               "peak_rss_max": max(r["peak_rss"] for r in ok)}
    if all(row[s].get("calls") for s in sides):
        o, t = row["streamexec"], row["torch"]
        row["time_ratio"] = o["best_seconds"] / t["best_seconds"]
        row["rss_ratio"] = o["peak_rss_max"] / t["peak_rss_max"]
        if all(p.exists() for p in outs.values()):
            row["rel_err"] = rel_err(np.load(outs["streamexec"]), np.load(outs["torch"]))
    for p in outs.values():
        p.unlink(missing_ok=True)
    return row


def print_table(report: dict) -> None:
    print(f"{report['command']}   ({report['threads']} threads, {report['cpu']}; "
          f"load average {report['loadavg_start']:.2f} -> {report['loadavg_end']:.2f})")
    hdr = (f"{'case':<52} {'ours s':>8} {'torch s':>8} {'time o/t':>9} {'ours RSS':>9} {'torch RSS':>10} "
           f"{'RSS o/t':>8} {'rel err':>8} {'others%':>8}")
    print(hdr)
    for r in report["rows"]:
        o, t = r.get("streamexec", {}), r.get("torch", {})
        if not (o.get("calls") and t.get("calls")):
            bad = o if not o.get("calls") else t
            print(f"{r['label']:<52} FAILED: {(bad.get('stderr') or '').strip().splitlines()[-1:]}")
            continue
        oth = max(min(x["calls"], key=lambda c: c["seconds"])["others_cpu"] for x in (o, t))
        print(f"{r['label']:<52} {o['best_seconds']:>8.3f} {t['best_seconds']:>8.3f} {r['time_ratio']:>9.2f} "
              f"{o['peak_rss_max'] / MIB:>5.0f} MiB {t['peak_rss_max'] / MIB:>6.0f} MiB {r['rss_ratio']:>8.3f} "
              f"{r.get('rel_err', float('nan')):>8.1e} {100 * oth / report['threads']:>7.0f}%")
    for note in report["notes"]:
        print(note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--ckpt-dir", default=str(TMP / "streamexec-bench"))
    ap.add_argument("--budget", help="streamexec memory budget for every case (default: per case, see CASES)")
    ap.add_argument("--repeat", type=int, default=3, help="calls per process (the best is reported)")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two sides this many times (fresh processes)")
    ap.add_argument("--no-avx", action="store_true",
                    help="streamexec with NUMBA_CPU_NAME=generic OPENBLAS_CORETYPE=Nehalem, torch with "
                         "ATEN_CPU_CAPABILITY=default")
    ap.add_argument("--no-avx-libs", action="store_true",
                    help="with --no-avx, also cap torch's MKL and oneDNN to SSE4 (MKL_ENABLE_INSTRUCTIONS=SSE4_2, "
                         "ONEDNN_MAX_CPU_ISA=SSE41): ATEN_CPU_CAPABILITY alone leaves them on AVX-512")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="before each child wait up to this long for other jobs to leave the CPU idle")
    ap.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    ap.add_argument("--json-out", help="also write the JSON report here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(Path(args.child).read_text()))))
        return
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = sorted(set(cases) - set(CASES))
    if bad:
        ap.error(f"--cases: unknown {', '.join(bad)} (choose from {', '.join(CASES)})")
    n = threads()
    common = {"NUMBA_NUM_THREADS": str(n), "OPENBLAS_NUM_THREADS": str(n), "OMP_NUM_THREADS": str(n)}
    env_ours, env_torch = dict(common), dict(common)
    if args.no_avx:
        env_ours |= NO_AVX_OURS | {"NUMBA_CACHE_DIR": str(TMP / "streamexec-numba-cache-noavx")}
        env_torch |= NO_AVX_TORCH | (NO_AVX_TORCH_LIBS if args.no_avx_libs else {})
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    rows = []
    try:
        for case in cases:
            rows.append(bench_case(case, args, tmp, env_ours, env_torch))
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    cpu = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    git = subprocess.run(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip()
    report = {"command": " ".join(["python", "tools/bench_peers.py", *sys.argv[1:]]), "git": git, "threads": n,
              "cpu": cpu, "no_avx": args.no_avx, "env_streamexec": env_ours, "env_torch": env_torch,
              "loadavg_start": load0, "loadavg_end": os.getloadavg()[0], "seconds": time.perf_counter() - t0,
              "rows": rows, "notes": [sdcpp_status()]}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
