"""The task axis: what a model's outputs mean, how a variant's outputs are judged against FP32's, and
which budget keys apply. One registry entry per task (`TASKS`), looked up by params.yaml's `task.kind`.

- classification: outputs (N, classes); top-1 against labels (when the data has them), agreement with
  FP32's arg-max otherwise; budget `max_top1_drop` (points) and `min_sqnr_db`.
- dense: outputs (N, K, H, W) (mask logits, segmentation logits, feature maps); SQNR, PSNR, cosine; mask IoU
  against FP32's masks; mIoU against ground-truth masks when the data has them; budget `min_mask_iou`,
  `max_miou_drop` (points, needs masks) and `min_sqnr_db`.
Either may add a user metric function (`task.metric`), given FP32's outputs, the variant's and the ground
truth (labels, masks or None); what it returns is recorded beside the built-in metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from vitq.errors import ConfigError, DataError

if TYPE_CHECKING:
    from vitq.config import TaskConfig

IGNORE_LABEL = 255  # mask pixels that no IoU counts


@dataclass(frozen=True)
class OutputMetrics:
    top1: float | None
    top1_drop: float | None  # percentage points
    agreement: float
    cosine: float
    sqnr_db: float
    psnr_db: float | None = None  # dense outputs only
    mask_iou: float | None = None  # dense: IoU of the masks with FP32's masks
    miou: float | None = None  # dense: mean IoU against ground-truth masks (None without masks)
    miou_drop: float | None = None  # dense: FP32 mIoU minus the variant's, percentage points
    extra: dict = field(default_factory=dict)  # task.metric: the user's metrics, by name


@dataclass(frozen=True)
class Budget:
    """The accuracy budget a variant is judged on; `section` names where it came from (validate / recovery)."""

    section: str = "validate"
    max_top1_drop: float | None = 1.0  # classification: points
    min_sqnr_db: float | None = None  # both: output SQNR floor, dB
    min_mask_iou: float | None = None  # dense: IoU of the variant's masks with FP32's, 0..1
    max_miou_drop: float | None = None  # dense: points of mIoU against ground-truth masks

    @classmethod
    def of(cls, cfg, section: str, task: str) -> Budget:
        """The budget of a ValidateConfig / RecoveryConfig for `task`: the other task's keys do not apply."""
        if task == "dense":
            return cls(section, None, cfg.min_sqnr_db, cfg.min_mask_iou, cfg.max_miou_drop)
        return cls(section, cfg.max_top1_drop, cfg.min_sqnr_db, None, None)


class Task(Protocol):
    name: str
    budget_keys: tuple[str, ...]

    def truth(self, split) -> np.ndarray | None:
        """The ground truth of a data split this task measures against (None: the data has none)."""

    def compare(self, ref: np.ndarray, out: np.ndarray, truth: np.ndarray | None,
                reference: OutputMetrics | None) -> OutputMetrics:
        """Metrics of outputs `out` against FP32's `ref` (and `truth`); `reference`: FP32's own metrics."""

    def reasons(self, m: OutputMetrics, budget: Budget) -> list[str]:
        """Why `m` misses `budget` (empty: it meets it)."""


def _sqnr_reason(m: OutputMetrics, budget: Budget) -> list[str]:
    if budget.min_sqnr_db is not None and m.sqnr_db < budget.min_sqnr_db:
        return [f"SQNR {m.sqnr_db:.1f} dB < {budget.section}.min_sqnr_db {budget.min_sqnr_db}"]
    return []


def _sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    noise = float(np.sum((ref - out) ** 2))
    with np.errstate(divide="ignore"):  # an all-zero reference: -inf dB
        return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


def _cosine(ref: np.ndarray, out: np.ndarray) -> float:
    r, o = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    return float(np.mean(np.sum(r * o, axis=1) / np.maximum(norms, 1e-12)))


class Fidelity:
    """SQNR and cosine of one output against FP32's, accumulated a batch at a time (float64): the same numbers
    `_sqnr_db` and `_cosine` give on the whole arrays, holding one batch."""

    def __init__(self) -> None:
        self.signal = self.noise = self.cosine_sum = 0.0
        self.images = 0

    def add(self, ref: np.ndarray, out: np.ndarray) -> None:
        if ref.shape != out.shape:
            raise DataError(f"the variant's output has shape {tuple(out.shape[1:])} per image, FP32's "
                            f"{tuple(ref.shape[1:])}")
        r = np.asarray(ref, np.float64).reshape(len(ref), -1)
        o = np.asarray(out, np.float64).reshape(len(out), -1)
        self.signal += float(np.sum(r**2))
        self.noise += float(np.sum((r - o) ** 2))
        norms = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
        self.cosine_sum += float(np.sum(np.sum(r * o, axis=1) / np.maximum(norms, 1e-12)))
        self.images += len(r)

    @property
    def sqnr_db(self) -> float:
        with np.errstate(divide="ignore"):  # an all-zero reference: -inf dB
            return float("inf") if self.noise == 0 else float(10 * np.log10(self.signal / self.noise))

    @property
    def cosine(self) -> float:
        return self.cosine_sum / max(self.images, 1)


@dataclass(frozen=True)
class Classification:
    name: str = "classification"
    budget_keys: tuple[str, ...] = ("max_top1_drop", "min_sqnr_db")

    def truth(self, split) -> np.ndarray | None:
        labels = split.labels
        return labels if len(labels) and (labels >= 0).all() else None

    def compare(self, ref, out, truth, reference):
    
        if ref.ndim != 2:
            raise DataError(f"task.kind is 'classification' but the model's outputs have shape {tuple(ref.shape[1:])} "
                            "per image; classification needs (classes,): set task.kind: dense for output maps")
        ref, out = ref.astype(np.float64), out.astype(np.float64)
        top1 = top1_drop = None
        if truth is not None:
            if ref.shape[1] <= int(truth.max()):
                raise DataError(f"the data has label {int(truth.max())} but the model has {ref.shape[1]} outputs; "
                                "set model.num_classes to the data's classes, or give data without labels")
            top1 = float(np.mean(out.argmax(1) == truth))
            ref_top1 = reference.top1 if reference is not None else float(np.mean(ref.argmax(1) == truth))
            top1_drop = round(100.0 * (ref_top1 - top1), 6) if ref_top1 is not None else None
        return OutputMetrics(top1=top1, top1_drop=top1_drop, agreement=float(np.mean(ref.argmax(1) == out.argmax(1))),
                             cosine=_cosine(ref, out), sqnr_db=_sqnr_db(ref, out))

    def reasons(self, m, budget):
        reasons = []
        if budget.max_top1_drop is not None:
            drop = m.top1_drop if m.top1_drop is not None else 100.0 * (1.0 - m.agreement)
            if drop > budget.max_top1_drop:
                what = "top-1 drop" if m.top1_drop is not None else "disagreement with FP32"
                reasons.append(f"{what} {drop:.2f} pts > {budget.section}.max_top1_drop {budget.max_top1_drop}")
        return reasons + _sqnr_reason(m, budget)


@dataclass(frozen=True)
class Dense:
    """Output maps (N, K, H, W). `masks`: threshold (each channel one mask's logits, in the mask where
    > `mask_threshold`; SAM-style) or argmax (channels are classes). Ground-truth label maps: 0 background,
    k >= 1 the k-th mask (threshold: channel k-1; argmax: class k), 255 ignored."""

    name: str = "dense"
    budget_keys: tuple[str, ...] = ("min_mask_iou", "max_miou_drop", "min_sqnr_db")
    masks: str = "threshold"
    mask_threshold: float = 0.0

    def truth(self, split) -> np.ndarray | None:
        return split.masks

    def _masks(self, maps: np.ndarray) -> np.ndarray:
        """(N, M, H, W) bool: one plane per mask (threshold: per channel; argmax: per class)."""
        if self.masks == "argmax":
            labels = maps.argmax(1)
            return labels[:, None] == np.arange(maps.shape[1])[None, :, None, None]
        return maps > self.mask_threshold

    def _truth_masks(self, truth: np.ndarray, channels: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Ground-truth label maps (N, H', W') as (N, M, H, W) bool planes and the valid-pixel mask (N, 1, H, W)."""
        if truth.shape[1:] != size:  # nearest-neighbour resize to the output maps' size
            rows = (np.arange(size[0]) * truth.shape[1] // size[0])
            cols = (np.arange(size[1]) * truth.shape[2] // size[1])
            truth = truth[:, rows][:, :, cols]
        valid = (truth != IGNORE_LABEL)[:, None]
        if self.masks == "argmax":
            planes = truth[:, None] == np.arange(channels)[None, :, None, None]
        elif channels == 1:
            planes = (truth > 0)[:, None]
        else:
            planes = truth[:, None] == np.arange(1, channels + 1)[None, :, None, None]
        return planes, valid

    @staticmethod
    def _iou(a: np.ndarray, b: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Per-plane IoU (M,) over the whole set; NaN for a plane empty in both."""
        if valid is not None:
            a, b = a & valid, b & valid
        inter = np.logical_and(a, b).sum(axis=(0, 2, 3))
        union = np.logical_or(a, b).sum(axis=(0, 2, 3))
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)

    def compare(self, ref, out, truth, reference):
    
        if ref.ndim != 4:
            raise DataError(f"task.kind is 'dense' but the model's outputs have shape {tuple(ref.shape[1:])} per image; "
                            "dense needs maps (K, H, W): set task.kind: classification for (classes,) outputs")
        ref, out = ref.astype(np.float64), out.astype(np.float64)
        mse = float(np.mean((ref - out) ** 2))
        peak = float(ref.max() - ref.min())
        psnr = float("inf") if mse == 0 else float(10 * np.log10(max(peak, 1e-12) ** 2 / mse))
        ref_masks, out_masks = self._masks(ref), self._masks(out)
        union = np.logical_or(ref_masks, out_masks).sum()
        mask_iou = 1.0 if union == 0 else float(np.logical_and(ref_masks, out_masks).sum() / union)
        miou = miou_drop = None
        if truth is not None:
            planes, valid = self._truth_masks(truth, ref.shape[1], ref.shape[2:])
            per_mask = self._iou(out_masks, planes, valid)
            miou = float(np.nanmean(per_mask)) if np.isfinite(per_mask).any() else 1.0
            if reference is not None and reference.miou is not None:
                miou_drop = round(100.0 * (reference.miou - miou), 6)
            else:
                ref_iou = self._iou(ref_masks, planes, valid)
                ref_miou = float(np.nanmean(ref_iou)) if np.isfinite(ref_iou).any() else 1.0
                miou_drop = round(100.0 * (ref_miou - miou), 6)
        return OutputMetrics(
            top1=None, top1_drop=None, agreement=float(np.mean(ref.argmax(1) == out.argmax(1))),
            cosine=_cosine(ref, out), sqnr_db=_sqnr_db(ref, out), psnr_db=psnr, mask_iou=mask_iou,
            miou=miou, miou_drop=miou_drop,
        )

    def reasons(self, m, budget):
        reasons = []
        if budget.min_mask_iou is not None and (m.mask_iou is None or m.mask_iou < budget.min_mask_iou):
            reasons.append(f"mask IoU vs FP32 {m.mask_iou:.4f} < {budget.section}.min_mask_iou {budget.min_mask_iou}")
        if budget.max_miou_drop is not None:
            if m.miou_drop is None:
                reasons.append(f"{budget.section}.max_miou_drop needs ground-truth masks; the validation data has none")
            elif m.miou_drop > budget.max_miou_drop:
                reasons.append(f"mIoU drop {m.miou_drop:.2f} pts > {budget.section}.max_miou_drop {budget.max_miou_drop}")
        return reasons + _sqnr_reason(m, budget)


def accuracy_loss_pts(metrics: dict) -> float | None:
    """Points of accuracy a variant lost (summary.json keys): top-1 drop, or dense outputs' mIoU drop; without
    ground truth the disagreement with FP32 (classification) or 100 x (1 - mask IoU with FP32's masks) (dense)."""
    for key in ("top1_drop", "miou_drop"):
        if metrics.get(key) is not None:
            return float(metrics[key])
    for key in ("mask_iou", "agreement"):
        if metrics.get(key) is not None:
            return 100 * (1 - float(metrics[key]))
    return None


TASKS: dict[str, type] = {"classification": Classification, "dense": Dense}


def get_task(cfg: TaskConfig | None = None) -> Task:
    """The task object of params.yaml's `task` section (default: classification)."""
    if cfg is None:
        return Classification()
    if cfg.kind not in TASKS:
        raise ConfigError(f"unknown task.kind {cfg.kind!r}; allowed: {', '.join(TASKS)}")
    if cfg.kind == "dense":
        return Dense(masks=cfg.masks, mask_threshold=cfg.mask_threshold)
    return TASKS[cfg.kind]()


def user_metric(spec: str | None, root=None):
    """The user's metric function of `task.metric` (`file.py:function` or `package.module:function`), or None."""
    if not spec:
        return None
    from vitq.callables import load_callable

    return load_callable(spec, "task.metric", root)


def extra_metrics(fn, ref: np.ndarray, out: np.ndarray, truth: np.ndarray | None) -> dict[str, float]:
    """What the user's metric function returns for one comparison: a number, or a dict of named numbers."""
    if fn is None:
        return {}
    name = getattr(fn, "__name__", "metric")
    try:
        value = fn(ref, out, truth)
    except Exception as exc:  # the user's code: one line naming it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"task.metric {name!r} raised {type(exc).__name__}: {first}") from None
    values = value if isinstance(value, dict) else {name: value}
    out_values = {}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise DataError(f"task.metric {name!r} returned {k!r}: {v!r}; it must return a number or a dict of numbers")
        out_values[str(k)] = float(v)
    return out_values
