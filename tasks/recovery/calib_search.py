"""Calibration-method search: per activation tensor, the range whose layer output error is lowest.

Candidates per tensor, all from one pass of the calibration histograms (tasks/_histograms.py: ONNX
Runtime's collectors' semantics) over the calibration images: min/max, several percentiles of |x|,
entropy (KL) and MSE (the threshold that minimises the expected squared error of the |x| histogram: rounding noise step^2/12 inside the
range, (|x| - t)^2 clipping outside). ONNX Runtime has no MSE calibrator; this is TensorRT's.

Choice by output error, not by the tensor's own error: for each layer reading the tensor, the
layer's output with its input fake-quantized at the candidate range and its weight per-channel
int8, against its float output, on cached inputs (a subset of calibration images); a tensor read
by several layers sums their errors. The chosen ranges form one calibration table that
`quantize_static` reads like any other.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitq.tasks._progress import Progress
from vitq.tasks.recovery.simulate import QMAX, fake_quant_weight, run_with_input_hooks
from vitq.config import CalibrationConfig

log = logging.getLogger("vitq.recovery")


@dataclass(frozen=True)
class TensorChoice:
    tensor: str  # ONNX tensor name
    layers: list[str]  # torch modules reading it
    amax: dict[str, float]  # candidate method -> |range|
    output_mse: dict[str, float]  # candidate method -> summed layer-output MSE (relative to output power)
    chosen: str


def mse_threshold(hist: np.ndarray, edges: np.ndarray, candidates: int = 256) -> float:
    """Threshold t on an |x| histogram minimising sum(count * err): step^2/12 below t, (c - t)^2 above."""
    centers = (edges[:-1] + edges[1:]) / 2
    n = len(hist)
    idx = np.unique(np.linspace(max(1, n // 64), n, candidates).astype(int))
    t = edges[idx][:, None]  # (candidates, 1)
    step = t / QMAX
    inside = centers[None, :] <= t
    err = np.where(inside, step**2 / 12.0, (centers[None, :] - t) ** 2)
    return float(edges[idx][np.argmin((err * hist[None, :]).sum(1))])


def candidate_ranges(prep_onnx: Path, x: np.ndarray, cfg: CalibrationConfig, percentiles, tensors=None,
                     saved: Path | None = None) -> dict[str, dict[str, float]]:
    """tensor -> {method: amax} for minmax, percentile-<p> for each p, entropy, mse (only `tensors`, if given).
    `saved`: the histograms the calibrate stage kept for this same graph and these same images (`HISTOGRAMS`):
    read instead of counting again, when they hold the signed histograms at `cfg`'s bins."""
    from vitq.tasks._histograms import CalibrationHistograms
    from vitq.tasks.calibrate import collect_histograms

    histograms = CalibrationHistograms.load(saved) if saved is not None and Path(saved).is_file() else None
    if histograms is not None and (histograms.signed and histograms.num_bins == cfg.num_bins
                                   and histograms.num_quantized_bins == cfg.num_quantized_bins):
        names = histograms.names()
        log.info("calibration search: candidates from the calibrate stage's histograms (%s)", Path(saved).name)
    else:
        names, histograms, _ = collect_histograms(prep_onnx, x, cfg, entropy=True, attention=False)  # layers' inputs
    if tensors is not None:  # entropy (KL) is the slow part: only for the tensors that will be judged
        names = [n for n in names if n in set(tensors)]
        histograms.select(names)
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for t, (hist, edges, lo, hi) in histograms.abs.items():
        out[t]["minmax"] = float(max(abs(lo), abs(hi)))
        out[t]["mse"] = mse_threshold(np.asarray(hist, np.float64), np.asarray(edges, np.float64))
    for p in percentiles:
        for t, r in histograms.percentile_ranges(p).items():
            out[t][f"percentile-{p:g}"] = float(abs(r[1]))
    for t in names:
        lo, hi = histograms.entropy_range(t)
        out[t]["entropy"] = float(max(abs(lo), abs(hi)))
    return out


@torch.inference_mode()
def _layer_inputs(model: torch.nn.Module, names: list[str], x: np.ndarray, batch_size: int) -> dict[str, torch.Tensor]:
    cached: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    run_with_input_hooks(model, names, x, batch_size, lambda n, a: cached[n].append(a))
    return {n: torch.cat(v) for n, v in cached.items()}


@torch.inference_mode()
def _output_mse(module: torch.nn.Module, x: torch.Tensor, amaxes: dict[str, float]) -> dict[str, float]:
    """Candidate -> the layer's output MSE relative to its output power, input fake-quantized at the candidate's
    |range| and weight per-channel int8. The float output and the quantized weight are computed once per layer."""
    from torch.func import functional_call

    ref = module(x)
    power = (ref**2).mean().clamp_min(1e-30)
    wq = fake_quant_weight(module.weight)
    out = {}
    for method, amax in amaxes.items():
        xq = torch.fake_quantize_per_tensor_affine(x, max(amax, 1e-12) / QMAX, 0, -QMAX, QMAX)
        out[method] = float(((functional_call(module, {"weight": wq}, (xq,)) - ref) ** 2).mean() / power)
    return out


def search_calibration(
    model: torch.nn.Module,
    layer_inputs: dict[str, str],
    ranges: dict[str, dict[str, float]],
    x: np.ndarray,
    batch_size: int = 64,
) -> list[TensorChoice]:
    """Pick a range per tensor. `layer_inputs`: torch layer name -> the ONNX tensor its Q/DQ reads."""
    start = time.perf_counter()
    model.eval()
    by_tensor: dict[str, list[str]] = {}
    for layer, tensor in layer_inputs.items():
        if tensor in ranges:
            by_tensor.setdefault(tensor, []).append(layer)
    inputs = _layer_inputs(model, [n for ls in by_tensor.values() for n in ls], x, batch_size)
    modules = dict(model.named_modules())
    choices = []
    progress = Progress(log, "calibration search: tensor", len(by_tensor))
    for tensor, layers in by_tensor.items():
        cands = ranges[tensor]
        per_layer = [_output_mse(modules[n], inputs[n], cands) for n in layers]
        errs = {m: sum(e[m] for e in per_layer) for m in cands}
        best = min(sorted(errs), key=lambda m: (errs[m], m))
        choices.append(TensorChoice(tensor=tensor, layers=layers, amax=cands, output_mse=errs, chosen=best))
        progress.step(f"{tensor}: {best}")
    picked = {}
    for c in choices:
        picked[c.chosen] = picked.get(c.chosen, 0) + 1
    log.info("calibration search: %d tensors on %d images -> %s (%.1fs)", len(choices), len(x),
             ", ".join(f"{m} x{k}" for m, k in sorted(picked.items())), time.perf_counter() - start)
    return choices


def write_table(path: Path, amax: dict[str, float]) -> None:
    """A symmetric calibration table (-amax, amax) per tensor, in the format quantize_static reads."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    data = {t: TensorData(lowest=np.array(-a, np.float32), highest=np.array(a, np.float32)) for t, a in amax.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), Path(path))


def read_amax(path: Path) -> dict[str, float]:
    """tensor -> max(|lowest|, |highest|) of a calibration table."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    table = load_tensors_data(Path(path))
    return {t: float(max(abs(float(d.range_value[0])), abs(float(d.range_value[1])))) for t, d in table.data.items()}


def write_choices(choices: list[TensorChoice], csv_path: Path) -> None:
    from vitq.tasks._io import atomic_file

    methods = sorted({m for c in choices for m in c.amax})
    with atomic_file(csv_path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["tensor", "layers", "chosen", *[f"{m}_amax" for m in methods], *[f"{m}_output_rel_mse" for m in methods]])
            for c in choices:
                w.writerow([c.tensor, " ".join(c.layers), c.chosen, *[f"{c.amax.get(m, float('nan')):.6g}" for m in methods],
                            *[f"{c.output_mse.get(m, float('nan')):.4g}" for m in methods]])
