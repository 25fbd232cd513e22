"""The plan: for each component a run executes, its op graph (every op, shapes, weights), what it
costs (GEMM M×N×K, FLOPs, bytes) and the schedule that fits the memory budget — and its
serialisation, ``plan.yaml``: versioned, readable, loaded with ``yaml.safe_load`` only, recording
the checkpoint's files (size + header hash) so that ``run`` refuses a plan whose checkpoint
changed."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .. import __version__
from ..errors import PlanError
from ..models.graph import Graph, Op, WeightInfo
from ..models.registry import RunShape, build_component
from ..weights.checkpoint import Checkpoint
from .costs import OpCost, op_cost
from .fit import Fit, OpMemory, fit_schedule, weight_table
from .memory import WeightTable
from .schedule import PREFETCH_MODES, Schedule

PLAN_VERSION = 1
PLAN_KIND = "streamexec-plan"


@dataclass
class ComponentPlan:
    """One component's graph, costs and fitted schedule."""

    name: str
    graph: Graph
    fit: Fit
    costs: list[OpCost]
    mode: str = "forward"  # the VAE: "decode" or "encode"

    @property
    def flops(self) -> int:
        return sum(c.flops for c in self.costs)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights streamed per call."""
        return sum(c.weight_bytes for c in self.costs)


@dataclass
class Plan:
    """Everything ``run`` and ``inspect`` need; built from headers and configs only."""

    checkpoint_root: str
    variant: str | None
    files: list[dict]
    budget: int | str | None
    baseline: int
    workers: int
    shape: RunShape
    steps: int | None
    components: dict[str, ComponentPlan] = field(default_factory=dict)
    created: str = ""
    settings: dict = field(default_factory=dict)  # run settings recorded for `run` (sampler, cfg_scale, ...)
    path: Path | None = None
    roles: dict = field(default_factory=dict)  # role -> file (--vae, --clip-l, ...), reopened by `run`

    @property
    def peak(self) -> int:
        return max((c.fit.peak for c in self.components.values()), default=self.baseline)

    @property
    def min_budget(self) -> int:
        return max((c.fit.min_budget for c in self.components.values()), default=self.baseline)


def plan_components(ckpt: Checkpoint, names: list[str], shape: RunShape, budget: int | str | None, baseline: int,
                    steps: int | None = None, vae_mode: str = "decode", variant: str | None = None,
                    loras: list[tuple[str, float]] | None = None) -> Plan:
    """Build and fit every named component of ``ckpt`` for a run of ``shape`` (with ``loras``
    [(path, weight)]: their factors and scratch are counted)."""
    from ..kernels.threads import kernel_workers
    from ..weights.lora import lora_factors, read_loras

    files = read_loras(loras, names) if loras else []

    configs = {n: dict(c.config or {}) for n, c in ckpt.components.items()}
    plan = Plan(str(ckpt.root), variant, ckpt.fingerprint(), budget, baseline,
                kernel_workers(), shape, steps, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                roles=dict(ckpt.roles))
    for name in names:
        comp = ckpt.component(name)
        store = ckpt.store(name)
        try:
            if files:
                store.set_lora(lora_factors(files, name, {k: t.shape for k, t in store.tensors.items()}))
            table = weight_table(store)

            def info(key: str, table=table):
                m = table.get(key)
                return None if m is None else (m.shape, m.dtype)

            plan_graph(plan, name, configs, info, table, str(comp.folder or ckpt.root), vae_mode)
        finally:
            store.close()
    return plan


def plan_graph(plan: Plan, name: str, configs: dict[str, dict], info: WeightInfo, table: WeightTable, where: str,
               vae_mode: str = "decode") -> ComponentPlan:
    """Build component ``name`` from its weights (``info``; ``table``: their stored sizes), cost
    and fit it into ``plan``."""
    graph = build_component(name, configs.get(name, {}), info, plan.shape, configs, where, vae_mode=vae_mode)
    fit = fit_schedule(graph, table, plan.budget, plan.baseline)
    nbytes = {k: m.nbytes for k, m in table.items()}
    shapes = {k: m.shape for k, m in table.items()}
    costs = [op_cost(graph, op, nbytes, shapes) for op in graph.ops]
    cp = ComponentPlan(name, graph, fit, costs, vae_mode if name == "vae" else "forward")
    plan.components[name] = cp
    return cp


# -- serialisation -----------------------------------------------------------------------------------
def _op_dict(i: int, op: Op, graph: Graph, cost: OpCost, mem: OpMemory, sched: Schedule) -> dict:
    d: dict = {"i": i, "name": op.name, "kind": op.kind, "unit": op.unit, "inputs": list(op.inputs),
               "output": op.output, "shape": list(graph.tensors[op.output])}
    if op.weights:
        d["weights"] = dict(op.weights)
    if op.attrs:
        d["attrs"] = _plain(op.attrs)
    if cost.gemms:
        d["gemm"] = [list(g) for g in cost.gemms]
    d["flops"] = cost.flops
    d["weight_bytes"] = cost.weight_bytes
    d["out_bytes"] = cost.out_bytes
    d["memory"] = {"baseline": mem.baseline, "weights": mem.weights, "prefetch": mem.prefetch,
                   "activations": mem.activations, "output": mem.output, "scratch": mem.scratch,
                   "spilled": mem.spilled, "total": mem.total}
    if sched.op_params.get(i):
        d["params"] = dict(sched.op_params[i])
    if sched.spill_after.get(i):
        d["spill_after"] = list(sched.spill_after[i])
    if sched.reload_before.get(i):
        d["reload_before"] = list(sched.reload_before[i])
    if sched.stream_inputs.get(i):
        d["stream_inputs"] = list(sched.stream_inputs[i])
    if i in sched.disk_out:
        d["output_on_disk"] = True
    return d


def _unit_dict(f: Fit, k: int) -> dict:
    u = f.schedule.units[k]
    d: dict = {"name": f.unit_names[k], "ops": [u[0], u[-1]], "prefetch": f.schedule.prefetch_mode(k)}
    if k < len(f.unit_choice):  # what the fit chose for this unit and what the cost model predicts
        d["choice"] = f.unit_choice[k]
        d["seconds"] = round(f.unit_seconds[k], 5)
    return d


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return float(v) if hasattr(v, "__float__") else str(v)


def plan_to_dict(plan: Plan) -> dict:
    comps = {}
    for name, cp in plan.components.items():
        g, f = cp.graph, cp.fit
        comps[name] = {
            "model": g.model,
            "mode": cp.mode,
            "config": _plain(g.config),
            "inputs": {k: {"shape": list(v), "dtype": g.input_dtypes.get(k, "f32")} for k, v in g.inputs.items()},
            "outputs": list(g.outputs),
            "summary": {"ops": len(g.ops), "units": len(f.schedule.units), "flops": cp.flops,
                        "weight_bytes": cp.weight_bytes, "peak_bytes": f.peak, "min_budget_bytes": f.min_budget,
                        "spills": sum(len(v) for v in f.schedule.spill_after.values()),
                        "predicted_seconds": round(f.seconds, 4)},
            "units": [_unit_dict(f, k) for k in range(len(f.schedule.units))],
            "ops": [_op_dict(i, op, g, c, m, f.schedule)
                    for i, (op, c, m) in enumerate(zip(g.ops, cp.costs, f.memory))],
        }
    return {
        "kind": PLAN_KIND,
        "version": PLAN_VERSION,
        "streamexec": __version__,
        "created": plan.created,
        "checkpoint": {"root": plan.checkpoint_root, "variant": plan.variant, "files": plan.files,
                       **({"roles": plan.roles} if plan.roles else {})},
        "run": {"height": plan.shape.height, "width": plan.shape.width, "batch": plan.shape.batch,
                "text_len": plan.shape.text_len, "cfg": plan.shape.cfg, "steps": plan.steps, **plan.settings},
        "memory": {"budget_bytes": plan.peak if plan.budget in ("min", "smallest") else plan.budget,
                   "baseline_bytes": plan.baseline, "peak_bytes": plan.peak,
                   "min_budget_bytes": plan.min_budget, "workers": plan.workers},
        "components": comps,
    }


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write ``plan.yaml`` atomically (a temp file renamed into place)."""
    path = Path(path)
    text = "# streamexec plan: `streamexec inspect` shows it, `streamexec run` executes it.\n" + yaml.dump(
        plan_to_dict(plan), Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=120)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    plan.path = path


_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_plan_dict(path: str | Path) -> dict:
    """``yaml.safe_load`` of a plan file, with its kind and version checked."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PlanError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PlanError(f"{path}: not a text file") from None
    try:
        d = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader: no custom tags, no objects
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PlanError(f"{path}: not a valid plan (YAML: {first})") from None
    if not isinstance(d, dict) or d.get("kind") != PLAN_KIND:
        raise PlanError(f"{path}: not a streamexec plan (expected 'kind: {PLAN_KIND}')")
    if d.get("version") != PLAN_VERSION:
        raise PlanError(f"{path}: plan version {d.get('version')!r} is not supported (this streamexec reads "
                        f"version {PLAN_VERSION}); make a new plan with 'streamexec plan'")
    for section in ("checkpoint", "run", "memory", "components"):
        if d.get(section) is not None and not isinstance(d[section], dict):
            raise PlanError(f"{path}: '{section}' must be a mapping")
    for section in ("run", "memory"):
        for k, v in (d.get(section) or {}).items():
            if section == "run" and k == "lora":  # LoRA files to apply: a list of FILE:WEIGHT
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise PlanError(f"{path}: run.lora must be a list of FILE:WEIGHT strings, not {v!r}")
            elif v is not None and not isinstance(v, (int, float, str, bool)):
                raise PlanError(f"{path}: {section}.{k} must be a number or a string")
    return d


def _need(d: dict, key: str, typ, where: str):
    v = d.get(key)
    if not isinstance(v, typ):
        raise PlanError(f"plan: {where}.{key} is missing or not a {getattr(typ, '__name__', typ)}")
    return v


_MALFORMED = (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError)


def graph_from_dict(name: str, c: dict) -> tuple[Graph, Schedule, list[dict]]:
    """Rebuild a component's graph and schedule from its plan entry (structure checked; the
    weights are checked against the checkpoint by ``check_weights``). Anything malformed is a
    one-line ``PlanError``."""
    if not isinstance(c, dict):
        raise PlanError(f"plan: components.{name} is not a mapping")
    try:
        return _graph_from_dict(name, c)
    except _MALFORMED as e:
        raise PlanError(f"plan: components.{name} is malformed ({type(e).__name__}: {e}); "
                        "make a new plan with 'streamexec plan'") from None


def _graph_from_dict(name: str, c: dict) -> tuple[Graph, Schedule, list[dict]]:
    where = f"components.{name}"
    graph = Graph(str(c.get("model", name)), dict(c.get("config") or {}))
    for k, v in _need(c, "inputs", dict, where).items():
        graph.inputs[k] = tuple(int(s) for s in v["shape"])
        graph.input_dtypes[k] = str(v.get("dtype", "f32"))
        graph.tensors[k] = graph.inputs[k]
    ops = _need(c, "ops", list, where)
    params: dict[int, dict] = {}
    spill_after: dict[int, list[str]] = {}
    reload_before: dict[int, list[str]] = {}
    planned: dict[int, int] = {}
    stream: dict[int, list[str]] = {}
    disk_out: set[int] = set()
    for i, o in enumerate(ops):
        w = f"{where}.ops[{i}]"
        if not isinstance(o, dict):
            raise PlanError(f"plan: {w} is not a mapping")
        inputs = [str(t) for t in _need(o, "inputs", list, w)]
        for t in inputs:
            if t not in graph.tensors:
                raise PlanError(f"plan: {w} ({o.get('name')}) reads {t!r}, which no earlier op produces")
        out = str(_need(o, "output", str, w))
        graph.tensors[out] = tuple(int(s) for s in _need(o, "shape", list, w))
        weights = o.get("weights") or {}
        if not isinstance(weights, dict) or not all(isinstance(v, str) for v in weights.values()):
            raise PlanError(f"plan: {w}.weights must map roles to tensor names")
        graph.ops.append(Op(str(o.get("name", out)), str(_need(o, "kind", str, w)), inputs, out, dict(weights),
                            dict(o.get("attrs") or {}), str(o.get("unit", ""))))
        if o.get("params"):
            params[i] = {str(k): int(v) for k, v in dict(o["params"]).items()}
            if any(v < 1 for v in params[i].values()):
                raise PlanError(f"plan: {w}.params must be positive integers")
        if o.get("spill_after"):
            spill_after[i] = [str(t) for t in o["spill_after"]]
        if o.get("reload_before"):
            reload_before[i] = [str(t) for t in o["reload_before"]]
        if o.get("stream_inputs"):
            stream[i] = [str(t) for t in o["stream_inputs"]]
        if o.get("output_on_disk"):
            disk_out.add(i)
        planned[i] = int((o.get("memory") or {}).get("total", 0))
    graph.outputs = [str(t) for t in _need(c, "outputs", list, where)]
    for t in graph.outputs:
        if t not in graph.tensors:
            raise PlanError(f"plan: {where}.outputs names {t!r}, which no op produces")
    units, modes = [], []
    expect = 0
    for u in _need(c, "units", list, where):
        first, last = (int(x) for x in u["ops"])
        if first != expect or last < first or last >= len(ops):
            raise PlanError(f"plan: {where}.units must cover the ops in order (unit {u.get('name')!r})")
        mode = str(u.get("prefetch", "populate"))
        if mode not in PREFETCH_MODES:
            raise PlanError(f"plan: {where}.units: unknown prefetch mode {mode!r}")
        units.append(list(range(first, last + 1)))
        modes.append(mode)
        expect = last + 1
    if expect != len(ops):
        raise PlanError(f"plan: {where}.units leave ops {expect}..{len(ops) - 1} out")
    return graph, Schedule(units, params, modes, spill_after, reload_before, planned, stream, disk_out), ops


def check_checkpoint(d: dict, ckpt: Checkpoint) -> None:
    """Refuse a plan made for other files than ``ckpt`` holds now."""
    try:
        _check_checkpoint(d, ckpt)
    except _MALFORMED as e:
        raise PlanError(f"plan: the checkpoint section is malformed ({type(e).__name__}: {e})") from None


def _check_checkpoint(d: dict, ckpt: Checkpoint) -> None:
    want = {f["path"]: f for f in (d.get("checkpoint") or {}).get("files") or []}
    have = {f["path"]: f for f in ckpt.fingerprint()}
    if set(want) != set(have):
        missing = sorted(set(want) - set(have))
        raise PlanError(f"the plan was made for other files ({missing[0] if missing else 'a different set'}); "
                        "make a new plan with 'streamexec plan'")
    for p, f in want.items():
        h = have[p]
        if int(f.get("size", -1)) != h["size"] or f.get("header_sha256") != h["header_sha256"]:
            raise PlanError(f"{p} changed since the plan was made (size or header differs); "
                            "make a new plan with 'streamexec plan'")


def check_weights(graph: Graph, ckpt: Checkpoint, component: str) -> None:
    """Every weight a plan names must exist in the component (a hand-edited plan may not)."""
    comp = ckpt.component(component)
    for op in graph.ops:
        for role, key in op.weights.items():
            if key not in comp.tensors:
                raise PlanError(f"plan op {op.name!r} names weight {key!r} ({role}), which {component} does not have")
