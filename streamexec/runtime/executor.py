"""The executor: walks a graph unit by unit as a schedule says — loading the next unit's weights
in the background while the current one computes, releasing pages after use, freeing activations
at their last use, spilling and reloading the ones the planner sent to disk — and records per op
time, bytes and memory. It never knows which architecture it runs."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import StreamexecError
from ..kernels.activations import all_finite
from ..kernels.blas import blas_single_threaded
from ..models.graph import Graph
from ..planner.schedule import Schedule
from ..weights.store import WeightStore
from .guard import BudgetGuard, GuardEvent, ShrinkMenus, malloc_trim, note_peak
from .ops import OPS, OpContext
from .process import current_rss, peak_rss, reset_peak_rss, tune_malloc
from .spill import Spilled, SpillStore


@dataclass
class OpRecord:
    """What one op did: wall time, weight bytes it read, RSS after it and the peak RSS while it
    ran (VmHWM reset before each op where the kernel allows), and the planner's estimate."""

    index: int
    name: str
    kind: str
    seconds: float
    weight_bytes: int
    rss_after: int
    peak_rss: int
    planned_bytes: int


def _reset_noted() -> bool:
    """Reset VmHWM for ``--trace``'s per-op windows, noting the peak so far first (the process
    peak is never lost; only tracing resets VmHWM)."""
    note_peak(peak_rss())
    return reset_peak_rss()


class Executor:
    """Runs ``graph`` with weights from ``store`` under ``schedule``.

    ``budget`` (bytes of RSS of the whole process) turns on the budget guard
    (``runtime/guard.py``): after every op the process is sampled; going over the budget raises
    ``BudgetExceeded`` naming the op with ``strict``, else the rest of the run is cut finer (no
    weights mapped ahead, one op per unit, smaller kernel parameters) on a copy of the schedule
    — ``self.schedule`` is then the adapted one and ``self.guard_events`` says what happened.
    The smaller kernel parameters come from ``menus`` (the planner's, built by the caller:
    ``planner.menus.ParamMenus``); without them the guard only streams op by op."""

    def __init__(self, graph: Graph, store: WeightStore, schedule: Schedule | None = None,
                 *, trace: bool = False, check_finite: bool = True, scratch_dir: str | None = None,
                 budget: int | None = None, strict: bool = False, menus: ShrinkMenus | None = None) -> None:
        self.graph = graph
        self.store = store
        self.schedule = schedule or Schedule.by_unit(graph)
        self.budget = budget
        self.strict = strict
        self.guard_events: list[GuardEvent] = []
        self._guard: BudgetGuard | None = None
        self._adapted = False
        self._streamed_from: int | None = None  # the unit where the guard began streaming op by op
        self._menus = menus
        self.trace = trace
        self.check_finite = check_finite
        self.scratch_dir = scratch_dir
        self.records: list[OpRecord] = []
        self.wait_seconds = 0.0
        self.spill_bytes_written = 0
        self.spill_bytes_read = 0
        self._last_use = self._liveness()
        self._unit_weights = [
            sorted({k for i in unit for k in graph.ops[i].weights.values()}) for unit in self.schedule.units
        ]
        self._can_reset_peak = trace and _reset_noted()

    def _liveness(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for i, op in enumerate(self.graph.ops):
            for t in op.inputs:
                last[t] = i
        for t in self.graph.outputs:
            last[t] = len(self.graph.ops)
        return last

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, np.ndarray] = {}
        for name, shape in self.graph.inputs.items():
            if name not in feeds:
                raise StreamexecError(f"{self.graph.model}: missing input {name!r}")
            a = np.asarray(feeds[name])
            if tuple(a.shape) != tuple(shape):
                raise StreamexecError(
                    f"{self.graph.model}: input {name!r} has shape {list(a.shape)}, the plan expects {list(shape)}"
                )
            if self.graph.input_dtypes.get(name, "f32") == "f32":
                a = np.ascontiguousarray(a, dtype=np.float32)
            env[name] = a
        return env

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Compute the graph's outputs for these inputs.

        OpenBLAS stays on one thread for the whole run (its pool parked once): every kernel
        parallelises on its own workers anyway, and letting small ops use BLAS' threads made
        the next big op park the pool and the next small op re-create it, 3-25 ms each time
        (a 20 ms floor under every small linear of a UNet; issue #7).

        Python's cyclic garbage collector is paused meanwhile: the run makes no reference
        cycles worth collecting (arrays are freed by reference counting at their last use),
        and its generation scans, triggered by the many short-lived views and futures, were
        ~3 % of attention's time in a profile."""
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with blas_single_threaded():
                return self._run(feeds)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        tune_malloc()
        env = self._check_feeds(feeds)
        store = self.store
        if self.budget is not None:  # first: with ``strict`` an older peak over the budget stops here
            self._guard = BudgetGuard(self.budget, strict=self.strict, model=self.graph.model)
            self.guard_events = self._guard.events
        spills = SpillStore(self.scratch_dir) if (self.schedule.spill_after or self.schedule.disk_out) else None
        if self.schedule.units and self.schedule.prefetch_mode(0) != "none":
            store.prefetch(self._unit_weights[0])  # the first unit: nothing to overlap with yet
        try:
            u = 0
            while u < len(self.schedule.units):  # the guard may split the units after ``u``
                sched = self.schedule
                unit = sched.units[u]
                t0 = time.perf_counter()
                if u > 0 and sched.prefetch_mode(u - 1) != "populate":
                    # not mapped ahead: fault the unit's weights in now, before the kernels touch
                    # them (a file truncated meanwhile becomes a clean error, not SIGBUS)
                    store.prefetch(self._unit_weights[u])
                store.wait()
                self.wait_seconds += time.perf_counter() - t0
                if u + 1 < len(sched.units):
                    mode = sched.prefetch_mode(u)
                    if mode == "populate":
                        store.prefetch(self._unit_weights[u + 1])
                    elif mode == "readahead":
                        store.readahead(self._unit_weights[u + 1])
                for i in unit:
                    for t in sched.reload_before.get(i, ()):
                        if t not in env:
                            env[t] = spills.get(t)  # type: ignore[union-attr]
                    self._run_op(i, env, spills)
                    for t in sched.spill_after.get(i, ()):
                        if t in env:
                            if t not in spills:  # type: ignore[operator]
                                spills.put(t, env[t])  # type: ignore[union-attr]
                            del env[t]
                    if i != unit[-1]:
                        self._after_op(i, u)
                units = self.schedule.units
                keep = set(self._unit_weights[u + 1]) if u + 1 < len(units) else set()
                store.release([k for k in self._unit_weights[u] if k not in keep])
                self._after_op(unit[-1], u)
                u += 1
        except BaseException:
            try:  # let the prefetch thread finish before the caller tears things down
                store.wait()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
            raise
        finally:
            if spills is not None:
                self.spill_bytes_written = spills.bytes_written
                self.spill_bytes_read = spills.bytes_read
                spills.close()
            if self._guard is not None:
                self._guard.close()
        self._settle()
        return [env[t] for t in self.graph.outputs]

    def _settle(self) -> None:
        """After a run the guard adapted: the unit that overshot is also split one op per unit in
        ``self.schedule`` (too late for this run, not for the next call that starts from it)."""
        u = self._streamed_from
        if u is None or len(self.schedule.units[u]) < 2:
            return
        s = self.schedule
        assert s.prefetch is not None
        split = [[j] for j in s.units[u]]
        s.units[u:u + 1] = split
        s.prefetch[u:u + 1] = [s.prefetch[u]] * len(split)
        self._unit_weights[u:u + 1] = [sorted(set(self.graph.ops[j].weights.values())) for [j] in split]

    def _run_op(self, i: int, env: dict[str, np.ndarray], spills: SpillStore | None) -> None:
        op = self.graph.ops[i]
        fn = OPS.get(op.kind)
        if fn is None:
            raise StreamexecError(f"op {op.name}: unknown kind {op.kind!r}")
        streamed = self.schedule.stream_inputs.get(i, ())
        try:
            args = [Spilled(spills, t, self.graph.tensors[t])  # type: ignore[arg-type]
                    if t in streamed and t not in env else env[t] for t in op.inputs]
        except KeyError as e:
            raise StreamexecError(f"op {op.name}: input {e.args[0]!r} is not available (spilled and not "
                                  "reloaded, or freed too early: a broken schedule)") from None
        shape = self.graph.tensors[op.output]
        disk = spills.create(op.output, shape) if i in self.schedule.disk_out else None  # type: ignore[union-attr]
        t0 = time.perf_counter()
        out = fn(OpContext(self.store, self.schedule.op_params.get(i, {}), disk), op, args, shape)
        dt = time.perf_counter() - t0
        if tuple(out.shape) != tuple(shape):
            raise StreamexecError(f"op {op.name}: produced shape {list(out.shape)}, expected {list(shape)}")
        if isinstance(out, Spilled):  # on disk: consumers stream it or the plan reloads it
            pass
        elif self.check_finite and out.size and not all_finite(out):
            raise StreamexecError(f"op {op.name} ({op.kind}) produced NaN/Inf; stopping")
        else:
            env[op.output] = out
        del args, out
        for t in set(op.inputs):
            if self._last_use.get(t) == i:
                env.pop(t, None)
                if spills is not None:
                    spills.drop(t)
        if self.trace:
            self.records.append(OpRecord(
                i, op.name, op.kind, dt, sum(self.store.nbytes(k) for k in op.weights.values()), current_rss(),
                0, self.schedule.planned_bytes.get(i, 0),
            ))

    def _after_op(self, i: int, u: int) -> None:
        """After op ``i`` of unit ``u`` (for a unit's last op: after its weights are released):
        attribute the peak RSS since the last reset to the op (trace), and let the budget guard
        look at the process (one read of /proc/self/status)."""
        g = self._guard
        window = self.trace and self.records and self._can_reset_peak
        if g is None:
            if window:
                self.records[-1].peak_rss = hwm = peak_rss()
                note_peak(hwm)
                reset_peak_rss()
            return
        rss, hwm = g.sampler.sample()
        if window:
            self.records[-1].peak_rss = hwm
        verdict = g.check(hwm, self.schedule.planned_bytes.get(i, 0), rss)
        if verdict is not None:
            op = self.graph.ops[i]
            planned = self.schedule.planned_bytes.get(i, 0)
            if verdict == "over" and g.strict:
                g.abort(i, op.name, op.kind, u, rss, hwm, planned)
            if u >= g.hold_until_unit and not g.exhausted:
                action, detail = self._adapt(i, u)
                g.log(GuardEvent(i, op.name, op.kind, u, hwm, rss, g.limit, planned, verdict, action, detail))
                g.hold_until_unit = u + 1
                malloc_trim()
        if window:
            note_peak(hwm)
            reset_peak_rss()
            g.was_reset(current_rss())

    def _adapt(self, i: int, u: int) -> tuple[str, str]:
        """Cut the rest of the run finer, one step per call (see ``runtime/guard.py``); the
        schedule is copied first, so the caller's (a plan's) is never changed."""
        g = self._guard
        assert g is not None
        if not self._adapted:
            s = self.schedule
            self.schedule = replace(s, units=[list(x) for x in s.units], op_params={k: dict(v) for k, v in
                                                                                   s.op_params.items()},
                                    prefetch=[s.prefetch_mode(k) for k in range(len(s.units))])
            self._adapted = True
        s = self.schedule
        units, prefetch = s.units, s.prefetch
        assert prefetch is not None
        later = units[u + 1:]
        if g.level == 0:
            g.level = 1
            if any(len(x) > 1 for x in later) or "populate" in prefetch[u:]:
                split = [[j] for x in later for j in x]
                units[u + 1:] = split
                prefetch[u:] = ["readahead"] * (len(units) - u)
                self._unit_weights[u + 1:] = [sorted(set(self.graph.ops[j].weights.values())) for [j] in split]
                self._streamed_from = u
                return "stream", "from the next op on, one op per unit and no weights mapped ahead"
        changed = 0 if self._menus is None else self._menus.shrink(s.op_params, range(i + 1, len(self.graph.ops)))
        if changed:
            g.level += 1
            return "shrink", f"{changed} later ops to smaller row chunks/panels/tiles/bands (step {g.level - 1})"
        g.exhausted = True
        return "exhausted", "nothing left to shrink (the plan needs a smaller budget or less baseline)"

    def trace_json(self) -> dict:
        """The trace as a JSON-able dict (what ``--trace FILE`` writes)."""
        return {
            "model": self.graph.model,
            "wait_seconds": self.wait_seconds,
            "spill_bytes_written": self.spill_bytes_written,
            "spill_bytes_read": self.spill_bytes_read,
            "budget": self.budget,
            "guard_events": [asdict(e) for e in self.guard_events],
            "ops": [asdict(r) for r in self.records],
        }

    def write_trace(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.trace_json(), indent=1))
