"""`vitq latency` (alias `vitq bench`): FP32 vs ONNX Runtime dynamic quantization vs the default
static W8A8 variant, side by side in one run, for several models and batch sizes, on this machine's CPU.

Each model goes through the public API (`vitq.quantize` per recipe, `Variant.benchmark` with the other
variant alongside: FP32, dynamic and static timed in interleaved rounds), calibrated on and timed with
real digits images resized to the model's input (timm models with random weights are fine for latency).
Writes `reports/bench.json`: {"machine": ..., "runs": [{model, batch, variant, latency_ms_p50,
latency_ms_p95, size_mb, throughput_ips, round_p50_ms}], "ratios": [...], "gpu": ...}; each ratio is paired
per interleaved round (the models of a round run back to back), with the ratio of whole-run p50s beside it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from vitq.tasks import benchmark, data
from vitq.tasks.benchmark import machine_info
from vitq.config import BenchmarkConfig, DataConfig
from vitq.experiments._models import ExperimentModel

log = logging.getLogger("vitq.experiments.latency")

DEFAULT_STATIC = "onnx-w8a8-percentile"
DYNAMIC = "onnx-w8-dynamic"
CALIBRATION_IMAGES = 16


def bench_model(m: ExperimentModel, batches: list[int], cfg: BenchmarkConfig, static_recipe: str,
                scratch: Path, profiles: list[dict] | None = None) -> list[dict]:
    """Quantize `m` with the dynamic and the static recipe and time both beside FP32 at every batch size;
    with `profiles` (a list), ORT's profile of the three at every batch size is appended to it."""
    import torch

    import vitq

    root = scratch / m.name
    channels, image_size, _ = m.input_size
    data.prepare_data(  # real images at the model's input size: calibration and timing inputs
        DataConfig(image_size=image_size, channels=channels, validation_size=max(16, max(batches)),
                   calibration_size=CALIBRATION_IMAGES),
        seed=0, out_dir=root / "data",
    )
    calibration = m.inputs(data.load_split(root / "data", "calibration").images)
    held_out = m.inputs(data.load_split(root / "data", "validation").images)
    torch.manual_seed(0)  # random weights (all but a trained demo), the same every run
    model = m.build()
    log.info("bench: %s: quantize", m.name)
    dynamic = vitq.quantize(model, DYNAMIC, calibration=calibration, workdir=root / "variants")
    static = vitq.quantize(model, static_recipe, calibration=calibration, workdir=root / "variants")
    labels = {"fp32": "fp32", DYNAMIC: "dynamic", static_recipe: "static"}
    runs = []
    for batch in batches:
        log.info("bench: %s: timing batch %d", m.name, batch)
        result = dynamic.benchmark(batch_size=batch, repeats=cfg.repeats, warmup=cfg.warmup, rounds=cfg.rounds,
                                   threads=cfg.threads, inputs=held_out, alongside=[static])
        if profiles is not None:
            log.info("bench: %s: profiling batch %d", m.name, batch)
            served = {"fp32": dynamic.fp32_onnx, "dynamic": dynamic.served, "static": static.served}
            profiles.append({"model": m.name, "batch": batch, "files": {k: v.name for k, v in served.items()},
                             **benchmark.profile_onnx(served, held_out[:batch], cfg.threads)})
        for name, t in result.models.items():
            runs.append({
                "model": m.name, "batch": batch, "variant": labels[name], "recipe": name,
                "latency_ms_p50": t.latency_ms_p50, "latency_ms_p95": t.latency_ms_p95,
                "size_mb": t.size_mb, "throughput_ips": t.throughput_ips, "runs": t.runs,
                "round_p50_ms": t.round_p50_ms,
            })
    return runs


def ratios(runs: list[dict]) -> list[dict]:
    """Per (model, batch): FP32/static, dynamic/static and FP32/dynamic latency (> 1: the second is faster),
    each paired (vitq.tasks.benchmark.paired_ratio: the median over interleaved rounds of the per-round p50 ratio),
    with the ratio of the whole-run p50s beside it (`*_p50`)."""
    out = []
    for key in sorted({(r["model"], r["batch"]) for r in runs}):
        by = {r["variant"]: r for r in runs if (r["model"], r["batch"]) == key}
        row = {"model": key[0], "batch": key[1]}
        for slow, fast in (("fp32", "static"), ("dynamic", "static"), ("fp32", "dynamic")):
            a, b = by[slow], by[fast]
            row[f"{slow}_over_{fast}"] = benchmark.latency_ratio(a["latency_ms_p50"], b["latency_ms_p50"],
                                                                 a.get("round_p50_ms"), b.get("round_p50_ms"))
            row[f"{slow}_over_{fast}_p50"] = a["latency_ms_p50"] / b["latency_ms_p50"]
        out.append(row)
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
              static_recipe: str = DEFAULT_STATIC, profile: bool = False) -> dict:
    """Time every model at every batch size; `profile`: also ORT's profile of each (result["profiles"])."""
    from vitq.tasks._io import write_json

    runs, profiles = [], [] if profile else None
    with tempfile.TemporaryDirectory(prefix="vitq-bench-") as scratch:
        for m in models:
            runs += bench_model(m, batches, cfg, static_recipe, Path(scratch), profiles)
    result = {
        "machine": machine_info(),
        "settings": {**cfg.model_dump(exclude={"batch_size"}), "batches": batches, "graph_optimization": "all"},
        "runs": runs,
        "ratios": ratios(runs),
        "gpu": gpu_record(),
        **({"profiles": profiles} if profile else {}),
    }
    write_json(out, result)
    return result


def bench_table(result: dict) -> str:
    lines = [f"{'model':24s} {'batch':>5s} {'fp32 ms':>9s} {'dynamic ms':>10s} {'static ms':>9s} "
             f"{'fp32/static':>11s} {'dyn/static':>10s}   (paired per round; ratio of p50s)"]
    for r in result["ratios"]:
        by = {x["variant"]: x["latency_ms_p50"] for x in result["runs"] if (x["model"], x["batch"]) == (r["model"], r["batch"])}
        lines.append(f"{r['model']:24s} {r['batch']:5d} {by['fp32']:9.2f} {by['dynamic']:10.2f} {by['static']:9.2f} "
                     f"{r['fp32_over_static']:11.2f} {r['dynamic_over_static']:10.2f}   "
                     f"({r['fp32_over_static_p50']:.2f}, {r['dynamic_over_static_p50']:.2f})")
    return "\n".join(lines)


def profiles_table(result: dict, top: int = 8) -> str:
    """Per model and batch: the slowest op types of FP32, dynamic and static (ORT's profiler)."""
    blocks = []
    for p in result.get("profiles", []):
        models = {k: v for k, v in p.items() if k in ("fp32", "dynamic", "static")}
        blocks.append(f"{p['model']}, batch {p['batch']}:\n" + benchmark.profile_table(models, top))
    return "\n".join(blocks)
