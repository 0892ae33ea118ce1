"""Per-tensor quantization error of a static Q/DQ variant, with ONNX Runtime's `qdq_loss_debug`.

Read from the variant's Q/DQ graph (`model.onnx`, not a fused serving form). For every quantized
activation (the input of a QuantizeLinear): SQNR of the tensor after its Q/DQ pair vs before it
(the local rounding/clipping error, `qdq_sqnr_db`) and vs the same tensor in the FP32 model (the
error accumulated up to that point, `vs_fp32_sqnr_db`), on calibration images. For every quantized
weight (a constant that a DequantizeLinear reads, int32 biases included): SQNR of the dequantized
weight vs the float weight of the FP32 model. Sorted worst first, written as CSV and a bar plot.

The pairs come from the graph itself; ORT's `qdq_loss_debug` records the tensors and gives the
metric (its own name-suffix matching is not used, so no Q/DQ pair is skipped for its name). The
FP32 model's tensors are recorded once per float reference and images in a process, and shared by
every variant validated against them (`float_activations`).
"""

from __future__ import annotations

import csv
import hashlib
import math
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx

from vitq.tasks.conformance import graph_constants, node_attr
from vitq.tasks.export import INPUT_NAME

WORST_PLOTTED = 30
# FP32 activations kept in memory: the export's reference (shared by the plain static variants) and
# one variant's own (smoothquant/qat). Evicting one only means recording it again.
FLOAT_MEMO_SIZE = 2
# ONNX Runtime's quantizer names: `<w>_quantized` is weight `w` in int8; a quantized graph output
# `x` is renamed `x_QuantizeLinear_Input` before its Q/DQ pair.
_WEIGHT_SUFFIX = "_quantized"
_OUTPUT_SUFFIX = "_QuantizeLinear_Input"

_memo: OrderedDict[tuple, dict[str, list[np.ndarray]]] = OrderedDict()
_memo_lock = threading.Lock()  # guards _memo and _key_locks
_key_locks: dict[tuple, threading.Lock] = {}  # one recording per key at a time (variants run in threads)


class _Reader:
    """The CalibrationDataReader protocol over an in-memory batch list."""

    def __init__(self, batches: list[np.ndarray]):
        self._it = iter([{INPUT_NAME: b} for b in batches])

    def get_next(self):
        return next(self._it, None)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _record(onnx_path: Path, images: np.ndarray, batch_size: int) -> dict[str, list[np.ndarray]]:
    """Every float tensor of the model on `images`, one array per batch (graph optimisations off,
    so Q/DQ pairs run as written)."""
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    with tempfile.TemporaryDirectory(prefix="vitq-qdq-debug-") as tmp:
        # ORT writes `<model>-inferred.onnx` beside the file it reads: give it a private copy, not a
        # workspace file that concurrently validated variants read too.
        src, augmented = Path(tmp) / "model.onnx", Path(tmp) / "augmented.onnx"
        shutil.copyfile(onnx_path, src)
        modify_model_output_intermediate_tensors(str(src), str(augmented))
        return collect_activations(str(augmented), _Reader(batches))


def float_activations(float_onnx: Path, images: np.ndarray, batch_size: int = 16) -> dict[str, list[np.ndarray]]:
    """The FP32 model's float tensors on `images`, recorded once per (model file content, images,
    batch size) in this process and shared by the variants that ask for the same; keyed by content,
    so a rewritten model file is recorded again, never served from memory."""
    with open(float_onnx, "rb") as f:
        model_digest = hashlib.file_digest(f, "sha256").hexdigest()
    images = np.ascontiguousarray(images)
    key = (model_digest, hashlib.sha256(images.tobytes()).hexdigest(), images.shape, str(images.dtype), batch_size)
    with _memo_lock:
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _memo_lock:
            if key in _memo:
                _memo.move_to_end(key)
                return _memo[key]
        acts = _record(Path(float_onnx), images, batch_size)
        with _memo_lock:
            _memo[key] = acts
            while len(_memo) > FLOAT_MEMO_SIZE:
                _memo.popitem(last=False)
        return acts


def quantized_tensors(model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, tuple]]:
    """The Q/DQ pairs of a graph: activations {tensor a QuantizeLinear reads: its DequantizeLinear's
    output} and weights {constant: (its QuantizeLinear or None, the DequantizeLinear)}: an int8/int32
    constant read by a DequantizeLinear, or a float constant read by a QuantizeLinear."""
    consts = graph_constants(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    activations, weights = {}, {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            dqs = [c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
            assert dqs, f"QuantizeLinear {node.name!r} has no DequantizeLinear: conformance admits no such graph"
            dq = dqs[0]  # several DQs of one Q share its scale and zero point (conformance)
            if node.input[0] in consts:
                weights[node.input[0]] = (node, dq)
            else:
                activations[node.input[0]] = dq.output[0]
        elif node.op_type == "DequantizeLinear" and node.input[0] in consts:
            weights[node.input[0]] = (None, node)
    return activations, weights


def _scale_zero_point(node: onnx.NodeProto, consts: dict[str, np.ndarray], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of a Q/DQ node, shaped to broadcast along its axis (per-channel)."""
    scale = consts[node.input[1]].astype(np.float64)
    zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(scale.shape, np.uint8)
    if scale.ndim == 1 and rank > 1:
        shape = [1] * rank
        shape[node_attr(node, "axis", 1) % rank] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return scale, zp


def _dequantized(q: onnx.NodeProto | None, dq: onnx.NodeProto, consts: dict[str, np.ndarray]) -> np.ndarray:
    """The weight as the graph computes it: DQ(w_int), or DQ(Q(w_float)) for a float constant."""
    if q is None:
        w = consts[dq.input[0]]
    else:
        w = consts[q.input[0]].astype(np.float64)
        scale, zp = _scale_zero_point(q, consts, w.ndim)
        info = np.iinfo(zp.dtype)
        w = np.clip(np.rint(w / scale) + zp, info.min, info.max)  # rint: round half to even, as ONNX
    scale, zp = _scale_zero_point(dq, consts, w.ndim)
    return (w.astype(np.float64) - zp.astype(np.float64)) * scale


def weight_errors(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto) -> dict[str, float]:
    """SQNR (dB) of every quantized weight of `qdq_model` vs its float weight in `float_model`,
    keyed by the float weight's name."""
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio as sqnr

    consts, float_consts = graph_constants(qdq_model), graph_constants(float_model)
    out = {}
    for name, (q, dq) in quantized_tensors(qdq_model)[1].items():
        # `w_quantized` is weight `w`; a bias's DequantizeLinear outputs the bias's own name.
        float_name = next((n for n in (name, name.removesuffix(_WEIGHT_SUFFIX), dq.output[0]) if n in float_consts), None)
        deq = _dequantized(q, dq, consts)
        if float_name is None or float_consts[float_name].shape != deq.shape:
            raise ValueError(
                f"quantized weight {name!r} {list(deq.shape)} has no float weight of that shape in the FP32 model: "
                "pass the float model the Q/DQ graph was quantized from"
            )
        out[float_name] = sqnr(float_consts[float_name], deq)
    return out


def tensor_errors(float_onnx: Path, qdq_onnx: Path, images: np.ndarray, batch_size: int = 16) -> list[dict]:
    """Rows {kind, tensor, qdq_sqnr_db, vs_fp32_sqnr_db}, worst (lowest SQNR) first: one per quantized
    activation and weight of the Q/DQ graph `qdq_onnx`, against the FP32 model `float_onnx` it was
    quantized from. `vs_fp32_sqnr_db` is None for weights (their row is the FP32 comparison)."""
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio as sqnr

    from vitq.tasks.conformance import ORT_ONLY_QUANT_OPS

    qdq_model, float_model = onnx.load(str(qdq_onnx)), onnx.load(str(float_onnx))
    fused = sorted({n.op_type for n in qdq_model.graph.node} & ORT_ONLY_QUANT_OPS)
    if fused:
        raise ValueError(
            f"{qdq_onnx} runs {', '.join(fused)}: its quantized tensors have no Q/DQ pair to measure; "
            "pass the variant's Q/DQ graph (VariantArtifact.qdq_artifact)"
        )
    float_acts = float_activations(float_onnx, images, batch_size)
    qdq_acts = _record(Path(qdq_onnx), images, batch_size)
    rows = []
    for before, after in quantized_tensors(qdq_model)[0].items():
        missing = [t for t in (before, after) if t not in qdq_acts]
        if missing:
            raise RuntimeError(f"ONNX Runtime recorded no float values for {missing} of {qdq_onnx} (no type from shape inference)")
        # A quantized graph output `x` is `x_QuantizeLinear_Input` before its pair, `x` after.
        name = after if before == after + _OUTPUT_SUFFIX else before
        fp32 = float_acts.get(name)
        rows.append({
            "kind": "activation", "tensor": name, "qdq_sqnr_db": sqnr(qdq_acts[before], qdq_acts[after]),
            "vs_fp32_sqnr_db": sqnr(fp32, qdq_acts[after]) if fp32 is not None else None,
        })
    rows += [
        {"kind": "weight", "tensor": name, "qdq_sqnr_db": db, "vs_fp32_sqnr_db": None}
        for name, db in weight_errors(float_model, qdq_model).items()
    ]
    return sorted(rows, key=lambda r: (r["qdq_sqnr_db"], r["kind"], r["tensor"]))


def write_error_report(rows: list[dict], csv_path: Path, png_path: Path, title: str) -> None:
    from vitq.tasks._io import atomic_file

    with atomic_file(csv_path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["kind", "tensor", "qdq_sqnr_db", "vs_fp32_sqnr_db"])
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = rows[:WORST_PLOTTED][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(worst) + 1.2))
    colors = ["tab:red" if r["kind"] == "activation" else "tab:blue" for r in worst]
    ax.barh([f"{r['tensor']} ({r['kind'][0]})" for r in worst], [r["qdq_sqnr_db"] for r in worst], color=colors)
    ax.set_xlabel("SQNR after Q/DQ, dB (higher is better)")
    ax.set_title(f"{title}: {len(worst)} worst-quantized tensors (a: activation, w: weight)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
