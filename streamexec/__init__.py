"""streamexec: run huge image models on ordinary CPUs inside a memory budget you name."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def __getattr__(name: str):
    # The API pulls in numba and the kernels; keep ``import streamexec`` (and the CLI) light.
    if name == "load":
        from .api import load

        return load
    raise AttributeError(f"module 'streamexec' has no attribute {name!r}")
