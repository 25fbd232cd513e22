"""A plan made from configs alone — a preset shipped in ``streamexec/configs`` (``sd15``,
``flux-schnell``, …) or any diffusers folder with ``config.json`` files and no weights — for
``streamexec inspect``: the weights the configs imply (``models/shapes``) stand in for a
checkpoint's headers, stored in an assumed dtype. No file other than the configs is read."""

from __future__ import annotations

import math
from pathlib import Path

from ..configs import REFERENCE_DIR
from ..errors import StreamexecError
from ..models.registry import RunShape, default_size, is_flux
from ..models.shapes import config_shapes
from ..weights.checkpoint import CLASS_TO_COMPONENT, read_json
from ..weights.dtypes import DTYPES
from ..weights.layouts import COMPONENTS
from .memory import WeightMeta
from .plan import Plan, plan_graph

#: The process floor a plan without weights assumes (DESIGN: ~200 MB before any model data); a
#: real plan measures it.
ASSUMED_BASELINE = 200 << 20
#: --dtype names → safetensors dtype tags.
DTYPE_NAMES = {"f32": "F32", "fp32": "F32", "f16": "F16", "fp16": "F16", "bf16": "BF16",
               "fp8": "F8_E4M3", "fp8_e4m3": "F8_E4M3", "fp8_e5m2": "F8_E5M2"}
_TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def presets() -> list[str]:
    """The shipped presets: every folder of ``streamexec/configs`` with a component config."""
    return sorted(p.name for p in REFERENCE_DIR.iterdir()
                  if p.is_dir() and not p.name.startswith(("_", ".")) and _component_dirs(p))


def _component_dirs(folder: Path) -> dict[str, Path]:
    """Component name → folder of every ``*/config.json`` whose class streamexec runs."""
    out = {}
    for cfg in sorted(folder.glob("*/config.json")):
        name = cfg.parent.name
        if name in COMPONENTS:
            out[name] = cfg.parent
    return out


def _classes(configs: dict[str, dict]) -> set[str]:
    return {str(c.get("_class_name") or (c.get("architectures") or [""])[0]) for c in configs.values()}


def load_configs(source: str) -> tuple[str, dict[str, dict]]:
    """(label, component configs) of a preset name or a folder of configs. A preset folder that
    ships only some components (``flux-dev``: its transformer) takes the others from the preset
    whose model_index lists the same model classes (``flux-schnell``)."""
    path = Path(source)
    if source in presets():
        folder = REFERENCE_DIR / source
    elif path.is_dir():
        folder = path
    elif path.exists():
        raise StreamexecError(f"{source}: not a preset, a folder of configs or a plan file")
    else:
        raise StreamexecError(f"{source}: no such plan file, folder or preset (presets: {', '.join(presets())})")
    if (folder / "config.json").is_file():  # one component folder
        cfg = read_json(folder / "config.json")
        cls = str(cfg.get("_class_name") or (cfg.get("architectures") or [""])[0])
        name = CLASS_TO_COMPONENT.get(cls)
        if name is None:
            raise StreamexecError(f"{folder / 'config.json'}: model class {cls or '(none)'!r} is not one streamexec "
                                  f"runs ({', '.join(sorted(CLASS_TO_COMPONENT))})")
        return str(folder), {name: cfg}
    configs = {n: read_json(d / "config.json") for n, d in _component_dirs(folder).items()}
    if not configs:
        raise StreamexecError(f"{folder}: no component config.json (unet/, transformer/, vae/, …) in this folder")
    if folder.parent == REFERENCE_DIR and not (folder / "model_index.json").is_file():
        for other in presets():
            base = REFERENCE_DIR / other
            if other != folder.name and (base / "model_index.json").is_file():
                theirs = {n: read_json(d / "config.json") for n, d in _component_dirs(base).items()}
                if _classes(configs) <= _classes(theirs):
                    configs = {**theirs, **configs}
                    break
    return (source if folder.parent == REFERENCE_DIR else str(folder)), configs


def published_dtype(name: str, configs: dict[str, dict]) -> str:
    """The dtype a component's weights are published in: its config's ``torch_dtype``, else the
    one another component of the pipeline states (diffusers configs do not say; transformers'
    do), else F32."""
    for cfg in [configs.get(name, {})] + [configs[n] for n in configs if n != name]:
        tag = _TORCH_DTYPES.get(str(cfg.get("torch_dtype")))
        if tag:
            return tag
    return "F32"


def plan_from_configs(source: str, *, steps: int | None = None, dtype: str | None = None,
                      components: list[str] | None = None, vae_mode: str = "decode", height: int | None = None,
                      width: int | None = None, batch: int = 1, cfg: bool | None = None, scale: int = 1) -> Plan:
    """The plan ``inspect`` shows for a preset or a config folder: every component built from
    weights its config implies, stored in ``dtype`` (a ``DTYPE_NAMES`` key; default: each
    component's published dtype), fitted without a budget, for images of ``height`` × ``width``
    (default: the model's) times ``scale``. ``cfg``: classifier-free guidance (default: SD yes,
    FLUX no)."""
    label, configs = load_configs(source)
    tag = None
    if dtype is not None:
        tag = DTYPE_NAMES.get(dtype.lower())
        if tag is None:
            raise StreamexecError(f"unknown --dtype {dtype!r} (known: {', '.join(DTYPE_NAMES)})")
    flux = is_flux(configs)
    if flux and cfg:
        raise StreamexecError("FLUX.1 has no classifier-free guidance: --cfg-scale is SD's")
    side = default_size(configs)
    shape = RunShape((height or side) * scale, (width or side) * scale, max(1, batch),
                     cfg=not flux if cfg is None else cfg)
    names = components or [n for n in COMPONENTS if n in configs]
    missing = [n for n in names if n not in configs]
    if missing:
        raise StreamexecError(f"{label}: has no component {missing[0]!r} (it has: {', '.join(configs)})")
    plan = Plan(label, None, [], None, ASSUMED_BASELINE, 1, shape, steps)
    for name in names:
        stored = tag or published_dtype(name, configs)
        shapes = config_shapes(name, configs[name], where=f"{label}: {name}")
        item = DTYPES[stored].itemsize
        table = {k: WeightMeta(s, stored, math.prod(s) * item) for k, s in shapes.items()}

        def info(key: str, shapes=shapes, stored=stored):
            s = shapes.get(key)
            return None if s is None else (s, stored)

        cp = plan_graph(plan, name, configs, info, table, f"{label}: {name}", vae_mode)
        cp.graph.config = {**cp.graph.config, "_assumed_dtype": stored}
    return plan
