"""A target registered from outside the package runs through the stages without editing any other file."""

import json
import shutil
from dataclasses import asdict, dataclass

import pytest
from conftest import tiny_params, workspace_copy

from tasks import stages, targets
from tasks._io import atomic_dir, size_mb, write_json
from tasks.quantize import VariantArtifact, variant_dir
from tasks.targets import Target, get_target, register_target
from vitq import recipes
from vitq.config import parse_params
from vitq.errors import ConfigError
from vitq.recipes import Recipe, get_recipe


@dataclass(frozen=True)
class IdentityTarget(Target):
    """Toy target: its "variant" is the FP32 ONNX itself; validation and timing are inherited (ONNX Runtime)."""

    def quantize(self, ws, name, p=None):
        with atomic_dir(variant_dir(ws.variants_dir, name)) as tmp:
            shutil.copyfile(ws.export_dir / "model.onnx", tmp / "model.onnx")
            art = VariantArtifact(
                name=name, recipe=asdict(get_recipe(name)), artifact="model.onnx", qdq_artifact="model.onnx",
                size_mb=size_mb(tmp / "model.onnx"), int8_weight_fraction=0.0, op_counts={},
                calibration_table=None, tensorrt_ready=False, tensorrt_note="identity target: no Q/DQ",
            )
            write_json(tmp / "variant.json", asdict(art))
        return art


@pytest.fixture
def identity(monkeypatch):
    monkeypatch.setattr(targets, "TARGETS", dict(targets.TARGETS))  # registration undone after the test
    register_target(IdentityTarget("identity", "cpu", ("onnxruntime",)))
    recipe = Recipe(name="identity-fp32", target="identity", scheme="float", calibration=None, per_channel=False,
                    description="the FP32 ONNX, unchanged")
    monkeypatch.setitem(recipes.RECIPES, recipe.name, recipe)
    return recipe


def test_lookup_miss_lists_the_registered_targets():
    with pytest.raises(ConfigError, match="unknown target 'nope'; allowed: coreml, onnx, tensorrt"):
        get_target("nope")


def test_registered_target_runs_through_the_stages(identity, staged_workspace, tmp_path_factory):
    ws = workspace_copy(staged_workspace, tmp_path_factory, "identity")
    p = parse_params(tiny_params(quantize={"recipes": ["onnx-w8-dynamic", identity.name]}))
    for stage in ("quantize", "validate", "benchmark", "report"):
        stages.STAGES[stage](ws, p)
    summary = json.loads(ws.summary_file.read_text())
    variant = next(v for v in summary["variants"] if v["name"] == identity.name)
    assert variant["target"] == "identity" and variant["artifact"].endswith("identity-fp32/model.onnx")
    assert variant["agreement"] == 1.0 and variant["top1_drop"] == 0.0, variant  # the FP32 model itself
    assert variant["latency_ms_p50"] is not None, variant  # timed beside FP32 in ONNX Runtime
    assert {v["name"] for v in summary["variants"]} == {"onnx-w8-dynamic", identity.name}
