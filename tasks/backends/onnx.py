"""ONNX backend: ONNX Runtime quantization (dynamic and static Q/DQ), sessions, graph inspection."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from vitq.recipes import Recipe

log = logging.getLogger("vitq.onnx")

LINEAR_OP_TYPES = ("MatMul", "Gemm", "Conv")
_WEIGHT_INPUT = 1  # weight is input 1 of MatMul/Gemm/Conv


def session(path: Path, threads: int = 0, optimize: bool = True):
    """A CPU ONNX Runtime session; `threads` fixes intra-op threads (0: ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_batched(sess, x: np.ndarray, batch_size: int) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose inputs are both activations: attention's q @ k^T and attn @ v."""
    consts = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not set(n.input[:2]) & consts]


def strip_float_only_qdq(model: onnx.ModelProto, float_only: frozenset[str]) -> int:
    """Remove Q -> DQ pairs whose DQ feeds only ops that run in float anyway (Softmax, LayerNorm, ...):
    they add rounding error and no INT8 kernel. Returns the number of pairs removed."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    drop = []
    for dq in model.graph.node:
        if dq.op_type != "DequantizeLinear" or dq.output[0] in graph_outputs:
            continue
        users = consumers.get(dq.output[0], [])
        q = producers.get(dq.input[0])
        if not users or any(u.op_type not in float_only for u in users) or q is None or q.op_type != "QuantizeLinear":
            continue
        if len(consumers.get(q.output[0], [])) != 1:
            continue
        for u in users:
            for i, name in enumerate(u.input):
                if name == dq.output[0]:
                    u.input[i] = q.input[0]
        drop += [q, dq]
    for n in drop:
        model.graph.node.remove(n)
    return len(drop) // 2


def quantize(recipe: Recipe, prep_onnx: Path, out_path: Path, table: Path | None) -> None:
    """Produce the recipe's quantized ONNX at `out_path` from the quantization-ready FP32 model."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    # Pass a ModelProto, not the path: ORT writes `<path>-inferred.onnx` beside a path it is
    # given, which collides when several variants are quantized from one file concurrently.
    # No stdout redirection here: variants are quantized in concurrent threads, and
    # contextlib.redirect_stdout swaps the process-wide sys.stdout.
    model = onnx.load(str(prep_onnx))
    if recipe.scheme == "dynamic":
        quantize_dynamic(
            model, str(out_path), weight_type=QuantType.QInt8, per_channel=recipe.per_channel,
            op_types_to_quantize=list(recipe.op_types),
        )
        return
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    exclude = [] if recipe.quantize_attention else activation_matmuls(model)
    quantize_static(
        model,
        str(out_path),
        calibration_data_reader=None,
        calibration_cache_path=str(table),  # ranges from the calibration stage; no recalibration
        calibrate_method=methods[recipe.calibration],
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=recipe.per_channel,
        op_types_to_quantize=list(recipe.op_types),
        nodes_to_exclude=exclude,
        extra_options={
            "ActivationSymmetric": True,  # zero point 0: TensorRT's INT8 is symmetric
            "WeightSymmetric": True,
            # Q/DQ only where the placement says (inputs and weights). A Q/DQ on every MatMul/Gemm
            # output forces ONNX Runtime to requantize each result and blocks its DQ -> MatMul ->
            # MatMulIntegerToFloat fusion (vit_base b1, this CPU: 44 ms with vs 37 ms without).
            "OpTypesToExcludeOutputQuantization": list(recipe.op_types),
        },
    )
    # ORT quantizes the output of an activation-activation MatMul (the attention scores), which
    # then feeds Softmax: drop such pairs so the graph stays valid for TensorRT.
    from tasks.conformance import TRT_FLOAT_ONLY_OPS

    quantized = onnx.load(str(out_path))
    if strip_float_only_qdq(quantized, TRT_FLOAT_ONLY_OPS):
        onnx.save(quantized, str(out_path))


def linear_weight_elements(model: onnx.ModelProto) -> int:
    """Elements of the float weights feeding MatMul/Gemm/Conv (constant input 1)."""
    inits = {i.name: i for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in LINEAR_OP_TYPES and len(node.input) > _WEIGHT_INPUT and node.input[_WEIGHT_INPUT] in inits:
            total += int(np.prod(inits[node.input[_WEIGHT_INPUT]].dims))
    return total


def int8_weight_elements(model: onnx.ModelProto) -> int:
    """Elements of 8-bit weight tensors (rank >= 2; int32 biases and scalar zero points excluded)."""
    eight_bit = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in eight_bit and len(i.dims) >= 2)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
