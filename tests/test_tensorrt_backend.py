"""The TensorRT backend without TensorRT: what it asks the builder for, and what it reports.

TensorRT cannot be installed here, so these tests drive `build_engine` against a recording
stand-in for the `tensorrt` module's API surface. They check the inputs the backend gives
TensorRT (flags, per-layer precision, optimisation profile, timing cache) and that parse/build
failures surface with TensorRT's own messages. No engine numbers are produced or asserted.
"""

from __future__ import annotations

import sys
import types

import pytest

from tasks.backends import tensorrt as trt_backend
from tasks.stages import plan_variants
from vitq.config import parse_params


def _fake_trt(parse_ok=True, build_ok=True, weakly_typed=True):
    calls: dict = {"flags": [], "precision": {}, "profile": None, "cache_in": None}

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


def _build(monkeypatch, tmp_path, **kw):
    trt, calls = _fake_trt(**kw)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    (tmp_path / "cache").write_bytes(b"previous-cache")
    cfg = trt_backend.EngineBuildConfig(max_batch=8)
    return trt_backend.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", cfg, tmp_path / "cache"), calls


def test_weakly_typed_build_pins_layernorm_to_fp32_and_reuses_the_timing_cache(monkeypatch, tmp_path):
    result, calls = _build(monkeypatch, tmp_path)
    assert calls["flags"] == ["INT8", "FP16", "OBEY"]
    assert calls["precision"] == {"ln_0": "float32"} and result.fp32_layers == ["ln_0"]
    assert calls["profile"] == ("input", (1, 1, 32, 32), (1, 1, 32, 32), (8, 1, 32, 32))
    assert calls["cache_in"] == b"previous-cache"
    assert (tmp_path / "cache").read_bytes() == b"timing-cache-v2"
    assert (tmp_path / "m.engine").read_bytes() == b"engine-bytes"
    assert result.precision_mode == "int8+fp16 (weakly typed)" and result.tensorrt == "10.13.0"


def test_tensorrt_11_builds_strongly_typed(monkeypatch, tmp_path):
    result, calls = _build(monkeypatch, tmp_path, weakly_typed=False)
    assert calls["network_flags"] == 1 and calls["flags"] == []
    assert result.precision_mode == "strongly typed (graph precision)"


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
