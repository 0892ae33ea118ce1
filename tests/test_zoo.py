"""`vitq zoo`: the model list covers the families the issue names, options fail in one line, a cell runs in its own
process with a timeout, and the CI slice runs end to end (JSON, markdown, MLflow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitq.errors import VitqError
from vitq.experiments import zoo

FAMILIES = ("ViT", "DeiT", "DeiT-III", "BEiT", "EVA-02", "DINOv2", "DINOv2 (registers)", "Swin", "SwinV2", "MaxViT",
            "Hiera", "Twins", "PVTv2", "CaiT", "XCiT", "PiT", "CoaT", "ConViT", "CrossViT", "TinyViT", "FastViT",
            "EfficientFormer", "EfficientFormerV2", "EfficientViT (MIT)", "EfficientViT (MSRA)", "MobileViT",
            "MobileViTV2", "LeViT", "GCViT", "NextViT", "SAM ViT-B image encoder")


def test_the_list_covers_every_family_and_builds():
    import timm

    names = [m.name for m in zoo.MODELS]
    assert len(names) >= 40 and len(set(names)) == len(names)
    assert set(FAMILIES) <= {m.family for m in zoo.MODELS}
    assert {"torchvision:vit_b_16", "torchvision:swin_t", "torchvision:maxvit_t", "vit_large_patch16_224",
            "samvit_base_patch16"} <= set(names)
    for n in names:  # every name resolves here (no download), so a sweep never fails on a typo
        assert n.startswith("torchvision:") or timm.is_model(n), n
    assert [m.name for m in zoo.MODELS if m.dense] == ["samvit_base_patch16"]
    assert set(zoo.CI_SLICE) <= set(names) and len(zoo.CI_SLICE) == 3


def test_options_are_checked_before_any_work():
    with pytest.raises(VitqError, match="unknown model 'no_such_vit'"):
        zoo.select_models("vit_tiny_patch16_224,no_such_vit", None)
    with pytest.raises(VitqError, match="--slice 'all' is not known; allowed: ci"):
        zoo.select_models(None, "all")
    with pytest.raises(VitqError, match="not both"):
        zoo.select_models("vit_tiny_patch16_224", "ci")
    with pytest.raises(VitqError, match="unknown --targets tensorflow; allowed: onnx, tensorrt, coreml, modelopt, nncf"):
        zoo.select_cells("coreml,tensorflow")
    assert zoo.select_cells("nncf,coreml") == ["onnx", "coreml", "nncf"]  # onnx first: the others read its export
    assert zoo.select_cells("coreml") == ["coreml"]  # converted from torch: needs no export


def test_two_sweeps_of_other_targets_merge_into_one_file(tmp_path):
    out = tmp_path / "zoo.json"
    m = zoo.model_spec("vit_tiny_patch16_224")
    zoo._update(out, {"cpu": "x"}, {"timeout_s": 1}, fresh=True)
    zoo._update(out, {"cpu": "x"}, {}, model=m, cells={"coreml": {"status": "ok", "sqnr_db": 20.0}})
    row = zoo._update(out, {"cpu": "x"}, {}, model=m, cells={"onnx": {"status": "failed", "stage": "export",
                                                                    "cause": "x"}})
    assert list(row["cells"]) == ["onnx", "coreml"]  # both kept, in the table's order
    assert json.loads(out.read_text())["summary"]["target_cells"] == 2


def test_a_bad_option_on_the_command_line_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vitq.cli", "zoo", "--targets", "tflite", "--workdir", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "tflite" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "reports").exists()


def test_a_cell_past_its_timeout_is_killed_and_named(tmp_path):
    rec = zoo.run_cell("vit_tiny_patch16_224", "onnx", tmp_path, timeout_s=2)
    assert rec["status"] == "failed" and "timed out after 2 s" in rec["cause"]
    assert rec["stage"] in ("start", "model", "data")
    assert rec["seconds"] < 30 and rec["peak_rss_mb"] > 0


def test_a_cell_that_dies_is_recorded_with_its_signal(tmp_path, monkeypatch):
    # A cell killed from outside (the OOM killer's SIGKILL) leaves no result file: the record says so.
    monkeypatch.setattr(zoo.sys, "executable", str(_killer(tmp_path)))
    rec = zoo.run_cell("vit_tiny_patch16_224", "onnx", tmp_path, timeout_s=60)
    assert rec == {**rec, "status": "failed", "stage": "export",
                   "cause": "killed by signal 9 (the OOM killer, or kill -9)"}


def _killer(tmp_path: Path) -> Path:
    script = tmp_path / "python-killed"
    script.write_text(f"#!/bin/sh\necho export > {tmp_path}/onnx.stage.txt\nkill -9 $$\n")
    script.chmod(0o755)
    return script


def test_markdown_names_the_machine_every_model_and_every_failure():
    result = {
        "machine": {"cpu": "Test CPU", "cores": 2, "system": "Linux", "onnxruntime": "1.0"},
        "settings": zoo._settings(60),
        "models": {
            "a": {"family": "ViT", "dense": False, "cells": {
                "onnx": {"status": "ok", "params_m": 5.7, "exporter": "torchscript", "export_s": 1.0, "fp32_mb": 22.0,
                         "static": {"sqnr_db": 30.0, "int8_mac_fraction": 1.0, "attention_int8": 24,
                                    "attention_matmuls": 24, "quantize_s": 3.0, "size_mb": 6.0,
                                    "placement": {"dq_inputs": {"MatMul": 144}, "attention_quantized": "all"}},
                         "latency": {"fp32_ms": 50.0, "dynamic_ms": 30.0, "static_ms": 20.0, "fp32_over_static": 2.5,
                                     "dynamic_over_static": 1.5}, "seconds": 60, "peak_rss_mb": 1500},
                "modelopt": {"status": "ok", "sqnr_db": 28.0, "quantize_s": 5.0, "seconds": 20, "peak_rss_mb": 900,
                             "placement": {"dq_inputs": {"MatMul": 96, "Add": 24}, "attention_quantized": "none"}},
                "coreml": {"status": "failed", "stage": "quantize", "cause": "VitqError: rank 6", "seconds": 5,
                           "peak_rss_mb": 800}}},
        },
    }
    result["summary"] = zoo.summarize(result)
    assert result["summary"]["target_cells"] == 2 and result["summary"]["target_cells_ok"] == 1
    assert result["summary"]["sqnr_at_or_above_modelopt"] == "1/1"
    assert result["summary"]["quantize_time_at_most_modelopt"] == "1/1"
    md = zoo.markdown(result)
    assert "Test CPU, 2 cores" in md
    assert "| `a` | ViT | 5.7 | torchscript | 30.0 dB | 100% | 24/24 |" in md
    assert "- `a` coreml, quantize: VitqError: rank 6" in md
    assert "ModelOpt: MatMul 96, Add 24 (attention none)" in md


@pytest.mark.slow
def test_the_ci_slice_end_to_end(tmp_path):
    """The CI slice through every cell (`make test` builds ModelOpt's venv first; Core ML on LeViT, merged by a
    second sweep): every model passes every target form and both peers, the JSON, the table and one MLflow run per
    model."""
    env = dict(os.environ, MLFLOW_TRACKING_URI="")
    env.pop("MLFLOW_TRACKING_URI")
    zoo_cmd = [sys.executable, "-m", "vitq.cli", "zoo", "--workdir", str(tmp_path), "--markdown", "zoo.md",
               "--timeout", "600", "--latency-seconds", "2"]
    # Core ML on LeViT only (its tiny activations were the Core ML defect; CI's time is short), merged by --resume
    for args in (["--slice", "ci", "--targets", "onnx,tensorrt,modelopt,nncf"],
                 ["--models", "levit_128s", "--targets", "coreml", "--resume"]):
        proc = subprocess.run([*zoo_cmd, *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "reports" / "zoo.json").read_text())
    assert list(result["models"]) == list(zoo.CI_SLICE)
    for name, row in result["models"].items():
        want = [c for c in zoo.CELLS if c != "coreml" or name == "levit_128s"]
        assert sorted(row["cells"]) == sorted(want), name
        for cell, rec in row["cells"].items():  # every target form and both peers pass on these three
            assert rec["status"] == "ok" and rec["seconds"] > 0 and rec["peak_rss_mb"] > 100, (name, cell, rec)
        onnx = row["cells"]["onnx"]
        assert onnx["latency"]["fp32_ms"] > 0 and onnx["static"]["int8_mac_fraction"] > 0.9
        assert onnx["static"]["attention_int8"] == onnx["static"]["attention_matmuls"] > 0
        # the fixed defects: a constant softmax calibrated (EfficientViT-M), tiny activations in Core ML (LeViT)
        assert onnx["static"]["sqnr_db"] > 25 and row["cells"].get("coreml", {"sqnr_db": 99})["sqnr_db"] > 20, \
            (name, onnx, row["cells"])
        assert row["cells"]["tensorrt"]["tensorrt_ready"], row["cells"]["tensorrt"]
    md = (tmp_path / "zoo.md").read_text()
    assert all(f"`{n}`" in md for n in zoo.CI_SLICE)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(zoo.EXPERIMENT).experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(zoo.CI_SLICE)
    assert all("onnx.static.sqnr_db" in r.data.metrics and r.data.tags["onnx.status"] == "ok" for r in runs)


def test_sigterm_of_the_sweep_ends_its_cell_too(tmp_path):
    """`vitq zoo` stopped (SIGTERM, as Ctrl-C) while a cell runs: one line naming the model and cell, exit 143, and
    no process of the cell left (it runs in its own process group, which the sweep kills)."""
    import signal
    import time

    keep = tmp_path / "models"
    proc = subprocess.Popen([sys.executable, "-m", "vitq.cli", "zoo", "--models", "vit_tiny_patch16_224", "--targets",
                             "onnx", "--no-mlflow", "--keep", str(keep), "--workdir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stage = keep / "vit_tiny_patch16_224" / "onnx.stage.txt"
    deadline = time.time() + 120
    while not stage.is_file() and time.time() < deadline:  # the cell has started and named its stage
        time.sleep(0.2)
    assert stage.is_file(), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (out, err)
    assert "interrupted" in err and "zoo vit_tiny_patch16_224 onnx" in err, err
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", f"zoo_cell vit_tiny_patch16_224 onnx {keep}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"cell processes left: {left.stdout}"
