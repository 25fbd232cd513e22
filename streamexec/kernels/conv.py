"""2-D convolution in output row bands, over weights kept in their stored dtype.

``conv2d`` computes ``out[n, co, y, x] = bias[co] + sum w[co, ci, ky, kx] * in[n, ci, ...]`` for
the convolutions of SD 1.5 (UNet, VAE) and FLUX's VAE: k=1 and k=3, stride 1 and 2, symmetric or
asymmetric zero padding, and nearest-neighbour 2x upsampling fused into the read.
:func:`conv2d_plan` decides everything once — the path, band rows, weight panel rows, K chunk,
channel groups, workers — into a frozen :class:`ConvPlan`; :func:`conv2d_scratch_bytes` is the
scratch that plan allocates (the planner calls both), and ``conv2d`` runs one of three paths
over it:

* **direct** (im2col + GEMM; every shape). The output is produced ``band_rows`` rows at a time
  (all images of the batch together). For one band and one K chunk of ``ci_chunk`` input
  channels the im2col matrix ``col[(ci, ky, kx), (n, y, x)]`` is built once, then for each
  weight panel ``tile[panel rows, all images' band columns] += panel @ col`` is one cblas_sgemm
  with beta = 1 after the first chunk (``blas.sgemm_into``); at the end bias is added while the
  tile is copied out per image. Scratch is bounded by ``band_rows``, never by the image size.
* **pointwise** (1x1, stride 1, unpadded): no im2col and no K split — ``col`` is a strided view
  of ``x``, one matmul per (panel, image) straight into ``out``.
* **Winograd** F(2x2, 3x3) (3x3 stride 1; ``winograd.py``): as direct, but bands are whole rows
  of 2x2 tiles and each K chunk is an input transform, per weight panel a weight transform and
  16 accumulating sgemms in the transform domain, then the output transform + bias. 16
  multiplies per 2x2 output tile and channel pair instead of 36. ``algo``/``STREAMEXEC_CONV``
  choose it or not ("auto": where it applies, except for tiny maps and explicit 1-row bands).

Common to all three:

* **Only the input rows a band needs are read**, so ``x`` may be a ``np.memmap`` of a spilled
  feature map; ``out`` may be a memmap too and is written band by band. The halo rule (which
  input rows a band of output rows reads, and how a banded caller pads the slab it reads) is
  :func:`conv2d_band_input_rows` / :func:`conv2d_band_slab` / :func:`conv2d_band_slab_rows`;
  the runtime's out-of-core conv and the planner use these, not copies.
* **Weight panels.** ``w`` stays in its stored dtype ("F32", "F16", "BF16", "F8_E4M3",
  "F8_E5M2"); ``panel_rows`` output channels x one K chunk at a time are decoded
  (``decode_block_to_f32``, serial) into a small reused f32 scratch — never a full f32 copy
  (1280x1280x3x3 is 59 MB in f32); every weight is decoded once per band. F32 weights are read
  in place (a strided panel, ``lda`` = K).
* **Fused upsample.** With ``upsample=True`` the conv runs on the 2x nearest-neighbour upsampled
  input by reading input pixel (y//2, x//2); the 4x larger map never exists.
* **Parallelism.** Work items are (band, group of output channels); the kernels' worker threads
  (``threads.parallel_items``) take them dynamically, each with single-threaded BLAS and its own
  scratch. Channel groups only appear when there are too few bands to keep every core busy
  (8x8 and 16x16 maps); each group then builds the band's im2col itself.

The default band, panel and K-chunk sizes aim at the shapes where single-threaded sgemm runs near
its peak while keeping per-worker scratch to a few MB (measurements in BENCHMARKS.md, kernels).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numba import njit

from streamexec.kernels import buffers
from streamexec.kernels.blas import blas_single_threaded, sgemm_into
from streamexec.kernels.decode import DECODE_TAGS, decode_block_to_f32, decode_to_f32
from streamexec.kernels.lora import LoraWeight
from streamexec.kernels.threads import PARALLEL_MIN_FLOPS, kernel_workers, parallel_items
from streamexec.kernels.winograd import wino_buffer, wino_buffer_bytes, wino_input, wino_output, wino_weight

__all__ = [
    "ConvPlan",
    "conv2d",
    "conv2d_band_input_rows",
    "conv2d_band_slab",
    "conv2d_band_slab_rows",
    "conv2d_out_shape",
    "conv2d_plan",
    "conv2d_scratch_bytes",
]

#: im2col scratch target per worker (bytes); the band is also capped at ~_COL_TARGET_COLS cols.
_COL_BUDGET = 6 << 20
_COL_TARGET_COLS = 512
#: decoded weight panel target per worker (bytes); at least _MIN_PANEL rows (GEMM efficiency).
_PANEL_BUDGET = 3 << 20
_MIN_PANEL = 64
#: reduction elements per K chunk (128 input channels of a 3x3 kernel): each sgemm is then
#: (panel rows) x (band columns) x kc with both operands packed once per call.
_KC_TARGET = 1152
#: output tile (a group's output channels x the band's columns, accumulated over the K chunks)
_TILE_BUDGET = 4 << 20

#: Winograd F(2x2, 3x3) (``winograd.py``) for 3x3 stride-1 convolutions: input channels per
#: reduction chunk (the K of its 16 GEMMs), 2x2 tiles per band (the N of its GEMMs) and the
#: bound of its [16, group rows, tiles] accumulator per worker.
_WINO_CI = 256
_WINO_TILES = 256
_WINO_ACC_BUDGET = 8 << 20
_WINO_MIN_TILES = 64
#: "auto" (Winograd where it applies), "direct" (im2col + GEMM everywhere) or "winograd";
#: STREAMEXEC_CONV overrides the default, for comparisons.
ALGOS = ("auto", "direct", "winograd")
DEFAULT_ALGO = os.environ.get("STREAMEXEC_CONV") or "auto"
if DEFAULT_ALGO not in ALGOS:
    warnings.warn(f"STREAMEXEC_CONV={DEFAULT_ALGO!r} is not one of {', '.join(ALGOS)}; using auto", stacklevel=1)
    DEFAULT_ALGO = "auto"

_WEIGHT_TAGS = tuple(DECODE_TAGS)
_BIAS_TAG_OF_DTYPE = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


# ============================================================================================
# kernels
# ============================================================================================


@njit(cache=True, nogil=True)
def _im2col_band(x, r0, r1, kh, kw, stride, pt, pl, up, wout, col, ci0, ci1):
    """col[((ci-ci0)*kh+ky)*kw+kx, (n*rows + r)*wout + c] = in[n, ci, (r0+r)*stride+ky-pt, c*stride+kx-pl]

    for input channels ci0 <= ci < ci1 (one K chunk),
    where ``in`` is ``x`` (or its 2x nearest upsampling if ``up``) with zeros outside. Reads only
    the input rows output rows r0..r1 need. Single-threaded; the workers run bands in parallel.
    Indexing is through flat views with unsigned offsets: Numba's negative-index wraparound
    check on signed indices blocks vectorisation of the row copies (measured 5x slower).
    """
    n_img, cin, h, w = x.shape
    hu = 2 * h if up else h
    wu = 2 * w if up else w
    rows = r1 - r0
    m_img = rows * wout
    zero = np.float32(0.0)
    xf = x.reshape(-1)
    colf = col.reshape(-1)
    ncol = col.shape[1]
    for ci in range(ci0, ci1):
        for ky in range(kh):
            for kx in range(kw):
                k = ((ci - ci0) * kh + ky) * kw + kx
                off = kx - pl
                c_lo = min(wout, max(0, -(off // stride)))  # first c with c*stride+off >= 0
                c_hi = max(c_lo, min(wout, (wu - 1 - off) // stride + 1))
                for n in range(n_img):
                    for r in range(rows):
                        dst = np.uint64(k * ncol + n * m_img + r * wout)
                        iy = (r0 + r) * stride + ky - pt
                        if iy < 0 or iy >= hu:
                            for c in range(wout):
                                colf[dst + np.uint64(c)] = zero
                            continue
                        if up:
                            iy >>= 1
                        src = ((n * cin + ci) * h + iy) * w
                        for c in range(c_lo):
                            colf[dst + np.uint64(c)] = zero
                        if up:
                            for c in range(c_lo, c_hi):
                                colf[dst + np.uint64(c)] = xf[np.uint64(src + ((c * stride + off) >> 1))]
                        elif stride == 1:
                            s0 = np.uint64(src + off)
                            for c in range(c_lo, c_hi):
                                colf[dst + np.uint64(c)] = xf[s0 + np.uint64(c)]
                        else:
                            for c in range(c_lo, c_hi):
                                colf[dst + np.uint64(c)] = xf[np.uint64(src + c * stride + off)]
                        for c in range(c_hi, wout):
                            colf[dst + np.uint64(c)] = zero


# ============================================================================================
# shapes, halo and planning
# ============================================================================================


def _pads(padding: int, pad: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    if pad is not None:
        t, b, lft, r = (int(p) for p in pad)
    else:
        t = b = lft = r = int(padding)
    if min(t, b, lft, r) < 0:
        raise ValueError(f"negative padding {(t, b, lft, r)}")
    return t, b, lft, r


def conv2d_out_shape(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    *,
    stride: int = 1,
    padding: int = 1,
    pad: tuple[int, int, int, int] | None = None,
    upsample: bool = False,
) -> tuple[int, int, int, int]:
    """``(N, Cout, Hout, Wout)`` of :func:`conv2d` for these shapes and options."""
    n, _cin, h, w = x_shape
    cout, _, kh, kw = w_shape
    pt, pb, pl, pr = _pads(padding, pad)
    hu, wu = (2 * h, 2 * w) if upsample else (h, w)
    hout = (hu + pt + pb - kh) // stride + 1
    wout = (wu + pl + pr - kw) // stride + 1
    return n, cout, max(0, hout), max(0, wout)


def conv2d_band_input_rows(
    r0: int,
    r1: int,
    h: int,
    kh: int,
    *,
    stride: int = 1,
    pad_top: int = 1,
    upsample: bool = False,
) -> tuple[int, int]:
    """Input rows ``[lo, hi)`` that output rows ``[r0, r1)`` read (for restoring spills)."""
    lo = r0 * stride - pad_top
    hi = (r1 - 1) * stride - pad_top + kh
    if upsample:
        lo, hi = lo // 2, (hi - 1) // 2 + 1
    return max(0, lo), min(h, max(0, hi))


def conv2d_band_slab(
    r0: int,
    r1: int,
    h: int,
    kh: int,
    pad: tuple[int, int, int, int],
    *,
    upsample: bool = False,
) -> tuple[int, int, tuple[int, int, int, int], int]:
    """How a stride-1 convolution computes output rows ``[r0, r1)`` from a slab of its input.

    Returns ``(s0, s1, slab_pad, j0)``: the input rows ``[s0, s1)`` to read (with the kernel's
    halo, through the fused 2x upsample), the padding to convolve that slab with (top/bottom
    zero padding only where the slab touches the map's edge) and the row of the slab's output
    where output row ``r0`` lands. Convolving the slab with ``slab_pad`` and taking rows
    ``[j0, j0 + r1 - r0)`` gives exactly those output rows of the whole map.
    """
    pt, pb, pl, pr = pad
    up = 2 if upsample else 1
    s0, s1 = conv2d_band_input_rows(r0, r1, h, kh, stride=1, pad_top=pt, upsample=upsample)
    top = pt if s0 == 0 else 0
    bottom = pb if s1 >= h else 0
    return s0, s1, (top, bottom, pl, pr), r0 - (s0 * up + pt - top)


def conv2d_band_slab_rows(rows: int, kh: int, *, upsample: bool = False) -> int:
    """Most input rows :func:`conv2d_band_slab` reads for a band of ``rows`` output rows (the
    band plus the ``kh - 1`` halo, through the 2x upsample, plus one for its alignment)."""
    up = 2 if upsample else 1
    return -(-(rows + kh - 1) // up) + 1


def _is_pointwise(kh: int, kw: int, stride: int, pads: tuple[int, ...], upsample: bool) -> bool:
    return kh == 1 and kw == 1 and stride == 1 and not any(pads) and not upsample


@dataclass(frozen=True)
class ConvPlan:
    """The schedule :func:`conv2d` runs (made by :func:`conv2d_plan`): which path, band and
    panel sizes, K chunk, channel groups and workers, with the geometry they were made for."""

    n: int
    cin: int
    cout: int
    kh: int
    kw: int
    stride: int
    pad: tuple[int, int, int, int]
    upsample: bool
    hout: int
    wout: int
    band_rows: int
    panel_rows: int
    n_bands: int
    groups: int
    #: output channel bounds of the groups: group g is ``[bounds[g], bounds[g + 1])``, whole panels
    bounds: tuple[int, ...]
    group_rows: int
    workers: int
    k: int
    ci_chunk: int
    kc: int
    pointwise: bool
    winograd: bool
    tile_cols: int

    @property
    def items(self) -> int:
        """Work items: (band, channel group) pairs."""
        return self.n_bands * self.groups


def _group_bounds(cout: int, pr: int, groups: int) -> tuple[int, ...]:
    """Channel groups: contiguous runs of whole ``pr``-row panels, as even as panels allow."""
    n_panels = -(-cout // pr)
    bounds = [0] + [min(cout, (n_panels * (g + 1) // groups) * pr) for g in range(groups)]
    bounds[-1] = cout
    return tuple(bounds)


def conv2d_plan(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    w_dtype: str = "F32",
    *,
    stride: int = 1,
    padding: int = 1,
    pad: tuple[int, int, int, int] | None = None,
    upsample: bool = False,
    band_rows: int | None = None,
    panel_rows: int | None = None,
    workers: int | None = None,
    algo: str | None = None,
) -> ConvPlan:
    """The schedule :func:`conv2d` will use: path, band_rows, panel_rows, K chunk, bands, groups.

    Defaults: a band is ~``_COL_TARGET_COLS`` im2col columns (N*rows*Wout, all images together),
    >= 1 row, with its im2col chunk within ``_COL_BUDGET`` and its output tile (all output
    channels of a group x the band's columns) within ``_TILE_BUDGET``; the reduction is split in
    chunks of ``ci_chunk`` input channels (``kc`` = ci_chunk*kh*kw ~ ``_KC_TARGET`` elements); a
    panel is ``_PANEL_BUDGET`` bytes of f32 weight rows x ``kc`` but >= 64 rows. F32 weights
    need no panel scratch: they are read in place. Channel groups split the work when there are
    fewer than 2 bands per worker. Pointwise (1x1, stride 1, unpadded) convolutions need no
    im2col and no K split: their panels span the whole K (``_PANEL_BUDGET`` bytes). Winograd
    bands are whole rows of 2x2 tiles (~``_WINO_TILES`` tiles), its accumulator per group
    within ``_WINO_ACC_BUDGET``.
    """
    n, cin, _h, _w = x_shape
    cout, _cin, kh, kw = w_shape
    pads = _pads(padding, pad)
    _, _, hout, wout = conv2d_out_shape(x_shape, w_shape, stride=stride, padding=padding, pad=pad, upsample=upsample)
    k = cin * kh * kw
    pointwise = _is_pointwise(kh, kw, stride, pads, upsample)
    wino = _use_winograd(kh, kw, stride, band_rows, algo, n * -(-hout // 2) * -(-wout // 2))
    nw = kernel_workers() if workers is None else max(1, int(workers))
    if 2.0 * cout * k * n * hout * wout < PARALLEL_MIN_FLOPS:
        nw = 1  # conv2d runs small convolutions in the calling thread
    if pointwise:
        ci_chunk = max(cin, 1)
    else:
        ci_chunk = _WINO_CI if wino else max(1, _KC_TARGET // max(1, kh * kw))
        ci_chunk = -(-cin // -(-cin // ci_chunk)) if cin else 1  # balanced: 320 -> 3 x 107
    kc = ci_chunk * kh * kw
    per_row = max(1, n * wout)
    tile_cols = -(-wout // 2)
    if wino:
        # bands of whole 2x2 tile rows: ~_WINO_TILES tiles, V chunk and accumulator bounded
        per_tile_row = max(1, n * tile_cols)
        if band_rows is None:
            tr = max(1, -(-_WINO_TILES // per_tile_row))
            tr = min(tr, max(1, _COL_BUDGET // (64 * ci_chunk * per_tile_row)))
        else:
            tr = -(-int(band_rows) // 2)
        br = 2 * max(1, min(tr, -(-max(hout, 1) // 2)))
    elif band_rows is None:
        br = max(1, -(-_COL_TARGET_COLS // per_row))
        br = min(br, max(1, _COL_BUDGET // (4 * kc * per_row)))
        if not pointwise:
            br = min(br, max(1, _TILE_BUDGET // (4 * max(cout, 1) * per_row)))
    else:
        br = int(band_rows)
    if not wino:
        br = max(1, min(br, max(hout, 1)))
    n_bands = -(-hout // br) if hout > 0 else 0
    if panel_rows is None:
        pr = max(_MIN_PANEL, _PANEL_BUDGET // (4 * max(kc, 1)))
        pr = (pr + 15) // 16 * 16
        pr = -(-cout // -(-cout // pr))  # balance: 320 -> 2 x 160, not 288 + 32
    else:
        pr = int(panel_rows)
    pr = max(1, min(pr, cout))
    n_panels = -(-cout // pr)
    # Channel groups only to keep every worker busy: the smallest split whose items fill the
    # workers' rounds to >= 90 % (each extra group repeats the band's im2col).
    groups = 1
    tiles = n * (br // 2) * tile_cols
    if (nw > 1 and n_bands > 0) or wino:
        for g in range(1, n_panels + 1):
            items = n_bands * g
            groups = g
            rows = -(-n_panels // g) * pr
            if wino and 64 * rows * tiles > _WINO_ACC_BUDGET and g < n_panels:
                continue  # Winograd: the [16, group rows, tiles] accumulator within its budget
            if nw <= 1 or items / (nw * -(-items // nw)) >= 0.9:
                break
    if w_dtype == "F32" and not wino:
        # no decode: a "panel" is the whole group's rows, read in place
        group_rows = -(-cout // groups)
        pr = max(1, group_rows)
    bounds = _group_bounds(cout, pr, groups)
    group_rows = max(b1 - b0 for b0, b1 in zip(bounds, bounds[1:])) if cout else 0
    return ConvPlan(n=n, cin=cin, cout=cout, kh=kh, kw=kw, stride=int(stride), pad=pads, upsample=bool(upsample),
                    hout=hout, wout=wout, band_rows=br, panel_rows=pr, n_bands=n_bands, groups=groups,
                    bounds=bounds, group_rows=group_rows, workers=nw, k=k, ci_chunk=ci_chunk, kc=kc,
                    pointwise=pointwise, winograd=wino, tile_cols=tile_cols)


def _use_winograd(kh: int, kw: int, stride: int, band_rows: int | None, algo: str | None, tiles: int) -> bool:
    """Winograd F(2x2, 3x3) for 3x3 stride-1 kernels, unless asked otherwise.

    "auto" keeps the direct algorithm for maps of fewer than ``_WINO_MIN_TILES`` 2x2 tiles
    (all images; SD's 8x8 maps at batch 2: its GEMMs are then too narrow to beat direct, see
    BENCHMARKS.md, kernels) and for an explicit ``band_rows=1`` (the
    planner's smallest-footprint option: one-row bands have the smallest scratch of all)."""
    algo = algo or DEFAULT_ALGO
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    if algo == "direct" or kh != 3 or kw != 3 or stride != 1:
        return False
    if algo == "winograd":
        return True
    return tiles >= _WINO_MIN_TILES and (band_rows is None or int(band_rows) > 1)


def conv2d_scratch_bytes(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    w_dtype: str = "F32",
    *,
    stride: int = 1,
    padding: int = 1,
    pad: tuple[int, int, int, int] | None = None,
    upsample: bool = False,
    band_rows: int | None = None,
    panel_rows: int | None = None,
    workers: int | None = None,
    algo: str | None = None,
) -> int:
    """Scratch bytes :func:`conv2d` allocates (all workers): im2col chunk, decoded panel and
    output tile each (Winograd: input, weight and accumulator transforms and decoded panel).

    Grows with ``band_rows`` (and N, Wout, Cin*k*k), never with the image height. Excludes
    ``out`` and OpenBLAS' own packing buffers.
    """
    p = conv2d_plan(x_shape, w_shape, w_dtype, stride=stride, padding=padding, pad=pad, upsample=upsample,
                    band_rows=band_rows, panel_rows=panel_rows, workers=workers, algo=algo)
    workers_used = max(1, min(p.workers, p.items))
    f32 = w_dtype == "F32"
    if p.winograd:
        tiles = p.n * (p.band_rows // 2) * p.tile_cols
        v = wino_buffer_bytes(p.ci_chunk, tiles)
        dec = 0 if f32 else 4 * p.kc * p.panel_rows
        u = wino_buffer_bytes(p.panel_rows, p.ci_chunk)
        acc = wino_buffer_bytes(p.group_rows, tiles)
        return workers_used * (v + dec + u + acc)
    cols = p.n * p.band_rows * p.wout
    col = 0 if p.pointwise else 4 * p.kc * cols
    panel = 0 if f32 else 4 * p.kc * p.panel_rows
    tile = 0 if p.pointwise else 4 * p.group_rows * cols
    return workers_used * (col + panel + tile)


# ============================================================================================
# the three paths: each makes its workers' scratch and runs one (band, group) item
# ============================================================================================

_State = tuple
_Work = Callable[[_State, int], None]


def _direct(p: ConvPlan, xa: np.ndarray, w2: np.ndarray, w_dtype: str, b32: np.ndarray | None,
            out_flat: np.ndarray) -> tuple[Callable[[int], _State], _Work]:
    """im2col + GEMM: per band and group, for each K chunk (``ci_chunk`` input channels) build
    its im2col once, then per weight panel decode that chunk of the panel and accumulate
    ``tile[panel rows, all images' band columns] += panel @ col`` with one sgemm (beta = 1 after
    the first chunk); finally bias + copy the tile out per image."""
    n, cin, kh, kw, stride, hout, wout = p.n, p.cin, p.kh, p.kw, p.stride, p.hout, p.wout
    pt, _pb, pl, _pr = p.pad
    br, pr, groups, bounds, ci_chunk = p.band_rows, p.panel_rows, p.groups, p.bounds, p.ci_chunk
    f32_weights = w_dtype == "F32" and isinstance(w2, np.ndarray)  # a LoraWeight is merged per panel
    m_max = br * wout

    def make_state(_w: int) -> _State:
        col = buffers.empty((p.kc, n * m_max))
        panel = None if f32_weights else buffers.empty(pr * p.kc)
        tile = buffers.empty((p.group_rows, n * m_max))
        return col, panel, tile

    def work(state: _State, item: int) -> None:
        col, panel, tile = state
        b, g = divmod(item, groups)
        r0 = b * br
        r1 = min(hout, r0 + br)
        m = (r1 - r0) * wout
        cols = n * m
        g0, g1 = bounds[g], bounds[g + 1]
        for ci0 in range(0, cin, ci_chunk):
            ci1 = min(cin, ci0 + ci_chunk)
            k0, k1 = ci0 * kh * kw, ci1 * kh * kw
            kcur = k1 - k0
            _im2col_band(xa, r0, r1, kh, kw, stride, pt, pl, p.upsample, wout, col, ci0, ci1)
            src = col[:kcur, :cols]
            for co0 in range(g0, g1, pr):
                co1 = min(g1, co0 + pr)
                if f32_weights:
                    pw = w2[co0:co1, k0:k1]
                else:
                    pw = decode_block_to_f32(w2[co0:co1], w_dtype, k0, k1,
                                             panel[: (co1 - co0) * kcur]).reshape(co1 - co0, kcur)
                sgemm_into(pw, src, tile[co0 - g0 : co1 - g0, :cols], ci0 > 0)
        for i in range(n):
            t = tile[: g1 - g0, i * m : (i + 1) * m]
            dst = out_flat[i, g0:g1, r0 * wout : r1 * wout]
            if b32 is not None:
                np.add(t, b32[g0:g1], out=dst)
            else:
                np.copyto(dst, t)

    return make_state, work


def _pointwise(p: ConvPlan, xa: np.ndarray, w2: np.ndarray, w_dtype: str, b32: np.ndarray | None,
               out_flat: np.ndarray) -> tuple[Callable[[int], _State], _Work]:
    """1x1, stride 1, unpadded: ``out[i, panel, band] = panel @ x[i, :, band]``, no im2col."""
    n, hout, wout = p.n, p.hout, p.wout
    br, pr, groups, bounds = p.band_rows, p.panel_rows, p.groups, p.bounds
    f32_weights = w_dtype == "F32" and isinstance(w2, np.ndarray)  # a LoraWeight is merged per panel
    x_flat = xa.reshape(n, p.cin, xa.shape[2] * xa.shape[3])

    def make_state(_w: int) -> _State:
        return (None if f32_weights else np.empty((pr, p.k), np.float32)),

    def work(state: _State, item: int) -> None:
        (panel,) = state
        b, g = divmod(item, groups)
        r0 = b * br
        r1 = min(hout, r0 + br)
        for co0 in range(bounds[g], bounds[g + 1], pr):
            co1 = min(bounds[g + 1], co0 + pr)
            if f32_weights:
                pw = w2[co0:co1]
            else:
                # serial decode: we are inside parallel work already (see module doc)
                pw = decode_to_f32(w2[co0:co1], w_dtype, panel[: co1 - co0], parallel=False)
            for i in range(n):
                dst = out_flat[i, co0:co1, r0 * wout : r1 * wout]
                np.matmul(pw, x_flat[i, :, r0 * wout : r1 * wout], out=dst)
                if b32 is not None:
                    dst += b32[co0:co1]

    return make_state, work


def _winograd(p: ConvPlan, xa: np.ndarray, w2: np.ndarray, w_dtype: str, b32: np.ndarray | None,
              out_flat: np.ndarray) -> tuple[Callable[[int], _State], _Work]:
    """Winograd F(2x2, 3x3): per band and group, as :func:`_direct` but in the transform domain —
    per K chunk the input transform once, per weight panel its transform and 16 accumulating
    sgemms ``acc[xi, panel rows, tiles] += U[xi] @ V[xi]``; finally the output transform + bias."""
    n, cin, hout, wout = p.n, p.cin, p.hout, p.wout
    pt, _pb, pl, _pr = p.pad
    br, pr, groups, bounds, ci_chunk, tc = p.band_rows, p.panel_rows, p.groups, p.bounds, p.ci_chunk, p.tile_cols
    f32_weights = w_dtype == "F32" and isinstance(w2, np.ndarray)  # a LoraWeight is merged per panel
    t_max = n * (br // 2) * tc
    out_np = np.asarray(out_flat)  # a memmap's ndarray view, for Numba
    b_flat = b32.reshape(-1) if b32 is not None else np.empty(0, np.float32)

    def make_state(_w: int) -> _State:
        return (wino_buffer(ci_chunk, t_max),
                None if f32_weights else buffers.empty(pr * p.kc),
                wino_buffer(pr, ci_chunk),
                wino_buffer(p.group_rows, t_max))

    def work(state: _State, item: int) -> None:
        V, dec, U, acc = state
        b, g = divmod(item, groups)
        r0 = b * br
        tr = -(-(min(hout, r0 + br) - r0) // 2)
        t = n * tr * tc
        g0, g1 = bounds[g], bounds[g + 1]
        for ci0 in range(0, cin, ci_chunk):
            ci1 = min(cin, ci0 + ci_chunk)
            c = ci1 - ci0
            wino_input(xa, r0, tr, pt, pl, p.upsample, tc, V, ci0, ci1)
            for co0 in range(g0, g1, pr):
                co1 = min(g1, co0 + pr)
                rows = co1 - co0
                if f32_weights:
                    pw = w2[co0:co1, ci0 * 9 : ci1 * 9]
                else:
                    pw = decode_block_to_f32(w2[co0:co1], w_dtype, ci0 * 9, ci1 * 9,
                                             dec[: rows * c * 9]).reshape(rows, c * 9)
                wino_weight(pw, rows, c, U)
                for xi in range(16):
                    sgemm_into(U[xi, :rows, :c], V[xi, :c, :t], acc[xi, co0 - g0 : co1 - g0, :t], ci0 > 0)
        wino_output(acc, g1 - g0, tr, tc, n, r0, hout, wout, out_np, g0, b_flat, b32 is not None)

    return make_state, work


# ============================================================================================
# public API
# ============================================================================================


def conv2d(
    x: np.ndarray,
    w: np.ndarray,
    w_dtype: str,
    bias: np.ndarray | None = None,
    bias_dtype: str | None = None,
    *,
    stride: int = 1,
    padding: int = 1,
    pad: tuple[int, int, int, int] | None = None,
    upsample: bool = False,
    band_rows: int | None = None,
    out: np.ndarray | None = None,
    panel_rows: int | None = None,
    algo: str | None = None,
) -> np.ndarray:
    """2-D convolution (cross-correlation, like torch) computed in output row bands.

    Args:
        x: ``[N, Cin, H, W]`` float32, C-contiguous; may be a ``np.memmap`` (only the input rows
            each band needs are read).
        w: ``[Cout, Cin, kh, kw]`` in its stored dtype: F32 float32, F16 float16, BF16 uint16
            bit patterns, F8_E4M3 / F8_E5M2 uint8 codes. C-contiguous (an mmap view is fine).
        w_dtype: the safetensors tag of ``w``.
        bias: optional ``[Cout]`` in its stored dtype ``bias_dtype`` (default: ``w_dtype`` if
            ``bias`` is not float32, else "F32").
        stride: 1 or 2 (any positive stride works).
        padding: zero padding on all four sides, unless ``pad=(top, bottom, left, right)`` is
            given (the VAE encoder's downsample uses ``pad=(0, 1, 0, 1)``, ``padding=0``).
        upsample: convolve the 2x nearest-neighbour upsampling of ``x`` (fused; never built).
        band_rows: output rows per band (scratch grows with it); default from
            :func:`conv2d_plan`.
        out: optional ``[N, Cout, Hout, Wout]`` float32 C-contiguous destination; may be a
            ``np.memmap`` (written band by band).
        panel_rows: output channels decoded per weight panel; default from :func:`conv2d_plan`.
        algo: "auto" (default ``DEFAULT_ALGO``: Winograd F(2x2, 3x3) for 3x3 stride-1 kernels,
            except with ``band_rows=1``), "direct" or "winograd".

    Returns:
        ``out`` (allocated if not given).
    """
    if w_dtype not in _WEIGHT_TAGS:
        raise ValueError(f"unsupported weight dtype {w_dtype!r}; expected one of {_WEIGHT_TAGS}")
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d expects x [N,Cin,H,W] and w [Cout,Cin,kh,kw]: {x.shape} {w.shape}")
    if x.dtype != np.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    lora = isinstance(w, LoraWeight)  # LoRA/LoCon factors, merged into each decoded panel
    if lora and w.tag != w_dtype:
        raise TypeError(f"LoRA-wrapped weight is {w.tag}, but {w_dtype} was asked for")
    if not lora and w.dtype.itemsize != DECODE_TAGS[w_dtype].itemsize:
        raise TypeError(f"w of dtype {w.dtype} cannot hold {w_dtype} weights")
    n, cin, h, wid = x.shape
    cout, cin_w, kh, kw = w.shape
    if cin_w != cin:
        raise ValueError(f"x has {cin} channels, w expects {cin_w}")
    stride = int(stride)
    if stride < 1:
        raise ValueError("stride must be >= 1")
    _, _, hout, wout = conv2d_out_shape(x.shape, w.shape, stride=stride, padding=padding, pad=pad, upsample=upsample)
    if out is None:
        out = buffers.empty((n, cout, hout, wout))
    elif out.shape != (n, cout, hout, wout) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 {(n, cout, hout, wout)} array")
    if n == 0 or cout == 0 or hout == 0 or wout == 0:
        return out

    if cin == 0:  # empty reduction: bias only
        out[...] = 0.0
        if bias is not None:
            btag = bias_dtype or _BIAS_TAG_OF_DTYPE.get(bias.dtype, w_dtype)
            out += decode_to_f32(np.ascontiguousarray(bias), btag).reshape(1, cout, 1, 1)
        return out
    xa = np.asarray(x)  # a memmap's plain-ndarray view (no copy, no read)
    if not xa.flags.c_contiguous:
        xa = np.ascontiguousarray(xa)
    xa = xa.view()
    xa.flags.writeable = False  # one compiled specialisation for read-only (mmap) and normal input
    w2 = w.as_2d() if lora else np.ascontiguousarray(w).reshape(cout, cin * kh * kw)
    b32: np.ndarray | None = None
    if bias is not None:
        btag = bias_dtype or _BIAS_TAG_OF_DTYPE.get(bias.dtype, w_dtype)
        b32 = decode_to_f32(np.ascontiguousarray(bias), btag, np.empty(cout, np.float32))
        b32 = b32.reshape(cout, 1)

    p = conv2d_plan(x.shape, w.shape, w_dtype, stride=stride, padding=padding, pad=pad, upsample=upsample,
                    band_rows=band_rows, panel_rows=panel_rows, algo=algo)
    path = _winograd if p.winograd else _pointwise if p.pointwise else _direct
    make_state, work = path(p, xa, w2, w_dtype, b32, out.reshape(n, cout, hout * wout))
    if p.workers > 1 and p.items > 1:
        with blas_single_threaded():
            parallel_items(p.items, p.workers, make_state, work)
    else:
        parallel_items(p.items, 1, make_state, work)
    return out
