"""streamexec: run huge image models on ordinary CPUs inside a memory budget you name."""

from __future__ import annotations

import os as _os

# Before numba loads libgomp: OpenMP workers that spin for long after a parallel kernel steal the
# cores the next sgemm needs (see kernels/decode.py). A user's own setting wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def __getattr__(name: str):
    # The API pulls in numba and the kernels; keep ``import streamexec`` (and the CLI) light.
    if name == "load":
        from .api import load

        return load
    raise AttributeError(f"module 'streamexec' has no attribute {name!r}")
