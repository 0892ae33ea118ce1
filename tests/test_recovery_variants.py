"""Recovery recipes through the quantize stage on the tiny trained workspace: layer names map to
torch modules, auto mixed precision honours a budget that forces float layers, the calibration
search writes one table, QAT exports a conforming Q/DQ graph; the outlier case end to end (slow)."""

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import tiny_params, workspace_copy
from tasks import stages
from tasks.conformance import check_qdq
from tasks.recovery import float_layers
from tasks.recovery.layers import quantizable_layers
from vitq.config import parse_params


@pytest.fixture(scope="module")
def ws(staged_workspace, tmp_path_factory):
    return workspace_copy(staged_workspace, tmp_path_factory, "recovery")  # writes variants


def _dq_fed(model: onnx.ModelProto) -> set[str]:
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and set(n.input[:2]) <= dq}


def test_onnx_layers_carry_torch_module_names(ws):
    from tasks.model import load_model

    layers = quantizable_layers(ws.export_dir / "model.onnx", ws.export_dir / "model.prep.onnx")
    names = [layer.name for layer in layers]
    assert names == ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn#qk", "blocks.0.attn#av",
                     "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "head"]
    modules = dict(load_model(ws.model_dir)[0].named_modules())
    for layer in layers:
        module = layer.name.split("#")[0]
        assert module in modules, layer.name
        assert layer.macs > 0 and len(layer.nodes) == 1
    qkv = next(layer for layer in layers if layer.name == "blocks.0.attn.qkv")
    assert qkv.macs == 64 * 32 * 96  # tokens x in x out per image


def test_auto_mixed_precision_keeps_the_fewest_layers_float_for_a_tight_budget(ws):
    loose = stages.quantize_one(ws, "onnx-w8a8-auto")
    folder = ws.variants_dir / "onnx-w8a8-auto"
    rec = json.loads((folder / "recovery.json").read_text())
    assert loose.float_layers == [] and loose.int8_mac_fraction == 1.0 and rec["budget_met"]
    assert (folder / "sensitivity.csv").is_file() and (folder / "sensitivity.png").stat().st_size > 1000
    assert sorted(rec["ranking"]) == sorted(["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj",
                                             "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "head"])
    full_int8_sqnr = rec["evaluations"][0]["sqnr_db"]
    # A budget full INT8 misses by 1 dB: some layers must go back to float, and no more than needed.
    p = parse_params(tiny_params(recovery={"min_sqnr_db": round(full_int8_sqnr + 1.0, 2)}))
    tight = stages.quantize_one(ws, "onnx-w8a8-auto", p)
    rec = json.loads((folder / "recovery.json").read_text())
    assert rec["budget_met"] and tight.float_layers, rec["evaluations"]
    assert set(tight.float_layers) == set(rec["float_layers"]) == float_layers(folder)
    assert 0.0 < tight.int8_mac_fraction < 1.0
    met = [e for e in rec["evaluations"] if e["met"]]
    assert min(len(e["float_layers"]) for e in met) == len(tight.float_layers), "the smallest passing set is kept"
    model = onnx.load(str(folder / "model.onnx"))
    layers = {layer.name: layer for layer in quantizable_layers(ws.export_dir / "model.onnx", ws.export_dir / "model.prep.onnx")}
    quantized = _dq_fed(model)
    for name, layer in layers.items():
        if layer.weighted:
            assert (layer.nodes[0] in quantized) == (name not in tight.float_layers), name
    assert check_qdq(model) == [] and tight.tensorrt_ready
    assert float_layers(folder, include_attention=True) >= {"blocks.0.attn#qk", "blocks.0.attn#av"}


def test_calibration_search_writes_one_table_chosen_per_tensor(ws):
    art = stages.quantize_one(ws, "onnx-w8a8-search")
    folder = ws.variants_dir / "onnx-w8a8-search"
    rec = json.loads((folder / "recovery.json").read_text())
    layers = quantizable_layers(ws.export_dir / "model.onnx", ws.export_dir / "model.prep.onnx")
    inputs = {layer.input for layer in layers if layer.weighted}
    assert set(rec["chosen"]) == inputs
    assert {"minmax", "entropy", "mse", "percentile-99.99"} <= set(rec["candidates"])
    table = json.loads((folder / "calibration.json").read_text())["data"]
    assert inputs <= set(table)
    assert (folder / "calibration_search.csv").read_text().count("\n") == len(inputs) + 1
    assert art.int8_mac_fraction == 1.0 and art.tensorrt_ready


def test_qat_exports_conforming_qdq_and_torch_weights(ws):
    from tasks.model import load_model

    p = parse_params(tiny_params(recovery={"qat_epochs": 1, "smoothquant_alphas": [0.5]}))
    art = stages.quantize_one(ws, "onnx-w8a8-qat", p)
    folder = ws.variants_dir / "onnx-w8a8-qat"
    model = onnx.load(str(folder / "model.onnx"))
    assert check_qdq(model) == [] and art.tensorrt_ready and art.int8_mac_fraction == 1.0
    layers = quantizable_layers(ws.export_dir / "model.onnx", ws.export_dir / "model.prep.onnx")
    assert {layer.nodes[0] for layer in layers if layer.weighted} <= _dq_fed(model)
    rec = json.loads((folder / "recovery.json").read_text())
    assert rec["epochs"] == 1 and rec["init"] == "smoothquant" and set(rec["learned_act_amax"])
    tuned, _ = load_model(folder / "torch")  # the Core ML target converts these weights
    original, _ = load_model(ws.model_dir)
    assert not torch.equal(tuned.blocks[0].mlp.fc2.weight, original.blocks[0].mlp.fc2.weight)
    stages.run_reference(ws, p)
    res = stages.validate_one(ws, p, "onnx-w8a8-qat")  # error report against the variant's own FP32 model
    assert res.metrics.agreement > 0.8, res.metrics
    assert (folder / "float.prep.onnx").is_file()


@pytest.mark.slow
def test_outlier_case_breaks_plain_int8_and_recovery_brings_it_back(ws, tmp_path):
    from vitq.experiments.recovery_accuracy import CASES, run_case

    p = parse_params(tiny_params())
    records = {r["variant"]: r for r in run_case(ws, p, CASES["outliers"],
                                                 ["onnx-w8a8-minmax", "onnx-w8a8-auto", "onnx-w8a8-smoothquant"])}
    fp32 = records["fp32"]
    assert fp32["facts"]["fp32_logits_max_abs_change"] < 1e-3, "the transform is function-preserving"
    plain = records["onnx-w8a8-minmax"]
    assert plain["agreement"] < 0.9, f"plain W8A8 agreement {plain['agreement']:.3f} should break"
    for name in ("onnx-w8a8-auto", "onnx-w8a8-smoothquant"):
        r = records[name]
        assert r["top1_drop"] <= 0.5 and r["passed"], r
    assert records["onnx-w8a8-auto"]["float_layers"] == ["blocks.0.attn.qkv"]
    assert records["onnx-w8a8-smoothquant"]["int8_mac_fraction"] == 1.0
    assert np.isfinite(plain["sqnr_db"])
