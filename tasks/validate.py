"""Validate stage: each variant against the FP32 model on the validation split, judged by the task
(tasks/task_kinds.py: classification or dense) against the budget in params.yaml's `validate` section.

Classification (logits (N, classes)): top1 (with labels), top1_drop (points), agreement (arg-max vs
FP32), cosine (per image), sqnr_db = 10 log10(sum ref^2 / sum (ref - out)^2).
Dense (maps (N, K, H, W)): sqnr_db, psnr_db (peak = FP32's value range), cosine, mask_iou (the variant's
masks vs FP32's), miou / miou_drop (against ground-truth masks, when the data has them); agreement is per pixel.
The FP32 reference record says which task (and user metric) judged it; every variant is judged the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from vitq.tasks._io import read_json, write_json
from vitq.tasks.targets.onnx import backend as onnx_backend
from vitq.tasks.data import load_split, model_inputs
from vitq.tasks.model import load_model_spec
from vitq.tasks.task_kinds import (Budget, Classification, Dense, OutputMetrics, Task, extra_metrics, get_task,
                                   user_metric)
from vitq.config import TaskConfig, ValidateConfig

log = logging.getLogger("vitq.validate")

REFERENCE = "fp32"
MASK_THRESHOLD = 0.0  # dense outputs: a pixel is "in the mask" where the map exceeds this (mask logits)


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
    """Compare variant outputs `out` with FP32's `ref`: logits (N, classes) as classification, maps
    (N, C, H, W) as dense (threshold 0) without ground truth. The stages judge through `evaluate` and the task."""
    if ref.ndim == 4:
        return Dense().compare(ref, out, None, None)
    reference = OutputMetrics(top1=ref_top1, top1_drop=None, agreement=1.0, cosine=1.0, sqnr_db=float("inf"))
    return Classification().compare(ref, out, labels, reference if ref_top1 is not None else None)


def budget_reasons(m: OutputMetrics, max_top1_drop: float, min_sqnr_db: float | None) -> list[str]:
    """Why classification metrics `m` miss the budget (empty: they meet it). Without labels the top-1 budget
    applies to the disagreement with FP32, in points."""
    return Classification().reasons(m, Budget("validate", max_top1_drop, min_sqnr_db))


@dataclass(frozen=True)
class Judge:
    """How outputs are judged: the task, its user metric and the ground truth of the validation split."""

    task: Task
    truth: np.ndarray | None
    metric: Callable | None = None

    def evaluate(self, ref: np.ndarray, out: np.ndarray, reference: OutputMetrics | None) -> OutputMetrics:
        m = self.task.compare(ref, out, self.truth, reference)
        extra = extra_metrics(self.metric, ref, out, self.truth)
        return replace(m, extra=extra) if extra else m

    def reasons(self, m: OutputMetrics, budget: Budget) -> list[str]:
        return self.task.reasons(m, budget)


def task_record(task: TaskConfig) -> dict:
    return task.model_dump(mode="json")


def load_task(reference_dir: Path) -> TaskConfig:
    """The task the FP32 reference was judged with (recorded by the reference stage)."""
    from vitq.config import TaskConfig

    d = load_validation(reference_dir, REFERENCE).details.get("task")
    return TaskConfig(**d) if d else TaskConfig()


def judge_for(task: TaskConfig, split, root: Path | None = None) -> Judge:
    """The Judge of `task` on a data split (its labels or masks)."""
    kind = get_task(task)
    return Judge(kind, kind.truth(split), user_metric(task.metric, root))


def validation_judge(model_dir: Path, data_dir: Path, task: TaskConfig, split_name: str = "validation",
                     index: np.ndarray | None = None) -> tuple[np.ndarray, Judge]:
    """Model inputs (N, C, H, W) of a split (or its rows `index`) and the Judge with its ground truth. Labels
    count only when the model's classes are the data's (a 1000-class model on 10 folders: agreement only)."""
    spec = load_model_spec(model_dir)
    split = load_split(data_dir, split_name)
    if index is not None:
        split = split.subset(index)
    judge = judge_for(task, split)
    if task.kind == "classification" and spec.num_classes != len(spec.classes):
        judge = replace(judge, truth=None)
    return model_inputs(split.images, spec.mean, spec.std), judge


def _labels(model_dir: Path, data_dir: Path) -> tuple[np.ndarray, np.ndarray | None]:
    x, judge = validation_judge(model_dir, data_dir, TaskConfig())
    return x, judge.truth


def reference_outputs(fp32_onnx: Path, model_dir: Path, data_dir: Path, cfg: ValidateConfig, out_dir: Path,
                      task: TaskConfig | None = None) -> ValidationResult:
    """FP32 ONNX Runtime outputs on the validation split, saved once for every variant to compare against, with
    FP32's own metrics (top-1, or mIoU against ground-truth masks) and the task that judges them."""
    from vitq.tasks._io import atomic_file

    task = task or TaskConfig()
    x, judge = validation_judge(model_dir, data_dir, task)
    outputs = onnx_backend.run_batched(onnx_backend.session(fp32_onnx), x, cfg.batch_size)
    metrics = judge.evaluate(outputs, outputs, None)
    with atomic_file(Path(out_dir) / f"{REFERENCE}.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, outputs)
    result = ValidationResult(name=REFERENCE, images=len(x), metrics=metrics, passed=True, reasons=[],
                              details={"task": task_record(task)})
    write_json(Path(out_dir) / f"{REFERENCE}.json", asdict(result))
    log.info("validate: fp32 %s on %d images", _headline(metrics), len(x))
    return result


def _headline(m: OutputMetrics) -> str:
    if m.mask_iou is not None:
        return f"mIoU {'n/a' if m.miou is None else f'{m.miou:.4f}'}"
    return f"top-1 {'n/a' if m.top1 is None else f'{m.top1:.4f}'}"


def judge_variant(name: str, outputs: np.ndarray, judge: Judge, reference_dir: Path, budget: Budget,
                  images: int, **extra) -> ValidationResult:
    """Judge a variant's outputs against the FP32 reference in `reference_dir` and the budget."""
    ref = np.load(Path(reference_dir) / f"{REFERENCE}.npy")
    m = judge.evaluate(ref, outputs, load_validation(reference_dir, REFERENCE).metrics)
    reasons = judge.reasons(m, budget)
    return ValidationResult(name=name, images=images, metrics=m, passed=not reasons, reasons=reasons, **extra)


def validate_variant(
    name: str, variant_onnx: Path, model_dir: Path, data_dir: Path, cfg: ValidateConfig, out_dir: Path,
    predict: Callable[[Path, np.ndarray, int], np.ndarray] | None = None, reference_dir: Path | None = None,
) -> ValidationResult:
    """Run the variant on the validation split and judge it against the budget. `predict(path, x, batch_size)`:
    its target's runtime (default: ONNX Runtime). `reference_dir`: where the FP32 outputs are (default: out_dir)."""
    reference_dir = reference_dir or out_dir
    task = load_task(reference_dir)
    x, judge = validation_judge(model_dir, data_dir, task)
    if predict is None:
        predict = lambda path, x, batch_size: onnx_backend.run_batched(onnx_backend.session(path), x, batch_size)  # noqa: E731
    outputs = predict(variant_onnx, x, cfg.batch_size)
    result = judge_variant(name, outputs, judge, reference_dir, Budget.of(cfg, "validate", task.kind), len(x))
    write_json(Path(out_dir) / f"{name}.json", asdict(result))
    log.info("validate: %s %s -> %s", name, summary_line(result.metrics), "pass" if result.passed else "FAIL")
    return result


def summary_line(m: OutputMetrics) -> str:
    """One log line of the metrics that matter for the task."""
    if m.mask_iou is not None:
        miou = "" if m.miou is None else f"mIoU {m.miou:.4f} (drop {m.miou_drop} pts), "
        return f"{miou}mask IoU vs FP32 {m.mask_iou:.4f}, SQNR {m.sqnr_db:.1f} dB, PSNR {m.psnr_db:.1f} dB"
    return f"top-1 {m.top1} (drop {m.top1_drop} pts), agreement {m.agreement:.4f}, SQNR {m.sqnr_db:.1f} dB"


def load_reference(reference_dir: Path) -> tuple[np.ndarray, float | None]:
    """The FP32 logits every variant is compared with, and the FP32 top-1."""
    return np.load(Path(reference_dir) / f"{REFERENCE}.npy"), load_validation(reference_dir, REFERENCE).metrics.top1


def load_validation(validation_dir: Path, name: str) -> ValidationResult:
    d = read_json(Path(validation_dir) / f"{name}.json")
    return ValidationResult(**{**d, "metrics": OutputMetrics(**d["metrics"])})
