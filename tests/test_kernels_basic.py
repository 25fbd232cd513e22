"""Kernels (decode, linear, norms, activations, embeddings) vs numpy / torch / diffusers references.

Tolerances are stated per op next to each assertion.  Shapes are deliberately odd (1 row, 1 head,
K not a multiple of 8, sizes that are not multiples of panels/tiles/chunks).
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from helpers import rel_err as _rel_err

from streamexec.kernels import activations as act
from streamexec.kernels import buffers
from streamexec.kernels import linear as lin
from streamexec.kernels.decode import DECODE_TAGS, as_f32, decode_to_f32
from streamexec.kernels.embeddings import (
    apply_rope,
    latent_image_ids,
    patchify,
    rope_freqs,
    timestep_embedding,
    unpatchify,
)
from streamexec.kernels.norms import (
    group_norm,
    group_norm_accumulate,
    group_norm_apply,
    group_norm_finalize,
    group_norm_stats,
    layer_norm,
    rms_norm,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

RNG = np.random.default_rng(1234)


def _ro(a: np.ndarray) -> np.ndarray:
    """A read-only view, like an mmapped tensor."""
    v = a.view()
    v.flags.writeable = False
    return v


def _assert_bits_equal_nan_positions(got: np.ndarray, ref: np.ndarray) -> None:
    """Same NaN positions; every non-NaN element bit-identical."""
    gn, rn = np.isnan(got), np.isnan(ref)
    np.testing.assert_array_equal(gn, rn)
    np.testing.assert_array_equal(got.view(np.uint32)[~gn], ref.view(np.uint32)[~rn])


# --------------------------------------------------------------------------------------------------
# decode: bit-exact over every pattern
# --------------------------------------------------------------------------------------------------

ALL16 = np.arange(65536, dtype=np.uint16)
ALL8 = np.arange(256, dtype=np.uint8)


def _e4m3_spec(b: int) -> float:
    """OCP float8 e4m3fn: bias 7, no inf, S.1111.111 is NaN, subnormals m * 2**-9."""
    s = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 0xF, b & 7
    if e == 0xF and m == 7:
        return math.nan
    if e == 0:
        return s * m * 2.0**-9
    return s * (1 + m / 8) * 2.0 ** (e - 7)


@pytest.mark.parametrize("parallel", [False, True])
def test_decode_bf16_all_patterns(parallel):
    got = decode_to_f32(_ro(ALL16), "BF16", parallel=parallel)
    ref = (ALL16.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))  # incl. NaN payloads


@pytest.mark.parametrize("parallel", [False, True])
def test_decode_f16_all_patterns(parallel):
    got = decode_to_f32(_ro(ALL16.view(np.float16)), "F16", parallel=parallel)
    ref = ALL16.view(np.float16).astype(np.float32)
    _assert_bits_equal_nan_positions(got, ref)


@pytest.mark.parametrize("parallel", [False, True])
def test_decode_e4m3_all_patterns(parallel):
    got = decode_to_f32(_ro(ALL8), "F8_E4M3", parallel=parallel)
    ref = np.array([_e4m3_spec(int(b)) for b in ALL8], dtype=np.float32)
    _assert_bits_equal_nan_positions(got, ref)
    assert np.isnan(got).sum() == 2  # 0x7f and 0xff only
    if hasattr(torch, "float8_e4m3fn"):
        t = torch.from_numpy(ALL8.copy()).view(torch.float8_e4m3fn).float().numpy()
        _assert_bits_equal_nan_positions(got, t)


@pytest.mark.parametrize("parallel", [False, True])
def test_decode_e5m2_all_patterns(parallel):
    got = decode_to_f32(_ro(ALL8), "F8_E5M2", parallel=parallel)
    ref = (ALL8.astype(np.uint16) << 8).view(np.float16).astype(np.float32)  # top byte of a half
    _assert_bits_equal_nan_positions(got, ref)
    if hasattr(torch, "float8_e5m2"):
        t = torch.from_numpy(ALL8.copy()).view(torch.float8_e5m2).float().numpy()
        _assert_bits_equal_nan_positions(got, t)


def test_decode_shapes_out_and_parallel_agree():
    raw = RNG.integers(0, 65536, size=(3, 70001), dtype=np.uint16)  # > parallel threshold
    out = np.empty(raw.size, np.float32)  # any shape with the right size
    a = decode_to_f32(_ro(raw), "BF16", out=out)
    assert a is out
    b = decode_to_f32(raw, "BF16", parallel=False)
    assert b.shape == raw.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.reshape(-1).view(np.uint32))
    h = raw.view(np.float16)
    np.testing.assert_array_equal(
        decode_to_f32(h, "F16", parallel=True).view(np.uint32),
        decode_to_f32(h, "F16", parallel=False).view(np.uint32),
    )
    f = RNG.standard_normal((4, 5)).astype(np.float32)
    assert decode_to_f32(f, "F32") is f  # no copy
    np.testing.assert_array_equal(decode_to_f32(f, "F32", out=np.empty(20, np.float32)), f.ravel())
    assert decode_to_f32(np.empty((0, 3), np.uint8), "F8_E4M3").shape == (0, 3)


def test_decode_rejects_bad_input():
    with pytest.raises(ValueError):
        decode_to_f32(ALL8, "F4")
    with pytest.raises(TypeError):
        decode_to_f32(ALL8, "BF16")  # wrong storage width
    with pytest.raises(ValueError):
        decode_to_f32(ALL16[::2], "BF16")  # not contiguous
    with pytest.raises(ValueError):
        decode_to_f32(ALL16, "BF16", out=np.empty(3, np.float32))


def test_as_f32():
    assert as_f32(None, None) is None
    v = np.arange(5, dtype=np.float32)
    assert as_f32(v, None) is v
    np.testing.assert_array_equal(as_f32(v.astype(np.float16), None), v)
    bf = (v.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(as_f32(bf, "BF16"), v)


# --------------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------------


def _stored(w32: np.ndarray, tag: str) -> np.ndarray:
    """w32 rounded into storage dtype ``tag`` (returned as stored: uint16 / uint8 / float16)."""
    if tag == "F32":
        return w32
    if tag == "F16":
        return w32.astype(np.float16)
    if tag == "BF16":
        u = w32.view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    # fp8: any byte pattern except NaN
    b = RNG.integers(0, 256, size=w32.shape, dtype=np.uint8)
    if tag == "F8_E4M3":
        b[(b & 0x7F) == 0x7F] = 0x30
    else:
        b[(b & 0x7C) == 0x7C] = 0x30
    return b


def _act_ref(t, name):
    if name is None:
        return t
    if name == "silu":
        return F.silu(t)
    if name == "gelu":
        return F.gelu(t)
    if name == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    return t * torch.sigmoid(1.702 * t)


def _linear_ref(x, w_f32, bias, residual, activation, combine="add"):
    t = torch.from_numpy(x.astype(np.float64)) @ torch.from_numpy(w_f32.astype(np.float64)).T
    if bias is not None:
        t = t + torch.from_numpy(bias.astype(np.float64))
    t = _act_ref(t, activation)
    if residual is not None:
        r = torch.from_numpy(residual.astype(np.float64))
        t = t + r if combine == "add" else t * r
    return t.numpy()


@pytest.fixture
def force_parallel(monkeypatch):
    """Make linear use its worker threads even for the small test products."""
    monkeypatch.setattr(lin, "_PARALLEL_MIN_FLOP", 0)
    monkeypatch.setattr(lin, "_PARALLEL_MIN_DECODE", 0)


# Tolerance for linear: max |err| <= 1e-5 * max |ref| (f32 accumulation in BLAS, K <= 1000;
# activations add ~1e-7 relative).
LIN_TOL = 1e-5


@pytest.mark.parametrize("tag", sorted(DECODE_TAGS))
@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (3, 65, 33), (37, 129, 257), (130, 320, 100)])
@pytest.mark.parametrize("workers", [1, 2])
def test_linear_dtypes_shapes(tag, m, k, n, workers, force_parallel):
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = _stored(RNG.standard_normal((n, k)).astype(np.float32), tag)
    wf = decode_to_f32(w, tag)
    bias = RNG.standard_normal(n).astype(np.float32)
    for panel in (None, 7, 64):
        y = lin.linear(x, _ro(w), tag, _ro(bias), panel_rows=panel, workers=workers)
        assert _rel_err(y, _linear_ref(x, wf, bias, None, None)) < LIN_TOL
    y = lin.linear(x, w, tag, workers=workers)
    assert _rel_err(y, _linear_ref(x, wf, None, None, None)) < LIN_TOL


@pytest.mark.parametrize("activation", [None, "silu", "gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("workers", [1, 2])
def test_linear_epilogue(activation, workers, force_parallel):
    m, k, n = 70, 33, 150
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = _stored(RNG.standard_normal((n, k)).astype(np.float32) * 0.3, "BF16")
    wf = decode_to_f32(w, "BF16")
    bias = RNG.standard_normal(n).astype(np.float16)  # F16 bias, inferred tag
    b32 = bias.astype(np.float32)
    res = RNG.standard_normal((m, n)).astype(np.float32)
    for combine in ("add", "mul"):
        ref = _linear_ref(x, wf, b32, res, activation, combine)
        y = lin.linear(x, w, "BF16", bias, residual=_ro(res), activation=activation,
                       combine=combine, panel_rows=48, workers=workers)
        assert _rel_err(y, ref) < LIN_TOL
        # in place: out is the residual (tiles of 5 rows so several tiles per panel)
        o = res.copy()
        y2 = lin.linear(x, w, "BF16", bias, out=o, residual=o, activation=activation,
                        combine=combine, panel_rows=48, row_chunk=5, workers=workers)
        assert y2 is o
        assert _rel_err(o, ref) < LIN_TOL


def test_linear_f32_weight_and_row_split(force_parallel):
    # tall x (rows split across workers) and an F32 weight (no decode, used in place)
    m, k, n = 1100, 24, 20
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = RNG.standard_normal((n, k)).astype(np.float32)
    assert len(lin._split(m, n, 2)) == 2 and lin._split(m, n, 2)[0][3] == n  # rows split
    for tag, ww in (("F32", _ro(w)), ("BF16", _stored(w, "BF16"))):
        wf = decode_to_f32(ww, tag)
        y = lin.linear(x, ww, tag, residual=x[:, :n].copy(), activation="silu", workers=2)
        assert _rel_err(y, _linear_ref(x, wf, None, x[:, :n], "silu")) < LIN_TOL


def test_linear_restores_blas_threads(force_parallel):
    from streamexec.kernels import blas as blas_mod

    ctl = blas_mod._blas_ctl()
    if ctl is None:
        pytest.skip("BLAS thread count not controllable here")
    before = ctl.get_threads()
    x = RNG.standard_normal((40, 50)).astype(np.float32)
    lin.linear(x, _stored(RNG.standard_normal((64, 50)).astype(np.float32), "F16"), "F16")
    assert ctl.get_threads() == before


def test_linear_pinned_blas_uses_workers(monkeypatch):
    # Inside blas_single_threaded (what the executor holds for a whole run) BLAS stays on one
    # thread and a mid-size product is split over the kernel workers (not one thread alone).
    from streamexec.kernels import blas as blas_mod

    if blas_mod._blas_ctl() is None or lin.linear_workers() < 2:
        pytest.skip("needs controllable BLAS threads and >= 2 workers")
    m, k, n = 154, 768, 320  # SD 1.5 cross-attention to_k: 76 MFLOP
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = _stored(RNG.standard_normal((n, k)).astype(np.float32), "F16")
    ref = _linear_ref(x, decode_to_f32(w, "F16"), None, None, None)
    seen = []
    orig = lin._Job.run

    def run(self, *a):
        seen.append(a[:4])
        return orig(self, *a)

    monkeypatch.setattr(lin._Job, "run", run)
    with blas_mod.blas_single_threaded():
        assert blas_mod.blas_pinned() and blas_mod._blas_ctl().get_threads() == 1
        y = lin.linear(x, w, "F16")
        assert blas_mod._blas_ctl().get_threads() == 1
    assert not blas_mod.blas_pinned()
    assert len(seen) >= 2  # blocks handed out to the workers, each output element exactly once
    cover = np.zeros((m, n), np.int32)
    for r0, r1, c0, c1 in seen:
        cover[r0:r1, c0:c1] += 1
    assert (cover == 1).all()
    assert _rel_err(y, ref) < LIN_TOL


def _alloc_peak(fn) -> tuple[int, int]:
    """(peak bytes ``fn`` allocates, of which buffers.py's own maps): tracemalloc cannot see the
    buffers of >= 2 MiB that ``kernels/buffers.py`` maps itself, so their own count is added
    (the sum of both peaks, never less than the real one)."""
    tracemalloc.start()
    try:
        buffers.reset_mapped_peak()
        base, live = tracemalloc.get_traced_memory()[0], buffers.mapped_bytes()
        fn()
        mapped = buffers.mapped_peak() - live
        return tracemalloc.get_traced_memory()[1] - base + mapped, mapped
    finally:
        tracemalloc.stop()


def test_linear_scratch_is_bounded():
    # W: 8192 x 1536 bf16 (25 MB stored, 50 MB as f32).  linear must never hold an f32 W: its
    # default panels are 2 workers x 1024 rows x 1536 x 4 B = 12.6 MB.
    n, k, m = 8192, 1536, 16
    w = RNG.integers(0x3C00, 0x3F80, size=(n, k), dtype=np.uint16)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    out = np.empty((m, n), np.float32)
    ref = x.astype(np.float64) @ decode_to_f32(w, "BF16").astype(np.float64).T
    # 1) caller-provided scratch of exactly workers * panel * K elements: nothing else needed
    p = lin.default_panel_rows(k, n)
    nbytes = lin.linear_scratch_bytes(k, p)
    assert nbytes == 4 * k * p * lin.linear_workers()
    scratch = np.empty(nbytes // 4, np.float32)
    lin.linear(x, w, "BF16", out=out, scratch=scratch)
    assert _rel_err(out, ref) < LIN_TOL
    # 2) peak allocation during the call (numpy's, traced, + buffers.py's own maps, counted)
    # stays far below the f32 size of W; the default panels are mapped buffers (>= 2 MiB)
    peak, mapped = _alloc_peak(lambda: lin.linear(x, w, "BF16", out=out))
    assert mapped >= nbytes  # the panels were seen (tracemalloc alone would report ~0)
    assert peak < 4 * n * k / 3, peak  # < 1/3 of a full f32 W
    peak, _ = _alloc_peak(lambda: lin.linear(x, w, "BF16", out=out, panel_rows=100))
    assert peak < 2 * 100 * k * 4 + (1 << 20), peak  # 2 panels of 100 rows (+ small change)
    # 3) a scratch with room for one panel only still works (one worker)
    lin.linear(x, w, "BF16", out=out, scratch=np.empty(p * k, np.float32))
    assert _rel_err(out, ref) < LIN_TOL


def test_linear_rejects_bad_input():
    x = np.ones((3, 4), np.float32)
    w = np.ones((5, 4), np.float32)
    with pytest.raises(TypeError):
        lin.linear(x.T, w, "F32")  # x not C-contiguous
    with pytest.raises(ValueError):
        lin.linear(np.ones((3, 5), np.float32), w, "F32")  # K mismatch
    with pytest.raises(ValueError):
        lin.linear(x, w, "F32", activation="relu6")
    with pytest.raises(ValueError):
        lin.linear(x, w, "F32", combine="sub")
    with pytest.raises(ValueError):
        lin.linear(x, w, "BF16" if False else "F32", bias=np.ones(4, np.float32))
    y = lin.linear(np.ones((0, 4), np.float32), w, "F32")
    assert y.shape == (0, 5)
    y = lin.linear(np.ones((2, 0), np.float32), np.ones((3, 0), np.float32), "F32",
                   bias=np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(y, [[0, 1, 2], [0, 1, 2]])


@pytest.mark.parametrize("workers_forced", [False, True])
def test_geglu_matches_diffusers_semantics(workers_forced, monkeypatch):
    if workers_forced:
        monkeypatch.setattr(lin, "_PARALLEL_MIN_FLOP", 0)
        monkeypatch.setattr(lin, "_PARALLEL_MIN_DECODE", 0)
    m, k, inner = 45, 40, 72
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = _stored(RNG.standard_normal((2 * inner, k)).astype(np.float32) * 0.2, "F16")
    b = RNG.standard_normal(2 * inner).astype(np.float32)
    h = torch.from_numpy(x.astype(np.float64)) @ torch.from_numpy(
        w.astype(np.float64)).T + torch.from_numpy(b.astype(np.float64))
    hs, gate = h.chunk(2, dim=-1)
    ref = (hs * F.gelu(gate)).numpy()
    for rc in (None, 8):
        y = lin.geglu(x, w, "F16", b, row_chunk=rc, panel_rows=32)
        assert _rel_err(y, ref) < LIN_TOL


def test_gated_gelu_matches_t5():
    m, k, inner = 33, 48, 100
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w0 = _stored(RNG.standard_normal((inner, k)).astype(np.float32) * 0.2, "BF16")
    w1 = _stored(RNG.standard_normal((inner, k)).astype(np.float32) * 0.2, "BF16")
    tx = torch.from_numpy(x.astype(np.float64))
    t0 = tx @ torch.from_numpy(decode_to_f32(w0, "BF16").astype(np.float64)).T
    t1 = tx @ torch.from_numpy(decode_to_f32(w1, "BF16").astype(np.float64)).T
    ref = (F.gelu(t0, approximate="tanh") * t1).numpy()
    y = lin.gated_gelu(x, w0, w1, "BF16", row_chunk=10)
    assert _rel_err(y, ref) < LIN_TOL


# --------------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------------

_X_ACT = np.concatenate([
    np.linspace(-30, 30, 60001, dtype=np.float32),
    (RNG.standard_normal(40002) * 5).astype(np.float32),
    np.array([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 100.0, -100.0], np.float32),
])  # 100011 elements: above the parallel threshold, not a multiple of anything


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh", "quick_gelu"])
def test_activations_vs_torch(name):
    x = _X_ACT
    got = getattr(act, name)(_ro(x))
    ref = _act_ref(torch.from_numpy(x), name).numpy()
    # |err| <= 2e-6 + 2e-6 |x|: a few f32 ulp of the result (gelu's erf is A&S 7.1.26, 1.5e-7 abs,
    # the same formula torch's vectorised erf uses)
    assert np.all(np.abs(got - ref) <= 2e-6 + 2e-6 * np.abs(x))
    # in place, 1 element, and NaN propagation
    y = x[:1001].copy()
    getattr(act, name)(y, out=y)
    np.testing.assert_array_equal(y, got[:1001])
    assert np.isnan(getattr(act, name)(np.array([np.nan], np.float32)))[0]


def test_apply_activation_none_is_copy():
    x = RNG.standard_normal(17).astype(np.float32)
    np.testing.assert_array_equal(act.apply_activation(x, None), x)
    with pytest.raises(ValueError):
        act.apply_activation(x, "relu")


@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 129), (5, 4608), (40, 77)])
def test_softmax_vs_torch(shape):
    x = (RNG.standard_normal(shape) * 4).astype(np.float32)
    got = act.softmax(_ro(x))
    ref = torch.softmax(torch.from_numpy(x), -1).numpy()
    assert np.abs(got - ref).max() <= 2e-6  # probabilities: absolute 2e-6
    # stability with huge logits, masked entries, a fully masked row (NaN like torch)
    z = x.reshape(-1, shape[-1]).copy() * 1000
    z[0, 0] = -np.inf
    if z.shape[0] > 1:
        z[1, :] = -np.inf
    got = act.softmax(z)
    ref = torch.softmax(torch.from_numpy(z), -1).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert np.all(np.abs(got[ok] - ref[ok]) <= 2e-6)
    act.softmax(z, out=z)  # in place
    np.testing.assert_array_equal(np.isnan(z), np.isnan(ref))


def test_add_mul_combine():
    a = RNG.standard_normal((33, 1001)).astype(np.float32)  # > parallel threshold
    b = RNG.standard_normal((33, 1001)).astype(np.float32)
    s = a.copy()
    act.add_(s, _ro(b))
    np.testing.assert_array_equal(s, a + b)
    p = a.copy()
    act.mul_(p, b)
    np.testing.assert_array_equal(p, a * b)
    h = RNG.standard_normal((9, 2 * 37)).astype(np.float32)
    got = act.geglu_combine(h)
    th = torch.from_numpy(h)
    hs, gate = th.chunk(2, dim=-1)
    assert np.abs(got - (hs * F.gelu(gate)).numpy()).max() <= 2e-6 * (1 + np.abs(h).max())
    got = act.gated_gelu_combine(a, b)
    ref = (F.gelu(torch.from_numpy(a), approximate="tanh") * torch.from_numpy(b)).numpy()
    assert np.abs(got - ref).max() <= 2e-6 * (1 + np.abs(a * b).max())


# --------------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------------

# GroupNorm / LayerNorm / RMSNorm: max |err| <= 1e-5 * max |ref| (stats in f64 here, f32 in torch)
NORM_TOL = 1e-5


@pytest.mark.parametrize("shape,groups", [((1, 6, 5, 7), 3), ((2, 32, 9, 11), 32), ((6, 1, 13), 2),
                                          ((1, 64, 3, 1), 32)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_vs_torch(shape, groups, silu):
    x = (RNG.standard_normal(shape) * 3 + 2).astype(np.float32)
    c = shape[-3]
    g = RNG.standard_normal(c).astype(np.float32)
    b = RNG.standard_normal(c).astype(np.float32)
    x4 = x if x.ndim == 4 else x[None]
    ref = F.group_norm(torch.from_numpy(x4), groups, torch.from_numpy(g), torch.from_numpy(b), 1e-6)
    if silu:
        ref = F.silu(ref)
    ref = ref.numpy().reshape(x.shape)
    got = group_norm(_ro(x), groups, g, b, 1e-6, silu=silu)
    assert _rel_err(got, ref) < NORM_TOL
    y = x.copy()
    group_norm(y, groups, g, b, 1e-6, silu=silu, out=y)  # in place
    np.testing.assert_array_equal(y, got)


def test_group_norm_large_mean_and_no_affine():
    x = (RNG.standard_normal((1, 8, 16, 16)) + 300).astype(np.float32)
    ref = F.group_norm(torch.from_numpy(x).double(), 4, eps=1e-5).numpy()
    got = group_norm(x, 4, None, None, 1e-5)
    assert np.abs(got - ref).max() < 2e-4  # |x - mean| ~ 1 carries f32 rounding of x ~ 300


def test_group_norm_stats_memmap_banded(tmp_path):
    n, c, h, w, groups = 1, 64, 37, 96, 32
    path = tmp_path / "map.f32"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, c, h, w))
    mm[:] = (RNG.standard_normal((n, c, h, w)) * 2 - 1).astype(np.float32)
    mm.flush()
    del mm
    x = np.load(path, mmap_mode="r")
    xd = np.asarray(x, dtype=np.float64).reshape(n, groups, -1)
    ref_mean = xd.mean(-1)
    ref_rstd = 1 / np.sqrt(xd.var(-1) + 1e-6)
    group_norm_stats(np.load(path, mmap_mode="r"), groups, 1e-6, band_rows=5)  # compiled first: JIT is not its
    box = []
    peak, _ = _alloc_peak(lambda: box.append(group_norm_stats(x, groups, 1e-6, band_rows=5)))
    mean, rstd = box[0]
    assert peak < x.nbytes / 4  # one band of 5 of the 37 rows (13.5 %), no full-size temporary
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rstd, ref_rstd, rtol=1e-6)
    # apply band by band == whole-map group_norm
    g = RNG.standard_normal(c).astype(np.float32)
    b = RNG.standard_normal(c).astype(np.float32)
    full = group_norm(np.ascontiguousarray(x), groups, g, b, 1e-6, silu=True)
    for h0 in range(0, h, 10):
        band = np.ascontiguousarray(x[:, :, h0 : h0 + 10])
        got = group_norm_apply(band, mean, rstd, g, b, silu=True)
        np.testing.assert_array_equal(got, full[:, :, h0 : h0 + 10])
    # accumulate from separate band buffers (as read back from a spill file)
    acc = None
    for h0 in range(0, h, 8):
        acc = group_norm_accumulate(np.ascontiguousarray(x[:, :, h0 : h0 + 8]), groups, acc)
    m2, r2 = group_norm_finalize(acc, (c // groups) * h * w, 1e-6)
    np.testing.assert_allclose(m2.reshape(n, groups), mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r2.reshape(n, groups), rstd, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (5, 320), (2, 3, 3072)])
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_vs_torch(shape, affine):
    x = (RNG.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    d = shape[-1]
    g = RNG.standard_normal(d).astype(np.float32) if affine else None
    b = RNG.standard_normal(d).astype(np.float32) if affine else None
    ref = F.layer_norm(torch.from_numpy(x), (d,), None if g is None else torch.from_numpy(g),
                       None if b is None else torch.from_numpy(b), 1e-6).numpy()
    got = layer_norm(_ro(x), g, b, 1e-6)
    if d > 1:
        assert _rel_err(got, ref) < NORM_TOL
    else:
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_layer_norm_adaln_modulation():
    bsz, t, d = 3, 5, 48
    x = RNG.standard_normal((bsz, t, d)).astype(np.float32)
    shift = RNG.standard_normal((bsz, d)).astype(np.float32)
    scale = RNG.standard_normal((bsz, d)).astype(np.float32)
    tn = F.layer_norm(torch.from_numpy(x), (d,), eps=1e-6)
    ref = (tn * (1 + torch.from_numpy(scale)[:, None]) + torch.from_numpy(shift)[:, None]).numpy()
    got = layer_norm(x.reshape(bsz * t, d), None, None, 1e-6, shift=shift, scale=scale)
    assert _rel_err(got.reshape(ref.shape), ref) < NORM_TOL
    got1 = layer_norm(x, None, None, 1e-6, shift=shift[0], scale=scale[0])  # [D]: every row
    ref1 = (tn * (1 + torch.from_numpy(scale[0])) + torch.from_numpy(shift[0])).numpy()
    assert _rel_err(got1, ref1) < NORM_TOL
    with pytest.raises(ValueError):
        layer_norm(x.reshape(-1, d), None, None, 1e-6, shift=shift[:2])  # 2 does not divide 15


@pytest.mark.parametrize("shape", [(1, 4096), (5, 3, 128), (7, 1, 10)])
@pytest.mark.parametrize("weighted", [False, True])
def test_rms_norm_vs_torch(shape, weighted):
    x = (RNG.standard_normal(shape) * 3).astype(np.float32)
    d = shape[-1]
    w = RNG.standard_normal(d).astype(np.float32) if weighted else None
    tx = torch.from_numpy(x)
    ref = tx * torch.rsqrt(tx.pow(2).mean(-1, keepdim=True) + 1e-6)
    if w is not None:
        ref = ref * torch.from_numpy(w)
    got = rms_norm(_ro(x), w, 1e-6)
    assert _rel_err(got, ref.numpy()) < NORM_TOL
    y = x.copy()
    rms_norm(y, w, 1e-6, out=y)
    np.testing.assert_array_equal(y, got)


# --------------------------------------------------------------------------------------------------
# embeddings
# --------------------------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("dim,flip,shift", [(320, True, 0), (256, True, 0), (320, False, 1),
                                            (7, True, 1)])
def test_timestep_embedding_vs_diffusers(dim, flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 0.5, 999, 500.5], dtype=np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
    got = timestep_embedding(t, dim, flip, shift)
    assert got.shape == ref.shape and got.dtype == np.float32
    # t <= 1: |err| <= 1e-6.  t ~ 1000: torch's f32 exp is off by 1 ulp on ~2% of the
    # frequencies (ours are correctly rounded), which moves t*freq by ~6e-5: |err| <= 1e-4.
    assert np.abs(got[:3] - ref[:3]).max() <= 1e-6
    assert np.abs(got - ref).max() <= 1e-4


def test_rope_vs_diffusers_flux():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    txt = np.zeros((3, 3), np.float32)
    img = latent_image_ids(4, 5)
    ids = np.concatenate([txt, img, (RNG.random((2, 3)) * 50).astype(np.float32)])
    n = ids.shape[0]
    cos, sin = rope_freqs(ids, (16, 56, 56), 10000)
    rc, rs = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(torch.from_numpy(ids))
    assert cos.shape == (n, 64)
    np.testing.assert_allclose(cos, rc.numpy()[:, ::2], rtol=0, atol=1e-7)
    np.testing.assert_allclose(sin, rs.numpy()[:, 1::2], rtol=0, atol=1e-7)
    for heads in (1, 3):
        x = RNG.standard_normal((n, heads, 128)).astype(np.float32)
        ref = apply_rotary_emb(torch.from_numpy(x)[None], (rc, rs), sequence_dim=1)[0].numpy()
        y = x.copy()
        assert apply_rope(y, cos, sin) is y
        assert np.abs(y - ref).max() <= 1e-6  # same f32 products/sums: in practice bit-equal


def test_patchify_and_ids_vs_flux_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    b, c, h, w = 2, 16, 6, 10
    lat = RNG.standard_normal((b, c, h, w)).astype(np.float32)
    ref = FluxPipeline._pack_latents(torch.from_numpy(lat), b, c, h, w).numpy()
    tok = patchify(lat)
    np.testing.assert_array_equal(tok, ref)
    back = FluxPipeline._unpack_latents(torch.from_numpy(tok), h * 8, w * 8, 8).numpy()
    np.testing.assert_array_equal(unpatchify(tok, h, w), back)
    np.testing.assert_array_equal(unpatchify(tok, h, w), lat)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    np.testing.assert_array_equal(latent_image_ids(h // 2, w // 2), ids.numpy())


@pytest.mark.parametrize("threshold", [0, 1 << 40])
def test_small_inputs_on_one_thread_match(threshold, monkeypatch):
    # Small inputs run the prange kernels on a team of one thread (kernels/_serial.py); both
    # paths must give the same bits. threshold 0: everything parallel; huge: one thread.
    from streamexec.kernels import _serial
    from streamexec.kernels import norms as nm
    from streamexec.kernels.embeddings import apply_rope, rope_freqs

    rng = np.random.default_rng(7)
    x4 = rng.standard_normal((2, 64, 9, 11)).astype(np.float32)
    x2 = rng.standard_normal((37, 96)).astype(np.float32)
    g64, g96 = (rng.standard_normal(n).astype(np.float32) for n in (64, 96))
    h = rng.standard_normal((37, 192)).astype(np.float32)
    q = rng.standard_normal((37, 3, 32)).astype(np.float32)
    cos, sin = rope_freqs(np.stack([np.zeros(37), np.arange(37), np.arange(37)], 1), [8, 12, 12])

    def results():
        return [
            nm.group_norm(x4, 32, g64, g64, 1e-5, silu=True),
            nm.layer_norm(x2, g96, g96, 1e-6),
            nm.rms_norm(x2, g96, 1e-6),
            act.apply_activation(x2, "gelu_tanh"),
            act.add_(x2.copy(), x2),
            act.mul_(x2.copy(), x2),
            act.softmax(x2),
            act.geglu_combine(h),
            act.gated_gelu_combine(x2, x2),
            apply_rope(q.copy(), cos, sin),
        ]

    monkeypatch.setattr(_serial, "SERIAL_MAX_ELEMS", threshold)
    import numba

    threads = numba.get_num_threads()
    got = results()
    assert numba.get_num_threads() == threads  # restored after each one-thread call
    monkeypatch.setattr(_serial, "SERIAL_MAX_ELEMS", (1 << 40) - threshold)
    want = results()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_all_finite():
    x = RNG.standard_normal(1001).astype(np.float32) * 1e30
    assert act.all_finite(x) and act.all_finite(x[:0]) and act.all_finite(x.reshape(7, 143)[:, ::2])
    for bad in (np.nan, np.inf, -np.inf):
        for pos in (0, 500, 1000):
            y = x.copy()
            y[pos] = bad
            assert not act.all_finite(y)
            assert not act.all_finite(y.reshape(7, 143)[:, ::1].T)  # non-contiguous path
    assert act.all_finite(np.full(64, np.finfo(np.float32).max, np.float32))  # no overflow to inf


@pytest.mark.parametrize("tag", sorted(DECODE_TAGS))
def test_decode_block_matches_full_decode(tag):
    # conv2d's K split decodes column blocks of a [Cout, K] weight: bit-identical to decode_to_f32
    from streamexec.kernels.decode import decode_block_to_f32

    w = _stored(RNG.standard_normal((13, 70)).astype(np.float32), tag)
    if tag != "F32":  # every bit pattern, NaN/inf/subnormal codes included
        bits = np.arange(w.size, dtype=np.uint64) * 997 % (1 << (8 * w.dtype.itemsize))
        w = bits.astype(np.uint16 if w.dtype.itemsize == 2 else np.uint8).view(w.dtype).reshape(13, 70)
    full = decode_to_f32(w, tag).view(np.uint32)
    for c0, c1 in ((0, 70), (5, 38), (69, 70), (7, 7)):
        out = np.empty(13 * (c1 - c0), np.float32)
        decode_block_to_f32(_ro(w), tag, c0, c1, out)
        np.testing.assert_array_equal(out.view(np.uint32).reshape(13, c1 - c0), full[:, c0:c1])


def test_sgemm_into_accumulates_on_strided_views():
    from streamexec.kernels.blas import sgemm_into

    a = RNG.standard_normal((40, 90)).astype(np.float32)
    b = RNG.standard_normal((90, 70)).astype(np.float32)
    c = np.full((40, 100), 7.0, np.float32)
    sgemm_into(a[:, :50], b[:50, 3:63], c[:, 20:80], False)
    sgemm_into(a[:, 50:], b[50:, 3:63], c[:, 20:80], True)
    ref = a.astype(np.float64) @ b[:, 3:63].astype(np.float64)
    assert _rel_err(c[:, 20:80], ref) < 1e-5
    assert (c[:, :20] == 7.0).all() and (c[:, 80:] == 7.0).all()


def test_huge_page_buffers_are_plain_writable_arrays_and_free_their_memory():
    """kernels.buffers.empty: the shape/dtype asked for, writable, C-contiguous; big ones are
    their own maps whose pages leave RSS when the last view goes."""
    from streamexec.kernels import buffers
    from streamexec.runtime.process import current_rss

    small = buffers.empty((3, 5))
    assert small.shape == (3, 5) and small.dtype == np.float32 and small.flags.writeable
    big = buffers.empty((3, 1 << 20), np.float32)  # 12 MiB
    assert big.shape == (3, 1 << 20) and big.flags.c_contiguous and big.flags.writeable
    before = current_rss()
    big.fill(1.0)
    view = big[1]
    assert current_rss() - before > 10 << 20
    del big
    assert float(view.sum()) == float(1 << 20)  # a view keeps the map alive
    del view
    assert current_rss() - before < 2 << 20
