"""LoRA factors carried with a weight and merged panel by panel, never into a full copy of W.

A ``LoraWeight`` wraps a stored [N, K] weight (a plain array in a ``DECODE_TAGS`` dtype or a
``kernels.dequant.PackedWeight``) with low-rank factors ``(up [N, r], down [r, K], scale)``.
It looks like the base weight to the kernels (``shape``, row slices as views, ``tag``) and its
``decode`` writes ``W[rows, c0:c1] + Σ_i scale_i · up_i[rows] @ down_i[:, c0:c1]`` into the f32
panel: the merge costs one rank-R GEMM per panel (R = the summed ranks, all LoRAs stacked) plus a
temporary of at most ``LORA_CHUNK_ELEMS`` floats (``lora_scratch_bytes``), never a merged W.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamexec.kernels.decode import decode_block_to_f32

__all__ = ["LoraWeight", "lora_scratch_bytes", "lora_factor_bytes", "LORA_CHUNK_ELEMS"]

#: The low-rank product is added in row chunks of at most this many f32 elements (the temporary).
LORA_CHUNK_ELEMS = 1 << 16


def lora_scratch_bytes(k: int, rank: int) -> int:
    """Extra scratch one panel merge needs: the temporary product chunk (``LORA_CHUNK_ELEMS``
    floats, at least one row of K) — 0 without factors."""
    return 0 if rank <= 0 else 4 * max(LORA_CHUNK_ELEMS, k)


def lora_factor_bytes(n: int, k: int, rank: int) -> int:
    """RAM of the f32 factors of a rank-``rank`` LoRA (or several, ranks summed) on an [N, K] weight."""
    return 4 * rank * (n + k)


@dataclass(frozen=True)
class LoraWeight:
    """Base weight ``base`` [N, K] stored as ``tag`` plus stacked factors: ``up`` f32 [N, R]
    already multiplied by each LoRA's scale, ``down`` f32 [R, K]. ``LoraWeight.of`` builds one."""

    base: object
    tag: str
    up: np.ndarray
    down: np.ndarray

    @property
    def ndim(self) -> int:
        return len(self.base.shape)

    @classmethod
    def of(cls, base, tag: str, factors: list[tuple[np.ndarray, np.ndarray, float]]) -> LoraWeight:
        """Wrap ``base`` with ``factors`` = [(up [N, r_i], down [r_i, K], scale_i)] (scale_i is the
        whole multiplier: user weight x alpha / rank)."""
        n, k = base.shape[0], int(np.prod(base.shape[1:]))  # a conv weight: [Cout, Cin * kh * kw]
        ups, downs = [], []
        for up, down, s in factors:
            up, down = np.asarray(up, np.float32), np.asarray(down, np.float32)
            up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)  # LoCon: 1x1 up, kxk down
            if up.ndim != 2 or down.ndim != 2 or up.shape[0] != n or down.shape[1] != k or up.shape[1] != down.shape[0]:
                raise ValueError(f"LoRA factors up {up.shape} / down {down.shape} do not fit a weight of shape "
                                 f"{(n, k)}")
            ups.append(up * np.float32(s))
            downs.append(down)
        if not ups:
            raise ValueError("a LoraWeight needs at least one pair of factors")
        return cls(base, tag, np.ascontiguousarray(np.concatenate(ups, axis=1)),
                   np.ascontiguousarray(np.concatenate(downs, axis=0)))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.base.shape)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def nbytes(self) -> int:
        return int(self.base.nbytes)

    def as_2d(self) -> LoraWeight:
        """A conv weight [Cout, Cin, kh, kw] as the [Cout, Cin * kh * kw] matrix the conv kernel
        decodes (the down factor is stored flattened the same way)."""
        if len(self.base.shape) == 2:
            return self
        return LoraWeight(np.ascontiguousarray(self.base).reshape(self.base.shape[0], -1), self.tag, self.up,
                          self.down)

    def __getitem__(self, sl: slice) -> LoraWeight:
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("a LoraWeight only slices contiguous row ranges")
        return LoraWeight(self.base[sl], self.tag, self.up[sl], self.down)

    def decode(self, out: np.ndarray | None = None, c0: int = 0, c1: int | None = None) -> np.ndarray:
        """Rows x columns ``c0:c1`` of the merged weight into the C-contiguous f32 ``out``."""
        rows, k = self.shape
        c1 = k if c1 is None else c1
        if out is None:
            out = np.empty((rows, c1 - c0), np.float32)
        decode_block_to_f32(self.base, self.tag, c0, c1, out)
        w = c1 - c0
        if out.size == 0 or w == 0:
            return out
        o = out.reshape(rows, w)
        d = self.down[:, c0:c1]
        step = max(1, LORA_CHUNK_ELEMS // w)
        tmp = np.empty(min(rows, step) * w, np.float32)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            t = tmp[: (r1 - r0) * w].reshape(r1 - r0, w)
            np.matmul(self.up[r0:r1], d, out=t)
            o[r0:r1] += t
        return out
