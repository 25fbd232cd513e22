"""PNDM / PLMS: diffusers' ``PNDMScheduler`` (SD 1.5's own scheduler)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from streamexec.errors import StreamexecError

from .base import DiscreteBase
from .config import BETA_DEFAULTS
from .tables import F32


class PNDM(DiscreteBase):
    """diffusers' ``PNDMScheduler``: pseudo-linear multistep (PLMS), with Runge-Kutta warm-up unless skipped.

    With ``skip_prk_steps`` (SD 1.5) there are ``steps + 1`` denoiser calls: the second call re-evaluates
    the first timestep for a Heun-like warm-up, exactly as diffusers does.
    """

    name = "pndm"
    cls = "PNDMScheduler"
    defaults = {
        **BETA_DEFAULTS,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    predictions = ("epsilon", "v_prediction")
    stateful = True

    def __init__(self, config: Mapping[str, Any], steps: int, *, overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__(config, steps, overrides)
        p = self.params
        n, train = steps, self.train_steps
        self.final_alpha_cumprod = F32(1.0) if p["set_alpha_to_one"] else self.alphas_cumprod[0]
        spacing = p["timestep_spacing"]
        if spacing == "linspace":
            base = np.linspace(0, train - 1, n).round().astype(np.int64)
        elif spacing == "leading":
            base = (np.arange(0, n) * (train // n)).round()
            base += p["steps_offset"]
        else:
            base = np.round(np.arange(train, 0, -train / n))[::-1].astype(np.int64)
            base -= 1
        if p["skip_prk_steps"]:
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            if n < 4:
                raise StreamexecError("the pndm sampler with Runge-Kutta warm-up (skip_prk_steps false) needs 4+ steps")
            prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, train // n // 2]), 4)
            self.prk_timesteps = (prk[:-1].repeat(2)[1:-1])[::-1].copy().astype(np.int64)
            plms = base[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self._counter = 0
        self._ets: list[np.ndarray] = []
        self._cur_model_output: Any = 0
        self._cur_sample: np.ndarray | None = None

    def state_dict(self) -> dict[str, np.ndarray]:
        """``counter``, ``n_ets`` and, when present, ``ets`` (stacked), ``cur_sample``, ``cur_model_output``."""
        out = {"counter": np.array(self._counter), "n_ets": np.array(len(self._ets))}
        if self._ets:
            out["ets"] = np.stack(self._ets)
        if self._cur_sample is not None:
            out["cur_sample"] = np.array(self._cur_sample)
        if not isinstance(self._cur_model_output, (int, float)):
            out["cur_model_output"] = np.array(self._cur_model_output)
        return out

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        counter = int(state["counter"])
        n = int(state["n_ets"])
        ets = list(np.asarray(state["ets"], F32)) if n else []
        if len(ets) != n:
            raise ValueError(f"n_ets is {n}, ets holds {len(ets)}")
        self._counter, self._ets = counter, ets
        self._cur_sample = np.asarray(state["cur_sample"], F32) if "cur_sample" in state else None
        self._cur_model_output = np.asarray(state["cur_model_output"], F32) if "cur_model_output" in state else 0

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return self._ddpm_add_noise(x0, noise, i)

    def _step(self, model_output: np.ndarray, i: int, x: np.ndarray, draw: Callable[[], np.ndarray]) -> np.ndarray:
        t = int(self.timesteps[i])
        if self._counter < len(self.prk_timesteps) and not self.params["skip_prk_steps"]:
            return self._step_prk(model_output, t, x)
        return self._step_plms(model_output, t, x)

    def _step_prk(self, model_output: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        c = self._counter
        diff_to_prev = 0 if c % 2 else self.train_steps // self.num_inference_steps // 2
        t_prev = t - diff_to_prev
        t = int(self.prk_timesteps[c // 4 * 4])
        if c % 4 == 0:
            self._cur_model_output = self._cur_model_output + F32(1 / 6) * model_output
            self._ets.append(model_output)
            self._cur_sample = x
        elif (c - 1) % 4 == 0 or (c - 2) % 4 == 0:
            self._cur_model_output = self._cur_model_output + F32(1 / 3) * model_output
        else:
            model_output = self._cur_model_output + F32(1 / 6) * model_output
            self._cur_model_output = 0
        sample = self._cur_sample if self._cur_sample is not None else x
        self._counter += 1
        return self._prev_sample(sample, t, t_prev, model_output)

    def _step_plms(self, model_output: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        ratio = self.train_steps // self.num_inference_steps
        t_prev = t - ratio
        if self._counter != 1:
            self._ets = self._ets[-3:]
            self._ets.append(model_output)
        else:
            t_prev = t
            t = t + ratio
        ets = self._ets
        if len(ets) == 1 and self._counter == 0:
            self._cur_sample = x
        elif len(ets) == 1 and self._counter == 1:
            model_output = (model_output + ets[-1]) / F32(2)
            x = self._cur_sample
            self._cur_sample = None
        elif len(ets) == 2:
            model_output = (F32(3) * ets[-1] - ets[-2]) / F32(2)
        elif len(ets) == 3:
            model_output = (F32(23) * ets[-1] - F32(16) * ets[-2] + F32(5) * ets[-3]) / F32(12)
        else:
            model_output = F32(1 / 24) * (F32(55) * ets[-1] - F32(59) * ets[-2] + F32(37) * ets[-3] - F32(9) * ets[-4])
        self._counter += 1
        return self._prev_sample(x, t, t_prev, model_output)

    def _prev_sample(self, x: np.ndarray, t: int, t_prev: int, model_output: np.ndarray) -> np.ndarray:
        a_t = self.alphas_cumprod[t]
        a_prev = self._alpha_prev(t_prev)
        b_t = F32(1) - a_t
        b_prev = F32(1) - a_prev
        if self.prediction_type == "v_prediction":
            model_output = np.sqrt(a_t) * model_output + np.sqrt(b_t) * x
        sample_coeff = np.sqrt(a_prev / a_t)
        denom = a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev)
        return sample_coeff * x - (a_prev - a_t) * model_output / denom
