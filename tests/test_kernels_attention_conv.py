"""kernels/attention.py and kernels/conv.py against torch references, plus their memory bounds.

References are computed by torch in float64 from the *same* (decoded) inputs:
``scaled_dot_product_attention`` with an explicit additive mask (causal -inf, T5 bias gathered
from the compact table), ``F.conv2d`` on ``F.pad``/``F.interpolate(mode="nearest")`` input with
the weight decoded by torch's own bf16/f16/fp8 -> f32 conversion.

Tolerances (f32 kernels vs f64 reference):
* attention: max|ours - ref| <= 1e-5 * max|ref|. The output is a softmax-weighted mean of v rows,
  so the error does not grow with Nk; scores are O(1) here (scale = 1/sqrt(D), or small q for
  scale = 1), exp is ~1 ulp. Measured ~2e-7.
* conv: max|ours - ref| <= 1e-6 * sqrt(K) * max|ref| with K = Cin*kh*kw (f32 rounding of a
  K-term dot product grows like a random walk). Measured ~2e-7 * max|ref| at K <= 300.
"""

from __future__ import annotations

import gc
import math
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from streamexec.kernels import blas as blas_mod
from streamexec.kernels import buffers
from streamexec.kernels.attention import (
    attention,
    attention_scratch_bytes,
    default_tiles,
)
from streamexec.kernels.blas import blas_single_threaded
from streamexec.kernels.conv import (
    conv2d,
    conv2d_band_input_rows,
    conv2d_band_slab,
    conv2d_band_slab_rows,
    conv2d_out_shape,
    conv2d_plan,
    conv2d_scratch_bytes,
)
from streamexec.kernels.threads import kernel_workers, parallel_items

ATT_TOL = 1e-5


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------


def ref_attention(q, k, v, scale, causal=False, rel_bias=None) -> np.ndarray:
    nq, h, _ = q.shape
    nk = k.shape[0]
    Q, K, V = (torch.from_numpy(np.ascontiguousarray(a)).permute(1, 0, 2).double() for a in (q, k, v))
    mask = torch.zeros(h, nq, nk, dtype=torch.float64)
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    if rel_bias is not None:
        mask = mask + torch.from_numpy(rel_bias).double()[:, j - i + nq - 1]
    if causal:
        mask = mask.masked_fill(j > i, float("-inf"))
    o = F.scaled_dot_product_attention(Q, K, V, attn_mask=mask, scale=scale)
    return o.permute(1, 0, 2).numpy()


def encode_weight(w32: np.ndarray, tag: str) -> tuple[np.ndarray, torch.Tensor]:
    """(stored array as the weight store hands it out, torch's own f32 decode of it)."""
    t = torch.from_numpy(w32)
    if tag == "F32":
        return w32, t
    if tag == "F16":
        h = t.half()
        return h.numpy(), h.float()
    if tag == "BF16":
        b = t.bfloat16()
        return b.view(torch.int16).numpy().view(np.uint16), b.float()
    f8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[tag]
    f = t.to(f8)
    return f.view(torch.uint8).numpy(), f.float()


def ref_conv(x, w_t, b, stride, pads, upsample) -> np.ndarray:
    xt = torch.from_numpy(np.array(x)).double()
    if upsample:
        xt = F.interpolate(xt, scale_factor=2, mode="nearest")
    top, bottom, left, right = pads
    xt = F.pad(xt, (left, right, top, bottom))
    bt = None if b is None else torch.from_numpy(b).double()
    return F.conv2d(xt, w_t.double(), bt, stride=stride).numpy()


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

# (Nq, Nk, H, D, causal, bias, q_tile, k_tile); the flops of the last ones exceed
# PARALLEL_MIN_FLOPS, so they run on the worker threads, the others in the calling thread.
ATT_CASES = [
    (1, 50, 1, 128, False, False, None, None),  # one query
    (100, 37, 3, 40, False, False, 7, 5),  # Nq != Nk, tiny tiles, many partial blocks
    (77, 77, 2, 64, True, False, 16, 16),  # CLIP causal
    (33, 33, 2, 64, False, True, 8, 8),  # T5 bias
    (20, 30, 2, 40, True, False, 6, 7),  # causal with Nk > Nq
    (129, 77, 1, 128, False, False, 50, None),  # cross-attention, one head, 77 keys (padded rows)
    (64, 500, 2, 80, False, False, None, None),  # default tiles
    (300, 300, 4, 40, True, True, 64, 128),  # causal + bias on the workers
    (700, 77, 8, 40, False, False, None, None),  # SD cross-attention shape, workers
    (513, 600, 3, 64, False, True, 100, 96),  # odd tiles, bias, workers
]


@pytest.mark.parametrize("nq,nk,h,d,causal,bias,tq,tk", ATT_CASES)
def test_attention_matches_torch(nq, nk, h, d, causal, bias, tq, tk):
    rng = np.random.default_rng(nq * 7 + nk)
    q, k, v = rand(rng, nq, h, d), rand(rng, nk, h, d), rand(rng, nk, h, d)
    rb = rand(rng, h, nq + nk - 1) if bias else None
    scale = 1.0 / math.sqrt(d)
    out = attention(q, k, v, scale, causal=causal, rel_bias=rb, q_tile=tq, k_tile=tk)
    assert out.shape == (nq, h, d) and out.dtype == np.float32
    assert rel_err(out, ref_attention(q, k, v, scale, causal, rb)) <= ATT_TOL


def test_attention_t5_scale_one_and_out_param():
    """T5: scale 1.0 (q pre-scaled by the model), relative bias; result lands in ``out``."""
    rng = np.random.default_rng(5)
    nq, h, d = 70, 4, 64
    q, k, v = rand(rng, nq, h, d) * 0.125, rand(rng, nq, h, d), rand(rng, nq, h, d)
    rb = rand(rng, h, 2 * nq - 1) * 3
    out = np.full((nq, h, d), np.nan, np.float32)
    res = attention(q, k, v, 1.0, rel_bias=rb, out=out, q_tile=32, k_tile=24)
    assert res is out
    assert rel_err(out, ref_attention(q, k, v, 1.0, False, rb)) <= ATT_TOL


def test_attention_strided_qkv_views():
    """q/k/v sliced out of one fused [N, 3, H, D] projection (FLUX qkv) need no copies."""
    rng = np.random.default_rng(6)
    n, h, d = 150, 3, 40
    qkv = rand(rng, n, 3, h, d)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert not q.flags.c_contiguous
    out = attention(q, k, v, 0.2, q_tile=64, k_tile=50)
    assert rel_err(out, ref_attention(q, k, v, 0.2)) <= ATT_TOL


def test_attention_masked_rows_are_zero_not_nan():
    rng = np.random.default_rng(7)
    q, k, v = rand(rng, 5, 1, 8), rand(rng, 4, 1, 8), rand(rng, 4, 1, 8)
    rb = np.full((1, 8), -np.inf, np.float32)  # every key of every query masked
    out = attention(q, k, v, 1.0, rel_bias=rb)
    assert np.array_equal(out, np.zeros_like(out))
    rb[0, 4:] = 0.0  # bias index j - i + 4 >= 4  <=>  j >= i: query 4 has no key left
    out = attention(q, k, v, 1.0, rel_bias=rb)
    assert np.array_equal(out[4], np.zeros_like(out[4]))
    assert rel_err(out[:4], ref_attention(q[:4], k, v, 1.0, False, rb[:, 1:])) <= ATT_TOL


def test_attention_rejects_bad_shapes():
    q = np.zeros((4, 2, 8), np.float32)
    with pytest.raises(ValueError):
        attention(q, np.zeros((4, 3, 8), np.float32), q, 1.0)
    with pytest.raises(ValueError):
        attention(q, q, q, 1.0, rel_bias=np.zeros((2, 6), np.float32))
    with pytest.raises(TypeError):
        attention(q.astype(np.float64), q, q, 1.0)


@settings(max_examples=25, deadline=None)
@given(
    nq=st.integers(1, 90),
    nk=st.integers(1, 90),
    h=st.integers(1, 3),
    d=st.sampled_from([8, 40, 64]),
    causal=st.booleans(),
    bias=st.booleans(),
    tq=st.integers(1, 40),
    tk=st.integers(1, 40),
)
def test_attention_property(nq, nk, h, d, causal, bias, tq, tk):
    rng = np.random.default_rng(nq * 1000 + nk * 10 + h)
    q, k, v = rand(rng, nq, h, d), rand(rng, nk, h, d), rand(rng, nk, h, d)
    rb = rand(rng, h, nq + nk - 1) if bias else None
    out = attention(q, k, v, 1 / math.sqrt(d), causal=causal, rel_bias=rb, q_tile=tq, k_tile=tk)
    assert rel_err(out, ref_attention(q, k, v, 1 / math.sqrt(d), causal, rb)) <= ATT_TOL


def _traced_peak(fn) -> int:
    """Peak bytes ``fn`` allocates: numpy's allocations (tracemalloc) plus the buffers of 2 MiB
    and more that ``kernels/buffers.py`` maps itself (tracemalloc cannot see those; buffers.py
    counts them). The sum of both peaks: never less than the real peak."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        buffers.reset_mapped_peak()
        base, mapped = tracemalloc.get_traced_memory()[0], buffers.mapped_bytes()
        fn()
        return tracemalloc.get_traced_memory()[1] - base + buffers.mapped_peak() - mapped
    finally:
        tracemalloc.stop()


def test_attention_memory_is_per_tile_not_per_score_matrix():
    """Nq = Nk = 2048: the score matrix would be 16 MB per head; the kernel's scratch is tiles."""
    rng = np.random.default_rng(8)
    n, h, d = 2048, 2, 64
    q, k, v = rand(rng, n, h, d), rand(rng, n, h, d), rand(rng, n, h, d)
    out = np.empty_like(q)
    tq, tk = 256, 256
    attention(q, k, v, 0.125, q_tile=tq, k_tile=tk, out=out)  # compile / start the pool first
    peak = _traced_peak(lambda: attention(q, k, v, 0.125, q_tile=tq, k_tile=tk, out=out))
    scratch = attention_scratch_bytes(h, d, tq, tk)
    assert peak <= scratch + (64 << 10), (peak, scratch)
    assert peak < n * n * 4 / 16
    # and the default tiles stay far below one head's score matrix too
    peak_default = _traced_peak(lambda: attention(q, k, v, 0.125, out=out))
    dq, dk = default_tiles(n, n, d, h, kernel_workers())
    assert peak_default <= attention_scratch_bytes(h, d, dq, dk) + (64 << 10)
    assert peak_default < n * n * 4 / 2


def test_default_tiles_shapes():
    assert default_tiles(4096, 77, 40, 8, 2) == (4096, 77)  # one key block, 4 items per worker
    assert default_tiles(4096, 77, 40, 1, 2) == (512, 77)  # one head: split queries for balance
    tq, tk = default_tiles(4608, 4608, 128, 24, 2)
    assert tk == 512 and tq * tk * 4 <= 2 << 20
    assert default_tiles(1, 1, 8) == (1, 1)


# ----------------------------------------------------------------------------------------------
# conv
# ----------------------------------------------------------------------------------------------

# (N, Cin, Cout, H, W, k, stride, pad, upsample, band_rows, panel_rows, w_tag, bias_tag)
CONV_CASES = [
    (2, 5, 7, 9, 11, 3, 1, (1, 1, 1, 1), False, None, None, "F32", "F32"),
    (1, 4, 6, 8, 8, 3, 2, (1, 1, 1, 1), False, 2, 4, "BF16", "BF16"),  # SD downsample
    (2, 3, 4, 7, 5, 1, 1, (0, 0, 0, 0), False, 1, None, "F16", "F16"),  # 1x1: no im2col
    (1, 6, 5, 7, 9, 3, 1, (1, 1, 1, 1), True, 3, 2, "F8_E4M3", "F32"),  # fused upsample, odd H/W
    (1, 5, 6, 9, 8, 3, 2, (0, 1, 0, 1), False, None, None, "F8_E5M2", None),  # VAE enc downsample
    (2, 8, 16, 13, 13, 3, 1, (1, 1, 1, 1), False, 4, 5, "BF16", "F32"),  # bands don't divide H
    (1, 3, 2, 6, 7, 1, 2, (0, 0, 0, 0), False, None, None, "F32", None),  # 1x1 stride 2
    (1, 4, 70, 5, 5, 3, 1, (1, 1, 1, 1), True, None, 16, "BF16", "BF16"),
    (1, 3, 4, 6, 6, 3, 1, (2, 0, 1, 3), False, 1, None, "F16", None),  # asymmetric, band_rows=1
    # big enough for the worker threads (>= PARALLEL_MIN_FLOPS), incl. channel groups
    (2, 32, 48, 33, 29, 3, 1, (1, 1, 1, 1), False, 5, 16, "BF16", "F32"),
    (2, 64, 96, 8, 8, 3, 1, (1, 1, 1, 1), False, None, 32, "F16", "F16"),
    (1, 32, 24, 30, 31, 3, 1, (1, 1, 1, 1), True, 7, None, "F8_E4M3", "F32"),
    (2, 48, 40, 41, 37, 3, 2, (0, 1, 0, 1), False, 3, 8, "F32", "F32"),
    # > 128 input channels: the reduction is split in K chunks accumulated by sgemm (beta = 1)
    (2, 300, 40, 6, 7, 3, 1, (1, 1, 1, 1), False, None, None, "F16", "F16"),  # 3 chunks of 100
    (1, 260, 33, 5, 6, 3, 1, (1, 1, 1, 1), True, 2, 16, "BF16", "F32"),  # + upsample, panels
    (2, 200, 24, 9, 9, 3, 2, (0, 1, 0, 1), False, None, None, "F32", "F32"),  # F32 strided panels
    (1, 150, 20, 7, 7, 3, 1, (1, 1, 1, 1), False, None, 8, "F8_E4M3", None),
    (2, 256, 64, 8, 8, 3, 1, (1, 1, 1, 1), False, None, 16, "BF16", "BF16"),  # workers + groups
]


def _run_conv_case(case, x_override=None, out=None, algo=None):
    n, cin, cout, h, w, k, stride, pads, up, br, pr, tag, btag = case
    rng = np.random.default_rng(n * 100 + cin * 10 + cout)
    x = rand(rng, n, cin, h, w) if x_override is None else x_override
    w32 = rand(rng, cout, cin, k, k) * (1.0 / math.sqrt(cin * k * k))
    w_st, w_t = encode_weight(w32, tag)
    b_st = b_ref = None
    if btag is not None:
        b_st, b_t = encode_weight(rand(rng, cout), btag)
        b_ref = b_t.numpy().astype(np.float32)
    res = conv2d(x, w_st, tag, b_st, btag, stride=stride, pad=pads, upsample=up, band_rows=br, panel_rows=pr, out=out,
                 algo=algo)
    ref = ref_conv(x, w_t, b_ref, stride, pads, up)
    return res, ref, cin * k * k


@pytest.mark.parametrize("algo", ["direct", "winograd"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-s{c[6]}-{c[11]}")
def test_conv2d_matches_torch(case, algo):
    """Both algorithms (Winograd F(2x2, 3x3) applies to the 3x3 stride-1 cases; the others run
    direct either way) within f32 rounding of a float64 torch reference."""
    res, ref, kk = _run_conv_case(case, algo=algo)
    assert res.dtype == np.float32
    assert rel_err(res, ref) <= 1e-6 * math.sqrt(kk)


def test_conv2d_auto_picks_winograd_for_3x3_stride_1():
    p = conv2d_plan((2, 320, 64, 64), (320, 320, 3, 3), "F16", pad=(1, 1, 1, 1))
    assert p.winograd == 1
    assert conv2d_plan((2, 320, 64, 64), (320, 320, 3, 3), "F16", stride=2).winograd == 0
    assert conv2d_plan((2, 1280, 8, 8), (1280, 1280, 3, 3), "F16").winograd == 0  # 32 tiles: direct
    assert conv2d_plan((2, 320, 64, 64), (320, 320, 3, 3), "F16", band_rows=1).winograd == 0
    assert conv2d_plan((2, 320, 64, 64), (320, 320, 3, 3), "F16", algo="direct").winograd == 0
    with pytest.raises(ValueError):
        conv2d_plan((2, 3, 4, 4), (3, 3, 3, 3), "F32", algo="fft")


def test_bad_streamexec_conv_value_warns_and_keeps_auto():
    import os
    import subprocess
    import sys

    env = dict(os.environ, STREAMEXEC_CONV="fft")
    r = subprocess.run([sys.executable, "-c", "import streamexec.kernels.conv as c; print(c.DEFAULT_ALGO)"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "auto"
    assert "STREAMEXEC_CONV='fft' is not one of auto, direct, winograd; using auto" in r.stderr


def test_winograd_scratch_within_estimate():
    """Traced allocations of the Winograd path stay within conv2d_scratch_bytes."""
    rng = np.random.default_rng(16)
    cin, cout = 96, 80
    w = encode_weight(rand(rng, cout, cin, 3, 3) * 0.05, "F16")[0]
    x = rand(rng, 2, cin, 40, 36)
    out = np.empty((2, cout, 40, 36), np.float32)
    for br in (None, 2, 6):
        kw = dict(pad=(1, 1, 1, 1), band_rows=br, out=out, algo="winograd")
        conv2d(x, w, "F16", **kw)
        peak = _traced_peak(lambda kw=kw: conv2d(x, w, "F16", **kw))
        est = conv2d_scratch_bytes(x.shape, w.shape, "F16", pad=(1, 1, 1, 1), band_rows=br, algo="winograd")
        assert peak <= est + (64 << 10), (br, peak, est)


def test_conv2d_symmetric_padding_argument():
    rng = np.random.default_rng(11)
    x = rand(rng, 1, 3, 10, 9)
    w = rand(rng, 4, 3, 3, 3)
    a = conv2d(x, w, "F32", padding=1, stride=2)
    b = conv2d(x, w, "F32", pad=(1, 1, 1, 1), stride=2)
    np.testing.assert_array_equal(a, b)
    assert rel_err(a, ref_conv(x, torch.from_numpy(w), None, 2, (1, 1, 1, 1), False)) <= 1e-5


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 2),
    cin=st.integers(1, 6),
    cout=st.integers(1, 9),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    k=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    pads=st.tuples(*[st.integers(0, 2)] * 4),
    up=st.booleans(),
    br=st.one_of(st.none(), st.integers(1, 5)),
    pr=st.one_of(st.none(), st.integers(1, 5)),
    tag=st.sampled_from(["F32", "BF16", "F16"]),
)
def test_conv2d_property(n, cin, cout, h, w, k, stride, pads, up, br, pr, tag):
    hu, wu = (2 * h, 2 * w) if up else (h, w)
    if hu + pads[0] + pads[1] < k or wu + pads[2] + pads[3] < k:
        return  # empty output
    res, ref, kk = _run_conv_case((n, cin, cout, h, w, k, stride, pads, up, br, pr, tag, "F32"))
    assert rel_err(res, ref) <= 1e-6 * math.sqrt(kk) + 1e-7


def test_conv2d_memmap_in_and_out(tmp_path):
    """A spilled input map and a spilled output: same numbers as in memory."""
    case = CONV_CASES[9]
    n, cin, cout, h, w, k, stride, pads, up = case[:9]
    rng = np.random.default_rng(12)
    x = rand(rng, n, cin, h, w)
    xm = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="w+", shape=x.shape)
    xm[...] = x
    xm.flush()
    xr = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="r", shape=x.shape)
    oshape = conv2d_out_shape(x.shape, (cout, cin, k, k), stride=stride, pad=pads, upsample=up)
    om = np.memmap(tmp_path / "o.f32", dtype=np.float32, mode="w+", shape=oshape)
    res_mm, ref, kk = _run_conv_case(case, x_override=xr, out=om)
    assert res_mm is om
    res, _, _ = _run_conv_case(case, x_override=x)
    np.testing.assert_array_equal(np.asarray(om), res)
    assert rel_err(np.asarray(om), ref) <= 1e-6 * math.sqrt(kk)


@pytest.mark.parametrize(
    "k,stride,pads,up",
    [(3, 1, (1, 1, 1, 1), False), (3, 2, (0, 1, 0, 1), False), (3, 1, (1, 1, 1, 1), True), (1, 1, (0, 0, 0, 0), False)],
)
def test_band_input_rows_are_all_a_band_reads(k, stride, pads, up):
    """Zeroing every input row outside conv2d_band_input_rows leaves that band's output as is."""
    rng = np.random.default_rng(13)
    x = rand(rng, 1, 2, 11, 6)
    w = rand(rng, 3, 2, k, k)
    full = conv2d(x, w, "F32", stride=stride, pad=pads, upsample=up)
    hout = full.shape[2]
    for r0 in range(0, hout, 3):
        r1 = min(hout, r0 + 3)
        lo, hi = conv2d_band_input_rows(r0, r1, 11, k, stride=stride, pad_top=pads[0], upsample=up)
        xz = np.zeros_like(x)
        xz[:, :, lo:hi] = x[:, :, lo:hi]
        part = conv2d(xz, w, "F32", stride=stride, pad=pads, upsample=up)
        np.testing.assert_array_equal(part[:, :, r0:r1], full[:, :, r0:r1])


@pytest.mark.parametrize("k,pads,up", [(3, (1, 1, 1, 1), False), (3, (1, 1, 1, 1), True), (1, (0, 0, 0, 0), True),
                                      (3, (0, 1, 0, 1), False), (3, (2, 0, 1, 1), True)])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_band_slab_gives_the_band_of_the_whole_map(k, pads, up, rows):
    """Convolving the slab conv2d_band_slab names, with its padding, and taking its rows from j0
    gives each band of the whole map's convolution (float64 torch on the whole input); the slab
    is never taller than conv2d_band_slab_rows."""
    rng = np.random.default_rng(15)
    h = 9
    x = rand(rng, 1, 2, h, 5)
    w = rand(rng, 3, 2, k, k)
    ref = ref_conv(x, torch.from_numpy(w), None, 1, pads, up)
    hout = ref.shape[2]
    for r0 in range(0, hout, rows):
        r1 = min(hout, r0 + rows)
        s0, s1, slab_pad, j0 = conv2d_band_slab(r0, r1, h, k, pads, upsample=up)
        assert 0 <= s0 < s1 <= h and s1 - s0 <= conv2d_band_slab_rows(rows, k, upsample=up)
        y = conv2d(np.ascontiguousarray(x[:, :, s0:s1]), w, "F32", pad=slab_pad, upsample=up, algo="direct")
        assert rel_err(y[:, :, j0 : j0 + r1 - r0], ref[:, :, r0:r1]) <= 1e-6


def test_conv2d_scratch_bounded_by_band_rows_not_height():
    """Traced allocations (out preallocated) do not grow with H and stay within the estimate."""
    rng = np.random.default_rng(14)
    cin, cout, wd = 32, 64, 48
    w = encode_weight(rand(rng, cout, cin, 3, 3) * 0.05, "BF16")[0]
    peaks = {}
    for h in (48, 192):
        x = rand(rng, 1, cin, h, wd)
        out = np.empty((1, cout, h, wd), np.float32)
        kw = dict(pad=(1, 1, 1, 1), band_rows=2, panel_rows=16, out=out)
        conv2d(x, w, "BF16", **kw)  # compile / start the pool first
        peaks[h] = _traced_peak(lambda x=x, kw=kw: conv2d(x, w, "BF16", **kw))
        est = conv2d_scratch_bytes(x.shape, w.shape, "BF16", pad=(1, 1, 1, 1), band_rows=2, panel_rows=16)
        assert peaks[h] <= est + (64 << 10), (h, peaks[h], est)
    im2col_full = cin * 9 * 192 * wd * 4
    assert peaks[192] < im2col_full / 16
    assert peaks[192] <= peaks[48] + (64 << 10)


def test_conv2d_never_decodes_the_whole_weight():
    """A 256x256x3x3 bf16 weight (2.4 MB as f32) is decoded in panels of `panel_rows` rows."""
    rng = np.random.default_rng(15)
    cin = cout = 256
    w = encode_weight(rand(rng, cout, cin, 3, 3) * 0.02, "BF16")[0]
    x = rand(rng, 1, cin, 2, 2)  # tiny map: the im2col scratch (37 KB) is not what we measure
    out = np.empty((1, cout, 2, 2), np.float32)
    conv2d(x, w, "BF16", pad=(1, 1, 1, 1), panel_rows=32, out=out)
    peak = _traced_peak(lambda: conv2d(x, w, "BF16", pad=(1, 1, 1, 1), panel_rows=32, out=out))
    assert peak < cout * cin * 9 * 4 / 4  # one 32-row panel is 1/8 of the f32 weight


def test_conv2d_plan_defaults():
    # SD 1.5 UNet 1280ch at 8x8: one band, so channel groups keep both workers busy
    p = conv2d_plan((2, 1280, 8, 8), (1280, 1280, 3, 3), "BF16", pad=(1, 1, 1, 1), workers=2)
    assert p.n_bands == 1 and p.groups == 2 and p.panel_rows >= 64
    # VAE 128ch at 512x512: a direct band is one row of 512 outputs, a Winograd band one row of
    # 256 2x2 tiles; scratch a few MB either way
    p = conv2d_plan((1, 128, 512, 512), (128, 128, 3, 3), "BF16", pad=(1, 1, 1, 1), workers=2, algo="direct")
    assert p.band_rows == 1 and p.groups == 1
    p = conv2d_plan((1, 128, 512, 512), (128, 128, 3, 3), "BF16", pad=(1, 1, 1, 1), workers=2)
    assert p.winograd == 1 and p.band_rows == 2 and p.groups == 1
    for algo in ("direct", "winograd"):
        assert conv2d_scratch_bytes((1, 128, 512, 512), (128, 128, 3, 3), "BF16", pad=(1, 1, 1, 1),
                                    algo=algo) < 16 << 20
    # F32 weights are read in place: no panel scratch
    assert conv2d_scratch_bytes((1, 8, 4, 4), (8, 8, 1, 1), "F32", padding=0) == 0


def test_conv2d_rejects_bad_input():
    x = np.zeros((1, 3, 4, 4), np.float32)
    w = np.zeros((2, 3, 3, 3), np.float32)
    with pytest.raises(ValueError):
        conv2d(x, w, "F64")
    with pytest.raises(ValueError):
        conv2d(x, np.zeros((2, 4, 3, 3), np.float32), "F32")
    with pytest.raises(TypeError):
        conv2d(x.astype(np.float64), w, "F32")
    with pytest.raises(TypeError):
        conv2d(x, w, "BF16")  # float32 array cannot hold bf16 bit patterns


# ----------------------------------------------------------------------------------------------
# threading helpers
# ----------------------------------------------------------------------------------------------


def test_parallel_items_runs_every_item_once_and_propagates_errors():
    seen: list[int] = []
    parallel_items(37, 2, lambda w: w, lambda st_, it: seen.append(it))
    assert sorted(seen) == list(range(37))

    def boom(_st, it):
        if it == 5:
            raise RuntimeError("item 5")

    with pytest.raises(RuntimeError, match="item 5"):
        parallel_items(20, 2, lambda w: None, boom)


def test_blas_single_threaded_restores_thread_count():
    ctl = blas_mod._blas_ctl()
    if ctl is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS we can control")
    before = ctl.get_threads()
    with blas_single_threaded() as ok:
        assert ok and ctl.get_threads() == 1
        with blas_single_threaded():
            assert ctl.get_threads() == 1
        assert ctl.get_threads() == 1
    assert ctl.get_threads() == before
    a = np.ones((300, 300), np.float32)
    np.testing.assert_array_equal(a @ a, np.full((300, 300), 300, np.float32))  # pool usable again
