"""`vitq coreml-coverage` (alias `vitq coreml-bench`): Core ML FP16 / W8 / W8A8 sizes and int8 coverage
for a list of models -> reports/coreml.json.

Each model goes through the public API (`vitq.quantize` per Core ML recipe). Every number is read from
the ML programs it writes (package size on disk, the MIL program's ops, the variant's `coreml.json`);
nothing needs Core ML's runtime, so it runs on Linux. Models other than the demo
use random weights (no weights can be downloaded here): sizes and coverage do not depend on the
weight values, and calibration uses random images of the model's input size for the same reason.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vitq.tasks._io import read_json, write_json
from vitq.experiments._models import ExperimentModel, check_model_name, resolve_model

log = logging.getLogger("vitq.experiments.coreml_coverage")

DEFAULT_MODELS = (
    "demo", "vit_base_patch16_224", "torchvision:vit_b_16", "deit_small_patch16_224", "mobilevitv2_050", "efficientvit_b0",
)
RECIPES = ("coreml-fp16", "coreml-w8", "coreml-w8a8")


def check_names(names: list[str]) -> None:
    """Fail fast, before minutes of conversion, on the first name this command cannot build (one line, exit 2)."""
    for name in names:
        check_model_name(name, torchvision=True)


def _calibration_split(m: ExperimentModel, data_dir: Path) -> np.ndarray:
    """The trained demo's own calibration images, preprocessed as the model expects: (N, C, H, W) float32."""
    from vitq.tasks.data import load_split, model_inputs
    from vitq.tasks.model import load_model_spec

    spec = load_model_spec(m.model_dir)
    return model_inputs(load_split(data_dir, "calibration").images, spec.mean, spec.std)


def measure(name: str, workspace: Path | None, calibration_images: int = 8) -> dict:
    """Convert one model with every Core ML recipe and read sizes and coverage back."""
    from vitq.tasks.layout import Workspace

    ws = Workspace(workspace) if workspace else None
    m = resolve_model(name, ws, torchvision=True)
    model, size = m.build(), m.input_size
    if m.model_dir is not None:  # the trained demo
        calib = _calibration_split(m, ws.data_dir)
        calib_note = f"the workspace's calibration split ({len(calib)} images)"
    else:
        calib = np.random.default_rng(0).standard_normal((calibration_images, *size)).astype(np.float32)
        calib_note = f"{calibration_images} random images (sizes and coverage do not depend on them)"
    record: dict = {"model": name, "input_size": list(size), "weights": m.weights, "calibration": calib_note}
    import vitq

    with tempfile.TemporaryDirectory(prefix="vitq-coreml-") as tmp:
        facts = {}
        for recipe in RECIPES:
            log.info("coreml-bench: %s: %s", name, recipe)
            variant = vitq.quantize(model, recipe, calibration=calib, workdir=tmp)  # converts a copy of `model`
            # what the conversion recorded (coverage, attention, seconds) and what the variant's record holds
            facts[recipe] = {**read_json(variant.path / "coreml.json"), "size_mb": variant.artifact.size_mb,
                             "int8_weight_fraction": variant.artifact.int8_weight_fraction,
                             "op_counts": variant.artifact.op_counts}
    fp16, w8, w8a8 = (facts[r] for r in RECIPES)
    record.update(
        fp16_mb=round(fp16["size_mb"], 3),
        w8_mb=round(w8["size_mb"], 3),
        w8a8_mb=round(w8a8["size_mb"], 3),
        w8_reduction=round(1 - w8["size_mb"] / fp16["size_mb"], 4),
        w8a8_reduction=round(1 - w8a8["size_mb"] / fp16["size_mb"], 4),
        int8_weight_fraction=round(w8a8["int8_weight_fraction"], 4),
        quantized_inputs=w8a8["quantized_inputs"],
        ops={k: w8a8["op_counts"].get(k, 0) for k in ("linear", "matmul", "conv", "quantize", "dequantize",
                                                       "constexpr_affine_dequantize")},
        attention=w8a8["attention"],
        unhandled=w8a8["unhandled"],
        seconds={r: facts[r]["seconds"] for r in RECIPES},
    )
    return record


def run(models: list[str], out_file: Path, workspace: Path | None) -> list[dict]:
    import coremltools

    from vitq.tasks.benchmark import machine_info

    records = []
    start = time.perf_counter()
    for i, name in enumerate(models, 1):
        log.info("coreml-bench: [%d/%d] %s", i, len(models), name)
        records.append(measure(name, workspace))
        r = records[-1]
        log.info(
            "coreml-bench: %s FP16 %.1f MB -> W8 %.1f MB -> W8A8 %.1f MB (-%.1f%%), int8 weights %.1f%%, inputs %s",
            name, r["fp16_mb"], r["w8_mb"], r["w8a8_mb"], 100 * r["w8a8_reduction"], 100 * r["int8_weight_fraction"],
            r["quantized_inputs"],
        )
    write_json(out_file, records)
    meta = {
        "machine": machine_info(),
        "versions": {"coremltools": coremltools.__version__, "torch": torch.__version__},
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(out_file.with_suffix(".meta.json"), meta)
    return records


def table(records: list[dict]) -> str:
    head = f"{'model':28} {'FP16 MB':>9} {'W8 MB':>8} {'W8A8 MB':>8} {'W8A8 red.':>9} {'int8 w':>7} {'q. inputs':>10}"
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r['model']:28} {r['fp16_mb']:9.2f} {r['w8_mb']:8.2f} {r['w8a8_mb']:8.2f} {100 * r['w8a8_reduction']:8.1f}% "
            f"{100 * r['int8_weight_fraction']:6.1f}% {r['quantized_inputs']:>10}"
        )
    return "\n".join(lines)
