"""DDIM: diffusers' ``DDIMScheduler`` (deterministic at eta = 0)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .base import DiscreteBase
from .config import BETA_DEFAULTS
from .tables import F32, spaced_int


class DDIM(DiscreteBase):
    """diffusers' ``DDIMScheduler`` (eta = 0 by default: deterministic)."""

    name = "ddim"
    cls = "DDIMScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    fixed = {"thresholding": False, "rescale_betas_zero_snr": False}
    predictions = ("epsilon", "v_prediction", "sample")

    def __init__(self, config: Mapping[str, Any], steps: int, *, eta: float = 0.0,
                 overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__(config, steps, overrides)
        p = self.params
        self.eta = float(eta)
        self.needs_noise = self.eta > 0
        self.final_alpha_cumprod = F32(1.0) if p["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.timesteps = spaced_int(p["timestep_spacing"], steps, self.train_steps, p["steps_offset"])

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return self._ddpm_add_noise(x0, noise, i)

    def _step(self, model_output: np.ndarray, i: int, x: np.ndarray, draw: Callable[[], np.ndarray]) -> np.ndarray:
        p = self.params
        t = int(self.timesteps[i])
        t_prev = t - self.train_steps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self._alpha_prev(t_prev)
        b_t = F32(1) - a_t
        if self.prediction_type == "epsilon":
            x0 = (x - np.sqrt(b_t) * model_output) / np.sqrt(a_t)
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (x - np.sqrt(a_t) * x0) / np.sqrt(b_t)
        else:  # v_prediction
            x0 = np.sqrt(a_t) * x - np.sqrt(b_t) * model_output
            eps = np.sqrt(a_t) * model_output + np.sqrt(b_t) * x
        if p["clip_sample"]:
            r = F32(p["clip_sample_range"])
            x0 = np.clip(x0, -r, r)
        b_prev = F32(1) - a_prev
        variance = (b_prev / b_t) * (F32(1) - a_t / a_prev)
        std = F32(self.eta) * np.sqrt(variance)
        direction = np.sqrt(F32(1) - a_prev - std * std) * eps
        prev = np.sqrt(a_prev) * x0 + direction
        if self.eta > 0:
            prev = prev + std * draw()
        return prev
