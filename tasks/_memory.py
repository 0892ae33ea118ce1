"""The memory budget of the stages whose working set grows with images x tensors (calibration's pass, the
per-tensor error report): `memory_budget_mb` in params.yaml, or DEFAULT_MB (less when half the memory available
when the stage starts is less), shared by the workers that run side by side. Batches past a few images gain
little speed on CPU, so the default stays small: SAM's encoder at 1024x1024 or DINOv2 at 518 calibrated 32
images a pass held over 15 GB."""

from __future__ import annotations


DEFAULT_MB = 2048


def budget_bytes(memory_budget_mb: int | None, workers: int = 1) -> int:
    """Bytes one of `workers` concurrent stages may hold: `memory_budget_mb` split, or the default split."""
    if memory_budget_mb:
        total = memory_budget_mb << 20
    else:
        import psutil

        total = min(DEFAULT_MB << 20, psutil.virtual_memory().available // 2)
    return int(total // max(1, workers))


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MB"
