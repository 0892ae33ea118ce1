"""The TensorRT backend without TensorRT: what it asks the builder for, and what it reports.

TensorRT cannot be installed here, so these tests drive `build_engine` against a recording
stand-in for the `tensorrt` module's API surface. They check the inputs the backend gives
TensorRT (flags, per-layer precision, optimisation profile, timing cache) and that parse/build
failures surface with TensorRT's own messages. No engine numbers are produced or asserted.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitq.tasks.targets.tensorrt import backend as trt_backend
from vitq.tasks.stages import plan_variants
from vitq.tasks.targets.registry import get_target
from vitq.params import parse_params


def _fake_trt(parse_ok=True, build_ok=True, weakly_typed=True):
    calls: dict = {"flags": [], "precision": {}, "profile": None, "cache_in": None, "parsed": []}

    class Layer:
        def __init__(self, name, type_):
            self.name, self.type, self.num_outputs, self.precision = name, type_, 1, None

        def set_output_type(self, i, t):
            calls["precision"][self.name] = t

    class Input:
        name, shape = "input", (-1, 1, 32, 32)

    class Network:
        layers = [Layer("matmul_0", "MATRIX_MULTIPLY"), Layer("ln_0", "NORMALIZATION"), Layer("softmax_0", "SOFTMAX")]
        num_layers = 3

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return Input()

    class Cache:
        def serialize(self):
            return b"timing-cache-v2"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def set_flag(self, flag):
            calls["flags"].append(flag)

        def add_optimization_profile(self, p):
            calls["profile"] = p.shapes

        def create_timing_cache(self, blob):
            calls["cache_in"] = blob
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return Cache()

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            self.shapes = (name, mn, opt, mx)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"engine-bytes" if build_ok else None

    class Parser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["parsed"].append(path)
            return parse_ok

        def get_error(self, i):
            return "In node 3 (importQuantizeLinear): zero point must be int8"

    trt = types.SimpleNamespace(
        __version__="10.13.0",
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Builder=Builder,
        OnnxParser=Parser,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=0),
        LayerType=type("LayerType", (), {"NORMALIZATION": "NORMALIZATION", "SOFTMAX": "SOFTMAX",
                                         "MATRIX_MULTIPLY": "MATRIX_MULTIPLY"}),
        float32="float32",
        BuilderFlag=types.SimpleNamespace(
            **({"INT8": "INT8", "FP16": "FP16", "OBEY_PRECISION_CONSTRAINTS": "OBEY"} if weakly_typed else {})
        ),
    )
    return trt, calls


def _qdq_graph(quantized: bool = True) -> onnx.ModelProto:
    """input (N, 16) -> Q/DQ -> MatMul(DQ(int8 W)) -> LayerNormalization -> Softmax: a Q/DQ graph in small (without
    Q/DQ, its FP32 graph)."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (16, 16)).astype(np.int8)
    inits = [numpy_helper.from_array(np.ones(16, np.float32), "ln_w"), numpy_helper.from_array(np.zeros(16, np.float32), "ln_b")]
    nodes = [helper.make_node("MatMul", ["xd", "wd"], ["h"], name="fc"),
             helper.make_node("LayerNormalization", ["h", "ln_w", "ln_b"], ["n"], name="ln", axis=-1),
             helper.make_node("Softmax", ["n"], ["logits"], name="softmax", axis=-1)]
    if quantized:
        inits += [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(16, 0.01, np.float32), "w_scale"),
                  numpy_helper.from_array(np.zeros(16, np.int8), "w_zero"),
                  numpy_helper.from_array(np.float32(0.05), "x_scale"), numpy_helper.from_array(np.int8(0), "x_zero")]
        nodes = [helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zero"], ["xq"], name="q"),
                 helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="dq"),
                 helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["wd"], name="dq_w", axis=1), *nodes]
    else:
        inits.append(numpy_helper.from_array(w.astype(np.float32) * 0.01, "wd"))
        nodes[0].input[0] = "input"
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _build(monkeypatch, tmp_path, graph=None, **kw):
    trt, calls = _fake_trt(**kw)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    (tmp_path / "cache").write_bytes(b"previous-cache")
    src = tmp_path / "m.onnx"
    if not src.exists():
        onnx.save(graph or _qdq_graph(), str(src))
    cfg = trt_backend.EngineBuildConfig(max_batch=8)
    return trt_backend.build_engine(src, tmp_path / "m.engine", cfg, tmp_path / "cache"), calls


def test_weakly_typed_build_pins_layernorm_to_fp32_and_reuses_the_timing_cache(monkeypatch, tmp_path):
    result, calls = _build(monkeypatch, tmp_path)
    assert calls["flags"] == ["INT8", "FP16", "OBEY"]
    assert calls["precision"] == {"ln_0": "float32"} and result.fp32_layers == ["ln_0"]
    assert calls["profile"] == ("input", (1, 1, 32, 32), (1, 1, 32, 32), (8, 1, 32, 32))
    assert calls["cache_in"] == b"previous-cache"
    assert (tmp_path / "cache").read_bytes() == b"timing-cache-v2"
    assert (tmp_path / "m.engine").read_bytes() == b"engine-bytes"
    assert result.precision_mode == "int8+fp16 (weakly typed)" and result.tensorrt == "10.13.0"


def test_tensorrt_11_builds_strongly_typed_from_an_fp16_graph_and_refuses_an_fp32_one(monkeypatch, tmp_path):
    from vitq.tasks.targets.tensorrt import fp16 as tensorrt_fp16

    with pytest.raises(ValueError, match="m.onnx is an FP32 graph: TensorRT 10.13.0 builds it strongly typed, in FP32"):
        _build(monkeypatch, tmp_path, weakly_typed=False)  # the Q/DQ graph as exported: FP32 outside Q/DQ
    assert not (tmp_path / "m.engine").exists()
    tensorrt_fp16.write_fp16_graph(tmp_path / "m.onnx", tmp_path / "m.onnx")
    result, calls = _build(monkeypatch, tmp_path, weakly_typed=False)
    assert calls["network_flags"] == 1 and calls["flags"] == [] and calls["precision"] == {}
    assert result.precision_mode == "int8+fp16 (strongly typed)" and result.graph == "m.onnx"
    assert result.fp32_layers == ["ln", "softmax"]


def test_variant_engine_is_built_from_the_fp16_graph_on_tensorrt_11_and_from_the_qdq_graph_on_10(monkeypatch, tmp_path):
    import json

    for weakly_typed, source in ((False, trt_backend.FP16_GRAPH), (True, "model.onnx")):
        folder = tmp_path / str(weakly_typed) / "variants" / "tensorrt-w8a8-percentile"
        folder.mkdir(parents=True)
        onnx.save(_qdq_graph(), str(folder / "model.onnx"))
        trt, calls = _fake_trt(weakly_typed=weakly_typed)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        assert trt_backend.build_variant_engine(folder, folder.parent) == "model.engine"
        assert [str(p) for p in calls["parsed"]] == [str(folder / source)]
        record = json.loads((folder / "engine.json").read_text())
        assert record["graph"] == source
        # The FP16 graph and its record are written for both, listed with the engine as the variant's artifacts.
        fp16 = json.loads((folder / trt_backend.FP16_RECORD).read_text())
        assert fp16["graph"] == trt_backend.FP16_GRAPH and fp16["fp32_nodes"] == ["ln", "softmax"]
        listed = trt_backend.variant_artifacts(folder)
        assert all(p.is_file() for paths in listed.values() for p in paths)
        assert folder / trt_backend.FP16_GRAPH in listed["model"] and folder / "model.engine" in listed["model"]
        assert get_target("tensorrt").artifacts(folder, None) == listed  # what tracking logs


def test_fp16_baseline_is_the_fp16_graph_of_the_fp32_export_on_tensorrt_11(monkeypatch, tmp_path):
    fp32 = tmp_path / "model.onnx"
    onnx.save(_qdq_graph(quantized=False), str(fp32))
    for weakly_typed in (True, False):
        trt, _ = _fake_trt(weakly_typed=weakly_typed)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        path = trt_backend.baseline_graph(fp32, tmp_path)
        if weakly_typed:
            assert path == fp32  # 10.x: the FP32 graph under the FP16 builder flag
        else:
            assert path == tmp_path / "fp16.onnx"
            assert trt_backend.graph_precision(path) == ("fp16", ["ln", "softmax"])


def test_parse_and_build_failures_carry_tensorrt_messages(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match="zero point must be int8"):
        _build(monkeypatch, tmp_path, parse_ok=False)
    with pytest.raises(RuntimeError, match="failed to build an engine"):
        _build(monkeypatch, tmp_path, build_ok=False)
    assert not (tmp_path / "m.engine").exists()


def test_tensorrt_variant_is_not_run_here_with_its_reason():
    if trt_backend.missing() is None:
        pytest.skip("TensorRT is available here")
    runnable, not_run = plan_variants(parse_params({"quantize": {"recipes": ["onnx-w8a8-percentile", "tensorrt-w8a8-percentile"], "carry": {}}}))
    assert runnable == ["onnx-w8a8-percentile"]
    assert "'tensorrt'" in not_run["tensorrt-w8a8-percentile"]
    assert "tensorrt" in trt_backend.missing()
