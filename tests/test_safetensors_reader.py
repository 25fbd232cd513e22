"""Our safetensors reader against the safetensors package, and against broken files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _fuzz_strategies import headers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from streamexec.errors import CheckpointError
from streamexec.weights.safetensors_file import SafetensorsFile
from streamexec.weights.writer import PendingTensor, from_array, write_safetensors

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# how to see a torch tensor's raw bits as numpy, per tag (numpy has no bf16/fp8)
RAW_VIEW = {"BF16": torch.int16, "F8_E4M3": torch.uint8, "F8_E5M2": torch.uint8}


def _raw(t: torch.Tensor, tag: str) -> np.ndarray:
    if tag in RAW_VIEW:
        return t.view(RAW_VIEW[tag]).numpy().view(np.uint16 if tag == "BF16" else np.uint8)
    return t.numpy()


def test_round_trip_every_dtype_against_safetensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (tag, dt) in enumerate(TORCH_DTYPES.items()):
        shape = [(3, 5, 7), (1,), (0, 4), (17, 2)][i % 4]
        if dt.is_floating_point:
            t = (torch.randn(shape, generator=g) * 4).to(dt)
        elif dt == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        else:
            t = torch.randint(-100 if dt != torch.uint8 else 0, 100, shape, generator=g).to(dt)
        tensors[f"t.{tag}"] = t
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt", "note": "x"}
        assert set(f.keys()) == set(tensors)
        for key, t in tensors.items():
            tag = key.split(".", 1)[1]
            info = f.info(key)
            assert info.dtype.tag == tag
            assert info.shape == tuple(t.shape)
            v = f.view(key)
            assert v.shape == tuple(t.shape)
            assert not v.flags.writeable
            np.testing.assert_array_equal(v, _raw(t, tag))
            # zero-copy: the view's memory lies inside the mapping
            if v.size:
                assert f.address <= v.ctypes.data < f.address + f.size


def test_our_writer_is_read_by_safetensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((33, 9)).astype(np.float32)
    b = rng.integers(0, 65535, (4, 4, 3), dtype=np.uint16)
    big = rng.standard_normal(100_000).astype(np.float16)

    def produce_big(write):  # in pieces, as the checkpoint generator does
        for i in range(0, big.size, 30_000):
            write(big[i : i + 30_000])

    path = tmp_path / "w.safetensors"
    write_safetensors(
        path,
        [from_array("a", a), PendingTensor("b", "BF16", b.shape, lambda w: w(b)),
         PendingTensor("big", "F16", big.shape, produce_big)],
        metadata={"k": "v"},
    )
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
        np.testing.assert_array_equal(f.get_tensor("a").numpy(), a)
        np.testing.assert_array_equal(f.get_tensor("b").view(torch.int16).numpy().view(np.uint16), b)
        np.testing.assert_array_equal(f.get_tensor("big").numpy(), big)
    with SafetensorsFile(path) as ours:
        np.testing.assert_array_equal(ours.view("b"), b)


def test_writer_rejects_wrong_byte_count_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError):
        write_safetensors(path, [PendingTensor("x", "F32", (4,), lambda w: w(np.zeros(3, np.float32)))])
    assert list(tmp_path.iterdir()) == []


# -- broken files ------------------------------------------------------------------------------
def _file(tmp_path: Path, header: object | bytes, data: bytes = b"", n: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def _err(path: Path) -> str:
    with pytest.raises(CheckpointError) as ei:
        SafetensorsFile(path)
    msg = str(ei.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def ent(dtype: str = "F32", shape: list = (2,), offs: list = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


@pytest.mark.parametrize(
    "header, data, n, expect",
    [
        (b"", b"", None, "too small"),
        ({"a": ent()}, b"\0" * 8, 10**9, "larger than the file"),
        ({"a": ent()}, b"\0" * 8, 2**64 - 1, "larger than the file"),
        ({"a": ent()}, b"\0" * 4, None, "outside the data section"),
        ({"a": ent(offs=[0, 12])}, b"\0" * 12, None, "span is 12 bytes"),
        ({"a": ent(dtype="F4")}, b"\0" * 8, None, "unsupported dtype"),
        ({"a": ent(dtype=3)}, b"\0" * 8, None, "dtype"),
        ({"a": ent(shape=[-2])}, b"\0" * 8, None, "shape"),
        ({"a": ent(shape=[2.0])}, b"\0" * 8, None, "shape"),
        ({"a": ent(shape=[True, 2])}, b"\0" * 8, None, "shape"),
        ({"a": ent(offs=[0])}, b"\0" * 8, None, "data_offsets"),
        ({"a": ent(offs=[8, 0])}, b"\0" * 8, None, "outside"),
        ({"a": ent(), "b": ent(offs=[4, 12])}, b"\0" * 12, None, "overlap"),
        ({"a": 5}, b"", None, "must be an object"),
        ([1, 2], b"", None, "must be an object"),
        ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
        ({"a": {**ent(), "extra": 1}}, b"\0" * 8, None, "unexpected fields"),
        (b'{"a": ', b"", None, "not valid JSON"),
        (b"\xff\xfe{}", b"", None, "not UTF-8"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', b"\0" * 8, None,
         "duplicate key"),
        (b'{"m": ' + b"[" * 50 + b"]" * 50 + b"}", b"", None, "nested"),
        (b'{"m": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, "nested"),
    ],
)
def test_corrupt_headers_give_one_clear_line(tmp_path, header, data, n, expect) -> None:
    msg = _err(_file(tmp_path, header, data, n))
    assert expect in msg


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    raw = path.read_bytes()
    for cut in (4, 8, 20, len(raw) - 1, len(raw) - 4096):
        path.write_bytes(raw[:cut])
        _err(path)


def test_missing_tensor_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot open"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    path = tmp_path / "ok.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with SafetensorsFile(path) as f, pytest.raises(CheckpointError, match="no tensor named 'x'"):
        f.view("x")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers, data_len=st.integers(0, 256), n_delta=st.integers(-5, 5) | st.just(0))
def test_fuzz_random_headers(tmp_path, header, data_len, n_delta) -> None:
    raw = json.dumps(header).encode()
    n = max(0, len(raw) + n_delta)
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", n) + raw + bytes(data_len))
    try:
        with SafetensorsFile(path) as f:
            for k in f.keys():  # whatever parsed must be readable, in bounds
                v = f.view(k)
                assert v.nbytes == f.info(k).nbytes
    except CheckpointError as e:
        assert "\n" not in str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_valid_file(tmp_path, data) -> None:
    src = tmp_path / "src.safetensors"
    if not src.exists():
        save_file({"a.weight": torch.arange(24, dtype=torch.float32).reshape(4, 6),
                   "b": torch.ones(3, dtype=torch.bfloat16)}, str(src), metadata={"m": "1"})
    raw = bytearray(src.read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(raw[:cut]))
    try:
        with SafetensorsFile(path) as f:
            for k in f.keys():
                assert f.view(k).nbytes == f.info(k).nbytes
    except CheckpointError as e:
        assert "\n" not in str(e)
