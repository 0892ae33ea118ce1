"""A target registered from outside the package runs through the stages, and through `vitq run` as a
plugin (VITQ_PLUGINS), without editing any other file."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_workspace, run_env, tiny_params, vitq, workspace_copy

from vitq.tasks import stages
from vitq.tasks.targets import registry as targets
from vitq.tasks.targets.registry import get_target
from vitq import recipes
from vitq.params import parse_params
from vitq.errors import ConfigError

PLUGINS = Path(__file__).parent / "plugins"  # tests/plugins/vitq_identity.py: the toy target


@pytest.fixture
def identity(monkeypatch):
    """The toy target registered in this process; registry restored after the test."""
    monkeypatch.setattr(targets, "TARGETS", dict(targets.TARGETS))
    before = dict(recipes.RECIPES)
    monkeypatch.syspath_prepend(str(PLUGINS))
    module = importlib.reload(sys.modules["vitq_identity"]) if "vitq_identity" in sys.modules else \
        importlib.import_module("vitq_identity")
    yield module.RECIPE
    recipes.RECIPES.clear()
    recipes.RECIPES.update(before)


def test_lookup_miss_lists_the_registered_targets():
    with pytest.raises(ConfigError, match="unknown target 'nope'; allowed: coreml, onnx, tensorrt"):
        get_target("nope")


def test_registered_target_runs_through_the_stages(identity, staged_workspace, tmp_path_factory):
    ws = workspace_copy(staged_workspace, tmp_path_factory, "identity")
    p = parse_params(tiny_params(quantize={"recipes": ["onnx-w8-dynamic", identity.name], "carry": {}}))
    stages.run_all_variants(ws, p)  # the one variant runner, as the flows and the stages use it
    for stage in ("benchmark", "report"):
        stages.STAGES[stage](ws, p)
    summary = json.loads(ws.summary_file.read_text())
    variant = next(v for v in summary["variants"] if v["name"] == identity.name)
    assert variant["target"] == "identity" and variant["artifact"].endswith("identity-fp32/model.onnx")
    assert variant["agreement"] == 1.0 and variant["top1_drop"] == 0.0, variant  # the FP32 model itself
    assert variant["latency_ms_p50"] is not None, variant  # timed beside FP32 in ONNX Runtime
    assert {v["name"] for v in summary["variants"]} == {"onnx-w8-dynamic", identity.name}


@pytest.mark.slow
def test_plugin_target_runs_through_vitq_run_and_dvc(tmp_path):
    """`vitq run` (and `dvc repro` after it) with the toy target loaded as a plugin, in every process
    the pipeline starts (the flow, the benchmark subprocess, DVC's `vitq stage` commands)."""
    ws = make_workspace(tmp_path / "ws", tiny_params(quantize={"recipes": ["onnx-w8a8-minmax", "identity-fp32"],
                                                               "carry": {}}))
    env = {"VITQ_PLUGINS": "vitq_identity", "PYTHONPATH": str(PLUGINS)}
    without = vitq(["run"], ws)
    assert without.returncode == 2 and "unknown recipe 'identity-fp32'" in without.stderr, without.stderr[-500:]
    proc = subprocess.run([str(Path(sys.executable).with_name("vitq")), "run"], cwd=ws, env={**run_env(ws), **env},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((ws / "reports" / "summary.json").read_text())
    variant = next(v for v in summary["variants"] if v["name"] == "identity-fp32")
    assert variant["target"] == "identity" and variant["agreement"] == 1.0 and variant["top1_drop"] == 0.0, variant
    assert variant["latency_ms_p50"] is not None, variant  # timed in the benchmark subprocess: plugin loaded there too
    lock = (ws / "dvc.lock").read_text()
    assert "quantize@identity-fp32" in lock and "validate@identity-fp32" in lock
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=ws, env={**run_env(ws), **env},
                            capture_output=True, text=True, timeout=300)
    assert "up to date" in status.stdout, status.stdout + status.stderr
