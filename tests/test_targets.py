import subprocess
import sys

from vitq.tasks import stages
from vitq.tasks.targets import registry as targets
from vitq.tasks.targets.base import Target
from vitq.tasks.targets.onnx.target import OnnxTarget
from vitq.params import parse_params


def test_variant_whose_runtime_is_absent_is_not_run_with_its_reason(monkeypatch):
    monkeypatch.setitem(targets.TARGETS, "onnx", Target("onnx", "cuda", ("no_such_runtime_module",)))
    p = parse_params({})
    runnable, not_run = stages.plan_variants(p)
    onnx_recipes = {r for r in p.quantize.recipes if r.startswith("onnx-")}
    assert onnx_recipes <= set(not_run) and not onnx_recipes & set(runnable)
    assert "needs the Python module 'no_such_runtime_module'" in not_run["onnx-w8-dynamic"]


def test_platform_bound_target_names_the_worker_it_needs(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert targets.TARGETS["coreml"].missing_runtime() is None  # conversion works on Linux
    reason = targets.TARGETS["coreml"].missing_executor()
    assert reason and "macos worker" in reason and "linux" in reason
    monkeypatch.setattr(sys, "platform", "darwin")
    assert targets.TARGETS["coreml"].missing_executor() is None


def test_variant_tasks_carry_their_worker_tag():
    assert targets.worker_tags("onnx-w8a8-minmax") == ["worker:cpu", "target:onnx"]


def test_stage_code_imports_without_prefect_or_mlflow():
    code = (
        "import sys, vitq.tasks.stages, vitq.cli; "
        "bad = [m for m in ('prefect', 'mlflow', 'coremltools', 'tensorrt') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_failed_validation_leaves_the_previous_results_whole(staged_workspace, tmp_path_factory, monkeypatch):
    """validate_one writes through a temporary folder: a validation that fails half-way leaves the last
    complete results as they were, and nothing half-written beside them."""
    import json

    import pytest
    from conftest import tiny_params, workspace_copy

    ws = workspace_copy(staged_workspace, tmp_path_factory, "atomic-validate")
    p = parse_params(tiny_params())
    stages.run_reference(ws, p)
    stages.quantize_one(ws, "onnx-w8-dynamic")
    stages.validate_one(ws, p, "onnx-w8-dynamic")
    folder = ws.validation_for("onnx-w8-dynamic")
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    assert json.loads(before["onnx-w8-dynamic.json"])["name"] == "onnx-w8-dynamic"

    def half_written(self, ws, p, name, out_dir=None):
        (out_dir / f"{name}.json").write_text("{")  # cut short
        raise RuntimeError("validation died")

    monkeypatch.setattr(OnnxTarget, "validate", half_written)
    with pytest.raises(RuntimeError, match="validation died"):
        stages.validate_one(ws, p, "onnx-w8-dynamic")
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    assert [f.name for f in folder.parent.iterdir() if f.name.startswith(".")] == []


def test_api_and_experiments_name_no_target():
    """What differs per target lives on the Target (tasks/targets/registry.py): the Python API and the experiment
    commands built on it dispatch on no target name or file suffix."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # (recovery_accuracy.py runs the recovery recipes through the stages' target methods)
    files = [root / f for f in ("vitq/api.py", "tasks/stages.py", "vitq/experiments/latency.py",
                                "vitq/experiments/coreml_coverage.py", "vitq/experiments/_models.py")]
    pattern = re.compile(r"""target\s*[!=]=|\.engine\b|\btarget\s+(not\s+)?in\s+\(|["'](onnx|coreml|tensorrt)["']\s*[:,)]""")
    hits = [f"{f.relative_to(root)}:{i}: {line.strip()}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
