import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import tiny_params, workspace_copy
from vitq.tasks import stages
from vitq.tasks.calibrate import table_path
from vitq.params import parse_params


@pytest.fixture(scope="module")
def ws(staged_workspace, tmp_path_factory):
    return workspace_copy(staged_workspace, tmp_path_factory, "quantize")  # writes variants


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_calibration_writes_one_table_per_method_from_one_pass(ws):
    meta = json.loads((ws.calibration_dir / "calibration.json").read_text())
    assert meta["methods"] == ["minmax", "percentile", "entropy"] and meta["tensors"] > 0
    tables = {m: json.loads(table_path(ws.calibration_dir, m).read_text())["data"] for m in meta["methods"]}
    assert tables["minmax"].keys() == tables["percentile"].keys() == tables["entropy"].keys()
    hi = lambda t, name: abs(float(t[name]["highest"]["data"]))  # noqa: E731
    # Percentile/entropy clip: their range never exceeds min/max's.
    for name in tables["minmax"]:
        assert hi(tables["percentile"], name) <= hi(tables["minmax"], name) + 1e-6


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_static_variant_is_symmetric_per_channel_qdq_from_its_table(ws, method):
    art = stages.quantize_one(ws, f"onnx-w8a8-{method}")
    model = onnx.load(str(ws.variants_dir / art.name / "model.onnx"))
    inits = _inits(model)
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert q and dq and art.int8_weight_fraction == 1.0
    assert art.tensorrt_ready and art.tensorrt_note is None
    for node in q + dq:
        scale, zp = inits[node.input[1]], inits[node.input[2]]
        # int8 everywhere, except int32 biases (DequantizeLinear only), all symmetric.
        allowed = (np.int8,) if node.op_type == "QuantizeLinear" else (np.int8, np.int32)
        assert zp.dtype in allowed and not zp.any(), f"{node.name}: zero point {zp.dtype} {zp}"
        assert np.all(scale > 0) and np.all(np.isfinite(scale)), node.name
    per_channel = [n for n in dq if inits[n.input[1]].ndim == 1 and inits[n.input[1]].size > 1]
    assert per_channel, "weights must carry per-channel scales"
    # The activation scale of the first MatMul input is its table range / 127 (symmetric int8).
    table = json.loads(table_path(ws.calibration_dir, method).read_text())["data"]
    for node in q:
        if node.input[0] in table:
            t = table[node.input[0]]
            amax = max(abs(float(t["lowest"]["data"])), abs(float(t["highest"]["data"])))
            assert np.isclose(float(inits[node.input[1]]), amax / 127, rtol=1e-5), node.input[0]
            break
    else:
        pytest.fail("no activation QuantizeLinear reads a calibrated tensor")


def test_dynamic_variant_quantizes_activations_at_run_time(ws):
    art = stages.quantize_one(ws, "onnx-w8-dynamic")
    assert art.op_counts.get("DynamicQuantizeLinear", 0) > 0 and art.op_counts.get("MatMulInteger", 0) > 0
    assert art.int8_weight_fraction == 1.0 and art.calibration_table is None
    assert not art.tensorrt_ready and "DynamicQuantizeLinear" in art.tensorrt_note


def test_variants_stay_close_to_fp32(ws):
    p = parse_params(tiny_params())
    stages.run_reference(ws, p)
    for recipe in ("onnx-w8-dynamic", "onnx-w8a8-minmax"):
        stages.quantize_one(ws, recipe)
        res = stages.validate_one(ws, p, recipe)
        assert res.metrics.sqnr_db > 20, f"{recipe}: SQNR {res.metrics.sqnr_db:.1f} dB"
        assert res.metrics.agreement > 0.9, f"{recipe}: agreement {res.metrics.agreement:.3f}"


def test_attention_matmuls_are_quantized_by_the_static_presets_and_float_when_a_recipe_says(staged_workspace, tmp_path_factory):
    from vitq.tasks.targets.onnx.backend import activation_matmuls
    from vitq.tasks.conformance import check_qdq

    ws = workspace_copy(staged_workspace, tmp_path_factory, "attention")  # recalibrates
    prep = onnx.load(str(ws.export_dir / "model.prep.onnx"))
    attn = set(activation_matmuls(prep))
    assert len(attn) == 2  # q @ k^T and attn @ v in the one block of the tiny model

    def quantized_attention(name):
        model = onnx.load(str(ws.variants_dir / name / "model.onnx"))
        dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
        return model, sorted(n.name for n in model.graph.node if n.name in attn and set(n.input[:2]) <= dq_out)

    art = stages.quantize_one(ws, "onnx-w8a8-minmax")
    model, quantized = quantized_attention(art.name)
    assert quantized == sorted(attn)
    assert check_qdq(model) == [] and art.tensorrt_ready
    p = parse_params(tiny_params(quantize={"define": {"attn-float": {"preset": "onnx-w8a8-minmax", "quantize_attention": False}}}))
    stages.quantize_one(ws, "attn-float", p)
    assert quantized_attention("attn-float")[1] == []


def test_attention_probabilities_keep_their_observed_range_in_every_table(ws):
    """Softmax outputs (attention probabilities) get the minmax range in the percentile and entropy tables too:
    clipping the few large probabilities cuts the attention itself."""
    from vitq.tasks.calibrate import attention_probabilities

    tables = {m: json.loads(table_path(ws.calibration_dir, m).read_text())["data"] for m in ("minmax", "percentile", "entropy")}
    probs = attention_probabilities(ws.export_dir / "model.prep.onnx", tables["minmax"])
    assert len(probs) == 1  # the tiny model's one block
    for name in probs:
        assert tables["percentile"][name] == tables["entropy"][name] == tables["minmax"][name]
    others = [t for t in tables["minmax"] if t not in probs]
    assert any(tables["entropy"][t] != tables["minmax"][t] for t in others), "the other tensors keep their method's range"


def test_error_report_ranks_every_quantized_tensor(ws):
    import csv

    p = parse_params(tiny_params())
    stages.run_reference(ws, p)
    stages.quantize_one(ws, "onnx-w8a8-percentile")
    stages.validate_one(ws, p, "onnx-w8a8-percentile")
    csv_path, png_path = ws.error_report_for("onnx-w8a8-percentile")
    rows = list(csv.DictReader(csv_path.open()))
    assert png_path.stat().st_size > 1000
    kinds = {r["kind"] for r in rows}
    assert kinds == {"activation", "weight"}
    sqnr = [float(r["qdq_sqnr_db"]) for r in rows]
    assert sqnr == sorted(sqnr), "worst first"
    assert all(s > 10 for s in sqnr), f"worst tensor SQNR {sqnr[0]:.1f} dB"


def test_ort_serving_form_fuses_bias_and_keeps_outputs(ws):
    """A static variant with float attention (a recipe's quantize_attention: false): every linear on
    MatMulIntegerToFloat with its bias, the patch embedding too, attention as one MultiHeadAttention; the same
    outputs as the Q/DQ graph (the patch embedding's tokens differ only in float rounding)."""
    from vitq.tasks.targets.onnx.backend import run_batched, session

    p = parse_params(tiny_params(quantize={"define": {"pct-float-attn": {"preset": "onnx-w8a8-percentile", "quantize_attention": False}}}))
    art = stages.quantize_one(ws, "pct-float-attn", p)
    assert art.artifact == "model.ort.onnx" and art.qdq_artifact == "model.onnx"
    folder = ws.variants_dir / art.name
    served = onnx.load(str(folder / art.artifact))
    fused = [n for n in served.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 5 and all(len(n.input) == 7 for n in fused), "patch embedding, qkv, proj, fc1, fc2 with biases"
    ops = [n.op_type for n in served.graph.node]
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops and "Conv" not in ops, ops
    assert ops.count("Transpose") == 1, ops  # the int8 patches' only
    from vitq.tasks.data import load_split, model_inputs
    from vitq.tasks.model import load_model_spec

    spec = load_model_spec(ws.model_dir)
    x = model_inputs(load_split(ws.data_dir, "validation").images[:32], spec.mean, spec.std)
    a = run_batched(session(folder / "model.onnx"), x, 8)
    b = run_batched(session(folder / art.artifact), x, 8)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * np.abs(a).max())


def test_patch_embedding_rewrite_is_the_same_gemm_and_its_guard_catches_a_wrong_patch_order(ws):
    from vitq.tasks.targets.onnx.backend import assert_same_at, int8_patch_embedding, ort_serving_form

    art = stages.quantize_one(ws, "onnx-w8a8-percentile")
    serving, _ = ort_serving_form(onnx.load(str(ws.variants_dir / art.name / "model.onnx")))
    assert "Conv" in {n.op_type for n in serving.graph.node}, "ORT's own form: a float Conv on dequantized values"
    patched, tokens = int8_patch_embedding(serving)
    assert len(tokens) == 1 and "Conv" not in {n.op_type for n in patched.graph.node}
    assert_same_at(serving, patched, tokens[0])
    order = next(n for n in patched.graph.node if n.name.endswith("_patch_Transpose"))
    del order.attribute[:]
    order.attribute.append(onnx.helper.make_attribute("perm", [0, 2, 4, 1, 5, 3]))  # kh and kw swapped
    with pytest.raises(RuntimeError, match="rewrite is wrong"):
        assert_same_at(serving, patched, tokens[0])


def test_attention_fusion_serves_dynamic_too_and_its_guard_catches_miswiring(ws):
    """The dynamic variant is served with the same attention kernel as the static one (a fair static-vs-dynamic
    latency), and the guard fails a fused graph whose q and k are swapped."""
    from vitq.tasks.targets.onnx.backend import assert_same_at, fuse_attention

    art = stages.quantize_one(ws, "onnx-w8-dynamic")
    folder = ws.variants_dir / art.name
    assert art.artifact == "model.ort.onnx"
    qdq = onnx.load(str(folder / "model.onnx"))
    served = onnx.load(str(folder / art.artifact))
    assert [n.op_type for n in served.graph.node].count("MultiHeadAttention") == 1
    assert "MultiHeadAttention" not in {n.op_type for n in qdq.graph.node}, "the portable file keeps standard ops"
    fused, blocks = fuse_attention(qdq)
    assert len(blocks) == 1
    assert_same_at(qdq, fused, blocks[0])
    mha = next(x for x in fused.graph.node if x.op_type == "MultiHeadAttention")
    mha.input[0], mha.input[1] = mha.input[1], mha.input[0]
    with pytest.raises(RuntimeError, match="rewrite is wrong"):
        assert_same_at(qdq, fused, blocks[0])


def test_quantized_attention_is_served_on_int8_kernels_with_the_qdq_graphs_numerics(staged_workspace, tmp_path_factory):
    """The static presets quantize attention's products (Q/DQ on q*c, k^T*c, the softmax output and v): the served form
    computes them on int8 kernels (no float attention MatMul, no MultiHeadAttention, q/k/v each from its own int8
    projection, probs @ v writing the output projection's u8 input), with the Q/DQ graph's integers: the same
    predictions and logits within a rounding step's effect. Its guard fails a graph whose q reads v's weights."""
    from vitq.tasks.targets.onnx.backend import assert_same_at, fuse_attention, ort_serving_form, run_batched, session
    from vitq.tasks.data import load_split, model_inputs
    from vitq.tasks.model import load_model_spec

    ws = workspace_copy(staged_workspace, tmp_path_factory, "int8-attention")
    art = stages.quantize_one(ws, "onnx-w8a8-percentile")  # the default static recipe quantizes attention
    folder = ws.variants_dir / art.name
    assert art.artifact == "model.ort.onnx"
    served = onnx.load(str(folder / art.artifact))
    ops = [n.op_type for n in served.graph.node]
    assert "MultiHeadAttention" not in ops and "MatMul" not in ops and "Split" not in ops, ops
    assert ops.count("QLinearMatMul") == 1 and ops.count("Softmax") == 1, ops
    # q @ k^T: MatMulIntegerToFloat on the two int8 head tensors; the projections and k, v: MatMulIntegerToFloat too
    assert ops.count("MatMulIntegerToFloat") == 8, ops  # patches, q, k, v projections, q @ k^T, proj, fc1, fc2
    spec = load_model_spec(ws.model_dir)
    x = model_inputs(load_split(ws.data_dir, "validation").images[:64], spec.mean, spec.std)
    a = run_batched(session(folder / "model.onnx"), x, 16)
    b = run_batched(session(folder / art.artifact), x, 16)
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.98
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max(), np.abs(a - b).max()

    qdq = onnx.load(str(folder / "model.onnx"))
    serving, _ = ort_serving_form(qdq)
    fused, blocks = fuse_attention(serving)
    assert len(blocks) == 1 and blocks[0].endswith("_quantized_u8"), blocks  # the projection's u8 input, as served
    assert_same_at(serving, fused, blocks[0])
    q_proj, v_proj = (next(n for n in fused.graph.node if n.name.endswith(f"_{p}_MatMulIntegerToFloat")) for p in "qv")
    q_proj.input[1], v_proj.input[1] = v_proj.input[1], q_proj.input[1]
    with pytest.raises(RuntimeError, match="rewrite is wrong"):
        assert_same_at(serving, fused, blocks[0])


def test_int8_attention_from_a_float_projection_splits_scales_and_quantizes_as_the_qdq_graph(ws):
    """The Q/DQ graph itself (its qkv from a float MatMul + Add, its attention output quantized to s8): the int8
    path splits qkv, scales and quantizes q, k, v as the graph does, and computes probs @ v as a float output
    (MatMulIntegerToFloat) for the graph's own Transpose/Reshape; the output matches the Q/DQ graph's."""
    from vitq.tasks.targets.onnx.backend import assert_same_at, fuse_attention

    art = stages.quantize_one(ws, "onnx-w8a8-percentile")
    qdq = onnx.load(str(ws.variants_dir / art.name / "model.onnx"))
    fused, blocks = fuse_attention(qdq)
    ops = [n.op_type for n in fused.graph.node]
    assert len(blocks) == 1 and ops.count("Split") == 1 and "QLinearMatMul" not in ops, ops
    assert "MultiHeadAttention" not in ops
    int8 = [n.input[0] for n in fused.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert sum(i.endswith("_i8_bnsh") for i in int8) == 1 and sum("_probs_u8" in i for i in int8) == 1, int8
    assert_same_at(qdq, fused, blocks[0])
