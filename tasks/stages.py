"""The pipeline's stages over a workspace: what `vitq stage <name>` (and so `dvc repro`) runs.

Each function reads its inputs from the workspace, writes its outputs there, and returns the
stage's typed result. The Prefect flows call the same functions; variants go through one runner
(`run_variants`), two DVC stages per variant (`quantize@<recipe>`, `validate@<recipe>`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import yaml

from vitq.tasks import benchmark, calibrate, data, export, model, report, tradeoff, validate
from vitq.tasks._io import file_digest, read_json, write_json
from vitq.tasks._memory import budget_bytes
from vitq.tasks.layout import Workspace
from vitq.tasks.variant import VariantArtifact, load_variant, variant_dir
from vitq.tasks.targets.registry import get_target
from vitq.config import Params
from vitq.params import load_params
from vitq.recipes import get_recipe

log = logging.getLogger("vitq.stages")


def run_data(ws: Workspace, p: Params) -> data.DataResult:
    return data.prepare_data(p.data, p.seed, ws.data_dir, ws.root)


def run_model(ws: Workspace, p: Params) -> model.ModelSpec:
    return model.resolve_model(p.model, ws.data_dir, ws.model_dir, p.seed, root=ws.root)


def run_export(ws: Workspace, p: Params) -> export.ExportResult:
    return export.export_onnx(ws.model_dir, ws.data_dir, p.export, ws.export_dir)


def run_calibrate(ws: Workspace, p: Params) -> calibrate.CalibrationResult:
    return calibrate.calibrate(ws.export_dir / "model.prep.onnx", ws.model_dir, ws.data_dir, p.calibration, ws.calibration_dir,
                               p.quantize.extra_percentiles, p.quantize.calibrates_attention,
                               p.quantize.calibrates_residual, budget_bytes(p.memory_budget_mb))


def recovery_inputs(ws: Workspace, p: Params):
    from vitq.tasks.recovery.variants import Inputs

    return Inputs(ws.model_dir, ws.data_dir, ws.export_dir, ws.calibration_dir, p, ws.search_dir, ws.smoothquant_dir)


def run_needs(ws: Workspace, p: Params) -> dict:
    """Which shared results (the range search, SmoothQuant) the configured recipes read: artifacts/needs/."""
    from vitq.tasks.recovery import shared

    return shared.write_needs(p, ws.needs_dir)


def run_search(ws: Workspace, p: Params) -> dict:
    """The per-tensor range search, once for every recipe that reads it (artifacts/search/)."""
    from vitq.tasks.recovery import variants

    return variants.make_search(recovery_inputs(ws, p), ws.needs_dir / "search.json", ws.search_dir)


def run_smoothquant(ws: Workspace, p: Params) -> dict:
    """SmoothQuant's alpha search and smoothed model, once for every recipe that reads it (artifacts/smoothquant/)."""
    from vitq.tasks.recovery import variants

    return variants.make_smoothquant(recovery_inputs(ws, p), ws.needs_dir / "smoothquant.json", ws.smoothquant_dir)


def missing_runtime(name: str) -> str | None:
    """Why this machine cannot make variant `name` (its target's runtime is missing), or None: the one
    place the stages ask."""
    return get_target(get_recipe(name).target).missing_runtime()


def plan_variants(p: Params) -> tuple[list[str], dict[str, str]]:
    """Split the configured variants into those this machine can run and those it cannot (with why),
    in the order they can be made (see `variant_waves`)."""
    runnable, not_run = [], {}
    for name in p.quantize.variants:
        reason = missing_runtime(name)
        if reason:
            not_run[name] = reason
        else:
            runnable.append(name)
    return runnable, not_run


def variant_waves(recipes: list[str]) -> list[list[str]]:
    """Recipes in the order they can be quantized: those that reuse another variant's decision after it."""
    first = [r for r in recipes if not get_recipe(r).reuses]
    return [w for w in (first, [r for r in recipes if r not in first]) if w]


def variant_stages(name: str) -> tuple[str, str]:
    """The DVC stages (dvc.yaml) that make variant `name`: `quantize@<name>`, `validate@<name>`
    (`carry-quantize@`, `carry-validate@` for a recipe that applies another variant's decision)."""
    prefix = "carry-" if get_recipe(name).reuses else ""
    return f"{prefix}quantize@{name}", f"{prefix}validate@{name}"


def prune_outputs(folder: Path, keep: set[str]) -> None:
    """Remove outputs of recipes no longer configured, so no stale variant is reported."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.split(".")[0] not in keep and not entry.name.startswith("."):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


# -- what each variant reads: one plan file per variant, the only dependency its DVC stage has on
#    params.yaml and the calibration tables ----------------------------------------------------------

def plan_record(ws: Workspace, p: Params, name: str, shared_digests: dict[str, str | None] | None = None) -> dict:
    """Everything quantizing variant `name` reads besides the FP32 model, data and export: its recipe, the
    parameter sections it reads, and the digest of the calibration table it reads. Two variants' records
    differ only where their inputs do, so a changed setting requantizes exactly the variants that read it
    (validation settings are declared by the validate@ stages themselves)."""
    recipe = p.quantize.recipe(name)
    reads: dict = {}
    if recipe.table():  # a percentile override reads its own table: only its variant follows it
        table = calibrate.table_path(ws.calibration_dir, *recipe.table())
        reads["calibration_table"] = {"file": table.name, "sha256": file_digest(table) if table.is_file() else None}
    if recipe.recovery in ("search", "smoothquant"):
        # the shared stage's result (tasks/recovery/shared.py; its digest, below) quantized, then judged on a seeded
        # subset of recovery.search_images held-out images
        reads.update(seed=p.seed, recovery={"search_images": p.recovery.search_images})
    elif recipe.recovery:  # auto and qat calibrate, re-export and fine-tune on their own
        # the range search's candidates: the calibrate stage's histograms (their content, not the file's bytes)
        result = ws.calibration_dir / "calibration.json"
        reads["calibration_histograms"] = (calibrate.load_calibration_result(ws.calibration_dir).histograms_sha256
                                           if result.is_file() else None)
        reads.update(seed=p.seed, recovery=p.recovery.model_dump(mode="json"),
                     # not the percentile or methods: the table digest above covers what they change
                     calibration=p.calibration.model_dump(mode="json", exclude={"percentile", "methods"}),
                     export=p.export.model_dump(mode="json"),
                     train=p.model.train.model_dump(mode="json"))
    if recipe.recovery:  # the shared results it reads (tasks/recovery/shared.py), by content
        from vitq.tasks.recovery import shared

        digests = shared_digests if shared_digests is not None else shared_result_digests(ws)
        for result, kinds in shared.READERS.items():
            if recipe.recovery in kinds:
                reads[result] = digests[result]
    reads.update(get_target(recipe.target).reads(p))  # what the target's own path reads
    if recipe.reuses:
        reads["applies"] = recipe.reuses
    return {"variant": name, "stage": variant_stages(name)[0], "recipe": asdict(recipe), "reads": reads}


def shared_result_digests(ws: Workspace) -> dict[str, str | None]:
    """The content digest of each shared result's folder (tasks/recovery/shared.py), None where there is none."""
    from vitq.tasks.recovery import shared

    return {result: shared.folder_digest(getattr(ws, f"{result}_dir")) for result in shared.READERS}


def run_plan(ws: Workspace, p: Params) -> dict[str, dict]:
    """Write `artifacts/plan/<variant>.json` for every configured variant; remove the outputs of
    variants no longer configured."""
    from vitq.tasks._io import atomic_dir

    digests = shared_result_digests(ws)  # once: the smoothed model's files are hundreds of MB at ViT-B size
    records = {name: plan_record(ws, p, name, digests) for name in p.quantize.variants}
    with atomic_dir(ws.plan_dir) as tmp:
        for name, record in records.items():
            write_json(tmp / f"{name}.json", record)
    prune_outputs(ws.variants_dir, set(records))
    prune_outputs(ws.validation_dir, set(records) | {validate.REFERENCE})
    log.info("plan: %d variant(s): %s", len(records), ", ".join(records))
    return records


# -- one variant: quantize, then validate against the FP32 reference ------------------------------

NOT_RUN = "not_run.json"  # in a variant's folders when this machine cannot make it: why


def quantize_one(ws: Workspace, name: str, p: Params | None = None) -> VariantArtifact:
    """One variant, by its recipe's target. Recovery recipes also read the model, data and params (from
    params.yaml when `p` is None)."""
    return get_target(get_recipe(name).target).quantize(ws, name, p or load_params(ws.params_file))


def run_reference(ws: Workspace, p: Params) -> validate.ValidationResult:
    """FP32 outputs on the validation split, the reference every variant is judged against."""
    from vitq.tasks._io import atomic_dir

    with atomic_dir(ws.validation_for(validate.REFERENCE)) as tmp:
        validate.reference_outputs(ws.export_dir / "model.onnx", ws.model_dir, ws.data_dir, p.validate_, tmp, p.task)
    return validate.load_validation(ws.validation_for(validate.REFERENCE), validate.REFERENCE)


def validate_one(ws: Workspace, p: Params, name: str) -> validate.ValidationResult:
    """Validate variant `name` into `reports/validation/<name>/`, replaced whole once it is complete (no stale
    error report; a failed validation leaves the previous folder as it was)."""
    from vitq.tasks._io import atomic_dir

    art = load_variant(ws.variants_dir, name)
    with atomic_dir(ws.validation_for(name)) as tmp:
        return get_target(art.recipe["target"]).validate(ws, p, name, tmp)


def not_run_reason(ws: Workspace, name: str) -> str | None:
    """Why variant `name` was recorded as not run (its target's runtime was missing), or None."""
    marker = variant_dir(ws.variants_dir, name) / NOT_RUN
    return read_json(marker)["reason"] if marker.is_file() else None


def runnable_now(ws: Workspace, name: str) -> bool:
    """True when variant `name` was recorded as not run but its target's runtime is here now."""
    return not_run_reason(ws, name) is not None and missing_runtime(name) is None


def _check_configured(p: Params, name: str) -> None:
    if name not in p.quantize.variants:
        from vitq.errors import VitqError

        raise VitqError(f"variant {name!r} is not configured; configured: {', '.join(p.quantize.variants)}")
    # The recipes params.yaml defines are registered when it is parsed; a Params object handed to another
    # process (a variant worker unpickles it, no parse) brings its definitions, not the registry: register here.
    from vitq.recipes import register_defined

    register_defined(p.quantize.defined_recipes())


def run_quantize(ws: Workspace, p: Params, name: str) -> VariantArtifact | None:
    """Stage quantize@<name>: make the variant; where this machine lacks the target's runtime, its
    folder records why instead (None)."""
    from vitq.tasks._io import atomic_dir

    _check_configured(p, name)
    reason = missing_runtime(name)
    if reason:
        log.warning("%s: not run: %s", name, reason)
        with atomic_dir(variant_dir(ws.variants_dir, name)) as tmp:
            write_json(tmp / NOT_RUN, {"variant": name, "reason": reason})
        return None
    return quantize_one(ws, name, p)


def run_validate(ws: Workspace, p: Params, name: str) -> validate.ValidationResult | None:
    """Stage validate@<name>: judge the variant against the FP32 reference (a variant not run: why)."""
    from vitq.tasks._io import atomic_dir

    _check_configured(p, name)
    reason = not_run_reason(ws, name)
    if reason:
        with atomic_dir(ws.validation_for(name)) as tmp:
            write_json(tmp / NOT_RUN, {"variant": name, "reason": reason})
        return None
    return validate_one(ws, p, name)


def run_variant(ws: Workspace, p: Params, name: str, steps: tuple[str, ...] = ("quantize", "validate")) -> None:
    """Variant `name`: the stages in `steps` (quantize, then validate), in this process, each recorded."""
    for step in ("quantize", "validate"):
        if step in steps:
            run_stage(step, ws, p, name)


def steps_to_run(name: str, is_stale: Callable[[str], bool]) -> tuple[str, ...]:
    """Which of variant `name`'s stages to run, given `is_stale(dvc_stage)`: a requantized variant is revalidated."""
    q, v = variant_stages(name)
    if is_stale(q):
        return ("quantize", "validate")
    return ("validate",) if is_stale(v) else ()


def run_variants(names: list[str], *, stale: Callable[[str], bool], submit: Callable[[str], object],
                 done: Callable[[str], None] = lambda name: None) -> list[str]:
    """The one variant runner: waves in dependency order (a variant applying another's decision after it);
    in a wave, every stale variant is submitted at once (`submit(name)` returns something with `.result()`,
    or the result itself), then each is waited for and `done(name)` recorded. Returns the names run.
    A failed variant fails the run after the rest of its wave finished, naming every failure."""
    ran: list[str] = []
    for wave in variant_waves(names):
        pending = [(name, submit(name)) for name in wave if stale(name)]
        errors = []
        for name, handle in pending:
            try:
                handle.result() if hasattr(handle, "result") else handle
            except Exception as exc:  # noqa: BLE001 - reported together below
                errors.append((name, exc))
                continue
            done(name)
            ran.append(name)
        if errors:
            if len(errors) == 1:
                raise errors[0][1]
            from vitq.errors import VitqError

            raise VitqError(f"{len(errors)} variants failed: " + " | ".join(f"{n}: {e}" for n, e in errors))
    return ran


def run_all_variants(ws: Workspace, p: Params) -> list[str]:
    """Every configured variant in this process, in dependency order (the experiment commands, tests)."""
    run_reference(ws, p)
    run_plan(ws, p)
    return run_variants(list(p.quantize.variants), stale=lambda n: True, submit=lambda n: run_variant(ws, p, n))


def run_benchmark(ws: Workspace, p: Params, names: list[str] | None = None,
                  out: Path | None = None) -> benchmark.BenchmarkResult:
    """FP32 and the variants side by side. `names` (default: those this machine can run) and `out`
    (default: reports/benchmark.json): the orchestrated flow times each pool's variants on that pool."""
    runnable = plan_variants(p)[0] if names is None else list(names)
    models = {"fp32": ws.export_dir / "model.onnx"}
    by_target: dict[str, dict[str, Path]] = {}
    for name in runnable:
        art = load_variant(ws.variants_dir, name)
        by_target.setdefault(art.recipe["target"], {})[name] = variant_dir(ws.variants_dir, name) / art.artifact
    own_timings, own_not_measured = {}, {}  # targets timed by their own runtime, against their own baseline (Core ML)
    for target_name, paths in by_target.items():
        timed = get_target(target_name).benchmark(ws, p, paths)
        if timed is None:  # timed here, beside FP32
            models.update(paths)
        else:
            own_timings.update(timed[0])
            own_not_measured.update(timed[1])
    result = benchmark.benchmark_models(models, ws.model_dir, ws.data_dir, p.benchmark)
    if own_timings or own_not_measured:
        from dataclasses import replace

        result = replace(result, models={**result.models, **own_timings},
                         not_measured={**result.not_measured, **own_not_measured})
    benchmark.save_benchmark(result, out or ws.benchmark_file)
    return result


def dvc_data_digest(ws: Workspace) -> str | None:
    """DVC's md5 of the materialised data, from dvc.lock (None before DVC has recorded it)."""
    lock = ws.root / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for out in stages.get("data", {}).get("outs", []):
        if Path(out.get("path", "")) == ws.data_dir.relative_to(ws.root):
            return out.get("md5")
    return None


def build_summary(ws: Workspace, p: Params, produced: list[str] | None = None) -> dict:
    """`produced`: the variant names produced (default: the recipes this machine can run); when the
    orchestrated flow routed every recipe to a worker that can run it, none is "not run"."""
    runnable, not_run = plan_variants(p)
    if produced is not None:
        runnable, not_run = list(produced), {n: r for n, r in not_run.items() if n not in produced}
    data_result = data.load_data_result(ws.data_dir)
    md5 = dvc_data_digest(ws)
    variants = [
        (load_variant(ws.variants_dir, n), validate.load_validation(ws.validation_for(n), n)) for n in runnable
    ]
    bench = benchmark.load_benchmark(ws.benchmark_file) if ws.benchmark_file.is_file() else None
    records = run_records(ws, p, runnable)
    return report.build_summary(
        spec=model.load_model_spec(ws.model_dir),
        data=data_result,
        data_digest=f"md5:{md5}" if md5 else f"sha256:{data_result.digest}",
        fp32_size_mb=export.load_export_result(ws.export_dir).size_mb,
        reference=validate.load_validation(ws.validation_for(validate.REFERENCE), validate.REFERENCE),
        variants=variants,
        bench=bench,
        not_run=not_run,
        artifact_root=str(ws.variants_dir.relative_to(ws.root)),
        records=records,
        critical=run_critical_path(records, ws),
    )


def run_critical_path(records: dict[str, dict], ws: Workspace) -> list[dict]:
    """The run's critical path through the records (tasks/resources.py), over dvc.yaml's graph."""
    from vitq.tasks import resources

    if not records:
        return []
    try:
        deps = stage_dependencies(ws)
    except Exception as exc:  # noqa: BLE001 - no DVC repository (a test's bare workspace): times alone
        log.debug("stage graph not read (%s): the critical path follows times only", exc)
        deps = {}
    return resources.critical_path(records, deps)


def run_report(ws: Workspace, p: Params, produced: list[str] | None = None) -> str:
    summary = build_summary(ws, p, produced)
    table = report.write_report(summary, ws.summary_file, ws.report_file)
    tradeoff.append_plot_section(ws.report_file, tradeoff.write_tradeoff_plots(summary, ws.plots_dir))
    return table


# The stages before the variants, in the order they run (each alone).
PREPARED = ("data", "model", "export", "calibrate", "needs", "search", "smoothquant", "reference", "plan")


def dvc_stage_name(step: str, recipe: str | None = None) -> str:
    """The DVC stage (dvc.yaml) of `step` (a variant's: `quantize@<recipe>`, `carry-quantize@<recipe>`, ...)."""
    if recipe is None:
        return step
    return variant_stages(recipe)[0 if step == "quantize" else 1]


def record_path(ws: Workspace, step: str, recipe: str | None = None) -> Path:
    """Where stage `step`'s record (tasks/resources.py) goes: `reports/stages/<dvc stage>.json`, declared in
    dvc.yaml as an output of that stage."""
    return ws.stage_records_dir / f"{dvc_stage_name(step, recipe)}.json"


def run_stage(step: str, ws: Workspace, p: Params, *args: str) -> object:
    """Stage `step` (a variant's: with its recipe) in this process: the one way `vitq stage`, the flow and the
    variant runner run a stage. Its wall time and peak RSS are recorded beside its outputs (tasks/resources.py)."""
    from vitq.tasks import resources

    recipe = args[0] if args else None
    with resources.measured(dvc_stage_name(step, recipe)) as record:
        result = STAGES[step](ws, p, *args)
    if step != "report":  # the report reads the records: none of its own
        resources.write_record(record_path(ws, step, recipe), record)
    return result


def stage_record(ws: Workspace, step: str, recipe: str | None = None) -> dict | None:
    """The record of stage `step`'s last run (None: not run yet, or made before records existed)."""
    from vitq.tasks import resources

    return resources.read_record(record_path(ws, step, recipe))


def stage_dependencies(ws: Workspace) -> dict[str, list[str]]:
    """dvc.yaml's graph, DVC's own (`Repo.index.graph`: edges from a stage to the stages whose outputs it reads):
    each stage's name -> those stages' names."""
    from dvc.repo import Repo

    repo = Repo(str(ws.root))
    try:
        graph = repo.index.graph
        return {st.name: sorted(dep.name for dep in graph.successors(st)) for st in graph.nodes}
    finally:
        repo.close()


def run_records(ws: Workspace, p: Params, variants: list[str]) -> dict[str, dict]:
    """Every stage's record (DVC stage name -> record), in pipeline order; stages without one are left out."""
    steps = [(s, None) for s in PREPARED]
    steps += [(s, v) for v in variants for s in ("quantize", "validate")] + [("benchmark", None)]
    out = {}
    for step, recipe in steps:
        rec = stage_record(ws, step, recipe)
        if rec is not None:
            out[dvc_stage_name(step, recipe)] = rec
    return out


STAGES: dict[str, Callable[..., object]] = {
    "data": run_data,
    "model": run_model,
    "export": run_export,
    "calibrate": run_calibrate,
    "needs": run_needs,
    "search": run_search,
    "smoothquant": run_smoothquant,
    "reference": run_reference,
    "plan": run_plan,
    "quantize": run_quantize,  # per variant: (ws, p, recipe)
    "validate": run_validate,  # per variant: (ws, p, recipe)
    "benchmark": run_benchmark,
    "report": run_report,
}


def require_dvc_workspace(root: Path) -> None:
    """The flow records stages in DVC: the workspace needs dvc.yaml and a DVC repository."""
    from vitq.errors import VitqError

    if not (root / "dvc.yaml").is_file():
        raise VitqError(f"{root} has no dvc.yaml; run vitq from a workspace (the repository root)")
    if not (root / ".dvc").is_dir():
        raise VitqError(f"{root} is not a DVC repository; run `dvc init` there (or `dvc init --no-scm` outside git)")


def declared_params_missing(ws: Workspace, top: dict) -> tuple[str, str] | None:
    """(stage, key) of the first params key dvc.yaml declares that params.yaml lacks, or None."""
    stages_yaml = (yaml.safe_load((ws.root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    for stage, body in stages_yaml.items():
        body = body.get("do", body) if isinstance(body, dict) else {}
        for entry in body.get("params") or []:
            for key in ([entry] if isinstance(entry, str) else []):  # {file: [keys]} entries name other files
                node = top
                for part in key.split("."):
                    if not isinstance(node, dict) or part not in node:
                        return stage, key
                    node = node[part]
    return None


def preflight(ws: Workspace, p: Params) -> None:
    """Cheap checks of user input before any server starts or stage runs (each raises a one-line VitqError)."""
    require_dvc_workspace(ws.root)
    # dvc.yaml's per-variant stages iterate over these keys of params.yaml itself (not over defaults).
    top = yaml.safe_load(ws.params_file.read_text()) or {}
    raw = top.get("quantize") or {}
    for key in ("recipes", "carry", "define"):
        if key not in raw:
            from vitq.errors import VitqError

            why = "the calibrate stage declares it" if key == "define" else "dvc.yaml makes one stage per entry"
            raise VitqError(f"{ws.params_file}: quantize.{key} must be written out ({why}); e.g. quantize.{key}: "
                            + ("[onnx-w8a8-percentile]" if key == "recipes" else "{}"))
    missing = declared_params_missing(ws, top)
    if missing:
        from vitq.errors import VitqError

        stage, key = missing
        raise VitqError(f"{ws.params_file}: {key} must be written out: dvc.yaml's stage {stage!r} declares it "
                        f"(DVC reads params.yaml itself, not vitq's defaults); copy it from the documented params.yaml")
    data.check_data_config(p.data, ws.root)
    model.check_model_config(p.model, ws.root)
    for name in p.quantize.variants:
        get_target(get_recipe(name).target)
