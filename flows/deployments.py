"""Deployments as code: the work pools, one deployment per (step flow, pool), schedules, triggers.

`vitq deploy` applies these against PREFECT_API_URL; `prefect.yaml` at the repository root is the
same set for `prefect deploy --all` (tests/test_deployments.py keeps the two in step).

    vitq-orchestrate/<cpu>   the pipeline across pools; concurrency 1 (one run owns a workspace's
                             dvc.lock at a time); triggered by `vitq.calibration-data.changed`
    vitq-prepare/<cpu>       data, model, export, calibration, FP32 reference
    vitq-variant/<pool>      quantize + validate one recipe, one deployment per target pool
    vitq-benchmark/<pool>    timing on that pool's hardware
    vitq-nightly/<cpu>       cron: re-quantize every registered workspace
    vitq-watch-data/<cpu>    interval: emit the data-changed event when a calibration digest moves

Entry points are module paths (`vitq.flows.distributed.variant_flow`): a worker runs the vitq package
installed beside it, so no code is pulled at run time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from vitq.flows.routing import DEFAULT_POOLS, PREPARE, pool_map

log = logging.getLogger("vitq.flow")

NIGHTLY_CRON = "0 2 * * *"  # 02:00 every night, in NIGHTLY_TZ
NIGHTLY_TZ = "UTC"
WATCH_INTERVAL_S = 600  # seconds between calibration-data digest checks
ZOMBIE_AUTOMATION = "vitq: crash flow runs that stopped heartbeating"
# Flow-run heartbeats come every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (>= 30, set on workers);
# three missed ones mark the run Crashed, and the orchestrator dispatches it again.
ZOMBIE_AFTER_S = 90
# Every step's process: vitq's own log lines go to the flow run's logs in the Prefect API/UI.
JOB_VARIABLES = {"env": {"PREFECT_LOGGING_EXTRA_LOGGERS": "vitq", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}}


@dataclass(frozen=True)
class DeploymentSpec:
    flow: str  # flow name
    entrypoint: str  # module path of the flow function
    pool: str  # work pool = deployment name
    parameters: dict = field(default_factory=dict)
    cron: str | None = None
    interval_s: int | None = None
    data_trigger: bool = False  # run on `vitq.calibration-data.changed` for the event's workspace
    concurrency_limit: int | None = None
    tags: tuple[str, ...] = ()

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.pool}"


def deployment_specs(pools: dict[str, str] | None = None, workspaces: list[str] | None = None,
                     dvc_remote: str | None = None) -> list[DeploymentSpec]:
    pools = pool_map(pools)
    cpu = pools[PREPARE]
    target_pools = sorted({p for k, p in pools.items() if k != PREPARE})
    specs = [
        DeploymentSpec("vitq-orchestrate", "vitq.flows.distributed.orchestrate_flow", cpu,
                       {"pools": pools, "dvc_remote": dvc_remote}, data_trigger=True, concurrency_limit=1,
                       tags=("vitq", "orchestrator")),
        DeploymentSpec("vitq-prepare", "vitq.flows.distributed.prepare_flow", cpu, {"pool": cpu}, tags=("vitq", "step")),
        *[DeploymentSpec("vitq-variant", "vitq.flows.distributed.variant_flow", p, {"pool": p}, tags=("vitq", "step"))
          for p in target_pools],
        *[DeploymentSpec("vitq-benchmark", "vitq.flows.distributed.benchmark_flow", p, {"pool": p}, tags=("vitq", "step"))
          for p in target_pools],
        DeploymentSpec("vitq-nightly", "vitq.flows.schedules.nightly_flow", cpu,
                       {"workspaces": list(workspaces or []), "pools": pools, "dvc_remote": dvc_remote},
                       cron=NIGHTLY_CRON, tags=("vitq", "schedule")),
        DeploymentSpec("vitq-watch-data", "vitq.flows.schedules.watch_data_flow", cpu,
                       {"workspaces": list(workspaces or [])}, interval_s=WATCH_INTERVAL_S, tags=("vitq", "schedule")),
    ]
    return specs


def _flow_object(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(entrypoint)


def ensure_pools(pools: list[str]) -> None:
    """Process work pools, created when missing (existing ones are left as configured)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                       description=f"vitq {pool} workers (process)"))
                log.info("work pool %r created", pool)
            except ObjectAlreadyExists:
                pass


def ensure_zombie_automation(after_s: int = ZOMBIE_AFTER_S) -> None:
    """Prefect's documented zombie detection: a flow run that stops sending heartbeats is marked
    Crashed (https://docs.prefect.io/v3/advanced/detect-zombie-flows)."""
    from prefect.automations import Automation
    from prefect.events.actions import ChangeFlowRunState
    from prefect.client.schemas.objects import StateType
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return
    except ValueError:
        pass
    Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {after_s} s: its worker or machine died")],
    ).create()


def apply(specs: list[DeploymentSpec], schedules_active: bool = True) -> list[str]:
    from prefect.deployments.runner import EntrypointType
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.schedules import Cron, Interval

    from vitq.flows.schedules import DATA_CHANGED

    names = []
    for spec in specs:
        schedules = []
        if spec.cron:
            schedules.append(Cron(spec.cron, timezone=NIGHTLY_TZ, active=schedules_active))
        if spec.interval_s:
            schedules.append(Interval(timedelta(seconds=spec.interval_s), active=schedules_active))
        triggers = []
        if spec.data_trigger:
            triggers.append(DeploymentEventTrigger(
                name="calibration data changed", expect={DATA_CHANGED},
                match={"prefect.resource.id": "vitq.workspace.*"},
                parameters={"workspace": "{{ event.payload.workspace }}"}, enabled=True))
        flow = _flow_object(spec.entrypoint)
        dep = flow.to_deployment(
            name=spec.pool, work_pool_name=spec.pool, entrypoint_type=EntrypointType.MODULE_PATH,
            parameters=spec.parameters, schedules=schedules or None, triggers=triggers or None,
            concurrency_limit=spec.concurrency_limit, tags=list(spec.tags), job_variables=JOB_VARIABLES,
            description=((flow.description or "").strip().splitlines() or [""])[0],
        )
        dep.apply()
        names.append(spec.full_name)
    return names


def deploy(pools: dict[str, str] | None = None, workspaces: list[str] | None = None, dvc_remote: str | None = None,
           schedules_active: bool = True) -> list[str]:
    """Create the pools, the zombie-run automation and every deployment; return the deployment names."""
    specs = deployment_specs(pools, workspaces, dvc_remote)
    ensure_pools(sorted({s.pool for s in specs}))
    ensure_zombie_automation()
    return apply(specs, schedules_active)


__all__ = ["DEFAULT_POOLS", "DeploymentSpec", "deploy", "deployment_specs"]
