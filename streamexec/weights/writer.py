"""A streaming safetensors writer: tensors are produced one at a time and written straight to
disk, so a 24 GB checkpoint never needs 24 GB of RAM. The output is readable by the
``safetensors`` package (tests check that)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dtypes import DTYPES

ALIGN = 8


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its key, dtype tag, shape, and a function producing its bytes.

    ``produce(write)`` must call ``write(array)`` one or more times with numpy arrays whose
    bytes, concatenated, are exactly the tensor's bytes (so big tensors can be made in pieces).
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[Callable[[np.ndarray], None]], None]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for s in self.shape:
            n *= s
        return n


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[PendingTensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write tensors to ``path`` atomically (temp file + rename); returns the file size."""
    items = list(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in items:
        header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for t in items:
                written = 0

                def write(a: np.ndarray, _t: PendingTensor = t) -> None:
                    nonlocal written
                    b = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
                    if written + b.size > _t.nbytes:
                        raise ValueError(f"{_t.key}: produced more than {_t.nbytes} bytes")
                    f.write(memoryview(b))
                    written += b.size

                t.produce(write)
                if written != t.nbytes:
                    raise ValueError(f"{t.key}: produced {written} bytes, expected {t.nbytes}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def from_array(key: str, array: np.ndarray, dtype: str | None = None) -> PendingTensor:
    """A PendingTensor for an in-memory array (dtype tag inferred from numpy when omitted)."""
    tag = dtype or _TAG_OF.get(array.dtype.str.lstrip("<>|="))
    if tag is None:
        raise ValueError(f"{key}: give a dtype tag for numpy dtype {array.dtype}")
    if array.dtype.itemsize != DTYPES[tag].itemsize:
        raise ValueError(f"{key}: numpy dtype {array.dtype} does not store {tag}")
    return PendingTensor(key, tag, tuple(array.shape), lambda w: w(array))


_TAG_OF = {
    "f8": "F64", "f4": "F32", "f2": "F16", "i8": "I64", "i4": "I32", "i2": "I16", "i1": "I8",
    "u8": "U64", "u4": "U32", "u2": "U16", "u1": "U8", "b1": "BOOL",
}
