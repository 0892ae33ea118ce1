"""The Python API (vitq/api.py): the guide's example as written, INT8 for real, FP32 comparisons, errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import vitq
from vitq import api
from vitq.errors import ConfigError, DataError, ModelError, VitqError

REPO = Path(__file__).resolve().parents[1]
ON_MACOS = sys.platform == "darwin"


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.models.VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=1, num_heads=2)


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def model():
    return _tiny_vit()


@pytest.fixture(scope="module")
def static(model, tmp_path_factory):
    return vitq.quantize(model, "onnx-w8a8-minmax", calibration=_inputs(48, 0), workdir=tmp_path_factory.mktemp("api"))


GUIDE = REPO / "docs" / "guide.md"


def guide_example() -> str:
    """The first python block of the 'Python API' section of docs/guide.md."""
    text = GUIDE.read_text()
    assert "\n## Python API\n" in text, "docs/guide.md has no '## Python API' section"
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/guide.md's Python API section has no python block"
    return match.group(1)


def test_guide_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "guide_example"}
    exec(compile(guide_example(), "docs/guide.md (Python API)", "exec"), namespace)
    variant, result, timing = namespace["variant"], namespace["result"], namespace["timing"]
    assert sorted(p.name for p in (tmp_path / "vit-int8").iterdir()) == ["model.onnx", "model.ort.onnx", "variant.json"]
    assert variant.artifact.int8_weight_fraction == 1.0
    assert result.passed and result.metrics.sqnr_db > 20, result.metrics
    assert timing.speedup(variant.name) is not None


def test_static_variant_is_int8_qdq_and_smaller_than_fp32(static):
    qdq = onnx.load(str(static.path / "model.onnx"))
    ops = [n.op_type for n in qdq.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0, static.artifact.op_counts
    int8 = [i for i in qdq.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert int8, "no int8 weight initializer in the Q/DQ graph"
    assert static.artifact.int8_weight_fraction == 1.0 and static.artifact.tensorrt_ready
    fp32_mb = static.fp32_onnx.stat().st_size / 2**20
    assert static.artifact.size_mb < 0.5 * fp32_mb, (static.artifact.size_mb, fp32_mb)
    assert static.served == static.path / "model.ort.onnx" and static.served.is_file()
    # calibrated from this recipe's table only, written where the workdir says
    assert static.artifact.calibration_table == "minmax.json"
    assert (static.path.parent / "onnx-w8a8-minmax.fp32" / "calibration" / "minmax.json").is_file()
    assert static.fp32_onnx == static.path.parent / "onnx-w8a8-minmax.fp32" / "export" / "model.onnx"


def test_validate_compares_with_fp32_on_the_same_inputs(static):
    x = _inputs(96, 1)
    result = static.validate(x)
    m = result.metrics
    assert result.images == 96 and result.runtime == "onnxruntime" and m.top1 is None
    assert m.agreement >= 0.9 and m.cosine > 0.99, m
    assert m.sqnr_db > 20, f"SQNR vs FP32 {m.sqnr_db:.1f} dB"
    # With the FP32 model's own predictions as labels, FP32 top-1 is 1 and the drop is the disagreement.
    from vitq.tasks.targets.onnx import backend as onnx_backend

    fp32_labels = onnx_backend.run_batched(onnx_backend.session(static.fp32_onnx), x, 64).argmax(1)
    labelled = static.validate(torch.from_numpy(x), labels=fp32_labels)
    assert labelled.metrics.top1 == pytest.approx(m.agreement)
    assert labelled.metrics.top1_drop == pytest.approx(100 * (1 - m.agreement), abs=1e-6)
    # The variant's own outputs are what it was judged on.
    out = static.predict(x)
    assert out.shape == (96, 10) and np.mean(out.argmax(1) == fp32_labels) == pytest.approx(m.agreement)


def test_variants_sharing_a_workdir_keep_their_own_fp32_reference(static):
    fp32 = static.fp32_onnx.read_bytes()
    torch.manual_seed(1)
    other = _tiny_vit()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(3.0)  # another model, whose outputs differ from the first one's
    v = vitq.quantize(other, "onnx-w8-dynamic", calibration=_inputs(8, 7), workdir=static.path.parent)
    assert v.path.parent == static.path.parent and v.fp32_onnx != static.fp32_onnx
    assert static.fp32_onnx.read_bytes() == fp32
    assert static.validate(_inputs(32, 8)).metrics.sqnr_db > 20


def test_validate_budget_decides_passed(static):
    from vitq.config import ValidateConfig

    result = static.validate(_inputs(32, 2), budget=ValidateConfig(max_top1_drop=0.0, min_sqnr_db=200.0))
    assert not result.passed and any("SQNR" in r for r in result.reasons), result.reasons


def test_benchmark_times_fp32_and_the_variant_in_one_run(static):
    b = static.benchmark(batch_size=2, repeats=6, warmup=1, rounds=2)
    assert set(b.models) == {"fp32", static.name}, b.models
    assert b.models[static.name].baseline == "fp32" and b.models[static.name].runs == 6
    assert b.settings["input_shape"] == [2, 3, 32, 32] and b.machine["cores"]
    # paired per interleaved round (ONNX Runtime timings have rounds), not the ratio of whole-run p50s
    from vitq.tasks.benchmark import paired_ratio

    assert len(b.models[static.name].round_p50_ms) == 2
    assert b.speedup(static.name) == pytest.approx(
        paired_ratio(b.models["fp32"].round_p50_ms, b.models[static.name].round_p50_ms))
    with pytest.raises(ConfigError, match="repeats"):
        static.benchmark(repeats=0)


def test_benchmark_times_other_variants_of_the_same_model_alongside(static, model, tmp_path):
    dynamic = vitq.quantize(model, "onnx-w8-dynamic", calibration=_inputs(8, 0), workdir=tmp_path)
    b = static.benchmark(batch_size=1, repeats=4, warmup=1, rounds=2, alongside=[dynamic])
    assert list(b.models) == ["fp32", static.name, dynamic.name], b.models
    assert all(t.baseline == "fp32" and t.runs == 4 for t in b.models.values())
    assert b.models[dynamic.name].size_mb == pytest.approx(dynamic.served.stat().st_size / 2**20)
    with pytest.raises(VitqError, match="onnx-w8-dynamic is not another variant of onnx-w8a8-minmax's model") as e:
        static.benchmark(repeats=2, alongside=[_other_model_variant(tmp_path)])
    assert "\n" not in str(e.value)
    with pytest.raises(VitqError, match="alongside takes Variants"):
        static.benchmark(repeats=2, alongside=["onnx-w8-dynamic"])


def _other_model_variant(tmp_path):
    torch.manual_seed(1)
    other = _tiny_vit()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(3.0)
    return vitq.quantize(other, "onnx-w8-dynamic", calibration=_inputs(8, 7), workdir=tmp_path / "other-model")


def test_save_copies_the_variant_folder_and_refuses_a_full_one(static, tmp_path):
    out = static.save(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.ort.onnx", "variant.json"]
    assert (out / "variant.json").read_text() == (static.path / "variant.json").read_text()
    with pytest.raises(VitqError, match="not an empty folder"):
        static.save(out)


def test_dynamic_recipe_from_batches_of_a_dataloader(model, tmp_path):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(_inputs(20, 3)), torch.zeros(20)), batch_size=8)
    v = vitq.quantize(model, "onnx-w8-dynamic", calibration=loader, workdir=tmp_path)
    ops = v.artifact.op_counts
    assert ops.get("DynamicQuantizeLinear") and (ops.get("MatMulInteger") or ops.get("ConvInteger")), ops
    assert v.artifact.int8_weight_fraction > 0.9 and v.artifact.calibration_table is None
    assert not (tmp_path / "onnx-w8-dynamic.fp32" / "calibration").exists()  # dynamic: no table
    assert v.validate(_inputs(16, 4)).metrics.agreement >= 0.8


def test_unknown_and_unsupported_recipes_are_one_line_errors(model):
    x = _inputs(4, 0)
    with pytest.raises(ConfigError, match=r"unknown recipe 'onnx-w8a8-typo'; allowed: .*onnx-w8a8-minmax") as e:
        vitq.quantize(model, "onnx-w8a8-typo", calibration=x)
    assert "\n" not in str(e.value)
    for name in ("onnx-w8a8-auto", "onnx-w8a8-qat", "coreml-w8a8-smoothquant", "tensorrt-w8a8-percentile"):
        with pytest.raises(ConfigError, match=f"{name}.*vitq run.*supports: .*onnx-w8a8-percentile") as e:
            vitq.quantize(model, name, calibration=x)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="recipe name"):
        vitq.quantize(model, None, calibration=x)
    assert api.supported_recipes() == sorted(
        ["onnx-w8-dynamic", "onnx-w8a8-minmax", "onnx-w8a8-percentile", "onnx-w8a8-entropy", "coreml-fp16", "coreml-w8",
         "coreml-w8a8"]
    )


@pytest.mark.parametrize(
    "calibration, error, message",
    [
        (np.zeros((4, 32, 32), np.float32), DataError, r"\(N, C, H, W\), got shape \(4, 32, 32\)"),
        ([], DataError, "empty"),
        (np.full((2, 3, 32, 32), np.nan, np.float32), DataError, "NaN"),
        (np.zeros((2, 3, 32, 32), np.uint8), DataError, "float images"),
        ("images/", DataError, "got str"),
        (np.zeros((2, 1, 32, 32), np.float32), ModelError, r"cannot run on calibration inputs of shape \(2, 1, 32, 32\)"),
    ],
)
def test_bad_calibration_is_a_one_line_error(model, calibration, error, message, tmp_path):
    with pytest.raises(error, match=message) as e:
        vitq.quantize(model, "onnx-w8a8-minmax", calibration=calibration, workdir=tmp_path)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir()), "nothing is written for bad input"


def test_bad_labels_and_example_input_are_one_line_errors(static, model):
    with pytest.raises(DataError, match="3 entries for 4 inputs"):
        static.validate(_inputs(4, 0), labels=np.zeros(3))
    with pytest.raises(DataError, match="example_input has shape"):
        vitq.quantize(model, "onnx-w8-dynamic", calibration=_inputs(4, 0), example_input=np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ModelError, match="torch.nn.Module"):
        vitq.quantize(lambda x: x, "onnx-w8-dynamic", calibration=_inputs(4, 0))


@pytest.fixture(scope="module")
def coreml_variant(tmp_path_factory):
    pytest.importorskip("coremltools")
    model = _tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    v = vitq.quantize(model, "coreml-w8a8", calibration=_inputs(16, 0), workdir=tmp_path_factory.mktemp("coreml"))
    return v, model, before


def test_coreml_recipe_converts_to_an_int8_ml_program(coreml_variant):
    v, model, before = coreml_variant
    # converted from the torch model: its FP32 ONNX export is made when first compared with, not before
    assert not (v.path.parent / "coreml-w8a8.fp32" / "export").exists()
    assert v.served == v.path / "model.mlpackage" and v.served.is_dir()
    assert (v.path / "model.pt2").is_file() and (v.path / "coverage.csv").is_file()
    assert v.artifact.int8_weight_fraction == 1.0 and v.artifact.int8_mac_fraction == 1.0, v.artifact
    # the caller's model is untouched: same weights, attention not rewritten, still fused
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    assert model.blocks[0].attn.fused_attn == v._model.blocks[0].attn.fused_attn


@pytest.mark.skipif(ON_MACOS, reason="off macOS only: macOS runs the ML program itself")
def test_coreml_off_macos_says_why_in_one_line(coreml_variant):
    v, _, _ = coreml_variant
    with pytest.raises(VitqError, match="cannot predict with coreml-w8a8 here: .*macos") as e:
        v.predict(_inputs(2, 0))
    assert "\n" not in str(e.value)
    result = v.validate(_inputs(32, 5))
    assert v.fp32_onnx == v.path.parent / "coreml-w8a8.fp32" / "export" / "model.onnx" and v.fp32_onnx.is_file()
    assert result.runtime == "torch counterpart (model.pt2)" and "macos" in result.not_measured["coreml_predict"]
    assert result.metrics.agreement >= 0.9 and result.metrics.sqnr_db > 20, result.metrics
    b = v.benchmark()
    assert b.models == {} and "macos" in b.not_measured["coreml-w8a8"]


def test_coreml_on_macos_predicts_and_times_against_fp16(coreml_variant, monkeypatch):
    """macOS stood in for (Core ML itself cannot run here): predict and validate read Core ML's outputs,
    benchmark times the variant against a coreml-fp16 baseline converted from the same model."""
    from vitq.tasks.targets.coreml import variants as coreml

    v, _, _ = coreml_variant
    x = _inputs(8, 6)
    from vitq.tasks.targets.onnx import backend as onnx_backend

    ref = onnx_backend.run_batched(onnx_backend.session(v.fp32_onnx), x, 64)
    calls = []
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(coreml, "predict_coreml", lambda package, x, units: calls.append(package) or ref.copy())
    timed = {}
    monkeypatch.setattr(coreml, "benchmark_packages", lambda packages, x1, cfg, why: (timed.update(packages), ({}, {}))[1])
    assert np.array_equal(v.predict(x), ref) and calls == [v.served]
    result = v.validate(x)
    assert result.runtime == "coreml (ALL)" and result.not_measured == {} and result.metrics.agreement == 1.0
    v.benchmark()
    assert list(timed) == ["coreml-fp16", "coreml-w8a8"] and timed["coreml-fp16"].name == "model.mlpackage"
    assert timed["coreml-fp16"].is_dir()


def test_import_vitq_stays_lean_and_exposes_the_api():
    code = (
        "import sys, vitq; assert 'torch' not in sys.modules, 'import vitq pulled in torch'; "
        "from vitq import quantize, Variant; assert callable(quantize) and Variant.__name__ == 'Variant'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'quantise'"):
        vitq.quantise  # noqa: B018
