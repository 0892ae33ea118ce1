"""tasks/resources.py: a stage's wall time and peak RSS (exact when it ran alone, sampled and shared when stages ran
side by side as threads), and the critical path through a run's records."""

from __future__ import annotations

import threading
import time

import numpy as np

from vitq.tasks import resources


def _hold(mb: int, seconds: float) -> None:
    block = np.ones(mb << 18, dtype=np.float32)  # mb MB, touched
    time.sleep(seconds)
    del block


def test_a_stage_alone_reads_the_kernels_high_water_mark():
    with resources.measured("small") as small:
        time.sleep(0.05)
    with resources.measured("big") as big:
        _hold(300, 0.01)  # shorter than a sampling interval: only the high-water mark sees it
    assert big["peak"] == "exact" and big["beside"] == [] and big["stage"] == "big"
    assert big["peak_rss_mb"] >= small["peak_rss_mb"] + 250, (small, big)
    assert small["seconds"] >= 0.05 and small["ended"] >= small["started"]
    with resources.measured("after") as after:  # a new window: the earlier peak is not this stage's
        time.sleep(0.01)
    assert after["peak_rss_mb"] < big["peak_rss_mb"] - 250, (after, big)


def test_stages_side_by_side_share_a_sampled_peak():
    out = {}
    with resources.measured("before") as before:
        time.sleep(0.2)

    def stage(name, mb):
        with resources.measured(name) as rec:
            _hold(mb, 0.6)
        out[name] = rec

    threads = [threading.Thread(target=stage, args=(n, mb)) for n, mb in (("a", 200), ("b", 10))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out["a"]["beside"] == ["b"] and out["b"]["beside"] == ["a"]
    assert out["a"]["peak"] == out["b"]["peak"] == "sampled"
    assert out["b"]["peak_rss_mb"] >= before["peak_rss_mb"] + 150, (before, out)  # b's process held a's 200 MB too
    assert abs(out["a"]["peak_rss_mb"] - out["b"]["peak_rss_mb"]) < 50


def test_records_are_written_and_read_back(tmp_path):
    rec = {"stage": "export", "seconds": 1.5, "peak_rss_mb": 900.0, "beside": []}
    path = tmp_path / "reports" / "stages" / "export.json"
    resources.write_record(path, rec)
    assert resources.read_record(path) == rec
    assert resources.read_record(tmp_path / "missing.json") is None  # made before records existed
    path.write_text("{not json")
    assert resources.read_record(path) is None
    assert resources.console_suffix(rec) == ", peak RSS 900 MB"
    assert resources.console_suffix({**rec, "beside": ["x"]}).endswith("(process, shared with variants beside it)")


def test_the_critical_path_follows_dependencies_and_worker_slots():
    def r(start, end):
        return {"started": start, "ended": end, "seconds": end - start}

    records = {"data": r(0, 1), "model": r(1.5, 10), "export": r(10.5, 20), "quantize@a": r(21, 50),
               "quantize@b": r(21, 30), "quantize@c": r(30.5, 40),  # c waited for b's worker
               "validate@c": r(40.5, 60), "validate@a": r(50.5, 55), "benchmark": r(61, 70),
               "calibrate": r(-500, -400)}  # made by an earlier run: not on this run's path
    deps = {"model": ["data"], "export": ["model"], "quantize@a": ["export"], "quantize@b": ["export"],
            "quantize@c": ["export"], "validate@c": ["quantize@c"], "validate@a": ["quantize@a"],
            "benchmark": ["quantize@a", "quantize@b", "quantize@c", "validate@a", "validate@c"]}
    path = resources.critical_path(records, deps)
    assert [c["stage"] for c in path] == ["data", "model", "export", "quantize@b", "quantize@c", "validate@c",
                                          "benchmark"]
    assert path[4]["waited_on"] == {"stage": "quantize@b", "why": "turn"}
    assert path[5]["waited_on"] == {"stage": "quantize@c", "why": "dependency"}
    assert path[0]["waited_on"] is None
    assert resources.critical_path({}, {}) == []
