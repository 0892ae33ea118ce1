"""`vitq scale` (issue 30 item 5): its options are checked before any work, and what it reads from a run's console
(each stage's seconds and peak RSS) and writes (the table, with the machine). A full run is the command itself
(minutes per model: docs/scale.md), not a test."""

from __future__ import annotations

import subprocess
import sys

from vitq.experiments import scale


def test_bad_options_are_one_line_exit_2(tmp_path):
    for args, said in ((["--models", "vit_base_patch16_224"], "'timm:<name>' or 'torchvision:<name>'"),
                       (["--runs", "0"], "--runs 0 (>= 1)")):
        proc = subprocess.run([sys.executable, "-m", "vitq.cli", "scale", "--workdir", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
    assert not (tmp_path / "reports" / "scale.json").exists()


def test_stage_lines_are_read_and_tabled():
    lines = ["data: done in 2.1 s, peak RSS 1,234 MB", "onnx-w8a8-auto: quantize + validate done in 48.0 s",
             "benchmark: done in 10.5 s", "up to date (dvc.lock), skipped: model"]
    found = {m["stage"]: (float(m["s"]), m["mb"]) for m in map(scale.STAGE_LINE.match, lines) if m}
    assert found == {"data": (2.1, "1,234"), "onnx-w8a8-auto": (48.0, None), "benchmark": (10.5, None)}
    result = {"machine": {"cpu": "AMD EPYC", "cores": 2, "system": "Linux"}, "runs": [
        {"model": "timm:vit_base_patch16_224", "task": "classification", "input": 224, "run": 1, "status": "ok",
         "run_s": 600.0, "peak_rss_mb": 5100,
         "stages": {"calibrate": {"seconds": 40.0, "peak_rss_mb": 2900.0}, "report": {"seconds": 1.0, "peak_rss_mb": None}}}]}
    md = scale.markdown(result)
    assert "AMD EPYC, 2 cores" in md and "| `timm:vit_base_patch16_224` | classification | 224 | 1 | ok | 600.0 | 5,100 |" in md
    assert "calibrate 40 (2,900)" in md


def test_a_run_that_failed_in_init_is_a_row_too():
    result = {"machine": {"cpu": "x", "cores": 2, "system": "Linux"}, "runs": [
        {"model": "timm:samvit_base_patch16", "task": "dense", "input": 1024, "run": 1, "status": "failed",
         "stage": "init", "cause": "bad"}]}
    assert "| `timm:samvit_base_patch16` | dense | 1024 | 1 | failed | – | – |" in scale.markdown(result)
