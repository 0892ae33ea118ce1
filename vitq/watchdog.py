"""A run's watchdog: nothing a `vitq run` started outlives it, even when it is SIGKILLed or OOM-killed.

`vitq run` starts Prefect's temporary server in a session of its own (so a terminal's Ctrl-C reaches only
`vitq run`, which stops it: flows/prefect_server.py) and stage subprocesses (the benchmark). A process killed
with SIGKILL runs no handler, so those were left running with no parent. `start()` spawns this module as a
small process of its own session that watches the run's pid: every `POLL_S` it notes the run's descendants
(psutil, any depth); when the run is gone it sends them SIGTERM, then SIGKILL to what is left after
`GRACE_S`, and exits. psutil identifies a process by pid and start time, so a reused pid is never signalled.
It exits by itself when the run ends normally (with nothing left to stop). Linux and macOS alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 3.0


def start(pid: int | None = None) -> subprocess.Popen:
    """The watchdog of process `pid` (default: this one), started in a session of its own."""
    return subprocess.Popen([sys.executable, "-m", "vitq.watchdog", str(pid or os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def watch(pid: int) -> int:
    """Note `pid`'s descendants until it is gone, then stop those still running. Returns how many it stopped."""
    import psutil

    me = os.getpid()
    try:
        run = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    seen: dict[int, psutil.Process] = {}
    while True:
        try:
            if not run.is_running() or run.status() == psutil.STATUS_ZOMBIE:
                break
            for child in run.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        for gone in [p for p, proc in seen.items() if not proc.is_running()]:
            del seen[gone]
        time.sleep(POLL_S)
    left = [proc for proc in seen.values() if proc.is_running()]
    for proc in left:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return len(left)


if __name__ == "__main__":
    sys.exit(0 if watch(int(sys.argv[1])) >= 0 else 1)
