"""Wall time and peak RSS of each stage run: `reports/stages/<dvc stage>.json`, one of the stage's DVC outputs.

A stage's record travels with its outputs (DVC caches, pushes and pulls it with them), so the report of a
workspace says what each of its outputs cost when it was made, on which machine, also for the stages a
rerun skipped or a teammate's `dvc pull` brought. It is an output of its own, beside the stage's others: no
other stage reads it but the report, so a rerun that remakes identical outputs leaves what reads them up to
date. The report (`reports/summary.json`, report.md) and MLflow read the records; the console line of a stage
is made from its record.

Peak RSS is this process's resident memory while the stage ran. A stage that ran alone (the stages before
and after the variants, each `vitq stage` process under `dvc repro`) reads the kernel's high-water mark
(VmHWM, reset at its start): exact. Variants run side by side as threads of one process, so a variant's
peak is the process's while it ran, sampled every 0.1 s, shared with the variants named in `beside`.
"""

from __future__ import annotations

import contextlib
import platform
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from vitq.tasks import _memory

_INTERVAL_S = 0.1


class _Sampler:
    """One thread per process sampling its RSS while any measured region is open."""

    def __init__(self):
        self.lock = threading.Lock()
        self.open: dict[int, dict] = {}  # region id -> its record in progress
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()

    def rss(self) -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def sample(self) -> None:
        rss = self.rss()
        with self.lock:
            for rec in self.open.values():
                rec["_peak"] = max(rec["_peak"], rss)

    def loop(self) -> None:
        while True:
            with self.lock:
                idle = not self.open
            if idle:
                self.wake.wait()
                self.wake.clear()
                continue
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a measurement never fails a stage
                pass
            time.sleep(_INTERVAL_S)

    def begin(self, stage: str) -> dict:
        with self.lock:
            alone = not self.open
            rec = {"stage": stage, "_peak": 0, "_alone": alone and _memory.reset_peak(), "_beside": set(),
                   "_start": time.perf_counter(), "started": time.time()}
            for other in self.open.values():  # each names the other
                other["_beside"].add(stage)
                other["_alone"] = False
                rec["_beside"].add(other["stage"])
            self.open[id(rec)] = rec
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self.loop, name="vitq-rss-sampler", daemon=True)
                self.thread.start()
        self.wake.set()
        return rec

    def end(self, rec: dict) -> dict:
        try:
            self.sample()  # its last moment counts
        except Exception:  # noqa: BLE001
            pass
        with self.lock:
            self.open.pop(id(rec), None)
        peak = rec["_peak"]
        exact = rec["_alone"]
        if exact:
            hwm = _memory.peak_rss()
            peak = max(peak, hwm or 0)
        return {
            "stage": rec["stage"],
            "seconds": round(time.perf_counter() - rec["_start"], 3),
            "peak_rss_mb": round(peak / 2**20, 1) if peak else None,
            "peak": "exact" if exact else "sampled",
            "beside": sorted(rec["_beside"]),
            "started": round(rec["started"], 3),
            "ended": round(time.time(), 3),
            "host": platform.node(),
        }


_SAMPLER = _Sampler()


@contextlib.contextmanager
def measured(stage: str) -> Iterator[dict]:
    """Measure the block as stage `stage`: the dict yielded is filled with its record when the block ends
    (also when it raises: the caller decides whether to write it)."""
    out: dict = {}
    rec = _SAMPLER.begin(stage)
    try:
        yield out
    finally:
        out.update(_SAMPLER.end(rec))


def write_record(path: Path, record: dict) -> None:
    from vitq.tasks._io import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


def read_record(path: Path) -> dict | None:
    """The record at `path`, or None (a stage made before records existed)."""
    from vitq.tasks._io import read_json

    try:
        rec = read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "seconds" in rec else None


def console_suffix(record: dict | None) -> str:
    """`, peak RSS N MB` for a stage's console line (`(process, shared)` when it ran beside others)."""
    if not record or not record.get("peak_rss_mb"):
        return ""
    shared = " (process, shared with variants beside it)" if record.get("beside") else ""
    return f", peak RSS {_memory.mb(record['peak_rss_mb'] * 2**20)}{shared}"


# -- where the time went: the critical path through the records of one run ---------------------------

_TOLERANCE_S = 15.0  # a stage that started within this of a predecessor's end waited on it (DVC checks between)


def critical_path(records: dict[str, dict], deps: dict[str, list[str]]) -> list[dict]:
    """The chain of stages the last one to end waited on, first to last: each names the stage, its seconds and
    what it waited on (`dependency`: a DVC dependency (`deps`) ended just before it started; `turn`: a stage it
    does not read ended just before: the stages before the variants run one at a time, and a variant waits
    for a worker (`max_workers`) to free). The chain ends at a stage nothing ended shortly before (the run's
    first, or one whose inputs an earlier run made)."""
    timed = {k: r for k, r in records.items() if r.get("ended") is not None and r.get("started") is not None}
    if not timed:
        return []
    current = max(timed, key=lambda k: timed[k]["ended"])
    chain = [{"stage": current, "seconds": timed[current]["seconds"], "waited_on": None}]
    seen = {current}
    while True:
        start = timed[current]["started"]
        before = {k: r for k, r in timed.items() if k not in seen and r["ended"] <= start + 0.01
                  and start - r["ended"] <= _TOLERANCE_S}
        if not before:
            break
        # What ended last before it started is what it waited for; a dependency that ended at the same moment
        # (within 0.25 s) is named rather than a stage beside it.
        last = max(r["ended"] for r in before.values())
        dep_hits = [k for k in deps.get(current, []) if k in before and before[k]["ended"] >= last - 0.25]
        if dep_hits:
            nxt, why = max(dep_hits, key=lambda k: before[k]["ended"]), "dependency"
        else:
            nxt, why = max(before, key=lambda k: before[k]["ended"]), "turn"
        chain[-1]["waited_on"] = {"stage": nxt, "why": why}
        chain.append({"stage": nxt, "seconds": timed[nxt]["seconds"], "waited_on": None})
        seen.add(nxt)
        current = nxt
    chain.reverse()
    return chain
