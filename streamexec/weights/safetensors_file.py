"""Our own safetensors reader over ``mmap``: validated header, zero-copy views, page control.

The ``safetensors`` package stays the writer (tools, tests) and the cross-check; reading is ours so
that we control exactly which pages are touched and can drop them again (``madvise``).
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .dtypes import DTYPES, DType
from .mapping import PAGE, MappedFile  # noqa: F401  (PAGE: re-exported for older imports)

#: Largest header we accept. Real headers: SD 1.5 single file ~150 KiB, FLUX ~100 KiB,
#: T5-XXL ~60 KiB. The safetensors package itself caps at 100 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Largest nesting depth inside the header JSON (real headers are depth 3).
MAX_JSON_DEPTH = 16
#: Largest tensor rank we accept.
MAX_RANK = 16


@dataclass(frozen=True)
class TensorInfo:
    """Header entry of one tensor: where it is and what it holds (no data touched)."""

    key: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _check_depth(obj: object, depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"header JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(obj, dict):
        for v in obj.values():
            _check_depth(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_depth(v, depth + 1)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"header JSON has duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


HeaderEntry = tuple[DType, tuple[int, ...], int, int]


def parse_header(raw: bytes, data_len: int) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """Validate a header's JSON text; returns {key: (dtype, shape, begin, end)} relative to the
    data section, and the ``__metadata__`` dict. Raises ValueError with the problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as e:
        msg = str(e)
        if "duplicate key" in msg:
            raise ValueError(msg) from None
        raise ValueError(f"header is not valid JSON ({msg})") from None
    except RecursionError:
        raise ValueError("header JSON is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError(f"header JSON must be an object, got {type(obj).__name__}")
    _check_depth(obj)

    metadata: dict[str, str] = {}
    entries: dict[str, HeaderEntry] = {}
    for key, ent in obj.items():
        if key == "__metadata__":
            if not isinstance(ent, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in ent.items()
            ):
                raise ValueError("__metadata__ must be an object of strings")
            metadata = dict(ent)
            continue
        if not isinstance(ent, dict):
            raise ValueError(f"tensor {key!r}: entry must be an object")
        extra = set(ent) - {"dtype", "shape", "data_offsets"}
        if extra:
            raise ValueError(f"tensor {key!r}: unexpected fields {sorted(extra)}")
        tag = ent.get("dtype")
        if not isinstance(tag, str):
            raise ValueError(f"tensor {key!r}: missing or non-string dtype")
        dt = DTYPES.get(tag)
        if dt is None:
            raise ValueError(f"tensor {key!r}: unsupported dtype {tag!r} (known: {', '.join(DTYPES)})")
        shape = ent.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
            _is_int(s) and s >= 0 for s in shape
        ):
            raise ValueError(f"tensor {key!r}: shape must be a list of non-negative integers")
        offs = ent.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(_is_int(o) for o in offs)
        ):
            raise ValueError(f"tensor {key!r}: data_offsets must be [begin, end] integers")
        begin, end = offs
        if not (0 <= begin <= end <= data_len):
            raise ValueError(
                f"tensor {key!r}: data_offsets [{begin}, {end}] outside the data section "
                f"of {data_len} bytes (file truncated?)"
            )
        numel = 1
        for s in shape:
            numel *= s
        if numel * dt.itemsize != end - begin:
            raise ValueError(
                f"tensor {key!r}: shape {shape} × {dt.itemsize} bytes ({tag}) = "
                f"{numel * dt.itemsize} bytes, but its span is {end - begin} bytes"
            )
        entries[key] = (dt, tuple(shape), begin, end)

    spans = sorted((b, e, k) for k, (_, _, b, e) in entries.items() if e > b)
    for (_b0, e0, k0), (b1, _e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ValueError(f"tensors {k0!r} and {k1!r} overlap in the data section")
    return entries, metadata


class SafetensorsFile(MappedFile):
    """One ``.safetensors`` file: its validated header and a read-only shared mapping.

    ``view(key)`` returns a zero-copy numpy array in the stored dtype; ``release(key)`` drops that
    tensor's pages from this process (the page cache keeps them; RSS goes down). Page control
    (``willneed``/``populate``/``release_range``) comes from ``MappedFile``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        self._base: np.ndarray | None = None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(self.path, f"cannot open: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            self.size = st.st_size
            self.mtime_ns = st.st_mtime_ns
            if self.size < 8:
                raise CheckpointError(
                    self.path, f"not a safetensors file: {self.size} bytes, too short for a header"
                )
            head = os.pread(fd, 8, 0)
            n = int.from_bytes(head, "little")
            if n > self.size - 8:
                raise CheckpointError(
                    self.path,
                    f"header length {n} is larger than the file ({self.size} bytes): "
                    "truncated or not a safetensors file",
                )
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    self.path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap"
                )
            if n < 2:
                raise CheckpointError(self.path, f"header length {n} is too small")
            raw = os.pread(fd, n, 8)
            if len(raw) != n:
                raise CheckpointError(self.path, "file shrank while reading the header")
            self.header_bytes = raw
            self.data_offset = 8 + n
            data_len = self.size - self.data_offset
            try:
                entries, self.metadata = parse_header(raw, data_len)
            except ValueError as e:
                raise CheckpointError(self.path, f"corrupt safetensors header: {e}") from None
            self.tensors: dict[str, TensorInfo] = {
                k: TensorInfo(k, dt, shape, self.data_offset + b, self.data_offset + e)
                for k, (dt, shape, b, e) in entries.items()
            }
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._base = np.frombuffer(self._mm, dtype=np.uint8)

    # -- metadata -------------------------------------------------------------------------
    def info(self, key: str) -> TensorInfo:
        return super().info(key)

    # -- data -----------------------------------------------------------------------------
    def view(self, key: str) -> np.ndarray:
        """Zero-copy, read-only view of a tensor in its stored dtype (touches no pages)."""
        t = self.info(key)
        if self._base is None:
            raise CheckpointError(self.path, "file is closed")
        raw = self._base[t.begin : t.end]
        return raw.view(t.dtype.storage).reshape(t.shape)

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.tensors)} tensors)"
