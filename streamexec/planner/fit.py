"""Fitting a run to a memory budget: the fastest schedule (by the cost model) whose peak fits.

The budget is the peak RSS of the whole process. At every op the planner charges:

    baseline (interpreter, libraries, compiled kernels: measured) + safety margin
  + weights resident: the streaming unit's, plus the next unit's if it is being mapped in ahead
  + activations alive in RAM (inputs held by the caller, tensors produced earlier and read later)
  + the op's output + its kernel scratch (decoded panels, im2col band, score tiles, …)

One *walk* goes over the builder units (a ResNet, a transformer block, …) in order, aiming at a
target. For each unit it tries the unit whole or one op per streaming unit, each with the next
unit's weights mapped in ahead (``populate``) or only read into the page cache (``readahead``),
and keeps the variant the cost model (``costs.py``) predicts fastest among those that stay under
the target. Within a variant every op takes the fastest of its options that fits: kernel
parameters from the menu (row chunks, weight panels, attention tiles, conv bands), activations
not needed soon written to a scratch file (farthest next use first), inputs read back band by
band, the output written straight to disk. When nothing fits, an op takes its smallest option.

A greedy walk can leave too little room later, so the fit does not trust one walk: it keeps a
fixed family of walks — the smallest-footprint walk (every op at its smallest), the unbounded
walk, and walks aimed at a ladder of targets ``smallest · ratio^k`` — and a budget gets the
fastest member whose peak and target are both within it. The family does not depend on the
budget, so a larger budget can only add members: every budget from the smallest upward fits, and
a larger one never gets a slower schedule. ``"min"`` is the smallest budget that fits.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field, replace
from math import prod

from ..errors import BudgetError
from ..models.graph import Graph
from ..sizes import format_size
from .costs import RATES, op_cost, op_seconds
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

#: Ratio between consecutive targets of the family of walks (3 %: a budget wastes at most that),
#: widened so that the ladder from the smallest to the unbounded peak has at most MAX_WALKS rungs.
RATIO = 1.03
MAX_WALKS = 40
_SPILL_S_PER_BYTE = 1 / RATES.spill_write + 1 / RATES.spill_read  # written once, read back once
#: Unit variants, in the order they are tried: (shape, how the next unit's weights come in).
VARIANTS = (("whole", "populate"), ("split", "populate"), ("whole", "readahead"), ("split", "readahead"))


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
    """A schedule and what it costs: per-op memory, the peak, the smallest budget that fits, and
    the predicted seconds per call (total, and per streaming unit with the variant it got)."""

    schedule: Schedule
    memory: list[OpMemory]
    budget: int | None
    baseline: int
    peak: int
    min_budget: int
    unit_names: list[str] = field(default_factory=list)
    seconds: float = 0.0
    unit_seconds: list[float] = field(default_factory=list)
    unit_choice: list[str] = field(default_factory=list)


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


class _Context:
    """What every walk over one graph shares: uses, weight keys, option menus, and cached scratch
    bytes and predicted seconds per (op, option)."""

    def __init__(self, graph: Graph, w: WeightTable) -> None:
        self.g, self.w = graph, w
        self.uses: dict[str, list[int]] = {}
        for i, op in enumerate(graph.ops):
            for t in dict.fromkeys(op.inputs):
                self.uses.setdefault(t, []).append(i)
        self.keys = [set(op.weights.values()) for op in graph.ops]
        self.inputs = [list(dict.fromkeys(op.inputs)) for op in graph.ops]
        # per op: its distinct inputs that it can read band by band from disk (every position)
        self.streamable = [{t for t in self.inputs[i] if all(streamable(op.kind, p, op.attrs)
                                                             for p, u in enumerate(op.inputs) if u == t)}
                           for i, op in enumerate(graph.ops)]
        self.out = [out_bytes(graph, op.output) for op in graph.ops]
        nbytes = {k: m.nbytes for k, m in w.items()}
        self.shapes = {k: m.shape for k, m in w.items()}
        self.dtypes = {k: m.dtype for k, m in w.items()}
        self.costs = [op_cost(graph, op, nbytes, self.shapes) for op in graph.ops]
        self._options: dict[int, list[dict]] = {}
        self._scratch: dict[tuple[int, int, bool], int] = {}
        self._seconds: dict[tuple[int, int], float] = {}
        self.units = Schedule.by_unit(graph).units

    def options(self, i: int) -> list[dict]:
        if i not in self._options:
            self._options[i] = param_options(self.g, self.g.ops[i], self.w)
        return self._options[i]

    def scratch(self, i: int, p: int, banded: bool) -> int:
        key = (i, p, banded)
        if key not in self._scratch:
            op, params = self.g.ops[i], self.options(i)[p]
            self._scratch[key] = (ooc_scratch if banded else op_scratch)(self.g, op, self.w, params)
        return self._scratch[key]

    def seconds(self, i: int, p: int) -> float:
        key = (i, p)
        if key not in self._seconds:
            self._seconds[key] = op_seconds(self.g, self.g.ops[i], self.costs[i], self.options(i)[p],
                                            self.shapes, self.dtypes)
        return self._seconds[key]

    def wbytes(self, keys: set[str]) -> int:
        return sum(self.w[k].nbytes for k in keys)

    def next_use(self, t: str, i: int) -> int:
        uses = self.uses.get(t, ())
        k = bisect_right(uses, i)
        return uses[k] if k < len(uses) else len(self.g.ops)


class _Walk:
    """One forward pass over the ops aiming at ``budget`` (None: unbounded; with ``minimal``
    every op takes its smallest option), deciding units, prefetch, spills and kernel parameters."""

    def __init__(self, ctx: _Context, budget: int | None, base: int, minimal: bool) -> None:
        self.ctx, self.g = ctx, ctx.g
        self.budget, self.base, self.minimal = budget, base, minimal
        graph = ctx.g
        self.pinned = set(graph.inputs) | set(graph.outputs)
        self.live: dict[str, int] = {t: out_bytes(graph, t) for t in graph.inputs}
        self.last_touch: dict[str, int] = {}
        self.spilled: dict[str, int] = {}
        self.units: list[list[int]] = []
        self.prefetch: list[str] = []
        self.unit_names: list[str] = []
        self.unit_seconds: list[float] = []
        self.unit_choice: list[str] = []
        self.params: dict[int, dict] = {}
        self.spill_after: dict[int, list[str]] = {}
        self.reload_before: dict[int, list[str]] = {}
        self.stream_inputs: dict[int, list[str]] = {}
        self.disk_out: set[int] = set()
        self.memory: list[OpMemory] = [OpMemory() for _ in graph.ops]
        self.op_secs: list[float] = [0.0] * len(graph.ops)
        self.failed: list[int] = []
        self.degraded = 0  # ops that spilled or took a smaller option (in the unit being tried)

    # -- state -----------------------------------------------------------------------------------
    def _snapshot(self):
        return (dict(self.live), dict(self.last_touch), dict(self.spilled),
                {k: list(v) for k, v in self.spill_after.items()}, {k: list(v) for k, v in self.reload_before.items()},
                {k: list(v) for k, v in self.stream_inputs.items()}, set(self.disk_out), dict(self.params))

    def _restore(self, snap) -> None:
        (self.live, self.last_touch, self.spilled, self.spill_after, self.reload_before, self.stream_inputs,
         self.disk_out, self.params) = snap

    # -- one op ----------------------------------------------------------------------------------
    def op(self, i: int, weights: int, prefetch: int) -> bool:
        """Account op ``i`` with the fastest option that fits (spilling, banding and shrinking as
        needed; the smallest when nothing fits). False if it is over the target."""
        ctx, g, op = self.ctx, self.g, self.g.ops[i]
        band = 0
        streams = self.stream_inputs.setdefault(i, [])
        for t in ctx.inputs[i]:
            if t not in self.spilled:
                continue
            if t in ctx.streamable[i]:
                streams.append(t)  # the op reads it band by band
                if op.kind in ("add", "conv2d"):  # these combine it through a band buffer
                    band = max(band, min(BAND_ELEMS * 4, self.spilled[t]))
            else:  # read back whole before the op
                self.live[t] = self.spilled.pop(t)
                self.reload_before.setdefault(i, []).append(t)
        budget = 0 if self.minimal else self.budget
        out_full = ctx.out[i]
        needed = set(op.inputs)
        live_total = sum(self.live.values())
        fixed = self.base + weights + prefetch + live_total
        conv_like = op.kind in ("conv2d", "group_norm")
        quick = fixed + out_full + band + ctx.scratch(i, 0, conv_like and op.inputs[0] in streams)
        if budget is None or quick <= budget:  # the fastest option fits as it is
            configs = [(0, False, False)]
            free, need = [], []
        else:
            free = sorted((t for t in self.live if t not in needed and t not in self.pinned and self.live[t] > 0),
                          key=lambda t: -ctx.next_use(t, i))
            # inputs this op could read band by band from disk (the last resort)
            need = [t for t in ctx.inputs[i] if t in self.live and t not in self.pinned and t in ctx.streamable[i]]
            can_disk = op.output not in self.pinned and banded_output(op.kind, op.attrs, g.tensors[op.output])
            modes = [(sn, d) for sn, d in ((False, False), (True, False), (False, True), (True, True))
                     if (need or not sn) and (can_disk or not d)]
            configs = [(p, sn, d) for p in range(len(ctx.options(i))) for sn, d in modes]
        best = None  # (seconds, total, config, spills, band)
        smallest = None
        for p, sn, d in configs:
            secs = ctx.seconds(i, p)
            if best is not None and secs >= best[0]:
                break  # options are in order of speed: nothing later can be faster
            banded = d or (conv_like and (op.inputs[0] in streams or (sn and op.inputs[0] in need)))
            b = band
            total = fixed + (0 if d else out_full) + ctx.scratch(i, p, banded)
            spills = []
            if sn:
                for t in need:
                    if op.kind in ("add", "conv2d"):
                        extra = max(0, min(BAND_ELEMS * 4, self.live[t]) - b)
                        b += extra
                        total += extra
                    total -= self.live[t]
                    spills.append(t)
            total += b
            for t in free:
                if budget is not None and total <= budget:
                    break
                total -= self.live[t]
                spills.append(t)
            io = (sum(self.live[t] for t in spills) + (out_full if d else 0)) * _SPILL_S_PER_BYTE
            cand = (secs + io, total, (p, sn, d), spills, b)
            if (budget is None or total <= budget) and (best is None or cand[0] < best[0]):
                best = cand
            if smallest is None or (total, cand[0]) < (smallest[1], smallest[0]):
                smallest = cand
        chosen = best or smallest
        assert chosen is not None
        secs, total, (p, sn, d), spills, band = chosen
        if p or spills or d:
            self.degraded += 1
        for t in spills:
            self.spilled[t] = self.live.pop(t)
            self.spill_after.setdefault(self.last_touch.get(t, -1), []).append(t)
            if t in needed:
                streams.append(t)
        if not streams:
            del self.stream_inputs[i]
        if d:
            self.disk_out.add(i)
        banded = d or (conv_like and op.inputs[0] in streams)
        params = ctx.options(i)[p] if budget is not None else {}
        if params:
            self.params[i] = params
        else:
            self.params.pop(i, None)
        mem = self.memory[i]
        mem.baseline, mem.weights, mem.prefetch = self.base, weights, prefetch
        mem.activations = sum(self.live.values())
        mem.output = 0 if d else out_full
        mem.scratch = ctx.scratch(i, p, banded) + band
        mem.spilled = sum(self.spilled.values())
        self.op_secs[i] = secs
        # after the op: its output is alive (in RAM, or on disk), inputs at their last use are freed
        if d:
            self.spilled[op.output] = out_full
        else:
            self.live[op.output] = out_full
        for t in ctx.inputs[i]:
            self.last_touch[t] = i
            if ctx.next_use(t, i) >= len(g.ops) and t not in self.pinned:
                self.live.pop(t, None)
        self.last_touch[op.output] = i
        if ctx.uses.get(op.output) is None and op.output not in self.pinned:
            self.live.pop(op.output, None)  # nothing reads it (should not happen in a built graph)
        return budget is None or mem.total <= budget

    # -- one builder unit ------------------------------------------------------------------------
    def unit(self, ops: list[int], next_ops: list[int], name: str) -> None:
        if self.budget is None:
            variants: tuple = (("whole", "populate"),)
        elif self.minimal:
            variants = (("split", "readahead"),)
        else:
            variants = VARIANTS
        best = None  # (seconds, variant, state after, per-op records)
        start = self._snapshot()
        for shape, mode in variants:
            self.degraded = 0
            ok, secs = self._run_unit(ops, next_ops, shape, mode)
            if ok and (best is None or secs[0] < best[0][0]):
                best = (secs, (shape, mode), self._snapshot(), self._records(ops))
            if ok and not self.degraded:
                break  # the fastest variant that fits with every op at its fastest option
            if len(variants) > 1:
                self._restore(start)
                start = self._snapshot()
        if best is None:  # nothing fits the target: the smallest-footprint variant, marked failed
            if len(variants) > 1:
                self._run_unit(ops, next_ops, "split", "readahead")
                best_secs = self._run_unit_secs
                shape, mode = "split", "readahead"
            else:
                best_secs, (shape, mode) = self._run_unit_secs, variants[0]
            self.failed.extend(i for i in ops if self.memory[i].total > (self.budget or 0))
        else:
            best_secs, (shape, mode), state, records = best
            self._restore(state)
            self._set_records(ops, records)
        self._emit(ops, shape, mode, name, best_secs[1])

    def _records(self, ops: list[int]):
        return [(replace(self.memory[i]), self.op_secs[i]) for i in ops]

    def _set_records(self, ops: list[int], records) -> None:
        for i, (mem, secs) in zip(ops, records):
            self.memory[i], self.op_secs[i] = mem, secs

    def _run_unit(self, ops, next_ops, shape, mode) -> tuple[bool, tuple[float, list[float]]]:
        """Walk the unit's ops in one variant; (all within the target, (predicted seconds, per
        emitted streaming unit)). Waiting for weights: mapped ahead (``populate``) they load
        behind the compute before; read ahead only, they fault in before the unit starts."""
        ctx = self.ctx
        ok = True
        if shape == "whole":
            keys = set().union(*(ctx.keys[i] for i in ops))
            nxt = set().union(*(ctx.keys[i] for i in next_ops)) - keys if next_ops else set()
            pb = ctx.wbytes(nxt) if mode == "populate" else 0
            for i in ops:
                ok &= self.op(i, ctx.wbytes(keys), pb)
            compute = sum(self.op_secs[i] for i in ops)
            per = [compute + self._wait(ctx.wbytes(nxt), compute, mode)]
        else:
            per = []
            for n, i in enumerate(ops):
                own = ctx.keys[i]
                nxt = ctx.keys[ops[n + 1]] if n + 1 < len(ops) else (
                    set().union(*(ctx.keys[j] for j in next_ops)) if next_ops else set())
                nb = ctx.wbytes(nxt - own)
                ok &= self.op(i, ctx.wbytes(own), nb if mode == "populate" else 0)
                per.append(self.op_secs[i] + self._wait(nb, self.op_secs[i], mode))
        self._run_unit_secs = (sum(per), per)
        return ok, self._run_unit_secs

    @staticmethod
    def _wait(nbytes: int, compute: float, mode: str) -> float:
        load = nbytes / RATES.weight_map
        return max(0.0, load - compute) if mode == "populate" else load

    def _emit(self, ops: list[int], shape: str, mode: str, name: str, per: list[float]) -> None:
        if shape == "whole":
            self.units.append(list(ops))
            self.prefetch.append(mode)
            self.unit_names.append(name)
            self.unit_choice.append(f"whole, {mode}")
        else:
            for i in ops:
                self.units.append([i])
                self.prefetch.append(mode)
                self.unit_names.append(f"{name}/{self.g.ops[i].name}" if self.g.ops[i].name != name else name)
                self.unit_choice.append(f"split, {mode}")
        self.unit_seconds.extend(per)

    def run(self) -> _Walk:
        units = self.ctx.units
        for u, ops in enumerate(units):
            self.unit(ops, units[u + 1] if u + 1 < len(units) else [], self.g.ops[ops[0]].unit)
        return self

    @property
    def peak(self) -> int:
        return max((m.total for m in self.memory), default=self.base)

    @property
    def seconds(self) -> float:
        return sum(self.unit_seconds)

    def schedule(self) -> Schedule:
        spill_after = {k: v for k, v in self.spill_after.items() if k >= 0}
        return Schedule(self.units, self.params, self.prefetch, spill_after, self.reload_before,
                        {i: m.total for i, m in enumerate(self.memory)}, self.stream_inputs, set(self.disk_out))


class _Family:
    """The budget-independent family of walks a budget chooses from (see the module doc).
    A member is usable from ``threshold`` = max(its target, its peak) upward; members are walked
    lazily, in order of target, only as far as a budget needs."""

    def __init__(self, graph: Graph, weights: WeightTable, baseline: int) -> None:
        self.ctx = _Context(graph, weights)
        self.base = baseline + SAFETY_MARGIN + lora_bytes(weights)  # LoRA factors stay in RAM
        self.smallest = _Walk(self.ctx, 0, self.base, minimal=True).run()
        self.free = _Walk(self.ctx, None, self.base, minimal=False).run()
        self.members: list[tuple[int, _Walk]] = [(self.smallest.peak, self.smallest), (self.free.peak, self.free)]
        self._next_target = self.smallest.peak
        span = max(1.0, self.free.peak / max(1, self.smallest.peak))
        self.ratio = max(RATIO, span ** (1 / MAX_WALKS))

    @property
    def minimum(self) -> int:
        """The smallest budget that fits: no member's threshold is lower."""
        return min(self.smallest.peak, self.free.peak)

    def best(self, budget: int) -> _Walk | None:
        """The fastest member usable within ``budget`` (ties: the smaller threshold)."""
        while self._next_target <= min(budget, self.free.peak):
            t = self._next_target
            w = _Walk(self.ctx, t, self.base, minimal=False).run()
            self.members.append((max(t, w.peak), w))
            self._next_target = int(t * self.ratio) + 1
        usable = [(w.seconds, th, n, w) for n, (th, w) in enumerate(self.members) if th <= budget]
        return min(usable)[3] if usable else None


def minimum_budget(graph: Graph, weights: WeightTable, baseline: int) -> tuple[int, int]:
    """The smallest budget any schedule of ``graph`` fits in, and the op that needs it."""
    fam = _Family(graph, weights, baseline)
    w = fam.smallest if fam.smallest.peak <= fam.free.peak else fam.free
    totals = [m.total for m in w.memory]
    return fam.minimum, max(range(len(totals)), key=totals.__getitem__) if totals else 0


def fit_schedule(graph: Graph, weights: WeightTable, budget: int | str | None, baseline: int) -> Fit:
    """The fastest schedule (by the cost model) to run ``graph`` within ``budget`` bytes of peak
    RSS, given the process ``baseline`` (None: unbounded; "min": the smallest budget that fits;
    "smallest": the walk with every op at its smallest option, for tests of the out-of-core paths).
    Raises ``BudgetError`` when nothing fits, naming the smallest budget that does."""
    fam = _Family(graph, weights, baseline)
    if budget is None:
        return _fit(fam.free, None, baseline, fam.minimum)
    if budget == "smallest":  # every op at its smallest option: exercises every out-of-core path
        return _fit(fam.smallest, fam.smallest.peak, baseline, fam.minimum)
    if budget == "min":
        budget = fam.minimum
    assert isinstance(budget, int)
    if budget >= fam.free.peak:  # no member is predicted faster than the unbounded walk
        return _fit(fam.free, budget, baseline, fam.minimum)
    best = fam.best(budget)
    if best is None:
        _, worst = minimum_budget(graph, weights, baseline)
        op = graph.ops[worst].name if graph.ops else "-"
        raise BudgetError(
            f"memory budget {format_size(budget)} is too small for {graph.model}: the smallest that fits is "
            f"{format_size(_round_up(fam.minimum))} (at op {op}; the process itself takes {format_size(baseline)})"
        )
    return _fit(best, budget, baseline, fam.minimum)


def _fit(w: _Walk, budget: int | None, baseline: int, minimum: int) -> Fit:
    return Fit(w.schedule(), w.memory, budget, baseline, w.peak, minimum, w.unit_names, w.seconds,
               list(w.unit_seconds), list(w.unit_choice))


def _round_up(n: int, step: int = _MIB) -> int:
    return -(-n // step) * step
