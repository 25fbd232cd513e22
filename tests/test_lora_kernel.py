"""LoRA factors merged into each decoded panel of ``linear`` (kernels/lora.py, issue #18):
the product equals x @ (W + Σ s_i U_i D_i).T computed densely in float64."""

from __future__ import annotations

import numpy as np
import pytest

from streamexec.kernels.dequant import PackedWeight
from streamexec.kernels.linear import geglu, linear
from streamexec.kernels.lora import LoraWeight, lora_factor_bytes, lora_scratch_bytes


def _factors(n: int, k: int, ranks: list[int], scales: list[float], seed: int):
    g = np.random.default_rng(seed)
    return [(g.standard_normal((n, r)).astype(np.float32) * 0.1, g.standard_normal((r, k)).astype(np.float32) * 0.1, s)
            for r, s in zip(ranks, scales, strict=True)]


def _dense(w_f32: np.ndarray, factors) -> np.ndarray:
    w = w_f32.astype(np.float64)
    for u, d, s in factors:
        w = w + s * (u.astype(np.float64) @ d.astype(np.float64))
    return w


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F8_E4M3_SCALED"])
@pytest.mark.parametrize("shape", [(5, 96, 200), (1100, 64, 48), (3, 40, 1300)])
@pytest.mark.parametrize("workers", [1, 2])
def test_linear_with_lora_matches_dense_merge(dtype: str, shape, workers: int) -> None:
    m, k, n = shape
    g = np.random.default_rng(0)
    w32 = (g.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    if dtype == "F32":
        base, wf = w32, w32
    elif dtype == "F16":
        base = w32.astype(np.float16)
        wf = base.astype(np.float32)
    elif dtype == "BF16":
        base = (w32.view(np.uint32) >> 16).astype(np.uint16)
        wf = (base.astype(np.uint32) << 16).view(np.float32)
    else:
        import torch

        raw = torch.from_numpy(w32 * np.float32(2)).to(torch.float8_e4m3fn)
        base = PackedWeight.scaled_fp8(raw.view(torch.uint8).numpy(), 0.5)
        wf = raw.float().numpy() * 0.5
    factors = _factors(n, k, [4, 2], [0.7, -0.4], 1)
    x = g.standard_normal((m, k)).astype(np.float32)
    ours = linear(x, LoraWeight.of(base, dtype, factors), dtype, panel_rows=32, workers=workers)
    ref = x.astype(np.float64) @ _dense(wf, factors).T
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    # the LoRA changes the result (the test could not pass with the factors ignored)
    plain = x.astype(np.float64) @ wf.astype(np.float64).T
    assert np.abs(plain - ref).max() > 1e-2 * np.abs(ref).max()


def test_geglu_with_lora() -> None:
    g = np.random.default_rng(3)
    m, k, inner = 7, 24, 40
    w = g.standard_normal((2 * inner, k)).astype(np.float16)
    factors = _factors(2 * inner, k, [3], [1.5], 2)
    x = g.standard_normal((m, k)).astype(np.float32)
    ours = geglu(x, LoraWeight.of(w, "F16", factors), "F16")
    h = x.astype(np.float64) @ _dense(w.astype(np.float32), factors).T
    a, gate = h[:, :inner], h[:, inner:]
    from math import erf, sqrt

    ref = a * (0.5 * gate * (1 + np.vectorize(erf)(gate / sqrt(2))))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_lora_weight_refuses_mismatched_factors() -> None:
    w = np.zeros((8, 6), np.float32)
    with pytest.raises(ValueError, match=r"do not fit a weight of shape \(8, 6\)"):
        LoraWeight.of(w, "F32", [(np.zeros((8, 2)), np.zeros((2, 5)), 1.0)])
    with pytest.raises(TypeError, match="F16 was asked for"):
        lw = LoraWeight.of(w, "F32", [(np.zeros((8, 2)), np.zeros((2, 6)), 1.0)])
        linear(np.zeros((1, 6), np.float32), lw, "F16")


def test_lora_sizes() -> None:
    assert lora_factor_bytes(320, 768, 8) == 4 * 8 * (320 + 768)
    assert lora_scratch_bytes(320, 0) == 0
    assert lora_scratch_bytes(10**6, 4) == 4 * 10**6


@pytest.mark.parametrize("dtype", ["F32", "F16"])
@pytest.mark.parametrize("kernel,algo", [(3, "winograd"), (3, "direct"), (1, None)])
def test_conv2d_with_locon_matches_torch(dtype: str, kernel: int, algo) -> None:
    """LoCon (kxk down, 1x1 up) merged into the conv's decoded panels = torch conv with W + s·up@down."""
    import torch

    from streamexec.kernels.conv import conv2d

    g = np.random.default_rng(5)
    cout, cin, r = 24, 16, 3
    w32 = (g.standard_normal((cout, cin, kernel, kernel)) / np.sqrt(cin * kernel * kernel)).astype(np.float32)
    base = w32 if dtype == "F32" else w32.astype(np.float16)
    up = (g.standard_normal((cout, r, 1, 1)) * 0.2).astype(np.float32)
    down = (g.standard_normal((r, cin, kernel, kernel)) * 0.2).astype(np.float32)
    x = g.standard_normal((2, cin, 9, 10)).astype(np.float32)
    pad = kernel // 2
    ours = conv2d(x, LoraWeight.of(base, dtype, [(up, down, 0.6)]), dtype, padding=pad, algo=algo)
    merged = torch.from_numpy(base.astype(np.float32)).double() + 0.6 * torch.einsum(
        "or,rikl->oikl", torch.from_numpy(up[:, :, 0, 0]).double(), torch.from_numpy(down).double())
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), merged, padding=pad).numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    plain = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(base.astype(np.float32)).double(),
                                       padding=pad).numpy()
    assert np.abs(plain - ref).max() > 1e-2 * np.abs(ref).max()
