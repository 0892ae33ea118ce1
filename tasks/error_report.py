"""Per-tensor quantization error of a static Q/DQ variant, with ONNX Runtime's `qdq_loss_debug`.

Read from the variant's Q/DQ graph (`model.onnx`, not a fused serving form). For every quantized
activation (the input of a QuantizeLinear): SQNR of the tensor after its Q/DQ pair vs before it
(the local rounding/clipping error, `qdq_sqnr_db`) and vs the same tensor in the FP32 model (the
error accumulated up to that point, `vs_fp32_sqnr_db`), on calibration images. For every quantized
weight (a constant that a DequantizeLinear reads, int32 biases included): SQNR of the dequantized
weight vs the float weight of the FP32 model. Sorted worst first, written as CSV and a bar plot.

The pairs come from the graph itself (ORT's `qdq_loss_debug` name-suffix matching is not used, so no Q/DQ pair
is skipped for its name). Memory stays bounded: both models run batch by batch with only the measured tensors as
outputs, and each batch only adds to per-tensor sums of squares (the SQNR of every element, as ORT's
`compute_signal_to_quantization_noice_ratio` computes it, without keeping the tensors); a batch's tensors fit a
byte budget.
"""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx

from vitq.tasks import parallel
from vitq.tasks.conformance import graph_constants, node_attr

log = logging.getLogger("vitq.validate")

WORST_PLOTTED = 30
# ONNX Runtime's quantizer names: `<w>_quantized` is weight `w` in int8; a quantized graph output
# `x` is renamed `x_QuantizeLinear_Input` before its Q/DQ pair.
_WEIGHT_SUFFIX = "_quantized"
_OUTPUT_SUFFIX = "_QuantizeLinear_Input"

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


def _session_with_outputs(model: onnx.ModelProto, names: list[str], out: Path):
    """An ONNX Runtime session over `model` (changed: `names`, float tensors, become extra outputs), written to
    `out`; graph optimisations off, so Q/DQ pairs run as written. Models over 2 GB go through external data."""
    import onnxruntime as ort

    present = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in present)
    large = model.ByteSize() > (1 << 31) - (64 << 20)
    onnx.save(model, str(out), save_as_external_data=large, location=f"{out.name}.data" if large else None)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = parallel.session_threads()  # beside other variants: this worker's share of the cores
    return ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])


def _run(sess, names: list[str], batch: np.ndarray) -> dict[str, np.ndarray]:
    """`names`' values on `batch`; the model's input is the batch itself (a Q/DQ pair may read it directly)."""
    fed = sess.get_inputs()[0].name
    fetched = [n for n in names if n != fed]
    out = dict(zip(fetched, sess.run(fetched, {fed: batch})))
    if fed in names:
        out[fed] = batch
    return out


class _Sums:
    """sum(ref^2) and sum((ref - x)^2) over batches, in float64: SQNR over every element without keeping any."""

    __slots__ = ("signal", "noise")

    def __init__(self):
        self.signal = self.noise = 0.0

    def add(self, ref: np.ndarray, x: np.ndarray) -> None:
        ref = ref.astype(np.float64, copy=False)
        self.signal += float(np.vdot(ref, ref))
        diff = ref - x
        self.noise += float(np.vdot(diff, diff))

    def db(self) -> float:
        eps = np.finfo(float).eps  # as onnxruntime's compute_signal_to_quantization_noice_ratio
        return 20 * math.log10(max(math.sqrt(self.signal), eps) / max(math.sqrt(self.noise), eps))


def tensor_errors(float_onnx: Path, qdq_onnx: Path, images: np.ndarray, batch_size: int = 16,
                  memory_budget: int | None = None) -> list[dict]:
    """Rows {kind, tensor, qdq_sqnr_db, vs_fp32_sqnr_db}, worst (lowest SQNR) first: one per quantized
    activation and weight of the Q/DQ graph `qdq_onnx`, against the FP32 model `float_onnx` it was
    quantized from. `vs_fp32_sqnr_db` is None for weights (their row is the FP32 comparison).

    Streams: both models run batch by batch with only the measured tensors as outputs, and each batch adds to
    per-tensor sums, then is dropped. A batch holds at most `memory_budget` bytes of those tensors (default:
    half the available memory: tasks/_memory.py), found from a first batch of one image, and at most `batch_size`
    images."""
    from vitq.tasks.conformance import ORT_ONLY_QUANT_OPS

    qdq_model, float_model = onnx.load(str(qdq_onnx)), onnx.load(str(float_onnx))
    fused = sorted({n.op_type for n in qdq_model.graph.node} & ORT_ONLY_QUANT_OPS)
    if fused:
        raise ValueError(
            f"{qdq_onnx} runs {', '.join(fused)}: its quantized tensors have no Q/DQ pair to measure; "
            "pass the variant's Q/DQ graph (VariantArtifact.qdq_artifact)"
        )
    pairs = quantized_tensors(qdq_model)[0]
    float_names = {n for node in float_model.graph.node for n in node.output} | {i.name for i in float_model.graph.input}
    # A quantized graph output `x` is `x_QuantizeLinear_Input` before its pair, `x` after.
    named = {before: (after if before == after + _OUTPUT_SUFFIX else before) for before, after in pairs.items()}
    fp32_of = {before: name for before, name in named.items() if name in float_names}
    rows_weights = weight_errors(float_model, qdq_model)
    from vitq.tasks._memory import budget_bytes

    budget = memory_budget or budget_bytes(None)
    local = {b: _Sums() for b in pairs}
    vs_fp32 = {b: _Sums() for b in fp32_of}
    with tempfile.TemporaryDirectory(prefix="vitq-qdq-debug-") as tmp:
        q_names = sorted(set(pairs) | set(pairs.values()))
        f_names = sorted(set(fp32_of.values()))
        # the models loaded above, each read once (the float one is dropped unused when nothing compares with it)
        q_sess = _session_with_outputs(qdq_model, q_names, Path(tmp) / "qdq.onnx")
        f_sess = _session_with_outputs(float_model, f_names, Path(tmp) / "float.onnx") if f_names else None
        del qdq_model, float_model
        start, step = 0, 1
        while start < len(images):
            batch = images[start:start + step]
            q_out, f_out = _run(q_sess, q_names, batch), _run(f_sess, f_names, batch) if f_sess else {}
            for before, after in pairs.items():
                local[before].add(q_out[before], q_out[after])
                if before in fp32_of:
                    vs_fp32[before].add(f_out[fp32_of[before]], q_out[after])
            if start == 0:  # sized from one image: 2x for the float64 temporaries beside them
                per_image = 2 * sum(a.nbytes for a in (*q_out.values(), *f_out.values())) / max(len(batch), 1)
                step = int(max(1, min(batch_size, budget // max(per_image, 1))))
                log.debug("error report: %.0f MB of tensors per image, batches of %d (budget %.0f MB)",
                          per_image / 2**20, step, budget / 2**20)
            start += len(batch)
            del q_out, f_out
    rows = [{"kind": "activation", "tensor": named[b], "qdq_sqnr_db": local[b].db(),
             "vs_fp32_sqnr_db": vs_fp32[b].db() if b in vs_fp32 else None} for b in pairs]
    rows += [
        {"kind": "weight", "tensor": name, "qdq_sqnr_db": db, "vs_fp32_sqnr_db": None}
        for name, db in rows_weights.items()
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
