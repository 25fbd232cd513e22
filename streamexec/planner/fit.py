"""Fitting a run to a memory budget.

The budget is the peak RSS of the whole process. At every op the planner charges:

    baseline (interpreter, libraries, compiled kernels: measured) + safety margin
  + weights resident: the streaming unit's, plus the next unit's if it is being mapped in ahead
  + activations alive in RAM (inputs held by the caller, tensors produced earlier and read later)
  + the op's output + its kernel scratch (decoded panels, im2col band, score tiles, …)

and walks the ops in order, choosing for each builder unit (a ResNet, a transformer block, …)
the cheapest way to stay under the budget, in this order of preference:

1. the unit whole, the next unit's weights mapped in ahead (``populate``);
2. one streaming unit per op (only one op's weights resident), next op mapped ahead;
3. per op, the next op's weights only read ahead into the page cache (``readahead``: no RSS);
4. activations not needed soon written to a scratch file (farthest next use first), read back
   band by band by the op that needs them where it can (concat, add, residual inputs), else
   whole just before it;
5. smaller kernel parameters (row chunks, weight panels, attention tiles, conv bands).

If even the smallest choices do not fit, nothing runs: ``BudgetError`` says the smallest budget
that fits, computed by the same walk with every choice at its smallest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

from ..errors import BudgetError
from ..models.graph import Graph
from ..sizes import format_size
from .memory import WeightTable, ooc_scratch, op_scratch, out_bytes, param_options
from .schedule import Schedule
from .streaming import BAND_ELEMS, banded_output, streamable

_MIB = 1 << 20

#: What the planner adds to the measured baseline for things it cannot see op by op: kernel code
#: compiled or loaded from the cache mid-run, OpenBLAS' per-thread packing buffers, the Python
#: objects of the trace, allocator rounding. Checked by the VmHWM tests.
SAFETY_MARGIN = 24 * _MIB

#: How much bigger than the process a plan was made in (its baseline) a process may be and still
#: run the plan's schedule as it is; past this the schedule is fitted again (``api.py``,
#: ``runtime/planned.py``).
BASELINE_SLACK = 8 * _MIB


@dataclass
class OpMemory:
    """The planner's account of one op (bytes)."""

    baseline: int = 0
    weights: int = 0
    prefetch: int = 0
    activations: int = 0
    output: int = 0
    scratch: int = 0
    spilled: int = 0  # bytes on disk while this op runs

    @property
    def total(self) -> int:
        return self.baseline + self.weights + self.prefetch + self.activations + self.output + self.scratch


@dataclass
class Fit:
    """A schedule and what it costs: per-op memory, the peak, and the smallest budget that fits."""

    schedule: Schedule
    memory: list[OpMemory]
    budget: int | None
    baseline: int
    peak: int
    min_budget: int
    unit_names: list[str] = field(default_factory=list)


def weight_table(store) -> WeightTable:
    """Shapes, dtypes and bytes of a store's weights; tensors assembled from parts count twice
    (the mapped parts and the joined copy)."""
    from .memory import WeightMeta

    out = {}
    lora = getattr(store, "lora", {})
    for k, m in store.tensors.items():
        rank = int(lora[k][1].shape[0]) if k in lora else 0
        out[k] = WeightMeta(tuple(m.shape), m.dtype, m.nbytes * (1 if m.is_view else 2), rank)
    return out


def lora_bytes(w: WeightTable) -> int:
    """RAM of the LoRA factors the weights carry (f32, resident for the whole run)."""
    from ..kernels.lora import lora_factor_bytes

    return sum(lora_factor_bytes(m.shape[0], prod(m.shape[1:]), m.lora_rank) for m in w.values() if m.lora_rank)


class _Walk:
    """One forward pass over the ops, deciding units, prefetch, spills and kernel parameters."""

    def __init__(self, graph: Graph, w: WeightTable, budget: int | None, base: int, minimal: bool) -> None:
        self.g, self.w, self.budget, self.minimal = graph, w, budget, minimal
        self.base = base + lora_bytes(w)  # LoRA factors stay in RAM next to the process
        self.uses: dict[str, list[int]] = {}
        for i, op in enumerate(graph.ops):
            for t in dict.fromkeys(op.inputs):
                self.uses.setdefault(t, []).append(i)
        self.pinned = set(graph.inputs) | set(graph.outputs)
        self.live: dict[str, int] = {t: out_bytes(graph, t) for t in graph.inputs}
        self.last_touch: dict[str, int] = {}
        self.spilled: dict[str, int] = {}
        self.units: list[list[int]] = []
        self.prefetch: list[str] = []
        self.unit_names: list[str] = []
        self.params: dict[int, dict] = {}
        self.spill_after: dict[int, list[str]] = {}
        self.reload_before: dict[int, list[str]] = {}
        self.stream_inputs: dict[int, list[str]] = {}
        self.disk_out: set[int] = set()
        self.memory: list[OpMemory] = [OpMemory() for _ in graph.ops]
        self.failed: list[int] = []

    # -- helpers ---------------------------------------------------------------------------------
    def wkeys(self, ops: list[int]) -> set[str]:
        return {k for i in ops for k in self.g.ops[i].weights.values()}

    def wbytes(self, keys: set[str]) -> int:
        return sum(self.w[k].nbytes for k in keys)

    def next_use(self, t: str, i: int) -> int:
        for j in self.uses.get(t, ()):
            if j > i:
                return j
        return len(self.g.ops)

    def _snapshot(self):
        return (dict(self.live), dict(self.last_touch), dict(self.spilled),
                {k: list(v) for k, v in self.spill_after.items()}, {k: list(v) for k, v in self.reload_before.items()},
                {k: list(v) for k, v in self.stream_inputs.items()}, set(self.disk_out))

    def _restore(self, snap) -> None:
        (self.live, self.last_touch, self.spilled, self.spill_after, self.reload_before, self.stream_inputs,
         self.disk_out) = snap

    # -- one op ----------------------------------------------------------------------------------
    def op(self, i: int, weights: int, prefetch: int, flexible: bool) -> bool:
        """Account op ``i``; with ``flexible`` spill and shrink as needed. False if over budget."""
        g, op = self.g, self.g.ops[i]
        band = 0
        for t in dict.fromkeys(op.inputs):
            if t not in self.spilled:
                continue
            if all(streamable(op.kind, p, op.attrs) for p, u in enumerate(op.inputs) if u == t):
                self.stream_inputs.setdefault(i, []).append(t)  # the op reads it band by band
                if op.kind in ("add", "conv2d"):  # these combine it through a band buffer
                    band = max(band, min(BAND_ELEMS * 4, self.spilled[t]))
            else:  # read back whole before the op
                self.live[t] = self.spilled.pop(t)
                self.reload_before.setdefault(i, []).append(t)
        out = out_bytes(g, op.output)
        options = param_options(g, op, self.w) if flexible else [{}]
        fixed = self.base + weights + prefetch + out + band
        needed = set(op.inputs)
        spillable = sorted(
            (t for t in self.live if t not in needed and t not in self.pinned and self.live[t] > 0),
            key=lambda t: -self.next_use(t, i),
        )
        # inputs this op could read band by band from disk are the last resort
        spillable += [t for t in dict.fromkeys(op.inputs) if t in self.live and t not in self.pinned
                      and all(streamable(op.kind, p, op.attrs) for p, u in enumerate(op.inputs) if u == t)]
        band_of = {t: (min(BAND_ELEMS * 4, self.live[t]) if op.kind in ("add", "conv2d") else 0)
                   for t in spillable if t in needed}
        spill_room = sum(self.live[t] - band_of.get(t, 0) for t in spillable) if flexible else 0
        live_total = sum(self.live.values())
        budget = 0 if self.minimal else self.budget
        chosen, scratch = options[-1], op_scratch(g, op, self.w, options[-1])
        if budget is None:
            chosen, scratch = options[0], op_scratch(g, op, self.w, options[0])
        else:
            for p in options:
                s = op_scratch(g, op, self.w, p)
                if fixed + live_total - spill_room + s <= budget:
                    chosen, scratch = p, s
                    break
            over = fixed + live_total + scratch - budget
            for t in spillable if flexible else ():
                if over <= 0:
                    break
                extra = max(0, band_of.get(t, 0) - band)
                b = self.live.pop(t)
                self.spilled[t] = b
                over -= b - extra
                band += extra
                self.spill_after.setdefault(self.last_touch.get(t, -1), []).append(t)
                if t in needed:
                    self.stream_inputs.setdefault(i, []).append(t)
            # still over: write the output straight to disk, band by band (conv2d, group_norm, add)
            if (flexible and over > 0 and op.output not in self.pinned
                    and banded_output(op.kind, op.attrs, g.tensors[op.output])):
                self.disk_out.add(i)
        banded = i in self.disk_out or (op.kind in ("conv2d", "group_norm") and op.inputs[0] in
                                        self.stream_inputs.get(i, ()))
        if banded:
            scratch = ooc_scratch(g, op, self.w, chosen)
            if i in self.disk_out:
                out = 0
            if budget is not None and flexible:  # spill more if the banded run is still over
                over = self.base + weights + prefetch + out + band + sum(self.live.values()) + scratch - budget
                for t in [t for t in spillable if t in self.live]:
                    if over <= 0:
                        break
                    b = self.live.pop(t)
                    self.spilled[t] = b
                    over -= b
                    self.spill_after.setdefault(self.last_touch.get(t, -1), []).append(t)
                    if t in needed:
                        self.stream_inputs.setdefault(i, []).append(t)
        if chosen:
            self.params[i] = chosen
        mem = self.memory[i]
        mem.baseline, mem.weights, mem.prefetch = self.base, weights, prefetch
        mem.activations = sum(self.live.values())
        mem.output, mem.scratch = out, scratch + band
        mem.spilled = sum(self.spilled.values())
        # after the op: its output is alive (in RAM, or on disk), inputs at their last use are freed
        if i in self.disk_out:
            self.spilled[op.output] = out_bytes(g, op.output)
        else:
            self.live[op.output] = out
        for t in dict.fromkeys(op.inputs):
            self.last_touch[t] = i
            if self.next_use(t, i) >= len(g.ops) and t not in self.pinned:
                self.live.pop(t, None)
        self.last_touch[op.output] = i
        if self.uses.get(op.output) is None and op.output not in self.pinned:
            self.live.pop(op.output, None)  # nothing reads it (should not happen in a built graph)
        return budget is None or mem.total <= budget

    # -- one builder unit ------------------------------------------------------------------------
    def unit(self, ops: list[int], next_ops: list[int], name: str) -> None:
        keys = self.wkeys(ops)
        next_keys = self.wkeys(next_ops) - keys
        tries = [] if self.minimal else [("whole", "populate"), ("split", "populate"), ("split", "readahead")]
        if self.budget is None:
            tries = [("whole", "populate")]
        for shape, mode in tries:
            snap = self._snapshot()
            params_snap = dict(self.params)
            if self._run_unit(ops, next_ops, keys, next_keys, shape, mode, flexible=False) or self.budget is None:
                self._emit(ops, shape, mode, name)
                return
            self._restore(snap)
            self.params = params_snap
        ok = self._run_unit(ops, next_ops, keys, next_keys, "split", "readahead", flexible=True)
        if not ok:
            self.failed.extend(i for i in ops if self.memory[i].total > (self.budget or 0))
        self._emit(ops, "split", "readahead", name)

    def _run_unit(self, ops, next_ops, keys, next_keys, shape, mode, flexible) -> bool:
        ok = True
        if shape == "whole":
            wb = self.wbytes(keys)
            pb = self.wbytes(next_keys) if mode == "populate" else 0
            for i in ops:
                ok &= self.op(i, wb, pb, flexible)
            return ok
        for n, i in enumerate(ops):
            own = self.wkeys([i])
            nxt = self.wkeys([ops[n + 1]]) if n + 1 < len(ops) else self.wkeys(next_ops)
            pb = self.wbytes(nxt - own) if mode == "populate" else 0
            ok &= self.op(i, self.wbytes(own), pb, flexible)
        return ok

    def _emit(self, ops: list[int], shape: str, mode: str, name: str) -> None:
        if shape == "whole":
            self.units.append(list(ops))
            self.prefetch.append(mode)
            self.unit_names.append(name)
        else:
            for i in ops:
                self.units.append([i])
                self.prefetch.append(mode)
                self.unit_names.append(f"{name}/{self.g.ops[i].name}" if self.g.ops[i].name != name else name)

    def run(self) -> None:
        builder_units = Schedule.by_unit(self.g).units
        for u, ops in enumerate(builder_units):
            nxt = builder_units[u + 1] if u + 1 < len(builder_units) else []
            self.unit(ops, nxt, self.g.ops[ops[0]].unit)

    def schedule(self) -> Schedule:
        spill_after = {k: v for k, v in self.spill_after.items() if k >= 0}
        return Schedule(self.units, self.params, self.prefetch, spill_after, self.reload_before,
                        {i: m.total for i, m in enumerate(self.memory)}, self.stream_inputs, set(self.disk_out))


def minimum_budget(graph: Graph, weights: WeightTable, baseline: int) -> tuple[int, int]:
    """The smallest budget any schedule of ``graph`` fits in, and the op that needs it."""
    walk = _Walk(graph, weights, 0, baseline + SAFETY_MARGIN, minimal=True)
    walk.run()
    totals = [m.total for m in walk.memory]
    worst = max(range(len(totals)), key=totals.__getitem__) if totals else 0
    return (max(totals) if totals else baseline + SAFETY_MARGIN), worst


def fit_schedule(graph: Graph, weights: WeightTable, budget: int | str | None, baseline: int) -> Fit:
    """The schedule to run ``graph`` within ``budget`` bytes of peak RSS (None: unbounded, the
    fastest schedule; "min": the smallest footprint, every choice at its smallest — one op per
    unit, no mapping ahead, every activation that can wait on disk, the smallest chunks), given
    the process ``baseline``. Raises ``BudgetError`` when nothing fits."""
    if budget == "min":
        walk = _Walk(graph, weights, 0, baseline + SAFETY_MARGIN, minimal=True)
        walk.run()
        peak = max((m.total for m in walk.memory), default=baseline + SAFETY_MARGIN)
        return Fit(walk.schedule(), walk.memory, peak, baseline, peak, peak, walk.unit_names)
    assert budget is None or isinstance(budget, int)
    minimum, worst = minimum_budget(graph, weights, baseline)
    walk = _Walk(graph, weights, budget, baseline + SAFETY_MARGIN, minimal=False)
    walk.run()
    peak = max((m.total for m in walk.memory), default=baseline + SAFETY_MARGIN)
    if budget is not None and (walk.failed or peak > budget):
        op = graph.ops[worst].name if graph.ops else "-"
        raise BudgetError(
            f"memory budget {format_size(budget)} is too small for {graph.model}: the smallest that fits is "
            f"{format_size(_round_up(minimum))} (at op {op}; the process itself takes {format_size(baseline)})"
        )
    return Fit(walk.schedule(), walk.memory, budget, baseline, peak, minimum, walk.unit_names)


def _round_up(n: int, step: int = _MIB) -> int:
    return -(-n // step) * step
