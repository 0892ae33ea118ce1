"""Long loops show progress with an ETA (tasks/_progress.py), and calibration's entropy search, done tensor by
tensor for its progress, gives the ranges ONNX Runtime's collector gives."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np


def test_progress_lines_count_up_with_eta_and_end_with_the_total(caplog):
    from vitq.tasks._progress import Progress

    log = logging.getLogger("vitq.test.progress")
    with caplog.at_level(logging.INFO, logger="vitq.test.progress"):
        p = Progress(log, "work: item", 4, every_s=0.0)
        for i in range(4):
            p.step(f"note {i}")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("work: item: 1/4 note 0 (") and "ETA" in lines[0]
    assert lines[-1].startswith("work: item: 4/4 note 3 (") and "ETA" not in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitq.test.progress"):
        p = Progress(log, "quiet", 100, every_s=3600)
        for _ in range(100):
            p.step()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["quiet: 1/100", "quiet: 100/100"]


def test_the_console_gets_a_few_progress_lines_of_long_loops_only(caplog, monkeypatch):
    """Every line goes to the log file; the console (records marked CONSOLE) gets none in a loop's first 30 s, then
    at most one every 30 s and a fifth of the loop apart: at most four, the last left to the stage's own line."""
    from vitq.tasks import _progress

    log = logging.getLogger("vitq.test.progress")
    for seconds_each, most in ((0.2, 0), (10.0, 4)):  # a 20 s loop, a 1000 s one
        clock = iter(range(10_000))
        monkeypatch.setattr(_progress, "time", SimpleNamespace(perf_counter=lambda: next(clock) * seconds_each))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vitq.test.progress"):
            p = _progress.Progress(log, "work: item", 100, every_s=0.0)
            for _ in range(100):
                p.step()
        assert len(caplog.records) == 100
        shown = [r.getMessage().split(" (")[0] for r in caplog.records if getattr(r, "console", False)]
        assert len(shown) == most and "work: item: 100/100" not in shown, shown


def test_entropy_search_with_progress_equals_onnxruntime_collector():
    import torch
    from onnxruntime.quantization.calibrate import HistogramCollector

    from vitq.tasks._histograms import CalibrationHistograms
    from vitq.tasks.calibrate import _entropy_ranges

    rng = np.random.default_rng(0)
    batch = {f"t{i}": rng.standard_normal((8, 64)).astype(np.float32) * (i + 1) for i in range(20)}
    batch["t3"][0, 0] = 40.0  # an outlier the KL threshold clips

    c = HistogramCollector("entropy", True, 512, 128, 99.99, "same")
    c.collect(batch)
    whole = {t: r[:2] for t, r in c.compute_collection_result().items()}
    h = CalibrationHistograms(512, 128)
    for t, v in batch.items():
        h.collect(t, torch.from_numpy(v))
    searched = _entropy_ranges(h, sorted(batch))
    assert whole.keys() == searched.keys()
    for t in whole:
        np.testing.assert_allclose(np.asarray(searched[t], np.float64), np.asarray(whole[t], np.float64))
