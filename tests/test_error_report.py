import csv
import math

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


def _chain(n: int = 6, width: int = 256 * 256) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(FP32, Q/DQ) graphs of `n` chained Mul-by-constant nodes on (N, width) float tensors, each Mul's input behind
    a Q/DQ pair in the second: per image, n tensors of width floats to measure, in each graph."""
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])
    inits = [numpy_helper.from_array(np.array(1.01, np.float32), "k"), numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    fnodes, qnodes, prev = [], [], "pixels"
    for i in range(n):
        out = "y" if i == n - 1 else f"t{i}"
        fnodes.append(helper.make_node("Mul", [prev, "k"], [out], name=f"mul{i}"))
        qnodes += [helper.make_node("QuantizeLinear", [prev, "s", "z"], [f"q{i}"]),
                   helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"dq{i}"]),
                   helper.make_node("Mul", [f"dq{i}", "k"], [out], name=f"mul{i}")]
        prev = out
    make = lambda nodes: helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),  # noqa: E731
                                           opset_imports=[helper.make_opsetid("", 17)])
    return make(fnodes), make(qnodes)


def test_streamed_report_matches_onnxruntimes_sqnr_over_all_images(tmp_path):
    """Streaming (sums per batch) gives what ORT's qdq_loss_debug gives on every tensor of every image at once."""
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio as sqnr

    fmodel, qmodel = _chain(3, 64)
    onnx.save(fmodel, str(tmp_path / "f.onnx")), onnx.save(qmodel, str(tmp_path / "q.onnx"))
    x = np.random.default_rng(0).standard_normal((10, 64)).astype(np.float32)
    rows = error_report.tensor_errors(tmp_path / "f.onnx", tmp_path / "q.onnx", x, batch_size=3)
    assert {r["tensor"] for r in rows} == {"pixels", "t0", "t1"}
    f = [x, x * np.float32(1.01), x * np.float32(1.01) * np.float32(1.01)]
    q, cur = [], x
    for _ in range(3):  # each tensor of the Q/DQ graph and its value after the pair
        dq = np.clip(np.rint(cur / np.float32(0.02)), -128, 127).astype(np.float32) * np.float32(0.02)
        q.append((cur, dq))
        cur = dq * np.float32(1.01)
    for r, name in zip(sorted(rows, key=lambda r: r["tensor"]), ["pixels", "t0", "t1"]):
        i = ["pixels", "t0", "t1"].index(name)
        assert r["qdq_sqnr_db"] == pytest.approx(sqnr(q[i][0], q[i][1]), abs=1e-4)  # ORT sums in float32
        assert r["vs_fp32_sqnr_db"] == pytest.approx(sqnr(f[i], q[i][1]), abs=1e-4)


def test_report_memory_stays_within_its_budget_whatever_the_images(tmp_path, budget=16 << 20):
    """64 images x 18 tensors (12 of the Q/DQ graph, 6 of the FP32 one) x 256 KB: 288 MB held at once before;
    through a 16 MB budget the process's peak RSS (the kernel's, in a child process) grows by far less."""
    import subprocess
    import sys
    import textwrap

    fmodel, qmodel = _chain(6, 256 * 256)
    onnx.save(fmodel, str(tmp_path / "f.onnx")), onnx.save(qmodel, str(tmp_path / "q.onnx"))
    script = textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from vitq.tasks import error_report

        def hwm():  # peak RSS since the last reset, kB (Linux)
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
        x = np.random.default_rng(0).standard_normal((64, 256 * 256)).astype(np.float32)
        open("/proc/self/clear_refs", "w").write("5")  # resets the peak to what is resident now
        base = hwm()
        rows = error_report.tensor_errors(Path({str(tmp_path / "f.onnx")!r}), Path({str(tmp_path / "q.onnx")!r}), x,
                                          batch_size=64, memory_budget={budget})
        assert len(rows) == 6, rows
        print((hwm() - base) // 1024)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_mb = int(proc.stdout.split()[-1])
    held_mb = 64 * 6 * 3 * (256 * 256 * 4) >> 20  # before/after of each pair, and the FP32 tensor: all images at once
    assert grown_mb < held_mb / 4, f"peak RSS grew {grown_mb} MB; holding every tensor is {held_mb} MB"


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
