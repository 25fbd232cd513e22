"""The executor: walks a graph unit by unit, prefetching the next unit's weights on a background
thread while the current one computes, releasing pages after use, freeing activations at their
last use, and recording per-op time and RSS. It never knows which architecture it runs."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import StreamexecError
from ..models.graph import Graph
from ..weights.store import WeightStore
from .ops import OPS, OpContext

_PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss() -> int:
    """Resident set size of this process now (bytes), from /proc/self/statm (cheap)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def peak_rss() -> int:
    """Peak resident set size (VmHWM) of this process so far (bytes)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Schedule:
    """How to run a graph: ops grouped into streaming units, and per-op kernel parameters
    (row_chunk, panel_rows, q_tile, k_tile, band_rows). Produced by the planner."""

    units: list[list[int]]
    op_params: dict[int, dict] = field(default_factory=dict)
    prefetch: bool = True

    @classmethod
    def by_unit(cls, graph: Graph) -> Schedule:
        """One streaming unit per builder unit (consecutive ops with the same ``unit``)."""
        units: list[list[int]] = []
        last = None
        for i, op in enumerate(graph.ops):
            if op.unit != last:
                units.append([])
                last = op.unit
            units[-1].append(i)
        return cls(units)


@dataclass
class OpRecord:
    name: str
    kind: str
    seconds: float
    rss_after: int
    weight_bytes: int


class Executor:
    """Runs ``graph`` with weights from ``store`` under ``schedule``."""

    def __init__(self, graph: Graph, store: WeightStore, schedule: Schedule | None = None,
                 *, trace: bool = False, check_finite: bool = True) -> None:
        self.graph = graph
        self.store = store
        self.schedule = schedule or Schedule.by_unit(graph)
        self.trace = trace
        self.check_finite = check_finite
        self.records: list[OpRecord] = []
        self.wait_seconds = 0.0
        self._last_use = self._liveness()
        self._unit_weights = [
            sorted({k for i in unit for k in graph.ops[i].weights.values()}) for unit in self.schedule.units
        ]

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
        """Compute the graph's outputs for these inputs."""
        env = self._check_feeds(feeds)
        units = self.schedule.units
        store = self.store
        if units and self.schedule.prefetch:
            store.prefetch(self._unit_weights[0])
        try:
            for u, unit in enumerate(units):
                t0 = time.perf_counter()
                store.wait()
                self.wait_seconds += time.perf_counter() - t0
                if self.schedule.prefetch and u + 1 < len(units):
                    store.prefetch(self._unit_weights[u + 1])
                for i in unit:
                    self._run_op(i, env)
                keep = set(self._unit_weights[u + 1]) if u + 1 < len(units) else set()
                store.release([k for k in self._unit_weights[u] if k not in keep])
        except BaseException:
            try:  # let the prefetch thread finish before the caller tears things down
                store.wait()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
            raise
        return [env[t] for t in self.graph.outputs]

    def _run_op(self, i: int, env: dict[str, np.ndarray]) -> None:
        op = self.graph.ops[i]
        fn = OPS.get(op.kind)
        if fn is None:
            raise StreamexecError(f"op {op.name}: unknown kind {op.kind!r}")
        args = [env[t] for t in op.inputs]
        shape = self.graph.tensors[op.output]
        t0 = time.perf_counter()
        out = fn(OpContext(self.store, self.schedule.op_params.get(i, {})), op, args, shape)
        dt = time.perf_counter() - t0
        if tuple(out.shape) != tuple(shape):
            raise StreamexecError(f"op {op.name}: produced shape {list(out.shape)}, expected {list(shape)}")
        if self.check_finite and out.size and not (np.isfinite(out.max()) and np.isfinite(out.min())):
            raise StreamexecError(f"op {op.name} ({op.kind}) produced NaN/Inf; stopping")
        env[op.output] = out
        for t in set(op.inputs):
            if self._last_use.get(t) == i:
                del env[t]
        if self.trace:
            self.records.append(OpRecord(op.name, op.kind, dt, current_rss(),
                                         sum(self.store.nbytes(k) for k in op.weights.values())))
