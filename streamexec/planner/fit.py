"""Fitting a schedule to a memory budget: streaming units, prefetch, and kernel chunk sizes."""

from __future__ import annotations

from ..models.graph import Graph
from ..runtime.executor import Schedule
from ..weights.store import WeightStore


def fit_schedule(graph: Graph, store: WeightStore, budget: int | None) -> Schedule:
    """The schedule to run ``graph`` within ``budget`` bytes of peak RSS (None: unbounded)."""
    return Schedule.by_unit(graph)
