"""Calibration stage: one pass over the calibration split, every calibration table at once.

ONNX Runtime's own pieces do the work: `HistogramCalibrater` selects and exposes the tensors to
measure, two `HistogramCollector`s (|x| histogram for percentile, signed histogram for entropy/KL)
accumulate batch by batch, and the tables are written with `save_tensors_data`, the format
`quantize_static(calibration_cache_path=...)` reads. Min/max comes from the same histograms, and so
does a percentile table at each percentile a defined recipe overrides (`percentile-<p>.json`).
Every table is symmetric-ready: the static recipes quantize activations symmetrically (zero point 0).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tasks._progress import Progress
from tasks._io import atomic_dir, quiet_stdout, read_json, write_json
from tasks.data import load_split, model_inputs
from tasks.export import INPUT_NAME
from tasks.model import load_model_spec
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


def table_path(calibration_dir: Path, method: str, percentile: float | None = None) -> Path:
    """The table of `method`; with `percentile` (a recipe's override), the percentile table at that percentile."""
    return Path(calibration_dir) / (f"{method}.json" if percentile is None else f"{method}-{float(percentile)!r}.json")


def collect_histograms(prep_onnx: Path, x: np.ndarray, cfg: CalibrationConfig, entropy: bool, op_types=CALIBRATED_OP_TYPES):
    """One pass of model inputs `x` (N, C, H, W) through the model, batch by batch, into an |x|
    histogram collector (percentile, min/max) and, if `entropy`, a signed one (entropy/KL).
    Returns (calibrated tensor names, abs collector, signed collector or None)."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater, HistogramCollector

    with tempfile.TemporaryDirectory(prefix="vitq-calib-") as scratch:
        calibrater = HistogramCalibrater(
            str(prep_onnx),
            op_types_to_calibrate=list(op_types),
            augmented_model_path=str(Path(scratch) / "augmented.onnx"),
            method="percentile",
            symmetric=True,
        )
        calibrater.augment_graph()
        calibrater.create_inference_session()
        session = calibrater.infer_session
        names = sorted(calibrater.tensors_to_calibrate)
        abs_hist = HistogramCollector("percentile", True, cfg.num_bins, cfg.num_quantized_bins, cfg.percentile, "same")
        value_hist = HistogramCollector("entropy", True, cfg.num_bins, cfg.num_quantized_bins, cfg.percentile, "same")
        n = len(x)
        batches = range(0, n, cfg.batch_size)
        progress = Progress(log, "calibrate: batch", len(batches))
        for i, lo in enumerate(batches, 1):
            outputs = dict(zip((o.name for o in session.get_outputs()), session.run(None, {INPUT_NAME: x[lo : lo + cfg.batch_size]})))
            batch = {name: outputs[name] for name in names}
            with quiet_stdout():  # the collectors print per call
                abs_hist.collect(batch)
                if entropy:
                    value_hist.collect(batch)
            progress.step(f"({min(lo + cfg.batch_size, n)} images)")
        del calibrater, session
    return names, abs_hist, value_hist if entropy else None


def _entropy_ranges(value_hist, chunk: int = 16) -> dict[str, tuple[float, float]]:
    """The entropy (KL) threshold search of ONNX Runtime's collector, a chunk of tensors at a time so that
    its progress (the slowest part of calibration) is shown."""
    hists = value_hist.histogram_dict
    names = list(hists)
    progress = Progress(log, "calibrate: entropy search, tensor", len(names))
    ranges: dict[str, tuple[float, float]] = {}
    try:
        for i in range(0, len(names), chunk):
            part = names[i : i + chunk]
            value_hist.histogram_dict = {t: hists[t] for t in part}
            ranges.update({t: r[:2] for t, r in value_hist.compute_collection_result().items()})
            progress.step(n=len(part))
    finally:
        value_hist.histogram_dict = hists
    return ranges


def calibrate(prep_onnx: Path, model_dir: Path, data_dir: Path, cfg: CalibrationConfig, out_dir: Path,
              extra_percentiles: tuple[float, ...] = ()) -> CalibrationResult:
    """The calibrate stage: the workspace's calibration split, preprocessed as the model expects."""
    spec = load_model_spec(model_dir)
    split = load_split(data_dir, "calibration")
    if len(split.images) == 0:
        raise DataError("the calibration split is empty; calibration needs at least one image")
    return calibrate_inputs(prep_onnx, model_inputs(split.images, spec.mean, spec.std), cfg, out_dir, extra_percentiles)


def calibrate_inputs(prep_onnx: Path, x: np.ndarray, cfg: CalibrationConfig, out_dir: Path,
                     extra_percentiles: tuple[float, ...] = ()) -> CalibrationResult:
    """Write the calibration tables `cfg.methods` of the model `prep_onnx` into `out_dir`, from model inputs
    `x` (N, C, H, W), one pass; and a percentile table at each of `extra_percentiles` (recipes' overrides),
    from the same |x| histograms."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    if len(x) == 0:
        raise DataError("the calibration inputs are empty; calibration needs at least one image")
    start = time.perf_counter()
    n = len(x)
    names, abs_hist, value_hist = collect_histograms(prep_onnx, x, cfg, "entropy" in cfg.methods)

    enum = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}
    tables: dict[str, tuple[CalibrationMethod, dict[str, tuple[float, float]]]] = {}  # file name -> (method, ranges)
    with quiet_stdout():
        hist = abs_hist.get_histogram_dict()
        ranges = {"minmax": {t: (h[2], h[3]) for t, h in hist.items()}}
        if "percentile" in cfg.methods:
            ranges["percentile"] = {t: r[:2] for t, r in abs_hist.compute_collection_result().items()}
        if "entropy" in cfg.methods:
            ranges["entropy"] = _entropy_ranges(value_hist)
        tables.update({table_path(".", m).name: (enum[m], ranges[m]) for m in cfg.methods})
        for pct in extra_percentiles:  # recipes' percentile overrides: the same histograms, no extra pass
            abs_hist.percentile = pct
            tables[table_path(".", "percentile", pct).name] = (
                CalibrationMethod.Percentile, {t: r[:2] for t, r in abs_hist.compute_collection_result().items()})
    with atomic_dir(out_dir) as tmp:
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
        )
        write_json(tmp / "calibration.json", asdict(result))
    log.info(
        "calibrate: %d tensors over %d images -> %s tables (%.1fs)",
        len(names), n, ", ".join(Path(f).stem for f in tables), time.perf_counter() - start,
    )
    return result


def load_calibration_result(calibration_dir: Path) -> CalibrationResult:
    return CalibrationResult(**read_json(Path(calibration_dir) / "calibration.json"))
