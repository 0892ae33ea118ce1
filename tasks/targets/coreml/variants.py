"""Core ML variants: `coreml-fp16`, `coreml-w8`, `coreml-w8a8` from the FP32 model and the calibration split.

Produced on any OS (conversion, compression and inspection need no Core ML runtime); each variant
folder holds
- `model.mlpackage`: the ML program (iOS17+, FP16 compute; int8 weights / activations per recipe)
- `model.pt2`: the torch program it was converted from (the PT2E graph with its quantize /
  dequantize ops), which the validate stage runs where Core ML cannot
- `coverage.csv`: per linear / matmul / conv op of the ML program, int8 weight? quantized input?
- `variant.json`: the record, as for every variant.
On macOS the validate and benchmark stages also run the ML program itself (`MLModel.predict`).
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from vitq.tasks._io import atomic_dir, size_mb, write_json
from vitq.tasks.attention import rewrite_attention
from vitq.tasks.targets.coreml import backend
from vitq.tasks.data import load_split, model_inputs
from vitq.tasks.model import load_model, named_outputs, output_names
from vitq.tasks.variant import VariantArtifact, load_variant, variant_dir
from vitq.tasks.tracing import TRACE_LOCK
from vitq.errors import VitqError
from vitq.recipes import CoreMLConfig

log = logging.getLogger("vitq.coreml")
logging.getLogger("coremltools").setLevel(logging.WARNING)  # one INFO line per graph pass otherwise

PACKAGE, PROGRAM, COVERAGE = "model.mlpackage", "model.pt2", "coverage.csv"


def build_variant(
    model: torch.nn.Module,
    recipe: CoreMLConfig,
    calibration: np.ndarray,
    out: Path,
    batch_size: int = 32,
    float_layers: frozenset[str] = frozenset(),
) -> dict:
    """Write `model.mlpackage`, `model.pt2` and `coverage.csv` for one recipe into `out`; return facts.

    Holds the tracing lock throughout: export, PT2E and conversion all capture graphs."""
    with TRACE_LOCK:
        return _build_variant(model, recipe, calibration, out, batch_size, float_layers)


def _build_variant(
    model: torch.nn.Module, recipe: CoreMLConfig, calibration: np.ndarray, out: Path, batch_size: int, float_layers: frozenset[str]
) -> dict:
    start = time.perf_counter()
    model = model.eval()
    attention = rewrite_attention(model)
    batches = [torch.from_numpy(np.ascontiguousarray(b)) for b in np.array_split(calibration, max(1, -(-len(calibration) // batch_size)))]
    report = None
    if recipe.scheme == "float":
        program_module: torch.nn.Module = model
    else:
        program_module, report = backend.quantize_pt2e(
            model, batches, activations=recipe.scheme == "static", observer=recipe.observer or "minmax",
            float_layers=float_layers,
        )
    example = batches[0][:1]
    names = output_names(program_module, batches[0].numpy())  # several: converted as several, by name
    torch.export.save(backend.export_program(program_module, batches[0][: min(2, len(batches[0]))], dynamic_batch=True), str(out / PROGRAM))
    program = backend.export_program(program_module, example)
    log.info("coreml: %s: converting to an ML program", recipe.name)
    backend.convert(program, output_names=names, save_to=out / PACKAGE)
    mil = backend.load_program(out / PACKAGE)
    rows = backend.coverage(mil, backend.program_layer_names(program))
    with open(out / COVERAGE, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()) if rows else ["layer"])
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    facts = {
        "size_mb": size_mb(out / PACKAGE),
        "int8_weight_fraction": backend.int8_weight_fraction(rows),
        "int8_mac_fraction": backend.int8_mac_fraction(rows),
        "op_counts": backend.op_counts(mil),
        "quantized_inputs": f"{sum(r.activation_quantized for r in rows)}/{len(rows)}",
        "attention": attention,
        "unhandled": report.unhandled if report else [],
        "float_layers": sorted(report.kept_float) if report else [],
        "seconds": round(time.perf_counter() - start, 1),
    }
    log.info(
        "coreml: %s -> %.2f MB, int8 weights %.0f%%, quantized inputs %s (%.0fs)",
        recipe.name, facts["size_mb"], 100 * facts["int8_weight_fraction"], facts["quantized_inputs"], facts["seconds"],
    )
    return facts


def quantize_variant(
    recipe: CoreMLConfig, model_dir: Path, data_dir: Path, variants_dir: Path, float_layers: frozenset[str] = frozenset()
) -> VariantArtifact:
    """The quantize stage for a Core ML recipe: calibration split in, variant folder out (atomically).

    A recipe that `reuses` another variant takes that variant's float layers (for `auto`, its float
    attention matmuls too) and, where its recipe changed the weights (SmoothQuant, QAT), those weights."""
    reused = None
    if recipe.reuses:
        from vitq.tasks import recovery

        source = variant_dir(variants_dir, recipe.reuses)
        if not (source / "variant.json").is_file():
            raise VitqError(f"{recipe.name} applies {recipe.reuses}'s decision, which has not been made: "
                            f"quantize {recipe.reuses} first (it must be in quantize.recipes)")
        # auto's search judged its float set with attention's matmuls in float: keep them so here too
        float_layers = frozenset(float_layers) | recovery.float_layers(source, include_attention=recipe.recovery == "auto")
        model_dir = recovery.recovered_model_dir(source) or model_dir
        reused = {"variant": recipe.reuses, "float_layers": sorted(float_layers), "weights": str(model_dir)}
    model, spec = load_model(model_dir)
    images = load_split(data_dir, "calibration").images
    return quantize_model(recipe, model, model_inputs(images, spec.mean, spec.std), variants_dir, float_layers, reused)


def quantize_model(
    recipe: CoreMLConfig, model: torch.nn.Module, calibration: np.ndarray, variants_dir: Path,
    float_layers: frozenset[str] = frozenset(), reused: dict | None = None,
) -> VariantArtifact:
    """Convert `model` with one recipe into `variants_dir/<recipe>/` (atomically), calibrated on model inputs
    `calibration` (N, C, H, W). `model` is changed in place (attention rewritten, eval mode): pass a copy
    to keep it. `reused`: what a `reuses` recipe took from its source, recorded in coreml.json. The Linear/Conv
    modules the recipe's `float_layers` globs name stay FP16 too (a pattern matching nothing: ConfigError)."""
    if recipe.float_layers:
        from vitq.tasks.recovery.layers import match_layers
        from vitq.tasks.recovery.simulate import QUANTIZABLE_MODULES

        names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE_MODULES)]
        float_layers = frozenset(float_layers) | frozenset(match_layers(recipe.float_layers, names))
    with atomic_dir(variant_dir(variants_dir, recipe.name)) as tmp:
        facts = build_variant(model, recipe, calibration, tmp, float_layers=float_layers)
        artifact = VariantArtifact(
            name=recipe.name,
            recipe=asdict(recipe),
            artifact=PACKAGE,
            qdq_artifact=PROGRAM,
            size_mb=facts["size_mb"],
            int8_weight_fraction=facts["int8_weight_fraction"],
            op_counts=facts["op_counts"],
            calibration_table=None,
            tensorrt_ready=False,
            tensorrt_note="a Core ML variant (TensorRT builds from the onnx-* / tensorrt-* Q/DQ graphs)",
            float_layers=[n for n in facts["float_layers"] if "#" not in n],
            float_attention=[n for n in facts["float_layers"] if "#" in n],
            int8_mac_fraction=facts["int8_mac_fraction"],
        )
        write_json(tmp / "variant.json", asdict(artifact))
        write_json(tmp / "coreml.json", {**{k: v for k, v in facts.items() if k != "op_counts"}, "reuses": reused})
    return artifact


def predict_counterpart(program_path: Path, x: np.ndarray, batch_size: int, fp16: bool) -> np.ndarray:
    """Logits of the torch program the ML program was converted from (a single-output model). `fp16`: compute
    in half precision as Core ML does (the float recipe; int8 graphs run their quantize ops in float32)."""
    batches = list(counterpart_batches(program_path, x, batch_size, fp16))
    return np.concatenate([next(iter(b.values())) for b in batches])


def counterpart_batches(program_path: Path, x: np.ndarray, batch_size: int, fp16: bool) -> Iterator[dict[str, np.ndarray]]:
    """Every output of the torch program the ML program was converted from, by name, a batch at a time."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines the quantized_decomposed ops it calls)

    with TRACE_LOCK:  # deserialising builds fake tensors, like tracing
        module = torch.export.load(str(program_path)).module()
    dtype = torch.float16 if fp16 else torch.float32
    module = module.to(dtype)
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).to(dtype)
            yield {k: v.float().numpy() for k, v in named_outputs(module(xb), "the torch program").items()}


def predict_coreml(package: Path, x: np.ndarray, compute_units: str) -> np.ndarray:
    """Logits from Core ML itself (macOS only)."""
    return backend.predict(backend.load_for_prediction(package, compute_units), x)


def coreml_batches(package: Path, x: np.ndarray, compute_units: str, names: tuple[str, ...],
                   batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every named output from Core ML itself (macOS only), a batch at a time."""
    return backend.predict_outputs(backend.load_for_prediction(package, compute_units), x, names, batch_size)


def validate_variant(
    name: str, folder: Path, model_dir: Path, data_dir: Path, cfg, out_dir: Path, why: str | None,
    compute_units: str = "ALL", reference_dir: Path | None = None,
):
    """Judge a Core ML variant: its torch counterpart everywhere, the ML program itself where Core ML runs
    (`why`: None there, else why it cannot run here). `reference_dir`: where the FP32 outputs are (default: out_dir)."""
    from vitq.tasks import validate
    from vitq.tasks.task_kinds import Budget

    reference_dir = reference_dir or out_dir
    task = validate.load_task(reference_dir)
    x, judge = validate.validation_judge(model_dir, data_dir, task)
    budget = Budget.of(cfg, "validate", task.kind)
    art = load_variant(folder.parent, name)
    names = validate.reference_names(reference_dir)
    fp16 = art.recipe["scheme"] == "float"
    if len(names) == 1:
        counterpart = predict_counterpart(folder / PROGRAM, x, cfg.batch_size, fp16=fp16)
    else:  # several outputs: read a batch at a time
        counterpart = counterpart_batches(folder / PROGRAM, x, cfg.batch_size, fp16=fp16)
    runtime, details, not_measured = "torch counterpart (model.pt2)", {}, {}
    if why:
        not_measured["coreml_predict"] = f"{why}; metrics are from the torch program it was converted from"
        outputs = counterpart
    else:
        details["torch_counterpart"] = asdict(validate.judge_variant(name, counterpart, judge, reference_dir, budget,
                                                                     len(x)).metrics)
        outputs = (predict_coreml(folder / PACKAGE, x, compute_units) if len(names) == 1
                   else coreml_batches(folder / PACKAGE, x, compute_units, names, cfg.batch_size))
        runtime = f"coreml ({compute_units})"
    result = validate.judge_variant(name, outputs, judge, reference_dir, budget, len(x), runtime=runtime,
                                    not_measured=not_measured, details=details)
    write_json(Path(out_dir) / f"{name}.json", asdict(result))
    log.info("validate: %s (%s) %s -> %s", name, runtime, validate.summary_line(result.metrics),
             "pass" if result.passed else "FAIL")
    return result


def benchmark_packages(packages: dict[str, Path], x1: np.ndarray, cfg, why: str | None) -> tuple[dict, dict[str, str]]:
    """Core ML latency of each package on one batch-1 input, interleaved, against `coreml-fp16` when
    present. Returns (timings, not_measured); where Core ML cannot run (`why`), every package is not measured,
    with why."""
    from vitq.tasks.benchmark import timing

    if why:
        return {}, {name: why for name in packages}
    units = cfg.coreml_compute_units
    models = {name: backend.load_for_prediction(path, units) for name, path in packages.items()}
    samples = backend.time_predictions(models, x1[:1], cfg.warmup, cfg.repeats, cfg.rounds)
    baseline = "coreml-fp16" if "coreml-fp16" in packages else next(iter(packages))
    timings = {
        name: timing(np.asarray(ms), packages[name], 1, baseline, f"coreml:{units}") for name, ms in samples.items()
    }
    return timings, {}
