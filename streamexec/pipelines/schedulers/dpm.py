"""DPM-Solver++ multistep: diffusers' ``DPMSolverMultistepScheduler`` (``--sampler dpmpp_2m``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from streamexec.errors import StreamexecError

from .base import DiscreteBase
from .config import BETA_DEFAULTS
from .tables import F32, SPACINGS, as_f32, sgm_uniform_timesteps, sigma_to_t, t_to_sigma
from .tables import karras as karras_sigmas


class DPMSolverMultistep(DiscreteBase):
    """diffusers' ``DPMSolverMultistepScheduler`` with algorithm ``dpmsolver++`` (DPM++ 2M by default)."""

    name = "dpmpp_2m"
    cls = "DPMSolverMultistepScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    fixed = {
        "thresholding": False,
        "algorithm_type": "dpmsolver++",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "variance_type": None,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
    }
    predictions = ("epsilon", "v_prediction", "sample")
    spacings = SPACINGS
    stateful = True

    def __init__(
        self,
        config: Mapping[str, Any],
        steps: int,
        *,
        karras: bool | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        extra = dict(overrides or {})
        if karras is not None:
            extra["use_karras_sigmas"] = bool(karras)
        super().__init__(config, steps, extra)
        p = self.params
        if p["solver_order"] not in (1, 2, 3) or p["solver_type"] not in ("midpoint", "heun"):
            raise StreamexecError(
                f"DPM-Solver order {p['solver_order']}, type {p['solver_type']!r} is not supported (1-3, midpoint/heun)"
            )
        self.karras = bool(p["use_karras_sigmas"])
        spacing = p["timestep_spacing"]
        if self.karras and spacing == "sgm_uniform":
            raise StreamexecError("karras and sgm_uniform are two sigma schedules: pick one")
        train = self.train_steps
        with np.errstate(divide="ignore"):
            alpha_t = np.sqrt(self.alphas_cumprod)
            sigma_t = np.sqrt(F32(1) - self.alphas_cumprod)
            lambda_t = np.log(alpha_t) - np.log(sigma_t)
        clipped_idx = int(np.searchsorted(lambda_t[::-1], p["lambda_min_clipped"]))
        last_timestep = train - clipped_idx
        if spacing == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = last_timestep // (steps + 1)
            timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += p["steps_offset"]
        elif spacing == "sgm_uniform":
            timesteps = sgm_uniform_timesteps(steps, last_timestep).astype(np.float32)
        else:
            timesteps = np.arange(last_timestep, 0, -train / steps).round().copy().astype(np.int64)
            timesteps -= 1
        table = self._train_sigmas()
        log_sigmas = np.log(table)
        if self.karras:
            sigmas = karras_sigmas(np.flip(table).copy(), steps, config.get("sigma_min"), config.get("sigma_max"))
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if p["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        elif spacing == "sgm_uniform":
            sigmas = t_to_sigma(timesteps, table)
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
        self.sigmas = np.concatenate([sigmas, [self._final_sigma(table)]]).astype(F32)
        self.timesteps = timesteps if spacing == "sgm_uniform" else timesteps.astype(np.int64)
        self.solver_order = int(p["solver_order"])
        self._outputs: list[np.ndarray | None] = [None] * self.solver_order
        self._lower_order_nums = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        """``lower_order_nums``, ``present`` (which history slots hold an output) and ``outputs`` (stacked)."""
        present = [o is not None for o in self._outputs]
        out = {"lower_order_nums": np.array(self._lower_order_nums), "present": np.array(present)}
        if any(present):
            out["outputs"] = np.stack([o for o in self._outputs if o is not None])
        return out

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        present = [bool(p) for p in np.asarray(state["present"])]
        if len(present) != len(self._outputs):
            raise KeyError("present")
        stacked = iter(np.asarray(state["outputs"], F32)) if any(present) else iter(())
        outputs = [next(stacked) if p else None for p in present]
        self._lower_order_nums = int(state["lower_order_nums"])
        self._outputs = outputs

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha = F32(1) / np.sqrt(sigma * sigma + F32(1))
        return alpha, sigma * alpha

    @staticmethod
    def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
        with np.errstate(divide="ignore"):
            return np.log(alpha) - np.log(sigma)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        return alpha * as_f32(x0) + sigma * as_f32(noise)

    def _convert(self, model_output: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        if self.prediction_type == "sample":
            return model_output
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        if self.prediction_type == "epsilon":
            return (x - sigma * model_output) / alpha
        return alpha * x - sigma * model_output  # v_prediction

    def _step(self, model_output: np.ndarray, i: int, x: np.ndarray, draw: Callable[[], np.ndarray]) -> np.ndarray:
        p = self.params
        n = len(self.timesteps)
        lower_order_final = (i == n - 1) and (
            p["euler_at_final"] or (p["lower_order_final"] and n < 15) or p["final_sigmas_type"] == "zero"
        )
        lower_order_second = (i == n - 2) and p["lower_order_final"] and n < 15
        m = self._convert(model_output, i, x)
        self._outputs = self._outputs[1:] + [m]
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.solver_order == 1 or self._lower_order_nums < 1 or lower_order_final:
                prev = self._first_order(m, i, x)
            elif self.solver_order == 2 or self._lower_order_nums < 2 or lower_order_second:
                prev = self._second_order(i, x)
            else:
                prev = self._third_order(i, x)
        if self._lower_order_nums < self.solver_order:
            self._lower_order_nums += 1
        return prev

    def _first_order(self, m: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        h = self._lambda(alpha_t, sigma_t) - self._lambda(alpha_s, sigma_s)
        return (sigma_t / sigma_s) * x - (alpha_t * (np.exp(-h) - F32(1))) * m

    def _second_order(self, i: int, x: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
        lambda_t = self._lambda(alpha_t, sigma_t)
        lambda_s0 = self._lambda(alpha_s0, sigma_s0)
        lambda_s1 = self._lambda(alpha_s1, sigma_s1)
        m0, m1 = self._outputs[-1], self._outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (F32(1) / r0) * (m0 - m1)
        em1 = np.exp(-h) - F32(1)
        if self.params["solver_type"] == "midpoint":
            return (sigma_t / sigma_s0) * x - (alpha_t * em1) * d0 - F32(0.5) * (alpha_t * em1) * d1
        return (sigma_t / sigma_s0) * x - (alpha_t * em1) * d0 + (alpha_t * (em1 / h + F32(1))) * d1

    def _third_order(self, i: int, x: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
        alpha_s2, sigma_s2 = self._alpha_sigma(self.sigmas[i - 2])
        lambda_t = self._lambda(alpha_t, sigma_t)
        lambda_s0 = self._lambda(alpha_s0, sigma_s0)
        lambda_s1 = self._lambda(alpha_s1, sigma_s1)
        lambda_s2 = self._lambda(alpha_s2, sigma_s2)
        m0, m1, m2 = self._outputs[-1], self._outputs[-2], self._outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (F32(1) / r0) * (m0 - m1), (F32(1) / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (F32(1) / (r0 + r1)) * (d1_0 - d1_1)
        em1 = np.exp(-h) - F32(1)
        return (
            (sigma_t / sigma_s0) * x
            - (alpha_t * em1) * m0
            + (alpha_t * (em1 / h + F32(1))) * d1
            - (alpha_t * ((em1 + h) / (h * h) - F32(0.5))) * d2
        )

