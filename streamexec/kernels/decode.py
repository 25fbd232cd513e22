"""Decode stored weight dtypes (F32/F16/BF16/F8_E4M3/F8_E5M2) to float32, bit-exactly.

Weights arrive in their *storage* representation (see ``streamexec.weights.dtypes``): BF16 as
``uint16`` bit patterns, FP8 as ``uint8`` bytes, F16 as ``numpy.float16``, F32 as ``float32``.
These kernels turn them into f32 with integer bit manipulation only, so they need no F16C /
AVX-512-BF16 / AVX instructions (LLVM still vectorises them with whatever the host has):

* BF16: ``uint32(u16) << 16`` reinterpreted as f32 (a bf16 *is* the high half of an f32).
* F16: IEEE binary16 -> binary32, exact for every pattern; subnormals are normalised through an
  exact int -> float conversion; inf stays inf and NaN stays NaN (payload kept, quiet bit as
  stored) — identical to ``numpy.astype(np.float32)`` for every non-NaN pattern.
* F8_E4M3 (OCP "e4m3fn"): bias 7, no infinities, ``S.1111.111`` is NaN, subnormals
  ``m * 2**-9``.  NaN decodes to the quiet NaN ``0x7fc00000`` with the stored sign.
* F8_E5M2: exactly the top byte of an IEEE binary16, decoded as such (has inf and NaN).

Every Numba kernel takes 1-D C-contiguous **read-only** inputs (the wrapper makes the view
read-only, so mmapped and in-memory arrays share one compiled specialisation) and writes a 1-D
C-contiguous ``uint32`` view of the f32 output.  Kernels are ``nogil`` so prefetch threads can
decode while the main thread multiplies.  The F16/FP8 bit manipulation is written as LLVM IR
with 32-bit integer operations (Numba widens every integer operation to 64 bits, which halves the
SIMD width).

Import side effect: ``GOMP_SPINCOUNT`` defaults to 10000 (unless already set).  With libgomp's
default (300000) the OpenMP workers of a Numba ``parallel=True`` kernel keep spinning for several
ms after it returns, on the cores the next sgemm needs (every layer_norm -> linear transition
of SD-sized ops paid for it); 10000 keeps back-to-back parallel launches as fast as before.
It takes effect only if libgomp is not loaded yet (Numba
loads it at the first parallel launch), so the CLI should also set it at start-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

__all__ = ["DECODE_TAGS", "decode_to_f32", "decode_block_to_f32", "as_f32", "readonly_flat"]

#: dtype tags ``decode_to_f32`` understands, with the storage numpy dtype each must arrive in.
DECODE_TAGS: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "F8_E4M3": np.dtype(np.uint8),
    "F8_E5M2": np.dtype(np.uint8),
}

# Below this many elements a single thread decodes: a parallel launch costs ~10 us on an idle
# machine, up to milliseconds when the other core is busy (see kernels/_serial.py).
_PARALLEL_MIN = 1 << 18


_I32 = ir.IntType(32)


def _c32(v: int) -> ir.Constant:
    return ir.Constant(_I32, v)


def _to_i32(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    w = v.type.width
    return builder.zext(v, _I32) if w < 32 else (builder.trunc(v, _I32) if w > 32 else v)


def _f16_bits_ir(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """IR: IEEE half bits (i32, upper bits zero) -> IEEE single bits (i32). 32-bit ops only."""
    sign = builder.shl(builder.and_(v, _c32(0x8000)), _c32(16))
    e = builder.and_(builder.lshr(v, _c32(10)), _c32(0x1F))
    m = builder.and_(v, _c32(0x3FF))
    # normal: rebias exponent 15 -> 127 (add 112 << 23)
    normal = builder.add(builder.shl(builder.and_(v, _c32(0x7FFF)), _c32(13)), _c32(112 << 23))
    # inf / NaN: all-ones exponent, mantissa (payload) kept
    special = builder.or_(_c32(0x7F800000), builder.shl(m, _c32(13)))
    # subnormal: m * 2**-24; float(m) is exact, then subtract 24 from its biased exponent
    mf = builder.bitcast(builder.sitofp(m, ir.FloatType()), _I32)
    sub = builder.sub(mf, _c32(24 << 23))
    sub = builder.select(builder.icmp_unsigned("==", m, _c32(0)), _c32(0), sub)
    r = builder.select(builder.icmp_unsigned("==", e, _c32(0x1F)), special, normal)
    r = builder.select(builder.icmp_unsigned("==", e, _c32(0)), sub, r)
    return builder.or_(sign, r)


def _e4m3_bits_ir(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """IR: OCP e4m3fn byte (i32) -> IEEE single bits (i32). 32-bit ops only."""
    sign = builder.shl(builder.and_(v, _c32(0x80)), _c32(24))
    e = builder.and_(builder.lshr(v, _c32(3)), _c32(0xF))
    m = builder.and_(v, _c32(0x7))
    # normal: rebias 7 -> 127 (add 120); the 3 mantissa bits go to the top of the 23-bit field
    normal = builder.or_(builder.shl(builder.add(e, _c32(120)), _c32(23)), builder.shl(m, _c32(20)))
    # subnormal: m * 2**-9
    mf = builder.bitcast(builder.sitofp(m, ir.FloatType()), _I32)
    sub = builder.sub(mf, _c32(9 << 23))
    sub = builder.select(builder.icmp_unsigned("==", m, _c32(0)), _c32(0), sub)
    r = builder.select(builder.icmp_unsigned("==", e, _c32(0)), sub, normal)
    # S.1111.111 is the only NaN (no infinities): quiet NaN with the stored sign
    is_nan = builder.icmp_unsigned("==", builder.and_(v, _c32(0x7F)), _c32(0x7F))
    r = builder.select(is_nan, _c32(0x7FC00000), r)
    return builder.or_(sign, r)


# Numba promotes every integer operation to 64 bits, which halves the SIMD width of these
# decoders; written directly in LLVM IR with i32 operations they vectorise at full width.


@intrinsic
def f16_bits_to_f32_bits(typingctx, h):
    """IEEE binary16 bit pattern (any unsigned int type) -> binary32 bit pattern (uint32)."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return _f16_bits_ir(builder, _to_i32(builder, args[0]))

    return types.uint32(h), codegen


@intrinsic
def e5m2_bits_to_f32_bits(typingctx, b):
    """float8 e5m2 byte -> binary32 bit pattern (it is the top byte of a binary16)."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return _f16_bits_ir(builder, builder.shl(_to_i32(builder, args[0]), _c32(8)))

    return types.uint32(b), codegen


@intrinsic
def e4m3_bits_to_f32_bits(typingctx, b):
    """float8 e4m3fn byte -> binary32 bit pattern (uint32)."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return _e4m3_bits_ir(builder, _to_i32(builder, args[0]))

    return types.uint32(b), codegen


# --- serial kernels (small arrays, panels decoded inside other parallel work) -------------------


@njit(cache=True, nogil=True, error_model="numpy")
def _bf16_serial(src, dst):
    for i in range(src.size):
        dst[i] = np.uint32(src[i]) << np.uint32(16)


@njit(cache=True, nogil=True, error_model="numpy")
def _f16_serial(src, dst):
    for i in range(src.size):
        dst[i] = f16_bits_to_f32_bits(src[i])


@njit(cache=True, nogil=True, error_model="numpy")
def _e4m3_serial(src, dst):
    for i in range(src.size):
        dst[i] = e4m3_bits_to_f32_bits(src[i])


@njit(cache=True, nogil=True, error_model="numpy")
def _e5m2_serial(src, dst):
    for i in range(src.size):
        dst[i] = e5m2_bits_to_f32_bits(src[i])


# --- parallel kernels: prange splits the range into one contiguous chunk per thread ------------------


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _bf16_parallel(src, dst):
    for i in prange(src.size):
        dst[i] = np.uint32(src[i]) << np.uint32(16)


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _f16_parallel(src, dst):
    for i in prange(src.size):
        dst[i] = f16_bits_to_f32_bits(src[i])


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _e4m3_parallel(src, dst):
    for i in prange(src.size):
        dst[i] = e4m3_bits_to_f32_bits(src[i])


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _e5m2_parallel(src, dst):
    for i in prange(src.size):
        dst[i] = e5m2_bits_to_f32_bits(src[i])


_KERNELS = {
    "BF16": (_bf16_serial, _bf16_parallel),
    "F16": (_f16_serial, _f16_parallel),
    "F8_E4M3": (_e4m3_serial, _e4m3_parallel),
    "F8_E5M2": (_e5m2_serial, _e5m2_parallel),
}


# --- column blocks of a 2-D weight: rows r of src[r, c0:c1] -> dst (contiguous) -----------------
# (conv2d's K-split: a panel of output channels x a chunk of input channels; serial, it runs
# inside a worker; loops over slices from 0 so they vectorise)


@njit(cache=True, nogil=True, error_model="numpy")
def _block_u16(src, ld, rows, c0, c1, dst, is_bf16):
    w = c1 - c0
    for r in range(rows):
        s = src[r * ld + c0 : r * ld + c1]
        d = dst[r * w : (r + 1) * w]
        if is_bf16:
            for j in range(w):
                d[j] = np.uint32(s[j]) << np.uint32(16)
        else:
            for j in range(w):
                d[j] = f16_bits_to_f32_bits(s[j])


@njit(cache=True, nogil=True, error_model="numpy")
def _block_u8(src, ld, rows, c0, c1, dst, is_e4m3):
    w = c1 - c0
    for r in range(rows):
        s = src[r * ld + c0 : r * ld + c1]
        d = dst[r * w : (r + 1) * w]
        if is_e4m3:
            for j in range(w):
                d[j] = e4m3_bits_to_f32_bits(s[j])
        else:
            for j in range(w):
                d[j] = e5m2_bits_to_f32_bits(s[j])


def decode_block_to_f32(raw: np.ndarray, dtype: str, c0: int, c1: int, out: np.ndarray) -> np.ndarray:
    """Decode the column block ``raw[:, c0:c1]`` of a C-contiguous 2-D stored weight into the
    C-contiguous float32 ``out`` (``raw.shape[0] * (c1 - c0)`` elements), bit-exactly as
    :func:`decode_to_f32`; serial. Returns ``out``."""
    if not isinstance(raw, np.ndarray):  # a block weight (kernels.dequant.PackedWeight)
        return _packed(raw, dtype).decode(out, c0, c1)
    want = DECODE_TAGS.get(dtype)
    if want is None:
        raise ValueError(f"cannot decode dtype {dtype!r}; known: {sorted(DECODE_TAGS)}")
    if raw.ndim != 2 or raw.dtype.itemsize != want.itemsize:
        raise TypeError(f"{dtype} block must come from a 2-D array stored as {want}, got {raw.dtype} {raw.shape}")
    rows, k = raw.shape
    if not 0 <= c0 <= c1 <= k:
        raise ValueError(f"columns {c0}:{c1} outside 0..{k}")
    if out.dtype != np.float32 or not out.flags.c_contiguous or out.size != rows * (c1 - c0):
        raise ValueError(f"out must be a C-contiguous float32 array of {rows * (c1 - c0)} elements")
    if out.size == 0:
        return out
    dst = out.reshape(-1).view(np.uint32)
    if dtype == "F32":
        dst[...] = readonly_flat(raw, np.uint32).reshape(rows, k)[:, c0:c1].reshape(-1)
    elif want.itemsize == 2:
        _block_u16(readonly_flat(raw, np.uint16), k, rows, c0, c1, dst, dtype == "BF16")
    else:
        _block_u8(readonly_flat(raw, np.uint8), k, rows, c0, c1, dst, dtype == "F8_E4M3")
    return out


def _packed(w, dtype: str):
    """A ``kernels.dequant.PackedWeight`` of tag ``dtype`` (GGUF blocks, NF4, scaled fp8): the
    block types decode through the same two entry points as the plain dtypes."""
    tag = getattr(w, "tag", None)
    if tag is None or not hasattr(w, "decode"):
        raise TypeError(f"expected a numpy array or a PackedWeight, got {type(w).__name__}")
    if tag != dtype:
        raise TypeError(f"weight is packed as {tag}, but {dtype} was asked for")
    return w


def readonly_flat(a: np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
    """1-D read-only view of a C-contiguous array (optionally reinterpreted as ``dtype``).

    Numba compiles a separate specialisation for writable and read-only arrays; handing every
    kernel read-only views keeps it to one (mmapped weights are read-only anyway).
    """
    if not a.flags.c_contiguous:
        raise ValueError("expected a C-contiguous array (a view of a stored tensor)")
    v = a.reshape(-1)
    if dtype is not None:
        v = v.view(dtype)
    if v.flags.writeable:
        v = v.view()
        v.flags.writeable = False
    return v


def decode_to_f32(
    raw: np.ndarray, dtype: str, out: np.ndarray | None = None, *, parallel: bool | None = None
) -> np.ndarray:
    """Decode ``raw`` (a C-contiguous array in the storage dtype of tag ``dtype``) to float32.

    Args:
        raw: the stored tensor, any shape, C-contiguous (e.g. an mmapped view); never modified.
        dtype: one of ``DECODE_TAGS`` ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2").
        out: optional C-contiguous float32 destination with ``raw.size`` elements (any shape);
            when omitted a new array of ``raw.shape`` is returned.
        parallel: force the multi-threaded (True) or single-threaded (False) kernel; by default
            arrays of at least 65536 elements decode on all Numba threads.

    Returns:
        ``out`` (or the new array), bit-exact decode of every element. For "F32" the data is
        copied into ``out`` when given, otherwise ``raw`` itself is returned (no copy).
    """
    if not isinstance(raw, np.ndarray):  # a block weight (kernels.dequant.PackedWeight)
        return _packed(raw, dtype).decode(out)
    want = DECODE_TAGS.get(dtype)
    if want is None:
        raise ValueError(f"cannot decode dtype {dtype!r}; known: {sorted(DECODE_TAGS)}")
    if raw.dtype.itemsize != want.itemsize or raw.dtype.kind not in ("f", "u", "i"):
        raise TypeError(f"{dtype} must arrive stored as {want}, got {raw.dtype}")
    if out is not None:
        if out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writable C-contiguous float32 array")
        if out.size != raw.size:
            raise ValueError(f"out has {out.size} elements, raw has {raw.size}")
    if dtype == "F32":
        if out is None:
            return raw if raw.dtype == np.float32 else raw.view(np.float32)
        np.copyto(out.reshape(-1), raw.reshape(-1).view(np.float32))
        return out
    if out is None:
        out = np.empty(raw.shape, dtype=np.float32)
    if raw.size == 0:
        return out
    src_dt = np.uint16 if want.itemsize == 2 else np.uint8
    src = readonly_flat(raw, src_dt)
    dst = out.reshape(-1).view(np.uint32)
    serial, par = _KERNELS[dtype]
    if parallel is None:
        parallel = raw.size >= _PARALLEL_MIN
    (par if parallel else serial)(src, dst)
    return out


def as_f32(raw: np.ndarray | None, dtype: str | None) -> np.ndarray | None:
    """Small vectors (biases, norm weights): a C-contiguous float32 array, or None for None.

    F32 inputs that are already C-contiguous are returned as-is (no copy, possibly read-only);
    everything else is decoded into a fresh array.
    """
    if raw is None:
        return None
    if dtype is None:
        dtype = "F32" if raw.dtype == np.float32 else _guess_tag(raw.dtype)
    if dtype == "F32":
        a = raw.view(np.float32) if raw.dtype != np.float32 else raw
        return a if a.flags.c_contiguous else np.ascontiguousarray(a)
    return decode_to_f32(np.ascontiguousarray(raw), dtype)


def _guess_tag(dt: np.dtype) -> str:
    if dt == np.float16:
        return "F16"
    raise TypeError(f"cannot infer the stored dtype tag of a {dt} array; pass dtype explicitly")
