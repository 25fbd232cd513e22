"""The budget guard: the executor's check, op by op, that the process really stays inside the
memory budget the planner fitted the run into — and what it does when it does not.

The planner's numbers are estimates (a baseline measured once, kernel scratch formulas, a 24 MiB
safety margin for what it cannot see). When they are wrong the run would silently exceed the
budget the user named. So after every op the executor samples the process (one ``pread`` of
``/proc/self/status``: VmRSS now and VmHWM, the peak since the process started, so a spike inside
the op counts too) and compares with the budget:

* **cheap path**: VmHWM did not grow and RSS is inside the budget — nothing new happened, done;
* **over**: VmHWM grew above the budget, or RSS after the op is above it. ``strict`` raises
  :class:`BudgetExceeded` (one line: the op and its kind, the measured peak and RSS, the budget
  and the planner's estimate for that op); otherwise the executor adapts (below) and logs one
  line with ``warnings.warn``;
* **near**: VmHWM grew to within :data:`HEADROOM` of the budget *and* above what the planner
  charged for this op — the estimate was wrong and the budget is about to break: adapt (never an
  error, even with ``strict``). A correct plan stays under its own per-op estimate, so it never
  triggers this (no false alarms); a tight but correct plan may sit within the headroom.

Adaptations apply to the ops and units *after* the one that overshot (the current unit's weights
are already in) and only ever change how the work is cut, never what is computed:

1. no weights mapped ahead (``populate`` → ``readahead``: page cache only) and one op per
   streaming unit (only the running op's weights resident), skipped if the plan already does both;
2. then, at each further trigger, every later op's kernel parameters one step further down the
   planner's own menu (:class:`ShrinkMenus`, handed in by the caller: the planner's
   ``planner.menus.ParamMenus`` over :func:`streamexec.planner.memory.param_options`: row chunks,
   weight panels, attention q/k tiles, conv bands halved down to their minimum), until nothing is
   left to shrink (logged once); without menus this step is "exhausted" at once.

Every adaptation also returns freed heap to the OS (``malloc_trim``). The guard does not add
spills: which activations to send to disk is a whole-graph decision (their next uses, bands) that
the planner makes; cutting mapped weights and scratch is local and safe at any point. A trigger
inside the unit where the last adaptation was made does not escalate again (it has not taken
effect yet). Outputs stay equal up to float reassociation (attention tiles change the order of
the online-softmax sums).

The guard never resets VmHWM (issue #14): VmHWM is what ``/usr/bin/time``, ``getrusage`` and a
user's ``grep VmHWM /proc/PID/status`` read, and erasing a peak would hide it from all of them.
A peak already above the budget when a run starts (imports, JIT compilation, an earlier call) is
reported, not erased: one warning per process, or :class:`BudgetExceeded` with ``strict``. Only
the per-op windows of ``--trace`` reset VmHWM (``runtime/executor.py``, which notes the peak in
:func:`process_peak` first, and the CLI says so).

Which budgets are guarded is the caller's call (``api.StreamedModel._guard_limit``): byte budgets
and ``"min"`` (the planner's own smallest peak) when the baseline is this process's. The adapted
schedule — with the unit that overshot split one op per unit too — is kept for the model's next
calls (a UNet's next denoising step), and the guard goes on from there.
Cost: ~10 µs per op (one ``pread``).
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ..errors import BudgetError
from ..sizes import format_size
from .process import peak_rss

_MIB = 1 << 20

#: How close to the budget a new peak may come, when it is also above the planner's estimate for
#: the op, before the guard adapts the rest of the run.
HEADROOM = 8 * _MIB

_observed_peak = 0
_older_peak_reported = False


def note_peak(value: int) -> None:
    """Remember a VmHWM reading before VmHWM is reset (``--trace`` windows only), so the process
    peak is not lost."""
    global _observed_peak
    if value > _observed_peak:
        _observed_peak = value


def process_peak() -> int:
    """The peak RSS of this process so far: VmHWM, or a larger one read before a reset (only the
    per-op trace windows reset VmHWM)."""
    return max(_observed_peak, peak_rss())


def malloc_trim() -> None:
    """Give freed heap back to the OS (glibc only; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class BudgetExceeded(BudgetError):
    """``strict``: the process went over the memory budget while an op ran."""


@dataclass
class GuardEvent:
    """One thing the guard did: at op ``index`` (``name``, ``kind``) of streaming unit ``unit``,
    with the peak (VmHWM) and RSS it measured, the budget and the planner's estimate for the op."""

    index: int
    name: str
    kind: str
    unit: int
    peak_rss: int
    rss: int
    budget: int
    planned: int
    trigger: str  # "over" | "near"
    action: str  # "stream", "shrink", "exhausted", "abort"
    detail: str


class StatusSampler:
    """VmRSS and VmHWM with one ``pread`` of ``/proc/self/status`` on a descriptor kept open for
    the run (opened by the process that runs, so a fork does not read its parent's)."""

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open("/proc/self/status", os.O_RDONLY)
        except OSError:
            self.fd = None

    def sample(self) -> tuple[int, int]:
        """(RSS now, VmHWM) in bytes; (0, 0) where /proc is not there."""
        if self.fd is None:
            return 0, 0
        s = os.pread(self.fd, 8192, 0)
        return _field(s, b"VmRSS:"), _field(s, b"VmHWM:")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _field(s: bytes, key: bytes) -> int:
    a = s.find(key)
    if a < 0:
        return 0
    b = s.find(b"kB", a)
    return int(s[a + len(key):b]) * 1024


class BudgetGuard:
    """The per-op check (see the module docstring). ``limit`` is the RSS bound of the whole
    process in bytes; ``model`` names the graph in messages."""

    def __init__(self, limit: int, *, strict: bool = False, model: str = "") -> None:
        self.limit = int(limit)
        self.strict = strict
        self.model = model
        self.sampler = StatusSampler()
        self.events: list[GuardEvent] = []
        self.level = 0  # 0: as planned, 1: streaming one op at a time, k ≥ 2: k-1 menu steps down
        self.exhausted = False
        self.hold_until_unit = -1  # no new escalation before this unit starts
        _, self.prev_hwm = self.sampler.sample()
        older = max(self.prev_hwm, _observed_peak)
        if older > self.limit:
            self.older_peak(older)

    def older_peak(self, hwm: int) -> None:
        """The process went over the budget before this run (start-up, JIT compilation, an
        earlier call): the peak stays what it was (never reset); ``strict`` stops here, else one
        warning per process says so."""
        global _older_peak_reported
        what = (f"peak RSS {format_size(hwm)} over the budget {format_size(self.limit)} before {self.model} ran "
                f"(start-up, imports, JIT compilation or an earlier call)")
        if self.strict:
            self.events.append(GuardEvent(-1, "", "", -1, hwm, 0, self.limit, 0, "over", "abort", what))
            raise BudgetExceeded(f"strict memory budget: {what}")
        if not _older_peak_reported:
            _older_peak_reported = True
            warnings.warn(f"budget guard: {what}; it stays the process peak", RuntimeWarning, stacklevel=4)

    def was_reset(self, rss: int) -> None:
        """VmHWM was reset by someone else (the trace's per-op windows) at RSS ``rss``."""
        self.prev_hwm = rss

    def check(self, hwm: int, planned: int, rss: int = 0) -> str | None:
        """"over", "near" or None for a sample taken right after an op (see the module docstring).
        VmHWM is never reset, so after a first overshoot a later one shows as a new maximum of
        VmHWM or as RSS above the budget after the op."""
        if hwm <= self.prev_hwm:
            return "over" if rss > self.limit else None
        self.prev_hwm = hwm
        if hwm > self.limit:
            return "over"
        if planned and hwm > self.limit - HEADROOM and hwm > planned:
            return "near"
        return None

    def abort(self, index: int, name: str, kind: str, unit: int, rss: int, hwm: int, planned: int) -> None:
        msg = (f"strict memory budget: peak RSS {format_size(hwm)} exceeded the budget {format_size(self.limit)} "
               f"during op {name} ({kind}) of {self.model}; the plan estimated {format_size(planned)} for it "
               f"(RSS now {format_size(rss)})")
        self.events.append(GuardEvent(index, name, kind, unit, hwm, rss, self.limit, planned, "over", "abort", msg))
        raise BudgetExceeded(msg)

    def log(self, event: GuardEvent) -> None:
        global _older_peak_reported
        self.events.append(event)
        if event.trigger == "over":  # said once: the next calls do not repeat it as an older peak
            _older_peak_reported = True
        where = "over" if event.trigger == "over" else f"within {format_size(HEADROOM)} of"
        warnings.warn(
            f"budget guard: peak RSS {format_size(event.peak_rss)} {where} the budget {format_size(event.budget)} "
            f"at op {event.name} ({event.kind}) of {self.model}, planned {format_size(event.planned)}: "
            f"{event.detail}", RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        self.sampler.close()


class ShrinkMenus(Protocol):
    """The kernel-parameter menus of a graph's ops, handed to the executor by whoever plans
    (``planner.menus.ParamMenus``): the guard only asks it to step ops down."""

    def shrink(self, op_params: dict[int, dict], ops: Iterable[int]) -> int:
        """Move each of ``ops`` one step down its menu in ``op_params``; how many changed."""
        ...
