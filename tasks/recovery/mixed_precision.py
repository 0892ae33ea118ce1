"""Automatic mixed precision under an accuracy budget (recovery's keys for the task: `max_top1_drop`, or
`min_mask_iou` / `max_miou_drop` for dense outputs; `min_sqnr_db`):
the fewest layers back in float.

Starting from full INT8, layers return to float in sensitivity order. The candidates are nested
(the k most sensitive layers in float), so the smallest k that meets the budget is found by
bisection between full INT8 (k = 0) and every ranked layer in float (k = n): O(log n) builds,
whichever end the answer lies near (the forward walk and the reverse walk in one). A pruning pass
then tries each chosen layer back in INT8, largest MACs first, and keeps it there when the budget
still holds, so as much compute as possible stays in INT8.

Every candidate is judged on the real artifact: `evaluate(float_layers)` builds the Q/DQ ONNX with
those layers excluded and runs it in ONNX Runtime; results are memoised per set.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from vitq.tasks import task_kinds
from vitq.tasks.task_kinds import OutputMetrics
from vitq.tasks.validate import summary_line

log = logging.getLogger("vitq.recovery")


@dataclass(frozen=True)
class Budget:
    """recovery's budget; which keys apply is the task's (tasks/task_kinds.py)."""

    max_top1_drop: float | None = 1.0  # classification: points (disagreement with FP32 where labels do not apply)
    min_sqnr_db: float | None = None
    min_mask_iou: float | None = None  # dense: IoU with FP32's masks
    max_miou_drop: float | None = None  # dense: points of mIoU vs ground-truth masks
    task: str = "classification"

    @classmethod
    def of(cls, cfg, task: str) -> Budget:
        b = task_kinds.Budget.of(cfg, "recovery", task)
        return cls(b.max_top1_drop, b.min_sqnr_db, b.min_mask_iou, b.max_miou_drop, task)

    def reasons(self, m: OutputMetrics) -> list[str]:
        b = task_kinds.Budget("recovery", self.max_top1_drop, self.min_sqnr_db, self.min_mask_iou, self.max_miou_drop)
        return task_kinds.TASKS[self.task]().reasons(m, b)


@dataclass(frozen=True)
class MixedPrecisionResult:
    float_layers: list[str]  # in sensitivity order
    budget_met: bool
    metrics: OutputMetrics  # of the returned choice, on the search images
    evaluations: list[dict]  # every build: float_layers, top1_drop, agreement, sqnr_db, met
    seconds: float


def search_float_layers(
    ranking: list[str],
    evaluate: Callable[[tuple[str, ...]], OutputMetrics],
    budget: Budget,
    macs: dict[str, int],
) -> MixedPrecisionResult:
    """Smallest set of layers (from `ranking`, most sensitive first) to keep in float."""
    start = time.perf_counter()
    seen: dict[frozenset, OutputMetrics] = {}
    trace: list[dict] = []

    def met(layers) -> bool:
        key = frozenset(layers)
        if key not in seen:
            m = evaluate(tuple(n for n in ranking if n in key))
            seen[key] = m
            ok = not budget.reasons(m)
            trace.append({"float_layers": [n for n in ranking if n in key], "top1_drop": m.top1_drop,
                          "agreement": m.agreement, "sqnr_db": m.sqnr_db, "mask_iou": m.mask_iou,
                          "miou_drop": m.miou_drop, "met": ok})
            # At most: both ends, the bisection, then one pruning trial per chosen layer.
            bound = 2 + math.ceil(math.log2(max(len(ranking), 1))) + len(ranking)
            elapsed = time.perf_counter() - start
            log.info("mixed precision: build %d (at most %d; %.0fs elapsed, ETA at most %.0fs): %d float layer(s) -> %s: %s",
                     len(seen), bound, elapsed, elapsed / len(seen) * (bound - len(seen)), len(key), summary_line(m),
                     "meets budget" if ok else "outside budget")
        return not budget.reasons(seen[key])

    def result(layers, ok):
        chosen = [n for n in ranking if n in set(layers)]
        return MixedPrecisionResult(chosen, ok, seen[frozenset(chosen)], trace, round(time.perf_counter() - start, 1))

    if met(()):
        return result((), True)
    if not met(ranking):
        return result(ranking, False)
    lo, hi = 0, len(ranking)  # met(ranking[:lo]) is False, met(ranking[:hi]) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if met(ranking[:mid]) else (mid, hi)
    chosen = list(ranking[:hi])
    for layer in sorted(chosen, key=lambda n: (-macs.get(n, 0), ranking.index(n))):
        trial = [n for n in chosen if n != layer]
        if len(chosen) > 1 and met(trial):
            chosen = trial
    return result(chosen, True)
