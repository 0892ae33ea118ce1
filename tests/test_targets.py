import subprocess
import sys

from tasks import stages, targets
from tasks.targets import Target
from vitq.config import parse_params


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
        "import sys, tasks.stages, vitq.cli; "
        "bad = [m for m in ('prefect', 'mlflow', 'coremltools', 'tensorrt') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
