"""The safetensors dtype tags streamexec reads, and how each is stored in memory.

Tensors are handed out in their *stored* representation: bf16 as uint16 bit patterns, fp8 as
uint8 bytes, f16 as numpy float16. Decoding to f32 is the kernels' job (``streamexec.kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    """One safetensors dtype tag: its item size and the numpy dtype used for raw views."""

    tag: str
    itemsize: int
    storage: np.dtype
    is_float: bool


def _d(tag: str, storage: str, is_float: bool) -> DType:
    st = np.dtype(storage).newbyteorder("<")
    return DType(tag, st.itemsize, st, is_float)


DTYPES: dict[str, DType] = {
    d.tag: d
    for d in (
        _d("F64", "f8", True),
        _d("F32", "f4", True),
        _d("F16", "f2", True),
        _d("BF16", "u2", True),  # raw bit patterns; high half of an f32
        _d("F8_E4M3", "u1", True),  # float8 e4m3fn (no inf, one NaN pattern)
        _d("F8_E5M2", "u1", True),
        _d("I64", "i8", False),
        _d("I32", "i4", False),
        _d("I16", "i2", False),
        _d("I8", "i1", False),
        _d("U64", "u8", False),
        _d("U32", "u4", False),
        _d("U16", "u2", False),
        _d("U8", "u1", False),
        _d("BOOL", "?", False),
    )
}

#: Bytes of one f32, the dtype all math runs in: activations, decoded panels and kernel scratch are
#: sized with it.
F32_BYTES = DTYPES["F32"].itemsize
