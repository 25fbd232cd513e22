"""Progress on stderr for a terminal over SSH: one line per stage, a bar for the denoise steps
with s/it, ETA and the process RSS against the budget; redrawn in place on a TTY, one line per
step otherwise (logs); nothing with ``quiet``. Ends with a one-line summary."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..runtime.process import current_rss, peak_rss
from ..sizes import format_size

MIB = 1 << 20


class Progress:
    """Callable as the pipelines' ``progress(stage, done, total)``."""

    def __init__(self, budget: int | None, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.budget = budget
        self.quiet = quiet
        self.out = stream or sys.stderr
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self.stage: str | None = None
        self.t_stage = 0.0
        self.t_last = 0.0
        self.stage_seconds: dict[str, float] = {}
        self._open_line = False
        self.peak_override: int | None = None

    def _rss(self) -> str:
        rss = current_rss() / MIB
        return f"RSS {rss:.0f}/{self.budget / MIB:.0f} MiB" if self.budget else f"RSS {rss:.0f} MiB"

    def _emit(self, text: str, final: bool) -> None:
        if self.quiet:
            return
        if self.tty:
            self.out.write("\r\x1b[2K" + text + ("\n" if final else ""))
            self._open_line = not final
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage != self.stage or done == 0:
            if self.stage is not None and self.stage != stage:
                self._finish_stage(now)
            if stage != self.stage:
                self.stage, self.t_stage = stage, now
            self.t_last = now
            if total > 1:
                self._emit(f"{stage:<15} {0:>3}/{total} {self._bar(0, total)} {self._rss()}", final=False)
            return
        elapsed = now - self.t_stage
        if total > 1:
            per = elapsed / done
            eta = per * (total - done)
            text = (f"{stage:<15} {done:>3}/{total} {self._bar(done, total)} {per:6.2f} s/it  "
                    f"ETA {eta:5.0f} s  {self._rss()}")
            self._emit(text, final=done >= total)
        else:
            self._emit(f"{stage:<15} done in {elapsed:.2f} s  {self._rss()}", final=True)
        if done >= total:
            self.stage_seconds[stage] = elapsed
            self.stage = None

    def _finish_stage(self, now: float) -> None:
        if self.stage is not None and self.stage not in self.stage_seconds:
            self.stage_seconds[self.stage] = now - self.t_stage
            if self._open_line and self.tty and not self.quiet:
                self.out.write("\n")
                self._open_line = False

    @staticmethod
    def _bar(done: int, total: int, width: int = 24) -> str:
        fill = int(width * done / max(1, total))
        return "[" + "#" * fill + "." * (width - fill) + "]"

    def summary(self, stage_seconds: dict[str, float], total_seconds: float, bytes_streamed: int, path: str) -> str:
        """The closing line (printed even with ``quiet``: it says where the image is)."""
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in stage_seconds.items())
        peak = self.peak_override or peak_rss()
        budget = f" (budget {format_size(self.budget)})" if self.budget else ""
        return (f"wrote {path} in {total_seconds:.1f} s [{stages}]; peak RSS {format_size(peak)}{budget}; "
                f"{format_size(bytes_streamed)} of weights streamed")
