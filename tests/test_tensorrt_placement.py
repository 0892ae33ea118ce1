"""TensorRT's Q/DQ placement for skip connections (`qdq_placement: tensorrt`, a recipe of one's own: quantize.define).

TensorRT's explicit-quantization guide recommends quantizing the residual input of skip connections so that its GEMM +
residual Add fusion writes INT8; ModelOpt's ONNX PTQ also puts Q/DQ on residual Add and LayerNorm inputs. Checked here
without TensorRT on the embedded ViT (random weights, 4 blocks): where the Q/DQ go, that the graph conforms and converts
to TensorRT's FP16 graph, what the calibration measures, and the SQNR vs FP32 in ONNX Runtime against the default
placement (the measured values in the messages).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitq.config import CalibrationConfig, ExportConfig
from vitq.recipes import derive_recipe, get_recipe as _preset


def get_recipe(name: str):
    """The preset, or the residual-placement recipe as params.yaml defines it."""
    if name == RESIDUAL:
        return derive_recipe(RESIDUAL, {"preset": DEFAULT, "qdq_placement": "tensorrt"})
    return _preset(name)

DEFAULT, RESIDUAL = "tensorrt-w8a8-percentile", "trt-residual"
BLOCKS = 4  # vit_digits_patch4_32: two residual Adds and two LayerNorms per block, then the final norm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The embedded ViT exported (random weights, seed 0), its percentile tables with and without the residual inputs,
    and both placements' Q/DQ graphs (from the table with them)."""
    import timm
    import torch

    import vitq.tasks.zoo  # noqa: F401 - registers vit_digits_patch4_32 with timm
    from vitq.tasks.calibrate import calibrate_inputs
    from vitq.tasks.export import export_model
    from vitq.tasks.targets.onnx.backend import quantize

    root = tmp_path_factory.mktemp("trt_placement")
    torch.manual_seed(0)
    model = timm.create_model("vit_digits_patch4_32").eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 32, 32)).astype(np.float32)
    export_model(model, x[:4], ExportConfig(), root / "export")
    prep = root / "export" / "model.prep.onnx"
    cfg = CalibrationConfig(methods=("percentile",), batch_size=8)
    calibrate_inputs(prep, x, cfg, root / "residual", residual=True)
    calibrate_inputs(prep, x, cfg, root / "plain")
    graphs = {}
    for name in (DEFAULT, RESIDUAL):
        quantize(get_recipe(name), prep, root / f"{name}.onnx", root / "residual" / "percentile.json")
        graphs[name] = onnx.load(str(root / f"{name}.onnx"))
    val = rng.standard_normal((32, 1, 32, 32)).astype(np.float32)
    return {"root": root, "prep": prep, "graphs": graphs, "val": val}


def _dq_readers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Op type -> (node, input index) of every input read from a DequantizeLinear of an activation."""
    inits = {i.name for i in model.graph.initializer}
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits}
    out: dict[str, list] = {}
    for n in model.graph.node:
        for k, i in enumerate(n.input):
            if i in dq:
                out.setdefault(n.op_type, []).append((n, k))
    return out


def test_the_preset_places_qdq_on_each_skip_input_and_the_layernorms_reading_it(tiny):
    base, residual = tiny["graphs"][DEFAULT], tiny["graphs"][RESIDUAL]
    assert "Add" not in _dq_readers(base) and "LayerNormalization" not in _dq_readers(base), \
        "the default placement quantizes only MatMul/Gemm/Conv inputs"
    readers = _dq_readers(residual)
    adds = [n for n, _ in readers.get("Add", [])]
    assert len(adds) == len(set(id(n) for n in adds)) == 2 * BLOCKS, f"one DQ input per residual Add, got {len(adds)}"
    assert len(readers.get("LayerNormalization", [])) == 2 * BLOCKS, "every block's LayerNorm reads the quantized stream"
    producers = {o: n for n in residual.graph.node for o in n.output}
    for add in adds:  # the DQ'd input is the skip (the residual stream), the other the linear's output (bias Add)
        dq_input = next(i for i in add.input if producers[i].op_type == "DequantizeLinear")
        other = next(i for i in add.input if i != dq_input)
        q = producers[producers[dq_input].input[0]]
        assert q.op_type == "QuantizeLinear" and producers[other].op_type == "Add", add.name
        assert any(producers[i].op_type == "MatMul" for i in producers[other].input), f"{add.name}: branch not a linear"
        stream_readers = [n for n in residual.graph.node if dq_input in n.input]
        assert {n.op_type for n in stream_readers} <= {"Add", "LayerNormalization"}, "one pair shared by Add and LayerNorm"
    final_norm = [n for n in residual.graph.node if n.op_type == "LayerNormalization"][-1]
    assert producers[final_norm.input[0]].op_type != "DequantizeLinear", "no residual Add after the final norm: float"


def test_the_residual_graph_conforms_and_converts_to_tensorrts_fp16_graph(tiny):
    from vitq.tasks.conformance import assert_conforms, check_qdq, tensorrt_readiness
    from vitq.tasks.targets.tensorrt import fp16

    model = tiny["graphs"][RESIDUAL]
    assert_conforms(model)
    assert tensorrt_readiness(model) is None
    q = [n for n in model.graph.node if n.name.endswith("_residual_QuantizeLinear")]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert len(q) == 2 * BLOCKS
    assert all(inits[n.input[2]].dtype == np.int8 and inits[n.input[2]] == 0 and inits[n.input[1]] > 0 for n in q), \
        "symmetric int8, zero point 0"
    from onnxruntime.quantization.calibrate import load_tensors_data

    table = load_tensors_data(tiny["root"] / "residual" / "percentile.json").data
    for n in q:  # the scale ORT's quantize_static gives a tensor of that range: max |range| / 127
        amax = max(abs(float(v)) for v in table[n.input[0]].range_value)
        assert np.isclose(float(inits[n.input[1]]), amax / 127, rtol=1e-6), n.name
    assert not check_qdq(model)
    converted, fp32_names, _ = fp16.to_fp16(model)  # raises on a placement violation
    assert not fp16.placement_violations(converted, fp32_names)
    assert sum(n.op_type == "QuantizeLinear" and n.name.endswith("_residual_QuantizeLinear") for n in converted.graph.node) \
        == 2 * BLOCKS, "the residual Q/DQ survive the FP16 conversion"
    assert len(_dq_readers(converted).get("Add", [])) == 2 * BLOCKS


def test_sqnr_vs_fp32_stays_within_a_margin_of_the_default_placement(tiny):
    """Quantizing the residual stream costs accuracy (every block's sum is rounded to int8): measured on this random
    model, 38.7 dB (default) vs 23.6 dB; the margin guards against a wrong scale or wiring (tens of dB more)."""
    from vitq.tasks.targets.onnx.backend import run_batched, session

    x = tiny["val"]
    ref = run_batched(session(str(tiny["prep"])), x, 16)
    sqnr = {}
    for name, model in tiny["graphs"].items():
        y = run_batched(session(model.SerializeToString()), x, 16)
        sqnr[name] = float(10 * np.log10(np.sum(ref**2) / np.sum((ref - y) ** 2)))
    assert _dq_readers(tiny["graphs"][RESIDUAL]).get("Add"), "the residual placement is in place"
    assert sqnr[RESIDUAL] >= 18.0 and sqnr[RESIDUAL] >= sqnr[DEFAULT] - 20.0, \
        f"SQNR vs FP32: {sqnr[RESIDUAL]:.1f} dB with residual Q/DQ, {sqnr[DEFAULT]:.1f} dB without"


def test_calibration_measures_the_skip_inputs_only_when_asked_and_other_recipes_are_unchanged(tiny):
    from onnxruntime.quantization.calibrate import load_tensors_data

    from vitq.errors import VitqError
    from vitq.tasks.targets.onnx.backend import quantize, residual_skip_inputs, weight_gemms

    root, prep = tiny["root"], tiny["prep"]
    model = onnx.load(str(prep))
    skips = set(residual_skip_inputs(model, weight_gemms(model)))
    assert len(skips) == 2 * BLOCKS
    plain = set(load_tensors_data(root / "plain" / "percentile.json").data)
    with_residual = set(load_tensors_data(root / "residual" / "percentile.json").data)
    assert not skips & plain, "the default calibration measures what it did"
    assert with_residual == plain | skips
    quantize(get_recipe(DEFAULT), prep, root / "default-from-plain.onnx", root / "plain" / "percentile.json")
    assert onnx.load(str(root / "default-from-plain.onnx")).graph.SerializeToString() == \
        tiny["graphs"][DEFAULT].graph.SerializeToString(), "the extra ranges change nothing for the default placement"
    with pytest.raises(VitqError, match="residual Add"):
        quantize(get_recipe(RESIDUAL), prep, root / "refused.onnx", root / "plain" / "percentile.json")


def test_float_layers_keep_their_skip_inputs_float(tiny):
    """A residual Add after a linear left in float gets no Q/DQ: TensorRT's fusion needs an INT8 GEMM."""
    from vitq.tasks.targets.onnx.backend import quantize, residual_skip_inputs, weight_gemms

    root, prep = tiny["root"], tiny["prep"]
    model = onnx.load(str(prep))
    producers = {o: n for n in model.graph.node for o in n.output}
    skip, adds = next(iter(residual_skip_inputs(model, weight_gemms(model)).items()))
    add = next(n for n in model.graph.node if n.op_type == "Add" and n.output[0] == adds[0])
    bias = producers[next(i for i in add.input if i != skip)]  # the branch: linear's MatMul -> bias Add
    linear = next(producers[i] for i in bias.input if i in producers and producers[i].op_type == "MatMul")
    quantize(dataclasses.replace(get_recipe(RESIDUAL), name="x"), prep, root / "float-linear.onnx",
             root / "residual" / "percentile.json", exclude_nodes=[linear.name])
    out = onnx.load(str(root / "float-linear.onnx"))
    assert len(_dq_readers(out).get("Add", [])) == 2 * BLOCKS - 1, f"{add.name} after float {linear.name}"


def _graph(nodes, inits, out="y"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_residual_skip_inputs_finds_skip_connections_after_weighted_ops_only():
    from vitq.tasks.targets.onnx.backend import residual_skip_inputs, weight_gemms

    w, b = np.eye(4, dtype=np.float32), np.ones(4, np.float32)
    model = _graph([
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
        helper.make_node("Mul", ["hb", "gamma"], ["hs"], name="layer_scale"),
        helper.make_node("Add", ["x", "hs"], ["r"], name="residual"),  # x + gamma * fc(x): a skip connection
        helper.make_node("Relu", ["r"], ["a"], name="relu"),
        helper.make_node("Add", ["a", "r"], ["u"], name="not_after_a_linear"),  # branch is Relu, not a weighted op
        helper.make_node("MatMul", ["x", "w"], ["p"], name="fc2"),
        helper.make_node("MatMul", ["x", "w"], ["q"], name="fc3"),
        helper.make_node("Add", ["p", "q"], ["s"], name="two_branches"),  # neither input is the other's ancestor
        helper.make_node("Add", ["u", "s"], ["y"], name="out"),
    ], {"w": w, "b": b, "gamma": np.float32(0.5) * b})
    assert residual_skip_inputs(model, weight_gemms(model)) == {"x": ["r"]}  # the Add making r
    assert residual_skip_inputs(model, weight_gemms(model) - {"fc"}) == {}, "after a float linear: no fusion to enable"


def test_conformance_lets_a_layernorm_read_the_quantized_residual_stream_only():
    from vitq.tasks.conformance import check_qdq

    scale, zp = np.float32(0.02), np.int8(0)
    inits = {"s": scale, "z": zp, "w": np.eye(4, dtype=np.float32), "g": np.ones(4, np.float32)}

    def model(with_residual_add: bool):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                 helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
                 helper.make_node("LayerNormalization", ["xd", "g"], ["n"], name="ln", axis=-1)]
        nodes.append(helper.make_node("Add", ["xd", "h"] if with_residual_add else ["x", "h"], ["r"], name="residual"))
        nodes.append(helper.make_node("Add", ["r", "n"], ["y"], name="out"))
        return _graph(nodes, inits)

    assert [v.rule for v in check_qdq(model(False))] == ["float-only-consumer"], "a DQ feeding a LayerNorm alone"
    assert check_qdq(model(True)) == [], "the same pair also feeding the residual Add: TensorRT's fused stream"


def test_the_placement_is_a_checked_recipe_field():
    from vitq.recipes import derive_recipe

    assert get_recipe(DEFAULT).qdq_placement == "weighted" and get_recipe(RESIDUAL).qdq_placement == "tensorrt"
    assert derive_recipe("mine", {"preset": DEFAULT, "qdq_placement": "tensorrt"}).qdq_placement == "tensorrt"
    with pytest.raises(ValueError, match="qdq_placement must be one of weighted, tensorrt"):
        derive_recipe("mine", {"preset": DEFAULT, "qdq_placement": "everything"})


def test_the_calibrate_stage_measures_skip_inputs_only_for_a_defined_recipe_that_places_them():
    from vitq.params import parse_params

    plain = parse_params({})
    assert not plain.quantize.calibrates_residual  # no preset pays for the residual tensors
    defined = parse_params({"quantize": {"define": {RESIDUAL: {"preset": DEFAULT, "qdq_placement": "tensorrt"}},
                                         "recipes": [DEFAULT, RESIDUAL], "carry": {}}})
    assert defined.quantize.calibrates_residual
