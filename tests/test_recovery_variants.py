"""Recovery recipes through the quantize stage on the tiny trained workspace: layer names map to
torch modules, auto mixed precision honours a budget that forces float layers, the calibration
search writes one table, QAT exports a conforming Q/DQ graph; the outlier case end to end (slow)."""

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import tiny_params, workspace_copy
from vitq.tasks import stages
from vitq.tasks.conformance import check_qdq
from vitq.tasks.recovery import float_layers
from vitq.tasks.recovery.layers import quantizable_layers
from vitq.params import parse_params


@pytest.fixture(scope="module")
def ws(staged_workspace, tmp_path_factory):
    return workspace_copy(staged_workspace, tmp_path_factory, "recovery")  # writes variants


def _dq_fed(model: onnx.ModelProto) -> set[str]:
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and set(n.input[:2]) <= dq}


def test_onnx_layers_carry_torch_module_names(ws):
    from vitq.tasks.model import load_model

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


def test_auto_tries_every_cheap_fix_then_the_fewest_layers_float_for_a_tight_budget(ws):
    folder = ws.variants_dir / "onnx-w8a8-auto"
    starts = ["plain", "search", "smoothquant", "smoothquant+search"]
    # The default (recovery.auto_choice: first): the first start within budget wins, the later are never built.
    first = stages.quantize_one(ws, "onnx-w8a8-auto")
    rec = json.loads((folder / "recovery.json").read_text())
    tried = [e["start"] for e in rec["path"] if "skipped" not in e]
    assert [e["start"] for e in rec["path"]] == starts and rec["path"][len(tried) - 1]["met"], rec["path"]
    assert not any(e["met"] for e in rec["path"][:len(tried) - 1]) and rec["start"] == tried[-1]
    assert all("not tried" in e["skipped"] for e in rec["path"][len(tried):])
    assert first.float_layers == [] and rec["budget_met"] and "no later start tried" in rec["stopped"]
    assert ((folder / "torch" / "model.pt").is_file()) == rec["start"].startswith("smoothquant")
    # best_sqnr: every cheap fix is built and judged, the best SQNR within budget wins.
    loose = stages.quantize_one(ws, "onnx-w8a8-auto", parse_params(tiny_params(recovery={"auto_choice": "best_sqnr"})))
    rec = json.loads((folder / "recovery.json").read_text())
    assert [e["start"] for e in rec["path"]] == starts and not any("skipped" in e for e in rec["path"])
    assert loose.float_layers == [] and loose.int8_mac_fraction == 1.0 and rec["budget_met"]
    best = max((e for e in rec["path"] if e["met"]), key=lambda e: e["sqnr_db"])
    assert rec["start"] == best["start"] and "no layer needs float" in rec["stopped"]
    assert rec["search_split"] == "holdout" and rec["held_out"]["split"] == "holdout"
    assert rec["validation"]["images"] == 80 and rec["held_out"]["images"] == 40  # tiny: 120 validation images, a third held out
    # No layer needs float: no ranking is computed (recovery.rank_layers: when_needed), and none is left behind.
    assert rec["ranking"] is None and "not ranked" in rec["ranking_note"] and not (folder / "sensitivity.csv").exists()
    assert ((folder / "torch" / "model.pt").is_file()) == rec["start"].startswith("smoothquant")
    # A budget every start misses by 1 dB: layers go back to float, from the best start, only after all of them.
    p = parse_params(tiny_params(recovery={"min_sqnr_db": round(best["sqnr_db"] + 1.0, 2)}))
    tight = stages.quantize_one(ws, "onnx-w8a8-auto", p)
    rec = json.loads((folder / "recovery.json").read_text())
    assert [e["start"] for e in rec["path"]][:4] == starts and not any(e["met"] for e in rec["path"][:4])
    top = max(rec["path"][:4], key=lambda e: e["sqnr_db"])["start"]
    assert rec["path"][4]["start"] == rec["start"] == top and rec["path"][4]["float_layers"] == tight.float_layers
    assert "float fallback from" in rec["stopped"]
    # The fallback ranked the chosen start's layers: the ranking is recorded with its table and plot.
    assert (folder / "sensitivity.csv").is_file() and (folder / "sensitivity.png").stat().st_size > 1000
    assert sorted(rec["ranking"]) == sorted(["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj",
                                             "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "head"])
    assert rec["budget_met"] and tight.float_layers, rec["evaluations"]
    assert set(tight.float_layers) == set(rec["float_layers"]) == float_layers(folder)
    assert 0.0 < tight.int8_mac_fraction < 1.0
    met = [e for e in rec["evaluations"] if e["met"]]
    assert min(len(e["float_layers"]) for e in met) == len(tight.float_layers), "the smallest passing set is kept"
    model = onnx.load(str(folder / "model.onnx"))
    graph = folder / "float.prep.onnx" if rec["start"].startswith("smoothquant") else ws.export_dir / "model.prep.onnx"
    layers = {layer.name: layer for layer in quantizable_layers(ws.export_dir / "model.onnx", graph)}
    quantized = _dq_fed(model)
    for name, layer in layers.items():
        if layer.weighted:
            assert (layer.nodes[0] in quantized) == (name not in tight.float_layers), name
    assert check_qdq(model) == [] and tight.tensorrt_ready
    assert float_layers(folder, include_attention=True) >= {"blocks.0.attn#qk", "blocks.0.attn#av"}


def test_auto_ranks_the_attention_products_where_the_recipe_quantizes_them(staged_workspace, tmp_path_factory):
    import csv

    ws = workspace_copy(staged_workspace, tmp_path_factory, "attention")  # recalibrates
    p = parse_params(tiny_params(quantize={"define": {"auto-attn": {"preset": "onnx-w8a8-auto", "quantize_attention": True}}},
                                 recovery={"rank_layers": "always"}))
    stages.run_calibrate(ws, p)  # the recipe quantizes attention: calibration measures those MatMuls' inputs too
    stages.quantize_one(ws, "auto-attn", p)
    folder = ws.variants_dir / "auto-attn"
    rows = {r["layer"]: r for r in csv.DictReader((folder / "sensitivity.csv").open())}
    rec = json.loads((folder / "recovery.json").read_text())
    assert {"blocks.0.attn#qk", "blocks.0.attn#av"} <= set(rows) and {"blocks.0.attn#qk", "blocks.0.attn#av"} <= set(rec["ranking"])
    for name in ("blocks.0.attn#qk", "blocks.0.attn#av"):
        r = rows[name]
        assert r["kind"] == "attention" and int(r["macs"]) > 0 and r["weight_only_sqnr_db"] == "nan"
        assert 0 < float(r["quant_only_sqnr_db"]) < 200 and float(r["float_only_sqnr_db"]) > 0, r
    assert sorted(int(r["rank"]) for r in rows.values()) == list(range(1, len(rows) + 1))
    # the plain default keeps them float: no rows for them
    stages.quantize_one(ws, "onnx-w8a8-auto", p)
    plain = {r["layer"] for r in csv.DictReader((ws.variants_dir / "onnx-w8a8-auto" / "sensitivity.csv").open())}
    assert not any("#" in n for n in plain)


def test_calibration_search_writes_one_table_chosen_per_tensor(ws):
    art = stages.quantize_one(ws, "onnx-w8a8-search")
    folder = ws.variants_dir / "onnx-w8a8-search"
    rec = json.loads((folder / "recovery.json").read_text())
    layers = quantizable_layers(ws.export_dir / "model.onnx", ws.export_dir / "model.prep.onnx")
    inputs = {layer.input for layer in layers if layer.weighted}
    assert set(rec["chosen"]) == inputs
    assert {"minmax", "entropy", "mse", "percentile-99.99"} <= set(rec["candidates"])
    assert rec["judged_split"] == "holdout" and rec["held_out"]["split"] == "holdout" and rec["validation"]["images"] == 80
    table = json.loads((folder / "calibration.json").read_text())["data"]
    assert inputs <= set(table)
    assert (folder / "calibration_search.csv").read_text().count("\n") == len(inputs) + 1
    assert art.int8_mac_fraction == 1.0 and art.tensorrt_ready


def test_qat_exports_conforming_qdq_and_torch_weights(ws):
    from vitq.tasks.model import load_model

    p = parse_params(tiny_params(recovery={"qat_epochs": 1, "smoothquant_alphas": [0.5]}))
    art = stages.quantize_one(ws, "onnx-w8a8-qat", p)
    folder = ws.variants_dir / "onnx-w8a8-qat"
    model = onnx.load(str(folder / "model.onnx"))
    assert check_qdq(model) == [] and art.tensorrt_ready and art.int8_mac_fraction == 1.0
    layers = quantizable_layers(ws.export_dir / "model.onnx", ws.export_dir / "model.prep.onnx")
    assert {layer.nodes[0] for layer in layers if layer.weighted} <= _dq_fed(model)
    rec = json.loads((folder / "recovery.json").read_text())
    assert rec["epochs"] == 1 and rec["init"] == "smoothquant" and set(rec["learned_act_amax"])
    assert rec["stopping_split"] == "holdout" and rec["kept_epoch"] == 1 and len(rec["simulated_sqnr_db_by_epoch"]) == 1
    assert {"held_out", "validation"} <= set(rec)
    tuned, _ = load_model(folder / "torch")  # the Core ML target converts these weights
    original, _ = load_model(ws.model_dir)
    assert not torch.equal(tuned.blocks[0].mlp.fc2.weight, original.blocks[0].mlp.fc2.weight)
    stages.run_reference(ws, p)
    res = stages.validate_one(ws, p, "onnx-w8a8-qat")  # error report against the variant's own FP32 model
    assert res.metrics.agreement > 0.8, res.metrics
    assert (folder / "float.prep.onnx").is_file()


@pytest.mark.slow
def test_outliers_in_several_blocks_break_plain_int8_and_auto_keeps_int8(ws, tmp_path):
    from vitq.experiments.recovery_accuracy import CASES, run_case

    p = parse_params(tiny_params())
    case = CASES["outliers_multi"]
    records = {r["variant"]: r for r in run_case(ws, p, case, ["onnx-w8a8-minmax", "onnx-w8a8-auto"])}
    fp32 = records["fp32"]
    assert len(fp32["facts"]["outlier_factors"]) == 2, "norm1 -> qkv and norm2 -> fc1 of the tiny model's block"
    assert fp32["facts"]["fp32_logits_max_abs_change"] < 1e-4 * fp32["facts"]["fp32_logits_max_abs"], "function-preserving"
    plain = records["onnx-w8a8-minmax"]
    assert plain["agreement"] < 0.9, f"plain W8A8 agreement {plain['agreement']:.3f} should break"
    auto = records["onnx-w8a8-auto"]
    assert auto["top1_drop"] <= 0.5 and auto["passed"] and auto["int8_mac_fraction"] >= 0.9, auto
    rec = json.loads((ws.root / "artifacts" / "recovery" / case.name / "variants" / "onnx-w8a8-auto" / "recovery.json").read_text())
    assert rec["start"].startswith("smoothquant") and rec["float_layers"] == [], rec["stopped"]
    assert np.isfinite(plain["sqnr_db"])
