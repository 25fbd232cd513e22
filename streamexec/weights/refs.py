"""Plain records that connect the internal (diffusers/transformers) tensor names to stored bytes.

The layouts layer produces them from key names and shapes alone; the WeightStore resolves them to
views. Nothing here touches a file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as it is stored: which file, under which key, with which dtype tag and shape."""

    path: str
    key: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorRef:
    """One stored tensor, optionally a row range of its first dimension, seen with ``shape``.

    A row range of a C-contiguous tensor is contiguous, and a reshape of it is a view, so a
    TensorRef always resolves to a zero-copy view (e.g. BFL FLUX's fused qkv split into q, k, v;
    an LDM VAE 1×1 attention conv seen as a linear weight).
    """

    path: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class MappedTensor:
    """An internally named tensor: one part (a view) or several parts concatenated on dim 0
    (a copy; only used for small tensors such as BFL's swapped shift/scale in ``norm_out``)."""

    parts: tuple[TensorRef, ...]
    shape: tuple[int, ...]
    dtype: str
    #: ComfyUI scaled fp8: the f32 scale (one value, or one per row) the stored fp8 values are
    #: multiplied by (``weights.scaled``); None for every other weight
    scale: TensorRef | None = None

    @property
    def is_view(self) -> bool:
        return len(self.parts) == 1

    @property
    def nbytes(self) -> int:
        from .dtypes import DTYPES

        n = DTYPES[self.dtype].itemsize
        for s in self.shape:
            n *= s
        return n


def single(st: StoredTensor) -> MappedTensor:
    """The identity mapping of a stored tensor."""
    return MappedTensor((TensorRef(st.path, st.key, st.dtype, st.shape),), st.shape, st.dtype)
