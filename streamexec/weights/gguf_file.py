"""Our own GGUF (v2/v3) reader over ``mmap``: validated header, zero-copy block views, page control.

The ``gguf`` package from the GGML project is the writer and the reference in tests; reading is
ours for the same reasons as safetensors (we choose which pages are touched and drop them again),
and so that a hostile file fails with one line instead of a crash or a huge allocation.

File layout (little-endian; ggml's ``gguf.cpp``)::

    "GGUF"  u32 version (2 or 3)  u64 n_tensors  u64 n_kv
    n_kv x      (string key, u32 value type, value)          string = u64 length + UTF-8 bytes
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
    padding to ``general.alignment`` (default 32), then the data section

``ne[0]`` is the innermost (contiguous) dimension, so the numpy shape is ``ne`` reversed; a row
of ``ne[0]`` weights is stored as ``ne[0] / block`` blocks (``kernels.qtypes``). ``offset`` is
relative to the data section and a multiple of the alignment.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..kernels.qtypes import GGML_OTHER_NAMES, GGUF_TYPES, QType
from .mapping import MappedFile

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
#: Caps on what a header may declare (real files: FLUX ~780 tensors and ~10 keys; an LLM's
#: tokenizer arrays ~150k strings). Everything is also bounded by the bytes left in the file.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_ARRAY_LEN = 1 << 24
MAX_STRING_BYTES = 1 << 24
MAX_NAME_BYTES = 4096
MAX_ARRAY_DEPTH = 4
#: Total strings + array elements parsed from the KV section (bounds the time a header costs).
MAX_HEADER_ITEMS = 1 << 25
MAX_DIMS = 4  # GGML_MAX_DIMS
#: Largest dimension and element count (of the non-zero dims) we accept: far above any model,
#: low enough that no shape, byte count or decoded f32 size can overflow numpy's int64.
MAX_DIM = 1 << 40
MAX_NUMEL = 1 << 56
MAX_ALIGNMENT = 1 << 20

# GGUF metadata value types: number -> (name, struct format or None for string/array)
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
    4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"),
    8: ("string", None), 9: ("array", None), 10: ("uint64", "Q"), 11: ("int64", "q"),
    12: ("float64", "d"),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor info of the header: where its blocks are and what they hold (no data touched)."""

    key: str
    qtype: QType
    shape: tuple[int, ...]  # numpy order (ggml's ne reversed)
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def tag(self) -> str:
        return self.qtype.tag

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def storage_shape(self) -> tuple[int, ...]:
        """Shape of ``GGUFFile.view``: the numpy shape for F32/F16/BF16, block types as uint8
        rows ``[..., K / block * block_bytes]``."""
        if not self.qtype.is_block or not self.shape:
            return self.shape
        return (*self.shape[:-1], self.qtype.row_bytes(self.shape[-1]))


class _Reader:
    """Bounds-checked little-endian cursor over the header bytes; ValueError on anything short."""

    def __init__(self, buf: memoryview, size: int) -> None:
        self.buf, self.size, self.pos, self.items = buf, size, 0, 0

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.size - self.pos:
            raise ValueError(f"{what} at byte {self.pos} needs {n} bytes, the file has "
                             f"{self.size - self.pos} left (truncated?)")
        p = self.pos
        self.pos += n
        return p

    def unpack(self, fmt: str, what: str):
        s = struct.Struct("<" + fmt)
        return s.unpack_from(self.buf, self.take(s.size, what))[0]

    def string(self, what: str, cap: int = MAX_STRING_BYTES, strict: bool = False) -> str:
        n = self.unpack("Q", f"length of {what}")
        if n > cap:
            raise ValueError(f"{what} is {n} bytes long, over the {cap}-byte cap")
        p = self.take(n, what)
        self._count(1)
        raw = bytes(self.buf[p : p + n])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise ValueError(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None
            return raw.decode("utf-8", errors="replace")

    def _count(self, n: int) -> None:
        self.items += n
        if self.items > MAX_HEADER_ITEMS:
            raise ValueError(f"the metadata holds more than {MAX_HEADER_ITEMS} strings and array items")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype not in _VALUE_TYPES:
            raise ValueError(f"{what}: unknown value type {vtype} (known: 0..12)")
        name, fmt = _VALUE_TYPES[vtype]
        if fmt is not None:
            return self.unpack(fmt, what)
        if vtype == _STRING:
            return self.string(what)
        if depth >= MAX_ARRAY_DEPTH:
            raise ValueError(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
        etype = self.unpack("I", f"{what}: array type")
        n = self.unpack("Q", f"{what}: array length")
        if n > MAX_ARRAY_LEN:
            raise ValueError(f"{what}: array of {n} items, over the {MAX_ARRAY_LEN}-item cap")
        if etype not in _VALUE_TYPES:
            raise ValueError(f"{what}: unknown array item type {etype} (known: 0..12)")
        efmt = _VALUE_TYPES[etype][1]
        self._count(n)
        if efmt is not None:  # numbers: one bounds check, a compact numpy copy
            dt = np.dtype("<" + efmt) if efmt != "?" else np.dtype(np.uint8)
            p = self.take(n * dt.itemsize, what)
            a = np.frombuffer(self.buf, dtype=dt, count=n, offset=p).copy()
            if efmt == "?":
                a = a != 0
            a.flags.writeable = False
            return a
        # strings / arrays: each item takes >= 8 bytes, so n is bounded by the file as well
        if n * 8 > self.size - self.pos:
            raise ValueError(f"{what}: {n} items cannot fit in the {self.size - self.pos} bytes left (truncated?)")
        return [self.value(etype, what, depth + 1) for _ in range(n)]


Entry = tuple[str, QType, tuple[int, ...], int]


def parse_header(buf: memoryview, size: int) -> tuple[int, dict, dict, list[Entry], int, int]:
    """Validate a GGUF header. Returns (version, metadata, kv_types, tensor entries
    [(name, qtype, numpy shape, offset in the data section)], alignment, data section start).
    Raises ValueError with the problem."""
    r = _Reader(buf, size)
    magic = bytes(buf[r.take(4, "magic") : 4])
    if magic != MAGIC:
        raise ValueError(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    version = r.unpack("I", "version")
    if version not in VERSIONS:
        if version & 0xFFFF == 0 and (version >> 16) in (0x100, 0x200, 0x300):
            raise ValueError("big-endian GGUF files are not supported")
        hint = " (GGUF v1 predates 64-bit counts; re-convert the file)" if version == 1 else ""
        raise ValueError(f"GGUF version {version} is not supported (2 or 3){hint}")
    n_tensors = r.unpack("Q", "tensor count")
    n_kv = r.unpack("Q", "metadata count")
    if n_tensors > MAX_TENSORS:
        raise ValueError(f"{n_tensors} tensors declared, over the {MAX_TENSORS} cap")
    if n_kv > MAX_KV:
        raise ValueError(f"{n_kv} metadata entries declared, over the {MAX_KV} cap")

    metadata: dict = {}
    kv_types: dict[str, int] = {}
    for i in range(n_kv):
        key = r.string(f"metadata key {i}", MAX_NAME_BYTES, strict=True)
        if key in metadata:
            raise ValueError(f"metadata key {key!r} appears twice")
        vtype = r.unpack("I", f"type of metadata {key!r}")
        metadata[key] = r.value(vtype, f"metadata {key!r}")
        kv_types[key] = vtype

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        a = metadata["general.alignment"]
        if kv_types["general.alignment"] not in (0, 2, 4, 10) or not 0 < a <= MAX_ALIGNMENT or a & (a - 1):
            raise ValueError(f"general.alignment must be a power of two up to {MAX_ALIGNMENT}, got {a!r}")
        alignment = int(a)

    entries: list[Entry] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = r.string(f"name of tensor {i}", MAX_NAME_BYTES, strict=True)
        if name in names:
            raise ValueError(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = r.unpack("I", f"tensor {name!r}: rank")
        if n_dims > MAX_DIMS:
            raise ValueError(f"tensor {name!r}: rank {n_dims}, GGUF allows at most {MAX_DIMS}")
        ne = [r.unpack("Q", f"tensor {name!r}: dims") for _ in range(n_dims)]
        numel = 1
        for d in ne:
            numel *= max(d, 1)
        if any(d > MAX_DIM for d in ne) or numel > MAX_NUMEL:
            raise ValueError(f"tensor {name!r}: dims {ne} are implausibly large")
        gtype = r.unpack("I", f"tensor {name!r}: type")
        offset = r.unpack("Q", f"tensor {name!r}: offset")
        q = GGUF_TYPES.get(gtype)
        if q is None:
            known = ", ".join(t.tag for t in GGUF_TYPES.values())
            what = GGML_OTHER_NAMES.get(gtype, f"unknown type {gtype}")
            raise ValueError(f"tensor {name!r}: ggml type {what} is not supported (supported: {known})")
        if q.is_block and not ne:
            raise ValueError(f"tensor {name!r}: a {q.tag} tensor needs at least one dimension")
        if ne and ne[0] % q.block:
            raise ValueError(f"tensor {name!r}: rows of {ne[0]} weights are not whole {q.tag} blocks "
                             f"of {q.block}")
        if offset % alignment:
            raise ValueError(f"tensor {name!r}: offset {offset} is not a multiple of the alignment {alignment}")
        entries.append((name, q, tuple(reversed(ne)), offset))

    data_start = -(-r.pos // alignment) * alignment
    if data_start > size:
        raise ValueError(f"the data section would start at byte {data_start}, past the end of the "
                         f"{size}-byte file (truncated?)")
    return version, metadata, kv_types, entries, alignment, data_start


def _spans(entries, data_start: int, size: int) -> dict[str, tuple[int, int]]:
    """Byte span of every tensor (dims x block bytes), inside the data section, no overlaps."""
    data_len = size - data_start
    spans: dict[str, tuple[int, int]] = {}
    for name, q, shape, offset in entries:
        nbytes = q.stored_bytes(shape)  # Python ints: no overflow for any u64 dims
        if offset > data_len or nbytes > data_len - offset:
            raise ValueError(f"tensor {name!r}: {q.tag} {list(shape)} takes {nbytes} bytes at offset "
                             f"{offset}, outside the data section of {data_len} bytes (truncated?)")
        spans[name] = (data_start + offset, data_start + offset + nbytes)
    ordered = sorted((b, e, k) for k, (b, e) in spans.items() if e > b)
    for (_b0, e0, k0), (b1, _e1, k1) in zip(ordered, ordered[1:]):
        if b1 < e0:
            raise ValueError(f"tensors {k0!r} and {k1!r} overlap in the data section")
    return spans


class GGUFFile(MappedFile):
    """One ``.gguf`` file: its validated header and a read-only shared mapping.

    ``metadata`` holds the KV pairs (numbers as Python scalars, numeric arrays as read-only
    numpy arrays, strings as ``str``, other arrays as lists); ``kv_types`` their GGUF value type
    numbers. ``view(key)`` is a zero-copy array of the stored representation
    (``GGUFTensorInfo.storage_shape``); page control comes from ``MappedFile``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._mm = None
        self._base = None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(self.path, f"cannot open: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            self.size = st.st_size
            self.mtime_ns = st.st_mtime_ns
            if self.size < 24:
                raise CheckpointError(self.path, f"not a GGUF file: {self.size} bytes, too short for a header")
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CheckpointError(self.path, f"cannot map: {e.strerror}") from None
        finally:
            os.close(fd)
        try:
            view = memoryview(mm)
            try:
                (self.version, self.metadata, self.kv_types, entries, self.alignment,
                 self.data_offset) = parse_header(view, self.size)
                spans = _spans(entries, self.data_offset, self.size)
            finally:
                view.release()
        except ValueError as e:
            mm.close()
            raise CheckpointError(self.path, f"corrupt GGUF header: {e}") from None
        except BaseException:
            mm.close()
            raise
        self.tensors: dict[str, GGUFTensorInfo] = {
            name: GGUFTensorInfo(name, q, shape, *spans[name]) for name, q, shape, _ in entries
        }
        self._mm = mm
        self._base = np.frombuffer(mm, dtype=np.uint8)

    # -- metadata -------------------------------------------------------------------------
    def info(self, key: str) -> GGUFTensorInfo:
        return super().info(key)

    @property
    def header_bytes(self) -> bytes:
        """The header (everything before the data section), e.g. to hash it into a plan."""
        if self._base is None:
            raise CheckpointError(self.path, "file is closed")
        return self._base[: self.data_offset].tobytes()

    @property
    def architecture(self) -> str | None:
        a = self.metadata.get("general.architecture")
        return a if isinstance(a, str) else None

    # -- data -----------------------------------------------------------------------------
    def view(self, key: str) -> np.ndarray:
        """Zero-copy, read-only view in the stored representation (touches no pages): F32 as
        float32, F16 as float16, BF16 as uint16 bit patterns, each in the numpy shape; block
        types as uint8 ``[..., row bytes]``."""
        t = self.info(key)
        if self._base is None:
            raise CheckpointError(self.path, "file is closed")
        return self._base[t.begin : t.end].view(t.qtype.storage).reshape(t.storage_shape)

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.tensors)} tensors)"
