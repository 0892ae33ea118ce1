"""The per-model peer API the zoo matrix calls (vitq/experiments/peers.py): `qdq_placement` on a small hand-built
Q/DQ graph, `quantize_peer`'s one-line errors, ModelOpt's "not installed" line without its venv, and (slow, where
`make modelopt` has built .venv-modelopt) ModelOpt and NNCF on a small exported timm ViT."""

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitq.errors import VitqError
from vitq.experiments import peers


def _q_dq(nodes, inits, src: str, tag: str) -> str:
    """src -> QuantizeLinear -> DequantizeLinear (int8, scale 0.1): the DQ output's name."""
    inits += [numpy_helper.from_array(np.array(0.1, np.float32), f"s_{tag}"),
              numpy_helper.from_array(np.array(0, np.int8), f"z_{tag}")]
    nodes += [helper.make_node("QuantizeLinear", [src, f"s_{tag}", f"z_{tag}"], [f"q_{tag}"], name=f"Q_{tag}"),
              helper.make_node("DequantizeLinear", [f"q_{tag}", f"s_{tag}", f"z_{tag}"], [f"dq_{tag}"],
                               name=f"DQ_{tag}")]
    return f"dq_{tag}"


def _int8_weight(nodes, inits, name: str, shape) -> str:
    """An INT8 initializer -> DequantizeLinear: a weight stored as integers."""
    inits += [numpy_helper.from_array(np.ones(shape, np.int8), f"{name}_i8"),
              numpy_helper.from_array(np.array(0.01, np.float32), f"{name}_s")]
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}_i8", f"{name}_s"], [f"{name}_dq"], name=f"DQ_{name}"))
    return f"{name}_dq"


def placement_graph() -> onnx.ModelProto:
    """x (1, 4, 8): q/k/v projections (INT8 weights), scores = q @ k^T with both inputs quantized, softmax,
    probs @ v with probs left float, a float-QDQ weighted out projection, residual Add and LayerNormalization
    fed by DequantizeLinear, a float head (Gemm without Q/DQ)."""
    nodes, inits = [], []
    x = _q_dq(nodes, inits, "x", "x")
    proj = {}
    for p in "qkv":
        w = _int8_weight(nodes, inits, f"w{p}", (8, 8))
        nodes.append(helper.make_node("MatMul", [x, w], [p], name=f"MatMul_{p}"))
        proj[p] = p
    nodes.append(helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="T_k"))
    qa, ka = _q_dq(nodes, inits, "q", "qa"), _q_dq(nodes, inits, "kt", "ka")
    nodes.append(helper.make_node("MatMul", [qa, ka], ["scores"], name="MatMul_scores"))  # attention, INT8
    nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="Softmax"))
    nodes.append(helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="MatMul_ctx"))  # attention, float
    # out projection: float weight through QuantizeLinear (stored FP32), input quantized
    inits.append(numpy_helper.from_array(np.ones((8, 8), np.float32), "wo"))
    wo = _q_dq(nodes, inits, "wo", "wo")
    ctx = _q_dq(nodes, inits, "ctx", "ctx")
    nodes.append(helper.make_node("MatMul", [ctx, wo], ["o"], name="MatMul_o"))
    o = _q_dq(nodes, inits, "o", "o")
    nodes.append(helper.make_node("Add", [x, o], ["res"], name="Add_res"))  # both inputs DQ
    r = _q_dq(nodes, inits, "res", "res")
    inits += [numpy_helper.from_array(np.ones(8, np.float32), "ln_g"),
              numpy_helper.from_array(np.zeros(8, np.float32), "ln_b")]
    nodes.append(helper.make_node("LayerNormalization", [r, "ln_g", "ln_b"], ["ln"], axis=-1, name="LN"))
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "pool_axes"))
    nodes.append(helper.make_node("ReduceMean", ["ln", "pool_axes"], ["pooled"], keepdims=0, name="Pool"))
    inits += [numpy_helper.from_array(np.ones((3, 8), np.float32), "head_w"),
              numpy_helper.from_array(np.zeros(3, np.float32), "head_b")]
    nodes.append(helper.make_node("Gemm", ["pooled", "head_w", "head_b"], ["logits"], transB=1, name="Head"))
    graph = helper.make_graph(nodes, "placement", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_qdq_placement_counts_dq_fed_inputs_by_consumer_and_attention():
    model = placement_graph()
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # a valid, runnable graph
    p = peers.qdq_placement(model)
    assert p["dq_inputs"] == {"Add": 2, "LayerNormalization": 1, "MatMul": 10}, p["dq_inputs"]
    assert p["nodes"]["MatMul"] == {"total": 6, "dq_fed": 5, "all_dq": 5}, p["nodes"]["MatMul"]
    assert p["nodes"]["Add"] == {"total": 1, "dq_fed": 1, "all_dq": 1}
    assert p["nodes"]["LayerNormalization"] == {"total": 1, "dq_fed": 1, "all_dq": 0}  # gamma/beta stay float
    assert p["nodes"]["Softmax"] == {"total": 1, "dq_fed": 0, "all_dq": 0}
    assert p["nodes"]["Gemm"] == {"total": 1, "dq_fed": 0, "all_dq": 0}
    assert (p["attention_matmuls"], p["attention_matmuls_int8"], p["attention_quantized"]) == (2, 1, "some"), p
    assert p["weights"] == {"int8_initializer": 3, "float_qdq": 1}, p["weights"]
    assert p["head_float"] is True
    assert p["quantize_linear"] == 7 and p["dequantize_linear"] == 7 + 3
    import json

    assert json.loads(json.dumps(p)) == p, "JSON-ready (the zoo writes it as is)"


def test_qdq_placement_of_a_float_graph_and_an_all_int8_attention():
    model = placement_graph()
    for n in model.graph.node:  # read probs and v through Q/DQ too: every attention MatMul INT8
        if n.name == "MatMul_ctx":
            n.input[0], n.input[1] = "dq_qa", "dq_ka"
    p = peers.qdq_placement(model)
    assert (p["attention_matmuls"], p["attention_matmuls_int8"], p["attention_quantized"]) == (2, 2, "all")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["x", "xt"], ["y"])],
        "plain", [x], [y]))
    p = peers.qdq_placement(plain)
    assert p["dq_inputs"] == {} and p["attention_quantized"] == "none" and p["head_float"] is True, p


def _tiny_float_model(path):
    """x (1, 2, 3, 3) -> Conv -> Flatten -> Gemm: a float graph ONNX Runtime's quantize_static accepts."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "gw"),
             numpy_helper.from_array(np.zeros(3, np.float32), "gb")]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_quantize_peer_ort_writes_a_qdq_graph_and_times_the_call(tmp_path):
    src = _tiny_float_model(tmp_path / "model.onnx")
    calib = np.random.default_rng(1).standard_normal((4, 2, 3, 3)).astype(np.float32)
    run = peers.quantize_peer("ort", src, calib, tmp_path / "out" / "ort.onnx")
    assert run.error is None and run.seconds is not None and run.seconds >= 0, run
    p = peers.qdq_placement(onnx.load(str(run.out_onnx)))
    assert p["dq_inputs"].get("Conv") and p["dq_inputs"].get("Gemm"), p


def test_quantize_peer_errors_are_one_line(tmp_path):
    calib = np.zeros((2, 2, 3, 3), np.float32)
    run = peers.quantize_peer("ort", tmp_path / "missing.onnx", calib, tmp_path / "ort.onnx")
    assert run.seconds is None and run.error and "\n" not in run.error and run.error.startswith("ort: "), run
    with pytest.raises(VitqError, match="modelopt, nncf, ort"):
        peers.quantize_peer("tflite", tmp_path / "missing.onnx", calib, tmp_path / "x.onnx")


def test_run_modelopt_without_its_venv_says_how_to_install(tmp_path, monkeypatch):
    src = _tiny_float_model(tmp_path / "model.onnx")
    calib = np.zeros((2, 2, 3, 3), np.float32)
    seconds, error = peers.run_modelopt(src, calib, tmp_path / "q.onnx", venv=tmp_path / "no-venv")
    assert (seconds, error) == (None, "not installed: run `make modelopt`")
    monkeypatch.setattr(peers, "MODELOPT_VENV", tmp_path / "no-venv")
    run = peers.quantize_peer("modelopt", src, calib, tmp_path / "q.onnx")
    assert run.error == "not installed: run `make modelopt`" and run.seconds is None
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(VitqError) as exc:  # `vitq peers --peers modelopt`: one line, before any work
        peers.check_peers(["ort", "modelopt"])
    assert "make modelopt" in str(exc.value) and "\n" not in str(exc.value)


def test_modelopt_is_a_registered_peer():
    assert "modelopt" in peers.PEERS and peers.PEERS["modelopt"].call.startswith("modelopt.onnx.quantization.quantize")


# --- slow: the real tools on an exported timm ViT ------------------------------------------------------------------

needs_modelopt = pytest.mark.skipif(peers.modelopt_python() is None,
                                    reason=".venv-modelopt is missing: `make modelopt` builds ModelOpt's venv")


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    """vitq's vit_digits_patch4_32 (random weights, seed 0) exported as vitq exports: model.onnx + model.prep.onnx."""
    import timm
    import torch

    import vitq.tasks.zoo  # noqa: F401: registers vit_digits_patch4_32 with timm
    from vitq.config import ExportConfig
    from vitq.tasks.export import export_model

    torch.manual_seed(0)
    model = timm.create_model("vit_digits_patch4_32").eval()
    x = np.random.default_rng(0).standard_normal((24, 1, 32, 32)).astype(np.float32)
    out = tmp_path_factory.mktemp("peers-vit") / "export"
    export_model(model, x[:4], ExportConfig(), out)
    return out, x[:16], x[16:]


def _check_qdq_on_matmuls(path, validation, prep):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: validation})[0]
    ref = ort.InferenceSession(str(prep), providers=["CPUExecutionProvider"])
    y_ref = ref.run(None, {ref.get_inputs()[0].name: validation})[0]
    sqnr = 10 * np.log10(np.sum(y_ref ** 2) / max(np.sum((y - y_ref) ** 2), 1e-30))
    p = peers.qdq_placement(onnx.load(str(path)))
    assert p["nodes"]["MatMul"]["all_dq"] >= 16, p["nodes"]["MatMul"]  # 4 blocks x (qkv, proj, fc1, fc2)
    return p, sqnr


@pytest.mark.slow
@needs_modelopt
def test_modelopt_peer_quantizes_an_exported_vit(vit_export, tmp_path):
    export, calib, validation = vit_export
    run = peers.quantize_peer("modelopt", export / "model.prep.onnx", calib, tmp_path / "modelopt.onnx")
    assert run.error is None and run.seconds > 0, run
    assert sorted(f.name for f in export.iterdir()) == ["export.json", "model.onnx", "model.prep.onnx"], \
        "ModelOpt's intermediate files stay out of the export folder"
    p, sqnr = _check_qdq_on_matmuls(run.out_onnx, validation, export / "model.prep.onnx")
    assert p["attention_quantized"] == "all" and p["head_float"] is True, p  # ModelOpt's default placement
    assert p["dq_inputs"].get("LayerNormalization"), p
    assert sqnr > 10, f"ModelOpt INT8 logits SQNR {sqnr:.1f} dB"
    # its own failure comes back as one line (a calibration batch of the wrong shape)
    seconds, error = peers.run_modelopt(export / "model.prep.onnx", np.zeros((2, 3, 8, 8), np.float32),
                                        tmp_path / "bad.onnx")
    assert seconds is None and error.startswith("ModelOpt ") and "\n" not in error, error
    assert (tmp_path / "bad.modelopt.log").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("nncf") is None, reason="nncf is not installed: pip install -e '.[nncf]'")
def test_nncf_peer_quantizes_an_exported_vit(vit_export, tmp_path):
    export, calib, validation = vit_export
    run = peers.quantize_peer("nncf", export / "model.prep.onnx", calib, tmp_path / "nncf.onnx")
    assert run.error is None and run.seconds > 0, run
    p, sqnr = _check_qdq_on_matmuls(run.out_onnx, validation, export / "model.prep.onnx")
    assert p["weights"]["int8_initializer"] >= 16, p["weights"]
    assert sqnr > 10, f"NNCF INT8 logits SQNR {sqnr:.1f} dB"
