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
from ..planner.streaming import row_axis
from ..sizes import format_size
from ..weights.dtypes import F32_BYTES


class SpillError(StreamexecError):
    """Writing or reading a spilled activation failed (disk full, scratch folder gone)."""


class Spilled:
    """Stands in for an op input that stays on disk: the op reads it band by band (``read_into``)
    instead of the executor loading it whole. Only inputs that ``planner.streaming.streamable``
    allows receive one."""

    def __init__(self, store: SpillStore, name: str, shape: tuple[int, ...]) -> None:
        self.store, self.name, self.shape = store, name, tuple(shape)
        self.size = int(np.prod(self.shape)) if self.shape else 1

    def read_into(self, dst: np.ndarray, offset: int = 0) -> None:
        self.store.read_into(self.name, dst, offset)

    def _geometry(self) -> tuple[int, int, int, int]:
        axis = row_axis(self.shape)
        outer = int(np.prod(self.shape[:axis]))
        inner = int(np.prod(self.shape[axis + 1 :]))
        return axis, outer, self.shape[axis], inner

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0:r1 along the row axis (H of [B, C, H, W], N of [B, N, D]) as a new array."""
        axis, outer, h, inner = self._geometry()
        out = np.empty((outer, r1 - r0, inner), np.float32)
        for p in range(outer):
            self.store.read_into(self.name, out[p], (p * h + r0) * inner)
        return out.reshape(self.shape[:axis] + (r1 - r0,) + self.shape[axis + 1 :])

    def write_rows(self, r0: int, band: np.ndarray) -> None:
        """Write ``band`` (rows r0:r0+n along the row axis) into the tensor on disk."""
        axis, outer, h, inner = self._geometry()
        n = band.shape[axis]
        if not np.isfinite(band).all():
            raise StreamexecError(f"activation {self.name} got NaN/Inf (rows {r0}..{r0 + n}); stopping")
        b3 = np.ascontiguousarray(band, dtype=np.float32).reshape(outer, n, inner)
        for p in range(outer):
            self.store.write_from(self.name, b3[p], (p * h + r0) * inner)


def rows_of(x, r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 of an array or a tensor on disk, C-contiguous."""
    if isinstance(x, Spilled):
        return x.read_rows(r0, r1)
    idx = [slice(None)] * x.ndim
    idx[row_axis(x.shape)] = slice(r0, r1)
    return np.ascontiguousarray(x[tuple(idx)])


def put_rows(out, r0: int, band: np.ndarray) -> None:
    """Store ``band`` at rows r0.. of an array or a tensor on disk."""
    if isinstance(out, Spilled):
        out.write_rows(r0, band)
        return
    idx = [slice(None)] * out.ndim
    idx[row_axis(out.shape)] = slice(r0, r0 + band.shape[row_axis(band.shape)])
    out[tuple(idx)] = band


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

    def create(self, name: str, shape: tuple[int, ...]) -> Spilled:
        """A new f32 tensor that lives on disk from birth; ops write it band by band."""
        if self.dir is None:
            raise SpillError("the scratch folder is closed")
        self._n += 1
        path = self.dir / f"t{self._n:05d}.bin"
        nbytes = int(np.prod(shape)) * F32_BYTES
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except OSError as e:
            raise SpillError(f"cannot create {path}: {e.strerror}") from None
        self._files[name] = (path, tuple(shape), np.dtype(np.float32).str)
        self.bytes_written += nbytes
        self._disk += nbytes
        self.peak_disk_bytes = max(self.peak_disk_bytes, self._disk)
        return Spilled(self, name, tuple(shape))

    def write_from(self, name: str, src: np.ndarray, offset: int = 0) -> None:
        """Write the contiguous array ``src`` at element ``offset`` of a tensor on disk."""
        path = self._files[name][0]
        view = memoryview(np.ascontiguousarray(src).reshape(-1).view(np.uint8))
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset * F32_BYTES + done)
            finally:
                os.close(fd)
        except OSError as e:
            what = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
            raise SpillError(
                f"{what} while writing activation {name!r} to {self.dir}; free space there, point "
                "--scratch-dir elsewhere, or raise --memory-budget"
            ) from None

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
