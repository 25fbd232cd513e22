"""What can run out of core, and in which bands: the rules the planner decides spills with and
the runtime's banded ops (``runtime/ops.py``, ``runtime/spill.py``) cut their work by.

Which op inputs can be read back from disk band by band (:func:`streamable`), which outputs can
be written to disk band by band (:func:`banded_output`), the axis bands step along
(:func:`row_axis`) and how many rows a band holds (:func:`ooc_rows`, :data:`BAND_ELEMS`). They
live with the planner, which records its choices in the schedule (``stream_inputs``,
``disk_out``, the ``ooc_rows`` parameter); the runtime imports them from here."""

from __future__ import annotations

from math import prod

#: Band size for ops that combine a spilled input chunk by chunk (elements of f32: 4 MiB).
BAND_ELEMS = 1 << 20

#: Rows per band for ops that run out of core when the plan does not say (about 8 MiB of f32).
OOC_TARGET_BYTES = 8 << 20


def row_axis(shape: tuple[int, ...]) -> int:
    """The axis banded ops step along: H of NCHW maps, N (tokens) of [B, N, D], else the first."""
    return 2 if len(shape) == 4 else (1 if len(shape) == 3 else 0)


def ooc_rows(shape: tuple[int, ...], params: dict, in_shape: tuple[int, ...] | None = None) -> int:
    """Output rows per band of a banded op writing a tensor of ``shape`` (the plan's ``ooc_rows``),
    sized so the wider of an output row and an input row (``in_shape``) takes ~8 MiB a band."""
    if params.get("ooc_rows"):
        return int(params["ooc_rows"])
    axis = row_axis(shape)
    per_row = 4 * int(prod(shape)) // max(1, shape[axis])
    if in_shape is not None:
        per_row = max(per_row, 4 * int(prod(in_shape)) // max(1, in_shape[row_axis(in_shape)]))
    return max(1, min(shape[axis], OOC_TARGET_BYTES // max(1, per_row)))


def streamable(kind: str, position: int, attrs: dict) -> bool:
    """Can input ``position`` of an op of ``kind`` be read back band by band from disk?
    concat (any input: read straight into its slot of the output), add without broadcasting
    (either side), the residual input of linear and conv2d, the main input of a stride-1 conv2d
    and of group_norm (row bands with halos / two passes)."""
    if kind == "concat":
        return True
    if kind == "add":
        return not attrs.get("broadcast") and position in (0, 1)
    if kind == "linear":
        return position == 1 and not attrs.get("gate")
    if kind == "conv2d":  # the input in row bands (stride 1), the residual band by band
        return position == 1 or (position == 0 and attrs.get("stride", 1) == 1)
    if kind == "group_norm":  # two passes over row bands: statistics, then normalise
        return position == 0
    return False


def banded_output(kind: str, attrs: dict, shape: tuple[int, ...]) -> bool:
    """Can an op of ``kind`` write its output straight to disk, band by band?"""
    if kind == "conv2d":
        return attrs.get("stride", 1) == 1
    if kind == "group_norm":
        return True
    if kind == "add":
        return not attrs.get("broadcast") and len(shape) in (3, 4)
    return False
