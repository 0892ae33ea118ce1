"""Ctrl-C and SIGTERM sent to a real `vitq run`'s process group in the middle of a stage: exit within
10 s with 128 + signal and one line naming the stage, no process left (the temporary Prefect server
included), nothing half-written, and the next run continues from the last completed stage."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import VITQ, make_workspace, run_env, tiny_params
from vitq.tasks._io import PARTIAL_MARK, remove_partial_outputs
from vitq import interrupt


def _processes_of(env_home: str) -> list[psutil.Process]:
    """Processes started with this test's PREFECT_HOME (vitq itself, the server, a timing subprocess)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("PREFECT_HOME") == env_home:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


STOP_CEILING_S = 120  # a generous ceiling on the wait for the stop: it fails a hang, not a slow machine


def _interrupt_at(ws: Path, marker: str, sig: signal.Signals) -> tuple[int, float, list[str]]:
    """Start `vitq run`, send `sig` to its process group as soon as `marker` is in its log file (the console
    has a line per stage when it ends; the log file says when each starts). Returns the console's lines."""
    env = run_env(ws)
    logs = ws / "reports" / "logs"
    before = set(logs.glob("run-*.log"))
    proc = subprocess.Popen([VITQ, "run"], cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 900
    while True:
        new = sorted(set(logs.glob("run-*.log")) - before)
        if new and marker in new[-1].read_text(errors="replace"):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"{marker!r} never logged; run ended with {proc.returncode}: {out[-3000:]}")
        time.sleep(0.1)
    sent = time.monotonic()
    os.killpg(proc.pid, sig)
    try:
        out, _ = proc.communicate(timeout=STOP_CEILING_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"vitq run still alive {STOP_CEILING_S} s after {sig.name}")
    return proc.returncode, time.monotonic() - sent, out.splitlines()


def _skipped(lines: list[str]) -> set[str]:
    """The stages and variants the console's `up to date (dvc.lock), skipped: ...` lines name."""
    prefix = "up to date (dvc.lock), skipped: "
    return {name for line in lines if line.startswith(prefix) for name in line.removeprefix(prefix).split(", ")}


def _assert_clean_stop(ws: Path, rc: int, lines: list[str], sig: signal.Signals, stage: str):
    assert rc == 128 + sig, (rc, lines[-20:])  # it stopped (within STOP_CEILING_S: how fast is a benchmark's matter)
    said = [line for line in lines if line.startswith("vitq: interrupted")]
    assert len(said) == 1 and f"by {sig.name} during stage" in said[0] and f"'{stage}'" in said[0], lines[-20:]
    assert not any("Traceback" in line for line in lines), "\n".join(lines[-40:])
    deadline = time.monotonic() + STOP_CEILING_S
    while (left := _processes_of(run_env(ws)["PREFECT_HOME"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [p.cmdline() for p in left]
    partial = [p for top in ("data", "models", "artifacts", "reports") for p in (ws / top).rglob(f"*{PARTIAL_MARK}*")]
    assert not partial, partial


@pytest.mark.slow
def test_interrupted_run_stops_cleanly_and_the_next_run_continues(tmp_path):
    ws = make_workspace(tmp_path / "ws", tiny_params(quantize={"recipes": ["onnx-w8-dynamic", "onnx-w8a8-minmax"], "carry": {}}))

    rc, _, lines = _interrupt_at(ws, "calibrate: running", signal.SIGINT)
    _assert_clean_stop(ws, rc, lines, signal.SIGINT, "calibrate")
    assert any(line.startswith("export: done in") for line in lines), lines
    assert any(line.startswith("full log: ") for line in lines), lines  # after the interruption's line

    rc, _, lines = _interrupt_at(ws, "quantize@onnx-w8a8-minmax: running", signal.SIGTERM)
    _assert_clean_stop(ws, rc, lines, signal.SIGTERM, "quantize@onnx-w8a8-minmax")
    assert {"data", "model", "export"} <= _skipped(lines), lines  # finished before the first interruption
    # Interrupted the first time: it runs again, unless the signal came while its outputs were being committed
    # (dvc.lock is never cut in half: the exit waits for the commit), which a tiny model's one-batch calibration
    # can reach on a loaded machine; then it is up to date, never half-done.
    assert any(line.startswith("calibrate: done in") for line in lines) or "calibrate" in _skipped(lines), lines

    done = subprocess.run([VITQ, "run"], cwd=ws, env=run_env(ws), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = (done.stderr + done.stdout).splitlines()
    assert {"data", "model", "export", "calibrate", "reference", "plan"} <= _skipped(lines), lines
    for line in ("onnx-w8a8-minmax: quantize + validate done in", "benchmark: done in", "report: done in"):
        assert any(ln.startswith(line) for ln in lines), (line, lines)
    assert (ws / "reports" / "summary.json").is_file()


@pytest.mark.slow
def test_kill_9_of_a_run_leaves_no_process_of_it(tmp_path):
    """SIGKILL (as the OOM killer sends) to `vitq run` alone, mid-stage: it runs no handler, yet its temporary
    Prefect server (a session of its own) and everything else it started are gone within seconds (vitq/watchdog.py)."""
    ws = make_workspace(tmp_path / "ws", tiny_params(quantize={"recipes": ["onnx-w8-dynamic"], "carry": {}}))
    env = run_env(ws)
    proc = subprocess.Popen([VITQ, "run"], cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline, logs = time.monotonic() + 900, ws / "reports" / "logs"
    while not any("calibrate: running" in f.read_text(errors="replace") for f in logs.glob("run-*.log")):
        assert proc.poll() is None and time.monotonic() < deadline, f"calibrate never started (exit {proc.returncode})"
        time.sleep(0.1)
    started = [p for p in _processes_of(env["PREFECT_HOME"]) if p.pid != proc.pid]
    assert any("uvicorn" in " ".join(p.cmdline()) for p in started), [p.cmdline() for p in started]
    os.kill(proc.pid, signal.SIGKILL)  # the process only, not its group: what the OOM killer does
    proc.wait()
    deadline = time.monotonic() + 30
    while (left := _processes_of(env["PREFECT_HOME"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [p.cmdline() for p in left]


def test_partial_outputs_are_found_and_removed(tmp_path):
    kept = tmp_path / "artifacts" / "variants" / "onnx-w8a8-minmax" / "model.onnx"
    kept.parent.mkdir(parents=True)
    kept.write_text("done")
    half = tmp_path / "artifacts" / "variants" / f".onnx-w8a8-auto{PARTIAL_MARK}x1y2"
    (half / "nested").mkdir(parents=True)
    stray = tmp_path / "reports" / f".summary.json{PARTIAL_MARK}abc"
    stray.parent.mkdir()
    stray.write_text("{")
    outside = tmp_path / f".elsewhere{PARTIAL_MARK}keep"  # not an output folder: not ours to remove
    outside.write_text("")
    assert sorted(remove_partial_outputs(tmp_path)) == sorted([half, stray])
    assert kept.is_file() and outside.exists() and not half.exists() and not stray.exists()


def test_no_write_starts_after_the_interrupt_closes_writes(tmp_path, monkeypatch):
    """A worker thread still running after the sweep must not leave a new partial entry (the race the
    slow test above once lost: an error report's figure started after the interrupt's last sweep)."""
    import threading

    from vitq.tasks import _io

    monkeypatch.setattr(_io, "_closed", threading.Event())
    swept = tmp_path / "reports" / "validation" / f".v{PARTIAL_MARK}abc"  # a folder the sweep removed

    def late_writer():
        with _io.atomic_file(swept / "errors.png") as tmp:
            tmp.write_text("half")

    with _io.atomic_file(tmp_path / "reports" / "before.json") as tmp:  # open: allowed
        tmp.write_text("{}")
    _io.close_writes()
    writer = threading.Thread(target=late_writer, daemon=True)
    writer.start()
    writer.join(1.0)
    assert writer.is_alive(), "the late write should wait for the exit"
    assert not swept.exists() and remove_partial_outputs(tmp_path) == []
    assert (tmp_path / "reports" / "before.json").read_text() == "{}"


def test_a_signal_inside_deferred_waits_for_the_block(monkeypatch):
    handled = []
    monkeypatch.setattr(interrupt.os, "_exit", lambda code: handled.append(code))
    monkeypatch.setattr(interrupt, "_cleanups", {})
    monkeypatch.setattr(interrupt, "_workspace", [])
    try:
        with interrupt.deferred():
            interrupt._handle(signal.SIGINT, None)
            assert handled == []  # e.g. DVC writing dvc.lock: not cut in half
        assert handled == [130]
    finally:
        for sig in interrupt.HANDLED:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
