"""Noise schedulers for the denoise loop: numpy ports of diffusers' schedulers, same sigma/timestep math.

Each scheduler is built from a diffusers ``scheduler_config.json`` dict the way diffusers'
``SchedulerClass.from_config(config)`` builds it: keys the target class knows are taken, the rest keep
that class's defaults (so SD 1.5's PNDM config, which names no ``timestep_spacing``, gives Euler and
DPM-Solver their default "linspace" spacing and DDIM/PNDM their default "leading"). The arithmetic
follows diffusers' dtypes (float32 tables and steps, float64 where diffusers uses numpy float64) so the
results agree to float32 rounding.

The loop, as diffusers' StableDiffusionPipeline runs it::

    s = make_scheduler("euler", config, steps=20)
    x = noise * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        eps = unet(s.scale_model_input(x, i), t, ...)
        x = s.step(eps, i, x, rng=rng)

For img2img: ``i0 = s.img2img_start(strength)``, ``x = s.add_noise(latents, noise, i0)`` and run the
loop over ``range(i0, len(s.timesteps))`` (diffusers' ``get_timesteps``; no ``init_noise_sigma``).
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from streamexec.errors import StreamexecError

__all__ = [
    "DDIM",
    "SAMPLERS",
    "DPMSolverMultistep",
    "Euler",
    "EulerAncestral",
    "FlowMatchEuler",
    "PNDM",
    "FLUX_DEV_SCHEDULER_CONFIG",
    "FLUX_SCHNELL_SCHEDULER_CONFIG",
    "SD15_SCHEDULER_CONFIG",
    "Scheduler",
    "flux_image_seq_len",
    "flux_mu",
    "make_scheduler",
    "read_scheduler_config",
]

F32 = np.float32

#: ``--sampler`` names for SD-type (DDPM-trained) models.
SAMPLERS = ("euler", "euler_a", "ddim", "dpmpp_2m", "pndm")

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

_CLASS_OF = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}
_NAME_OF = {cls: name for name, cls in _CLASS_OF.items()}

_BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}
# The __init__ parameters (and defaults) of each diffusers class (diffusers 0.30-0.42).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "EulerDiscreteScheduler": {
        **_BETAS,
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
    },
    "EulerAncestralDiscreteScheduler": {
        **_BETAS,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    },
    "DDIMScheduler": {
        **_BETAS,
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
    },
    "PNDMScheduler": {
        **_BETAS,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    },
    "DPMSolverMultistepScheduler": {
        **_BETAS,
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
    },
    "FlowMatchEulerDiscreteScheduler": {
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
    },
}
# Options diffusers has that streamexec accepts only at one value (none of the SD 1.5 / FLUX configs set them).
_FIXED: dict[str, dict[str, Any]] = {
    "EulerDiscreteScheduler": {
        "interpolation_type": "linear",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "rescale_betas_zero_snr": False,
    },
    "EulerAncestralDiscreteScheduler": {"rescale_betas_zero_snr": False},
    "DDIMScheduler": {"thresholding": False, "rescale_betas_zero_snr": False},
    "PNDMScheduler": {},
    "DPMSolverMultistepScheduler": {
        "thresholding": False,
        "algorithm_type": "dpmsolver++",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "variance_type": None,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
    },
    "FlowMatchEulerDiscreteScheduler": {
        "invert_sigmas": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "stochastic_sampling": False,
    },
}
_PREDICTIONS = {
    "EulerDiscreteScheduler": ("epsilon", "v_prediction", "sample", "original_sample"),
    "EulerAncestralDiscreteScheduler": ("epsilon", "v_prediction"),
    "DDIMScheduler": ("epsilon", "v_prediction", "sample"),
    "PNDMScheduler": ("epsilon", "v_prediction"),
    "DPMSolverMultistepScheduler": ("epsilon", "v_prediction", "sample"),
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


def _resolve(cls: str, config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The init kwargs diffusers' ``cls.from_config(config, **overrides)`` would use, checked."""
    defaults = _DEFAULTS[cls]
    used_defaults = set(config.get("_use_default_values") or ())
    params = dict(defaults)
    for key, value in config.items():
        if key in defaults and key not in used_defaults:
            params[key] = value
    params.update(overrides)
    name = _NAME_OF[cls]
    for key, allowed in _FIXED[cls].items():
        if params[key] != allowed:
            raise StreamexecError(f"scheduler option {key}={params[key]!r} is not supported by the {name} sampler")
    if cls in _PREDICTIONS and params["prediction_type"] not in _PREDICTIONS[cls]:
        raise StreamexecError(f"prediction_type {params['prediction_type']!r} is not supported by the {name} sampler")
    if "timestep_spacing" in params and params["timestep_spacing"] not in ("linspace", "leading", "trailing"):
        raise StreamexecError(f"timestep_spacing {params['timestep_spacing']!r}: use linspace, leading or trailing")
    return params


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` bit for bit, as torch's CPU kernel computes it.

    The kernel fills the first half as ``start + step*i`` and the second as ``end - step*(n-1-i)``, each
    one fused multiply-add (one rounding) on the FMA-capable CPUs diffusers normally runs on; numpy's
    linspace rounds differently in about a third of the entries, which moves sigmas by an ulp.
    """
    s, e = F32(start), F32(end)
    if n == 1:
        return np.array([s], dtype=F32)
    step = np.float64((e - s) / F32(n - 1))
    i = np.arange(n, dtype=np.float64)
    low = step * i + np.float64(s)  # exact product (24 x 11 bits), one rounding of the sum
    high = np.float64(e) - step * (n - 1 - i)
    return np.where(i < n // 2, low, high).astype(F32)


def _betas(p: Mapping[str, Any]) -> np.ndarray:
    """diffusers' float32 beta table."""
    n = int(p["num_train_timesteps"])
    if p["trained_betas"] is not None:
        return np.asarray(p["trained_betas"], dtype=F32)
    schedule = p["beta_schedule"]
    if schedule == "linear":
        return _linspace_f32(p["beta_start"], p["beta_end"], n)
    if schedule == "scaled_linear":
        root = _linspace_f32(p["beta_start"] ** 0.5, p["beta_end"] ** 0.5, n)
        return root * root
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=F32)
    raise StreamexecError(f"beta_schedule {schedule!r}: use linear, scaled_linear or squaredcos_cap_v2")


def _alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    # torch.cumprod on CPU accumulates float32 in double, then rounds each element.
    return np.cumprod(F32(1) - betas, dtype=np.float64).astype(F32)


def _karras(in_sigmas: np.ndarray, steps: int, sigma_min: float | None, sigma_max: float | None) -> np.ndarray:
    """Karras et al. (2022) rho=7 sigmas between the ends of ``in_sigmas`` (float64, as diffusers)."""
    lo = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    hi = sigma_max if sigma_max is not None else in_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = lo ** (1 / rho)
    max_inv_rho = hi ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _sigma_to_t(sigma: Any, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of ``sigma`` by interpolating log-sigmas (diffusers' ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = (low - log_sigma) / (low - high)
    w = np.clip(w, 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def _as_f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=F32)


class Scheduler:
    """Common interface: index-based stepping over ``timesteps`` (one entry per denoiser call).

    ``timesteps[i]`` is what the denoiser is given at call ``i``; ``step(model_output, i, x)`` returns the
    latents for call ``i + 1``. Multistep schedulers keep state, so calls must come in order, once each.
    """

    name = ""
    order = 1
    #: True when ``step`` draws fresh noise (pass ``rng=`` or ``noise=``).
    needs_noise = False
    karras = False

    def __init__(self, config: Mapping[str, Any], steps: int) -> None:
        try:
            steps = operator.index(steps)
        except TypeError:
            raise StreamexecError(f"steps must be a positive integer, got {steps!r}") from None
        if steps < 1:
            raise StreamexecError(f"steps must be a positive integer, got {steps!r}")
        train = int(config.get("num_train_timesteps", 1000))
        if steps > train:
            raise StreamexecError(f"steps {steps} is more than the {train} training timesteps")
        self.num_inference_steps = steps
        self.config = dict(config)
        self.timesteps: np.ndarray = np.zeros(0, dtype=F32)
        self.sigmas: np.ndarray | None = None
        self.init_noise_sigma: float = 1.0

    def __len__(self) -> int:
        return len(self.timesteps)

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        """The denoiser's input at call ``i`` (Euler-type schedulers divide by sqrt(sigma^2 + 1))."""
        return x

    def step(
        self,
        model_output: np.ndarray,
        i: int,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """Latents for call ``i + 1`` from the denoiser's output at call ``i``."""
        raise NotImplementedError

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Noise clean latents ``x0`` to the level of call ``i`` (img2img's starting point)."""
        raise NotImplementedError

    def img2img_start(self, strength: float) -> int:
        """First call index for img2img at ``strength`` (diffusers' ``get_timesteps``)."""
        if not 0.0 <= strength <= 1.0:
            raise StreamexecError(f"strength must be in [0, 1], got {strength}")
        steps = self.num_inference_steps
        init_timestep = min(int(steps * strength), steps)
        if init_timestep < 1:
            raise StreamexecError(
                f"strength {strength} with {steps} steps leaves no denoising step: raise --strength or --steps"
            )
        return max(steps - init_timestep, 0) * self.order

    def _noise(self, shape: tuple[int, ...], rng: np.random.Generator | None, noise: np.ndarray | None) -> np.ndarray:
        if noise is not None:
            noise = _as_f32(noise)
            if noise.shape != shape:
                raise StreamexecError(f"noise has shape {noise.shape}, the latents {shape}")
            return noise
        if rng is None:
            raise StreamexecError(f"the {self.name} sampler needs noise: pass rng= (a numpy Generator) or noise=")
        return rng.standard_normal(shape, dtype=F32)


class _DiscreteBase(Scheduler):
    """Shared beta/alpha tables of the DDPM-trained (SD 1.5) schedulers."""

    cls = ""

    def __init__(self, config: Mapping[str, Any], steps: int, overrides: Mapping[str, Any] | None = None) -> None:
        self.params = p = _resolve(self.cls, config, overrides or {})
        super().__init__(p, steps)
        self.train_steps = int(p["num_train_timesteps"])
        self.betas = _betas(p)
        if len(self.betas) != self.train_steps:
            raise StreamexecError(
                f"trained_betas has {len(self.betas)} entries, num_train_timesteps says {self.train_steps}"
            )
        self.alphas_cumprod = _alphas_cumprod(self.betas)
        self.prediction_type = p["prediction_type"]

    def _train_sigmas(self) -> np.ndarray:
        ac = self.alphas_cumprod
        return np.sqrt((F32(1) - ac) / ac)

    def _spacing_f32(self) -> np.ndarray:
        """Euler/EulerAncestral timesteps (float32)."""
        p, n, train = self.params, self.num_inference_steps, self.train_steps
        spacing = p["timestep_spacing"]
        if spacing == "linspace":
            return np.linspace(0, train - 1, n, dtype=np.float32)[::-1].copy()
        if spacing == "leading":
            ratio = train // n
            ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
            ts += p["steps_offset"]
            return ts
        ratio = train / n
        ts = np.arange(train, 0, -ratio).round().copy().astype(np.float32)
        ts -= 1
        return ts

    def _spacing_int(self) -> np.ndarray:
        """DDIM timesteps (int64)."""
        p, n, train = self.params, self.num_inference_steps, self.train_steps
        spacing = p["timestep_spacing"]
        if spacing == "linspace":
            return np.linspace(0, train - 1, n).round()[::-1].copy().astype(np.int64)
        if spacing == "leading":
            ratio = train // n
            ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
            ts += p["steps_offset"]
            return ts
        ratio = train / n
        ts = np.round(np.arange(train, 0, -ratio)).astype(np.int64)
        ts -= 1
        return ts

    def _alpha_prev(self, t: int) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _ddpm_add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        ac = self.alphas_cumprod[int(self.timesteps[i])]
        return np.sqrt(ac) * _as_f32(x0) + np.sqrt(F32(1) - ac) * _as_f32(noise)


class _SigmaBase(_DiscreteBase):
    """Euler-type schedulers: k-diffusion sigmas, inputs scaled by 1/sqrt(sigma^2 + 1)."""

    def _set_init_noise_sigma(self) -> None:
        top = F32(np.max(self.sigmas))
        if self.params["timestep_spacing"] in ("linspace", "trailing"):
            self.init_noise_sigma = float(top)
        else:
            self.init_noise_sigma = float(np.sqrt(top * top + F32(1)))

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        sigma = self.sigmas[i]
        return _as_f32(x) / np.sqrt(sigma * sigma + F32(1))

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return _as_f32(x0) + _as_f32(noise) * self.sigmas[i]

    def _x0(self, model_output: np.ndarray, x: np.ndarray, sigma: np.float32) -> np.ndarray:
        if self.prediction_type == "epsilon":
            return x - sigma * model_output
        if self.prediction_type == "v_prediction":
            s2 = sigma * sigma + F32(1)
            return model_output * (-sigma / np.sqrt(s2)) + (x / s2)
        return model_output  # "sample" / "original_sample"


class Euler(_SigmaBase):
    """diffusers' ``EulerDiscreteScheduler`` (s_churn = 0), with optional Karras sigmas."""

    name = "euler"
    cls = "EulerDiscreteScheduler"

    def __init__(self, config: Mapping[str, Any], steps: int, *, karras: bool | None = None) -> None:
        super().__init__(config, steps, {} if karras is None else {"use_karras_sigmas": bool(karras)})
        p = self.params
        if p["timestep_type"] == "continuous" and p["prediction_type"] == "v_prediction":
            raise StreamexecError("timestep_type 'continuous' with v_prediction is not supported by the euler sampler")
        self.karras = bool(p["use_karras_sigmas"])
        timesteps = self._spacing_f32()
        table = self._train_sigmas()
        log_sigmas = np.log(table)
        sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
        if self.karras:
            sigmas = _karras(sigmas, steps, p["sigma_min"], p["sigma_max"])
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        if p["final_sigmas_type"] == "sigma_min":
            last = float(table[0])
        elif p["final_sigmas_type"] == "zero":
            last = 0.0
        else:
            raise StreamexecError(f"final_sigmas_type {p['final_sigmas_type']!r}: use zero or sigma_min")
        self.sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        self.timesteps = timesteps.astype(np.float32)
        self._set_init_noise_sigma()

    def step(
        self,
        model_output: np.ndarray,
        i: int,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        x = _as_f32(x)
        model_output = _as_f32(model_output)
        sigma = self.sigmas[i]
        x0 = self._x0(model_output, x, sigma)
        derivative = (x - x0) / sigma
        dt = self.sigmas[i + 1] - sigma
        return x + derivative * dt


class EulerAncestral(_SigmaBase):
    """diffusers' ``EulerAncestralDiscreteScheduler``: Euler to sigma_down, then fresh noise * sigma_up."""

    name = "euler_a"
    cls = "EulerAncestralDiscreteScheduler"
    needs_noise = True

    def __init__(self, config: Mapping[str, Any], steps: int) -> None:
        super().__init__(config, steps)
        timesteps = self._spacing_f32()
        table = self._train_sigmas()
        sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.timesteps = timesteps
        self._set_init_noise_sigma()

    def step(
        self,
        model_output: np.ndarray,
        i: int,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        x = _as_f32(x)
        model_output = _as_f32(model_output)
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
        return prev + self._noise(x.shape, rng, noise) * sigma_up


class DDIM(_DiscreteBase):
    """diffusers' ``DDIMScheduler`` (eta = 0 by default: deterministic)."""

    name = "ddim"
    cls = "DDIMScheduler"

    def __init__(self, config: Mapping[str, Any], steps: int, *, eta: float = 0.0) -> None:
        super().__init__(config, steps)
        p = self.params
        self.eta = float(eta)
        self.needs_noise = self.eta > 0
        self.final_alpha_cumprod = F32(1.0) if p["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.timesteps = self._spacing_int()

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return self._ddpm_add_noise(x0, noise, i)

    def step(
        self,
        model_output: np.ndarray,
        i: int,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        x = _as_f32(x)
        model_output = _as_f32(model_output)
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
            prev = prev + std * self._noise(x.shape, rng, noise)
        return prev


class PNDM(_DiscreteBase):
    """diffusers' ``PNDMScheduler``: pseudo-linear multistep (PLMS), with Runge-Kutta warm-up unless skipped.

    With ``skip_prk_steps`` (SD 1.5) there are ``steps + 1`` denoiser calls: the second call re-evaluates
    the first timestep for a Heun-like warm-up, exactly as diffusers does.
    """

    name = "pndm"
    cls = "PNDMScheduler"

    def __init__(self, config: Mapping[str, Any], steps: int) -> None:
        super().__init__(config, steps)
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

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return self._ddpm_add_noise(x0, noise, i)

    def step(
        self,
        model_output: np.ndarray,
        i: int,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        x = _as_f32(x)
        model_output = _as_f32(model_output)
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


class DPMSolverMultistep(_DiscreteBase):
    """diffusers' ``DPMSolverMultistepScheduler`` with algorithm ``dpmsolver++`` (DPM++ 2M by default)."""

    name = "dpmpp_2m"
    cls = "DPMSolverMultistepScheduler"

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
        train = self.train_steps
        with np.errstate(divide="ignore"):
            alpha_t = np.sqrt(self.alphas_cumprod)
            sigma_t = np.sqrt(F32(1) - self.alphas_cumprod)
            lambda_t = np.log(alpha_t) - np.log(sigma_t)
        clipped_idx = int(np.searchsorted(lambda_t[::-1], p["lambda_min_clipped"]))
        last_timestep = train - clipped_idx
        spacing = p["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = last_timestep // (steps + 1)
            timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += p["steps_offset"]
        else:
            timesteps = np.arange(last_timestep, 0, -train / steps).round().copy().astype(np.int64)
            timesteps -= 1
        table = self._train_sigmas()
        log_sigmas = np.log(table)
        if self.karras:
            sigmas = _karras(np.flip(table).copy(), steps, config.get("sigma_min"), config.get("sigma_max"))
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            if p["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
        if p["final_sigmas_type"] == "sigma_min":
            last = float(table[0])
        elif p["final_sigmas_type"] == "zero":
            last = 0.0
        else:
            raise StreamexecError(f"final_sigmas_type {p['final_sigmas_type']!r}: use zero or sigma_min")
        self.sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        self.timesteps = timesteps.astype(np.int64)
        self.solver_order = int(p["solver_order"])
        self._outputs: list[np.ndarray | None] = [None] * self.solver_order
        self._lower_order_nums = 0

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
        return alpha * _as_f32(x0) + sigma * _as_f32(noise)

    def _convert(self, model_output: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        if self.prediction_type == "sample":
            return model_output
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        if self.prediction_type == "epsilon":
            return (x - sigma * model_output) / alpha
        return alpha * x - sigma * model_output  # v_prediction

    def step(
        self,
        model_output: np.ndarray,
        i: int,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        p = self.params
        x = _as_f32(x)
        n = len(self.timesteps)
        lower_order_final = (i == n - 1) and (
            p["euler_at_final"] or (p["lower_order_final"] and n < 15) or p["final_sigmas_type"] == "zero"
        )
        lower_order_second = (i == n - 2) and p["lower_order_final"] and n < 15
        m = self._convert(_as_f32(model_output), i, x)
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

    def __init__(
        self,
        config: Mapping[str, Any],
        steps: int,
        *,
        image_seq_len: int | None = None,
        mu: float | None = None,
        sigmas: np.ndarray | None = None,
    ) -> None:
        self.params = p = _resolve(self.cls, config, {})
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
        return sigma * _as_f32(noise) + (F32(1) - sigma) * _as_f32(x0)

    def step(
        self,
        model_output: np.ndarray,
        i: int,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return _as_f32(x) + dt * _as_f32(model_output)


def make_scheduler(
    name: str | None,
    config: Mapping[str, Any],
    steps: int,
    *,
    karras: bool | None = None,
    eta: float = 0.0,
    image_seq_len: int | None = None,
    mu: float | None = None,
) -> Scheduler:
    """Build sampler ``name`` (one of :data:`SAMPLERS`; ``None`` = the class the config names).

    ``config`` is the model's ``scheduler_config.json`` dict. ``karras`` forces Karras sigmas on/off
    (``None``: as the config says); only euler and dpmpp_2m have them, as in diffusers. ``eta`` is DDIM's.
    ``image_seq_len``/``mu`` size the shift of a flow-matching (FLUX) config.
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
    flow_config = config_cls == "FlowMatchEulerDiscreteScheduler"
    if flow_config:
        if name not in ("euler", "flow_euler"):
            raise StreamexecError(f"sampler {name!r} does not apply to a flow-matching (FLUX) model: use euler")
        if karras:
            raise StreamexecError("karras sigmas do not apply to the flow-matching (FLUX) sampler")
        return FlowMatchEuler(config, steps, image_seq_len=image_seq_len, mu=mu)
    if name == "flow_euler":
        raise StreamexecError("the flow-matching sampler needs a flow-matching (FLUX) scheduler config")
    if name not in SAMPLERS:
        raise StreamexecError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    if karras and name not in ("euler", "dpmpp_2m"):
        raise StreamexecError(f"karras sigmas are only available for euler and dpmpp_2m (not {name}), as in diffusers")
    if name == "euler":
        return Euler(config, steps, karras=karras)
    if name == "euler_a":
        return EulerAncestral(config, steps)
    if name == "ddim":
        return DDIM(config, steps, eta=eta)
    if name == "pndm":
        return PNDM(config, steps)
    # An explicit --sampler dpmpp_2m means DPM++ 2M whatever the DPM-Solver config says; from the
    # model's own DPM-Solver config (name None) its order and solver type are kept.
    explicit = config_cls != "DPMSolverMultistepScheduler" or requested is not None
    overrides = {"solver_order": 2, "solver_type": "midpoint", "algorithm_type": "dpmsolver++"} if explicit else {}
    return DPMSolverMultistep(config, steps, karras=karras, overrides=overrides)
