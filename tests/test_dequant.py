"""Block-weight dequantization (kernels/dequant.py) against references: ``gguf.quants.dequantize``
for every GGUF type (bit-exact), and NF4 / scaled fp8 against references written here from the
formats' descriptions. Panels (row ranges, block-aligned column ranges) equal the same slice of
the reference."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from _quant_files import BNB_NF4, K_QUANTS, QUANTIZABLE, nf4_reference, random_blocks, stored, write_gguf

from streamexec.kernels.decode import decode_block_to_f32, decode_to_f32
from streamexec.kernels.dequant import PackedWeight, check_weight
from streamexec.kernels.qtypes import NF4_LEVELS, QTYPES
from streamexec.weights.gguf_file import GGUFFile

GT = gguf.GGMLQuantizationType
GGUF_BLOCK = [t for t in [*QUANTIZABLE, *K_QUANTS] if t != "BF16"]
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def check_panels(w: PackedWeight, ref: np.ndarray) -> None:
    """Full decode, row panels and block-aligned column blocks all equal the reference bits."""
    n, k = ref.shape
    assert w.shape == (n, k)
    np.testing.assert_array_equal(bits(w.decode()), bits(ref))
    np.testing.assert_array_equal(bits(decode_to_f32(w, w.tag)), bits(ref))
    blk = QTYPES[w.tag].block if w.tag != "NF4" else 1
    for a, b in [(0, 1), (1, n), (n // 2, n), (n - 1, n)]:
        out = np.full((b - a, k), np.nan, np.float32)
        decode_to_f32(w[a:b], w.tag, out)
        np.testing.assert_array_equal(bits(out), bits(ref[a:b]))
        for c0, c1 in [(0, k), (blk, k), (0, k - blk), (k // blk // 2 * blk, k)]:
            if c1 <= c0:
                continue
            got = decode_block_to_f32(w[a:b], w.tag, c0, c1, np.empty((b - a) * (c1 - c0), np.float32))
            np.testing.assert_array_equal(bits(got), bits(ref[a:b, c0:c1]).reshape(-1))


def test_gguf_files_decode_bit_exactly_like_gguf(tmp_path: Path) -> None:
    """Files written by gguf.GGUFWriter (quantized by gguf.quants; K-quants as random blocks with
    valid scales), read by our reader, decoded panel by panel == gguf.quants.dequantize."""
    rng = np.random.default_rng(0)
    tensors = {}
    for tag in [*QUANTIZABLE, *K_QUANTS, "F16"]:
        k = 512 if tag in K_QUANTS else 96
        arr = stored(tag, (7, k), rng)
        if tag in QUANTIZABLE and tag != "BF16":  # a zero row and a huge row quantize too
            x = rng.standard_normal((7, k)).astype(np.float32)
            x[2] = 0
            x[3] *= 1e4
            arr = gguf.quants.quantize(x, GT[tag])
        tensors[f"w.{tag}"] = (arr, tag)
    path = tmp_path / "q.gguf"
    write_gguf(path, tensors)
    with GGUFFile(path) as f:
        for name, (_, tag) in tensors.items():
            raw = f.view(name)
            ref = gguf.quants.dequantize(raw.view(np.uint8) if tag in ("BF16", "F16") else raw, GT[tag])
            ref = ref.reshape(f.info(name).shape)
            if tag in ("BF16", "F16"):  # plain types: the existing decode, same reference
                np.testing.assert_array_equal(bits(decode_to_f32(raw, tag)), bits(ref))
                continue
            check_panels(PackedWeight.gguf(raw, tag), ref)


@pytest.mark.parametrize("tag", GGUF_BLOCK)
def test_random_blocks_with_any_finite_scale(tag: str) -> None:
    """Every bit pattern of the quants with scales over the whole finite f16 range (subnormals,
    zero, negative, 65504)."""
    rng = np.random.default_rng(1)
    q = QTYPES[tag]
    rows, nb = 6, 3
    b = rng.integers(0, 256, (rows * nb, q.block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[tag]:
        h = rng.integers(0, 0x7C00, rows * nb, dtype=np.uint16) | (rng.integers(0, 2, rows * nb, dtype=np.uint16) << 15)
        h[:3] = [0x0001, 0x8000, 0x7BFF]  # smallest subnormal, -0, largest finite
        b[:, off : off + 2] = h.view(np.uint8).reshape(-1, 2)
    raw = b.reshape(rows, -1)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = gguf.quants.dequantize(raw, GT[tag])
    check_panels(PackedWeight.gguf(raw, tag), ref)


def test_k_quants_from_random_blocks_helper() -> None:
    """The test helper's blocks really have finite, modest scales (else the file test is weak)."""
    rng = np.random.default_rng(2)
    for tag in K_QUANTS:
        ref = gguf.quants.dequantize(random_blocks(tag, 4, rng), GT[tag])
        assert np.isfinite(ref).all() and 0 < np.abs(ref).max() < 100


# -- NF4 (bitsandbytes) ----------------------------------------------------------------------------
def test_nf4_levels_match_bitsandbytes() -> None:
    np.testing.assert_array_equal(NF4_LEVELS, BNB_NF4)


@pytest.mark.parametrize("shape, blocksize", [((6, 128), 64), ((5, 100), 64), ((3, 256), 128), ((1, 64), 64)])
def test_nf4_against_reference(shape, blocksize) -> None:
    rng = np.random.default_rng(3)
    numel = shape[0] * shape[1]
    codes = rng.integers(0, 256, (numel + 1) // 2, dtype=np.uint8)
    absmax = (rng.random(-(-numel // blocksize)) * 3).astype(np.float32)
    w = PackedWeight.nf4(codes, absmax, BNB_NF4, shape, blocksize)
    check_panels(w, nf4_reference(codes, absmax, shape, blocksize))


def test_nf4_nested_absmax() -> None:
    rng = np.random.default_rng(4)
    shape = (40, 512)  # 320 blocks: two nested blocks of 256 (the last one partial)
    codes = rng.integers(0, 256, shape[0] * shape[1] // 2, dtype=np.uint8)
    a_codes = rng.integers(0, 256, 320, dtype=np.uint8)
    code2 = np.sort(rng.uniform(-1, 1, 256)).astype(np.float32)
    absmax2 = rng.uniform(0.5, 2, 2).astype(np.float32)
    nested = (code2, absmax2, 256, 0.0371)
    w = PackedWeight.nf4(codes, a_codes, BNB_NF4, shape, 64, nested)
    check_panels(w, nf4_reference(codes, a_codes, shape, 64, nested))


# -- ComfyUI scaled fp8 ----------------------------------------------------------------------------
@pytest.mark.parametrize("per_row", [False, True])
def test_scaled_fp8_against_torch(per_row: bool) -> None:
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, (9, 48), dtype=np.uint8)
    raw[raw & 0x7F == 0x7F] = 0  # no NaN patterns (compared separately by the fp8 decode tests)
    scale = rng.uniform(0.001, 3, 9 if per_row else 1).astype(np.float32)
    t = torch.from_numpy(raw).view(torch.float8_e4m3fn).float() * torch.from_numpy(scale.reshape(-1, 1))
    check_panels(PackedWeight.scaled_fp8(raw, scale), t.numpy())


# -- bad input -------------------------------------------------------------------------------------
def test_bad_packed_weights_are_refused() -> None:
    raw = np.zeros((4, 34 * 2), np.uint8)
    w = PackedWeight.gguf(raw, "Q8_0")
    assert w.shape == (4, 64) and w[1:3].shape == (2, 64) and w[3:1].shape == (0, 64)
    with pytest.raises(ValueError, match="blocks"):
        w.decode(np.empty((4, 16), np.float32), 8, 24)
    with pytest.raises(ValueError, match="not whole 34-byte blocks"):
        PackedWeight.gguf(np.zeros((4, 35), np.uint8), "Q8_0")
    with pytest.raises(ValueError, match="not a GGUF block type"):
        PackedWeight.gguf(raw, "NF4")
    with pytest.raises(TypeError, match="packed as Q8_0"):
        decode_to_f32(w, "Q4_0")
    with pytest.raises(TypeError, match="packed as Q8_0"):
        check_weight(w, "BF16")
    with pytest.raises(ValueError, match="block types come as PackedWeight"):
        check_weight(raw, "Q8_0")
    with pytest.raises(ValueError, match="absmax must have 2"):
        PackedWeight.nf4(np.zeros(64, np.uint8), np.ones(3, np.float32), BNB_NF4, (2, 64))
    with pytest.raises(ValueError, match="16 levels"):
        PackedWeight.nf4(np.zeros(64, np.uint8), np.ones(2, np.float32), BNB_NF4[:8], (2, 64))
    with pytest.raises(ValueError, match="not finite"):
        PackedWeight.scaled_fp8(np.zeros((2, 4), np.uint8), np.float32("inf"))
    with pytest.raises(ValueError, match="1 or 2 entries"):
        PackedWeight.scaled_fp8(np.zeros((2, 4), np.uint8), np.ones(3, np.float32))
