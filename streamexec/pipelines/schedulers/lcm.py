"""Few-step samplers for consistency-distilled models: diffusers' ``LCMScheduler`` (LCM, LCM-LoRA) and
``TCDScheduler`` (Trajectory Consistency Distillation, Hyper-SD/TCD-LoRA).

Both pick their timesteps from the distillation schedule, not from ``timestep_spacing``: ``k = T //
original_inference_steps`` (1000 // 50 = 20), the schedule ``k - 1, 2k - 1, ..., T - 1`` reversed, and
``steps`` entries of it at indices ``floor(linspace(0, 50, steps, endpoint=False))`` (4 steps: 999, 759,
499, 259). Between steps they re-noise with fresh noise (LCM fully, TCD by ``eta``), which the
pipeline draws with ``step_noise(seed, i)`` so a run is reproducible and resumable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from streamexec.errors import StreamexecError

from .base import DiscreteBase
from .config import BETA_DEFAULTS
from .tables import F32

_CONSISTENCY_DEFAULTS: dict[str, Any] = {
    **BETA_DEFAULTS,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}


class _Consistency(DiscreteBase):
    """The timestep schedule LCM and TCD share (``set_timesteps`` with ``strength`` 1)."""

    defaults = _CONSISTENCY_DEFAULTS
    fixed = {"thresholding": False, "rescale_betas_zero_snr": False}
    predictions = ("epsilon", "sample", "v_prediction")

    def __init__(self, config: Mapping[str, Any], steps: int) -> None:
        super().__init__(config, steps)
        p = self.params
        original = p["original_inference_steps"]
        if isinstance(original, bool) or not isinstance(original, int) or not 0 < original <= self.train_steps:
            raise StreamexecError(f"original_inference_steps {original!r}: a whole number in 1..{self.train_steps}")
        if steps > original:
            raise StreamexecError(f"the {self.name} sampler takes at most {original} steps (its distillation "
                                  f"schedule, original_inference_steps), not {steps}")
        k = self.train_steps // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1].copy()
        pick = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[pick].astype(np.int64)
        self.final_alpha_cumprod = F32(1.0) if p["set_alpha_to_one"] else self.alphas_cumprod[0]

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return self._ddpm_add_noise(x0, noise, i)

    def _x0_eps(self, model_output: np.ndarray, x: np.ndarray, a_t: np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(predicted clean latents, predicted noise) from the model's output at alpha_bar ``a_t``."""
        b_t = F32(1) - a_t
        if self.prediction_type == "epsilon":
            return (x - np.sqrt(b_t) * model_output) / np.sqrt(a_t), model_output
        if self.prediction_type == "sample":
            return model_output, (x - np.sqrt(a_t) * model_output) / np.sqrt(b_t)
        # v_prediction
        return np.sqrt(a_t) * x - np.sqrt(b_t) * model_output, np.sqrt(a_t) * model_output + np.sqrt(b_t) * x


class LCM(_Consistency):
    """diffusers' ``LCMScheduler``: each step predicts the clean latents through the consistency
    boundary condition (``c_skip * x + c_out * x0``) and re-noises them to the next timestep."""

    name = "lcm"
    cls = "LCMScheduler"

    def __init__(self, config: Mapping[str, Any], steps: int) -> None:
        super().__init__(config, steps)
        self.needs_noise = steps > 1  # the last step adds none

    def _step(self, model_output: np.ndarray, i: int, x: np.ndarray, draw: Callable[[], np.ndarray]) -> np.ndarray:
        p = self.params
        t = int(self.timesteps[i])
        last = i == len(self.timesteps) - 1
        a_t = self.alphas_cumprod[t]
        x0, _ = self._x0_eps(model_output, x, a_t)
        if p["clip_sample"]:
            r = F32(p["clip_sample_range"])
            x0 = np.clip(x0, -r, r)
        # boundary condition scalings, sigma_data = 0.5
        scaled = F32(t) * F32(p["timestep_scaling"])
        c_skip = F32(0.25) / (scaled * scaled + F32(0.25))
        c_out = scaled / np.sqrt(scaled * scaled + F32(0.25))
        denoised = c_out * x0 + c_skip * x
        if last:
            return denoised
        a_prev = self._alpha_prev(int(self.timesteps[i + 1]))
        return np.sqrt(a_prev) * denoised + np.sqrt(F32(1) - a_prev) * draw()


class TCD(_Consistency):
    """diffusers' ``TCDScheduler``: from the prediction at ``t`` jump to ``s = floor((1 - eta) * t_next)``,
    then re-noise to ``t_next`` (``eta`` 0: deterministic; 1: as LCM). Default ``eta`` 0.3, as the
    TCD authors and diffusers' ``TCDScheduler.step`` use."""

    name = "tcd"
    cls = "TCDScheduler"
    fixed = {"rescale_betas_zero_snr": False}

    def __init__(self, config: Mapping[str, Any], steps: int, *, eta: float = 0.3) -> None:
        super().__init__(config, steps)
        self.eta = float(eta)
        if not 0.0 <= self.eta <= 1.0:
            raise StreamexecError(f"eta {eta} for the tcd sampler: use 0..1")
        self.needs_noise = self.eta > 0 and steps > 1

    def _step(self, model_output: np.ndarray, i: int, x: np.ndarray, draw: Callable[[], np.ndarray]) -> np.ndarray:
        t = int(self.timesteps[i])
        last = i == len(self.timesteps) - 1
        t_next = 0 if last else int(self.timesteps[i + 1])
        s = int(np.floor(F32(1.0 - self.eta) * F32(t_next)))
        a_t, a_next, a_s = self.alphas_cumprod[t], self.alphas_cumprod[t_next], self.alphas_cumprod[s]
        x0, eps = self._x0_eps(model_output, x, a_t)
        noised = np.sqrt(a_s) * x0 + np.sqrt(F32(1) - a_s) * eps
        if self.eta == 0 or last:
            return noised
        ratio = a_next / a_s
        return np.sqrt(ratio) * noised + np.sqrt(F32(1) - ratio) * draw()
