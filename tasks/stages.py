"""The pipeline's stages over a workspace: what `vitq stage <name>` (and so `dvc repro`) runs.

Each function reads its inputs from the workspace, writes its outputs there, and returns the
stage's typed result. The Prefect flow calls the same functions, with quantize/validate split
per variant so variants run concurrently.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from tasks import benchmark, calibrate, data, error_report, export, model, quantize, report, tradeoff, validate
from tasks.layout import Workspace
from tasks.targets import get_target
from vitq.config import Params
from vitq.recipes import get_recipe

log = logging.getLogger("vitq.stages")


def run_data(ws: Workspace, p: Params) -> data.DataResult:
    return data.prepare_data(p.data, p.seed, ws.data_dir)


def run_model(ws: Workspace, p: Params) -> model.ModelSpec:
    return model.resolve_model(p.model, ws.data_dir, ws.model_dir, p.seed)


def run_export(ws: Workspace, p: Params) -> export.ExportResult:
    return export.export_onnx(ws.model_dir, ws.data_dir, p.export, ws.export_dir)


def run_calibrate(ws: Workspace, p: Params) -> calibrate.CalibrationResult:
    return calibrate.calibrate(ws.export_dir / "model.prep.onnx", ws.model_dir, ws.data_dir, p.calibration, ws.calibration_dir)


def plan_variants(p: Params) -> tuple[list[str], dict[str, str]]:
    """Split the configured recipes into those this machine can run and those it cannot (with why)."""
    runnable, not_run = [], {}
    for name in p.quantize.recipes:
        reason = get_target(get_recipe(name).target).missing_runtime()
        if reason:
            not_run[name] = reason
        else:
            runnable.append(name)
    return runnable, not_run


def variant_waves(recipes: list[str]) -> list[list[str]]:
    """Recipes in the order they can be quantized: those that reuse another variant's decision after it."""
    first = [r for r in recipes if not get_recipe(r).reuses]
    return [w for w in (first, [r for r in recipes if r not in first]) if w]


def prune_outputs(folder: Path, keep: set[str]) -> None:
    """Remove outputs of recipes no longer configured, so no stale variant is reported."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.split(".")[0] not in keep and not entry.name.startswith("."):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def quantize_one(ws: Workspace, name: str, p: Params | None = None) -> quantize.VariantArtifact:
    """One variant. Recovery recipes also read the model, data and params (from params.yaml when `p` is None)."""
    return get_target(get_recipe(name).target).quantize(ws, name, p)


def run_quantize(ws: Workspace, p: Params) -> list[quantize.VariantArtifact]:
    runnable, not_run = plan_variants(p)
    for name, why in not_run.items():
        log.warning("quantize: %s not run: %s", name, why)
    prune_outputs(ws.variants_dir, set(runnable))
    return [quantize_one(ws, name, p) for wave in variant_waves(runnable) for name in wave]


def validate_reference(ws: Workspace, p: Params) -> validate.ValidationResult:
    ws.validation_dir.mkdir(parents=True, exist_ok=True)
    return validate.reference_outputs(ws.export_dir / "model.onnx", ws.model_dir, ws.data_dir, p.validate_, ws.validation_dir)


def validate_one(ws: Workspace, p: Params, name: str) -> validate.ValidationResult:
    art = quantize.load_variant(ws.variants_dir, name)
    return get_target(art.recipe["target"]).validate(ws, p, name)


def validate_onnx_graph(ws: Workspace, p: Params, name: str) -> validate.ValidationResult:
    """Validation of a variant produced from the ONNX graph (onnx, tensorrt), with its per-tensor error report."""
    art = quantize.load_variant(ws.variants_dir, name)
    folder = quantize.variant_dir(ws.variants_dir, name)
    path = folder / art.artifact
    result = validate.validate_variant(name, path, ws.model_dir, ws.data_dir, p.validate_, ws.validation_dir,
                                       get_target(art.recipe["target"]).predict)
    if art.recipe["scheme"] == "static" and p.validate_.error_report_images:
        spec = model.load_model_spec(ws.model_dir)
        images = data.load_split(ws.data_dir, "calibration").images[: p.validate_.error_report_images]
        own_float = folder / "float.prep.onnx"  # smoothquant/qat weights
        float_ref = own_float if own_float.is_file() else ws.export_dir / "model.prep.onnx"
        # On the Q/DQ graph, not the served file: a fused form (model.ort.onnx) or an engine has no Q/DQ pairs left.
        qdq = folder / art.qdq_artifact
        rows = error_report.tensor_errors(float_ref, qdq, data.model_inputs(images, spec.mean, spec.std))
        csv_path, png_path = error_report_paths(ws, name)
        error_report.write_error_report(rows, csv_path, png_path, name)
    return result


def error_report_paths(ws: Workspace, name: str) -> tuple[Path, Path]:
    return ws.validation_dir / f"{name}.errors.csv", ws.validation_dir / f"{name}.errors.png"


def run_validate(ws: Workspace, p: Params) -> list[validate.ValidationResult]:
    runnable, _ = plan_variants(p)
    prune_outputs(ws.validation_dir, set(runnable) | {validate.REFERENCE})
    validate_reference(ws, p)
    return [validate_one(ws, p, name) for name in runnable]


def run_benchmark(ws: Workspace, p: Params, names: list[str] | None = None,
                  out: Path | None = None) -> benchmark.BenchmarkResult:
    """FP32 and the variants side by side. `names` (default: those this machine can run) and `out`
    (default: reports/benchmark.json): the orchestrated flow times each pool's variants on that pool."""
    runnable = plan_variants(p)[0] if names is None else list(names)
    models = {"fp32": ws.export_dir / "model.onnx"}
    by_target: dict[str, dict[str, Path]] = {}
    for name in runnable:
        art = quantize.load_variant(ws.variants_dir, name)
        by_target.setdefault(art.recipe["target"], {})[name] = quantize.variant_dir(ws.variants_dir, name) / art.artifact
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
        (quantize.load_variant(ws.variants_dir, n), validate.load_validation(ws.validation_dir, n)) for n in runnable
    ]
    bench = benchmark.load_benchmark(ws.benchmark_file) if ws.benchmark_file.is_file() else None
    return report.build_summary(
        spec=model.load_model_spec(ws.model_dir),
        data=data_result,
        data_digest=f"md5:{md5}" if md5 else f"sha256:{data_result.digest}",
        fp32_size_mb=export.load_export_result(ws.export_dir).size_mb,
        reference=validate.load_validation(ws.validation_dir, validate.REFERENCE),
        variants=variants,
        bench=bench,
        not_run=not_run,
        artifact_root=str(ws.variants_dir.relative_to(ws.root)),
    )


def run_report(ws: Workspace, p: Params, produced: list[str] | None = None) -> str:
    summary = build_summary(ws, p, produced)
    table = report.write_report(summary, ws.summary_file, ws.report_file)
    tradeoff.append_plot_section(ws.report_file, tradeoff.write_tradeoff_plots(summary, ws.plots_dir))
    return table


STAGES: dict[str, Callable[[Workspace, Params], object]] = {
    "data": run_data,
    "model": run_model,
    "export": run_export,
    "calibrate": run_calibrate,
    "quantize": run_quantize,
    "validate": run_validate,
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


def preflight(ws: Workspace, p: Params) -> None:
    """Cheap checks of user input before any server starts or stage runs (each raises a one-line VitqError)."""
    require_dvc_workspace(ws.root)
    data.check_data_config(p.data)
    model.check_model_config(p.model)
    for name in p.quantize.recipes:
        get_target(get_recipe(name).target)
