"""The one outside measurement of a child process's memory that every memory test uses (issue #14).

The parent starts the child and reads ``/proc/<pid>/status`` every few milliseconds (VmRSS and
VmHWM) until it exits. The result is the largest of these — a peak the child cannot hide: if it
resets its VmHWM (``/proc/self/clear_refs``), the parent has already seen the older value, and it
sees the reset itself (``hwm_decreased``). The kernel's ``ru_maxrss`` from ``wait4`` is not used:
it includes the peak of the memory image the child was forked from (``exec`` folds the old mm's
high-water mark in), which is the whole pytest process (measured: 1.7 GiB for a 269 MiB child),
and the peaks of the child's own children. A spike shorter than the sampling interval that a reset then erases
is the one thing it can miss, which is why the tests also require ``hwm_decreased`` to be False.

"Decreased" means by more than :data:`NOISE` (1 MiB): the kernel's RSS counters are per-CPU and
read approximately (Linux ≥ 6.2: ``percpu_counter_read``, off by up to 32 pages per CPU), so two
readings of an untouched VmHWM can differ by a few hundred KiB (measured here: 128 KiB drops in
a plain ``python -c 'import numpy'``). A reset that hides less than that hides nothing that matters.
VmHWM also reads lower, with no reset, after the kernel reclaims pages a process maps (the
high-water mark is only brought up to date lazily, on unmap and exit; /proc shows the larger of
it and RSS now): seen inside a cgroup at its limit, where page cache is reclaimed — there
:func:`assert_within` takes ``reclaim=True`` and relies on the samples' maximum alone.

    res = run_measured([sys.executable, "-m", "streamexec", "run", ...], env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.peak <= budget and not res.hwm_decreased
    assert not guard_warnings(res.stderr)

Linux only (``/proc``); the caller skips elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass

MIB = 1 << 20
#: How far VmHWM may read lower than before without counting as a reset (see the docstring).
NOISE = 1 * MIB


@dataclass
class Measured:
    """What the child did: exit code, its output, and its memory as seen from outside (bytes)."""

    returncode: int
    stdout: str
    stderr: str
    peak: int  # max of every VmRSS/VmHWM sample
    max_rss: int  # max VmRSS sample
    hwm_decreased: bool  # VmHWM went down between two samples: the child reset it
    samples: int
    seconds: float
    timeline: list[tuple[float, int, int]]  # (time.monotonic(), VmRSS, VmHWM) of every sample

    def window(self, t0: float, t1: float) -> tuple[int, bool]:
        """(max VmRSS/VmHWM sampled, VmHWM decreased) between ``t0`` and ``t1`` (``time.monotonic()``
        in the child: one clock for the whole machine), for a child that prints when its phases
        start and end."""
        seen = [(r, h) for t, r, h in self.timeline if t0 <= t <= t1]
        hwms = [h for _, h in seen]
        dec = any(b < a - NOISE for a, b in zip(hwms, hwms[1:]))
        return max((max(r, h) for r, h in seen), default=0), dec

    def describe(self) -> str:
        return (f"outside peak {self.peak / MIB:.1f} MiB (max VmRSS sample {self.max_rss / MIB:.1f} MiB, "
                f"{self.samples} samples in {self.seconds:.1f} s, VmHWM "
                f"{'DECREASED' if self.hwm_decreased else 'never decreased'})")


def _status(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in bytes of ``pid``, or None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            s = fh.read()
    except OSError:
        return None
    out = []
    for key in (b"VmRSS:", b"VmHWM:"):
        a = s.find(key)
        if a < 0:
            return None
        out.append(int(s[a + len(key):s.find(b"kB", a)]) * 1024)
    return out[0], out[1]


def run_measured(argv: list[str], *, interval: float = 0.003, timeout: float = 900, input: str | None = None,
                 **popen) -> Measured:
    """Run ``argv`` (text output captured) and sample its memory every ``interval`` seconds until it
    exits. ``popen`` goes to :class:`subprocess.Popen` (env, cwd, ...). The child must not
    ``fork`` away from its pid (a ``sh -c 'exec ...'`` wrapper is fine: same pid)."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True,
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL, **popen)
        if input is not None:
            proc.stdin.write(input)
            proc.stdin.close()
        peak = max_rss = last_hwm = 0
        decreased = False
        n = 0
        status = 0
        timeline: list[tuple[float, int, int]] = []
        while True:
            s = _status(proc.pid)
            if s is not None:
                rss, hwm = s
                n += 1
                timeline.append((time.monotonic(), rss, hwm))
                decreased |= hwm < last_hwm - NOISE
                last_hwm = max(last_hwm, hwm)
                max_rss = max(max_rss, rss)
                peak = max(peak, rss, hwm)
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout:
                proc.kill()
                _, status, _ = os.wait4(proc.pid, 0)
                break
            time.sleep(interval)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, out.read(), err.read(), peak, max_rss, decreased, n, time.monotonic() - t0,
                        timeline)


def guard_warnings(stderr: str) -> list[str]:
    """The lines in which streamexec says the process went over (or near) its budget."""
    return [line for line in stderr.splitlines() if "budget guard" in line or "over the budget" in line
            or "exceeded the budget" in line]


def assert_within(res: Measured, budget: int, what: str = "", *, reclaim: bool = False) -> None:
    """The usual memory assertion: exit 0, outside peak ≤ ``budget``, VmHWM never reset (unless
    ``reclaim``: the child ran under memory pressure, see the module docstring), and no guard
    warning (the run did not need the guard to stay inside)."""
    assert res.returncode == 0, res.stderr[-3000:]
    assert reclaim or not res.hwm_decreased, f"{what}: the child reset its VmHWM ({res.describe()})"
    assert not guard_warnings(res.stderr), guard_warnings(res.stderr)
    assert res.peak <= budget, f"{what}: {res.describe()} over the budget {budget / MIB:.1f} MiB"
