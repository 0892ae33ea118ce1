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

from tasks import coreml, stages
from tasks.backends import coreml as backend
from tasks.layout import Workspace
from vitq.config import parse_params
from vitq.recipes import get_recipe

from conftest import tiny_params, vitq


@pytest.fixture(scope="module")
def coreml_ws(staged_workspace, tmp_path_factory) -> Workspace:
    """A copy of the staged workspace with the three Core ML variants quantized and validated."""
    root = tmp_path_factory.mktemp("coreml") / "ws"
    shutil.copytree(staged_workspace, root)
    ws, p = Workspace(root), parse_params(tiny_params())
    stages.validate_reference(ws, p)
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
    art = stages.quantize.load_variant(coreml_ws.variants_dir, "coreml-w8a8")
    assert art.int8_weight_fraction == 1.0 and art.artifact == "model.mlpackage"
    assert art.op_counts["quantize"] == art.op_counts["dequantize"] == len(rows) + sum(r["op_type"] == "matmul" for r in rows)


def test_fp16_and_w8_coverage_and_sizes(coreml_ws):
    fp16, w8 = _coverage(coreml_ws, "coreml-fp16"), _coverage(coreml_ws, "coreml-w8")
    assert not any(r["int8_weight"] == "True" or r["activation_quantized"] == "True" for r in fp16)
    assert all(r["int8_weight"] == "True" for r in w8 if r["op_type"] != "matmul")
    assert not any(r["activation_quantized"] == "True" for r in w8)
    load = stages.quantize.load_variant
    assert load(coreml_ws.variants_dir, "coreml-w8").size_mb < load(coreml_ws.variants_dir, "coreml-fp16").size_mb


def test_validation_on_linux_uses_the_torch_counterpart_and_says_so(coreml_ws):
    from tasks.validate import load_validation

    for name in ("coreml-fp16", "coreml-w8", "coreml-w8a8"):
        v = load_validation(coreml_ws.validation_dir, name)
        assert v.runtime == "torch counterpart (model.pt2)"
        assert "macos worker" in v.not_measured["coreml_predict"]
        assert v.metrics.top1_drop is not None and v.metrics.top1_drop <= 1.0, (name, v.metrics)
    assert load_validation(coreml_ws.validation_dir, "coreml-fp16").metrics.sqnr_db > 40  # FP16 emulated, not FP32


def test_summary_reports_coreml_latency_as_not_measured_with_reason(coreml_ws):
    from tasks import benchmark, report

    p = parse_params(tiny_params(quantize={"recipes": ["onnx-w8a8-minmax", "coreml-w8a8"]}))
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
    """Stands in for coremltools.models.MLModel on Linux: records feeds, returns fixed logits."""

    def __init__(self, classes: int = 3):
        self.feeds: list[dict] = []
        self.classes = classes

    def predict(self, feed: dict) -> dict:
        self.feeds.append(feed)
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
    timings, why = coreml.benchmark_packages(packages, np.zeros((1, 1, 2, 2), np.float32), cfg)
    assert timings == {} and set(why) == set(packages) and "macos" in why["coreml-w8a8"]

    fakes = {name: _FakeMLModel() for name in packages}
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(backend, "load_for_prediction", lambda path, units: fakes[Path(path).name])
    timings, why = coreml.benchmark_packages(packages, np.zeros((1, 1, 2, 2), np.float32), cfg)
    assert why == {} and set(timings) == set(packages)
    t = timings["coreml-w8a8"]
    assert t.baseline == "coreml-fp16" and t.device == "coreml:ALL" and t.runs == cfg.repeats
    assert t.size_mb == pytest.approx(1024 / 2**20)
    assert all(len(f.feeds) == cfg.warmup + cfg.repeats for f in fakes.values())


def test_validation_on_macos_compares_core_ml_outputs(coreml_ws, monkeypatch):
    p = parse_params(tiny_params())
    logits = np.load(coreml_ws.validation_dir / "fp32.npy")
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(coreml, "predict_coreml", lambda package, x, units: logits.copy())
    out = coreml_ws.root / "validation-mac"  # beside, so the Linux results stay as they are
    out.mkdir(exist_ok=True)
    for f in ("fp32.npy", "fp32.json"):
        shutil.copy(coreml_ws.validation_dir / f, out / f)
    v = coreml.validate_variant(
        "coreml-w8a8", coreml_ws.variants_dir / "coreml-w8a8", coreml_ws.model_dir, coreml_ws.data_dir,
        p.validate_, out, "CPU_ONLY",
    )
    assert v.runtime == "coreml (CPU_ONLY)" and v.not_measured == {}
    assert v.metrics.agreement == 1.0 and "torch_counterpart" in v.details


def test_coreml_bench_rejects_an_unknown_model(tmp_path):
    proc = vitq(["coreml-bench", "--models", "demo,vit_nope_1"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("vitq: error: unknown model 'vit_nope_1'")
    assert not (tmp_path / "reports").exists()


def test_recipe_reusing_a_recovery_decision_applies_it_to_core_ml(coreml_ws):
    """coreml-w8a8-auto leaves in FP16 exactly what onnx-w8a8-auto left in float; -smoothquant converts
    the smoothed weights that variant saved."""
    from tasks import quantize
    from tasks._io import write_json
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
    assert quantize.load_variant(vdir, "coreml-w8a8").int8_mac_fraction == 1.0

    (vdir / "onnx-w8a8-smoothquant").mkdir(exist_ok=True)
    write_json(vdir / "onnx-w8a8-smoothquant" / "variant.json", {"float_layers": []})
    shutil.copytree(coreml_ws.model_dir, vdir / "onnx-w8a8-smoothquant" / "torch")
    coreml.quantize_variant(get_recipe("coreml-w8a8-smoothquant"), coreml_ws.model_dir, coreml_ws.data_dir, vdir)
    facts = __import__("json").loads((vdir / "coreml-w8a8-smoothquant" / "coreml.json").read_text())
    assert facts["reuses"]["weights"].endswith("onnx-w8a8-smoothquant/torch")
    assert facts["float_layers"] == []  # attention matmuls are quantized: only auto's search keeps them float


def test_coreml_bench_rejects_an_unknown_torchvision_model_before_converting(tmp_path):
    proc = vitq(["coreml-bench", "--models", "demo,torchvision:vit_nope"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("vitq: error: unknown torchvision model 'vit_nope'")
    assert not (tmp_path / "reports").exists()
