"""Dequantize block weights (GGUF Q*_0/Q*_1/K-quants, bitsandbytes NF4, ComfyUI scaled fp8) into
f32 panels — the ``to_float`` half of ggml's ``type_traits`` (sizes: ``kernels.qtypes``).

A weight [N, K] in a block type is a ``PackedWeight``: the stored bytes (zero-copy views of the
mapped file) plus its side tensors (NF4 absmax and levels, the fp8 scale). Row slices are
views too, so ``kernels.linear`` handles it exactly like a bf16 array: it slices a panel of
output rows and calls ``decode_to_f32(panel, tag, scratch)``, which lands here and decodes those
rows — all of K, or a block-aligned column range — into the caller's f32 scratch. No full-size
f32 copy ever exists.

The Numba kernels and the block layouts they decode are in ``kernels/quant_kernels.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streamexec.kernels.decode import DECODE_TAGS, readonly_flat
from streamexec.kernels.lora import LoraWeight
from streamexec.kernels.qtypes import QTYPES
from streamexec.kernels.quant_kernels import GGUF_KERNELS, fp8_scaled_rows, nf4_rows

__all__ = ["PackedWeight", "BLOCK_TAGS", "check_weight", "dequantize_rows"]

#: Every tag a ``PackedWeight`` may carry (plain F32/F16/BF16/FP8 stay numpy arrays: ``decode``).
BLOCK_TAGS = frozenset({*GGUF_KERNELS, "NF4", "F8_E4M3_SCALED"})

_EMPTY = np.empty(0, np.float32)
_EMPTY.flags.writeable = False


def _ro(a: np.ndarray, dtype) -> np.ndarray:
    """Flat read-only view (a copy only when the dtype differs): one Numba specialisation."""
    return readonly_flat(np.ascontiguousarray(a, dtype=dtype))


@dataclass(frozen=True)
class PackedWeight:
    """A weight [N, K] stored in a block type (``BLOCK_TAGS``), seen by the kernels as a 2-D
    array: ``shape`` is the logical [rows, K]; ``w[a:b]`` is a view of rows a..b (no copy).

    Build one with ``gguf`` (GGUF block rows), ``nf4`` or ``scaled_fp8``; the arrays are kept
    as they are (zero-copy views of the mapped file stay views)."""

    tag: str
    data: np.ndarray  # flat read-only uint8: all rows' bytes
    shape: tuple[int, int]
    row0: int = 0  # first row of this view within ``data``
    aux: dict = field(default_factory=dict)

    ndim = 2

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def gguf(cls, raw: np.ndarray, tag: str, k: int | None = None) -> PackedWeight:
        """GGUF blocks ``raw`` (uint8 [N, row bytes], e.g. ``GGUFFile.view``) of type ``tag``."""
        q = QTYPES.get(tag)
        if tag not in GGUF_KERNELS or q is None:
            raise ValueError(f"{tag!r} is not a GGUF block type; known: {sorted(GGUF_KERNELS)}")
        if raw.dtype != np.uint8 or raw.ndim != 2:
            raise TypeError(f"GGUF {tag} rows must be a uint8 [N, row bytes] array, got {raw.dtype} {raw.shape}")
        if raw.shape[1] % q.block_bytes:
            raise ValueError(f"{tag} rows of {raw.shape[1]} bytes are not whole {q.block_bytes}-byte blocks")
        kk = raw.shape[1] // q.block_bytes * q.block
        if k is not None and k != kk:
            raise ValueError(f"{tag} rows of {raw.shape[1]} bytes hold {kk} weights, not {k}")
        return cls(tag, readonly_flat(raw), (raw.shape[0], kk))

    @classmethod
    def nf4(cls, codes: np.ndarray, absmax: np.ndarray, quant_map: np.ndarray, shape: tuple[int, int],
            blocksize: int = 64, nested: tuple[np.ndarray, np.ndarray, int, float] | None = None) -> PackedWeight:
        """bitsandbytes NF4: ``codes`` uint8 (two per byte, high nibble first) of the flattened
        [N, K] tensor, ``absmax`` f32 per ``blocksize`` weights (uint8 when ``nested`` =
        (code2 [256] f32, absmax2 f32, blocksize2, offset)), ``quant_map`` the 16 levels."""
        n, k = (int(s) for s in shape)
        nblk = -(-n * k // blocksize)
        if codes.dtype != np.uint8 or codes.size != (n * k + 1) // 2:
            raise ValueError(f"NF4 codes must be {(n * k + 1) // 2} uint8 bytes for {shape}, got {codes.dtype} "
                             f"x {codes.size}")
        if quant_map.size != 16:
            raise ValueError(f"NF4 quant_map must have 16 levels, got {quant_map.size}")
        if absmax.size != nblk:
            raise ValueError(f"NF4 absmax must have {nblk} entries (one per {blocksize} weights), got {absmax.size}")
        aux = {"qmap": _ro(quant_map, np.float32), "bs": int(blocksize)}
        if nested is None:
            if absmax.dtype != np.float32:
                raise TypeError(f"NF4 absmax must be float32 without nested statistics, got {absmax.dtype}")
            aux.update(absmax=_ro(absmax, np.float32), code2=_EMPTY, absmax2=_EMPTY, bs2=1, offset=0.0)
        else:
            code2, absmax2, bs2, offset = nested
            if absmax.dtype != np.uint8 or code2.size != 256 or absmax2.size != -(-nblk // int(bs2)):
                raise ValueError("NF4 nested statistics: absmax must be uint8 codes, code2 256 levels and "
                                 f"absmax2 one per {bs2} blocks")
            aux.update(absmax=_ro(absmax, np.uint8), code2=_ro(code2, np.float32),
                       absmax2=_ro(absmax2, np.float32), bs2=int(bs2), offset=float(np.float32(offset)))
        return cls("NF4", readonly_flat(np.ascontiguousarray(codes)), (n, k), 0, aux)

    @classmethod
    def scaled_fp8(cls, raw: np.ndarray, scale: np.ndarray | float) -> PackedWeight:
        """ComfyUI scaled fp8: e4m3 bytes [N, K] times ``scale`` (f32: one, or one per row)."""
        if raw.dtype != np.uint8 or raw.ndim != 2:
            raise TypeError(f"scaled fp8 weight must be uint8 [N, K] e4m3 bytes, got {raw.dtype} {raw.shape}")
        s = _ro(np.asarray(scale, dtype=np.float32).reshape(-1), np.float32)
        if s.size not in (1, raw.shape[0]):
            raise ValueError(f"fp8 scale must have 1 or {raw.shape[0]} entries, got {s.size}")
        if not np.isfinite(s).all():
            raise ValueError("fp8 scale is not finite")
        return cls("F8_E4M3_SCALED", readonly_flat(raw), raw.shape, 0, {"scale": s})

    # -- the array-like part linear needs ---------------------------------------------------
    def __getitem__(self, sl: slice) -> PackedWeight:
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("a PackedWeight only slices contiguous row ranges")
        a, b, _ = sl.indices(self.shape[0])
        b = max(a, b)
        return PackedWeight(self.tag, self.data, (b - a, self.shape[1]), self.row0 + a, self.aux)

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks these rows read (side tensors not counted)."""
        return self.shape[0] * QTYPES[self.tag].row_bytes(self.shape[1]) if self.tag != "NF4" \
            else (self.shape[0] * self.shape[1] + 1) // 2

    def decode(self, out: np.ndarray | None = None, c0: int = 0, c1: int | None = None) -> np.ndarray:
        """Decode rows x columns ``c0:c1`` (default all of K; GGUF types: whole blocks) into the
        C-contiguous f32 ``out`` (allocated when None; shape [rows, c1 - c0]). Returns ``out``."""
        rows, k = self.shape
        c1 = k if c1 is None else c1
        if not 0 <= c0 <= c1 <= k:
            raise ValueError(f"columns {c0}:{c1} outside 0..{k}")
        if out is None:
            out = np.empty((rows, c1 - c0), np.float32)
        if out.dtype != np.float32 or not out.flags.c_contiguous or out.size != rows * (c1 - c0):
            raise ValueError(f"out must be a C-contiguous float32 array of {rows * (c1 - c0)} elements")
        if out.size == 0:
            return out
        dst = out.reshape(-1)
        kern = GGUF_KERNELS.get(self.tag)
        if kern is not None:
            q = QTYPES[self.tag]
            if c0 % q.block or c1 % q.block:
                raise ValueError(f"{self.tag} columns {c0}:{c1} do not start and end on {q.block}-weight blocks")
            kern(self.data, k // q.block * q.block_bytes, self.row0, rows, c0 // q.block, c1 // q.block, dst, 16)
        elif self.tag == "NF4":
            a = self.aux
            nf4_rows(self.data, a["absmax"], a["qmap"], a["bs"], a["code2"], a["absmax2"], a["bs2"],
                 np.float32(a["offset"]), k, self.row0, rows, c0, c1, dst)
        else:
            fp8_scaled_rows(self.data, k, self.row0, rows, c0, c1, self.aux["scale"], dst)
        return out


def check_weight(w: np.ndarray | PackedWeight, w_dtype: str) -> None:
    """The kernels' one weight check: a C-contiguous 2-D array in a ``DECODE_TAGS`` storage
    dtype, or a ``PackedWeight`` of that tag, either possibly wrapped in a ``kernels.lora.LoraWeight``
    (raises TypeError/ValueError naming the problem)."""
    if isinstance(w, LoraWeight):
        if w.tag != w_dtype:
            raise TypeError(f"LoRA-wrapped weight is {w.tag}, but {w_dtype} was asked for")
        w = w.base
    if isinstance(w, PackedWeight):
        if w.tag != w_dtype:
            raise TypeError(f"weight is packed as {w.tag}, but {w_dtype} was asked for")
        return
    want = DECODE_TAGS.get(w_dtype)
    if want is None:
        known = sorted({*DECODE_TAGS, *BLOCK_TAGS})
        hint = " (block types come as PackedWeight)" if w_dtype in BLOCK_TAGS else ""
        raise ValueError(f"unknown weight dtype {w_dtype!r}{hint}; known: {known}")
    if w.ndim != 2 or not w.flags.c_contiguous or w.dtype.itemsize != want.itemsize:
        raise TypeError(f"w must be a C-contiguous [N, K] {w_dtype} array, got {w.dtype} {w.shape}")


def dequantize_rows(raw: np.ndarray, tag: str) -> np.ndarray:
    """A whole GGUF block tensor (uint8 [..., row bytes]) to f32 [..., K] — for small tensors and
    tests; weights go through ``PackedWeight`` panels instead."""
    rows = raw.reshape(-1, raw.shape[-1]) if raw.ndim else raw.reshape(1, -1)
    w = PackedWeight.gguf(np.ascontiguousarray(rows), tag)
    return w.decode().reshape(*raw.shape[:-1], w.shape[1])
