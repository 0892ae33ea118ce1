import csv
import math
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import tiny_params, workspace_copy
from vitq.tasks import error_report, stages
from vitq.params import parse_params


@pytest.fixture(scope="module")
def ws(staged_workspace, tmp_path_factory):
    return workspace_copy(staged_workspace, tmp_path_factory, "error_report")  # writes variants and reports


def _qdq_tensors_by_position(qdq: onnx.ModelProto, float_model: onnx.ModelProto) -> set[tuple[str, str]]:
    """(kind, tensor) of every Q/DQ-quantized tensor, found without the report's code or ORT's names:
    activations are what QuantizeLinear nodes read; a weight is the float initializer that the same
    node of the FP32 model reads where the Q/DQ graph reads a quantized constant."""
    inits = {i.name for i in qdq.graph.initializer}
    float_nodes = {n.name: n for n in float_model.graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in qdq.graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    out = set()
    for n in qdq.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            out.add(("activation", n.input[0]))
        elif n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] in inits:
            dq_outputs = [n.output[0]] if n.op_type == "DequantizeLinear" else [d.output[0] for d in readers[n.output[0]]]
            for dq_out in dq_outputs:
                for user in readers[dq_out]:
                    out.add(("weight", float_nodes[user.name].input[list(user.input).index(dq_out)]))
    return out


def _input_shape(model: onnx.ModelProto) -> list[int]:
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]


def test_report_covers_every_qdq_tensor_of_the_variant(ws):
    p = parse_params(tiny_params())
    stages.run_reference(ws, p)
    art = stages.quantize_one(ws, "onnx-w8a8-minmax")
    assert art.artifact == "model.ort.onnx", "the served form differs from the Q/DQ graph the report reads"
    stages.validate_one(ws, p, "onnx-w8a8-minmax")
    rows = list(csv.DictReader(ws.error_report_for("onnx-w8a8-minmax")[0].open()))
    folder = ws.variants_dir / "onnx-w8a8-minmax"
    expected = _qdq_tensors_by_position(onnx.load(str(folder / art.qdq_artifact)),
                                        onnx.load(str(ws.export_dir / "model.prep.onnx")))
    reported = {(r["kind"], r["tensor"]) for r in rows}
    assert len(reported) == len(rows), "one row per tensor"
    assert reported == expected, f"missing {sorted(expected - reported)}, extra {sorted(reported - expected)}"
    sqnr = [float(r["qdq_sqnr_db"]) for r in rows]
    assert sqnr == sorted(sqnr), "worst first"
    assert all(math.isfinite(s) and s > 10 for s in sqnr), f"worst tensor SQNR {sqnr[0]:.1f} dB"
    vs_fp32 = [float(r["vs_fp32_sqnr_db"]) for r in rows if r["kind"] == "activation"]
    assert all(math.isfinite(s) and s > 10 for s in vs_fp32), f"activation vs FP32 SQNR {min(vs_fp32):.1f} dB"


def test_fp32_activations_are_recorded_once_per_float_reference(ws, tmp_path, monkeypatch):
    p = parse_params(tiny_params())
    stages.run_reference(ws, p)
    names = ["onnx-w8a8-minmax", "onnx-w8a8-percentile"]
    for name in names:
        stages.quantize_one(ws, name)
    monkeypatch.setattr(error_report, "_memo", OrderedDict())
    recorded, lock, record = [], threading.Lock(), error_report._record

    def counting_record(path, images, batch_size):
        with lock:
            recorded.append(path.resolve())
        return record(path, images, batch_size)

    monkeypatch.setattr(error_report, "_record", counting_record)
    with ThreadPoolExecutor(2) as pool:  # as the flow runs variants: concurrently, in threads
        list(pool.map(lambda n: stages.validate_one(ws, p, n), names))
    float_ref = (ws.export_dir / "model.prep.onnx").resolve()
    assert recorded.count(float_ref) == 1, recorded
    assert len(recorded) == 1 + len(names), "each variant's Q/DQ graph is recorded"

    # Keyed by the file's content: a rewritten model is recorded again, never served from memory.
    model = onnx.load(str(float_ref))
    path = tmp_path / "float.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(0).standard_normal((4, *_input_shape(model))).astype(np.float32)
    first = error_report.float_activations(path, x)
    assert error_report.float_activations(path, x) is first and recorded.count(path.resolve()) == 1
    init = model.graph.initializer[0]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))
    onnx.save(model, str(path))
    second = error_report.float_activations(path, x)
    assert recorded.count(path.resolve()) == 2 and second is not first


def test_both_weight_patterns_are_measured():
    """An int8 per-channel weight read by DequantizeLinear alone (ORT's quantizer), and a float weight
    behind Q -> DQ (which ORT's `create_weight_matching` skips)."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float32)
    s1 = np.abs(w1).max(0) / 127  # per output channel (axis 1 of MatMul's B)
    s2 = np.float32(np.abs(w2).max() / 127)
    w1_q = np.clip(np.rint(w1 / s1), -128, 127).astype(np.int8)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    float_model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")],
        "f", [x], [y], [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    ))
    zp = numpy_helper.from_array(np.zeros(3, np.int8), "zp1")
    qdq_model = helper.make_model(helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w1_quantized", "s1", "zp1"], ["w1_dq"], axis=1),
         helper.make_node("MatMul", ["x", "w1_dq"], ["h"], name="mm1"),
         helper.make_node("QuantizeLinear", ["w2", "s2", "zp2"], ["w2_q"]),
         helper.make_node("DequantizeLinear", ["w2_q", "s2", "zp2"], ["w2_dq"]),
         helper.make_node("MatMul", ["h", "w2_dq"], ["y"], name="mm2")],
        "q", [x], [y],
        [numpy_helper.from_array(w1_q, "w1_quantized"), numpy_helper.from_array(s1, "s1"), zp,
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.array(s2), "s2"),
         numpy_helper.from_array(np.array(0, np.int8), "zp2")],
    ))
    assert _qdq_tensors_by_position(qdq_model, float_model) == {("weight", "w1"), ("weight", "w2")}
    errors = error_report.weight_errors(float_model, qdq_model)
    assert set(errors) == {"w1", "w2"}
    for name, w, deq in (("w1", w1, w1_q * s1), ("w2", w2, np.clip(np.rint(w2 / s2), -128, 127) * s2)):
        want = 20 * np.log10(np.linalg.norm(w) / np.linalg.norm(w - deq))
        assert abs(errors[name] - want) < 1e-3, f"{name}: {errors[name]:.3f} dB, expected {want:.3f} dB"
