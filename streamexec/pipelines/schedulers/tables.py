"""The noise tables every DDPM-trained sampler shares: betas, cumulative alphas, the k-diffusion sigma
table, timestep spacings and sigma schedules, in diffusers' dtypes so results agree to float32 rounding.

Timestep spacings (``timestep_spacing``; ``n`` steps over ``T`` training timesteps):

- ``linspace``: ``linspace(0, T-1, n)`` reversed (diffusers' Euler/DPM default);
- ``leading``: ``arange(n) * (T // n) + steps_offset`` reversed (DDIM/PNDM default; SD 1.5's 1, 51, ...);
- ``trailing``: ``round(arange(T, 0, -T/n)) - 1`` (999, 749, ... for 4 steps: what turbo/distilled models
  were trained for, as they start at pure noise);
- ``sgm_uniform`` (sigma samplers only, as stable-diffusion.cpp and ComfyUI name it): fractional
  timesteps ``linspace(T-1, 0, n+1)[:-1]`` and sigmas log-linearly interpolated in the sigma table
  (k-diffusion's ``t_to_sigma``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamexec.errors import StreamexecError

F32 = np.float32
SPACINGS = ("leading", "linspace", "trailing", "sgm_uniform")


def as_f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=F32)


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
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


def betas(p: Mapping[str, Any]) -> np.ndarray:
    """diffusers' float32 beta table."""
    n = int(p["num_train_timesteps"])
    if p["trained_betas"] is not None:
        return np.asarray(p["trained_betas"], dtype=F32)
    schedule = p["beta_schedule"]
    if schedule == "linear":
        return linspace_f32(p["beta_start"], p["beta_end"], n)
    if schedule == "scaled_linear":
        root = linspace_f32(p["beta_start"] ** 0.5, p["beta_end"] ** 0.5, n)
        return root * root
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=F32)
    raise StreamexecError(f"beta_schedule {schedule!r}: use linear, scaled_linear or squaredcos_cap_v2")


def alphas_cumprod(b: np.ndarray) -> np.ndarray:
    # torch.cumprod on CPU accumulates float32 in double, then rounds each element.
    return np.cumprod(F32(1) - b, dtype=np.float64).astype(F32)


def train_sigmas(ac: np.ndarray) -> np.ndarray:
    """k-diffusion's sigma per training timestep, sqrt((1 - alpha_bar) / alpha_bar) (float32)."""
    return np.sqrt((F32(1) - ac) / ac)


def karras(in_sigmas: np.ndarray, steps: int, sigma_min: float | None, sigma_max: float | None) -> np.ndarray:
    """Karras et al. (2022) rho=7 sigmas between the ends of ``in_sigmas`` (float64, as diffusers)."""
    lo = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    hi = sigma_max if sigma_max is not None else in_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = lo ** (1 / rho)
    max_inv_rho = hi ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: Any, log_sigmas: np.ndarray) -> np.ndarray:
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


def spaced_f32(spacing: str, n: int, train: int, steps_offset: int) -> np.ndarray:
    """Euler/EulerAncestral timesteps (float32), ``n`` of ``train``."""
    if spacing == "linspace":
        return np.linspace(0, train - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = train // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
        ts += steps_offset
        return ts
    if spacing == "sgm_uniform":
        return sgm_uniform_timesteps(n, train).astype(np.float32)
    ratio = train / n
    ts = np.arange(train, 0, -ratio).round().copy().astype(np.float32)
    ts -= 1
    return ts


def spaced_int(spacing: str, n: int, train: int, steps_offset: int) -> np.ndarray:
    """DDIM/TCD-style integer timesteps (int64), ``n`` of ``train``."""
    if spacing == "linspace":
        return np.linspace(0, train - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = train // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
        ts += steps_offset
        return ts
    if spacing != "trailing":
        raise StreamexecError(f"timestep_spacing {spacing!r} applies to euler, euler_a and dpmpp_2m only")
    ratio = train / n
    ts = np.round(np.arange(train, 0, -ratio)).astype(np.int64)
    ts -= 1
    return ts


def sgm_uniform_timesteps(n: int, train: int) -> np.ndarray:
    """``linspace(T-1, 0, n+1)[:-1]`` (float64): uniform in t from the noisiest timestep, 0 left out."""
    return (train - 1) * (1.0 - np.arange(n, dtype=np.float64) / n)


def t_to_sigma(t: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Sigma at fractional timesteps ``t``: log-linear interpolation in ``table`` (k-diffusion's
    ``DiscreteSchedule.t_to_sigma``, stable-diffusion.cpp's ``CompVisDenoiser::t_to_sigma``)."""
    t = np.asarray(t, dtype=np.float64)
    low = np.floor(t).astype(np.int64)
    high = np.ceil(t).astype(np.int64)
    w = t - low
    log_table = np.log(table.astype(np.float64))
    return np.exp((1 - w) * log_table[low] + w * log_table[high])
