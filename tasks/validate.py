"""Validate stage: each variant against the FP32 model on the labelled validation split.

Metrics (all on the logits of the whole validation split):
- top1: fraction correct (None when the model's classes are not the data's classes)
- top1_drop: FP32 top-1 minus variant top-1, in percentage points
- agreement: fraction of images whose arg-max matches FP32
- cosine: mean per-image cosine similarity of the logits
- sqnr_db: 10 log10(sum ref^2 / sum (ref - out)^2)
Dense outputs (N, C, H, W: feature maps, masks, segmentation logits) also get
- psnr_db: 10 log10(peak^2 / MSE), peak = the FP32 map's value range
- mask_iou: IoU of the masks `map > MASK_THRESHOLD` (mask logits: 0), variant vs FP32
and there agreement is per pixel (arg-max over C) and top1 does not apply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tasks._io import read_json, write_json
from tasks.backends import onnx as onnx_backend
from tasks.data import load_split, model_inputs
from tasks.model import load_model_spec
from vitq.config import ValidateConfig

log = logging.getLogger("vitq.validate")

REFERENCE = "fp32"
MASK_THRESHOLD = 0.0  # dense outputs: a pixel is "in the mask" where the map exceeds this (mask logits)


@dataclass(frozen=True)
class OutputMetrics:
    top1: float | None
    top1_drop: float | None  # percentage points
    agreement: float
    cosine: float
    sqnr_db: float
    psnr_db: float | None = None  # dense outputs only
    mask_iou: float | None = None  # dense outputs only


@dataclass(frozen=True)
class ValidationResult:
    name: str
    images: int
    metrics: OutputMetrics
    passed: bool
    reasons: list[str]  # why it failed the budget (empty when passed)
    runtime: str = "onnxruntime"  # what produced the outputs that were compared
    not_measured: dict[str, str] = field(default_factory=dict)  # check -> why it could not run here
    details: dict = field(default_factory=dict)  # e.g. the torch counterpart's metrics beside Core ML's


def compare_outputs(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None, ref_top1: float | None) -> OutputMetrics:
    """Compare variant logits `out` with FP32 logits `ref`, both (N, classes), or dense maps (N, C, H, W)."""
    if ref.ndim == 4:
        return _compare_dense(ref, out)
    ref = ref.astype(np.float64).reshape(len(ref), -1)
    out = out.astype(np.float64).reshape(len(out), -1)
    noise = np.sum((ref - out) ** 2)
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cosine = float(np.mean(np.sum(ref * out, axis=1) / np.maximum(norms, 1e-12)))
    agreement = float(np.mean(ref.argmax(1) == out.argmax(1)))
    top1 = top1_drop = None
    if labels is not None:
        top1 = float(np.mean(out.argmax(1) == labels))
        if ref_top1 is not None:
            top1_drop = round(100.0 * (ref_top1 - top1), 6)
    return OutputMetrics(top1=top1, top1_drop=top1_drop, agreement=agreement, cosine=cosine, sqnr_db=sqnr)


def _compare_dense(ref: np.ndarray, out: np.ndarray) -> OutputMetrics:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    mse = float(np.mean((ref - out) ** 2))
    noise = mse * ref.size
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))
    peak = float(ref.max() - ref.min())
    psnr = float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))
    a, b = ref > MASK_THRESHOLD, out > MASK_THRESHOLD
    union = np.logical_or(a, b).sum()
    iou = 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
    r, o = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    cosine = float(np.mean(np.sum(r * o, axis=1) / np.maximum(norms, 1e-12)))
    agreement = float(np.mean(ref.argmax(1) == out.argmax(1)))  # per pixel, over channels
    return OutputMetrics(top1=None, top1_drop=None, agreement=agreement, cosine=cosine, sqnr_db=sqnr,
                         psnr_db=psnr, mask_iou=iou)


def budget_reasons(m: OutputMetrics, max_top1_drop: float, min_sqnr_db: float | None) -> list[str]:
    """Why `m` misses the accuracy budget (empty: it meets it). Without labels the top-1 budget
    applies to the disagreement with FP32, in points."""
    reasons = []
    drop = m.top1_drop if m.top1_drop is not None else 100.0 * (1.0 - m.agreement)
    if drop > max_top1_drop:
        what = "top-1 drop" if m.top1_drop is not None else "disagreement with FP32"
        reasons.append(f"{what} {drop:.2f} pts > validate.max_top1_drop {max_top1_drop}")
    if min_sqnr_db is not None and m.sqnr_db < min_sqnr_db:
        reasons.append(f"SQNR {m.sqnr_db:.1f} dB < validate.min_sqnr_db {min_sqnr_db}")
    return reasons


def _labels(model_dir: Path, data_dir: Path) -> tuple[np.ndarray, np.ndarray | None]:
    spec = load_model_spec(model_dir)
    split = load_split(data_dir, "validation")
    labels = split.labels if spec.num_classes == len(spec.classes) else None
    return model_inputs(split.images, spec.mean, spec.std), labels


def reference_outputs(fp32_onnx: Path, model_dir: Path, data_dir: Path, cfg: ValidateConfig, out_dir: Path) -> ValidationResult:
    """FP32 ONNX Runtime logits on the validation split, saved once for every variant to compare against."""
    from tasks._io import atomic_file

    x, labels = _labels(model_dir, data_dir)
    logits = onnx_backend.run_batched(onnx_backend.session(fp32_onnx), x, cfg.batch_size)
    metrics = compare_outputs(logits, logits, labels, None)
    with atomic_file(Path(out_dir) / f"{REFERENCE}.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, logits)
    result = ValidationResult(name=REFERENCE, images=len(x), metrics=metrics, passed=True, reasons=[])
    write_json(Path(out_dir) / f"{REFERENCE}.json", asdict(result))
    log.info("validate: fp32 top-1 %s on %d images", metrics.top1, len(x))
    return result


def validate_variant(
    name: str, variant_onnx: Path, model_dir: Path, data_dir: Path, cfg: ValidateConfig, out_dir: Path,
    predict: Callable[[Path, np.ndarray, int], np.ndarray] | None = None, reference_dir: Path | None = None,
) -> ValidationResult:
    """Run the variant on the validation split and judge it against the budget. `predict(path, x, batch_size)`:
    its target's runtime (default: ONNX Runtime). `reference_dir`: where the FP32 outputs are (default: out_dir)."""
    x, labels = _labels(model_dir, data_dir)
    ref, ref_top1 = load_reference(reference_dir or out_dir)
    if predict is None:
        predict = lambda path, x, batch_size: onnx_backend.run_batched(onnx_backend.session(path), x, batch_size)  # noqa: E731
    logits = predict(variant_onnx, x, cfg.batch_size)
    m = compare_outputs(ref, logits, labels, ref_top1)
    reasons = budget_reasons(m, cfg.max_top1_drop, cfg.min_sqnr_db)
    result = ValidationResult(name=name, images=len(x), metrics=m, passed=not reasons, reasons=reasons)
    write_json(Path(out_dir) / f"{name}.json", asdict(result))
    log.info(
        "validate: %s top-1 %s (drop %s pts), agreement %.4f, SQNR %.1f dB -> %s",
        name, m.top1, m.top1_drop, m.agreement, m.sqnr_db, "pass" if result.passed else "FAIL",
    )
    return result


def load_reference(reference_dir: Path) -> tuple[np.ndarray, float | None]:
    """The FP32 logits every variant is compared with, and the FP32 top-1."""
    return np.load(Path(reference_dir) / f"{REFERENCE}.npy"), load_validation(reference_dir, REFERENCE).metrics.top1


def load_validation(validation_dir: Path, name: str) -> ValidationResult:
    d = read_json(Path(validation_dir) / f"{name}.json")
    return ValidationResult(**{**d, "metrics": OutputMetrics(**d["metrics"])})
