"""Running a saved plan: open the checkpoint it names, refuse it if the files changed or the
plan names weights the checkpoint lacks, and execute each component's graph exactly as planned
(re-fitting only if this process turns out bigger than the one the plan was made in)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import PlanError
from ..models.graph import Graph
from ..weights.checkpoint import Checkpoint, open_checkpoint
from ..weights.store import WeightStore
from .executor import Executor, Schedule
from .process import measure_baseline


class PlannedComponent:
    """One component of a plan: ``run(**inputs)`` returns the graph's outputs."""

    def __init__(self, name: str, graph: Graph, schedule: Schedule, store: WeightStore, scratch_dir: str | None):
        self.name, self.graph, self.schedule, self.store = name, graph, schedule, store
        self.scratch_dir = scratch_dir
        self.trace = False
        self.last_executor: Executor | None = None

    def run(self, **inputs: np.ndarray) -> list[np.ndarray]:
        ex = Executor(self.graph, self.store, self.schedule, trace=self.trace, scratch_dir=self.scratch_dir)
        self.last_executor = ex
        return ex.run(inputs)


class PlannedRun:
    """A plan file opened against its checkpoint."""

    def __init__(self, plan_path: str | Path, model: str | Path | None = None, scratch_dir: str | None = None,
                 memory_budget: int | None = None) -> None:
        from ..planner.fit import fit_schedule, weight_table
        from ..planner.plan import check_checkpoint, check_weights, graph_from_dict, read_plan_dict

        self.plan = read_plan_dict(plan_path)
        root = model if model is not None else (self.plan.get("checkpoint") or {}).get("root")
        if not root:
            raise PlanError(f"{plan_path}: the plan names no checkpoint; pass the model folder")
        self.checkpoint: Checkpoint = open_checkpoint(root, variant=(self.plan.get("checkpoint") or {}).get("variant"))
        self.components: dict[str, PlannedComponent] = {}
        self.notes: list[str] = []
        try:
            check_checkpoint(self.plan, self.checkpoint)
            mem = self.plan.get("memory") or {}
            budget = memory_budget if memory_budget is not None else mem.get("budget_bytes")
            planned_base = int(mem.get("baseline_bytes") or 0)
            comps = self.plan.get("components") or {}
            if not isinstance(comps, dict) or not comps:
                raise PlanError(f"{plan_path}: the plan has no components")
            dtypes = {t.dtype for c in self.checkpoint.components.values() for t in c.tensors.values()}
            base = measure_baseline(dtypes)
            for name, c in comps.items():
                graph, schedule, _ = graph_from_dict(name, c)
                check_weights(graph, self.checkpoint, name)
                store = self.checkpoint.store(name)
                budget_changed = memory_budget is not None and memory_budget != mem.get("budget_bytes")
                if base > planned_base + (8 << 20) or budget_changed:
                    # this process is bigger than the planning one (or the budget changed): re-fit
                    schedule = fit_schedule(graph, weight_table(store), budget, base).schedule
                    self.notes.append(f"{name}: re-planned for a process baseline of {base >> 20} MiB "
                                      f"(the plan assumed {planned_base >> 20} MiB)")
                self.components[name] = PlannedComponent(name, graph, schedule, store, scratch_dir)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for c in self.components.values():
            c.store.close()
        self.checkpoint.close()
