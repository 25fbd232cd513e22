"""Our GGUF reader against files written by the ``gguf`` package (GGML's own), and against broken files."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from _quant_files import K_QUANTS, QUANTIZABLE, stored, write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamexec.errors import CheckpointError
from streamexec.kernels.qtypes import GGUF_TYPES
from streamexec.weights.gguf_file import GGUFFile

GT = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType


def test_every_type_and_value_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {}
    for i, tag in enumerate(["F32", "F16", *QUANTIZABLE, *K_QUANTS]):
        shape = [(3, 256), (2, 5, 512), (256,), (1, 1, 2, 256)][i % 4]
        tensors[f"t.{tag}"] = (stored(tag, shape, rng), tag)
    kv = {
        "u8": (200, VT.UINT8), "i8": (-100, VT.INT8), "u16": (60000, VT.UINT16), "i16": (-30000, VT.INT16),
        "u32": (4_000_000_000, VT.UINT32), "i32": (-2_000_000_000, VT.INT32), "f32": (1.5, VT.FLOAT32),
        "bool": (True, VT.BOOL), "str": ("héllo ✓", VT.STRING), "u64": (2**63 + 5, VT.UINT64),
        "i64": (-(2**62), VT.INT64), "f64": (0.1, VT.FLOAT64),
        "arr.i32": ([1, -2, 3], VT.ARRAY), "arr.f32": ([0.5, 2.0], VT.ARRAY), "arr.str": (["a", "", "ü"], VT.ARRAY),
        "arr.bool": ([True, False], VT.ARRAY), "arr.nested": ([[1, 2], [3]], VT.ARRAY),
    }
    path = tmp_path / "all.gguf"
    write_gguf(path, tensors, kv)
    ref = gguf.GGUFReader(str(path))
    with GGUFFile(path) as f:
        assert f.version == 3 and f.alignment == 32 and f.architecture == "flux"
        assert f.header_bytes == path.read_bytes()[: f.data_offset]
        for k, (v, t) in kv.items():
            got = f.metadata[k]
            assert f.kv_types[k] == t
            if k == "arr.nested":
                assert [list(a) for a in got] == v
            elif t == VT.ARRAY:
                assert list(got) == v
            elif t == VT.FLOAT32:
                assert got == np.float32(v)
            else:
                assert got == v
        assert set(f.keys()) == set(tensors)
        by_name = {t.name: t for t in ref.tensors}
        for name, (arr, tag) in tensors.items():
            info = f.info(name)
            assert info.tag == tag and info.qtype.ggml_id == int(GT[tag])
            assert info.shape == tuple(reversed([int(d) for d in by_name[name].shape]))
            assert info.begin == by_name[name].data_offset and info.nbytes == by_name[name].n_bytes
            v = f.view(name)
            assert not v.flags.writeable
            assert v.shape == info.storage_shape and v.dtype == info.qtype.storage
            want = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            np.testing.assert_array_equal(v.reshape(-1).view(np.uint8), want)
            assert f.address <= v.ctypes.data < f.address + f.size  # zero-copy
        f.release("t.Q4_K")  # page control from MappedFile works on GGUF spans
        f.willneed(*f.byte_range("t.Q8_0"))


def test_custom_alignment_and_version_2(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "a.gguf"
    write_gguf(path, {"a": (stored("Q8_0", (3, 64), rng), "Q8_0"), "b": (stored("F32", (5,), rng), "F32"),
                      "c": (stored("Q6_K", (2, 256), rng), "Q6_K")}, alignment=256)
    with GGUFFile(path) as f:
        assert f.alignment == 256 and f.data_offset % 256 == 0
        assert all((t.begin - f.data_offset) % 256 == 0 for t in f.tensors.values())
    raw = bytearray(path.read_bytes())
    raw[4:8] = struct.pack("<I", 2)  # v2 has the same layout as v3
    path.write_bytes(bytes(raw))
    with GGUFFile(path) as f:
        assert f.version == 2 and len(f.tensors) == 3


# -- broken files ------------------------------------------------------------------------------
def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: str, v: int) -> bytes:
    return s(key) + struct.pack("<II", 4, v)


def tinfo(name: str, dims: list[int], gtype: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack(
        "<IQ", gtype, offset)


def build(kvs: list[bytes] = (), infos: list[bytes] = (), data: bytes = b"", *, version: int = 3,
          n_kv: int | None = None, n_t: int | None = None, magic: bytes = b"GGUF", align: int = 32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(infos) if n_t is None else n_t,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    head += b"\0" * (-len(head) % align)
    return head + data


def _err(tmp_path: Path, raw: bytes) -> str:
    path = tmp_path / "x.gguf"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError) as ei:
        GGUFFile(path)
    msg = str(ei.value)
    assert str(path) in msg and "\n" not in msg
    return msg


F32x2 = tinfo("a", [2])


@pytest.mark.parametrize(
    "raw, expect",
    [
        (b"GGUF", "too short"),
        (build(magic=b"GGML"), "not a GGUF file"),
        (build(version=1), "version 1 is not supported"),
        (build(version=4), "version 4"),
        (build(version=0x03000000), "big-endian"),
        (build(n_t=2**40), "over the"),
        (build(n_kv=2**40), "over the"),
        (build(n_kv=3), "truncated"),
        (build([s("k") + struct.pack("<I", 8) + struct.pack("<Q", 2**62)]), "cap"),
        (build([s("k") + struct.pack("<I", 8) + struct.pack("<Q", 1000) + b"ab"]), "truncated"),
        (build([s("k") + struct.pack("<I", 13) + b"\0" * 8]), "unknown value type 13"),
        (build([s("k") + struct.pack("<IIQ", 9, 4, 2**40)]), "cap"),
        (build([s("k") + struct.pack("<IIQ", 9, 4, 2**20)]), "truncated"),
        (build([s("k") + struct.pack("<IIQ", 9, 8, 2**20)]), "cannot fit"),
        (build([s("k") + struct.pack("<IIQ", 9, 77, 1)]), "unknown array item type 77"),
        (build([s("k") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) * 5 + struct.pack("<IQ", 4, 0)]),
         "nested deeper"),
        (build([kv_u32("k", 1), kv_u32("k", 2)]), "appears twice"),
        (build([s(b"\xff\xfe") + struct.pack("<II", 4, 1)]), "not UTF-8"),
        (build([kv_u32("general.alignment", 3)]), "power of two"),
        (build([kv_u32("general.alignment", 0)]), "power of two"),
        (build([s("general.alignment") + struct.pack("<I", 8) + s("32")]), "power of two"),
        (build([], [F32x2, F32x2], b"\0" * 64), "appears twice"),
        (build([], [tinfo("a", [1, 1, 1, 1, 1])], b"\0" * 8), "rank 5"),
        (build([], [tinfo("a", [2], 16)], b"\0" * 64), "IQ2_XXS is not supported (supported: F32, F16"),
        (build([], [tinfo("a", [2], 99)], b"\0" * 64), "unknown type 99"),
        (build([], [tinfo("a", [48, 2], 8)], b"\0" * 128), "not whole Q8_0 blocks of 32"),
        (build([], [tinfo("a", [], 8)], b"\0" * 128), "at least one dimension"),
        (build([], [tinfo("a", [2], 0, 4)], b"\0" * 64), "not a multiple of the alignment"),
        (build([], [tinfo("a", [64], 0)], b"\0" * 64), "outside the data section"),
        (build([], [tinfo("a", [2**27, 2**27], 0)], b"\0" * 64), "outside the data section"),
        (build([], [tinfo("a", [2**62, 2**62], 0)], b"\0" * 64), "implausibly large"),
        (build([], [tinfo("a", [0, 2**64 - 1], 0)], b"\0" * 64), "implausibly large"),
        (build([], [tinfo("a", [0, 2**30, 2**30], 0)], b"\0" * 64), "implausibly large"),
        (build([], [tinfo("a", [2], 0, 2**64 - 32)], b"\0" * 64), "outside the data section"),
        (build([], [tinfo("a", [16], 0, 0), tinfo("b", [2], 0, 32)], b"\0" * 64), "overlap"),
        (build([], [tinfo("a", [2])], b"")[:-4], "past the end"),
    ],
)
def test_corrupt_headers_give_one_clear_line(tmp_path, raw, expect) -> None:
    assert expect in _err(tmp_path, raw)


def test_handmade_file_reads(tmp_path: Path) -> None:
    """The builder above makes valid files too (so the failures above fail for their stated reason)."""
    path = tmp_path / "ok.gguf"
    data = np.arange(16, dtype=np.float32).tobytes() + b"\0" * 32
    path.write_bytes(build([kv_u32("general.alignment", 32)], [tinfo("a", [8, 2], 0, 0), tinfo("b", [2], 0, 64)],
                           data))
    with GGUFFile(path) as f:
        np.testing.assert_array_equal(f.view("a"), np.arange(16, dtype=np.float32).reshape(2, 8))
        assert f.view("b").shape == (2,)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    write_gguf(path, {"w": (stored("Q4_K", (4, 512), np.random.default_rng(2)), "Q4_K")}, {"s": ("x" * 100, VT.STRING)})
    raw = path.read_bytes()
    for cut in (0, 3, 4, 8, 20, 40, 100, len(raw) - 1000, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError) as ei:
            GGUFFile(path)
        assert "\n" not in str(ei.value)


def test_missing_tensor_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot open"):
        GGUFFile(tmp_path / "nope.gguf")
    path = tmp_path / "ok.gguf"
    write_gguf(path, {"w": (np.ones(2, np.float32), "F32")})
    with GGUFFile(path) as f, pytest.raises(CheckpointError, match="no tensor named 'x'"):
        f.view("x")


def test_every_gguf_type_in_the_table_matches_ggml_sizes() -> None:
    for gid, q in GGUF_TYPES.items():
        assert (q.block, q.block_bytes) == gguf.GGML_QUANT_SIZES[GT(gid)], q.tag
        assert GT(gid).name == q.tag


# -- fuzzing: every mutated or truncated file loads or fails with one line --------------------------
def _load_or_one_line(path: Path) -> None:
    tracemalloc.start()
    try:
        with GGUFFile(path) as f:
            for k in f.keys():  # whatever parsed must be viewable, in bounds
                assert f.view(k).nbytes == f.info(k).nbytes
    except CheckpointError as e:
        assert "\n" not in str(e)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 64 << 20, f"parsing allocated {peak} bytes"


_SRC: dict[str, bytes] = {}


def _valid_file(tmp_path: Path) -> bytes:
    if "raw" not in _SRC:
        rng = np.random.default_rng(3)
        path = tmp_path / "src.gguf"
        write_gguf(path, {"a.weight": (stored("Q4_0", (2, 64), rng), "Q4_0"),
                          "b": (stored("F16", (3,), rng), "F16"),
                          "c.weight": (stored("Q5_K", (1, 256), rng), "Q5_K")},
                   {"s": ("abc", VT.STRING), "arr": ([1, 2, 3], VT.ARRAY), "nest": ([["x"], ["y", "z"]], VT.ARRAY)})
        _SRC["raw"] = path.read_bytes()
    return _SRC["raw"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_valid_file(tmp_path, data) -> None:
    raw = bytearray(_valid_file(tmp_path))
    header_end = raw.index(b"c.weight") + 40  # mutate the header mostly: that is where parsing happens
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, header_end) | st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255) | st.sampled_from([0xFF, 0x7F, 0x80]))
    cut = data.draw(st.integers(0, len(raw)) | st.just(len(raw)))
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(raw[:cut]))
    _load_or_one_line(path)


_u64 = st.integers(0, 2**64 - 1) | st.integers(0, 300)
_values = st.recursive(
    st.tuples(st.integers(0, 12) | st.integers(13, 2**32 - 1), st.binary(max_size=12)),
    lambda children: st.tuples(st.just(9), st.tuples(st.integers(0, 13), _u64, st.lists(children, max_size=3))),
    max_leaves=8,
)


def _enc_value(v) -> bytes:
    vtype, payload = v
    if vtype == 9 and isinstance(payload, tuple):
        etype, n, items = payload
        return struct.pack("<IIQ", 9, etype, n) + b"".join(_enc_value(i)[4:] for i in items)
    return struct.pack("<I", vtype) + payload


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kvs=st.lists(st.tuples(st.text(max_size=6), _values), max_size=4),
    infos=st.lists(st.tuples(st.text(max_size=4), st.lists(_u64, max_size=5),
                             st.sampled_from([0, 1, 2, 8, 12, 14, 16, 30, 1000]), _u64 | st.sampled_from([0, 32, 64])),
                   max_size=4),
    n_delta=st.tuples(st.integers(-2, 2), st.integers(-2, 2)),
    data_len=st.integers(0, 600),
)
def test_fuzz_random_headers(tmp_path, kvs, infos, n_delta, data_len) -> None:
    raw_kv = [s(k) + _enc_value(v) for k, v in kvs]
    raw_t = [tinfo(n, d, g, o & (2**64 - 1)) for n, d, g, o in infos]
    raw = build(raw_kv, raw_t, bytes(data_len), n_kv=max(0, len(raw_kv) + n_delta[0]),
                n_t=max(0, len(raw_t) + n_delta[1]))
    path = tmp_path / "f.gguf"
    path.write_bytes(raw)
    _load_or_one_line(path)
