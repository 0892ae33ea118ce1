"""Per-tensor quantization error of a static Q/DQ variant, with ONNX Runtime's `qdq_loss_debug`.

For every quantized activation: SQNR of the tensor after its Q/DQ pair vs before it (the local
rounding/clipping error, `qdq_sqnr_db`) and vs the same tensor in the FP32 model (the error
accumulated up to that point, `vs_fp32_sqnr_db`), on calibration images. For every quantized
weight: SQNR of the dequantized weight vs the float weight. Sorted worst first, written as CSV and
a bar plot.
"""

from __future__ import annotations

import csv
import math
import tempfile
from pathlib import Path

import numpy as np

from tasks.export import INPUT_NAME

WORST_PLOTTED = 30


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


def tensor_errors(float_onnx: Path, qdq_onnx: Path, images: np.ndarray, batch_size: int = 16) -> list[dict]:
    """Rows {kind, tensor, qdq_sqnr_db, vs_fp32_sqnr_db}, worst (lowest SQNR) first."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        compute_weight_error,
        create_activation_matching,
        create_weight_matching,
        modify_model_output_intermediate_tensors,
    )

    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    with tempfile.TemporaryDirectory(prefix="vitq-qdq-debug-") as tmp:
        aug_float, aug_qdq = str(Path(tmp) / "float.onnx"), str(Path(tmp) / "qdq.onnx")
        modify_model_output_intermediate_tensors(str(float_onnx), aug_float)
        modify_model_output_intermediate_tensors(str(qdq_onnx), aug_qdq)
        float_acts = collect_activations(aug_float, _Reader(batches))
        qdq_acts = collect_activations(aug_qdq, _Reader(batches))
    act_err = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    weight_err = compute_weight_error(create_weight_matching(str(float_onnx), str(qdq_onnx)))
    rows = [
        {"kind": "activation", "tensor": name, "qdq_sqnr_db": e["qdq_err"], "vs_fp32_sqnr_db": e.get("xmodel_err")}
        for name, e in act_err.items()
    ]
    rows += [{"kind": "weight", "tensor": name, "qdq_sqnr_db": e, "vs_fp32_sqnr_db": None} for name, e in weight_err.items()]
    return sorted(rows, key=lambda r: r["qdq_sqnr_db"])


def write_error_report(rows: list[dict], csv_path: Path, png_path: Path, title: str) -> None:
    from tasks._io import atomic_file

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
