"""Ctrl-C and SIGTERM end a run within seconds, with one line naming the stage that was interrupted.

Why not let KeyboardInterrupt unwind: variants run on Prefect's thread pool, whose shutdown waits
for every running variant (minutes for a recovery recipe), and Prefect swaps SIGTERM for its own
handler during a flow run. So the handler does the whole teardown itself, then leaves at once:
1. the cleanups registered by whoever started something (the temporary Prefect server, a timing
   subprocess) run, each bounded in time;
2. the partial outputs of stages in progress (atomic writes' temp folders) are removed: finished
   stages are already complete on disk and recorded in dvc.lock, so the next run continues there;
3. `vitq: interrupted by SIGINT during stage 'calibrate' ...` on the console (stderr), exit code 128 + signal
   (130 for SIGINT, 143 for SIGTERM), without waiting for worker threads.
Code that must not be cut in half (DVC writing dvc.lock) runs inside `deferred()`: a signal that
arrives there is handled when it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HANDLED = (signal.SIGINT, signal.SIGTERM)

_lock = threading.RLock()
_stage: list[str] = []  # the stage(s) in progress, outermost first
_running: dict[str, int] = {}  # units of work in progress inside the stage (e.g. variants), by name
_cleanups: dict[int, Callable[[], None]] = {}
_workspace: list[Path] = []
_deferred = 0
_pending: list[int] = []


def install(workspace: Path | None = None) -> None:
    """Take over SIGINT and SIGTERM in this (main) thread; `workspace`: where partial outputs are swept."""
    if workspace is not None:
        _workspace[:] = [Path(workspace)]
    for sig in HANDLED:
        signal.signal(sig, _handle)


def begin_stage(name: str) -> None:
    """Mark `name` as the stage in progress (what the interruption line names) until `end_stage`."""
    with _lock:
        _stage.append(name)


def end_stage(name: str) -> None:
    with _lock:
        if name in _stage:
            _stage.remove(name)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    begin_stage(name)
    try:
        yield
    finally:
        end_stage(name)


@contextlib.contextmanager
def running(name: str) -> Iterator[None]:
    """Mark a unit of work inside the stage (a variant on a worker thread) as in progress."""
    with _lock:
        _running[name] = _running.get(name, 0) + 1
    try:
        yield
    finally:
        with _lock:
            _running[name] -= 1
            if not _running[name]:
                del _running[name]


def on_interrupt(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Run `cleanup` if the process is interrupted; returns the function that unregisters it."""
    key = id(cleanup)
    with _lock:
        _cleanups[key] = cleanup
    return lambda: _cleanups.pop(key, None)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A signal arriving inside this block is handled when the block ends (main thread only)."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1
        if not _deferred and _pending:
            _handle(_pending.pop(), None)


def describe() -> str:
    with _lock:
        names = ", ".join(f"'{name}'" for name in dict.fromkeys(_stage))
        where = f"stage{'s' if len(set(_stage)) > 1 else ''} {names}" if _stage else "start-up"
        if _running:
            where += f" ({', '.join(sorted(_running))} in progress)"
    return where


def _handle(signum: int, frame) -> None:
    if _deferred:
        _pending.append(signum)
        return
    for sig in HANDLED:  # a second Ctrl-C while tearing down must not interrupt the teardown
        signal.signal(sig, signal.SIG_IGN)
    where = describe()
    for cleanup in list(_cleanups.values()):
        _bounded(cleanup, seconds=4.0)
    if _workspace:
        from vitq.tasks._io import close_writes, remove_partial_outputs

        # Worker threads keep running until the exit, but start no new atomic write after
        # close_writes; sweep twice for entries whose writer was between its check and its mkdtemp.
        close_writes()
        for _ in range(2):
            _bounded(lambda: remove_partial_outputs(_workspace[0]), seconds=2.0)
            time.sleep(0.2)
    name = signal.Signals(signum).name
    from vitq import logs

    out = logs.console()  # the terminal, also while stdout and stderr point at the log file
    print(f"vitq: interrupted by {name} during {where}; nothing half-written is left; finished stages are "
          "recorded in dvc.lock and the next `vitq run` (or `dvc repro`) continues from there", file=out, flush=True)
    log = logs.current()
    if log is not None and not log.relayed:
        print(f"full log: {log.path}", file=out, flush=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(128 + signum)


def _bounded(fn: Callable[[], None], seconds: float) -> None:
    """Run `fn` on a daemon thread for at most `seconds` (a stuck cleanup must not stall the exit)."""
    t = threading.Thread(target=_quiet, args=(fn,), daemon=True)
    t.start()
    t.join(seconds)


def _quiet(fn: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):
        fn()
