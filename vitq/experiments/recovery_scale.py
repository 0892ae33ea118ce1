"""`vitq recovery-scale`: how long the accuracy-recovery recipes take on a full-size ViT, stage by stage.

A workspace of its own (under `--scratch`): a timm model with seeded random weights saved as a local
checkpoint (`model.source: timm`, as a user's own checkpoint would be), scikit-learn's digits resized to the
model's input as the data (`--calibration` calibration images, `--validation` validation images, of which
`data.holdout_size` are held out for the searches), the pipeline's stages run in this process in order
(data, model, export, calibrate, reference, plan), then each recipe's quantize stage, each timed. Random
weights carry no class labels the digits share, so every recipe is judged by agreement with FP32 (and SQNR),
as the pipeline judges a model whose classes the data does not name.

Writes `reports/recovery_scale.json`: {"machine", "model", "images", "stages": {stage: seconds},
"recipes": [{recipe, seconds, start, budget_met, int8_mac_fraction, float_layers, ranked, held_out, validation}],
"recipes_total_s"}.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import yaml

from vitq.tasks._io import write_json
from vitq.tasks.stages import PREPARED
from vitq.errors import VitqError

log = logging.getLogger("vitq.experiments.recovery_scale")

DEFAULT_RECIPES = ("onnx-w8a8-auto", "onnx-w8a8-smoothquant", "onnx-w8a8-search")


def scale_params(model: str, checkpoint: Path, calibration: int, validation: int, recipes: list[str],
                 image_size: int) -> dict:
    """The workspace's params: the documented template with the model, the data sizes and the recipes set."""
    from vitq.init_workspace import template

    raw = yaml.safe_load(template("params.yaml"))
    raw["data"].update(source="digits", image_size=image_size, channels=3, validation_size=validation,
                       calibration_size=calibration)
    raw["model"].update(source="timm", name=model, checkpoint=str(checkpoint))
    raw["quantize"].update(recipes=list(recipes), carry={})
    return raw


def run_scale(model: str, calibration: int, validation: int, recipes: list[str], scratch: Path, out: Path) -> dict:
    """Prepare the workspace (timed per stage), then quantize each recipe (timed); writes `out`."""
    import timm
    import torch

    from vitq.tasks import stages
    from vitq.tasks.benchmark import machine_info
    from vitq.tasks.layout import Workspace
    from vitq.params import parse_params
    from vitq.experiments._models import resolve_model

    m = resolve_model(model, None)
    if m.timm_name is None or model == "demo":
        raise VitqError(f"--model {model!r}: give a timm name, e.g. vit_base_patch16_224")
    _, image_size, _ = m.input_size
    root = scratch / model
    root.mkdir(parents=True, exist_ok=True)
    checkpoint = root / "random_weights.pth"
    if not checkpoint.is_file():
        torch.manual_seed(0)
        torch.save(timm.create_model(model, pretrained=False).state_dict(), checkpoint)
    raw = scale_params(model, checkpoint, calibration, validation, recipes, image_size)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    p, ws = parse_params(raw), Workspace(root)
    result: dict = {"machine": {**machine_info(), "load_average_at_start": list(os.getloadavg())}, "model": model,
                    "weights": "random (torch seed 0), saved as a local checkpoint",
                    "images": {"calibration": calibration, "validation": validation, "holdout": p.data.holdout_size},
                    "stages": {}, "recipes": []}
    for name in PREPARED:
        t0 = time.perf_counter()
        log.info("recovery-scale: stage %s", name)
        stages.STAGES[name](ws, p)
        result["stages"][name] = round(time.perf_counter() - t0, 1)
        write_json(out, result)  # what is done survives a later failure or Ctrl-C
    for recipe in recipes:
        t0 = time.perf_counter()
        log.info("recovery-scale: quantize %s", recipe)
        stages.quantize_one(ws, recipe, p)
        seconds = round(time.perf_counter() - t0, 1)
        result["recipes"].append({"recipe": recipe, "seconds": seconds, **_decision(ws.variants_dir / recipe)})
        result["recipes_total_s"] = round(sum(r["seconds"] for r in result["recipes"]), 1)
        write_json(out, result)
        log.info("recovery-scale: %s took %.0fs", recipe, seconds)
    return result


def _decision(folder: Path) -> dict:
    from vitq.tasks._io import read_json

    rec = read_json(folder / "recovery.json") if (folder / "recovery.json").is_file() else {}
    variant = read_json(folder / "variant.json") if (folder / "variant.json").is_file() else {}
    return {
        "start": rec.get("start"), "budget_met": rec.get("budget_met"),
        "float_layers": rec.get("float_layers", []), "ranked": rec.get("ranking") is not None,
        "int8_mac_fraction": variant.get("int8_mac_fraction"),
        "held_out": rec.get("held_out"), "validation": rec.get("validation"),
    }


def check_recipes(recipes: list[str]) -> list[str]:
    from vitq.recipes import get_recipe

    if not recipes:
        raise VitqError("--recipes is empty; give at least one, e.g. onnx-w8a8-auto")
    for r in recipes:
        get_recipe(r)  # an unknown name: one line listing the valid ones
    return recipes


def scale_table(result: dict) -> str:
    lines = ["| stage or recipe | seconds |", "|---|---|"]
    lines += [f"| {name} | {s:.0f} |" for name, s in result["stages"].items()]
    for r in result["recipes"]:
        how = f" (start {r['start']}, budget {'met' if r['budget_met'] else 'not met'})" if r["start"] else ""
        lines.append(f"| quantize {r['recipe']}{how} | {r['seconds']:.0f} |")
    if result["recipes"]:
        lines.append(f"| the recipes together | {result['recipes_total_s']:.0f} |")
    return "\n".join(lines)
