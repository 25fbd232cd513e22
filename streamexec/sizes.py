"""Human byte sizes: ``--memory-budget 1G`` in, ``1.00 GiB`` out; the one reader of a memory budget."""

from __future__ import annotations

import re

from .errors import StreamexecError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse ``512M``, ``1G``, ``1.5GiB``, ``800MB`` or a plain byte count (binary units)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise StreamexecError(
            f"cannot read size {text!r}: use a number with K, M, G or T (e.g. 512M, 1G)"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    return int(value)


def format_size(n: float) -> str:
    """``1536`` -> ``1.50 KiB``; exact enough for tables and messages."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def parse_budget(budget: int | str | None) -> int | str | None:
    """A memory budget as the CLI, ``streamexec.load``, the pipelines and plan files give it: a size
    (``512M``, ``1G``, a byte count), ``"auto"`` (the cgroup limit or available RAM, minus a margin:
    resolved now, to bytes), ``"min"`` (the fastest schedule within the smallest budget that fits) and
    ``"smallest"`` (every op at its smallest option, the most disk traffic: for testing the out-of-core
    paths), both kept as words, or None (no bound: the fastest schedule)."""
    if budget is None or budget in ("min", "smallest"):
        return budget
    if budget == "auto":
        from .memlimit import auto_budget  # reads /proc and the cgroup files: only when asked

        return auto_budget()
    return parse_size(budget)
