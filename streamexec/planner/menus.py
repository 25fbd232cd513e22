"""The planner's kernel-parameter menus for the run-time budget guard: when the process goes
over its budget the guard (``runtime/guard.py``) steps the remaining ops down these menus
(smaller row chunks, panels, tiles, bands). The caller that plans hands them to the executor,
so the runtime never imports the planner's memory model."""

from __future__ import annotations

from collections.abc import Iterable

from ..models.graph import Graph
from .fit import weight_table
from .memory import WeightTable, op_scratch, param_options


class ParamMenus:
    """The planner's kernel-parameter menus of a graph's ops (built on first use, per op), over
    the weights of ``store``."""

    SHRINKABLE = ("linear", "conv2d", "attention", "prefix_attention", "mlp", "parallel_mlp")

    def __init__(self, graph: Graph, store) -> None:
        self.graph, self.store = graph, store
        self._table: WeightTable | None = None
        self._menus: dict[int, list[dict]] = {}

    @property
    def table(self) -> WeightTable:
        if self._table is None:
            self._table = weight_table(self.store)
        return self._table

    def menu(self, i: int) -> list[dict]:
        if i not in self._menus:
            op = self.graph.ops[i]
            self._menus[i] = param_options(self.graph, op, self.table) if op.kind in self.SHRINKABLE else [{}]
        return self._menus[i]

    def shrink(self, op_params: dict[int, dict], ops: Iterable[int]) -> int:
        """Move each of ``ops`` one step down its menu (smaller row chunks, panels, tiles,
        bands); returns how many ops changed."""
        changed = 0
        for i in ops:
            menu = self.menu(i)
            if len(menu) < 2:
                continue
            cur = op_params.get(i, {})
            if cur in menu:
                at = menu.index(cur)
            else:  # a plan's own choice off the menu: the first entry no bigger than it
                op = self.graph.ops[i]
                size = op_scratch(self.graph, op, self.table, cur)
                at = next((k for k, p in enumerate(menu) if op_scratch(self.graph, op, self.table, p) <= size),
                          len(menu) - 1)
            if at + 1 < len(menu):
                op_params[i] = dict(menu[at + 1])
                changed += 1
        return changed
