"""Positional / timestep embeddings and FLUX latent packing, matching diffusers exactly.

* ``timestep_embedding``: diffusers ``get_timestep_embedding`` (sinusoidal; same f32 op order).
* ``rope_freqs`` / ``apply_rope``: FLUX rotary embedding — ``FluxPosEmbed`` (per-axis
  ``get_1d_rotary_pos_embed(..., repeat_interleave_real=True, use_real=True)``, frequencies in
  float64 like diffusers on CPU) and ``apply_rotary_emb(..., use_real=True,
  use_real_unbind_dim=-1)``: interleaved pairs ``(x[2i], x[2i+1])`` rotated by angle i.
  We keep cos/sin un-repeated ([N, D/2]); diffusers' [N, D] tables are these with every column
  repeated twice.
* ``patchify`` / ``unpatchify``: FluxPipeline ``_pack_latents`` / ``_unpack_latents`` (2x2
  patches, channel-major inside a token) and ``latent_image_ids`` (``_prepare_latent_image_ids``).

Small tensors are computed with numpy; ``apply_rope`` (run on every q/k of every block) is a
Numba kernel working in place on C-contiguous float32 [N, H, D].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numba import njit, prange

from streamexec.kernels._serial import run as _run
from streamexec.kernels.decode import readonly_flat

__all__ = [
    "timestep_embedding",
    "rope_freqs",
    "apply_rope",
    "patchify",
    "unpatchify",
    "latent_image_ids",
]


def timestep_embedding(
    t: np.ndarray | Sequence[float] | float,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> np.ndarray:
    """Sinusoidal timestep embedding [B, dim] float32, as diffusers ``get_timestep_embedding``.

    SD 1.5 UNet: ``flip_sin_to_cos=True, downscale_freq_shift=0``; FLUX (``Timesteps(256, True,
    0)``, fed ``t * 1000``) likewise.  Computed in float32 in the same order as diffusers;
    sin/cos are evaluated in float64 on the float32 argument and rounded (torch's f32 sin/cos are
    within 1 ulp of that).
    """
    t = np.atleast_1d(np.asarray(t))
    if t.ndim != 1:
        raise ValueError("timesteps must be a 1-D array")
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - downscale_freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    emb = t.astype(np.float32)[:, None] * freqs[None, :]
    emb = np.float32(scale) * emb
    arg = emb.astype(np.float64)
    out = np.concatenate([np.sin(arg), np.cos(arg)], axis=-1).astype(np.float32)
    if flip_sin_to_cos:
        out = np.concatenate([out[:, half:], out[:, :half]], axis=-1)
    if dim % 2 == 1:
        out = np.pad(out, ((0, 0), (0, 1)))
    return np.ascontiguousarray(out)


def rope_freqs(
    ids: np.ndarray, axes_dim: Sequence[int] = (16, 56, 56), theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    """FLUX rotary tables from position ids [N, n_axes] -> (cos, sin), each float32 [N, D/2].

    Axis a contributes ``axes_dim[a] / 2`` frequencies ``1 / theta**(2j / axes_dim[a])`` applied
    to ``ids[:, a]`` (as float32, like diffusers' ``ids.float()``), in float64, then rounded to
    float32.  D = sum(axes_dim) = 128 for FLUX.1.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != len(axes_dim):
        raise ValueError(f"ids must be [N, {len(axes_dim)}], got {ids.shape}")
    pos = ids.astype(np.float32).astype(np.float64)
    cos_parts, sin_parts = [], []
    for a, d in enumerate(axes_dim):
        if d % 2:
            raise ValueError(f"axes_dim entries must be even, got {d}")
        freqs = 1.0 / (float(theta) ** (np.arange(0, d, 2, dtype=np.float64)[: d // 2] / d))
        ang = np.outer(pos[:, a], freqs)
        cos_parts.append(np.cos(ang))
        sin_parts.append(np.sin(ang))
    cos = np.ascontiguousarray(np.concatenate(cos_parts, axis=-1), dtype=np.float32)
    sin = np.ascontiguousarray(np.concatenate(sin_parts, axis=-1), dtype=np.float32)
    return cos, sin


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _rope_kernel(x, cos, sin, n, h, d):
    half = d // 2
    for item in prange(n * h):
        tok = item // h
        c = cos[tok * half : (tok + 1) * half]
        s = sin[tok * half : (tok + 1) * half]
        v = x[item * d : (item + 1) * d]
        for i in range(half):
            x0 = v[2 * i]
            x1 = v[2 * i + 1]
            # diffusers: x * cos + rotate(x) * sin with rotate(x)[2i] = -x[2i+1],
            # rotate(x)[2i+1] = x[2i]; same f32 products and sums, same order
            v[2 * i] = x0 * c[i] + (-x1) * s[i]
            v[2 * i + 1] = x1 * c[i] + x0 * s[i]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate interleaved pairs of x [N, H, D] (float32, C-contiguous) in place; returns x.

    ``cos``/``sin`` are [N, D/2] from ``rope_freqs`` (token n uses row n for every head).
    """
    if x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim != 3:
        raise TypeError(f"x must be a C-contiguous float32 [N, H, D] array, got {x.shape}")
    if not x.flags.writeable:
        raise ValueError("x must be writable (rotated in place)")
    n, h, d = x.shape
    if d % 2 or cos.shape != (n, d // 2) or sin.shape != (n, d // 2):
        raise ValueError(f"cos/sin must be [{n}, {d // 2}], got {cos.shape} / {sin.shape}")
    if x.size:
        c = readonly_flat(np.ascontiguousarray(cos, dtype=np.float32))
        s = readonly_flat(np.ascontiguousarray(sin, dtype=np.float32))
        _run(_rope_kernel, x.size, x.reshape(-1), c, s, n, h, d)
    return x


def patchify(latents: np.ndarray) -> np.ndarray:
    """[B, C, H, W] -> [B, (H/2)*(W/2), 4C] as FluxPipeline ``_pack_latents``.

    Token index = (row // 2) * (W/2) + col // 2; feature index = c*4 + dy*2 + dx.
    """
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height/width must be even, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(b, (h // 2) * (w // 2), c * 4))


def unpatchify(tokens: np.ndarray, height: int, width: int) -> np.ndarray:
    """[B, (H/2)*(W/2), 4C] -> [B, C, H, W]; inverse of ``patchify``.

    ``height``/``width`` are the *latent* sizes H, W (diffusers' ``_unpack_latents`` takes pixel
    sizes and computes ``H = 2 * (height // (vae_scale_factor * 2))``).
    """
    b, n, ch = tokens.shape
    if height % 2 or width % 2 or ch % 4 or n != (height // 2) * (width // 2):
        raise ValueError(f"cannot unpack {tokens.shape} into a {height}x{width} latent")
    x = tokens.reshape(b, height // 2, width // 2, ch // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(x.reshape(b, ch // 4, height, width))


def latent_image_ids(h2: int, w2: int) -> np.ndarray:
    """FLUX image position ids [h2*w2, 3] float32: (0, row, col) per packed token.

    ``h2, w2`` are the packed grid sizes (latent H/2, W/2), as FluxPipeline
    ``_prepare_latent_image_ids(batch, height // 2, width // 2)``.  Text ids are all zeros.
    """
    ids = np.zeros((h2, w2, 3), dtype=np.float32)
    ids[..., 1] = np.arange(h2, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w2, dtype=np.float32)[None, :]
    return ids.reshape(h2 * w2, 3)
