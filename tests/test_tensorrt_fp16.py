"""FP16 graphs for TensorRT's strongly typed builds (issue 13, item 5), checked without TensorRT.

Precision placement is read back with ONNX type inference, independently of the converter: LayerNorm, Softmax and
the reductions (and every op of a written-out LayerNorm) in FP32, every other float op in FP16, Q/DQ scales of the
type of the float side they touch, the INT8 weights untouched. Numerics: ONNX Runtime runs the FP16 graphs on the
trained model's validation images against FP32 (SQNR floors, the measured values in the messages).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import workspace_copy
from vitq.tasks import data, model, stages
from vitq.tasks.variant import variant_dir
from vitq.tasks.targets.tensorrt import backend as trt_backend
from vitq.tasks.targets.tensorrt import fp16 as tensorrt_fp16
from vitq.params import parse_params

FLOAT = {TensorProto.FLOAT, TensorProto.FLOAT16}
KEPT_FP32 = {"LayerNormalization", "Softmax", "ReduceMean"}


@pytest.fixture(scope="module")
def variant(staged_workspace, tmp_path_factory):
    """The percentile Q/DQ graph (the one tensorrt-w8a8-percentile builds from) with its FP16 graph beside it."""
    from conftest import tiny_params

    ws = workspace_copy(staged_workspace, tmp_path_factory, "trt_fp16")
    stages.quantize_one(ws, "onnx-w8a8-percentile", parse_params(tiny_params()))
    folder = variant_dir(ws.variants_dir, "onnx-w8a8-percentile")
    record = trt_backend.write_variant_fp16_graph(folder)
    return ws, folder, record


def _types(m: onnx.ModelProto) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _float_types(m: onnx.ModelProto) -> dict[str, tuple[str, set[int]]]:
    """node name -> (op type, element types of its float inputs and outputs); Casts left out."""
    types = _types(m)
    return {n.name: (n.op_type, {types[t] for t in (*n.input, *n.output) if t and types.get(t) in FLOAT})
            for n in m.graph.node if n.op_type != "Cast"}


def _run(path_or_model, x: np.ndarray) -> np.ndarray:
    blob = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _run_fp16(path_or_model, x: np.ndarray) -> np.ndarray:
    """An FP16 graph's outputs with FP16's rounding and overflow (ONNX Runtime's CPU provider skips them)."""
    m = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    return _run(tensorrt_fp16.fp16_emulation(m), x)


def _sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)))


def test_variant_fp16_graph_keeps_layernorm_softmax_reductions_fp32_and_every_other_float_op_fp16(variant):
    _, folder, record = variant
    qdq, fp16 = onnx.load(str(folder / "model.onnx")), onnx.load(str(folder / trt_backend.FP16_GRAPH))
    placed = _float_types(fp16)
    kept = {name for name, (op, t) in placed.items() if t == {TensorProto.FLOAT}}
    assert {placed[n][0] for n in kept} == KEPT_FP32 and len(kept) == 5, kept  # 3 LayerNorms, 1 Softmax, the pool
    others = {name: t for name, (op, t) in placed.items() if op not in KEPT_FP32 and t}
    assert others and all(t == {TensorProto.FLOAT16} for t in others.values()), \
        {n: t for n, t in others.items() if t != {TensorProto.FLOAT16}}
    assert all(t == {TensorProto.FLOAT} for name, (op, t) in placed.items() if op in KEPT_FP32)
    g = fp16.graph
    assert [i.type.tensor_type.elem_type for i in (*g.input, *g.output)] == [TensorProto.FLOAT, TensorProto.FLOAT]
    # The recorded FP32 nodes are the ones found here; the record sits beside the graph.
    assert sorted(kept) == record.fp32_nodes == json.loads((folder / trt_backend.FP16_RECORD).read_text())["fp32_nodes"]


def test_qdq_scales_are_the_type_their_consumer_needs_and_int8_weights_are_untouched(variant):
    _, folder, record = variant
    qdq, fp16 = onnx.load(str(folder / "model.onnx")), onnx.load(str(folder / trt_backend.FP16_GRAPH))
    types = _types(fp16)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in fp16.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    dq = [n for n in fp16.graph.node if n.op_type == "DequantizeLinear"]
    q = [n for n in fp16.graph.node if n.op_type == "QuantizeLinear"]
    for n in dq:  # FP16 scale, output read by FP16 matmuls/convs
        assert types[n.input[1]] == TensorProto.FLOAT16, n.name
        assert all(types[c.input[list(c.input).index(n.output[0])]] == TensorProto.FLOAT16
                   for c in consumers[n.output[0]]), n.name
    for n in q:
        assert types[n.input[1]] == types[n.input[0]] == TensorProto.FLOAT16, n.name
    source = {n.op_type: 0 for n in qdq.graph.node}
    for n in qdq.graph.node:
        source[n.op_type] += 1
    # Every Q/DQ kept but the INT32 bias dequantizations (Conv and Gemm biases), folded into float constants.
    assert record.folded_bias_dequantize == 2
    assert (len(q), len(dq)) == (source["QuantizeLinear"], source["DequantizeLinear"] - 2)
    int8 = lambda m: {i.name: i.raw_data for i in m.graph.initializer if i.data_type == TensorProto.INT8}  # noqa: E731
    assert int8(fp16) == int8(qdq) and len(int8(qdq)) >= 6


def test_fp16_graphs_match_fp32_in_onnx_runtime(variant, tmp_path):
    ws, folder, _ = variant
    spec = model.load_model_spec(ws.model_dir)
    x = data.model_inputs(data.load_split(ws.data_dir, "validation").images, spec.mean, spec.std)
    fp32 = _run(ws.export_dir / "model.onnx", x)
    baseline = tmp_path / "fp16.onnx"
    tensorrt_fp16.write_fp16_graph(ws.export_dir / "model.onnx", baseline)  # the FP16 baseline's graph
    fp16_db = _sqnr_db(fp32, _run_fp16(baseline, x))
    assert fp16_db >= 50.0, f"FP16 baseline graph vs FP32: SQNR {fp16_db:.1f} dB < 50 dB"
    qdq = _run(folder / "model.onnx", x)
    int8_fp16 = _run_fp16(folder / trt_backend.FP16_GRAPH, x)
    same_db, qdq_db, mixed_db = _sqnr_db(qdq, int8_fp16), _sqnr_db(fp32, qdq), _sqnr_db(fp32, int8_fp16)
    assert same_db >= 40.0, f"INT8+FP16 graph vs the FP32 Q/DQ graph: SQNR {same_db:.1f} dB < 40 dB"
    assert mixed_db >= qdq_db - 1.0, (f"INT8+FP16 graph vs FP32: SQNR {mixed_db:.1f} dB, more than 1 dB under the FP32 "
                                      f"Q/DQ graph's {qdq_db:.1f} dB")


def _decomposed_layernorm_graph(opset: int = 20, rsqrt: bool = False) -> onnx.ModelProto:
    """x (N, 8, 16) -> a LayerNorm written out as ops (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div, or
    Reciprocal + Mul) -> affine -> MatMul -> Softmax (the graph output)."""
    rng = np.random.default_rng(0)
    c = lambda name, a: numpy_helper.from_array(np.asarray(a, np.float32), name)  # noqa: E731
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    tail = ([helper.make_node("Reciprocal", ["std"], ["inv"], name="ln_inv"),
             helper.make_node("Mul", ["d", "inv"], ["norm"], name="ln_div")] if rsqrt else
            [helper.make_node("Div", ["d", "std"], ["norm"], name="ln_div")])
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], name="ln_mean"),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="ln_sub"),
        helper.make_node("Pow", ["d", "two"], ["sq"], name="ln_pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], name="ln_var"),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="ln_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="ln_sqrt"),
        *tail,
        helper.make_node("Mul", ["norm", "gamma"], ["scaled"], name="affine_mul"),
        helper.make_node("Add", ["scaled", "beta"], ["y"], name="affine_add"),
        helper.make_node("MatMul", ["y", "w"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "decomposed_ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 8, 16])],
        [axes, c("two", 2.0), c("eps", 1e-5), c("gamma", rng.uniform(0.5, 1.5, 16)), c("beta", rng.normal(0, 0.1, 16)),
         c("w", rng.normal(0, 0.5, (16, 16)))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("rsqrt", [False, True], ids=["div", "reciprocal"])
def test_a_written_out_layernorm_stays_fp32_whole_and_survives_large_activations(rsqrt):
    src = _decomposed_layernorm_graph(rsqrt=rsqrt)
    out, fp32_names, _ = tensorrt_fp16.to_fp16(src)
    placed = _float_types(out)
    ln = {"ln_mean", "ln_sub", "ln_pow", "ln_var", "ln_eps", "ln_sqrt", "ln_div", *(["ln_inv"] if rsqrt else [])}
    assert {n for n, (_, t) in placed.items() if t == {TensorProto.FLOAT}} == ln | {"softmax"} == fp32_names
    assert all(placed[n][1] == {TensorProto.FLOAT16} for n in ("affine_mul", "affine_add", "fc"))
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT  # Softmax writes the graph output
    # Activations near 300: their squares (9e4) overflow FP16 (max 65504); whole in FP32, the LayerNorm is exact.
    x = np.random.default_rng(1).normal(0, 300, (4, 8, 16)).astype(np.float32)
    ref, got = _run(src, x), _run_fp16(out, x)
    assert np.isfinite(got).all()
    db = _sqnr_db(ref, got)
    assert db >= 40.0, f"written-out LayerNorm graph in FP16 vs FP32 on activations ~300: SQNR {db:.1f} dB < 40 dB"


def test_opset_17_qdq_graph_is_raised_to_19_for_fp16_scales():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 128, (16, 16)).astype(np.int8), "w_q")
    inits = [w, numpy_helper.from_array(np.full(16, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(16, np.int8), "w_zero"),
             numpy_helper.from_array(np.float32(0.05), "x_scale"), numpy_helper.from_array(np.int8(0), "x_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["wd"], name="dq_w", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits)
    src = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, _, _ = tensorrt_fp16.to_fp16(src)
    assert next(o.version for o in out.opset_import if o.domain == "") == 19
    assert {i.name: i.data_type for i in out.graph.initializer}["w_scale"] == TensorProto.FLOAT16
    x = rng.normal(0, 1, (4, 16)).astype(np.float32)
    db = _sqnr_db(_run(src, x), _run_fp16(out, x))
    assert db >= 40.0, f"opset-17 Q/DQ graph in FP16 vs FP32: SQNR {db:.1f} dB < 40 dB"


def test_the_emulation_rounds_and_overflows_as_fp16():
    """x -> Cast(FP16) -> Add(FP16 eps) -> Cast(FP32): ONNX Runtime's CPU provider computes this Add in FP32 and drops
    the casts around it (9e4 stays finite, 1.0001 + 1e-5 keeps FP32's digits); the emulation gives FP16's answer."""
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16, name="to16"),
             helper.make_node("Add", ["h", "eps"], ["s"], name="add"),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT, name="to32")]
    graph = helper.make_graph(nodes, "add16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                              [numpy_helper.from_array(np.array([1e-5], np.float16), "eps")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    x = np.array([9e4, 1.0001, 0.5], np.float32)
    with np.errstate(over="ignore"):  # 9e4 overflows FP16: the point
        want = (x.astype(np.float16) + np.float16(1e-5)).astype(np.float32)  # numpy's FP16 arithmetic: [inf, 1, 0.5]
    assert np.array_equal(_run_fp16(m, x), want), _run_fp16(m, x)


def test_the_check_names_a_layernorm_left_in_fp16():
    from onnxconverter_common import float16

    src = _decomposed_layernorm_graph()
    wrong = float16.convert_float_to_float16(src, keep_io_types=True, op_block_list=[])  # nothing kept in FP32
    problems = tensorrt_fp16.placement_violations(wrong, tensorrt_fp16.fp32_node_names(src))
    assert any("'ln_pow' computes in FLOAT16, wanted FLOAT" in p for p in problems), problems
    assert any("'softmax' computes in FLOAT16" in p for p in problems), problems
    assert tensorrt_fp16.placement_violations(tensorrt_fp16.to_fp16(src)[0], tensorrt_fp16.fp32_node_names(src)) == []


def test_a_shape_cast_to_float_becomes_fp16():
    """The TorchScript exporter computes attention's scale from a shape: Shape -> Gather -> Cast(to=FLOAT) -> Sqrt.
    The converter typed that Cast's output FP16 but kept its `to` (twins, hiera failed the type check); it casts to
    FP16 now, and the graph computes the same."""
    from vitq.tasks.targets.tensorrt import fp16

    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    inits = [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"), numpy_helper.from_array(np.array(1, np.int64), "i")]
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i"], ["d"], name="gather"),
             helper.make_node("Cast", ["d"], ["df"], to=TensorProto.FLOAT, name="scale_cast"),
             helper.make_node("Sqrt", ["df"], ["r"], name="sqrt"),
             helper.make_node("Div", ["x", "r"], ["xs"], name="div"),
             helper.make_node("MatMul", ["xs", "w"], ["y"], name="mm")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x_info], [y_info], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    out, _, _ = fp16.to_fp16(model)
    cast = next(n for n in out.graph.node if n.name == "scale_cast")
    assert cast.attribute[0].i == TensorProto.FLOAT16
    sess = ort.InferenceSession(fp16.fp16_emulation(out).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": np.full((2, 4), 4.0, np.float32)})[0], 2.0)


def test_resize_scales_stay_float():
    """Resize's scales are FLOAT by the ONNX spec; the converter made a constant one FLOAT16 (EfficientFormerV2's
    upsampling failed the FP16 graph's type check). The FP16 graph keeps them FLOAT and computes the same."""
    from vitq.tasks.targets.tensorrt import fp16

    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 2, 2])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 4, 4])
    scales = helper.make_node("Constant", [], ["scales"], name="scales_const",
                              value=numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes = [scales, helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="linear", name="resize"),
             helper.make_node("Relu", ["r"], ["y"], name="relu")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x_info], [y_info]),
                              opset_imports=[helper.make_opsetid("", 17)])
    out, _, _ = fp16.to_fp16(model)
    value = next(a.t for n in out.graph.node if n.name == "scales_const" for a in n.attribute if a.name == "value")
    assert value.data_type == TensorProto.FLOAT
    x = np.arange(16, dtype=np.float32).reshape(2, 2, 2, 2)
    sess = ort.InferenceSession(fp16.fp16_emulation(out).SerializeToString(), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref.run(None, {"x": x})[0], rtol=1e-3)


@pytest.mark.parametrize("fill", [None, 0.5])
def test_a_float_constant_of_shape_fills_fp16(fill):
    """torchvision Swin builds its attention mask with ConstantOfShape and no fill (a FLOAT 0) from a constant shape;
    the converter typed its output FP16 but kept the FLOAT fill (torchvision swin_t's FP16 graph failed the type
    check). It fills FP16 now, and computes the same."""
    from vitq.tasks.targets.tensorrt import fp16

    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    value = {} if fill is None else {"value": numpy_helper.from_array(np.array([fill], np.float32), "v")}
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["z"], name="zeros", **value),
             helper.make_node("Add", ["x", "z"], ["y"], name="add")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x_info], [y_info],
                                                [numpy_helper.from_array(np.array([2, 4], np.int64), "shape")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    out, _, _ = fp16.to_fp16(model)
    written = next(a.t for n in out.graph.node if n.name == "zeros" for a in n.attribute if a.name == "value")
    assert written.data_type == TensorProto.FLOAT16
    sess = ort.InferenceSession(fp16.fp16_emulation(out).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": np.ones((2, 4), np.float32)})[0], 1 + (fill or 0))
