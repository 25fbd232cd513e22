"""The interface every sampler has (index-based stepping, img2img start, resumable state) and the shared
base of the DDPM-trained (SD 1.5) samplers."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from streamexec.errors import StreamexecError

from .config import resolve
from .tables import F32, alphas_cumprod, as_f32, betas, train_sigmas


class Scheduler:
    """Common interface: index-based stepping over ``timesteps`` (one entry per denoiser call).

    ``timesteps[i]`` is what the denoiser is given at call ``i``; ``step(model_output, i, x)`` returns the
    latents for call ``i + 1``. Multistep schedulers keep history between calls, so calls must come in
    order, once each; ``state_dict()`` / ``load_state_dict()`` save and restore that history (arrays only,
    for a resumed run).
    """

    name = ""
    #: the diffusers class this sampler follows, and its __init__ defaults / one-value options
    cls = ""
    defaults: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    predictions: tuple[str, ...] = ()
    spacings: tuple[str, ...] = ("leading", "linspace", "trailing")
    order = 1
    #: True when ``step`` draws fresh noise (pass ``rng=`` or ``noise=``).
    needs_noise = False
    #: True when ``step`` carries history from call to call (see ``state_dict``).
    stateful = False
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
        """Latents for call ``i + 1`` from the denoiser's output at call ``i``; samplers that add fresh
        noise (``needs_noise``) take it as ``noise=`` (the pipeline's ``step_noise(seed, i)``) or draw it
        from ``rng``."""
        x = as_f32(x)
        return self._step(as_f32(model_output), i, x, lambda: self._noise(x.shape, rng, noise))

    def _step(self, model_output: np.ndarray, i: int, x: np.ndarray, draw: Callable[[], np.ndarray]) -> np.ndarray:
        """``step`` on float32 arrays; ``draw()`` gives the fresh noise (standard normal, ``x``'s shape)."""
        raise NotImplementedError

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Noise clean latents ``x0`` to the level of call ``i`` (img2img's starting point)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """The history ``step`` carries between calls, as named arrays (empty for one-step samplers)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Put a :meth:`state_dict` back (the sampler must be built with the same settings)."""
        try:
            self._load_state(state)
        except (KeyError, ValueError, TypeError, StopIteration) as err:
            raise StreamexecError(
                f"the saved {self.name} sampler state is incomplete or from another sampler ({err})"
            ) from None

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        pass

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
            noise = as_f32(noise)
            if noise.shape != shape:
                raise StreamexecError(f"noise has shape {noise.shape}, the latents {shape}")
            return noise
        if rng is None:
            raise StreamexecError(f"the {self.name} sampler needs noise: pass rng= (a numpy Generator) or noise=")
        return rng.standard_normal(shape, dtype=F32)


class DiscreteBase(Scheduler):
    """Shared beta/alpha tables of the DDPM-trained (SD 1.5) schedulers."""

    def __init__(self, config: Mapping[str, Any], steps: int, overrides: Mapping[str, Any] | None = None) -> None:
        self.params = p = resolve(self, config, overrides or {})
        super().__init__(p, steps)
        self.train_steps = int(p["num_train_timesteps"])
        self.betas = betas(p)
        if len(self.betas) != self.train_steps:
            raise StreamexecError(
                f"trained_betas has {len(self.betas)} entries, num_train_timesteps says {self.train_steps}"
            )
        self.alphas_cumprod = alphas_cumprod(self.betas)
        self.prediction_type = p["prediction_type"]

    def _train_sigmas(self) -> np.ndarray:
        return train_sigmas(self.alphas_cumprod)

    def _final_sigma(self, table: np.ndarray) -> float:
        """The sigma after the last step (``final_sigmas_type``): 0, or the training table's smallest."""
        kind = self.params["final_sigmas_type"]
        if kind not in ("zero", "sigma_min"):
            raise StreamexecError(f"final_sigmas_type {kind!r}: use zero or sigma_min")
        return float(table[0]) if kind == "sigma_min" else 0.0

    def _alpha_prev(self, t: int) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _ddpm_add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        ac = self.alphas_cumprod[int(self.timesteps[i])]
        return np.sqrt(ac) * as_f32(x0) + np.sqrt(F32(1) - ac) * as_f32(noise)
