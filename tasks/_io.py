"""Atomic writes: a stage's outputs appear complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path


# Name part of every temporary entry a stage writes beside its outputs (`.model.onnx.tmp-x1y2`);
# `remove_partial_outputs` finds what an interrupted or killed run left by it.
PARTIAL_MARK = ".tmp-"
OUTPUT_ROOTS = ("data", "models", "artifacts", "reports")  # the workspace folders stages write to

_closed = threading.Event()
_creating = threading.RLock()  # reentrant: the interrupt handler runs on the main thread, maybe inside a write


def close_writes() -> None:
    """Stop new atomic writes from starting (the interrupt handler, before it sweeps the partial
    entries and exits): a worker thread that would start one waits for the exit instead, so the
    sweep cannot miss an entry created after it."""
    with _creating:
        _closed.set()


def _temp_entry(final: Path, make_dir: bool) -> Path:
    with _creating:
        if not _closed.is_set():  # (the folder too: it may be a swept temporary one)
            final.parent.mkdir(parents=True, exist_ok=True)
            if make_dir:
                return Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL_MARK}", dir=final.parent))
            fd, name = tempfile.mkstemp(prefix=f".{final.name}{PARTIAL_MARK}", dir=final.parent)
            os.close(fd)
            return Path(name)
    threading.Event().wait()  # interrupted: the process is exiting; never start a write it would leave half-done
    raise AssertionError("unreachable")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success it replaces `final`, on error it is removed."""
    tmp = _temp_entry(Path(final), make_dir=True)
    final = Path(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temp file path beside `final`; on success it is renamed onto `final`."""
    final = Path(final)
    tmp = _temp_entry(final, make_dir=False)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.chmod(0o644)  # mkstemp makes it 0600
    os.replace(tmp, final)


def remove_partial_outputs(root: Path) -> list[Path]:
    """Remove the temporary entries of unfinished writes under the workspace's output folders (left
    by an interrupted or killed run; DVC would otherwise hash them into the stage's outputs)."""
    removed = []
    for top in OUTPUT_ROOTS:
        for parent, dirs, files in os.walk(Path(root) / top):
            for name in [*dirs, *files]:
                if name.startswith(".") and PARTIAL_MARK in name:
                    path = Path(parent) / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                    removed.append(path)
            dirs[:] = [d for d in dirs if not (d.startswith(".") and PARTIAL_MARK in d)]
    return removed


def write_json(path: Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def size_mb(path: Path) -> float:
    """Size on disk in MiB of a file, or of every file under a directory (a Core ML .mlpackage)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


_STDOUT_LOCK = __import__("threading").Lock()


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Swallow what a library prints (ONNX Runtime's histogram collectors print per call).

    `contextlib.redirect_stdout` swaps the process-wide `sys.stdout`; two threads nesting it out of
    order would leave it pointing at a dead buffer. One lock makes every swap and restore pair up."""
    import io

    with _STDOUT_LOCK, contextlib.redirect_stdout(io.StringIO()):
        yield


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (md5: what dvc.lock and DVC's .dir manifests record)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()
