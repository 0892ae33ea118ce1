"""`vitq latency` (alias `vitq bench`): FP32 vs ONNX Runtime dynamic quantization vs the default
static W8A8 variant, side by side in one run, for several models and batch sizes, on this machine's CPU.

Each model goes through the pipeline's own stage functions in a scratch workspace (real digits
images resized to the model's input for calibration and inputs; timm models with random weights
are fine for latency), then every variant is timed with the benchmark stage's interleaved rounds.
Writes `reports/bench.json`: {"machine": ..., "runs": [{model, batch, variant, latency_ms_p50,
latency_ms_p95, size_mb, throughput_ips}], "ratios": [...], "gpu": ...}.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from tasks import calibrate, data, export, model, quantize
from tasks.benchmark import benchmark_models, machine_info
from tasks.layout import Workspace
from vitq.config import BenchmarkConfig, CalibrationConfig, DataConfig, ExportConfig, ModelConfig
from vitq.experiments._models import ExperimentModel

log = logging.getLogger("vitq.experiments.latency")

DEFAULT_STATIC = "onnx-w8a8-percentile"
DYNAMIC = "onnx-w8-dynamic"


def _model_dir(m: ExperimentModel, ws: Workspace, seed: int) -> Path:
    if m.model_dir is not None:
        return m.model_dir
    model.resolve_model(ModelConfig(source="timm", name=m.timm_name), ws.data_dir, ws.model_dir, seed)
    return ws.model_dir


def bench_model(m: ExperimentModel, batches: list[int], cfg: BenchmarkConfig, static_recipe: str,
                scratch: Path) -> list[dict]:
    ws = Workspace(scratch / m.name)
    n_images = max(16, max(batches))
    channels, image_size, _ = m.input_size
    data.prepare_data(
        DataConfig(image_size=image_size, channels=channels, validation_size=n_images, calibration_size=16),
        seed=0, out_dir=ws.data_dir,
    )
    model_dir = _model_dir(m, ws, seed=0)
    log.info("bench: %s: export", m.name)
    export.export_onnx(model_dir, ws.data_dir, ExportConfig(), ws.export_dir)
    calibrate.calibrate(
        ws.export_dir / "model.prep.onnx", model_dir, ws.data_dir,
        CalibrationConfig(methods=("minmax", "percentile"), batch_size=4), ws.calibration_dir,
    )
    paths = {"fp32": ws.export_dir / "model.onnx"}
    for label, recipe in (("dynamic", DYNAMIC), ("static", static_recipe)):
        art = quantize.quantize_variant(recipe, ws.export_dir / "model.prep.onnx", ws.calibration_dir, ws.variants_dir)
        paths[label] = quantize.variant_dir(ws.variants_dir, recipe) / art.artifact
    runs = []
    for batch in batches:
        log.info("bench: %s: timing batch %d", m.name, batch)
        result = benchmark_models(paths, model_dir, ws.data_dir, cfg.model_copy(update={"batch_size": batch}))
        for variant, t in result.models.items():
            runs.append({
                "model": m.name, "batch": batch, "variant": variant,
                "recipe": {"dynamic": DYNAMIC, "static": static_recipe}.get(variant, "fp32"),
                "latency_ms_p50": t.latency_ms_p50, "latency_ms_p95": t.latency_ms_p95,
                "size_mb": t.size_mb, "throughput_ips": t.throughput_ips, "runs": t.runs,
            })
    return runs


def ratios(runs: list[dict]) -> list[dict]:
    """Per (model, batch): FP32/static and dynamic/static p50 latency (> 1 means static is faster)."""
    out = []
    for key in sorted({(r["model"], r["batch"]) for r in runs}):
        by = {r["variant"]: r["latency_ms_p50"] for r in runs if (r["model"], r["batch"]) == key}
        out.append({
            "model": key[0], "batch": key[1],
            "fp32_over_static": by["fp32"] / by["static"],
            "dynamic_over_static": by["dynamic"] / by["static"],
            "fp32_over_dynamic": by["fp32"] / by["dynamic"],
        })
    return out


def gpu_record() -> dict:
    """What this machine can say about a GPU comparison (measured elsewhere or not at all)."""
    try:
        import torch

        if torch.cuda.is_available():
            return {"device": torch.cuda.get_device_name(), "not_measured": "run `vitq bench --gpu` on the cuda worker"}
    except ImportError:
        pass
    return {"not_measured": "no CUDA device on this machine; the GPU comparison runs on a cuda worker"}


def run_bench(models: list[ExperimentModel], batches: list[int], cfg: BenchmarkConfig, out: Path,
              static_recipe: str = DEFAULT_STATIC) -> dict:
    from tasks._io import write_json

    runs = []
    with tempfile.TemporaryDirectory(prefix="vitq-bench-") as scratch:
        for m in models:
            runs += bench_model(m, batches, cfg, static_recipe, Path(scratch))
    result = {
        "machine": machine_info(),
        "settings": {**cfg.model_dump(exclude={"batch_size"}), "batches": batches, "graph_optimization": "all"},
        "runs": runs,
        "ratios": ratios(runs),
        "gpu": gpu_record(),
    }
    write_json(out, result)
    return result


def bench_table(result: dict) -> str:
    lines = [f"{'model':24s} {'batch':>5s} {'fp32 ms':>9s} {'dynamic ms':>10s} {'static ms':>9s} "
             f"{'fp32/static':>11s} {'dyn/static':>10s}"]
    for r in result["ratios"]:
        by = {x["variant"]: x["latency_ms_p50"] for x in result["runs"] if (x["model"], x["batch"]) == (r["model"], r["batch"])}
        lines.append(f"{r['model']:24s} {r['batch']:5d} {by['fp32']:9.2f} {by['dynamic']:10.2f} {by['static']:9.2f} "
                     f"{r['fp32_over_static']:11.2f} {r['dynamic_over_static']:10.2f}")
    return "\n".join(lines)
