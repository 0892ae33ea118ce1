"""The pipeline as one Prefect flow: a table of contents over the stage functions in `tasks/`.

DVC decides what is stale (a fresh stage is skipped and committed stages land in dvc.lock);
variants are submitted as concurrent tasks tagged with the worker kind their target needs;
MLflow records the run at the end.

Variants run as threads of this process, not in worker processes. Measured on the 2-core demo
machine (tiny params, `vitq run --force`, runs alternated; issue 11, item 5): a pool of worker
processes forked from a preloaded forkserver made the variant phase 13-33 s slower (74, 92, 82 s
vs 62, 69, 59 s with threads; spawned workers without preloading: 123 s). Each worker pays again
the imports and first-use warm-ups (torch.export, coremltools) this process has already paid,
and two busy cores leave no idle core for separate processes to use. The cost of threads is the
process-wide state they share, guarded where variants touch it: graph capture
(`vitq.tasks.tracing.TRACE_LOCK`), `sys.stdout` (`vitq.tasks._io.quiet_stdout`) and the FP32 activation
memo (`vitq.tasks.error_report`).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from vitq.flows import tracking
from vitq.flows.dvc_state import DvcStages
from vitq.flows.prefect_server import prefect_api
from vitq.tasks import parallel, resources, stages
from vitq.tasks.layout import Workspace
from vitq.tasks.model import load_model_spec
from vitq.tasks.targets.registry import worker_tags
from vitq import interrupt
from vitq.config import Params
from vitq.logs import CONSOLE
from vitq.params import load_params

log = logging.getLogger("vitq.flow")

# Stage logic lives in tasks/; these wrappers only give Prefect a task per unit of work.
# NO_CACHE: DVC is the one cache of pipeline outputs (no second cache to serve a stale artifact).


@task(cache_policy=NO_CACHE, retries=0)
def stage_task(name: str, ws: Workspace, params: Params) -> None:
    stages.run_stage(name, ws, params)


@task(cache_policy=NO_CACHE)
def variant_task(ws: Workspace, params: Params, recipe: str, steps: tuple[str, ...]) -> None:
    start = time.perf_counter()
    with interrupt.running(recipe):
        stages.run_variant(ws, params, recipe, steps)
    why = stages.not_run_reason(ws, recipe)
    if why:
        log.info("%s: not run here: %s", recipe, why, extra=CONSOLE)
    else:
        records = [stages.stage_record(ws, step, recipe) or {} for step in steps]
        worst = max(records, key=lambda r: r.get("peak_rss_mb") or 0)
        log.info("%s: %s done in %.1f s%s", recipe, " + ".join(steps), time.perf_counter() - start,
                 resources.console_suffix(worst), extra=CONSOLE)


@task(cache_policy=NO_CACHE)
def benchmark_task(ws: Workspace) -> None:
    """Timing runs in its own process, as under `dvc repro`: the flow's own threads (Prefect's
    event and log shipping) would otherwise land inside the measured runs of sub-ms models."""
    cmd = [sys.executable, "-m", "vitq.cli", "stage", "benchmark", "--workdir", str(ws.root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    forget = interrupt.on_interrupt(proc.kill)  # when only this process was signalled, not its group
    try:
        out, _ = proc.communicate()
    finally:
        forget()
    for line in out.splitlines():  # its console: its lines for ours (the rest went to the log file itself)
        log.info("%s", line, extra=CONSOLE)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark stage failed (exit {proc.returncode}): {out.strip().splitlines()[-1:]}")


class _Runner:
    """Runs a stage unless DVC says it is up to date; commits what it ran. On the console: a line per stage
    run, with its time, and a line naming the stages skipped before it (each line is in the log file)."""

    def __init__(self, ws: Workspace, force: bool):
        self.ws, self.force = ws, force
        self.dvc = DvcStages(ws.root)
        self.ran: list[str] = []
        self.skipped: list[str] = []  # not yet on the console
        self.started: dict[str, float] = {}

    def stale(self, name: str, also: bool = False, variant: bool = False) -> bool:
        """`also`: stale for a reason DVC cannot see (a variant recorded as not run that this machine can run now).
        `variant`: a variant's stage (the variants skipped are named together, after the variants run)."""
        if self.force or also or not self.dvc.is_fresh(name):
            if not variant:
                self.say_skipped()
            interrupt.begin_stage(name)  # what an interruption names, until `done`
            log.info("%s: running", name)
            self.started[name] = time.perf_counter()
            return True
        log.info("%s: up to date (dvc.lock), skipped", name)
        self.skipped.append(name)
        return False

    def skipped_as(self, names: tuple[str, ...], shown: str) -> None:
        """Name the skipped stages `names` (a variant's two) as `shown` on the console."""
        if names and all(n in self.skipped for n in names):
            self.skipped = [n for n in self.skipped if n not in names] + [shown]

    def say_skipped(self) -> None:
        if self.skipped:
            log.info("up to date (dvc.lock), skipped: %s", ", ".join(self.skipped), extra=CONSOLE)
            self.skipped = []

    def done(self, name: str, say: bool = True) -> None:
        """`say`: its line on the console (a variant's stages have one line for the variant, `variant_task`'s),
        with the peak RSS its record gives (tasks/resources.py)."""
        seconds = time.perf_counter() - self.started.pop(name)
        with interrupt.deferred():  # dvc.lock is written in place: never cut it in half
            self.dvc.commit(name)
        interrupt.end_stage(name)
        self.ran.append(name)
        if say:
            log.info("%s: done in %.1f s%s", name, seconds, resources.console_suffix(stages.stage_record(self.ws, name)),
                     extra=CONSOLE)


@flow(name="vitq-pipeline")
def vitq_pipeline(root: str, force: bool = False, workers: int | None = None) -> dict:
    """`workers`: the variants run side by side (the task runner's size; default: from params and the machine)."""
    ws = Workspace(Path(root))
    if threading.current_thread() is threading.main_thread():
        interrupt.install(ws.root)  # Prefect swapped in its own SIGTERM handler for the flow run
    params = load_params(ws.params_file)
    run = _Runner(ws, force)
    cpu = ["worker:cpu"]
    runnable, not_run = stages.plan_variants(params)
    for name, why in not_run.items():
        log.warning("%s: not run: %s", name, why)
    for name in run.dvc.prepared(stages.PREPARED):
        if run.stale(name):
            stage_task.with_options(name=name, tags=cpu)(name, ws, params)
            run.done(name)
    # Two DVC stages per variant (quantize@, validate@): only what changed runs, concurrently per wave.
    todo: dict[str, tuple[str, ...]] = {}

    def stale(r: str) -> bool:
        quantize_st, validate_st = stages.variant_stages(r)
        todo[r] = stages.steps_to_run(
            r, lambda st: run.stale(st, also=st == quantize_st and stages.runnable_now(ws, r), variant=True))
        if "quantize" in todo[r]:
            # a requantized variant is revalidated: logged, and named if interrupted
            run.stale(validate_st, also=True, variant=True)
        run.skipped_as((quantize_st, validate_st), r)
        return bool(todo[r])

    def done(r: str) -> None:
        for step, st in zip(("quantize", "validate"), stages.variant_stages(r)):
            if step in todo[r]:
                run.done(st, say=False)

    n_workers = workers or parallel.workers(params.max_workers)
    with parallel.variant_phase(n_workers) as threads:
        log.info("variants: %d at a time, %d thread(s) each (max_workers: %s; %d cores)", n_workers, threads,
                 params.max_workers or "null: from the machine", parallel.cores())
        stages.run_variants(
            list(params.quantize.variants), stale=stale, done=done,
            submit=lambda r: variant_task.with_options(name=f"{r}[{','.join(todo[r])}]", tags=worker_tags(r)).submit(
                ws, params, r, todo[r]),
        )

    # One task times FP32 and every variant side by side, never concurrently with other work.
    if run.stale("benchmark"):
        benchmark_task.with_options(name="benchmark", tags=cpu)(ws)
        run.done("benchmark")
    if run.stale("report"):
        stage_task.with_options(name="report", tags=cpu)("report", ws, params)
        run.done("report")
    run.say_skipped()
    run.dvc.close()

    summary = json.loads(ws.summary_file.read_text())
    spec = load_model_spec(ws.model_dir)
    stage_metrics = {"fp32_top1_torch": spec.top1} if spec.top1 is not None else {}
    export = stages.export.load_export_result(ws.export_dir)
    stage_metrics["export_max_abs_diff"] = export.max_abs_diff
    with interrupt.stage("MLflow record"):
        run_id = tracking.log_pipeline_run(ws, params, summary, stage_metrics, run.ran, run_key=str(flow_run.id),
                                          extra_tags={"orchestration": "embedded"})
    if run_id:
        log.info("MLflow: parent run %s (%s)", run_id, tracking.configure(ws), extra=CONSOLE)
    return summary


def run_pipeline(root: Path, params: Params, force: bool = False) -> dict:
    """Run the flow with `params.max_workers` concurrent variant tasks (null: from the machine, tasks/parallel.py;
    Prefect's temporary server when PREFECT_API_URL is unset, started in a session of its own so Ctrl-C reaches
    only this process)."""
    workers = parallel.workers(params.max_workers)  # once: the runner's size and each worker's thread share agree
    runner = ThreadPoolTaskRunner(max_workers=workers)
    with prefect_api():
        return vitq_pipeline.with_options(task_runner=runner)(str(root), force, workers)
