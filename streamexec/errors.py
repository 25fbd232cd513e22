"""Error types: every user-facing failure is a StreamexecError with one readable line."""

from __future__ import annotations


class StreamexecError(Exception):
    """Base class; the CLI prints ``str(err)`` on one line and exits non-zero."""

    exit_code = 2


class CheckpointError(StreamexecError):
    """A checkpoint file or folder is missing, corrupt, unsafe or not a model we know."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class LayoutError(CheckpointError):
    """The tensors in a checkpoint do not match any key layout streamexec knows."""


class BudgetError(StreamexecError):
    """The memory budget is too small (the message names the smallest that works)."""


class PlanError(StreamexecError):
    """A plan file is malformed, unsafe, or does not match its checkpoint."""


class NotImplementedYet(StreamexecError):
    """A sub-command whose feature has not landed yet."""

    exit_code = 3
