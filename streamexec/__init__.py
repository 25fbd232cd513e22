"""streamexec: run huge image models on ordinary CPUs inside a memory budget you name."""

__version__ = "0.1.0"
