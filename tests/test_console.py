"""A quiet console (vitq/logs.py): vitq's own lines on the console; other libraries' loggers, warnings, progress
bars and raw writes (a C extension's, a child process's) in the command's log file; `-v` shows them all live."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import make_workspace, tiny_params, vitq

# Everything a command's run meets, said once each way; then what vitq prints after it.
SAYS = r"""
import logging, os, subprocess, sys, warnings
from pathlib import Path
from vitq import logs

logs.setup()
import dvc  # noqa: F401  DVC and Prefect set up logging of their own on import: vitq's handlers must stay
from prefect import flow  # noqa: F401
with logs.log_file(Path(sys.argv[1]), "test", sys.argv[2] == "1") as log:
    logging.getLogger("vitq.flow").info("data: done in 1.0 s", extra=logs.CONSOLE)
    logging.getLogger("vitq.data").info("data: a detail")
    logging.getLogger("prefect").info("Starting temporary server")
    logging.getLogger("dvc").info("Updating lock file 'dvc.lock'")
    warnings.warn("a library's warning")
    print("a library prints")
    sys.stderr.write("bar 1/2\rbar 2/2\n")
    os.write(2, b"a C-level write\n")
    subprocess.run([sys.executable, "-c", "print('a child process')"])
print("the table")
print(f"full log: {log.path}")
"""
THIRD_PARTY = ("Starting temporary server", "Updating lock file 'dvc.lock'", "a library's warning", "a library prints",
               "bar 1/2\rbar 2/2", "a C-level write", "a child process")


def _say(tmp_path: Path, verbose: bool, env: dict | None = None) -> tuple[list[str], str]:
    """The console's lines (stdout and stderr; \r kept) and the log file's text."""
    proc = subprocess.run([sys.executable, "-c", SAYS, str(tmp_path), "1" if verbose else "0"], capture_output=True,
                          timeout=300, env={**os.environ, **(env or {})})  # bytes: a \r stays a \r
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).decode().rstrip("\n").split("\n")
    (path,) = [line.removeprefix("full log: ") for line in lines if line.startswith("full log: ")]
    with open(path, encoding="utf-8", newline="") as f:
        return lines, f.read()


def test_the_console_has_vitqs_lines_and_the_log_file_the_rest(tmp_path):
    lines, log = _say(tmp_path, verbose=False)
    assert len(lines) == 3 and {"data: done in 1.0 s", "the table"} < set(lines), lines
    assert any(line.startswith(f"full log: {tmp_path / 'reports' / 'logs' / 'test-'}") for line in lines), lines
    for said in (*THIRD_PARTY, "vitq.data: data: a detail", "vitq.flow: data: done in 1.0 s"):
        assert said in log, (said, log)
    assert "the table" not in log


def test_verbose_shows_everything_live_and_logs_the_records(tmp_path):
    lines, log = _say(tmp_path, verbose=True)
    console = "\n".join(lines)
    for said in (*THIRD_PARTY, "data: a detail", "data: done in 1.0 s", "the table"):
        assert said in console, (said, console)
    for said in ("vitq.data: data: a detail", "prefect: Starting temporary server", "a library's warning"):
        assert said in log, (said, log)


def test_a_child_appends_to_its_parents_log_file_what_its_parent_does_not_relay(tmp_path):
    parent = tmp_path / "parent.log"
    parent.write_text("")
    lines, log = _say(tmp_path, verbose=False, env={"VITQ_LOG_FILE": str(parent)})
    assert "data: done in 1.0 s" in lines and f"full log: {parent}" in lines, lines
    assert "data: done in 1.0 s" not in log  # the parent logs what it relays
    for said in (*THIRD_PARTY, "vitq.data: data: a detail"):
        assert said in log, (said, log)


def test_a_stage_is_one_line_and_where_its_log_is_unless_verbose(tmp_path):
    ws = make_workspace(tmp_path / "ws", tiny_params(), dvc=False)
    quiet = vitq(["stage", "data"], ws)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stderr.splitlines()[0].startswith("data: done in ") and len(quiet.stderr.splitlines()) == 1
    (line,) = quiet.stdout.splitlines()
    assert line.startswith("full log: reports/logs/stage-data-"), line
    assert "vitq.data: data: train=" in (ws / line.removeprefix("full log: ")).read_text()
    loud = vitq(["stage", "data", "-v"], ws)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "data: train=" in loud.stderr and loud.stdout.splitlines()[-1].startswith("full log: ")
