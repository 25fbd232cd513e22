"""The planner's output: a :class:`Schedule` says how to run a graph (streaming units, what is
loaded ahead, kernel parameters, spills). The planner makes it (``fit.py``), ``plan.py`` writes
and reads it, the runtime's executor follows it and imports it from here."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.graph import Graph

#: How the weights of the next unit are loaded while a unit computes: "populate" maps them into
#: the process (costs RSS, no page faults later), "readahead" only asks the kernel to read them
#: into the page cache (no RSS), "none" loads nothing ahead.
PREFETCH_MODES = ("populate", "readahead", "none")


@dataclass
class Schedule:
    """How to run a graph, as the planner decided: ops grouped into streaming units; per unit how
    the next unit's weights are loaded meanwhile; per op kernel parameters (row_chunk,
    panel_rows, q_tile, k_tile, band_rows); which activations go to disk after an op and come
    back whole before one, or are read back band by band by the op itself (``stream_inputs``);
    which ops write their output straight to disk, band by band (``disk_out``); and the planned
    peak bytes of each op (for the trace)."""

    units: list[list[int]]
    op_params: dict[int, dict] = field(default_factory=dict)
    prefetch: list[str] | None = None
    spill_after: dict[int, list[str]] = field(default_factory=dict)
    reload_before: dict[int, list[str]] = field(default_factory=dict)
    planned_bytes: dict[int, int] = field(default_factory=dict)
    stream_inputs: dict[int, list[str]] = field(default_factory=dict)
    disk_out: set[int] = field(default_factory=set)

    def prefetch_mode(self, u: int) -> str:
        return "populate" if self.prefetch is None else self.prefetch[u]

    @classmethod
    def by_unit(cls, graph: Graph) -> Schedule:
        """One streaming unit per builder unit (consecutive ops with the same ``unit``)."""
        units: list[list[int]] = []
        last = None
        for i, op in enumerate(graph.ops):
            if op.unit != last or not units:
                units.append([])
                last = op.unit
            units[-1].append(i)
        return cls(units)
