"""Progress lines for long loops: `what: i/n <note> (elapsed, ETA)`, at most one every few seconds, always
the last one, so a user watching `vitq run` (or a Prefect flow run's logs) sees work and its remaining time.

All of them go to the log; the console (`vitq.logs`) gets few: none for a loop shorter than CONSOLE_AFTER_S,
then at most one every CONSOLE_EVERY_S and each CONSOLE_STEP further along (so at most four a loop; the
loop's last line is left to the line of its stage or variant)."""

from __future__ import annotations

import logging
import time

from vitq.logs import CONSOLE

CONSOLE_AFTER_S = 30.0
CONSOLE_EVERY_S = 30.0
CONSOLE_STEP = 0.2


class Progress:
    def __init__(self, log: logging.Logger, what: str, total: int, every_s: float = 3.0):
        self.log, self.what, self.total, self.every_s = log, what, max(int(total), 1), every_s
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.console_s, self.console_done = 0.0, 0  # elapsed time and units at the last console line

    def step(self, note: str = "", n: int = 1) -> None:
        """`n` more units done; logs when `every_s` passed since the last line, and at the last unit."""
        self.done += n
        now = time.perf_counter()
        if now - self.last < self.every_s and self.done < self.total and self.done != n:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done)
        tail = f"{elapsed:.0f}s elapsed, ETA {eta:.0f}s" if self.done < self.total else f"{elapsed:.1f}s"
        console = (self.done < self.total and elapsed >= CONSOLE_AFTER_S and elapsed - self.console_s >= CONSOLE_EVERY_S
                   and (self.done - self.console_done) / self.total >= CONSOLE_STEP)
        if console:
            self.console_s, self.console_done = elapsed, self.done
        self.log.info("%s: %d/%d%s (%s)", self.what, self.done, self.total, f" {note}" if note else "", tail,
                      extra=CONSOLE if console else None)
