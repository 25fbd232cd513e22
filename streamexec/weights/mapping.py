"""A read-only shared mapping of one checkpoint file with page control (shared by the readers).

``SafetensorsFile`` and ``GGUFFile`` parse their own headers; both then hand out zero-copy views
of this mapping and control which of its pages this process holds: ``willneed`` (readahead into
the page cache, no RSS), ``populate`` (fault in, on the prefetch thread), ``release_range``
(MADV_DONTNEED: RSS goes down, the page cache keeps the data).
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

PAGE = mmap.PAGESIZE
_MADV_POPULATE_READ = 22  # Linux >= 5.14; not exported by Python's mmap module


class MappedFile:
    """Base of the file readers: ``path``, ``size``, the mapping ``_mm`` and its uint8 view
    ``_base``. Subclasses set them and ``tensors`` in ``__init__``."""

    path: Path
    size: int
    #: name -> the subclass's tensor info (with ``begin``/``end`` in the file)
    tensors: dict
    _mm: mmap.mmap | None = None
    _base: np.ndarray | None = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str):
        """The tensor's info; a name the file does not hold is one CheckpointError line."""
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(self.path, f"no tensor named {key!r}") from None

    def byte_range(self, key: str) -> tuple[int, int]:
        t = self.info(key)
        return t.begin, t.end

    def _page_span(self, begin: int, end: int) -> tuple[int, int]:
        start = begin - begin % PAGE
        return start, end - start

    def willneed(self, begin: int, end: int) -> None:
        """Ask the kernel to start reading a byte range into the page cache (non-blocking)."""
        if self._mm is None or end <= begin:
            return
        start, length = self._page_span(begin, end)
        self._mm.madvise(mmap.MADV_WILLNEED, start, length)

    def populate(self, begin: int, end: int) -> None:
        """Fault a byte range into this process (blocking; used by the prefetch thread)."""
        if self._mm is None or end <= begin:
            return
        start, length = self._page_span(begin, end)
        try:
            self._mm.madvise(_MADV_POPULATE_READ, start, length)
        except OSError as e:
            if e.errno in (errno.EFAULT, errno.EIO, errno.ENOMEM):
                # past the end of the file: it was truncated or replaced while mapped
                raise self._changed() from None
            # Older kernels (no MADV_POPULATE_READ): touch one byte per page — after checking the
            # file is still whole, since touching a page past its end would kill the process.
            self._check_size()
            self._base[start : start + length : PAGE].max()

    def _check_size(self) -> None:
        try:
            now = os.stat(self.path).st_size
        except OSError:
            now = -1
        if now < self.size:
            raise self._changed()

    def _changed(self) -> CheckpointError:
        return CheckpointError(self.path, "the file was truncated or replaced while in use; stopping "
                                          "(nothing was written)")

    def release_range(self, begin: int, end: int) -> None:
        """Drop the pages of a byte range from this process (RSS goes down; data stays on disk).

        Only whole pages inside the range are dropped, plus partial edge pages: the mapping is
        read-only and shared, so dropping a page never loses data — a later access re-reads it.
        """
        if self._mm is None or end <= begin:
            return
        start, length = self._page_span(begin, end)
        self._mm.madvise(mmap.MADV_DONTNEED, start, length)

    def release(self, key: str) -> None:
        self.release_range(*self.byte_range(key))

    def release_all(self) -> None:
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED, 0, len(self._mm))

    @property
    def address(self) -> int:
        """Start address of the mapping (to find it in /proc/self/smaps)."""
        return 0 if self._base is None else int(self._base.ctypes.data)

    def close(self) -> None:
        self._base = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # Views are still alive somewhere; the mapping goes when they do.
                pass
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
