"""Long loops show progress with an ETA (tasks/_progress.py), and calibration's entropy search, done tensor by
tensor for its progress, gives the ranges ONNX Runtime's collector gives."""

from __future__ import annotations

import logging

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
