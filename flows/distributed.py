"""The pipeline across machines: step flows deployed on work pools, and the flow that fans out to them.

    vitq-prepare    (cpu pool)          data, model, export, calibration, the FP32 reference
    vitq-variant    (the target's pool) quantize + validate one recipe
    vitq-benchmark  (the target's pool) FP32 and that pool's variants, timed side by side
    vitq-orchestrate                    asks DVC what is stale, dispatches the steps above with
                                        `run_deployment`, reports, logs one MLflow parent run

Steps receive locations, never objects: the workspace root (shared storage, or the same path on
one host), the DVC remote the prepared inputs were pushed to, and record what they produced in
files there. A variant step whose recorded inputs (the DVC digests of the prepared stages) and
recipe match is reused, not recomputed, and says so; the orchestrator skips what dvc.lock says is
up to date. The embedded `vitq run` (flows/pipeline.py) is independent of all this.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows import tracking
from flows.dvc_state import DvcStages
from flows.routing import PREPARE, NoLiveWorker, StepFailed, StepRun, pool_map, run_step
from tasks import benchmark, stages
from tasks._io import atomic_file
from tasks.layout import Workspace
from tasks.model import load_model_spec
from tasks.quantize import variant_dir
from tasks.targets import get_target
from tasks.validate import REFERENCE
from vitq.config import Params, load_params
from vitq.errors import VitqError
from vitq.recipes import get_recipe

log = logging.getLogger("vitq.flow")

PREPARED = ("data", "model", "export", "calibrate")  # stages of the prepare step, in order
STEP_RECORD = "step.json"  # in a variant folder: the inputs and recipe it was produced from, and where
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


# -- what a step was produced from ---------------------------------------------------------------

def prepared_digests(ws: Workspace) -> dict[str, str]:
    """DVC's md5 of each prepared stage's outputs, from dvc.lock: the identity of a step's inputs."""
    lock = ws.root / "dvc.lock"
    recorded = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    out = {}
    for stage in PREPARED:
        outs = recorded.get(stage, {}).get("outs", [])
        if not outs:
            raise VitqError(f"dvc.lock in {ws.root} has no outputs for stage {stage!r}; the prepare step runs first")
        out[stage] = ",".join(f"{o['path']}:{o.get('md5')}" for o in outs)
    return out


# Parameter sections that never change a variant: which recipes run (each has its own key), how
# they are timed (the benchmark step always reruns), concurrency, the MLflow experiment name.
_KEY_EXCLUDES = {"quantize": {"recipes"}, "benchmark": True, "max_workers": True, "experiment": True}


def step_key(ws: Workspace, params: Params, name: str) -> str:
    """Digest of everything a variant (or the FP32 reference) depends on: the prepared inputs (DVC
    md5s), the recipe, and every parameter a quantize/validate step reads (recovery, budget, seed...)."""
    recipe = asdict(get_recipe(name)) if name != REFERENCE else REFERENCE
    payload = {"recipe": recipe, "inputs": prepared_digests(ws),
               "params": params.model_dump(mode="json", by_alias=True, exclude=_KEY_EXCLUDES)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _record_path(ws: Workspace, name: str) -> Path:
    if name == REFERENCE:
        return ws.validation_dir / f"{REFERENCE}.step.json"
    return variant_dir(ws.variants_dir, name) / STEP_RECORD


def reusable(ws: Workspace, params: Params, name: str) -> dict | None:
    """The step record of `name` if its outputs exist and were produced from the current inputs."""
    path = _record_path(ws, name)
    if not path.is_file() or not (ws.validation_dir / f"{name}.json").is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == step_key(ws, params, name) else None


def write_record(ws: Workspace, params: Params, name: str, pool: str) -> None:
    record = {"key": step_key(ws, params, name), "name": name, "inputs": prepared_digests(ws),
              "host": socket.gethostname(), "pool": pool, "flow_run_id": str(flow_run.id or "")}
    with atomic_file(_record_path(ws, name)) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")


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
    return all(p.exists() for p in (ws.data_dir, ws.model_dir, ws.export_dir / "model.prep.onnx", ws.calibration_dir))


# -- step flows ----------------------------------------------------------------------------------

@task(cache_policy=NO_CACHE)
def run_stage(name: str, ws: Workspace, params: Params) -> None:
    stages.STAGES[name](ws, params)


@flow(name="vitq-prepare")
def prepare_flow(workspace: str, force: bool = False, dvc_remote: str | None = None, pool: str = "cpu") -> list[str]:
    """Data, model, export, calibration (each skipped when dvc.lock says it is up to date), and the
    FP32 reference outputs every variant is validated against; pushes them to `dvc_remote`."""
    ws, params = _ws(workspace)
    stages.preflight(ws, params)
    dvc = DvcStages(ws.root)
    ran = []
    try:
        for name in PREPARED:
            if force or not dvc.is_fresh(name):
                run_stage.with_options(name=name)(name, ws, params)
                dvc.commit(name)
                ran.append(name)
            else:
                log.info("%s: up to date (dvc.lock), reused", name)
    finally:
        dvc.close()
    if force or reusable(ws, params, REFERENCE) is None:
        ws.validation_dir.mkdir(parents=True, exist_ok=True)
        task(stages.validate_reference, name="validate-reference", cache_policy=NO_CACHE)(ws, params)
        write_record(ws, params, REFERENCE, pool)
        ran.append("reference")
    else:
        log.info("fp32 reference: inputs unchanged, reused")
    if dvc_remote:
        dvc_push(str(ws.root), list(PREPARED), dvc_remote)
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
def variant_flow(workspace: str, recipe: str, force: bool = False, dvc_remote: str | None = None,
                 pool: str = "cpu") -> str:
    """Quantize and validate one recipe on a worker that can run its target; reuse matching outputs."""
    ws, params = _ws(workspace)
    target = get_target(get_recipe(recipe).target)
    missing = target.missing_runtime()
    if missing:  # routed here by pool; never silently produced somewhere it cannot run
        raise VitqError(f"{recipe}: worker {socket.gethostname()} in pool {pool!r} cannot run it: {missing}")
    if dvc_remote and not _inputs_present(ws):
        dvc_pull(str(ws.root), list(PREPARED), dvc_remote)
    if not force and (record := reusable(ws, params, recipe)) is not None:
        log.info("%s: reused (inputs %s and recipe unchanged; produced on %s, pool %s)", recipe,
                 ", ".join(f"{k}={v.rsplit(':', 1)[-1][:8]}" for k, v in record["inputs"].items()),
                 record["host"], record["pool"])
        return "reused"
    with _engine_build_slot(target.worker):
        task(stages.quantize_one, name=f"quantize[{recipe}]", cache_policy=NO_CACHE)(ws, recipe, params)
    task(stages.validate_one, name=f"validate[{recipe}]", cache_policy=NO_CACHE)(ws, params, recipe)
    write_record(ws, params, recipe, pool)
    return "computed"


def pool_benchmark_file(ws: Workspace, pool: str) -> Path:
    return ws.root / "reports" / "pools" / f"benchmark.{pool}.json"


@flow(name="vitq-benchmark")
def benchmark_flow(workspace: str, recipes: list[str], pool: str = "cpu") -> None:
    """FP32 and `recipes` timed side by side on this pool's hardware, in a process of their own
    (Prefect's event and log threads would otherwise land inside sub-millisecond timings)."""
    ws, _ = _ws(workspace)
    out = pool_benchmark_file(ws, pool)
    cmd = [sys.executable, "-m", "flows.distributed", "benchmark", str(ws.root), str(out), *recipes]
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
    recipes = list(params.quantize.recipes)
    recipe_pool = {r: pools[get_recipe(r).target] for r in recipes}
    ran: list[str] = []
    steps: list[StepRun] = []
    fan = dict(start_timeout_s=start_timeout_s, retries=step_retries)

    # 1. Prepared inputs, on the preparation pool, unless dvc.lock and the reference record say they are current.
    dvc = DvcStages(ws.root)
    stale = [s for s in PREPARED if force or not dvc.is_fresh(s)]
    dvc.close()
    reference_current = not stale and reusable(ws, params, REFERENCE) is not None
    if stale or not reference_current or force:
        steps += _fan_out([(f"vitq-prepare/{pools[PREPARE]}", pools[PREPARE],
                            {**common, "force": force, "pool": pools[PREPARE]}, "prepare")], **fan)
        ran += stale
    else:
        log.info("%s, fp32 reference: up to date (dvc.lock digests), reused", ", ".join(PREPARED))

    # 2. One step per recipe on its target's pool (a variant with unchanged inputs and recipe is reused there).
    dvc = DvcStages(ws.root)
    variants_stale = force or requantize or not (dvc.is_fresh("quantize") and dvc.is_fresh("validate"))
    dvc.close()
    if variants_stale:
        stages.prune_outputs(ws.variants_dir, set(recipes))
        stages.prune_outputs(ws.validation_dir, set(recipes) | {REFERENCE})
        for wave in stages.variant_waves(recipes):  # a recipe reusing another variant's decision waits for it
            steps += _fan_out([(f"vitq-variant/{recipe_pool[r]}", recipe_pool[r],
                                {**common, "recipe": r, "force": force or requantize, "pool": recipe_pool[r]},
                                f"variant[{r}]") for r in wave], **fan)
        _commit(ws, ["quantize", "validate"])
        ran += ["quantize", "validate"]
    else:
        log.info("quantize, validate: up to date (dvc.lock digests and recipes unchanged), %d variants reused",
                 len(recipes))

    # 3. Benchmark on each pool that produced variants, one pool at a time; merged into benchmark.json.
    dvc = DvcStages(ws.root)
    bench_stale = variants_stale or not dvc.is_fresh("benchmark")
    dvc.close()
    if bench_stale:
        by_pool: dict[str, list[str]] = {}
        for r in recipes:
            by_pool.setdefault(recipe_pool[r], []).append(r)
        results = {}
        for pool, names in by_pool.items():
            steps += _fan_out([(f"vitq-benchmark/{pool}", pool, {"workspace": str(ws.root), "recipes": names,
                                                                 "pool": pool}, f"benchmark[{pool}]")], **fan)
            results[pool] = benchmark.load_benchmark(pool_benchmark_file(ws, pool))
        base = pools["onnx"] if pools["onnx"] in results else next(iter(results))
        benchmark.save_benchmark(merge_benchmarks(results, base), ws.benchmark_file)
        _commit(ws, ["benchmark"])
        ran.append("benchmark")
    else:
        log.info("benchmark: up to date (dvc.lock), reused")

    # 4. Report here (cheap), with every routed recipe as a variant: none is "not run" on this machine.
    dvc = DvcStages(ws.root)
    report_stale = bench_stale or not dvc.is_fresh("report")
    dvc.close()
    if report_stale:
        task(stages.run_report, name="report", cache_policy=NO_CACHE)(ws, params, recipes)
        _commit(ws, ["report"])
        ran.append("report")
    else:
        log.info("report: up to date (dvc.lock), reused")
    if dvc_remote:
        dvc_push(str(ws.root), ["quantize", "validate", "benchmark", "report"], dvc_remote)

    # 5. One MLflow parent run for the whole orchestrated run, children per variant, registry aliases.
    summary = json.loads(ws.summary_file.read_text())
    spec = load_model_spec(ws.model_dir)
    stage_metrics = {"orchestrated_wall_s": time.perf_counter() - started}
    if spec.top1 is not None:
        stage_metrics["fp32_top1_torch"] = spec.top1
    tags = {"orchestration": "distributed", "reused": ",".join(s for s in (*PREPARED, "quantize", "validate",
                                                                          "benchmark", "report") if s not in ran)
            or "none", **{f"step.{s.name}": f"pool={s.pool} worker={s.worker} flow_run={s.flow_run_id}"
                          f" attempts={s.attempts}" for s in steps}}
    if dvc_remote:
        tags["dvc_remote"] = dvc_remote
    run_id = log_to_mlflow(ws, params, summary, stage_metrics, ran, str(flow_run.id), tags)
    log.info("orchestrated run: %d steps dispatched, stages run: %s; MLflow parent run %s; %.1f s",
             len(steps), ",".join(ran) or "none (all reused)", run_id, time.perf_counter() - started)
    return summary


def _commit(ws: Workspace, names: list[str]) -> None:
    dvc = DvcStages(ws.root)
    try:
        for name in names:
            dvc.commit(name)
    finally:
        dvc.close()


if __name__ == "__main__":  # the benchmark step's timing process: python -m flows.distributed benchmark ROOT OUT RECIPE...
    if len(sys.argv) < 4 or sys.argv[1] != "benchmark":
        sys.exit("usage: python -m flows.distributed benchmark ROOT OUT [RECIPE ...]")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _benchmark_main(sys.argv[2], sys.argv[3], sys.argv[4:])
