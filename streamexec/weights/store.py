"""WeightStore: hands out weights of one component by internal key, streams their pages in ahead
of use (background thread) and drops them after use, and reports what is resident."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError
from .refs import MappedTensor, TensorRef
from .safetensors_file import SafetensorsFile


@dataclass(frozen=True)
class Tensor:
    """A weight in its stored representation: ``array`` (raw view: bf16 as uint16, fp8 as uint8,
    f16 as float16, f32 as float32) plus its safetensors dtype tag."""

    array: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


class WeightStore:
    """Weights of one model component, by internal (diffusers/transformers) key.

    - ``get(key)`` returns a zero-copy view (a copy only for multi-part tensors, which are small).
    - ``prefetch(keys)`` faults the keys' pages in on a background thread; ``wait()`` joins it.
    - ``release(keys)`` drops the keys' pages from this process (madvise DONTNEED): RSS goes
      down, the page cache keeps them, nothing is lost (the mapping is read-only and shared).
    - ``resident_bytes()`` is the accountant's view (prefetched or fetched, not yet released);
      ``measured_resident_bytes()`` asks the kernel (/proc/self/smaps) to check it.
    """

    def __init__(self, tensors: dict[str, MappedTensor], files: dict[str, SafetensorsFile]) -> None:
        self.tensors = tensors
        self.files = files
        self._live: dict[str, int] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[list[str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self.bytes_prefetched = 0
        #: LoRA factors by key (``set_lora``): ``get`` hands those weights out wrapped in a
        #: ``kernels.lora.LoraWeight``, merged panel by panel by the kernels
        self.lora: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def set_lora(self, factors: dict[str, list[tuple[np.ndarray, np.ndarray, float]]]) -> None:
        """Attach LoRA factors ``{key: [(up [N, r], down [r, K], scale), ...]}`` (replaces any
        earlier set); they are stacked once: up columns pre-scaled, ranks summed."""
        from ..kernels.lora import LoraWeight  # numba: only when a LoRA is used

        self.lora = {}
        for key, fs in factors.items():
            shape = self.shape(key)
            flat = (shape[0], int(np.prod(shape[1:])))  # only the shape is needed here
            lw = LoraWeight.of(np.lib.stride_tricks.as_strided(np.empty(0, np.uint8), flat, (0, 0)),
                               self.dtype(key), fs)
            self.lora[key] = (lw.up, lw.down)

    def lora_bytes(self) -> int:
        """RAM of the attached LoRA factors."""
        return sum(int(u.nbytes + d.nbytes) for u, d in self.lora.values())

    # -- metadata (no data touched) --------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> MappedTensor:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(self._where(), f"missing tensor {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> str:
        return self.info(key).dtype

    def nbytes(self, key: str) -> int:
        return self.info(key).nbytes

    def _where(self) -> str:
        paths = sorted({p.path for m in self.tensors.values() for p in m.parts})
        return paths[0] if len(paths) == 1 else f"{len(paths)} files"

    # -- data -----------------------------------------------------------------------------
    def _part_view(self, ref: TensorRef) -> np.ndarray:
        arr = self.files[ref.path].view(ref.key)
        if ref.rows is not None:
            arr = arr[ref.rows[0] : ref.rows[1]]
        return arr.reshape(ref.shape)

    def _ranges(self, key: str) -> list[tuple[SafetensorsFile, int, int]]:
        out = []
        for ref in self.info(key).parts:
            f = self.files[ref.path]
            begin, end = f.byte_range(ref.key)
            if ref.rows is not None:
                info = f.info(ref.key)
                row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
                begin, end = begin + ref.rows[0] * row_bytes, begin + ref.rows[1] * row_bytes
            out.append((f, begin, end))
        return out

    def get(self, key: str) -> Tensor:
        """The tensor in its stored dtype; a view of the mapped file (touches no page itself)."""
        m = self.info(key)
        if m.is_view:
            arr = self._part_view(m.parts[0])
        else:
            arr = np.concatenate([self._part_view(p) for p in m.parts], axis=0).reshape(m.shape)
        with self._lock:
            self._live.setdefault(key, m.nbytes)
        tag = m.dtype
        if m.scale is not None:  # ComfyUI scaled fp8: the kernels apply the scale per panel
            arr, tag = self._scaled(key, arr, m.scale), "F8_E4M3_SCALED"
        f = self.lora.get(key)
        if f is not None:  # LoRA factors: added to each decoded panel, never merged into a copy
            from ..kernels.lora import LoraWeight

            return Tensor(LoraWeight(arr, tag, f[0], f[1]), tag)
        return Tensor(arr, tag)

    def _scaled(self, key: str, arr: np.ndarray, ref: TensorRef):
        from ..kernels.dequant import PackedWeight

        scale = self._part_view(ref)
        if not np.isfinite(scale).all():
            raise CheckpointError(ref.path, f"scale {ref.key!r} of {key} is not finite")
        return PackedWeight.scaled_fp8(np.ascontiguousarray(arr), scale)

    def get_f32(self, key: str) -> np.ndarray:
        """A decoded f32 copy — only for small tensors (biases, norm weights, embedding rows)."""
        t = self.get(key)
        if t.dtype == "F32":
            return np.array(t.array, dtype=np.float32)
        from ..kernels.decode import decode_to_f32  # numba: only when something needs decoding

        return decode_to_f32(t.array, t.dtype)

    # -- paging ---------------------------------------------------------------------------
    def prefetch(self, keys: Iterable[str]) -> None:
        """Start faulting these tensors' pages in on the background thread (returns at once)."""
        keys = [k for k in keys]
        for k in keys:
            self.info(k)  # unknown keys fail here, in the caller's thread
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name="streamexec-prefetch", daemon=True)
                self._thread.start()
        self._queue.put(keys)

    def readahead(self, keys: Iterable[str]) -> None:
        """Ask the kernel to read these tensors into the page cache in the background, without
        mapping them into the process: I/O overlap at no cost in RSS (MADV_WILLNEED)."""
        for k in keys:
            for f, b, e in self._ranges(k):
                f.willneed(b, e)

    def _worker(self) -> None:
        while True:
            keys = self._queue.get()
            if keys is None:
                return
            try:
                for k in keys:
                    for f, b, e in self._ranges(k):
                        f.populate(b, e)
                        self.bytes_prefetched += e - b
                    with self._lock:
                        self._live.setdefault(k, self.tensors[k].nbytes)
            except BaseException as e:  # surfaced by wait()
                self._error = e
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def wait(self) -> None:
        """Block until every prefetch so far is done; re-raises a prefetch error."""
        with self._idle:
            while self._pending:
                self._idle.wait()
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def release(self, keys: Iterable[str]) -> None:
        """Drop these tensors' pages from the process (they stay in the page cache)."""
        for k in keys:
            for f, b, e in self._ranges(k):
                f.release_range(b, e)
            with self._lock:
                self._live.pop(k, None)

    def release_all(self) -> None:
        for f in self.files.values():
            f.release_all()
        with self._lock:
            self._live.clear()

    def resident_bytes(self) -> int:
        """Bytes of weights fetched or prefetched and not yet released (accounting)."""
        with self._lock:
            return sum(self._live.values())

    def measured_resident_bytes(self) -> int:
        """Resident bytes of this store's file mappings, as the kernel reports them."""
        starts = {f.address for f in self.files.values() if f.address}
        return _smaps_rss(starts)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None


def _smaps_rss(starts: set[int]) -> int:
    """Sum of ``Rss:`` of the mappings in /proc/self/smaps that begin at one of ``starts``."""
    total = 0
    current = False
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                if "-" in line[:20] and not line[0].isupper():
                    start = int(line.split("-", 1)[0], 16)
                    current = start in starts
                elif current and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total
