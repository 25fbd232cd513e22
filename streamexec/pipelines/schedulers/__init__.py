"""Noise schedulers for the denoise loop: numpy ports of diffusers' schedulers, same sigma/timestep math.

Each scheduler is built from a diffusers ``scheduler_config.json`` dict the way diffusers'
``SchedulerClass.from_config(config)`` builds it (see ``config.py``). The arithmetic follows diffusers'
dtypes (float32 tables and steps, float64 where diffusers uses numpy float64) so the results agree to
float32 rounding. One module per sampler family: ``euler`` (euler, euler_a), ``ddim``, ``pndm``, ``dpm``
(dpmpp_2m), ``lcm`` (lcm, tcd), ``flow`` (FLUX); the shared tables and spacings in ``tables``.

The loop, as diffusers' StableDiffusionPipeline runs it::

    s = make_scheduler("euler", config, steps=20)
    x = noise * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        eps = unet(s.scale_model_input(x, i), t, ...)
        x = s.step(eps, i, x, noise=step_noise(seed, i) if s.needs_noise else None)

For img2img: ``i0 = s.img2img_start(strength)``, ``x = s.add_noise(latents, noise, i0)`` and run the
loop over ``range(i0, len(s.timesteps))`` (diffusers' ``get_timesteps``; no ``init_noise_sigma``).
Multistep samplers (``stateful``) carry history between calls: ``state_dict()`` after call ``i`` and
``load_state_dict()`` on a fresh sampler continue the loop at ``i + 1`` exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streamexec.errors import StreamexecError

from .base import Scheduler
from .config import (
    FLUX_DEV_SCHEDULER_CONFIG,
    FLUX_SCHNELL_SCHEDULER_CONFIG,
    SD15_SCHEDULER_CONFIG,
    read_scheduler_config,
)
from .ddim import DDIM
from .dpm import DPMSolverMultistep
from .euler import Euler, EulerAncestral
from .flow import FlowMatchEuler, flux_image_seq_len, flux_mu
from .lcm import LCM, TCD
from .pndm import PNDM
from .tables import SPACINGS

__all__ = [
    "DDIM",
    "LCM",
    "PNDM",
    "SAMPLERS",
    "SPACINGS",
    "TCD",
    "DPMSolverMultistep",
    "Euler",
    "EulerAncestral",
    "FlowMatchEuler",
    "FLUX_DEV_SCHEDULER_CONFIG",
    "FLUX_SCHNELL_SCHEDULER_CONFIG",
    "SD15_SCHEDULER_CONFIG",
    "Scheduler",
    "flux_image_seq_len",
    "flux_mu",
    "make_scheduler",
    "read_scheduler_config",
]

_CLASSES: dict[str, type[Scheduler]] = {
    c.name: c for c in (Euler, EulerAncestral, DDIM, DPMSolverMultistep, PNDM, LCM, TCD, FlowMatchEuler)
}
_NAME_OF = {c.cls: name for name, c in _CLASSES.items()}

#: ``--sampler`` names for SD-type (DDPM-trained) models.
SAMPLERS = ("euler", "euler_a", "ddim", "dpmpp_2m", "pndm", "lcm", "tcd")
#: samplers whose step takes ``eta`` (the share of fresh noise), and its default for each
_ETA_DEFAULT = {"ddim": 0.0, "tcd": 0.3}


def make_scheduler(
    name: str | None,
    config: Mapping[str, Any],
    steps: int,
    *,
    karras: bool | None = None,
    eta: float | None = None,
    spacing: str | None = None,
    image_seq_len: int | None = None,
    mu: float | None = None,
) -> Scheduler:
    """Build sampler ``name`` (one of :data:`SAMPLERS`; ``None`` = the class the config names).

    ``config`` is the model's ``scheduler_config.json`` dict. ``karras`` forces Karras sigmas on/off
    (``None``: as the config says); only euler and dpmpp_2m have them, as in diffusers. ``eta`` is DDIM's
    (default 0) and TCD's (default 0.3). ``spacing`` overrides the config's ``timestep_spacing`` (one of
    :data:`SPACINGS`; ``sgm_uniform`` for the sigma samplers euler, euler_a, dpmpp_2m; lcm and tcd take
    their distillation schedule instead). ``image_seq_len``/``mu`` size the shift of a flow-matching
    (FLUX) config.
    """
    config_cls = config.get("_class_name")
    requested = name
    if name is None:
        if config_cls not in _NAME_OF:
            raise StreamexecError(
                f"the model's scheduler {config_cls!r} is not one streamexec runs: pick --sampler "
                f"({', '.join(SAMPLERS)})"
            )
        name = _NAME_OF[config_cls]
    if config_cls == "FlowMatchEulerDiscreteScheduler":
        if name not in ("euler", "flow_euler"):
            raise StreamexecError(f"sampler {name!r} does not apply to a flow-matching (FLUX) model: use euler")
        if karras:
            raise StreamexecError("karras sigmas do not apply to the flow-matching (FLUX) sampler")
        if spacing is not None or eta is not None:
            what = "timestep spacing" if spacing is not None else "eta"
            raise StreamexecError(f"{what} does not apply to the flow-matching (FLUX) sampler")
        return FlowMatchEuler(config, steps, image_seq_len=image_seq_len, mu=mu)
    if name == "flow_euler":
        raise StreamexecError("the flow-matching sampler needs a flow-matching (FLUX) scheduler config")
    if name not in SAMPLERS:
        raise StreamexecError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    if karras and name not in ("euler", "dpmpp_2m"):
        raise StreamexecError(f"karras sigmas are only available for euler and dpmpp_2m (not {name}), as in diffusers")
    if eta is not None and name not in _ETA_DEFAULT:
        raise StreamexecError(f"eta applies to the ddim and tcd samplers, not {name}")
    if eta is not None and not 0.0 <= float(eta) <= 1.0:
        raise StreamexecError(f"eta {eta}: use a number in 0..1")
    overrides: dict[str, Any] = {}
    if spacing is not None:
        if name in ("lcm", "tcd"):
            raise StreamexecError(f"the {name} sampler takes its timesteps from its distillation schedule "
                                  "(original_inference_steps), not a timestep spacing")
        if spacing not in SPACINGS:
            raise StreamexecError(f"timestep spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
        overrides["timestep_spacing"] = spacing
    if name == "euler":
        return Euler(config, steps, karras=karras, overrides=overrides)
    if name == "euler_a":
        return EulerAncestral(config, steps, overrides=overrides)
    if name == "ddim":
        return DDIM(config, steps, eta=_ETA_DEFAULT["ddim"] if eta is None else float(eta), overrides=overrides)
    if name == "pndm":
        return PNDM(config, steps, overrides=overrides)
    if name == "lcm":
        return LCM(config, steps)
    if name == "tcd":
        return TCD(config, steps, eta=_ETA_DEFAULT["tcd"] if eta is None else float(eta))
    # An explicit --sampler dpmpp_2m means DPM++ 2M whatever the DPM-Solver config says; from the
    # model's own DPM-Solver config (name None) its order and solver type are kept.
    if config_cls != "DPMSolverMultistepScheduler" or requested is not None:
        overrides.update(solver_order=2, solver_type="midpoint", algorithm_type="dpmsolver++")
    return DPMSolverMultistep(config, steps, karras=karras, overrides=overrides)
