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
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


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
