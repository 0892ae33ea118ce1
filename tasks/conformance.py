"""Q/DQ conformance: is a quantized ONNX graph valid for TensorRT explicit quantization?

Runs everywhere (no TensorRT needed) and is applied to every ONNX variant before it is published.
Rules, each reported with the node that breaks it:
- symmetric-int8: QuantizeLinear/DequantizeLinear are INT8 with zero point 0 (INT32 only for
  biases that DequantizeLinear feeds into Conv/Gemm input 2);
- positive-scale: scales are positive and finite;
- per-tensor-activation: activations use one scale (TensorRT supports per-channel for weights only);
- per-channel-axis: a per-channel weight scale runs along the weight's output channels
  (MatMul B [K, N]: axis 1; Gemm B: axis 0 when transB else 1; Conv W [O, I, ...]: axis 0;
  ConvTranspose W [I, O, ...]: axis 1) and has one entry per channel;
- orphan-q / orphan-dq: every QuantizeLinear output goes only to DequantizeLinear nodes with the
  same scale and zero point; every DequantizeLinear reads a QuantizeLinear or a constant;
- float-only-consumer: no DequantizeLinear feeds an op TensorRT runs in floating point only
  (Softmax, LayerNormalization, GELU's Erf, ...), where the Q/DQ pair would only add error. Except a LayerNorm
  reading the DequantizeLinear that also feeds a residual Add (an Add of two activations): TensorRT's documented
  placement ("quantize the residual input in skip connections") makes its GEMM + residual Add fusion write that
  tensor in INT8, so the LayerNorm reading it reads those integers whether the graph says so or not
  (`qdq_placement: tensorrt`, tasks/targets/onnx/backend.py `quantize_residual_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

# Ops TensorRT executes in FP16/FP32 only; an INT8 Q/DQ in front of them buys no INT8 kernel.
TRT_FLOAT_ONLY_OPS = frozenset(
    {"Softmax", "LayerNormalization", "Erf", "Gelu", "Div", "Sqrt", "Pow", "ReduceMean", "Exp", "Log",
     "Reciprocal", "Tanh", "Sigmoid"}
)
# Quantized ops that only ONNX Runtime executes (dynamic quantization, QOperator format).
ORT_ONLY_QUANT_OPS = frozenset(
    {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv",
     "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul"}
)
# Float-only ops that may read a residual Add's quantized skip input (the residual stream) from the same DequantizeLinear.
RESIDUAL_STREAM_READERS = frozenset({"LayerNormalization"})
_WEIGHT_AXIS = {"MatMul": lambda node, rank: rank - 1, "Conv": lambda node, rank: 0,
                "ConvTranspose": lambda node, rank: 1,
                "Gemm": lambda node, rank: 0 if node_attr(node, "transB", 0) else 1}


@dataclass(frozen=True)
class Violation:
    node: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule} at node {self.node!r}: {self.message}"


class QdqConformanceError(RuntimeError):
    def __init__(self, violations: list[Violation]):
        self.violations = violations
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        super().__init__(f"Q/DQ graph is not valid for TensorRT: {violations[0]}{more}")


def node_attr(node: onnx.NodeProto, name: str, default):
    """Attribute `name` of `node`, or `default`."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def graph_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer and Constant output of the graph, by name."""
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            value = node_attr(node, "value", None)
            if value is not None:
                consts[node.output[0]] = numpy_helper.to_array(value)
    return consts


def check_qdq(model: onnx.ModelProto) -> list[Violation]:
    """Every violation of the rules above (empty list: the graph conforms)."""
    consts = graph_constants(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producers[name] = node
    out: list[Violation] = []

    def params(node):
        scale = consts.get(node.input[1])
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return scale, zp

    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        name = node.name or node.output[0]
        scale, zp = params(node)
        if scale is None:
            out.append(Violation(name, "positive-scale", "scale is not a constant"))
            continue
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            out.append(Violation(name, "positive-scale", f"scale must be positive and finite, got {scale.ravel()[:4]}"))
        feeds_bias = node.op_type == "DequantizeLinear" and all(
            c.op_type in ("Conv", "Gemm") and list(c.input).index(node.output[0]) == 2
            for c in consumers.get(node.output[0], [])
        )
        allowed = (np.int8, np.int32) if feeds_bias else (np.int8,)
        if zp is None:
            out.append(Violation(name, "symmetric-int8", "zero point missing: the type defaults to uint8"))
        elif zp.dtype not in allowed:
            out.append(Violation(name, "symmetric-int8", f"zero point type is {zp.dtype}, must be int8"))
        elif np.any(zp != 0):
            out.append(Violation(name, "symmetric-int8", f"zero point must be 0 (symmetric), got {zp.ravel()[:4]}"))
        is_weight = node.op_type == "DequantizeLinear" and node.input[0] in consts
        if scale.size > 1:
            if not is_weight:
                out.append(Violation(name, "per-tensor-activation",
                                     f"activation {node.input[0]!r} has {scale.size} scales; TensorRT needs one"))
            else:
                out.extend(_check_axis(node, name, scale, consts[node.input[0]], consumers))
        if node.op_type == "QuantizeLinear":
            users = consumers.get(node.output[0], [])
            if not users or any(u.op_type != "DequantizeLinear" for u in users):
                kinds = sorted({u.op_type for u in users}) or ["nothing"]
                out.append(Violation(name, "orphan-q", f"output goes to {', '.join(kinds)}, must go to DequantizeLinear"))
            for u in users:
                if u.op_type == "DequantizeLinear":
                    us, uz = params(u)
                    if us is not None and (us.shape != scale.shape or not np.allclose(us, scale)) or (
                        uz is not None and zp is not None and np.any(uz != zp)
                    ):
                        out.append(Violation(u.name or u.output[0], "orphan-dq",
                                             f"scale/zero point differ from its QuantizeLinear {name!r}"))
        else:
            src = producers.get(node.input[0])
            if node.input[0] not in consts and (src is None or src.op_type != "QuantizeLinear"):
                what = src.op_type if src is not None else "a graph input"
                out.append(Violation(name, "orphan-dq", f"reads {what}, must read QuantizeLinear or a constant"))
            users = consumers.get(node.output[0], [])
            residual = any(u.op_type == "Add" and not any(i in consts for i in u.input) for u in users)
            for c in users:
                if c.op_type in TRT_FLOAT_ONLY_OPS and not (residual and c.op_type in RESIDUAL_STREAM_READERS):
                    out.append(Violation(name, "float-only-consumer",
                                         f"feeds {c.op_type} {c.name!r}, which TensorRT runs in float only"))
    return out


def _check_axis(node, name, scale, weight, consumers) -> list[Violation]:
    axis = node_attr(node, "axis", 1)
    axis = axis + weight.ndim if axis < 0 else axis
    out = []
    for c in consumers.get(node.output[0], []):
        idx = list(c.input).index(node.output[0])
        if c.op_type in _WEIGHT_AXIS and idx == 1:
            want = _WEIGHT_AXIS[c.op_type](c, weight.ndim)
            if axis != want:
                out.append(Violation(name, "per-channel-axis",
                                     f"axis {axis} for {c.op_type} weight {list(weight.shape)}; output channels are axis {want}"))
    if axis < weight.ndim and scale.size != weight.shape[axis]:
        out.append(Violation(name, "per-channel-axis",
                             f"{scale.size} scales for {weight.shape[axis]} channels on axis {axis}"))
    return out


def tensorrt_readiness(model: onnx.ModelProto) -> str | None:
    """None when TensorRT can build the graph with explicit quantization, else why not."""
    ort_only = sorted({n.op_type for n in model.graph.node if n.op_type in ORT_ONLY_QUANT_OPS})
    if ort_only:
        return f"uses {', '.join(ort_only)}, which only ONNX Runtime executes"
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return "has no Q/DQ nodes: TensorRT would build it in float"
    return None


def assert_conforms(model: onnx.ModelProto) -> None:
    violations = check_qdq(model)
    if violations:
        raise QdqConformanceError(violations)
