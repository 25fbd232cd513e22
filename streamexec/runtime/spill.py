"""Activations that do not fit the budget live in a scratch folder until they are needed again.

One file per spilled tensor, written with ``pwrite`` and read back with ``readinto`` (never
mmapped, so a tensor costs RSS only while it is in an array). The folder is removed on close —
normal exit, error, or Ctrl-C (the CLI closes it from its signal path too)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import StreamexecError
from ..sizes import format_size


class SpillError(StreamexecError):
    """Writing or reading a spilled activation failed (disk full, scratch folder gone)."""


class Spilled:
    """Stands in for an op input that stays on disk: the op reads it band by band (``read_into``)
    instead of the executor loading it whole. Only ops listed in ``STREAMABLE`` receive one."""

    def __init__(self, store: SpillStore, name: str, shape: tuple[int, ...]) -> None:
        self.store, self.name, self.shape = store, name, tuple(shape)
        self.size = int(np.prod(self.shape)) if self.shape else 1

    def read_into(self, dst: np.ndarray, offset: int = 0) -> None:
        self.store.read_into(self.name, dst, offset)


#: Band size for ops that combine a spilled input chunk by chunk (elements of f32: 4 MiB).
BAND_ELEMS = 1 << 20


def streamable(kind: str, position: int, attrs: dict) -> bool:
    """Can input ``position`` of an op of ``kind`` be read back band by band from disk?
    concat (any input: read straight into its slot of the output), add without broadcasting
    (either side), and the residual input of linear and conv2d."""
    if kind == "concat":
        return True
    if kind == "add":
        return not attrs.get("broadcast") and position in (0, 1)
    if kind in ("linear", "conv2d"):
        return position == 1 and not attrs.get("gate")
    return False


class SpillStore:
    """Spilled activations by tensor name, in a private temporary folder."""

    def __init__(self, scratch_dir: str | os.PathLike | None = None) -> None:
        parent = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.dir: Path | None = Path(tempfile.mkdtemp(prefix="streamexec-spill-", dir=parent))
        except OSError as e:
            raise SpillError(f"cannot create a scratch folder in {parent}: {e.strerror}") from None
        self._files: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        self._n = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.peak_disk_bytes = 0
        self._disk = 0

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def put(self, name: str, a: np.ndarray) -> None:
        """Write ``a`` (f32 or any dtype) under ``name``; the caller then drops its array."""
        if self.dir is None:
            raise SpillError("the scratch folder is closed")
        a = np.ascontiguousarray(a)
        self._n += 1
        path = self.dir / f"t{self._n:05d}.bin"
        view = memoryview(a.reshape(-1).view(np.uint8))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], done)
            finally:
                os.close(fd)
        except OSError as e:
            path.unlink(missing_ok=True)
            what = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
            raise SpillError(
                f"{what} while spilling activation {name!r} ({format_size(a.nbytes)}) to {self.dir}; "
                "free space there, point --scratch-dir elsewhere, or raise --memory-budget"
            ) from None
        self._files[name] = (path, tuple(a.shape), a.dtype.str)
        self.bytes_written += a.nbytes
        self._disk += a.nbytes
        self.peak_disk_bytes = max(self.peak_disk_bytes, self._disk)

    def get(self, name: str) -> np.ndarray:
        """Read a spilled tensor back into a new array (the file stays until ``drop``)."""
        path, shape, dtype = self._files[name]
        out = np.empty(shape, dtype=np.dtype(dtype))
        buf = memoryview(out.reshape(-1).view(np.uint8))
        try:
            with open(path, "rb", buffering=0) as fh:
                done = 0
                while done < len(buf):
                    n = fh.readinto(buf[done:])
                    if not n:
                        raise OSError(errno.EIO, "file shorter than written")
                    done += n
        except OSError as e:
            raise SpillError(f"cannot read spilled activation {name!r} back from {path}: {e.strerror}") from None
        self.bytes_read += out.nbytes
        return out

    def read_into(self, name: str, dst: np.ndarray, offset: int = 0) -> None:
        """Read elements ``offset .. offset + dst.size`` of a spilled tensor (C order) straight into
        the contiguous array ``dst``: a band read back with no intermediate copy."""
        path, _shape, dtype = self._files[name]
        itemsize = np.dtype(dtype).itemsize
        buf = memoryview(dst.reshape(-1).view(np.uint8))
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                done = 0
                while done < len(buf):
                    n = os.preadv(fd, [buf[done:]], offset * itemsize + done)
                    if not n:
                        raise OSError(errno.EIO, "file shorter than written")
                    done += n
            finally:
                os.close(fd)
        except OSError as e:
            raise SpillError(f"cannot read spilled activation {name!r} back from {path}: {e.strerror}") from None
        self.bytes_read += dst.nbytes

    def drop(self, name: str) -> None:
        entry = self._files.pop(name, None)
        if entry is not None:
            path = entry[0]
            try:
                self._disk -= path.stat().st_size
            except OSError:
                pass
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the scratch folder and everything in it."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self._files.clear()

    def __enter__(self) -> SpillStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; close() is the normal path
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
