"""How many variants run side by side, and how many threads each may use, from the machine.

`max_workers: null` (the default): one worker per core, at most `MAX_AUTO`, and at most one per `MB_PER_WORKER`
of the memory available when the run starts (at least one). A set `max_workers` is used as given.

The variants run as threads of one process (flows/pipeline.py). Each gets `cores // workers` threads (at
least one): ONNX Runtime sessions made during the variant phase take that many intra-op threads (instead of
ORT's default, one per core, in every session at once), and torch's intra-op pool is set to it for the phase
(it is process-wide; restored after). The stages before and after the variants run alone with every core.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

MAX_AUTO = 4
MB_PER_WORKER = 4096  # what one variant's quantize + validate may hold beside its siblings at ViT-B scale

_phase_threads = 0  # while the variant phase runs: threads per worker (0: ORT's default)


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def workers(max_workers: int | None) -> int:
    """`max_workers` as set, or chosen from the machine (module docstring)."""
    if max_workers:
        return max_workers
    import psutil

    by_memory = psutil.virtual_memory().available // (MB_PER_WORKER << 20)
    return int(max(1, min(cores(), MAX_AUTO, by_memory)))


def threads_per_worker(n_workers: int) -> int:
    return max(1, cores() // max(1, n_workers))


def session_threads() -> int:
    """Intra-op threads for an ONNX Runtime session made now: the variant phase's share, else 0 (ORT's default)."""
    return _phase_threads


@contextlib.contextmanager
def variant_phase(n_workers: int) -> Iterator[int]:
    """While the variants run side by side: each ORT session and torch's pool take `threads_per_worker`."""
    global _phase_threads
    import torch

    threads = threads_per_worker(n_workers)
    before_torch, before_ort = torch.get_num_threads(), _phase_threads
    torch.set_num_threads(threads)
    _phase_threads = threads
    try:
        yield threads
    finally:
        _phase_threads = before_ort
        torch.set_num_threads(before_torch)
