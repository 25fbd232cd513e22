"""GGUF test files: written by ``gguf.GGUFWriter`` (GGML's own writer), quantized by
``gguf.quants`` where it can; the K-quants, which gguf only dequantizes, as random blocks."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from streamexec.weights.qtypes import QTYPES

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
