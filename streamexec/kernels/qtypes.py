"""Quantized (block) weight types: how many weights a block holds and how many bytes it takes.

The storage half of ggml's ``type_traits`` table (block size, bytes per block); the ``to_float``
half — the dequantizing kernels — lives in ``streamexec.kernels.dequant`` under the same tags.
No numba here: the checkpoint readers size and validate tensors with this table alone.

A block type stores a row of K weights (K along the last dimension, the GEMM's reduction axis) as
K / block consecutive blocks; a tensor of numpy shape [..., K] takes ``rows * K / block * bytes``.
F32/F16/BF16 are the trivial one-weight blocks. Two types come from safetensors files, not GGUF:
bitsandbytes NF4 (64 weights in 32 bytes of packed codes, plus one f32 absmax per block stored
in a separate tensor) and ComfyUI scaled fp8 (one e4m3 byte per weight, plus one f32 scale per
tensor or per row, stored separately); ``aux_bytes`` counts those side tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QType:
    """One stored weight type: ``block`` weights in ``block_bytes`` bytes."""

    tag: str
    ggml_id: int | None  # the type number in a GGUF tensor info (None: not a GGUF type)
    block: int
    block_bytes: int
    storage: np.dtype  # dtype of the raw view: float32/float16/uint16 for plain types, uint8 for blocks

    @property
    def is_block(self) -> bool:
        """True for packed block types (stored as uint8 rows; decoded by ``kernels.dequant``)."""
        return self.block > 1 or self.storage == np.uint8

    def row_bytes(self, k: int) -> int:
        """Bytes of one row of ``k`` weights (``k`` must be a multiple of ``block``; NF4, which
        bitsandbytes packs over the flattened tensor, only needs an even ``k``)."""
        if self.tag == "NF4" and k % 2 == 0:
            return k // 2
        if k % self.block:
            raise ValueError(f"{self.tag} rows must hold a multiple of {self.block} weights, got {k}")
        return k // self.block * self.block_bytes

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of numpy ``shape`` (the block data only, see ``aux_bytes``)."""
        if self.tag == "NF4":
            return (int(np.prod(shape, dtype=np.int64)) + 1) // 2
        if not shape:
            return self.row_bytes(1)
        rows = 1
        for s in shape[:-1]:
            rows *= s
        return rows * self.row_bytes(shape[-1])


def _q(tag: str, ggml_id: int | None, block: int, nbytes: int, storage: str = "u1") -> QType:
    return QType(tag, ggml_id, block, nbytes, np.dtype(storage).newbyteorder("<"))


QK_K = 256  # weights per K-quant super-block

#: Every weight type the kernels decode, by tag. GGUF sizes as in ggml's ``ggml-common.h``.
QTYPES: dict[str, QType] = {
    q.tag: q
    for q in (
        _q("F32", 0, 1, 4, "f4"),
        _q("F16", 1, 1, 2, "f2"),
        _q("BF16", 30, 1, 2, "u2"),
        _q("Q4_0", 2, 32, 2 + 16),  # d f16, 32 x 4-bit
        _q("Q4_1", 3, 32, 2 + 2 + 16),  # d, m f16, 32 x 4-bit
        _q("Q5_0", 6, 32, 2 + 4 + 16),  # d, 32 high bits, 32 x 4-bit
        _q("Q5_1", 7, 32, 2 + 2 + 4 + 16),
        _q("Q8_0", 8, 32, 2 + 32),  # d, 32 x int8
        _q("Q2_K", 10, QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),  # 84
        _q("Q3_K", 11, QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),  # 110
        _q("Q4_K", 12, QK_K, 2 + 2 + 12 + QK_K // 2),  # 144
        _q("Q5_K", 13, QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),  # 176
        _q("Q6_K", 14, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # 210
        _q("NF4", None, 64, 32),  # bitsandbytes: packed codes; absmax per block stored aside
        _q("F8_E4M3_SCALED", None, 1, 1),  # ComfyUI: e4m3 bytes; f32 scale stored aside
    )
}

#: GGUF type number -> tag, for the types we decode.
GGUF_TYPES: dict[int, QType] = {q.ggml_id: q for q in QTYPES.values() if q.ggml_id is not None}

#: Names of the other ggml types (to name them in an error, not to read them).
GGML_OTHER_NAMES: dict[int, str] = {
    9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}

#: The 16 NF4 levels (bitsandbytes ``get_4bit_type("nf4")``): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)


def aux_bytes(tag: str, rows: int, k: int, *, nested: bool = False) -> int:
    """Bytes of the side tensors a ``rows`` x ``k`` panel reads besides its blocks: NF4's absmax
    (f32 per 64 weights, or one uint8 code each when ``nested``), scaled fp8's f32 scale per row
    (an upper bound: most files have one scale per tensor)."""
    if tag == "NF4":
        return -(-rows * k // 64) * (1 if nested else 4)
    if tag == "F8_E4M3_SCALED":
        return 4 * rows
    return 0


def panel_bytes(tag: str, rows: int, k: int) -> tuple[int, int]:
    """(stored, decoded) bytes of a panel of ``rows`` output features x ``k`` weights: what the
    panel decode reads from the mapping, and the f32 scratch it writes (0 for F32: not decoded).
    ``k`` must be a multiple of the type's block size."""
    q = QTYPES[tag]
    stored = rows * q.row_bytes(k) + aux_bytes(tag, rows, k)
    return stored, 0 if tag == "F32" else 4 * rows * k
