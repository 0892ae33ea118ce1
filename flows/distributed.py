"""The pipeline across machines: step flows deployed on work pools, and the flow that fans out to them.

    vitq-prepare    (cpu pool)          data, model, export, calibration, the FP32 reference
    vitq-variant    (the target's pool) quantize + validate one recipe
    vitq-benchmark  (the target's pool) FP32 and that pool's variants, timed side by side
    vitq-orchestrate                    asks DVC what is stale, dispatches the steps above with
                                        `run_deployment`, reports, logs one MLflow parent run

Steps receive locations, never objects: the workspace root (shared storage, or the same path on
one host) and the DVC remote the prepared inputs were pushed to. DVC is the one record of what is
current: the orchestrator asks it per stage (`variant@<recipe>` per variant), dispatches only what
is stale, and commits what the steps produced. Variants go through the same runner as the embedded
`vitq run` (tasks/stages.run_variants).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from vitq.flows import tracking
from vitq.flows.dvc_state import DvcStages, declared
from vitq.flows.routing import PREPARE, NoLiveWorker, StepFailed, StepRun, pool_map, run_step
from vitq.tasks import benchmark, resources, stages
from vitq.tasks.layout import Workspace
from vitq.tasks.model import load_model_spec
from vitq.tasks.targets.registry import get_target
from vitq.tasks.validate import REFERENCE
from vitq.config import Params
from vitq.params import load_params
from vitq.errors import VitqError
from vitq.logs import CONSOLE
from vitq.recipes import get_recipe

log = logging.getLogger("vitq.flow")

PREPARED = stages.PREPARED  # stages of the prepare step, in order
NETWORK_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)


def _ws(workspace: str) -> tuple[Workspace, Params]:
    root = Path(workspace)
    if not root.is_dir():
        raise VitqError(f"workspace {workspace!r} does not exist on {socket.gethostname()}; steps need the shared "
                        "workspace mounted at the same path on every worker")
    ws = Workspace(root.resolve())
    # A worker starts each flow run in a scratch directory; DVC resolves some paths against the cwd
    # and refuses any outside the repository. The flow run's process is dedicated to this workspace.
    os.chdir(ws.root)
    if logging.getLogger("vitq").level == logging.NOTSET:  # a worker's process: INFO, as under the CLI
        logging.getLogger("vitq").setLevel(logging.INFO)
    return ws, load_params(ws.params_file)


# -- network hand-off (DVC remote), retried with backoff -----------------------------------------

@task(cache_policy=NO_CACHE, **NETWORK_RETRIES)
def dvc_push(root: str, targets: list[str], remote: str) -> None:
    from dvc.repo import Repo

    with Repo(root) as repo:
        pushed = repo.push(targets=[f"{Path(root) / 'dvc.yaml'}:{t}" for t in targets], remote=remote)
    log.info("dvc push %s -> remote %r: %s objects", ",".join(targets), remote, pushed)


@task(cache_policy=NO_CACHE, **NETWORK_RETRIES)
def dvc_pull(root: str, targets: list[str], remote: str) -> None:
    from dvc.repo import Repo

    with Repo(root) as repo:
        repo.pull(targets=[f"{Path(root) / 'dvc.yaml'}:{t}" for t in targets], remote=remote)
    log.info("dvc pull %s <- remote %r", ",".join(targets), remote)


def _inputs_present(ws: Workspace) -> bool:
    return all(p.exists() for p in (ws.data_dir, ws.model_dir, ws.export_dir / "model.prep.onnx", ws.calibration_dir,
                                    ws.search_dir, ws.smoothquant_dir, ws.plan_dir, ws.validation_for(REFERENCE)))


# -- step flows ----------------------------------------------------------------------------------

@task(cache_policy=NO_CACHE)
def run_stage(name: str, ws: Workspace, params: Params) -> None:
    stages.run_stage(name, ws, params)


@flow(name="vitq-prepare")
def prepare_flow(workspace: str, force: bool = False, dvc_remote: str | None = None, pool: str = "cpu") -> list[str]:
    """Data, model, export, calibration, the FP32 reference and the variants' plan (each skipped when
    dvc.lock says it is up to date, committed when run); pushes them to `dvc_remote`."""
    ws, params = _ws(workspace)
    stages.preflight(ws, params)
    dvc = DvcStages(ws.root)
    ran = []
    try:
        for name in dvc.prepared(PREPARED):
            if force or not dvc.is_fresh(name):
                run_stage.with_options(name=name)(name, ws, params)
                dvc.commit(name)
                ran.append(name)
            else:
                log.info("%s: up to date (dvc.lock), reused", name)
    finally:
        dvc.close()
    if dvc_remote:
        dvc_push(str(ws.root), declared(ws.root, PREPARED), dvc_remote)
    return ran


def _engine_build_slot(target_worker: str):
    """One engine build per GPU machine at a time: a Prefect global concurrency limit of 1 per host."""
    import contextlib

    if target_worker != "cuda":
        return contextlib.nullcontext()
    from prefect import get_client
    from prefect.concurrency.sync import concurrency

    name = f"vitq-engine-build-{socket.gethostname()}"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    return concurrency(name, occupy=1, strict=True)


@flow(name="vitq-variant")
def variant_flow(workspace: str, recipe: str, steps: list[str] = ("quantize", "validate"),
                 dvc_remote: str | None = None, pool: str = "cpu") -> str:
    """Quantize and validate one recipe on a worker that can run its target (the orchestrator asked DVC
    whether it is stale and commits `variant@<recipe>` when this returns)."""
    ws, params = _ws(workspace)
    target = get_target(get_recipe(recipe).target)
    missing = target.missing_runtime()
    if missing:  # routed here by pool; never silently produced somewhere it cannot run
        raise VitqError(f"{recipe}: worker {socket.gethostname()} in pool {pool!r} cannot run it: {missing}")
    if dvc_remote and not _inputs_present(ws):
        dvc_pull(str(ws.root), declared(ws.root, PREPARED), dvc_remote)
    if "quantize" in steps:
        with _engine_build_slot(target.worker):
            task(stages.run_stage, name=f"quantize[{recipe}]", cache_policy=NO_CACHE)("quantize", ws, params, recipe)
    if "validate" in steps:  # each with its record (reports/stages/), one of the stage's outputs
        task(stages.run_stage, name=f"validate[{recipe}]", cache_policy=NO_CACHE)("validate", ws, params, recipe)
    return ",".join(steps)


def pool_benchmark_file(ws: Workspace, pool: str) -> Path:
    return ws.root / "reports" / "pools" / f"benchmark.{pool}.json"


@flow(name="vitq-benchmark")
def benchmark_flow(workspace: str, recipes: list[str], pool: str = "cpu") -> None:
    """FP32 and `recipes` timed side by side on this pool's hardware, in a process of their own
    (Prefect's event and log threads would otherwise land inside sub-millisecond timings)."""
    ws, _ = _ws(workspace)
    out = pool_benchmark_file(ws, pool)
    cmd = [sys.executable, "-m", "vitq.flows.distributed", "benchmark", str(ws.root), str(out), *recipes]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        log.info("%s", line)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark on pool {pool!r} failed (exit {proc.returncode}): "
                           f"{proc.stdout.strip().splitlines()[-1:]}")


def _benchmark_main(root: str, out: str, recipes: list[str]) -> None:
    ws = Workspace(Path(root))
    stages.run_benchmark(ws, load_params(ws.params_file), recipes, Path(out))


def merge_benchmarks(results: dict[str, benchmark.BenchmarkResult], base_pool: str) -> benchmark.BenchmarkResult:
    """One benchmark.json from per-pool runs: FP32 from `base_pool`; another pool's own FP32
    baseline is kept as `fp32@<pool>` so its variants' speedups stay same-machine ratios."""
    base = results[base_pool]
    models = {"fp32": base.models["fp32"]}
    for pool, res in results.items():
        for name, t in res.models.items():
            if pool == base_pool:
                models[name] = t
            elif name == "fp32":
                models[f"fp32@{pool}"] = t
            else:
                models[name] = replace(t, baseline=f"fp32@{pool}") if t.baseline == "fp32" else t
    machine = dict(base.machine)
    if len(results) > 1:
        machine["pools"] = {pool: res.machine for pool, res in results.items()}
    not_measured = {name: why for res in results.values() for name, why in res.not_measured.items()}
    return benchmark.BenchmarkResult(machine=machine, settings=base.settings, models=models, not_measured=not_measured)


# -- the orchestrator ----------------------------------------------------------------------------

@task(cache_policy=NO_CACHE)
def dispatch(deployment: str, pool: str, parameters: dict, run_name: str, start_timeout_s: float,
             retries: int) -> StepRun:
    return run_step(deployment, pool, parameters, run_name=run_name, start_timeout_s=start_timeout_s,
                    retries=retries)


@task(cache_policy=NO_CACHE, **NETWORK_RETRIES)
def log_to_mlflow(ws: Workspace, params: Params, summary: dict, stage_metrics: dict, ran: list[str],
                  run_key: str, extra_tags: dict[str, str]) -> str:
    return tracking.log_pipeline_run(ws, params, summary, stage_metrics, ran, run_key=run_key, extra_tags=extra_tags)


def _fan_out(calls: list[tuple[str, str, dict, str]], start_timeout_s: float, retries: int) -> list[StepRun]:
    """Dispatch steps concurrently; wait for all; raise one error listing every step that failed."""
    futures = [
        dispatch.with_options(name=f"dispatch[{run_name}]").submit(dep, pool, params, run_name, start_timeout_s, retries)
        for dep, pool, params, run_name in calls
    ]
    done, errors = [], []
    for f in futures:
        try:
            done.append(f.result())
        except (NoLiveWorker, StepFailed, VitqError) as exc:
            errors.append(str(exc))
    if errors:
        raise StepFailed(f"{len(errors)} of {len(calls)} steps did not complete: " + " | ".join(errors))
    return done


@flow(name="vitq-orchestrate", task_runner=ThreadPoolTaskRunner(max_workers=16))
def orchestrate_flow(
    workspace: str,
    force: bool = False,
    requantize: bool = False,
    dvc_remote: str | None = None,
    pools: dict[str, str] | None = None,
    start_timeout_s: float = 600.0,
    step_retries: int = 2,
) -> dict:
    """Run the pipeline on the work pools: prepare on `pools["prepare"]`, each recipe on its target's
    pool, benchmark per pool, report here; one MLflow parent run with a child per variant.

    force: rerun every stage. requantize: rerun quantize onward (the nightly schedule), reusing
    prepared stages DVC reports up to date. pools: {"prepare"|target: pool} overrides.
    """
    started = time.perf_counter()
    ws, params = _ws(workspace)
    stages.preflight(ws, params)
    pools = pool_map(pools)
    common = {"workspace": str(ws.root), "dvc_remote": dvc_remote}
    recipes = list(params.quantize.variants)
    recipe_pool = {r: pools[get_recipe(r).target] for r in recipes}
    ran: list[str] = []
    steps: list[StepRun] = []
    fan = dict(start_timeout_s=start_timeout_s, retries=step_retries)

    # 1. Prepared inputs and the variants' plan, on the preparation pool, unless dvc.lock says they are current.
    dvc = DvcStages(ws.root)
    stale = [s for s in dvc.prepared(PREPARED) if force or not dvc.is_fresh(s)]
    dvc.close()
    if stale:
        steps += _fan_out([(f"vitq-prepare/{pools[PREPARE]}", pools[PREPARE],
                            {**common, "force": force, "pool": pools[PREPARE]}, "prepare")], **fan)
        ran += stale
    else:
        log.info("%s: up to date (dvc.lock), reused", ", ".join(PREPARED), extra=CONSOLE)

    # 2. One step per stale variant on its target's pool (DVC: variant@<recipe>), the same runner as `vitq run`.
    dvc = DvcStages(ws.root)

    todo: dict[str, tuple[str, ...]] = {}

    def variant_stale(r: str) -> bool:
        # A variant recorded as not run here is routed to a pool that can run it.
        rerun = force or requantize or stages.not_run_reason(ws, r) is not None
        todo[r] = stages.steps_to_run(r, lambda st: rerun or not dvc.is_fresh(st))
        if not todo[r]:
            log.info("%s: up to date (dvc.lock), reused", r, extra=CONSOLE)
        return bool(todo[r])

    def variant_step(r: str):
        params_ = {**common, "recipe": r, "steps": list(todo[r]), "pool": recipe_pool[r]}
        return dispatch.with_options(name=f"dispatch[variant[{r}]]").submit(
            f"vitq-variant/{recipe_pool[r]}", recipe_pool[r], params_, f"variant[{r}]", **fan)

    def variant_done(r: str) -> None:
        for step, st in zip(("quantize", "validate"), stages.variant_stages(r)):
            if step in todo[r]:
                dvc.commit(st)
                ran.append(st)

    futures: dict[str, object] = {}
    try:
        done_variants = stages.run_variants(
            recipes, stale=variant_stale, submit=lambda r: futures.setdefault(r, variant_step(r)), done=variant_done)
    except (NoLiveWorker, StepFailed, VitqError) as exc:
        raise StepFailed(f"variant steps did not complete: {exc}") from None
    finally:
        dvc.close()
    steps += [futures[r].result() for r in done_variants]
    variants_stale = bool(done_variants)

    # 3. Benchmark on each pool that produced variants, one pool at a time; merged into benchmark.json.
    dvc = DvcStages(ws.root)
    bench_stale = variants_stale or not dvc.is_fresh("benchmark")
    dvc.close()
    if bench_stale:
        by_pool: dict[str, list[str]] = {}
        for r in recipes:
            by_pool.setdefault(recipe_pool[r], []).append(r)
        results = {}
        with resources.measured("benchmark") as record:  # the pools' runs, one after another, seen from here
            for pool, names in by_pool.items():
                steps += _fan_out([(f"vitq-benchmark/{pool}", pool, {"workspace": str(ws.root), "recipes": names,
                                                                     "pool": pool}, f"benchmark[{pool}]")], **fan)
                results[pool] = benchmark.load_benchmark(pool_benchmark_file(ws, pool))
        base = pools["onnx"] if pools["onnx"] in results else next(iter(results))
        benchmark.save_benchmark(merge_benchmarks(results, base), ws.benchmark_file)
        # its peak RSS was the workers', not this process's
        resources.write_record(stages.record_path(ws, "benchmark"),
                               {**record, "peak_rss_mb": None, "peak": f"on the workers of {', '.join(by_pool)}"})
        _commit(ws, ["benchmark"])
        ran.append("benchmark")
    else:
        log.info("benchmark: up to date (dvc.lock), reused", extra=CONSOLE)

    # 4. Report here (cheap), with every routed recipe as a variant: none is "not run" on this machine.
    dvc = DvcStages(ws.root)
    report_stale = bench_stale or not dvc.is_fresh("report")
    dvc.close()
    if report_stale:
        task(stages.run_report, name="report", cache_policy=NO_CACHE)(ws, params, recipes)
        _commit(ws, ["report"])
        ran.append("report")
    else:
        log.info("report: up to date (dvc.lock), reused", extra=CONSOLE)
    if dvc_remote:
        dvc_push(str(ws.root), [*(st for r in recipes for st in stages.variant_stages(r)), "benchmark", "report"],
                 dvc_remote)

    # 5. One MLflow parent run for the whole orchestrated run, children per variant, registry aliases.
    summary = json.loads(ws.summary_file.read_text())
    spec = load_model_spec(ws.model_dir)
    stage_metrics = {"orchestrated_wall_s": time.perf_counter() - started}
    if spec.top1 is not None:
        stage_metrics["fp32_top1_torch"] = spec.top1
    every = (*declared(ws.root, PREPARED), *(st for r in recipes for st in stages.variant_stages(r)), "benchmark", "report")
    tags = {"orchestration": "distributed", "reused": ",".join(s for s in every if s not in ran)
            or "none", **{f"step.{s.name}": f"pool={s.pool} worker={s.worker} flow_run={s.flow_run_id}"
                          f" attempts={s.attempts}" for s in steps}}
    if dvc_remote:
        tags["dvc_remote"] = dvc_remote
    run_id = log_to_mlflow(ws, params, summary, stage_metrics, ran, str(flow_run.id), tags)
    log.info("orchestrated run: %d steps dispatched, stages run: %s; MLflow parent run %s; %.1f s",
             len(steps), ",".join(ran) or "none (all reused)", run_id, time.perf_counter() - started, extra=CONSOLE)
    return summary


def _commit(ws: Workspace, names: list[str]) -> None:
    dvc = DvcStages(ws.root)
    try:
        for name in names:
            dvc.commit(name)
    finally:
        dvc.close()


if __name__ == "__main__":  # the benchmark step's timing process: python -m vitq.flows.distributed benchmark ROOT OUT RECIPE...
    if len(sys.argv) < 4 or sys.argv[1] != "benchmark":
        sys.exit("usage: python -m vitq.flows.distributed benchmark ROOT OUT [RECIPE ...]")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _benchmark_main(sys.argv[2], sys.argv[3], sys.argv[4:])
