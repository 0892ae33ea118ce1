"""Models with several outputs (issue 28 item 2): a SAM-like model returning (masks (N, K, H, W), iou_predictions
(N, K)) and a detector-like model returning {"boxes": (N, K, 4), "scores": (N, classes)}. task.outputs names the
judged output(s) and their metric; every other output is still checked against FP32 (SQNR, cosine), recorded per
output in the validation record and summary.json, with an optional floor that fails the variant."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.conftest import make_workspace, tiny_params
from vitq.tasks.stages import PREPARED
from tests.test_dense_pipeline import _scenes

SAM_PY = '''
import torch
from torch import nn


class TinySam(nn.Module):
    """Patch embedding, one transformer block, a mask head per patch pixel and an IoU head: SAM's two outputs."""

    def __init__(self, dim=16, patch=4, masks=2):
        super().__init__()
        self.patch, self.masks = patch, masks
        self.embed = nn.Conv2d(1, dim, patch, patch)
        self.block = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(dim, masks * patch * patch)
        self.iou = nn.Linear(dim, masks)

    def forward(self, x):
        n, _, h, w = x.shape
        t = self.embed(x)  # (N, D, h/p, w/p)
        gh, gw = t.shape[2], t.shape[3]
        t = self.block(t.flatten(2).transpose(1, 2))  # (N, P, D)
        y = self.head(t).reshape(n, gh, gw, self.masks, self.patch, self.patch)
        masks = y.permute(0, 3, 1, 4, 2, 5).reshape(n, self.masks, h, w)  # (N, K, H, W) mask logits
        return masks, self.iou(t[:, 0]).sigmoid()  # (N, K) predicted IoU per mask


def build(dim=16, masks=2):
    torch.manual_seed(0)
    model = TinySam(dim=dim, masks=masks)
    with torch.no_grad():
        model.head.bias.zero_()
    return model


class TinyDetector(nn.Module):
    """A dict of outputs, as detectors return: per-query boxes (N, Q, 4) and class scores (N, classes)."""

    def __init__(self, queries=3, classes=10):
        super().__init__()
        self.queries = queries
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.boxes = nn.Linear(32, queries * 4)
        self.scores = nn.Linear(32, classes)

    def forward(self, x):
        f = self.features(x)
        return {"boxes": self.boxes(f).unflatten(1, (self.queries, 4)).sigmoid(), "scores": self.scores(f)}


def detector(queries=3, classes=10):
    torch.manual_seed(0)
    return TinyDetector(queries, classes)
'''

METRIC_PY = '''
import numpy as np


def box_iou(ref, out, truth):
    """Mean IoU of each query's box (x0, y0, x1, y1 as sorted corners) with FP32's."""
    def corners(b):
        return np.minimum(b[..., :2], b[..., 2:]), np.maximum(b[..., :2], b[..., 2:])
    (a0, a1), (b0, b1) = corners(ref), corners(out)
    inter = np.prod(np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None), -1)
    union = np.prod(a1 - a0, -1) + np.prod(b1 - b0, -1) - inter
    return {"box_iou": float(np.mean(inter / np.maximum(union, 1e-12)))}
'''

SAM_TASK = {"kind": "dense", "masks": "threshold", "mask_threshold": 0.0, "metric": None,
            "outputs": {"output_0": {"judged": True}, "output_1": {"min_sqnr_db": 10.0}}}


def _sam_params(root: Path, task: dict) -> dict:
    raw = tiny_params(
        task=task,
        data={"source": "imagefolder", "path": str(root / "scenes"), "image_size": 16, "channels": 1},
        quantize={"recipes": ["onnx-w8a8-minmax"], "carry": {}, "define": {}},
        validate={"min_mask_iou": 0.5, "max_miou_drop": 50.0, "min_sqnr_db": None, "error_report_images": 4},
        recovery={"min_mask_iou": 0.5},
    )
    for section in ("validate", "recovery"):  # the classification budget keys of the base params do not apply
        raw[section].pop("max_top1_drop", None)
    raw["model"] = {"source": "python", "factory": "models.py:build", "arch": {"dim": 16, "masks": 2},
                    "mean": [0.5], "std": [0.25]}
    return raw


@contextlib.contextmanager
def _inside(root: Path):
    """Run with the workspace as the current directory: the factory and metric paths are relative to it."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(cwd)


def _stages(root: Path, p, names: tuple[str, ...], variants: tuple[str, ...] = ("onnx-w8a8-minmax",)):
    from vitq.tasks import stages
    from vitq.tasks.layout import Workspace

    ws = Workspace(root)
    with _inside(root):
        for name in names:
            stages.STAGES[name](ws, p)
        for name in variants:
            stages.run_variant(ws, p, name)
    return ws


@pytest.fixture(scope="module")
def sam_ws(tmp_path_factory):
    """A SAM-like model through data, model, export, calibrate, reference, one static INT8 variant and the report."""
    from vitq.tasks import stages
    from vitq.params import parse_params

    root = tmp_path_factory.mktemp("multi") / "ws"
    _scenes(root / "scenes", np.random.default_rng(0))
    (root / "models.py").write_text(SAM_PY)
    raw = _sam_params(root, SAM_TASK)
    make_workspace(root, raw, dvc=False)
    p = parse_params(raw)
    ws = _stages(root, p, PREPARED)
    stages.run_benchmark(ws, p)
    stages.run_report(ws, p)
    return ws, p


def test_outputs_are_named_and_exported(sam_ws):
    from vitq.tasks.export import load_export_result
    from vitq.tasks.model import load_model_spec

    ws, _ = sam_ws
    spec = load_model_spec(ws.model_dir)
    assert spec.outputs == {"output_0": [2, 16, 16], "output_1": [2]}
    assert load_export_result(ws.export_dir).outputs == ["output_0", "output_1"]
    graph = onnx.load(str(ws.export_dir / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["output_0", "output_1"]
    ref = ws.validation_for("fp32")
    assert sorted(f.name for f in ref.glob("*.npy")) == ["fp32.output_0.npy", "fp32.output_1.npy"]
    from vitq.tasks.validate import load_validation

    images = load_validation(ref, "fp32").images  # the validation split less the recovery holdout
    assert np.load(ref / "fp32.output_1.npy").shape == (images, 2)
    assert np.load(ref / "fp32.output_0.npy").shape == (images, 2, 16, 16)


def test_judged_output_has_the_task_metrics_and_the_other_its_sqnr(sam_ws):
    ws, _ = sam_ws
    summary = json.loads(ws.summary_file.read_text())
    v = next(v for v in summary["variants"] if v["name"] == "onnx-w8a8-minmax")
    masks, iou = v["outputs"]["output_0"], v["outputs"]["output_1"]
    # the judged output: the dense task's metrics, and they are the variant's headline numbers
    assert masks["judged"] is True and 0.0 <= masks["mask_iou"] <= 1.0 and masks["miou"] is not None
    assert v["mask_iou"] == masks["mask_iou"] and v["sqnr_db"] == masks["sqnr_db"] and v["miou"] == masks["miou"]
    # the other: checked against FP32 with SQNR and cosine, floor 10 dB
    assert iou["judged"] is False and np.isfinite(iou["sqnr_db"]) and 0.9 < iou["cosine"] <= 1.0 + 1e-9, iou
    assert iou["passed"] == (iou["sqnr_db"] >= 10.0) and "mask_iou" not in iou
    assert v["passed"] == (masks["passed"] and iou["passed"]), v
    assert summary["baseline"]["outputs"]["output_1"]["sqnr_db"] == float("inf")
    assert v["latency_ms_p50"] is not None  # timed with every output computed
    assert "onnx-w8a8-minmax outputs vs FP32: output_0 (judged) SQNR" in ws.report_file.read_text()


def test_single_output_summary_has_no_outputs_key(staged_workspace, tmp_path_factory):
    """A single-output model keeps today's records: fp32.npy, no `outputs` in the summary or the task record."""
    from vitq.tasks import validate
    from vitq.tasks.layout import Workspace
    from vitq.config import ValidateConfig

    ws = Workspace(staged_workspace)
    out = tmp_path_factory.mktemp("single-ref")
    result = validate.reference_outputs(ws.export_dir / "model.onnx", ws.model_dir, ws.data_dir, ValidateConfig(), out)
    assert sorted(f.name for f in out.iterdir()) == ["fp32.json", "fp32.npy"]
    assert result.outputs == {} and "outputs" not in result.details["task"] and "output_files" not in result.details


def _broken_secondary(src: Path, dst: Path, output: str, scale: float) -> None:
    """A copy of the ONNX graph at `src` whose output `output` is multiplied by `scale` (the rest untouched)."""
    model = onnx.load(str(src))
    g = model.graph
    for node in g.node:
        node.output[:] = [f"{output}_before_break" if o == output else o for o in node.output]
        node.input[:] = [f"{output}_before_break" if i == output else i for i in node.input]
    g.initializer.append(onnx.numpy_helper.from_array(np.array(scale, np.float32), "break_scale"))
    g.node.append(helper.make_node("Mul", [f"{output}_before_break", "break_scale"], [output], name="break_Mul"))
    onnx.save(model, str(dst))


def test_a_floor_on_a_secondary_output_fails_a_variant_whose_secondary_output_is_broken(sam_ws, tmp_path):
    from vitq.tasks import validate
    from vitq.tasks.variant import load_variant, variant_dir

    ws, p = sam_ws
    name = "onnx-w8a8-minmax"
    art = load_variant(ws.variants_dir, name)
    served = variant_dir(ws.variants_dir, name) / art.artifact
    broken = tmp_path / "broken.onnx"
    _broken_secondary(served, broken, "output_1", 0.5)  # IoU predictions halved: SQNR 6 dB; the masks as they were
    ref_dir = ws.validation_for(validate.REFERENCE)
    result = validate.validate_variant(name, broken, ws.model_dir, ws.data_dir, p.validate_, tmp_path, reference_dir=ref_dir)
    good = validate.load_validation(ws.validation_for(name), name)
    assert result.outputs["output_0"] == good.outputs["output_0"]  # the judged output did not change
    assert result.outputs["output_1"]["sqnr_db"] < 7.0 and result.outputs["output_1"]["passed"] is False
    assert not result.passed and any(r.startswith("output_1: SQNR") and "task.outputs.output_1.min_sqnr_db 10.0" in r
                                     for r in result.reasons), result.reasons


def test_a_name_the_model_lacks_is_one_line(sam_ws, tmp_path):
    from vitq.tasks import validate
    from vitq.config import TaskConfig, ValidateConfig
    from vitq.errors import ConfigError

    ws, _ = sam_ws
    task = TaskConfig.model_validate({"kind": "dense", "outputs": {"masks": {"judged": True}}})
    with pytest.raises(ConfigError) as info:
        validate.reference_outputs(ws.export_dir / "model.onnx", ws.model_dir, ws.data_dir, ValidateConfig(),
                                   tmp_path, task)
    message = str(info.value)
    assert "'masks'" in message and "output_0, output_1" in message and "\n" not in message, message
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ConfigError, match=r"returns 2 outputs \(output_0, output_1\).*task.outputs"):
        validate.reference_outputs(ws.export_dir / "model.onnx", ws.model_dir, ws.data_dir, ValidateConfig(),
                                   tmp_path, TaskConfig(kind="dense"))


def test_a_name_the_model_lacks_exits_2_from_the_cli(sam_ws, tmp_path):
    """`vitq stage reference` with a task.outputs name the model does not return: one line, exit 2."""
    import shutil
    import yaml

    from tests.conftest import vitq

    ws, _ = sam_ws
    root = tmp_path / "ws"
    shutil.copytree(ws.root, root)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["task"]["outputs"] = {"iou_predictions": {"judged": True}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = vitq(["stage", "reference"], root, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("vitq: error")]
    assert len(lines) == 1 and "'iou_predictions'" in lines[0] and "output_0, output_1" in lines[0], proc.stderr


def test_params_refuse_task_outputs_without_a_judged_one():
    from vitq.params import parse_params
    from vitq.errors import ConfigError

    raw = tiny_params(task={"outputs": {"output_1": {"min_sqnr_db": 20.0}}})
    with pytest.raises(ConfigError, match="judges none: set judged: true"):
        parse_params(raw)
    raw = tiny_params(task={"outputs": {"output_0": {"judged": True, "bogus": 1}}})
    with pytest.raises(ConfigError, match="task.outputs.output_0.bogus"):
        parse_params(raw)


@pytest.fixture(scope="module")
def detector_ws(tmp_path_factory):
    """A detector-like model (a dict of outputs) on the digits: scores judged by top-1, boxes by a metric of the
    user's own with a floor."""
    from vitq.params import parse_params

    root = tmp_path_factory.mktemp("detector") / "ws"
    root.mkdir(parents=True, exist_ok=True)
    (root / "models.py").write_text(SAM_PY)
    (root / "det_metrics.py").write_text(METRIC_PY)
    raw = tiny_params(
        task={"kind": "classification", "metric": None,
              "outputs": {"scores": {"judged": True},
                          "boxes": {"metric": "det_metrics.py:box_iou", "min_metrics": {"box_iou": 0.5}}}},
        data={"validation_size": 40, "calibration_size": 16},
        quantize={"recipes": ["onnx-w8a8-minmax"], "carry": {}, "define": {}},
        validate={"max_top1_drop": 100.0, "error_report_images": 0},
    )
    raw["model"] = {"source": "python", "factory": "models.py:detector", "arch": {"queries": 3, "classes": 10},
                    "mean": [0.5], "std": [0.25]}
    make_workspace(root, raw, dvc=False)
    p = parse_params(raw)
    return _stages(root, p, PREPARED), p


def test_a_dict_output_is_judged_by_its_keys(detector_ws):
    from vitq.tasks import validate

    ws, _ = detector_ws
    ref = validate.load_validation(ws.validation_for("fp32"), "fp32")
    assert list(ref.outputs) == ["boxes", "scores"]  # the model's order
    assert ref.outputs["scores"]["top1"] is not None and ref.metrics.top1 == ref.outputs["scores"]["top1"]
    assert ref.outputs["boxes"]["metrics"]["box_iou"] == pytest.approx(1.0)
    v = validate.load_validation(ws.validation_for("onnx-w8a8-minmax"), "onnx-w8a8-minmax")
    scores, boxes = v.outputs["scores"], v.outputs["boxes"]
    assert scores["judged"] and scores["top1_drop"] is not None and v.metrics.top1 == scores["top1"]
    assert not boxes["judged"] and np.isfinite(boxes["sqnr_db"]) and 0.5 < boxes["metrics"]["box_iou"] <= 1.0
    assert boxes["passed"] and v.passed, v.reasons


# --- the Python API --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_variant(tmp_path_factory):
    import vitq

    namespace: dict = {}
    exec(compile(SAM_PY, "models.py", "exec"), namespace)
    x = np.random.default_rng(0).standard_normal((24, 1, 16, 16), dtype=np.float32)
    variant = vitq.quantize(namespace["build"](), "onnx-w8a8-minmax", calibration=x[:16],
                            workdir=tmp_path_factory.mktemp("api-multi"))
    return variant, x


def test_api_predict_returns_every_output_by_name(api_variant):
    variant, x = api_variant
    assert variant.output_names == ("output_0", "output_1")
    out = variant.predict(x[:5])
    assert set(out) == {"output_0", "output_1"}
    assert out["output_0"].shape == (5, 2, 16, 16) and out["output_1"].shape == (5, 2)


def test_api_validate_judges_the_named_output_and_checks_the_other(api_variant):
    from vitq.errors import ConfigError

    variant, x = api_variant
    result = variant.validate(x, task={"kind": "dense", "outputs": {"output_0": {"judged": True},
                                                                    "output_1": {"min_sqnr_db": 100.0}}})
    masks, iou = result.outputs["output_0"], result.outputs["output_1"]
    assert masks["judged"] and result.metrics.mask_iou == masks["mask_iou"] and masks["passed"], result.reasons
    assert not iou["judged"] and np.isfinite(iou["sqnr_db"]) and iou["sqnr_db"] < 100.0 and not iou["passed"]
    assert not result.passed and result.reasons == [
        f"output_1: SQNR {iou['sqnr_db']:.1f} dB < task.outputs.output_1.min_sqnr_db 100.0"]
    with pytest.raises(ConfigError, match=r"returns 2 outputs \(output_0, output_1\)"):
        variant.validate(x)  # several outputs and no task.outputs: which is judged?
    with pytest.raises(ConfigError, match=r"'iou_predictions'.*its outputs: output_0, output_1"):
        variant.validate(x, task={"kind": "dense", "outputs": {"iou_predictions": {"judged": True}}})


def test_coreml_converts_several_outputs_by_name(tmp_path):
    """Core ML: a program with one output per model output, named as the model names them; off macOS judged by
    the torch program it was converted from, output by output."""
    pytest.importorskip("coremltools")
    import coremltools as ct

    import vitq

    namespace: dict = {}
    exec(compile(SAM_PY, "models.py", "exec"), namespace)
    x = np.random.default_rng(0).standard_normal((16, 1, 16, 16), dtype=np.float32)
    variant = vitq.quantize(namespace["detector"](), "coreml-w8", calibration=x[:8], workdir=tmp_path)
    spec = ct.models.MLModel(str(variant.served), skip_model_load=True).get_spec()
    assert [o.name for o in spec.description.output] == ["boxes", "scores"]
    result = variant.validate(x, task={"kind": "classification", "outputs": {"scores": {"judged": True},
                                                                              "boxes": {"min_sqnr_db": 20.0}}})
    assert set(result.outputs) == {"boxes", "scores"} and result.outputs["boxes"]["sqnr_db"] > 20.0, result.outputs
    assert result.passed, result.reasons


def test_recovery_recipes_refuse_several_outputs_in_one_line(sam_ws, tmp_path):
    from vitq.tasks.recovery import variants as recovery
    from vitq.errors import VitqError
    from vitq.recipes import get_recipe

    ws, p = sam_ws
    inputs = recovery.Inputs(ws.model_dir, ws.data_dir, ws.export_dir, ws.calibration_dir, p)
    with pytest.raises(VitqError, match=r"steers its recovery by one output.*\(output_0, output_1\)"):
        recovery.build(get_recipe("onnx-w8a8-auto"), inputs, tmp_path, tmp_path)
    # The shared stages (tasks/recovery/shared.py) record why they made nothing instead of failing the pipeline.
    (tmp_path / "need.json").write_text('{"needed": true, "calibrates_attention": false}')
    for make, name in ((recovery.make_search, "search"), (recovery.make_smoothquant, "smoothquant")):
        record = make(inputs, tmp_path / "need.json", tmp_path / name)
        assert "the model has 2 outputs (output_0, output_1)" in record["skipped"], record
        assert json.loads((tmp_path / name / f"{name}.json").read_text()) == record
