"""The one-line progress bar every recipe's training and evaluation print on stderr."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A one-line progress bar with loss, throughput and the time left (ETA, from the rate so far): redrawn in
    place on a terminal; otherwise (a log file, a CI job) a line every 10% of the run or every ``seconds``,
    whichever comes first. ``what`` names what is counted (``step``; ``evaluation batch``), ``unit`` what the
    throughput counts (``seq``, ``img``, ``clip``)."""

    def __init__(
        self,
        total: int,
        start: int,
        enabled: bool,
        seconds: float = 60.0,
        what: str = "step",
        unit: str = "seq",
        clock=time.perf_counter,
    ):
        self.total, self.start, self.enabled, self.seconds, self.what = total, start, enabled, seconds, what
        self.unit = unit
        self.clock = clock
        self.t0, self.tty = clock(), sys.stderr.isatty()
        self.every = max(1, (total - start) // 10)
        self.last = self.t0

    def update(self, step: int, loss: float | None, count: int, note: str = "") -> None:
        """After step ``step`` (0-based) of ``count`` items; ``note`` (an epoch, a stage) follows the counter."""
        if not self.enabled:
            return
        done, now = step + 1, self.clock()
        elapsed = max(now - self.t0, 1e-9)
        rate = (done - self.start) * count / elapsed
        eta = (self.total - done) * elapsed / max(done - self.start, 1)
        filled = int(30 * done / max(self.total, 1))
        shown = (f" {note}" if note else "") + ("" if loss is None else f" loss {loss:.4f}")
        line = (
            f"[{'#' * filled}{'.' * (30 - filled)}] {self.what} {done}/{self.total}{shown} {rate:.1f} {self.unit}/s "
            f"ETA {_clock(eta)}"
        )
        if self.tty:
            print("\r" + line, end="" if done < self.total else "\n", file=sys.stderr, flush=True)
        elif (done - self.start) % self.every == 0 or done == self.total or now - self.last >= self.seconds:
            self.last = now
            print(line, file=sys.stderr, flush=True)
