"""Flow matching (FLUX.1): diffusers' ``FlowMatchEulerDiscreteScheduler`` as ``FluxPipeline`` drives it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from streamexec.errors import StreamexecError

from .base import Scheduler
from .config import resolve
from .tables import F32, as_f32


def flux_image_seq_len(height: int, width: int) -> int:
    """Packed FLUX latent tokens for an image: (H/16)·(W/16), as ``FluxPipeline`` rounds H and W."""
    return (int(height) // 16) * (int(width) // 16)


def flux_mu(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """``FluxPipeline``'s ``calculate_shift``: mu grows linearly with the image's token count."""
    base_seq_len = config.get("base_image_seq_len", 256)
    max_seq_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


class FlowMatchEuler(Scheduler):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` as ``FluxPipeline`` drives it.

    Sigmas are ``np.linspace(1, 1/steps, steps)`` shifted by the config's static ``shift`` or, with
    ``use_dynamic_shifting`` (FLUX.1-dev), by ``mu`` from the image's token count; timesteps are
    sigma * 1000 (FluxPipeline hands the transformer timestep / 1000).
    """

    name = "flow_euler"
    cls = "FlowMatchEulerDiscreteScheduler"
    defaults = {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    }
    fixed = {
        "invert_sigmas": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "stochastic_sampling": False,
    }
    spacings = ()

    def __init__(
        self,
        config: Mapping[str, Any],
        steps: int,
        *,
        image_seq_len: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        self.params = p = resolve(self, config, {})
        super().__init__(p, steps)
        if p["time_shift_type"] not in ("exponential", "linear"):
            raise StreamexecError(f"time_shift_type {p['time_shift_type']!r}: use exponential or linear")
        train = int(p["num_train_timesteps"])
        if mu is None and image_seq_len is not None:
            mu = flux_mu(image_seq_len, config)
        if p["use_dynamic_shifting"] and mu is None:
            raise StreamexecError("this FLUX scheduler shifts by resolution: give the image size (image_seq_len or mu)")
        self.mu = mu
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / steps, steps)
        s = np.array(sigmas).astype(np.float32)
        if len(s) != steps:
            raise StreamexecError(f"{len(s)} sigmas for {steps} steps")
        if p["use_dynamic_shifting"]:
            if p["time_shift_type"] == "exponential":
                s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
            else:
                s = mu / (mu + (1 / s - 1) ** 1.0)
        else:
            shift = p["shift"]
            s = shift * s / (1 + (shift - 1) * s)
        if p["shift_terminal"]:
            one_minus_z = 1 - s
            scale_factor = one_minus_z[-1] / (1 - p["shift_terminal"])
            s = 1 - (one_minus_z / scale_factor)
        s = np.asarray(s).astype(F32)
        self.timesteps = s * F32(train)
        self.sigmas = np.concatenate([s, np.zeros(1, dtype=F32)])

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        sigma = self.sigmas[i]
        return sigma * as_f32(noise) + (F32(1) - sigma) * as_f32(x0)

    def _step(self, model_output: np.ndarray, i: int, x: np.ndarray, draw: Callable[[], np.ndarray]) -> np.ndarray:
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return x + dt * model_output
