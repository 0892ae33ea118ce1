"""Core ML variants on Linux: conversion, int8 coverage read back from the ML program, torch-counterpart
validation; the macOS-only prediction and timing code checked against a stand-in for MLModel."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitq.tasks import stages
from vitq.tasks.targets.coreml import variants as coreml
from vitq.tasks.targets.coreml.target import COREML
from vitq.tasks.variant import load_variant
from vitq.tasks.targets.coreml import backend
from vitq.tasks.layout import Workspace
from vitq.params import parse_params
from vitq.recipes import get_recipe

from conftest import tiny_params, vitq, workspace_copy


@pytest.fixture(scope="module")
def coreml_ws(staged_workspace, tmp_path_factory) -> Workspace:
    """A copy of the staged workspace with the three Core ML variants quantized and validated."""
    ws, p = workspace_copy(staged_workspace, tmp_path_factory, "coreml"), parse_params(tiny_params())
    stages.run_reference(ws, p)
    for name in ("coreml-fp16", "coreml-w8", "coreml-w8a8"):
        stages.quantize_one(ws, name)
        stages.validate_one(ws, p, name)
    return ws


def _coverage(ws: Workspace, name: str) -> list[dict]:
    with open(ws.variants_dir / name / "coverage.csv") as f:
        return list(csv.DictReader(f))


def test_every_linear_conv_and_attention_matmul_is_int8_in_w8a8(coreml_ws):
    rows = _coverage(coreml_ws, "coreml-w8a8")
    kinds = {r["op_type"] for r in rows}
    assert kinds == {"conv", "linear", "matmul"}
    assert all(r["activation_quantized"] == "True" for r in rows), [r["layer"] for r in rows if r["activation_quantized"] != "True"]
    assert all(r["int8_weight"] == "True" for r in rows if r["op_type"] != "matmul")
    names = {r["layer"] for r in rows}
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn#qk", "blocks.0.attn#av", "blocks.0.mlp.fc2", "head"} <= names
    art = load_variant(coreml_ws.variants_dir, "coreml-w8a8")
    assert art.int8_weight_fraction == 1.0 and art.artifact == "model.mlpackage"
    assert art.op_counts["quantize"] == art.op_counts["dequantize"] == len(rows) + sum(r["op_type"] == "matmul" for r in rows)


def test_fp16_and_w8_coverage_and_sizes(coreml_ws):
    fp16, w8 = _coverage(coreml_ws, "coreml-fp16"), _coverage(coreml_ws, "coreml-w8")
    assert not any(r["int8_weight"] == "True" or r["activation_quantized"] == "True" for r in fp16)
    assert all(r["int8_weight"] == "True" for r in w8 if r["op_type"] != "matmul")
    assert not any(r["activation_quantized"] == "True" for r in w8)
    load = load_variant
    assert load(coreml_ws.variants_dir, "coreml-w8").size_mb < load(coreml_ws.variants_dir, "coreml-fp16").size_mb


def test_validation_on_linux_uses_the_torch_counterpart_and_says_so(coreml_ws):
    from vitq.tasks.validate import load_validation

    for name in ("coreml-fp16", "coreml-w8", "coreml-w8a8"):
        v = load_validation(coreml_ws.validation_for(name), name)
        assert v.runtime == "torch counterpart (model.pt2)"
        assert "macos worker" in v.not_measured["coreml_predict"]
        assert v.metrics.top1_drop is not None and v.metrics.top1_drop <= 1.0, (name, v.metrics)
    assert load_validation(coreml_ws.validation_for("coreml-fp16"), "coreml-fp16").metrics.sqnr_db > 40  # FP16 emulated, not FP32


def test_summary_reports_coreml_latency_as_not_measured_with_reason(coreml_ws):
    from vitq.tasks import benchmark, report

    p = parse_params(tiny_params(quantize={"recipes": ["onnx-w8a8-minmax", "coreml-w8a8"], "carry": {}}))
    stages.quantize_one(coreml_ws, "onnx-w8a8-minmax")
    stages.validate_one(coreml_ws, p, "onnx-w8a8-minmax")
    stages.run_benchmark(coreml_ws, p)
    bench = benchmark.load_benchmark(coreml_ws.benchmark_file)
    assert "coreml-w8a8" not in bench.models and "macos" in bench.not_measured["coreml-w8a8"]
    summary = stages.build_summary(coreml_ws, p)
    v = {x["name"]: x for x in summary["variants"]}["coreml-w8a8"]
    assert v["target"] == "coreml" and v["int8_weight_fraction"] == 1.0 and v["latency_ms_p50"] is None
    assert "macos" in v["not_measured"]["latency_ms_p50"] and "coreml_predict" in v["not_measured"]
    assert "coreml-w8a8" in report.summary_table(summary)


def test_multihead_attention_model_is_fully_quantized(tmp_path):
    """torchvision's ViT: nn.MultiheadAttention is rewritten, so q/k/v/out and both matmuls are int8."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: logits would all be 0
    calib = torch.randn(8, 3, 32, 32).numpy()
    facts = coreml.build_variant(model.eval(), get_recipe("coreml-w8a8"), calib, tmp_path, batch_size=4)
    assert facts["attention"]["rewritten"] == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert facts["int8_weight_fraction"] == 1.0 and not facts["unhandled"]
    rows = list(csv.DictReader(open(tmp_path / "coverage.csv")))
    # per layer: q, k, v, out, mlp x2 linears and 2 matmuls; plus the patch conv and the head
    assert sum(r["op_type"] == "linear" for r in rows) == 2 * 6 + 1
    assert sum(r["op_type"] == "matmul" for r in rows) == 2 * 2
    assert all(r["activation_quantized"] == "True" for r in rows)
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    x = torch.from_numpy(calib[:2])
    with torch.no_grad():
        ref, out = model.eval()(x), program(x)
    assert float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())) > 15  # int8, close to FP32


def test_float_layers_stay_float_in_the_program(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    calib = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    facts = coreml.build_variant(model, get_recipe("coreml-w8a8"), calib, tmp_path, float_layers=frozenset({"2"}))
    rows = {r["layer"]: r for r in csv.DictReader(open(tmp_path / "coverage.csv"))}
    assert rows["0"]["int8_weight"] == "True" and rows["0"]["activation_quantized"] == "True"
    assert rows["2"]["int8_weight"] == "False" and rows["2"]["activation_quantized"] == "False"
    assert facts["float_layers"] == ["2"]
    assert facts["int8_weight_fraction"] == pytest.approx(16 * 32 / (16 * 32 + 32 * 8))


def test_ops_the_quantizer_cannot_handle_are_reported():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v)

    _, report = backend.quantize_pt2e(Fused().eval(), [torch.randn(2, 5, 8)], activations=True)
    assert report.quantized == ["qkv"]
    assert len(report.unhandled) == 1 and "fused attention" in report.unhandled[0]


class _FakeMLModel:
    """Stands in for coremltools.models.MLModel on Linux: records feeds (and, given a shared `calls`
    list, its name per call, so the order across models shows), returns fixed logits."""

    def __init__(self, classes: int = 3, name: str = "", calls: list[str] | None = None):
        self.feeds: list[dict] = []
        self.classes = classes
        self.name, self.calls = name, calls

    def predict(self, feed: dict) -> dict:
        self.feeds.append(feed)
        if self.calls is not None:
            self.calls.append(self.name)
        x = feed["image"]
        return {"logits": np.full((1, self.classes), float(x.sum()), dtype=np.float32)}


def test_predict_feeds_one_float32_image_at_a_time_and_stacks_outputs():
    fake = _FakeMLModel()
    x = np.arange(4 * 1 * 2 * 2, dtype=np.float64).reshape(4, 1, 2, 2)
    out = backend.predict(fake, x)
    assert out.shape == (4, 3) and out.dtype == np.float32
    assert [f["image"].shape for f in fake.feeds] == [(1, 1, 2, 2)] * 4
    assert all(f["image"].dtype == np.float32 and f["image"].flags.c_contiguous for f in fake.feeds)
    np.testing.assert_allclose(out[:, 0], x.reshape(4, -1).sum(1))


def test_timing_interleaves_models_and_records_compute_units(monkeypatch, tmp_path):
    cfg = parse_params(tiny_params()).benchmark
    packages = {}
    for name in ("coreml-fp16", "coreml-w8a8"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weight.bin").write_bytes(b"0" * 1024)
        packages[name] = tmp_path / name
    monkeypatch.setattr(sys, "platform", "linux")
    timings, why = coreml.benchmark_packages(packages, np.zeros((1, 1, 2, 2), np.float32), cfg, COREML.missing_executor())
    assert timings == {} and set(why) == set(packages) and "macos" in why["coreml-w8a8"]

    calls: list[str] = []
    loaded: list[tuple[str, str]] = []
    fakes = {name: _FakeMLModel(name=name, calls=calls) for name in packages}

    def load(path, units):
        loaded.append((Path(path).name, units))
        return fakes[Path(path).name]

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(backend, "load_for_prediction", load)
    timings, why = coreml.benchmark_packages(packages, np.zeros((1, 1, 2, 2), np.float32), cfg, COREML.missing_executor())
    assert why == {} and set(timings) == set(packages)
    assert sorted(loaded) == [(name, cfg.coreml_compute_units) for name in sorted(packages)]
    t = timings["coreml-w8a8"]
    assert t.baseline == "coreml-fp16" and t.device == "coreml:ALL" and t.runs == cfg.repeats
    assert t.size_mb == pytest.approx(1024 / 2**20)
    assert all(len(f.feeds) == cfg.warmup + cfg.repeats for f in fakes.values())
    # Timed calls go in rounds, each model's block once per round: fp16, w8a8, fp16, w8a8 (not all
    # of fp16's runs, then all of w8a8's), so drift during the run reaches every model alike.
    assert cfg.rounds >= 2, "interleaving only shows with two rounds or more"
    per_round = cfg.repeats // cfg.rounds
    timed = calls[len(packages) * cfg.warmup:]
    assert timed == [name for _ in range(cfg.rounds) for name in packages for _ in range(per_round)], timed


def test_validation_on_macos_compares_core_ml_outputs(coreml_ws, monkeypatch):
    """The stand-in for Core ML returns FP32's logits with the top two classes swapped on every 4th
    image: the metrics must be exactly those of that perturbation, not the torch counterpart's."""
    import json

    from vitq.tasks.data import load_split
    from vitq.tasks.validate import load_validation

    p = parse_params(tiny_params())
    ref = np.load(coreml_ws.validation_for("fp32") / "fp32.npy")
    labels = load_split(coreml_ws.data_dir, "validation").labels
    ref_top1 = load_validation(coreml_ws.validation_for("fp32"), "fp32").metrics.top1
    n = len(ref)
    order = np.argsort(ref, axis=1)
    first, second = order[:, -1], order[:, -2]
    flipped = np.arange(0, n, 4)
    perturbed = ref.copy()
    top, runner_up = ref[flipped, first[flipped]], ref[flipped, second[flipped]]
    perturbed[flipped, first[flipped]], perturbed[flipped, second[flipped]] = runner_up, top
    assert np.all(top > runner_up), "a tie would not flip"
    predicted = first.copy()
    predicted[flipped] = second[flipped]
    gap = top.astype(np.float64) - runner_up
    expected_agreement = 1.0 - len(flipped) / n
    expected_top1 = float(np.mean(predicted == labels))
    # noise: in each flipped row two entries moved by the gap between them
    expected_sqnr_db = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum(2 * gap**2))

    seen = []

    def fake_predict_coreml(package, x, units):
        seen.append((Path(package), x.shape, units))
        return perturbed.copy()

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(coreml, "predict_coreml", fake_predict_coreml)
    out = coreml_ws.root / "validation-mac"  # beside, so the Linux results stay as they are
    out.mkdir(exist_ok=True)
    for f in ("fp32.npy", "fp32.json"):
        shutil.copy(coreml_ws.validation_for("fp32") / f, out / f)
    folder = coreml_ws.variants_dir / "coreml-w8a8"
    v = coreml.validate_variant(
        "coreml-w8a8", folder, coreml_ws.model_dir, coreml_ws.data_dir, p.validate_, out, COREML.missing_executor(),
        "CPU_ONLY",
    )
    assert seen == [(folder / "model.mlpackage", (n, 1, 32, 32), "CPU_ONLY")]
    assert v.runtime == "coreml (CPU_ONLY)" and v.not_measured == {} and v.images == n
    m = v.metrics
    assert m.agreement == pytest.approx(expected_agreement, abs=1e-12), m
    assert m.top1 == pytest.approx(expected_top1, abs=1e-12), m
    assert m.top1_drop == pytest.approx(100 * (ref_top1 - expected_top1), abs=1e-6), m
    assert m.sqnr_db == pytest.approx(expected_sqnr_db, rel=1e-6), m
    # the torch counterpart's metrics are kept beside, as details, and are not these
    assert v.details["torch_counterpart"]["sqnr_db"] != pytest.approx(m.sqnr_db)
    saved = json.loads((out / "coreml-w8a8.json").read_text())
    assert saved["runtime"] == "coreml (CPU_ONLY)" and saved["metrics"]["agreement"] == m.agreement


def test_coreml_bench_rejects_an_unknown_model(tmp_path):
    proc = vitq(["coreml-bench", "--models", "demo,vit_nope_1"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("vitq: error: unknown model 'vit_nope_1'")
    assert not (tmp_path / "reports").exists()


def _layer_norm_gammas(package: Path) -> list[np.ndarray]:
    """The scale (gamma) of every layer_norm op in a saved ML program, as float32."""
    program = backend.load_program(package)
    return [np.asarray(op.inputs["gamma"].val, np.float32) for fn in program.functions.values()
            for op in fn.operations if op.op_type == "layer_norm"]


def test_recipe_reusing_a_recovery_decision_applies_it_to_core_ml(coreml_ws):
    """coreml-w8a8-auto leaves in FP16 exactly what onnx-w8a8-auto left in float; -smoothquant converts
    the smoothed weights that variant saved."""
    from vitq.tasks import quantize
    from vitq.tasks._io import write_json
    from vitq.tasks.data import load_split, model_inputs
    from vitq.tasks.model import load_model
    from vitq.tasks.recovery.simulate import input_amax
    from vitq.tasks.recovery.smoothquant import smooth, smoothing_pairs
    from vitq.errors import VitqError

    vdir = coreml_ws.variants_dir
    with pytest.raises(VitqError, match="quantize onnx-w8a8-auto first"):
        coreml.quantize_variant(get_recipe("coreml-w8a8-auto"), coreml_ws.model_dir, coreml_ws.data_dir, vdir)
    (vdir / "onnx-w8a8-auto").mkdir(exist_ok=True)
    write_json(vdir / "onnx-w8a8-auto" / "variant.json", {
        "float_layers": ["blocks.0.mlp.fc1"], "float_attention": ["blocks.0.attn#qk", "blocks.0.attn#av"]})
    art = coreml.quantize_variant(get_recipe("coreml-w8a8-auto"), coreml_ws.model_dir, coreml_ws.data_dir, vdir)
    assert art.float_layers == ["blocks.0.mlp.fc1"]
    assert sorted(art.float_attention) == ["blocks.0.attn#av", "blocks.0.attn#qk"]
    rows = {r["layer"]: r for r in _coverage(coreml_ws, "coreml-w8a8-auto")}
    assert rows["blocks.0.mlp.fc1"]["int8_weight"] == "False" and rows["blocks.0.mlp.fc1"]["activation_quantized"] == "False"
    assert rows["blocks.0.attn#qk"]["activation_quantized"] == "False"
    assert rows["blocks.0.mlp.fc2"]["int8_weight"] == "True" == rows["blocks.0.mlp.fc2"]["activation_quantized"]
    assert 0.5 < art.int8_mac_fraction < 1.0 and art.int8_weight_fraction < 1.0
    assert load_variant(vdir, "coreml-w8a8").int8_mac_fraction == 1.0

    # What onnx-w8a8-smoothquant saves: the FP32 model smoothed (alpha 0.5, per-channel input ranges
    # from the calibration images), so the norms' scales and the Linears' columns differ from FP32's.
    original, spec = load_model(coreml_ws.model_dir)
    smoothed, _ = load_model(coreml_ws.model_dir)
    pairs = smoothing_pairs(smoothed)
    x = model_inputs(load_split(coreml_ws.data_dir, "calibration").images, spec.mean, spec.std)
    smooth(smoothed, pairs, input_amax(smoothed, [lin for _, lin in pairs], x, per_channel=True), alpha=0.5)
    sq = vdir / "onnx-w8a8-smoothquant"
    (sq / "torch").mkdir(parents=True)
    write_json(sq / "variant.json", {"float_layers": []})
    torch.save(smoothed.state_dict(), sq / "torch" / "model.pt")
    shutil.copy(coreml_ws.model_dir / "model.json", sq / "torch" / "model.json")
    norms = [norm for norm, _ in pairs]
    for norm in norms:
        w0, w1 = original.get_submodule(norm).weight.detach(), smoothed.get_submodule(norm).weight.detach()
        assert (w1 / w0 - 1).abs().max() > 0.1, f"smoothing left {norm} (nearly) as it was"

    coreml.quantize_variant(get_recipe("coreml-w8a8-smoothquant"), coreml_ws.model_dir, coreml_ws.data_dir, vdir)
    folder = vdir / "coreml-w8a8-smoothquant"
    facts = __import__("json").loads((folder / "coreml.json").read_text())
    assert facts["reuses"]["weights"].endswith("onnx-w8a8-smoothquant/torch")
    assert facts["float_layers"] == []  # attention matmuls are quantized: only auto's search keeps them float
    # The ML program and the torch program it came from carry the smoothed norms, not FP32's.
    gammas = _layer_norm_gammas(folder / "model.mlpackage")
    program = torch.export.load(str(folder / "model.pt2")).state_dict
    for norm in norms:
        w0 = original.get_submodule(norm).weight.detach().numpy()
        w1 = smoothed.get_submodule(norm).weight.detach().numpy()
        assert any(np.allclose(g, w1, rtol=2e-3, atol=1e-4) for g in gammas), f"{norm}: smoothed scale not in the ML program"
        assert not any(np.allclose(g, w0, rtol=2e-3, atol=1e-4) for g in gammas), f"{norm}: FP32's scale in the ML program"
        np.testing.assert_array_equal(program[f"{norm}.weight"].detach().numpy(), w1)


def test_coreml_bench_rejects_an_unknown_torchvision_model_before_converting(tmp_path):
    proc = vitq(["coreml-bench", "--models", "demo,torchvision:vit_nope"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("vitq: error: unknown torchvision model 'vit_nope'")
    assert not (tmp_path / "reports").exists()


def test_coverage_experiment_converts_every_recipe_through_the_api(monkeypatch):
    """`vitq coreml-coverage` on the (untrained) demo ViT: one `vitq.quantize` per Core ML recipe, and sizes
    and coverage read back from the ML programs."""
    import vitq
    from vitq.experiments import coreml_coverage

    made = []
    quantize = vitq.quantize
    monkeypatch.setattr(vitq, "quantize", lambda model, recipe, **kw: made.append(recipe) or quantize(model, recipe, **kw))
    r = coreml_coverage.measure("demo", None, calibration_images=4)
    assert made == list(coreml_coverage.RECIPES)
    assert r["input_size"] == [1, 32, 32] and "random" in r["weights"]
    assert r["w8_mb"] < r["fp16_mb"] and r["w8_reduction"] == pytest.approx(1 - r["w8_mb"] / r["fp16_mb"], abs=1e-2)  # sizes rounded to kB
    assert r["int8_weight_fraction"] == 1.0 and not r["unhandled"], r
    done, total = map(int, r["quantized_inputs"].split("/"))
    assert done == total > 0 and r["ops"]["linear"] > 0 and r["ops"]["quantize"] > 0, r
    assert set(r["seconds"]) == set(coreml_coverage.RECIPES)
