"""The console and the log file of `vitq run`, `vitq stage` and `vitq orchestrate`.

The console carries vitq's own lines: a line per stage and variant with its time, progress on long work,
the final table and where the full log is. Everything else goes to the command's log file in the
workspace, reports/logs/<command>-<UTC time>.log (git-ignored, no DVC output): vitq's other lines,
Python warnings, the other libraries' loggers (Prefect's state lines, DVC's lock-file lines, MLflow,
coremltools), progress bars, and whatever a library or a child process writes to stdout or stderr.
`-v` (or VITQ_VERBOSE=1 in the environment: the stages `dvc repro` runs) shows all of it live, as before;
the log file then holds the logged records only (raw writes went to the terminal).

How, with what `logging` and the OS offer:
- the root logger has two handlers, the console and the file, set before Prefect is imported (Prefect
  keeps a root logger its user configured, PrefectHQ/prefect#18873, so its flow- and task-run lines
  reach these handlers instead of a console handler of its own); while the file is open, the root
  logger passes warnings and `logging.captureWarnings` makes Python's warnings log records;
- the console handler lets through vitq's records marked `extra=CONSOLE` and vitq's errors;
- raw writes are caught at the file descriptors: while the command runs, stdout and stderr (fd 1 and 2)
  point at the log file, so C extensions, progress bars and the child processes that inherit them
  (Prefect's temporary server) write there; the console is a duplicate of the original stderr;
- a vitq child process (the benchmark stage the flow starts) finds the file in VITQ_LOG_FILE (and -v in
  VITQ_VERBOSE) and appends to it; its console is the pipe its parent reads and relays, so what reaches
  that console is left out of the file (the parent logs what it relays).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

LOG_DIR = Path("reports") / "logs"  # in the workspace; /reports/* is git-ignored, and no DVC output is here
LOG_FILE_ENV = "VITQ_LOG_FILE"  # for child processes: the log file of the command that started them
VERBOSE_ENV = "VITQ_VERBOSE"  # "1": -v's default (set for child processes of a command run with -v)
CONSOLE = {"console": True}  # `log.info(..., extra=CONSOLE)`: a line for the console (and the log file)
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_console_handler: list[logging.StreamHandler] = []  # the one console handler (setup)
_open: list[LogFile] = []  # the log file of this command while it runs
_last: list[LogFile] = []  # the last one, once closed


@dataclass(frozen=True)
class LogFile:
    path: Path
    relayed: bool  # a child's: its console is its parent's pipe, the parent says where the log is
    console: TextIO | None = None  # the terminal while fd 1 and 2 point at the file (None with -v)


def is_own(record: logging.LogRecord) -> bool:
    """A record of vitq's own loggers."""
    return record.name == "vitq" or record.name.startswith("vitq.")


def for_console(record: logging.LogRecord) -> bool:
    """While a log file takes the rest: vitq's lines marked CONSOLE and vitq's errors."""
    return is_own(record) and (getattr(record, "console", False) or record.levelno >= logging.ERROR)


def setup() -> None:
    """The console on stderr: vitq's loggers at INFO; of the others, what sets its own level (Prefect's INFO)
    and errors. Safe to call again (the console handler is replaced)."""
    root = logging.getLogger()
    for old in _console_handler:
        root.removeHandler(old)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    _console_handler[:] = [console]
    root.setLevel(logging.ERROR)  # the root logger's own records (ONNX Runtime's quantization logs through it)
    logging.getLogger("vitq").setLevel(logging.INFO)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # DVC prints its records itself, through the handlers `import dvc` adds to these loggers (to sys.stdout and
    # sys.stderr, so to the log file while one is open); propagated as well, each would be printed twice.
    for name in ("dvc", "dvc_objects", "dvc_data"):
        logging.getLogger(name).propagate = False


def console() -> TextIO:
    """Where vitq's own lines go now: the terminal's stderr, also while fd 2 points at the log file."""
    return (_open[0].console if _open else None) or sys.stderr


def current() -> LogFile | None:
    """The log file of the command running, if any."""
    return _open[0] if _open else None


def last() -> LogFile | None:
    """The log file open now, else the last one closed (what an error line names), if any."""
    return current() or (_last[0] if _last else None)


def verbose_default() -> bool:
    """-v's default: VITQ_VERBOSE=1 (a child of a command run with -v, or `VITQ_VERBOSE=1 dvc repro`)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def new_log_path(root: Path, command: str) -> Path:
    """reports/logs/<command>-<UTC time>.log in the workspace root, a new file (-2, -3 ... within a second)."""
    folder = Path(root) / LOG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in command)
    for n in range(1, 1000):
        path = folder / f"{name}-{stamp}{'' if n == 1 else f'-{n}'}.log"
        try:
            path.touch(exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free log file name in {folder}")


@contextlib.contextmanager
def log_file(root: Path, command: str, verbose: bool = False) -> Iterator[LogFile]:
    """Inside: the command's log file (a new one under `root`, or its parent command's, from VITQ_LOG_FILE) takes
    every log record; unless `verbose`, it also takes every raw write to stdout and stderr, and the console
    shows only vitq's lines marked CONSOLE (and its errors)."""
    inherited = os.environ.get(LOG_FILE_ENV)
    path = Path(inherited) if inherited else new_log_path(root, command)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"==== vitq {' '.join(sys.argv[1:])} in {Path(root).resolve()} (pid {os.getpid()}, "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})\n")
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    if inherited:  # what reaches our console, the parent relays and logs: not here too
        handler.addFilter((lambda record: False) if verbose else (lambda record: not for_console(record)))
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    root_level = root_logger.level
    root_logger.setLevel(logging.WARNING)  # the file takes the warnings of every library
    logging.captureWarnings(True)  # and Python's warnings, as records of `py.warnings`
    saved_env = {key: os.environ.get(key) for key in (LOG_FILE_ENV, VERBOSE_ENV)}
    os.environ.update({LOG_FILE_ENV: str(path), VERBOSE_ENV: "1" if verbose else "0"})
    try:
        with contextlib.nullcontext() if verbose else _fds_to(path) as terminal:
            _open[:] = [LogFile(path, bool(inherited), terminal)]
            if terminal is not None:
                for console_handler in _console_handler:
                    console_handler.setStream(terminal)
                    console_handler.addFilter(for_console)
            try:
                yield _open[0]
            finally:
                for console_handler in _console_handler:
                    console_handler.removeFilter(for_console)
                    console_handler.setStream(sys.stderr)
                _last[:] = _open[:1]
                _open.clear()
    finally:
        logging.captureWarnings(False)
        root_logger.setLevel(root_level)
        root_logger.removeHandler(handler)
        handler.close()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _fds_to(path: Path) -> Iterator[TextIO]:
    """Point fd 1 and 2 at `path` (appending); yield a text stream on the original stderr; restore both."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    terminal = open(os.dup(saved[2]), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                    errors="backslashreplace")
    try:
        for fd in (1, 2):
            os.dup2(target, fd)
        yield terminal
    finally:
        for stream in (sys.stdout, sys.stderr, terminal):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(target)
        terminal.close()
