"""Prefect's temporary local server, started in a session of its own.

Without PREFECT_API_URL, Prefect starts a temporary server as a child process of `vitq run`, in
the terminal's process group: Ctrl-C reached the server too, which exited while the flow went on
and hung on a dead API. Here the same server (Prefect's own `SubprocessASGIServer`, the instance
Prefect's clients look up) is started in a new session, so a terminal's signals reach only `vitq
run`, which stops the server itself, normally or when interrupted (`vitq.interrupt`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from unittest import mock

from vitq import interrupt

STARTUP_TIMEOUT_S = 90  # seconds the temporary server may take to answer


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Inside: a Prefect API. PREFECT_API_URL's server when it names one; otherwise the temporary
    server in a session of its own, named as the API URL for every client (an empty PREFECT_API_URL
    would otherwise send events to no address), stopped on the way out or on an interruption."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    server = _own_session_server()
    # Prefect waits 20 s by default for its server to answer; on a loaded 2-core machine its start
    # (migrations, imports) has taken longer. A user's own setting of it is kept.
    timeout = {} if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ else {
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: STARTUP_TIMEOUT_S}
    try:
        with temporary_settings(updates=timeout):
            server.start()
    except RuntimeError as exc:  # Prefect's "Timed out while attempting to connect ..."
        _kill_group(server)
        server.stop()
        from vitq.errors import VitqError

        waited = timeout.get(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS) or \
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        raise VitqError(f"Prefect's temporary server did not start: {str(exc).rstrip('.')} (waited {waited:g} s; raise "
                        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or point PREFECT_API_URL at a running server)") from None
    forget = interrupt.on_interrupt(lambda: _kill_group(server))
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield
            finally:
                # deliver what is queued while the server is up, a failed run's logs too: left queued, Prefect's
                # log worker printed "--- Error logging to API --- All connection attempts failed" at exit
                for worker in (APILogWorker, EventsWorker):
                    with contextlib.suppress(Exception):
                        worker.drain_all(timeout=10)
    finally:
        _kill_group(server)
        server.stop()  # forgets Prefect's instance
        forget()


def _own_session_server():
    from prefect.server.api.server import SubprocessASGIServer

    class OwnSessionServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect builds the command and environment; only the session is ours to set.
            own_session = _popen_in_new_session(subprocess.Popen)
            with mock.patch.object(subprocess, "Popen", own_session):
                return super()._run_uvicorn_command()

    # SubprocessASGIServer keeps one instance per port (None: "any free port") in a class-level
    # dict; created first, this one is what Prefect's clients get from `SubprocessASGIServer()`.
    return OwnSessionServer()


def _popen_in_new_session(popen):
    def start(*args, **kwargs):
        return popen(*args, start_new_session=True, **kwargs)

    return start


def _kill_group(server) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after 3 s."""
    proc = server.server_process
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
