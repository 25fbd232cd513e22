"""Dequantize block weights (GGUF Q*_0/Q*_1/K-quants, bitsandbytes NF4, ComfyUI scaled fp8) into
f32 panels — the ``to_float`` half of ggml's ``type_traits`` (sizes: ``kernels.qtypes``).

A weight [N, K] in a block type is a ``PackedWeight``: the stored bytes (zero-copy views of the
mapped file) plus its side tensors (NF4 absmax and levels, the fp8 scale). Row slices are
views too, so ``kernels.linear`` handles it exactly like a bf16 array: it slices a panel of
output rows and calls ``decode_to_f32(panel, tag, scratch)``, which lands here and decodes those
rows — all of K, or a block-aligned column range — into the caller's f32 scratch. No full-size
f32 copy ever exists.

Every kernel is serial (it runs inside a linear worker) and exact: the same f32 operations in the
same order as ggml's ``dequantize_row_*`` and ``gguf.quants`` (f16 scales widened exactly with
integer bit operations, no FMA contraction), so results are bit-identical to
``gguf.quants.dequantize``. Nothing needs AVX or F16C.

Block layouts (``ggml-common.h``; d/dmin are f16, "x" is one weight, e its index in the block):

* Q8_0 (34 B): d, int8 q[32]; x = q * d.
* Q4_0 (18 B): d, qs[16]; e < 16 is the low nibble of qs[e], e >= 16 the high nibble of
  qs[e-16]; x = d * (q - 8).  Q4_1 (20 B): d, m, qs[16]; x = d * q + m.
* Q5_0 (22 B): d, u32 qh, qs[16]; bit e of qh is the 5th bit of weight e; x = d * (q - 16).
  Q5_1 (24 B): d, m, qh, qs; x = d * q + m.
* Q2_K (84 B / 256): scales[16] (low nibble: scale, high: min, per 16 weights), qs[64], d, dmin;
  weight e = 128c + 32s + l is bits 2s..2s+1 of qs[32c + l]; x = (d*sc) * q - (dmin*m).
* Q3_K (110 B): hmask[32], qs[64], scales[12] (16 signed 6-bit scales), d; low 2 bits as Q2_K,
  bit e//32 of hmask[e%32] clear means subtract 4; x = (d * (scale - 32)) * q.
* Q4_K (144 B): d, dmin, scales[12] (8 x (6-bit scale, 6-bit min) per 32 weights), qs[128];
  weight 64c + 32h + l is nibble h of qs[32c + l]; x = (d*sc) * q - (dmin*m).
  Q5_K (176 B): as Q4_K plus qh[32] (bit e//32 of qh[e%32] is the 5th bit).
* Q6_K (210 B): ql[128], qh[64], int8 scales[16], d; weight 128c + 64h + l is nibble h of
  ql[64c + l], its high 2 bits are bits 2s..2s+1 of qh[32c + l] (s = (e%128)//32);
  x = (d * scale) * (q - 32).
* NF4 (bitsandbytes): the flattened tensor in blocks of 64 (``blocksize``); two codes per byte,
  the *high* nibble first; x = quant_map[code] * absmax[block]. With nested statistics the
  absmax is itself 8-bit: absmax = code2[a] * absmax2[block // blocksize2] + offset.
* F8_E4M3_SCALED (ComfyUI): x = e4m3(byte) * scale (one f32 per tensor, or per row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from streamexec.kernels.decode import DECODE_TAGS, _e4m3_bits_ir, _f16_bits_ir, _to_i32, readonly_flat
from streamexec.kernels.lora import LoraWeight
from streamexec.kernels.qtypes import QTYPES

__all__ = ["PackedWeight", "BLOCK_TAGS", "check_weight", "dequantize_rows"]

_I32 = ir.IntType(32)


@intrinsic
def _f16_at(typingctx, lo, hi):
    """Two bytes (little-endian IEEE binary16) -> float32, exactly."""
    if not (isinstance(lo, types.Integer) and isinstance(hi, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        v = builder.or_(_to_i32(builder, args[0]), builder.shl(_to_i32(builder, args[1]), ir.Constant(_I32, 8)))
        return builder.bitcast(_f16_bits_ir(builder, v), ir.FloatType())

    return types.float32(lo, hi), codegen


@intrinsic
def _e4m3_at(typingctx, b):
    """float8 e4m3fn byte -> float32, exactly."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(_e4m3_bits_ir(builder, _to_i32(builder, args[0])), ir.FloatType())

    return types.float32(b), codegen


# --- GGUF block kernels: rows r0..r0+rows of a [*, ld bytes] tensor, blocks b0..b1 of each row ---
# dst (flat f32) receives rows x (b1 - b0) * block weights, row-major.  All arithmetic in f32.
# ``n16`` is always 16, passed at run time: with constant trip counts LLVM unrolls the inner
# loops completely and then cannot vectorise them (src and dst might alias); as loops the loop
# vectoriser does, behind a runtime alias check (2-3x faster decode). Runs of 32 weights with
# two scales (K-quants) write both halves per iteration: a 16-trip loop per half stayed scalar
# (Q6_K decoded at 1/4 of the others).

_F = np.float32


@njit(cache=True, nogil=True)
def _q8_0(src, ld, r0, rows, b0, b1, dst, n16):
    o = 0
    for r in range(rows):
        for b in range(b0, b1):
            p = (r0 + r) * ld + b * 34
            d = _f16_at(src[p], src[p + 1])
            q = src[p + 2 : p + 34]
            out = dst[o : o + 32]
            for j in range(2 * n16):
                v = np.int32(q[j])
                out[j] = _F(np.int32((v ^ 128) - 128)) * d
            o += 32


@njit(cache=True, nogil=True)
def _q4_0(src, ld, r0, rows, b0, b1, dst, n16):
    o = 0
    for r in range(rows):
        for b in range(b0, b1):
            p = (r0 + r) * ld + b * 18
            d = _f16_at(src[p], src[p + 1])
            q = src[p + 2 : p + 18]
            out = dst[o : o + 32]
            for j in range(n16):
                v = np.int32(q[j])
                out[j] = d * _F(np.int32((v & 15) - 8))
                out[j + 16] = d * _F(np.int32((v >> 4) - 8))
            o += 32


@njit(cache=True, nogil=True)
def _q4_1(src, ld, r0, rows, b0, b1, dst, n16):
    o = 0
    for r in range(rows):
        for b in range(b0, b1):
            p = (r0 + r) * ld + b * 20
            d = _f16_at(src[p], src[p + 1])
            m = _f16_at(src[p + 2], src[p + 3])
            q = src[p + 4 : p + 20]
            out = dst[o : o + 32]
            for j in range(n16):
                v = np.int32(q[j])
                out[j] = d * _F(np.int32(v & 15)) + m
                out[j + 16] = d * _F(np.int32(v >> 4)) + m
            o += 32


@njit(cache=True, nogil=True)
def _qh32(src, p):
    return (np.uint32(src[p]) | (np.uint32(src[p + 1]) << 8) | (np.uint32(src[p + 2]) << 16)
            | (np.uint32(src[p + 3]) << 24))


@njit(cache=True, nogil=True)
def _q5_0(src, ld, r0, rows, b0, b1, dst, n16):
    o = 0
    for r in range(rows):
        for b in range(b0, b1):
            p = (r0 + r) * ld + b * 22
            d = _f16_at(src[p], src[p + 1])
            qh = _qh32(src, p + 2)
            q = src[p + 6 : p + 22]
            out = dst[o : o + 32]
            for j in range(n16):
                v = np.int32(q[j])
                h0 = np.int32((qh >> j) & 1) << 4
                h1 = np.int32((qh >> (j + 16)) & 1) << 4
                out[j] = d * _F(np.int32(((v & 15) | h0) - 16))
                out[j + 16] = d * _F(np.int32(((v >> 4) | h1) - 16))
            o += 32


@njit(cache=True, nogil=True)
def _q5_1(src, ld, r0, rows, b0, b1, dst, n16):
    o = 0
    for r in range(rows):
        for b in range(b0, b1):
            p = (r0 + r) * ld + b * 24
            d = _f16_at(src[p], src[p + 1])
            m = _f16_at(src[p + 2], src[p + 3])
            qh = _qh32(src, p + 4)
            q = src[p + 8 : p + 24]
            out = dst[o : o + 32]
            for j in range(n16):
                v = np.int32(q[j])
                h0 = np.int32((qh >> j) & 1) << 4
                h1 = np.int32((qh >> (j + 16)) & 1) << 4
                out[j] = d * _F(np.int32((v & 15) | h0)) + m
                out[j + 16] = d * _F(np.int32((v >> 4) | h1)) + m
            o += 32


@njit(cache=True, nogil=True)
def _q2_k(src, ld, r0, rows, b0, b1, dst, n16):
    o = 0
    for r in range(rows):
        for b in range(b0, b1):
            p = (r0 + r) * ld + b * 84
            sc = src[p : p + 16]
            qs = src[p + 16 : p + 80]
            d = _f16_at(src[p + 80], src[p + 81])
            dmin = _f16_at(src[p + 82], src[p + 83])
            for c in range(2):
                q = qs[c * 32 : c * 32 + 32]
                for s in range(4):  # a run of 32 weights: two scales of 16, both per iteration
                    g0 = np.int32(sc[c * 8 + s * 2])
                    g1 = np.int32(sc[c * 8 + s * 2 + 1])
                    dl0, ml0 = d * _F(np.int32(g0 & 15)), dmin * _F(np.int32(g0 >> 4))
                    dl1, ml1 = d * _F(np.int32(g1 & 15)), dmin * _F(np.int32(g1 >> 4))
                    e = o + c * 128 + s * 32
                    out = dst[e : e + 32]
                    for j in range(n16):
                        out[j] = dl0 * _F(np.int32((np.int32(q[j]) >> (2 * s)) & 3)) - ml0
                        out[j + 16] = dl1 * _F(np.int32((np.int32(q[j + 16]) >> (2 * s)) & 3)) - ml1
            o += 256


@njit(cache=True, nogil=True)
def _q3_k(src, ld, r0, rows, b0, b1, dst, n16):
    o = 0
    for r in range(rows):
        for b in range(b0, b1):
            p = (r0 + r) * ld + b * 110
            hm = src[p : p + 32]
            qs = src[p + 32 : p + 96]
            sc = src[p + 96 : p + 108]
            d = _f16_at(src[p + 108], src[p + 109])
            for c in range(2):
                q = qs[c * 32 : c * 32 + 32]
                for s in range(4):  # a run of 32 weights: two scales of 16, both per iteration
                    hb = c * 4 + s  # hmask bit of this run
                    i = c * 8 + s * 2  # scale index (16 weights each)
                    dl0 = d * _F(np.int32(_q3_scale(sc, i) - 32))
                    dl1 = d * _F(np.int32(_q3_scale(sc, i + 1) - 32))
                    e = o + c * 128 + s * 32
                    out = dst[e : e + 32]
                    for j in range(n16):
                        l0 = (np.int32(q[j]) >> (2 * s)) & 3
                        l1 = (np.int32(q[j + 16]) >> (2 * s)) & 3
                        h0 = (np.int32(hm[j]) >> hb) & 1
                        h1 = (np.int32(hm[j + 16]) >> hb) & 1
                        out[j] = dl0 * _F(np.int32(l0 - 4 + 4 * h0))
                        out[j + 16] = dl1 * _F(np.int32(l1 - 4 + 4 * h1))
            o += 256


@njit(cache=True, nogil=True)
def _q3_scale(sc, i):
    """The 6-bit scale i (0..15) of a Q3_K block: low 4 bits from sc[0:8], high 2 from sc[8:12]."""
    lo = (np.int32(sc[i]) & 15) if i < 8 else (np.int32(sc[i - 8]) >> 4)
    hi = (np.int32(sc[8 + i % 4]) >> (2 * (i // 4))) & 3
    return lo | (hi << 4)


@njit(cache=True, nogil=True)
def _scale_min_k4(sc, j):
    """The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block."""
    if j < 4:
        return np.int32(sc[j]) & 63, np.int32(sc[j + 4]) & 63
    s = (np.int32(sc[j + 4]) & 15) | ((np.int32(sc[j - 4]) >> 6) << 4)
    m = (np.int32(sc[j + 4]) >> 4) | ((np.int32(sc[j]) >> 6) << 4)
    return s, m


@njit(cache=True, nogil=True)
def _q4_k(src, ld, r0, rows, b0, b1, dst, n16):
    o = 0
    for r in range(rows):
        for b in range(b0, b1):
            p = (r0 + r) * ld + b * 144
            d = _f16_at(src[p], src[p + 1])
            dmin = _f16_at(src[p + 2], src[p + 3])
            sc = src[p + 4 : p + 16]
            qs = src[p + 16 : p + 144]
            for c in range(4):
                q = qs[c * 32 : c * 32 + 32]
                for h in range(2):
                    s, m = _scale_min_k4(sc, 2 * c + h)
                    dl = d * _F(np.int32(s))
                    ml = dmin * _F(np.int32(m))
                    e = o + c * 64 + h * 32
                    out = dst[e : e + 32]
                    for j in range(2 * n16):
                        out[j] = dl * _F(np.int32((np.int32(q[j]) >> (4 * h)) & 15)) - ml
            o += 256


@njit(cache=True, nogil=True)
def _q5_k(src, ld, r0, rows, b0, b1, dst, n16):
    o = 0
    for r in range(rows):
        for b in range(b0, b1):
            p = (r0 + r) * ld + b * 176
            d = _f16_at(src[p], src[p + 1])
            dmin = _f16_at(src[p + 2], src[p + 3])
            sc = src[p + 4 : p + 16]
            qh = src[p + 16 : p + 48]
            qs = src[p + 48 : p + 176]
            for c in range(4):
                q = qs[c * 32 : c * 32 + 32]
                for h in range(2):
                    jb = 2 * c + h
                    s, m = _scale_min_k4(sc, jb)
                    dl = d * _F(np.int32(s))
                    ml = dmin * _F(np.int32(m))
                    e = o + c * 64 + h * 32
                    out = dst[e : e + 32]
                    for j in range(2 * n16):
                        v = ((np.int32(q[j]) >> (4 * h)) & 15) | (((np.int32(qh[j]) >> jb) & 1) << 4)
                        out[j] = dl * _F(np.int32(v)) - ml
            o += 256


@njit(cache=True, nogil=True)
def _q6_k(src, ld, r0, rows, b0, b1, dst, n16):
    o = 0
    for r in range(rows):
        for b in range(b0, b1):
            p = (r0 + r) * ld + b * 210
            ql = src[p : p + 128]
            qh = src[p + 128 : p + 192]
            sc = src[p + 192 : p + 208]
            d = _f16_at(src[p + 208], src[p + 209])
            for c in range(2):
                for s in range(4):  # runs of 32: ql nibble s // 2, qh bits 2s; two scales of 16
                    h = s // 2
                    g = c * 8 + s * 2
                    dl0 = d * _F(np.int32((np.int32(sc[g]) ^ 128) - 128))
                    dl1 = d * _F(np.int32((np.int32(sc[g + 1]) ^ 128) - 128))
                    a_ = ql[c * 64 + (s % 2) * 32 : c * 64 + (s % 2) * 32 + 32]
                    h_ = qh[c * 32 : c * 32 + 32]
                    e = o + c * 128 + s * 32
                    out = dst[e : e + 32]
                    for j in range(n16):
                        a0 = (np.int32(a_[j]) >> (4 * h)) & 15
                        a1 = (np.int32(a_[j + 16]) >> (4 * h)) & 15
                        u0 = (np.int32(h_[j]) >> (2 * s)) & 3
                        u1 = (np.int32(h_[j + 16]) >> (2 * s)) & 3
                        out[j] = dl0 * _F(np.int32((a0 | (u0 << 4)) - 32))
                        out[j + 16] = dl1 * _F(np.int32((a1 | (u1 << 4)) - 32))
            o += 256


# --- NF4 and scaled fp8: element-indexed (NF4 blocks run over the flattened tensor) -----------


@njit(cache=True, nogil=True)
def _nf4(codes, absmax, qmap, bs, code2, absmax2, bs2, offset, k, r0, rows, c0, c1, dst):
    """dst[r, c - c0] = qmap[code(e)] * absmax(e // bs), e = (r0 + r) * k + c. ``code2`` non-empty:
    absmax is uint8 codes, absmax(b) = code2[a[b]] * absmax2[b // bs2] + offset."""
    w = c1 - c0
    nested = code2.size > 0
    for r in range(rows):
        e0 = (r0 + r) * k + c0
        out = dst[r * w : r * w + w]
        j = 0
        while j < w:
            e = e0 + j
            blk = e // bs
            n = min(w - j, (blk + 1) * bs - e)  # weights left in this block
            if nested:
                am = code2[np.int32(absmax[blk])] * absmax2[blk // bs2] + offset
            else:
                am = absmax[blk]
            if (e & 1) == 0 and (n & 1) == 0:  # whole bytes (every row when K is even)
                cb = codes[e >> 1 : (e >> 1) + (n >> 1)]
                o = out[j : j + n]
                for t in range(n >> 1):
                    byte = np.int32(cb[t])
                    o[2 * t] = qmap[byte >> 4] * am
                    o[2 * t + 1] = qmap[byte & 15] * am
            else:
                for t in range(n):
                    byte = np.int32(codes[(e + t) >> 1])
                    nib = (byte >> 4) if ((e + t) & 1) == 0 else (byte & 15)
                    out[j + t] = qmap[nib] * am
            j += n


@njit(cache=True, nogil=True)
def _fp8_scaled(src, k, r0, rows, c0, c1, scale, dst):
    w = c1 - c0
    per_row = scale.size > 1
    for r in range(rows):
        s = scale[r0 + r] if per_row else scale[0]
        row = src[(r0 + r) * k + c0 : (r0 + r) * k + c1]
        out = dst[r * w : r * w + w]
        for j in range(w):
            out[j] = _e4m3_at(row[j]) * s


#: tag -> GGUF block kernel (same signature), the ``to_float`` column of the type table.
_GGUF_KERNELS = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
#: Every tag a ``PackedWeight`` may carry (plain F32/F16/BF16/FP8 stay numpy arrays: ``decode``).
BLOCK_TAGS = frozenset({*_GGUF_KERNELS, "NF4", "F8_E4M3_SCALED"})

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
        if tag not in _GGUF_KERNELS or q is None:
            raise ValueError(f"{tag!r} is not a GGUF block type; known: {sorted(_GGUF_KERNELS)}")
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
        kern = _GGUF_KERNELS.get(self.tag)
        if kern is not None:
            q = QTYPES[self.tag]
            if c0 % q.block or c1 % q.block:
                raise ValueError(f"{self.tag} columns {c0}:{c1} do not start and end on {q.block}-weight blocks")
            kern(self.data, k // q.block * q.block_bytes, self.row0, rows, c0 // q.block, c1 // q.block, dst, 16)
        elif self.tag == "NF4":
            a = self.aux
            _nf4(self.data, a["absmax"], a["qmap"], a["bs"], a["code2"], a["absmax2"], a["bs2"],
                 np.float32(a["offset"]), k, self.row0, rows, c0, c1, dst)
        else:
            _fp8_scaled(self.data, k, self.row0, rows, c0, c1, self.aux["scale"], dst)
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
