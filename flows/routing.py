"""Routing work to the machines that can do it: work pools per worker kind, and one dispatcher.

A step is a flow with a deployment on a work pool; `run_step` starts it with `run_deployment` and
follows it to the end. It never runs the step anywhere else: a pool with no live worker makes it
wait up to `start_timeout_s` and then fail with a message naming the pool; a step whose worker died
(Prefect marks the worker OFFLINE when its heartbeats stop) is marked Crashed and dispatched again,
with backoff, to whichever worker of the same pool is alive.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vitq.tasks.targets.registry import TARGETS
from vitq.errors import VitqError
from vitq.logs import CONSOLE

log = logging.getLogger("vitq.flow")

# Where each kind of work runs: preparation (data, model, export, calibration, the FP32 reference,
# the report) on `cpu`; each target's quantize/validate/benchmark on the pool of its worker kind.
PREPARE = "prepare"
DEFAULT_POOLS: dict[str, str] = {PREPARE: "cpu", **{t.name: t.worker for t in TARGETS.values()}}

POLL_S = 1.0  # seconds between state reads of a dispatched step


class NoLiveWorker(VitqError):
    """A step waited for a worker of its pool and none took it."""


class StepFailed(RuntimeError):
    """A step ended Failed/Cancelled/Crashed (after its retries); the message names pool and worker."""


def pool_map(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """DEFAULT_POOLS with `overrides` ({"onnx": "cpu-ort", ...}); unknown keys are errors."""
    pools = dict(DEFAULT_POOLS)
    for key, pool in (overrides or {}).items():
        if key not in pools:
            raise VitqError(f"unknown pool key {key!r}; allowed: {', '.join(sorted(pools))}")
        if not pool or not isinstance(pool, str):
            raise VitqError(f"pool for {key!r} must be a work pool name, got {pool!r}")
        pools[key] = pool
    return pools


def parse_pool_overrides(items: list[str]) -> dict[str, str]:
    """`["onnx=cpu-ort", "tensorrt=h100"]` -> dict, checked against the known keys."""
    out = {}
    for item in items:
        key, sep, pool = item.partition("=")
        if not sep or not key or not pool:
            raise VitqError(f"--pool {item!r} must be KEY=POOL, KEY one of: {', '.join(sorted(DEFAULT_POOLS))}")
        out[key.strip()] = pool.strip()
    pool_map(out)
    return out


@dataclass(frozen=True)
class StepRun:
    """Where a finished step ran (read back from the API, not reported by the step itself)."""

    flow_run_id: str
    name: str
    pool: str
    worker: str | None
    state: str
    attempts: int


def live_workers(client, pool: str) -> list[str]:
    from prefect.client.schemas.objects import WorkerStatus

    return [w.name for w in client.read_workers_for_work_pool(work_pool_name=pool) if w.status == WorkerStatus.ONLINE]


def check_pool(client, pool: str) -> None:
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        raise VitqError(f"work pool {pool!r} does not exist on {client.api_url}; create the pools and "
                        "deployments with `vitq deploy`") from None


def run_step(
    deployment: str,
    pool: str,
    parameters: dict,
    *,
    run_name: str,
    start_timeout_s: float = 600.0,
    retries: int = 2,
    backoff_s: float = 2.0,
) -> StepRun:
    """Run `deployment` (on work pool `pool`) to completion and return where it ran.

    Raises NoLiveWorker when no worker of `pool` picks the step up within `start_timeout_s`
    (the flow run is cancelled, never rerouted), StepFailed when it fails.
    """
    from prefect import get_client
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        check_pool(client, pool)
        if not live_workers(client, pool):
            log.warning("%s: no live worker in work pool %r yet; waiting up to %.0f s for one", run_name, pool,
                        start_timeout_s, extra=CONSOLE)
    for attempt in range(1, retries + 2):
        fr = run_deployment(deployment, parameters=parameters, timeout=0, flow_run_name=f"{run_name}#{attempt}",
                            tags=[f"pool:{pool}"])
        with get_client(sync_client=True) as client:
            final = _follow(client, fr.id, pool, run_name, start_timeout_s)
            labels = final.labels or {}
            where = StepRun(str(final.id), run_name, final.work_pool_name or pool, labels.get("prefect.worker.name"),
                            final.state_type.value, attempt)
        if final.state_type.value == "COMPLETED":
            log.info("%s: completed on pool %r (worker %s)%s", run_name, where.pool, where.worker,
                     f" after {attempt} attempts" if attempt > 1 else "", extra=CONSOLE)
            return where
        message = (final.state.message or "").strip() if final.state else ""
        if final.state_type.value == "CRASHED" and attempt <= retries:
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("%s: crashed on pool %r (worker %s: %s); dispatching again in %.0f s (attempt %d of %d)",
                        run_name, pool, where.worker, message or "no message", delay, attempt + 1, retries + 1,
                        extra=CONSOLE)
            time.sleep(delay)
            continue
        raise StepFailed(f"{run_name} ended {final.state_name} on work pool {pool!r} (worker {where.worker}, "
                         f"flow run {where.flow_run_id}): {message or 'no message'}")
    raise AssertionError("unreachable")


def _follow(client, flow_run_id, pool: str, run_name: str, start_timeout_s: float):
    """Poll one flow run until it is final; crash it when its worker is gone; time out waiting for one."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Crashed

    started = time.monotonic()
    while True:
        fr = client.read_flow_run(flow_run_id)
        kind = fr.state_type
        if fr.state is not None and fr.state.is_final():
            return fr
        worker = (fr.labels or {}).get("prefect.worker.name")
        if kind in (StateType.SCHEDULED, StateType.PENDING) and worker is None:
            waited = time.monotonic() - started
            if waited > start_timeout_s:
                live = live_workers(client, pool)
                why = (f"no live worker in work pool {pool!r}" if not live else
                       f"work pool {pool!r} has live workers ({', '.join(live)}) but none took it (busy or at "
                       "their concurrency limit)")
                msg = (f"{run_name}: {why} after {waited:.0f} s; start one with `prefect worker start --pool {pool}` "
                       "on a machine that can run it (it is never run elsewhere)")
                client.set_flow_run_state(flow_run_id, Cancelled(message=msg), force=True)
                raise NoLiveWorker(msg)
        elif kind in (StateType.PENDING, StateType.RUNNING) and worker is not None:
            if worker not in live_workers(client, pool):
                msg = f"worker {worker!r} of work pool {pool!r} stopped heartbeating while running {run_name}"
                log.warning("%s", msg, extra=CONSOLE)
                client.set_flow_run_state(flow_run_id, Crashed(message=msg), force=True)
                return client.read_flow_run(flow_run_id)
        time.sleep(POLL_S)
