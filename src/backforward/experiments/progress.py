"""Progress for the long commands: a tqdm bar on a terminal; off it (CI, nohup, ``> log``) plain lines.

Off a terminal a line goes to stderr on the first update, then at most every ``every`` seconds, and at
the end: what is done of the total, the time spent, and an estimate of the time left.
"""

from __future__ import annotations

import sys
import time


def clock(seconds: float) -> str:
    """``seconds`` as m:ss or h:mm:ss."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Counts ``total`` units of work (``initial`` of them already done before this process started)."""

    def __init__(self, total: int, desc: str, unit: str = "run", initial: int = 0, every: float = 10.0) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = self.initial = initial
        self.started = time.monotonic()
        self.last_line = None
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.last_line is None or now - self.last_line >= self.every or self.done >= self.total:
            self.last_line = now
            print(self.line(now - self.started), file=sys.stderr, flush=True)

    def line(self, elapsed: float) -> str:
        """``desc: done/total units, elapsed, ~left`` (the estimate from this process's pace so far)."""
        fresh = self.done - self.initial
        left = elapsed / fresh * (self.total - self.done) if fresh > 0 else None
        estimate = "done" if self.done >= self.total else f"~{clock(left)} left" if left is not None else "? left"
        return f"{self.desc}: {self.done}/{self.total} {self.unit}s, {clock(elapsed)} elapsed, {estimate}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
