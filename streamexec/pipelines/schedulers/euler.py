"""Euler-type (k-diffusion) samplers: diffusers' ``EulerDiscreteScheduler`` and
``EulerAncestralDiscreteScheduler``. Latents live at sigma scale (x = x0 + sigma * eps); the denoiser
sees them divided by sqrt(sigma^2 + 1)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from streamexec.errors import StreamexecError

from .base import DiscreteBase
from .config import BETA_DEFAULTS
from .tables import F32, SPACINGS, as_f32, sigma_to_t, spaced_f32, t_to_sigma
from .tables import karras as karras_sigmas


class SigmaBase(DiscreteBase):
    """Euler-type schedulers: k-diffusion sigmas, inputs scaled by 1/sqrt(sigma^2 + 1)."""

    spacings = SPACINGS

    def _spaced(self) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps float32, sigmas float64) of the configured spacing, before the final sigma."""
        p = self.params
        timesteps = spaced_f32(p["timestep_spacing"], self.num_inference_steps, self.train_steps, p["steps_offset"])
        table = self._train_sigmas()
        if p["timestep_spacing"] == "sgm_uniform":
            return timesteps, t_to_sigma(timesteps, table)
        return timesteps, np.interp(timesteps, np.arange(0, len(table)), table)

    def _set_init_noise_sigma(self) -> None:
        top = F32(np.max(self.sigmas))
        if self.params["timestep_spacing"] in ("linspace", "trailing", "sgm_uniform"):
            self.init_noise_sigma = float(top)
        else:
            self.init_noise_sigma = float(np.sqrt(top * top + F32(1)))

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        sigma = self.sigmas[i]
        return as_f32(x) / np.sqrt(sigma * sigma + F32(1))

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return as_f32(x0) + as_f32(noise) * self.sigmas[i]

    def _x0(self, model_output: np.ndarray, x: np.ndarray, sigma: np.float32) -> np.ndarray:
        if self.prediction_type == "epsilon":
            return x - sigma * model_output
        if self.prediction_type == "v_prediction":
            s2 = sigma * sigma + F32(1)
            return model_output * (-sigma / np.sqrt(s2)) + (x / s2)
        return model_output  # "sample" / "original_sample"


class Euler(SigmaBase):
    """diffusers' ``EulerDiscreteScheduler`` (s_churn = 0), with optional Karras sigmas."""

    name = "euler"
    cls = "EulerDiscreteScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }
    fixed = {
        "interpolation_type": "linear",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "rescale_betas_zero_snr": False,
    }
    predictions = ("epsilon", "v_prediction", "sample", "original_sample")

    def __init__(self, config: Mapping[str, Any], steps: int, *, karras: bool | None = None,
                 overrides: Mapping[str, Any] | None = None) -> None:
        extra = dict(overrides or {})
        if karras is not None:
            extra["use_karras_sigmas"] = bool(karras)
        super().__init__(config, steps, extra)
        p = self.params
        if p["timestep_type"] == "continuous" and p["prediction_type"] == "v_prediction":
            raise StreamexecError("timestep_type 'continuous' with v_prediction is not supported by the euler sampler")
        self.karras = bool(p["use_karras_sigmas"])
        if self.karras and p["timestep_spacing"] == "sgm_uniform":
            raise StreamexecError("karras and sgm_uniform are two sigma schedules: pick one")
        timesteps, sigmas = self._spaced()
        table = self._train_sigmas()
        if self.karras:
            sigmas = karras_sigmas(sigmas, steps, p["sigma_min"], p["sigma_max"])
            timesteps = np.array([sigma_to_t(s, np.log(table)) for s in sigmas])
        self.sigmas = np.concatenate([sigmas, [self._final_sigma(table)]]).astype(F32)
        self.timesteps = timesteps.astype(np.float32)
        self._set_init_noise_sigma()

    def _step(self, model_output: np.ndarray, i: int, x: np.ndarray, draw: Callable[[], np.ndarray]) -> np.ndarray:
        sigma = self.sigmas[i]
        x0 = self._x0(model_output, x, sigma)
        derivative = (x - x0) / sigma
        dt = self.sigmas[i + 1] - sigma
        return x + derivative * dt


class EulerAncestral(SigmaBase):
    """diffusers' ``EulerAncestralDiscreteScheduler``: Euler to sigma_down, then fresh noise * sigma_up."""

    name = "euler_a"
    cls = "EulerAncestralDiscreteScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    fixed = {"rescale_betas_zero_snr": False}
    predictions = ("epsilon", "v_prediction")
    needs_noise = True

    def __init__(self, config: Mapping[str, Any], steps: int, *, overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__(config, steps, overrides)
        timesteps, sigmas = self._spaced()
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.timesteps = timesteps
        self._set_init_noise_sigma()

    def _step(self, model_output: np.ndarray, i: int, x: np.ndarray, draw: Callable[[], np.ndarray]) -> np.ndarray:
        sigma = self.sigmas[i]
        x0 = self._x0(model_output, x, sigma)
        sigma_to = self.sigmas[i + 1]
        sigma_up = np.sqrt(sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma))
        # diffusers takes the square root unclamped: when sigma jumps from a huge value (the cosine schedule's
        # ~2e4) float32 rounding makes the difference -1 ulp and every latent NaN. Clamping changes nothing else.
        sigma_down = np.sqrt(np.maximum(sigma_to * sigma_to - sigma_up * sigma_up, F32(0)))
        derivative = (x - x0) / sigma
        dt = sigma_down - sigma
        prev = x + derivative * dt
        return prev + draw() * sigma_up
