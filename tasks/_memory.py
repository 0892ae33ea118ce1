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
    n = n_bytes / 2**20
    return f"{n:,.0f} MB" if n >= 10 else f"{n:.2g} MB"


def reset_peak() -> bool:
    """Start a new peak-RSS window for this process (Linux: /proc/self/clear_refs); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """This process's peak RSS in bytes since `reset_peak` (Linux: VmHWM), else since it started (getrusage)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak << 10)  # bytes on macOS, kB on Linux
