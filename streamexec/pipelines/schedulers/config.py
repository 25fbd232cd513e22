"""Scheduler configs: the published ones (for single files that carry none), reading a model's
``scheduler_config.json``, and resolving a config into one sampler's settings the way diffusers'
``SchedulerClass.from_config(config, **overrides)`` does.

Keys the target class knows are taken, the rest keep that class's defaults (so SD 1.5's PNDM config,
which names no ``timestep_spacing``, gives Euler and DPM-Solver their default "linspace" spacing and
DDIM/PNDM their default "leading"). Each sampler class lists its diffusers ``__init__`` defaults
(``defaults``), the options streamexec accepts at one value only (``fixed``), its prediction types and
its timestep spacings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streamexec.errors import StreamexecError

# The published scheduler configs, for single-file checkpoints that carry none (runwayml SD 1.5 and
# black-forest-labs FLUX.1 repositories, scheduler/scheduler_config.json).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
FLUX_SCHNELL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    **FLUX_SCHNELL_SCHEDULER_CONFIG,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

#: diffusers' beta-table defaults (DDPM-trained schedulers; diffusers 0.30-0.42).
BETA_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}


def read_scheduler_config(path: str | Path) -> dict[str, Any]:
    """Read a diffusers ``scheduler_config.json`` (a file, a ``scheduler/`` folder or a pipeline folder)."""
    p = Path(path)
    for candidate in (p, p / "scheduler_config.json", p / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise StreamexecError(f"{candidate}: not a readable scheduler config ({err})") from None
            if not isinstance(data, dict):
                raise StreamexecError(f"{candidate}: a scheduler config must be a JSON object")
            return data
    raise StreamexecError(f"no scheduler_config.json in {p}")


def resolve(sampler: Any, config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The init kwargs diffusers' ``sampler.cls.from_config(config, **overrides)`` would use, checked
    against what the streamexec ``sampler`` class supports."""
    defaults = sampler.defaults
    used_defaults = set(config.get("_use_default_values") or ())
    params = dict(defaults)
    for key, value in config.items():
        if key in defaults and key not in used_defaults:
            params[key] = value
    params.update(overrides)
    name = sampler.name
    for key, allowed in sampler.fixed.items():
        if params[key] != allowed:
            raise StreamexecError(f"scheduler option {key}={params[key]!r} is not supported by the {name} sampler")
    if sampler.predictions and params["prediction_type"] not in sampler.predictions:
        raise StreamexecError(f"prediction_type {params['prediction_type']!r} is not supported by the {name} sampler")
    spacing = params.get("timestep_spacing")
    if spacing is not None and spacing not in sampler.spacings:
        raise StreamexecError(f"timestep_spacing {spacing!r}: the {name} sampler takes {', '.join(sampler.spacings)}")
    return params
