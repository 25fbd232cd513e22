"""Quantized test weights. GGUF files written by ``gguf.GGUFWriter`` (GGML's own writer),
quantized by ``gguf.quants`` where it can (the K-quants, which gguf only dequantizes, as random
blocks); the NF4 reference written from the bitsandbytes format description."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from streamexec.kernels.qtypes import QTYPES

GT = gguf.GGMLQuantizationType
# types gguf.quants can quantize (the K-quants it only dequantizes: random blocks instead)
QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def random_blocks(tag: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """``n_blocks`` blocks of random bytes whose f16 scales (d, dmin) are finite and modest."""
    q = QTYPES[tag]
    b = rng.integers(0, 256, (n_blocks, q.block_bytes), dtype=np.uint8)
    f16_fields = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[tag]
    for off in f16_fields:
        b[:, off : off + 2] = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, str]], kv: dict | None = None,
               alignment: int | None = None, arch: str = "flux") -> None:
    """Write with ``gguf.GGUFWriter``: tensors as (stored array, tag) — block types as uint8 rows."""
    w = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for k, (v, t) in (kv or {}).items():
        w.add_key_value(k, v, t, sub_type=None)
    for name, (arr, tag) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=GT[tag])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def stored(tag: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A tensor of numpy ``shape`` in its stored representation, written by gguf where it can."""
    if tag in K_QUANTS:
        rows = int(np.prod(shape[:-1]))
        b = random_blocks(tag, rows * shape[-1] // QTYPES[tag].block, rng)
        return b.reshape(*shape[:-1], -1)
    x = rng.standard_normal(shape).astype(np.float32)
    if tag == "F32":
        return x
    if tag == "F16":
        return x.astype(np.float16)
    return gguf.quants.quantize(x, GT[tag])


# The 16 NF4 levels as bitsandbytes ships them (functional.get_4bit_type("nf4"), the constants in
# its CUDA dDequantizeNF4): written out here, independently of streamexec's copy.
BNB_NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def nf4_reference(codes, absmax, shape, blocksize=64, nested=None) -> np.ndarray:
    """bitsandbytes dequantize_4bit: the flattened tensor, two codes per byte with the first
    weight in the high nibble (kDequantizeBlockwise: vals[2j] = q >> 4, vals[2j+1] = q & 15),
    times the f32 absmax of its block; nested: absmax = code2[a] * absmax2[block // bs2], then
    += offset (dequantize_blockwise, then the separate add)."""
    numel = shape[0] * shape[1]
    idx = np.stack([codes >> 4, codes & 15], axis=-1).reshape(-1)[:numel]
    if nested is not None:
        code2, absmax2, bs2, offset = nested
        am = code2[absmax] * absmax2[np.arange(absmax.size) // bs2]
        absmax = (am + np.float32(offset)).astype(np.float32)
    return (BNB_NF4[idx] * np.repeat(absmax, blocksize)[:numel]).reshape(shape)
