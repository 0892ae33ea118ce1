"""Calibration stage: one pass over the calibration split, every calibration table at once.

ONNX Runtime's `HistogramCalibrater`, narrowed to the activations the quantized op types read (their inputs:
the only ranges the quantizer uses), exposes the tensors to measure as graph outputs; ORT
runs that graph `batch_size` images at a time into buffers bound once (IOBinding), and
`vitq.tasks._histograms.CalibrationHistograms` accumulates, per tensor, the two histograms of ORT's
`HistogramCollector`s (|x| for min/max and percentile, signed for entropy/KL) on ORT's own bin grids, counted
with one vectorised pass per tensor and batch; the entropy search scores all candidate thresholds at once.
Tables equal ORT's collectors' within one histogram bin (tests/test_calibrate_histograms.py), written with
`save_tensors_data`, the format `quantize_static(calibration_cache_path=...)` reads. A percentile table at each
percentile a defined recipe overrides (`percentile-<p>.json`) comes from the same histograms.
Every table is symmetric-ready: the static recipes quantize activations symmetrically (zero point 0).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vitq.tasks import parallel
from vitq.tasks._histograms import CalibrationHistograms
from vitq.tasks._progress import Progress
from vitq.tasks._io import atomic_dir, read_json, write_json
from vitq.tasks.data import load_split, model_inputs
from vitq.tasks.export import INPUT_NAME
from vitq.tasks.model import load_model_spec
from vitq.config import CalibrationConfig
from vitq.errors import DataError
from vitq.recipes import CALIBRATED_OP_TYPES

log = logging.getLogger("vitq.calibrate")


@dataclass(frozen=True)
class CalibrationResult:
    methods: list[str]
    images: int
    tensors: int
    op_types: list[str]
    percentile: float
    # Percentile tables beside `percentile.json` for recipes that override the percentile (`percentile-<p>.json`).
    extra_percentiles: list[float] = field(default_factory=list)
    histograms_sha256: str | None = None  # content digest of `histograms.npz` (None: minmax alone, none kept)
    attention: bool = True  # the inputs of attention's activation-activation MatMuls measured too (quantize_attention)
    residual: bool = False  # the skip inputs of residual Adds measured too (qdq_placement: tensorrt)
    batch_size: int | None = None  # images a pass (the first pass sets the histograms' grid); None: not recorded


HISTOGRAMS = "histograms.npz"  # the merged histograms the tables came from (tasks/_histograms.py), kept for the range search


def table_path(calibration_dir: Path, method: str, percentile: float | None = None) -> Path:
    """The table of `method`; with `percentile` (a recipe's override), the percentile table at that percentile."""
    return Path(calibration_dir) / (f"{method}.json" if percentile is None else f"{method}-{float(percentile)!r}.json")


def _inputs_calibrater(attention: bool, residual: bool = False):
    """ORT's `HistogramCalibrater`, selecting only the activations the `op_types` nodes read (their inputs),
    and the inputs of attention's activation-activation MatMuls only if `attention`; with `residual`, also the skip
    inputs of the residual Adds after the weighted `op_types` nodes (the tensors `qdq_placement: tensorrt` quantizes:
    tasks/targets/onnx/backend.py `residual_skip_inputs`; measured for every such Add, whatever a recipe excludes).
    ORT's own selection adds the nodes' outputs, which no table user reads: the quantizer puts no Q/DQ on the
    outputs of the op types it quantizes (OpTypesToExcludeOutputQuantization, tasks/targets/onnx/backend.py), the
    recovery recipes and the range search judge each layer's input; and the outputs are half the values a
    ViT's calibration counts (qkv, attention scores, fc1). The attention MatMuls' inputs (q, k^T, the
    softmax, v) are half of the rest, read only by a recipe with `quantize_attention`; tasks/targets/onnx/backend.py
    refuses a table that lacks a range the quantizer needs. tests/test_calibrate_histograms.py checks the
    quantized graph is the same with and without the ranges left out."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater

    from vitq.tasks.targets.onnx.backend import activation_matmuls, residual_skip_inputs, weight_gemms

    class InputsCalibrater(HistogramCalibrater):
        def select_tensors_to_calibrate(self, model):
            tensors, value_infos = super().select_tensors_to_calibrate(model)
            skip = set() if attention else set(activation_matmuls(model))
            read = {t for node in model.graph.node
                    if node.op_type in self.op_types_to_calibrate and node.name not in skip for t in node.input}
            selected = tensors & read
            if residual:
                weighted = {n.name for n in model.graph.node if n.op_type in self.op_types_to_calibrate} & weight_gemms(model)
                selected |= set(residual_skip_inputs(model, weighted)) & set(value_infos)
            return selected, value_infos

    return InputsCalibrater


DEFAULT_BATCH = 32  # images a calibration pass at most when calibration.batch_size is null
PASS_OVERHEAD = 2  # a pass holds its measured tensors and about as much again (ONNX Runtime's own activations)


def pass_size(session, x: np.ndarray, batch_size: int | None, budget: int | None) -> int:
    """Images a calibration pass: `batch_size`, or (None) as many as fit `budget` bytes, at most DEFAULT_BATCH.
    The bytes per image are measured on one image (a pass not counted); a `batch_size` over the budget is refused
    in one line naming both knobs."""
    from vitq.errors import VitqError
    from vitq.tasks._memory import budget_bytes, mb

    budget = budget or budget_bytes(None)
    want = batch_size or DEFAULT_BATCH
    if want <= 1 or len(x) <= 1:
        return max(1, want)
    per_image = PASS_OVERHEAD * sum(o.nbytes for o in session.run(None, {INPUT_NAME: np.ascontiguousarray(x[:1])}))
    fits = int(budget // max(per_image, 1))
    if batch_size is not None and min(batch_size, len(x)) > fits:
        raise VitqError(f"calibration.batch_size {batch_size}: a pass of {min(batch_size, len(x))} images holds about "
                        f"{mb(per_image * min(batch_size, len(x)))} ({mb(per_image)} an image), over the memory budget "
                        f"of {mb(budget)}: set calibration.batch_size to {max(fits, 1)} or less (or null: fitted), or "
                        "raise memory_budget_mb")
    size = max(1, min(want, fits))
    log.log(logging.INFO if size < want and batch_size is None and len(x) > size else logging.DEBUG,
            "calibrate: %d images a pass (%s an image, budget %s)", size, mb(per_image), mb(budget))
    return size


def collect_histograms(prep_onnx: Path, x: np.ndarray, cfg: CalibrationConfig, entropy: bool,
                       op_types=CALIBRATED_OP_TYPES, counts: bool = True,
                       attention: bool = True, residual: bool = False,
                       budget: int | None = None) -> tuple[list[str], CalibrationHistograms, int]:
    """One pass of model inputs `x` (N, C, H, W) through the model, `cfg.batch_size` images a run (`pass_size`:
    fitted to `budget` bytes when it is None), every calibrated tensor into `CalibrationHistograms` (ORT's |x|
    histogram and, if `entropy`, its signed one; with `counts=False`, min/max only); `attention`: the attention
    MatMuls' inputs too; `residual`: the residual Adds' skip inputs too.
    Returns (calibrated tensor names, histograms, images a run)."""
    import onnxruntime as ort
    import torch

    with tempfile.TemporaryDirectory(prefix="vitq-calib-") as scratch:
        calibrater = _inputs_calibrater(attention, residual)(  # ORT's calibrater, measuring the inputs of `op_types`, as outputs
            str(prep_onnx),
            op_types_to_calibrate=list(op_types),
            augmented_model_path=str(Path(scratch) / "augmented.onnx"),
            method="percentile",
            symmetric=True,
        )
        calibrater.augment_graph()
        names = sorted(calibrater.tensors_to_calibrate)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT's calibrater: its values
        options.intra_op_num_threads = parallel.session_threads()  # a recovery variant's calibration: its share
        session = ort.InferenceSession(calibrater.augmented_model_path, options, providers=["CPUExecutionProvider"])
        del calibrater
    histograms = CalibrationHistograms(cfg.num_bins, cfg.num_quantized_bins, signed=entropy, counts=counts)
    n, size = len(x), pass_size(session, x, cfg.batch_size, budget)
    batches = range(0, n, size)
    progress = Progress(log, "calibrate: batch", len(batches))
    outputs: dict[str, np.ndarray] = {}  # the buffers ORT writes every full batch into (no allocation per run)
    binding = session.io_binding()
    for lo in batches:
        batch = np.ascontiguousarray(x[lo : lo + size])
        if len(batch) == size and outputs:
            binding.bind_cpu_input(INPUT_NAME, batch)
            session.run_with_iobinding(binding)
            values = outputs
        else:
            values = dict(zip((o.name for o in session.get_outputs()), session.run(None, {INPUT_NAME: batch})))
            if len(batch) == size:
                outputs = values
                for name, buf in outputs.items():
                    binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        with torch.inference_mode():
            for name in names:
                histograms.collect(name, torch.from_numpy(values[name]), batch=f"calibration images {lo}-{lo + len(batch) - 1}")
        progress.step(f"({min(lo + size, n)} images)")
    del session, binding
    return names, histograms, size


def attention_probabilities(prep_onnx: Path, names) -> set[str]:
    """The calibrated tensors that are softmax outputs (attention probabilities, read by probs @ v). Every table
    gives them their observed range (minmax): they lie in [0, 1] and the few large ones carry the attention,
    which a clipping method cuts (on the demo model entropy put them at 0.30-0.40 and the 99.999th percentile
    at 0.60-0.98 where the maxima are 0.91-1.00; before this rule, `make demo` with a defined entropy recipe
    quantizing attention scored 15.9 dB SQNR, 28.4 dB with it).
    Their entropy search is skipped. A softmax output that only changes layout on its way to the MatMul (Transpose,
    Reshape, ...: timm efficientvit's cascaded group attention reads `softmax.transpose(-2, -1)`) counts too."""
    import onnx

    graph = onnx.load(str(prep_onnx), load_external_data=False).graph
    probabilities = set()
    for n in graph.node:  # graph order: a layout op's input is seen before it
        if n.op_type == "Softmax" or (n.op_type in _LAYOUT_OPS and n.input and n.input[0] in probabilities):
            probabilities.add(n.output[0])
    return probabilities & set(names)


_LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")  # same values, other layout


def _entropy_ranges(histograms: CalibrationHistograms, names: list[str]) -> dict[str, tuple[float, float]]:
    """The entropy (KL) threshold of every tensor, with progress (after the pass, the slowest part)."""
    progress = Progress(log, "calibrate: entropy search, tensor", len(names))
    ranges = {}
    for name in names:
        ranges[name] = histograms.entropy_range(name)
        progress.step()
    return ranges


def calibrate(prep_onnx: Path, model_dir: Path, data_dir: Path, cfg: CalibrationConfig, out_dir: Path,
              extra_percentiles: tuple[float, ...] = (), attention: bool = True,
              residual: bool = False, budget: int | None = None) -> CalibrationResult:
    """The calibrate stage: the workspace's calibration split, preprocessed as the model expects. `residual`: also
    the skip inputs of residual Adds (a defined recipe with `qdq_placement: tensorrt`)."""
    spec = load_model_spec(model_dir)
    split = load_split(data_dir, "calibration")
    if len(split.images) == 0:
        raise DataError("the calibration split is empty; calibration needs at least one image")
    return calibrate_inputs(prep_onnx, model_inputs(split.images, spec.mean, spec.std), cfg, out_dir, extra_percentiles,
                            attention, residual, budget)


def calibrate_inputs(prep_onnx: Path, x: np.ndarray, cfg: CalibrationConfig, out_dir: Path,
                     extra_percentiles: tuple[float, ...] = (), attention: bool = True,
                     residual: bool = False, budget: int | None = None) -> CalibrationResult:
    """Write the calibration tables `cfg.methods` of the model `prep_onnx` into `out_dir`, from model inputs
    `x` (N, C, H, W), one pass; and a percentile table at each of `extra_percentiles` (recipes' overrides),
    from the same |x| histograms. `attention`: also the ranges of attention's activation-activation MatMul
    inputs (recipes with `quantize_attention`); `residual`: also the skip inputs of residual Adds (recipes with
    `qdq_placement: tensorrt`)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    if len(x) == 0:
        raise DataError("the calibration inputs are empty; calibration needs at least one image")
    start = time.perf_counter()
    n = len(x)
    counts = bool(set(cfg.methods) - {"minmax"}) or bool(extra_percentiles)  # minmax alone: no histogram to count
    names, histograms, batch = collect_histograms(prep_onnx, x, cfg, "entropy" in cfg.methods, counts=counts,
                                                  attention=attention, residual=residual, budget=budget)

    enum = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}
    minmax = histograms.minmax_ranges()
    probabilities = attention_probabilities(prep_onnx, names)
    ranges = {"minmax": minmax}
    if "percentile" in cfg.methods:
        ranges["percentile"] = histograms.percentile_ranges(cfg.percentile)
    if "entropy" in cfg.methods:
        ranges["entropy"] = _entropy_ranges(histograms, [t for t in names if t not in probabilities])
    # file name -> (method, ranges)
    tables: dict[str, tuple[CalibrationMethod, dict[str, tuple[float, float]]]] = {
        table_path(".", m).name: (enum[m], ranges[m]) for m in cfg.methods}
    for pct in extra_percentiles:  # recipes' percentile overrides: the same histograms, no extra pass
        tables[table_path(".", "percentile", pct).name] = (CalibrationMethod.Percentile, histograms.percentile_ranges(pct))
    for _, method_ranges in tables.values():  # attention probabilities: their observed range in every table
        method_ranges.update({t: minmax[t] for t in probabilities})
    with atomic_dir(out_dir) as tmp:
        if counts:
            histograms.save(tmp / HISTOGRAMS)
        for file_name, (method, method_ranges) in tables.items():
            data = {
                t: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
                for t, (lo, hi) in method_ranges.items()
            }
            save_tensors_data(TensorsData(method, data), tmp / file_name)
        result = CalibrationResult(
            methods=list(cfg.methods),
            images=n,
            tensors=len(names),
            op_types=list(CALIBRATED_OP_TYPES),
            percentile=cfg.percentile,
            extra_percentiles=[float(x) for x in extra_percentiles],
            histograms_sha256=histograms.digest() if counts else None,
            attention=attention,
            residual=residual,
            batch_size=batch,
        )
        write_json(tmp / "calibration.json", asdict(result))
    log.info(
        "calibrate: %d tensors over %d images -> %s tables (%.1fs)",
        len(names), n, ", ".join(Path(f).stem for f in tables), time.perf_counter() - start,
    )
    return result


def load_calibration_result(calibration_dir: Path) -> CalibrationResult:
    return CalibrationResult(**read_json(Path(calibration_dir) / "calibration.json"))
