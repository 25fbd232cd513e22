#!/usr/bin/env python3
"""A long fuzz run of the two parsers that read untrusted files: the safetensors header parser (and
the mapped views it hands out) and the plan loader. The suite runs a few hundred cases of each
(test_safetensors_reader.py::test_fuzz_*, test_reliability.py::test_fuzzed_plans_fail_cleanly);
this runs tens of thousands with the same Hypothesis strategies (tests/_fuzz_strategies.py) plus
byte-level mutations, and checks one invariant:

    every input either loads (and every tensor it lists can be read, in bounds) or raises the
    project's error class (CheckpointError / PlanError: a StreamexecError) with a one-line message.

Any other exception is a *failure*; a dead worker (SIGSEGV, SIGBUS from a mapping past the end of
the file, the OOM killer) is a *crash*; a case that runs longer than ``--case-timeout`` is a *hang*.
Each is saved with its reproducing input under ``--out``. Cases run in worker processes, in chunks,
each case's input written to disk first so a crash leaves it behind.

    python tools/fuzz_inputs.py                                  # all targets, 20000 cases each or 10 min
    python tools/fuzz_inputs.py --target safetensors --cases 100000 --seconds 1800
    python tools/fuzz_inputs.py --target plan --cases 50 --json  # quick; machine-readable summary

Targets:
  safetensors  random headers (tests' ``headers`` strategy), 1-8 byte mutations and truncations of a
               valid multi-dtype file, spliced header/data lengths; opened with SafetensorsFile (every
               view read to the end, madvise paths run) and with open_checkpoint (layout detection)
  gguf         1-8 byte mutations (mostly in the header) and truncations of a valid GGUF file holding
               every block type, and its u32/u64 header fields set to extreme values; opened with
               GGUFFile (every view read, madvise paths run) and every 2-D block tensor dequantized
  plan         1-3 junk values set anywhere in a valid plan (tests' ``JUNK``/``plan_paths``), and
               byte/line mutations of its YAML text; read_plan_dict, graph_from_dict for every
               component, check_checkpoint against the model the plan was made for

Exit status: 0 when no failure, crash or hang was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
TARGETS = ("safetensors", "gguf", "plan")
FLUSH_EVERY = 1.0  # seconds between a worker's stats snapshots


# ------------------------------------------------------------------------------------------ inputs
def _base_safetensors() -> bytes:
    """A valid file with several dtypes, shapes (scalar, empty, 3-D), metadata and padding."""
    import numpy as np

    from streamexec.weights.writer import from_array, write_safetensors

    tmp = Path(tempfile.mkdtemp(prefix="fuzz-base-"))
    try:
        path = tmp / "base.safetensors"
        write_safetensors(path, [
            from_array("a.weight", np.arange(24, dtype=np.float32).reshape(4, 6)),
            from_array("b.bias", np.ones(3, np.float16)),
            from_array("c", np.arange(2 * 3 * 2, dtype=np.int64).reshape(2, 3, 2)),
            from_array("empty", np.zeros((0, 4), np.float32)),
            from_array("scalar", np.array(7, np.int8)),
        ], metadata={"format": "pt", "note": "fuzz base"})
        return path.read_bytes()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _message_class(e: BaseException) -> str:
    """An error's kind without the file name and the numbers: what the summary counts."""
    msg = getattr(e, "problem", None) or str(e)
    msg = re.sub(r"(/[^\s:),;]+)+", "PATH", msg)
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", msg)
    msg = re.sub(r"-?\d+", "N", msg)
    msg = re.sub(r"\(YAML: .*", "(YAML: …)", msg)
    return f"{type(e).__name__}: {msg[:90]}"


class _Stop(Exception):
    """Raised inside the Hypothesis body when the worker's time is up."""


# ------------------------------------------------------------------------------------------ worker
class Worker:
    def __init__(self, target: str, work: Path, stats_file: Path, deadline: float, cases: int) -> None:
        self.target, self.work, self.stats_file = target, work, stats_file
        self.deadline, self.cases = deadline, cases
        self.current = work / ("current.safetensors" if target == "safetensors" else "current.yaml")
        self.n = 0
        self.parsed = 0  # got past the first stage (SafetensorsFile / read_plan_dict)
        self.loaded = 0  # got through every stage
        self.errors: Counter[str] = Counter()
        self.modes: Counter[str] = Counter()
        self.failures: list[dict] = []
        self._last_flush = 0.0

    def flush(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_flush < FLUSH_EVERY:
            return
        self._last_flush = now
        tmp = self.stats_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"cases": self.n, "parsed": self.parsed, "loaded": self.loaded,
                                   "errors": dict(self.errors), "modes": dict(self.modes), "failures": self.failures,
                                   "final": final}))
        os.replace(tmp, self.stats_file)

    def record_failure(self, data: bytes, e: BaseException, what: str) -> None:
        digest = hashlib.sha256(data).hexdigest()[:16]
        if any(f["sha"] == digest for f in self.failures):
            return
        ext = ".safetensors" if self.target == "safetensors" else ".yaml"
        keep = self.work / f"failure-{digest}{ext}"
        keep.write_bytes(data)
        self.failures.append({"sha": digest, "file": str(keep), "what": what,
                              "error": f"{type(e).__name__}: {e}"[:500],
                              "traceback": "".join(traceback.format_exception(e))[-3000:]})

    def one(self, data: bytes, mode: str, check) -> None:
        """Run ``check`` on ``data`` (written to the current-input file first) and classify."""
        from streamexec.errors import StreamexecError

        if time.monotonic() > self.deadline or self.n >= self.cases:
            raise _Stop
        with open(self.current, "wb") as fh:  # a crash leaves it behind for the parent
            fh.write(data)
        self.n += 1
        self.modes[mode] += 1
        try:
            check(self.current)
            self.loaded += 1
        except StreamexecError as e:
            msg = str(e)
            if "\n" in msg or not msg.strip():
                self.record_failure(data, e, f"{mode}: error message is not one line")
            else:
                self.errors[_message_class(e)] += 1
        except Exception as e:  # noqa: BLE001 - exactly what the fuzzer looks for (MemoryError, RecursionError too)
            self.record_failure(data, e, f"{mode}: {type(e).__name__} escaped (not a StreamexecError)")
        self.flush()

    # -- safetensors ----------------------------------------------------------------------
    def safetensors(self, seed: int) -> None:
        import numpy as np
        from _fuzz_strategies import entries, headers, json_values
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hseed
        from hypothesis import strategies as st

        from streamexec.weights.checkpoint import open_checkpoint
        from streamexec.weights.safetensors_file import SafetensorsFile

        base = _base_safetensors()
        n = int.from_bytes(base[:8], "little")
        base_header, base_data = base[8:8 + n], base[8 + n:]

        def check(path: Path) -> None:
            with SafetensorsFile(path) as f:
                for k in f.keys():
                    v = f.view(k)
                    assert v.nbytes == f.info(k).nbytes, f"{k}: {v.nbytes}-byte view, {f.info(k).nbytes} in the header"
                    b, e = f.byte_range(k)
                    assert f.data_offset <= b <= e <= f.size, f"{k}: bytes {b}..{e} outside the data section"
                    np.ascontiguousarray(v).reshape(-1).view(np.uint8).sum()  # touch every page: SIGBUS past EOF
                    f.willneed(b, e)
                    f.release(k)
            self.parsed += 1
            ck = open_checkpoint(path)  # layout detection on whatever the file holds
            ck.close()

        @settings(max_examples=self.cases, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @hseed(seed)
        @given(data=st.data())
        def run(data) -> None:
            mode = data.draw(st.sampled_from(["header", "edit", "edit", "mutate", "splice"]))
            if mode == "header":
                header = data.draw(headers)
                raw = json.dumps(header).encode()
                n = max(0, len(raw) + data.draw(st.integers(-5, 5) | st.just(0)))
                blob = struct.pack("<Q", n) + raw + bytes(data.draw(st.integers(0, 256)))
            elif mode == "edit":  # the valid header with 1-3 fields replaced, added or removed; same data
                head = json.loads(base_header)
                for _ in range(data.draw(st.integers(1, 3))):
                    key = data.draw(st.sampled_from(sorted(head) + ["new"]))
                    op = data.draw(st.sampled_from(["field", "field", "drop", "entry", "value"]))
                    if op == "field" and isinstance(head.get(key), dict) and key != "__metadata__":
                        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
                        head[key][field] = data.draw(entries.map(lambda e, f=field: e.get(f, e["shape"])) | json_values)
                    elif op == "drop":
                        head.pop(key, None)
                    elif op == "entry":
                        head[key] = data.draw(entries)
                    else:
                        head[key] = data.draw(json_values)
                raw = json.dumps(head).encode()
                raw += b" " * data.draw(st.sampled_from([0, 0, (-len(raw)) % 8]))
                blob = struct.pack("<Q", len(raw)) + raw + base_data
            elif mode == "mutate":
                raw = bytearray(base)
                for _ in range(data.draw(st.integers(1, 8))):
                    i = data.draw(st.integers(0, len(raw) - 1))
                    raw[i] = data.draw(st.integers(0, 255))
                if data.draw(st.integers(0, 3)) == 0:  # and cut it short, one time in four
                    raw = raw[: data.draw(st.integers(0, len(raw)))]
                blob = bytes(raw)
            else:  # a valid header with a wrong length word, or data cut/grown
                n = int.from_bytes(base[:8], "little")
                header, body = base[8:8 + n], base[8 + n:]
                n2 = data.draw(st.sampled_from([n, n - 1, n + 1, 0, 1, 2, 2**63, 2**64 - 1, len(base)]))
                extra = data.draw(st.integers(-len(body), 64))
                body = body[: len(body) + extra] if extra < 0 else body + bytes(extra)
                blob = struct.pack("<Q", n2 % 2**64) + header + body
            self.one(blob, mode, check)

        run()

    # -- gguf -----------------------------------------------------------------------------
    def gguf(self, seed: int) -> None:
        import numpy as np
        from _quant_files import K_QUANTS, QUANTIZABLE, stored, write_gguf
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hseed
        from hypothesis import strategies as st

        from streamexec.kernels.dequant import BLOCK_TAGS, PackedWeight
        from streamexec.weights.gguf_file import GGUFFile

        tmp = Path(tempfile.mkdtemp(prefix="fuzz-base-"))
        try:
            rng = np.random.default_rng(0)
            tensors = {f"t.{t}": (stored(t, (2, 256), rng), t) for t in ["F32", "F16", *QUANTIZABLE, *K_QUANTS]}
            write_gguf(tmp / "base.gguf", tensors, arch="flux")
            base = (tmp / "base.gguf").read_bytes()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        header_end = base.index(b"t.Q6_K") + 48

        def check(path: Path) -> None:
            with GGUFFile(path) as f:
                for k in f.keys():
                    t = f.info(k)
                    v = f.view(k)
                    assert v.nbytes == t.nbytes and f.data_offset <= t.begin <= t.end <= f.size, k
                    np.ascontiguousarray(v).reshape(-1).view(np.uint8).sum()  # touch every page
                    f.willneed(t.begin, t.end)
                    if t.tag in BLOCK_TAGS and v.ndim == 2:
                        PackedWeight.gguf(v, t.tag).decode()
                    f.release(k)
            self.parsed += 1

        @settings(max_examples=self.cases, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @hseed(seed)
        @given(data=st.data())
        def run(data) -> None:
            mode = data.draw(st.sampled_from(["mutate", "mutate", "field"]))
            raw = bytearray(base)
            if mode == "mutate":
                for _ in range(data.draw(st.integers(1, 8))):
                    i = data.draw(st.integers(0, header_end) | st.integers(0, len(raw) - 1))
                    raw[i] = data.draw(st.integers(0, 255))
            else:  # a 4- or 8-byte field anywhere in the header set to an extreme value
                i = data.draw(st.integers(0, header_end - 8))
                width = data.draw(st.sampled_from([4, 8]))
                val = data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]) | st.integers(0, 600))
                raw[i : i + width] = (val % 2 ** (8 * width)).to_bytes(width, "little")
            if data.draw(st.integers(0, 3)) == 0:  # and cut it short, one time in four
                raw = raw[: data.draw(st.integers(0, len(raw)))]
            self.one(bytes(raw), mode, check)

        run()

    # -- plan -----------------------------------------------------------------------------
    def plan(self, seed: int) -> None:
        import copy

        import yaml
        from _fuzz_strategies import JUNK, mutate, plan_paths
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hseed
        from hypothesis import strategies as st

        from streamexec.planner.plan import check_checkpoint, graph_from_dict, read_plan_dict
        from streamexec.weights.checkpoint import open_checkpoint

        text = (self.work.parent / "base-plan.yaml").read_text()
        base = yaml.safe_load(text)
        ckpt = open_checkpoint(base["checkpoint"]["root"])
        paths = list(plan_paths(base))
        lines = text.splitlines(keepends=True)
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

        def check(path: Path) -> None:
            d = read_plan_dict(path)
            self.parsed += 1
            for name, c in (d.get("components") or {}).items():
                graph_from_dict(name, c)
            check_checkpoint(d, ckpt)

        @settings(max_examples=self.cases, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @hseed(seed)
        @given(data=st.data())
        def run(data) -> None:
            mode = data.draw(st.sampled_from(["values", "values", "text", "lines"]))
            if mode == "values":
                d = copy.deepcopy(base)
                for _ in range(data.draw(st.integers(1, 3))):
                    p = data.draw(st.sampled_from(paths))
                    try:
                        mutate(d, list(p), data.draw(JUNK))
                    except (KeyError, IndexError, TypeError):
                        pass
                blob = yaml.dump(d, Dumper=dumper).encode()
            elif mode == "text":
                raw = bytearray(text.encode())
                for _ in range(data.draw(st.integers(1, 6))):
                    i = data.draw(st.integers(0, len(raw) - 1))
                    op = data.draw(st.sampled_from(["set", "insert", "delete"]))
                    b = data.draw(st.sampled_from(list(b"{}[]:,-#&*!|>'\"\n\t 0123456789.e") + [0, 0xff, 0xc3]))
                    if op == "set":
                        raw[i] = b
                    elif op == "insert":
                        raw.insert(i, b)
                    else:
                        del raw[i]
                blob = bytes(raw)
            else:  # drop, repeat or swap whole lines
                ls = list(lines)
                for _ in range(data.draw(st.integers(1, 4))):
                    i = data.draw(st.integers(0, len(ls) - 1))
                    op = data.draw(st.sampled_from(["drop", "dup", "swap", "indent"]))
                    if op == "drop":
                        del ls[i]
                    elif op == "dup":
                        ls.insert(i, ls[i])
                    elif op == "swap":
                        j = data.draw(st.integers(0, len(ls) - 1))
                        ls[i], ls[j] = ls[j], ls[i]
                    else:
                        ls[i] = "  " + ls[i]
                    if not ls:
                        break
                blob = "".join(ls).encode()
            self.one(blob, mode, check)

        try:
            run()
        finally:
            ckpt.close()


def worker_main(ns: argparse.Namespace) -> int:
    import resource

    sys.path.insert(0, str(TESTS))
    limit = int(ns.rlimit_as) if ns.rlimit_as else 0
    if limit:  # a runaway allocation becomes a MemoryError (a failure), not the machine's OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    w = Worker(ns.worker, Path(ns.work), Path(ns.stats), time.monotonic() + ns.seconds, ns.cases)
    try:
        getattr(w, ns.worker)(ns.seed)
    except _Stop:
        pass
    except Exception as e:  # hypothesis reporting something of ours (it should not: we catch all)
        w.record_failure(b"", e, "worker: the generator itself failed")
    w.flush(final=True)
    return 0


# ------------------------------------------------------------------------------------------ parent
def make_base_plan(work: Path) -> None:
    """The demo model (built in ``work``) and a plan of its text encoder, as the suite's fuzz test."""
    env = dict(os.environ, STREAMEXEC_CACHE=str(work / "cache"))
    code = ("from streamexec.pipelines.demo import ensure_demo_model; import sys; m = ensure_demo_model(); "
            "from streamexec.cli import main; "
            "sys.exit(main(['plan', str(m), '--component', 'text_encoder', '-o', sys.argv[1]]))")
    res = subprocess.run([sys.executable, "-c", code, str(work / "base-plan.yaml")], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"cannot make the base plan: {res.stderr.strip()[-2000:]}")


def run_target(target: str, ns: argparse.Namespace, work: Path, out: Path, deadline: float) -> dict:
    tot = {"cases": 0, "parsed": 0, "loaded": 0, "errors": Counter(), "modes": Counter(), "failures": [], "crashes": [],
           "hangs": [], "chunks": 0, "seconds": 0.0}
    t0 = time.monotonic()
    chunk = 0
    while tot["cases"] < ns.cases and time.monotonic() < deadline:
        cwork = work / target
        cwork.mkdir(exist_ok=True)
        stats = cwork / f"stats-{chunk}.json"
        current = cwork / ("current.safetensors" if target == "safetensors" else "current.yaml")
        current.unlink(missing_ok=True)
        n = min(ns.chunk, ns.cases - tot["cases"])
        left = max(1.0, deadline - time.monotonic())
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", target, "--seed", str(ns.seed + chunk),
                "--cases", str(n), "--seconds", f"{left:.1f}", "--work", str(cwork), "--stats", str(stats),
                "--rlimit-as", str(ns.rlimit_as)]
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        log = cwork / f"worker-{chunk}.log"
        with open(log, "wb") as fh:  # a file, not a pipe: a chatty worker never blocks
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        hung = False
        last_progress, last_mtime = time.monotonic(), None
        while proc.poll() is None:
            time.sleep(0.2)
            try:
                m = current.stat().st_mtime_ns
            except OSError:
                m = None
            if m != last_mtime:
                last_mtime, last_progress = m, time.monotonic()
            elif time.monotonic() - last_progress > ns.case_timeout:
                hung = True
                proc.kill()
        stderr = log.read_bytes()
        empty = {"cases": 0, "parsed": 0, "loaded": 0, "errors": {}, "modes": {}, "failures": [], "final": False}
        snap = json.loads(stats.read_text()) if stats.is_file() else empty
        tot["cases"] += snap["cases"]
        tot["loaded"] += snap["loaded"]
        tot["parsed"] += snap.get("parsed", 0)
        tot["errors"].update(snap["errors"])
        tot["modes"].update(snap["modes"])
        for f in snap["failures"]:
            keep = out / f"{target}-failure-{f['sha']}{Path(f['file']).suffix}"
            if Path(f["file"]).is_file():
                shutil.copy(f["file"], keep)
            f["file"] = str(keep)
            (out / f"{target}-failure-{f['sha']}.txt").write_text(f"{f['what']}\n{f['error']}\n\n{f['traceback']}")
            tot["failures"].append(f)
        if hung or proc.returncode != 0 or not snap.get("final"):
            kind = "hangs" if hung else "crashes"
            rc = proc.returncode
            why = (f"no progress for {ns.case_timeout:.0f} s" if hung else
                   f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}")
            data = current.read_bytes() if current.is_file() else b""
            digest = hashlib.sha256(data).hexdigest()[:16]
            keep = out / f"{target}-{kind[:-1]}-{digest}{current.suffix}"
            keep.write_bytes(data)
            (out / f"{target}-{kind[:-1]}-{digest}.txt").write_text(
                f"{why}\n\n{stderr.decode(errors='replace')[-4000:]}")
            tot[kind].append({"why": why, "file": str(keep), "stderr": stderr.decode(errors="replace")[-500:]})
            tot["cases"] += 1  # the case that crashed (its snapshot is up to a second old: a lower bound)
        chunk += 1
        tot["chunks"] = chunk
        if not ns.json and not ns.quiet:
            print(f"  {target}: {tot['cases']} cases, {len(tot['failures'])} failures, {len(tot['crashes'])} "
                  f"crashes, {len(tot['hangs'])} hangs ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
        if snap["cases"] == 0 and not hung and proc.returncode == 0:
            break  # the strategy produced nothing (should not happen): do not spin
    tot["seconds"] = round(time.monotonic() - t0, 1)
    return tot


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", choices=(*TARGETS, "all"), default="all")
    ap.add_argument("--cases", type=int, default=20000, help="cases per target (default 20000)")
    ap.add_argument("--seconds", type=float, default=600, help="time for the whole run, split between targets "
                    "(default 600)")
    ap.add_argument("--chunk", type=int, default=2000, help="cases per worker process (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="base seed; chunk i uses seed+i (default 0)")
    ap.add_argument("--case-timeout", type=float, default=60, help="a case running longer is a hang (default 60 s)")
    ap.add_argument("--rlimit-as", type=int, default=8 << 30, help="workers' address-space limit in bytes (0: none)")
    ap.add_argument("--out", default="fuzz-out", help="where failing inputs are saved (default ./fuzz-out)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--quiet", action="store_true", help="no per-chunk progress on stderr")
    ap.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.worker:
        return worker_main(ns)

    targets = TARGETS if ns.target == "all" else (ns.target,)
    out = Path(ns.out)
    work = Path(tempfile.mkdtemp(prefix="streamexec-fuzz-"))
    t_start = time.monotonic()
    results = {}
    try:
        if "plan" in targets:
            make_base_plan(work)
        for i, target in enumerate(targets):
            share = (ns.seconds - (time.monotonic() - t_start)) / (len(targets) - i)
            out.mkdir(parents=True, exist_ok=True)
            results[target] = run_target(target, ns, work, out, time.monotonic() + share)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bad = sum(len(r["failures"]) + len(r["crashes"]) + len(r["hangs"]) for r in results.values())
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if ns.json:
        print(json.dumps({t: {**r, "errors": dict(r["errors"]), "modes": dict(r["modes"])} for t, r in results.items()},
                         indent=1))
        return 1 if bad else 0
    for target, r in results.items():
        print(f"{target}: {r['cases']} cases in {r['seconds']} s ({r['chunks']} workers; "
              f"{', '.join(f'{m} {c}' for m, c in sorted(r['modes'].items()))}): {r['parsed']} parsed, "
              f"{r['loaded']} through every stage, "
              f"{sum(r['errors'].values())} refused with a one-line error, failures {len(r['failures'])}, "
              f"crashes {len(r['crashes'])}, hangs {len(r['hangs'])}")
        for msg, c in r["errors"].most_common(12):
            print(f"  {c:7d}  {msg}")
        if len(r["errors"]) > 12:
            print(f"  {sum(c for _, c in r['errors'].most_common()[12:]):7d}  ({len(r['errors']) - 12} other kinds)")
        for f in r["failures"]:
            print(f"  FAILURE {f['what']}: {f['error'][:200]} -> {f['file']}")
        for f in r["crashes"] + r["hangs"]:
            print(f"  CRASH {f['why']} -> {f['file']}")
    total = sum(r["cases"] for r in results.values())
    crashes = sum(len(r["crashes"]) for r in results.values())
    print(f"total: {total} cases, failures {sum(len(r['failures']) for r in results.values())}, crashes {crashes}, "
          f"hangs {sum(len(r['hangs']) for r in results.values())}" + (f"; inputs saved in {out}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
