"""Running a saved plan: open the checkpoint it names, refuse it if the files changed or the
plan names weights the checkpoint lacks, and execute each component's graph exactly as planned
(re-fitting only if this process turns out bigger than the one the plan was made in), under the
run-time budget guard with the plan's budget, as ``streamexec run`` and the Python API do."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import PlanError
from ..models.graph import Graph
from ..planner.fit import BASELINE_SLACK, fit_schedule, weight_table
from ..planner.menus import ParamMenus
from ..planner.plan import check_checkpoint, check_weights, graph_from_dict, read_plan_dict
from ..planner.schedule import Schedule
from ..weights.checkpoint import Checkpoint, open_checkpoint
from ..weights.store import WeightStore
from .executor import Executor
from .guard import ShrinkMenus
from .process import measure_baseline


class PlannedComponent:
    """One component of a plan: ``run(**inputs)`` returns the graph's outputs.

    Guarded like ``api.StreamedModel`` (``runtime/guard.py``): ``budget`` (the plan's byte budget,
    a bound on this process's RSS) is checked after every op; going over it raises
    ``BudgetExceeded`` with ``strict``, else cuts the rest of the run finer and keeps the adapted
    schedule for the next calls. ``guard = False`` (or no byte budget) runs exactly the plan."""

    def __init__(self, name: str, graph: Graph, schedule: Schedule, store: WeightStore, scratch_dir: str | None,
                 budget: int | None = None, strict: bool = False, menus: ShrinkMenus | None = None):
        self.name, self.graph, self.schedule, self.store = name, graph, schedule, store
        self.scratch_dir = scratch_dir
        self.budget = budget
        self.strict = strict
        self.menus = menus
        self.guard = True
        self.trace = False
        self.last_executor: Executor | None = None

    def run(self, **inputs: np.ndarray) -> list[np.ndarray]:
        ex = Executor(self.graph, self.store, self.schedule, trace=self.trace, scratch_dir=self.scratch_dir,
                      budget=self.budget if self.guard else None, strict=self.strict, menus=self.menus)
        self.last_executor = ex
        out = ex.run(inputs)
        if ex.schedule is not self.schedule:  # the guard adapted it: the next calls start from there
            self.schedule = ex.schedule
        return out


class PlannedRun:
    """A plan file opened against its checkpoint. Every component runs under the budget guard
    with the plan's byte budget (or ``memory_budget``; ``"min"`` plans store their peak): with
    ``strict`` the op that takes the process over it raises ``BudgetExceeded``, otherwise the rest
    of the run is cut finer (see ``PlannedComponent``)."""

    def __init__(self, plan_path: str | Path, model: str | Path | None = None, scratch_dir: str | None = None,
                 memory_budget: int | None = None, *, strict: bool = False) -> None:
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
            # the guard's bound on this process's RSS: a byte budget (None: no budget, no guard)
            guard_limit = budget if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0 else None
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
                if base > planned_base + BASELINE_SLACK or budget_changed:
                    # this process is bigger than the planning one (or the budget changed): re-fit
                    schedule = fit_schedule(graph, weight_table(store), budget, base).schedule
                    self.notes.append(f"{name}: re-planned for a process baseline of {base >> 20} MiB "
                                      f"(the plan assumed {planned_base >> 20} MiB)")
                self.components[name] = PlannedComponent(name, graph, schedule, store, scratch_dir,
                                                         budget=guard_limit, strict=strict,
                                                         menus=ParamMenus(graph, store))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for c in self.components.values():
            c.store.close()
        self.checkpoint.close()
