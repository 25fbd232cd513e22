"""kernels.linear with block weights (GGUF types, NF4, scaled fp8) against numpy on the weight
dequantized by the reference (gguf.quants / the bitsandbytes description / torch): the same
panel decode and threading paths as bf16 weights, no full-size f32 copy."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from _quant_files import BNB_NF4, K_QUANTS, nf4_reference, random_blocks

from streamexec.kernels.dequant import PackedWeight
from streamexec.kernels.linear import gated_gelu, geglu, linear
from streamexec.kernels.qtypes import QTYPES, panel_bytes

GT = gguf.GGMLQuantizationType
TAGS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", *K_QUANTS, "NF4", "F8_E4M3_SCALED"]


def make_weight(tag: str, n: int, k: int, rng: np.random.Generator) -> tuple[PackedWeight, np.ndarray]:
    """A packed [n, k] weight and its reference-dequantized f32 copy (computed by the reference)."""
    if tag in K_QUANTS:
        raw = random_blocks(tag, n * k // 256, rng).reshape(n, -1)
        return PackedWeight.gguf(raw, tag), gguf.quants.dequantize(raw, GT[tag])
    if tag in QTYPES and QTYPES[tag].ggml_id is not None:
        raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, GT[tag])
        return PackedWeight.gguf(raw, tag), gguf.quants.dequantize(raw, GT[tag])
    if tag == "NF4":
        codes = rng.integers(0, 256, n * k // 2, dtype=np.uint8)
        absmax = rng.uniform(0.01, 0.1, -(-n * k // 64)).astype(np.float32)
        return PackedWeight.nf4(codes, absmax, BNB_NF4, (n, k)), nf4_reference(codes, absmax, (n, k))
    raw = rng.integers(0, 256, (n, k), dtype=np.uint8)
    raw[raw & 0x7F == 0x7F] = 0x38  # no NaN patterns
    ref = torch.from_numpy(raw).view(torch.float8_e4m3fn).float().numpy() * np.float32(0.02)
    return PackedWeight.scaled_fp8(raw, np.float32(0.02)), ref


def gelu(h: np.ndarray, approximate: str = "none") -> np.ndarray:
    return torch.nn.functional.gelu(torch.from_numpy(h), approximate=approximate).numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("tag", TAGS)
def test_linear_serial_matches_numpy_on_reference_weight(tag: str) -> None:
    rng = np.random.default_rng(0)
    w, ref = make_weight(tag, 96, 512, rng)
    x = rng.standard_normal((37, 512)).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    want = x.astype(np.float64) @ ref.T.astype(np.float64) + b
    got = linear(x, w, tag, b, panel_rows=40, workers=1)  # 3 panels, the last one short
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("tag", ["Q8_0", "Q4_K", "Q6_K", "NF4"])
def test_linear_threaded_column_and_row_splits(tag: str) -> None:
    rng = np.random.default_rng(1)
    # columns split over 2 workers, several panels each (T5/FLUX-like: wide W)
    w, ref = make_weight(tag, 640, 2048, rng)
    x = rng.standard_normal((24, 2048)).astype(np.float32)
    got = linear(x, w, tag, panel_rows=96, workers=2, activation="gelu_tanh")
    want = gelu(x.astype(np.float64) @ ref.T.astype(np.float64), "tanh")
    assert rel_err(got, want) <= 1e-5
    # rows split (tall x, SD-like): W decoded once into the workers' scratch, panel by panel
    w, ref = make_weight(tag, 256, 512, rng)
    x = rng.standard_normal((1100, 512)).astype(np.float32)
    res = rng.standard_normal((1100, 256)).astype(np.float32)
    got = linear(x, w, tag, residual=res, workers=2)
    assert rel_err(got, x.astype(np.float64) @ ref.T.astype(np.float64) + res) <= 1e-5


def test_gated_products_slice_packed_weights() -> None:
    rng = np.random.default_rng(2)
    w, ref = make_weight("Q4_K", 2 * 192, 512, rng)
    x = rng.standard_normal((20, 512)).astype(np.float32)
    h = x.astype(np.float64) @ ref.T.astype(np.float64)
    a, g = h[:, :192], h[:, 192:]
    assert rel_err(geglu(x, w, "Q4_K", panel_rows=64), a * gelu(g)) <= 1e-5
    w1, ref1 = make_weight("Q8_0", 192, 512, rng)
    w0 = w[:192]
    h0 = x.astype(np.float64) @ ref[:192].T.astype(np.float64)
    h1 = x.astype(np.float64) @ ref1.T.astype(np.float64)
    want = gelu(h0, "tanh") * h1
    assert rel_err(gated_gelu(x, w0, w1, "Q4_K", w1_dtype="Q8_0"), want) <= 1e-5


def test_linear_refuses_a_packed_weight_under_another_tag() -> None:
    w, _ = make_weight("Q8_0", 8, 64, np.random.default_rng(3))
    with pytest.raises(TypeError, match="packed as Q8_0"):
        linear(np.zeros((2, 64), np.float32), w, "Q4_0")
    with pytest.raises(ValueError, match="x has K=32"):
        linear(np.zeros((2, 32), np.float32), w, "Q8_0")


def test_panel_bytes_formula() -> None:
    """Stored bytes of a panel = what its rows' blocks take in the file (checked against the
    views), decoded = the f32 scratch linear uses."""
    rng = np.random.default_rng(4)
    for tag in ["Q8_0", "Q4_K", "Q6_K", "Q5_1"]:
        w, _ = make_weight(tag, 64, 512, rng)
        assert panel_bytes(tag, 16, 512) == (w[0:16].nbytes, 16 * 512 * 4)
        assert w[0:16].nbytes == 16 * gguf.quants.quant_shape_to_byte_shape((16, 512), GT[tag])[1]
    assert panel_bytes("NF4", 16, 512) == (16 * 256 + 16 * 512 // 64 * 4, 16 * 512 * 4)
    assert panel_bytes("F32", 16, 512) == (16 * 512 * 4, 0)
