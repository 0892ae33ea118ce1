"""`vitq coreml-bench`: Core ML FP16 / W8 / W8A8 sizes and int8 coverage for a list of models -> reports/coreml.json.

Every number is read from the ML programs this command writes (package size on disk, the MIL
program's ops); nothing needs Core ML's runtime, so it runs on Linux. Models other than the demo
use random weights (no weights can be downloaded here): sizes and coverage do not depend on the
weight values, and calibration uses random images of the model's input size for the same reason.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tasks._io import write_json
from tasks.coreml import PACKAGE, build_variant
from vitq.errors import VitqError
from vitq.recipes import get_recipe

log = logging.getLogger("vitq.coreml_bench")

DEFAULT_MODELS = (
    "demo", "vit_base_patch16_224", "torchvision:vit_b_16", "deit_small_patch16_224", "mobilevitv2_050", "efficientvit_b0",
)
RECIPES = ("coreml-fp16", "coreml-w8", "coreml-w8a8")


def check_model_name(name: str) -> None:
    """Fail fast (before minutes of conversion) on a name `build_model` cannot build."""
    if name == "demo":
        return
    if name.startswith("torchvision:"):
        import torchvision

        tv = name.split(":", 1)[1]
        if tv not in torchvision.models.list_models():
            raise VitqError(f"unknown torchvision model {tv!r}; see torchvision.models.list_models()")
        return
    import timm

    if not timm.is_model(name):
        raise VitqError(f"unknown model {name!r}; allowed: 'demo', a timm name, or 'torchvision:<name>'")


def build_model(name: str, workspace: Path | None) -> tuple[torch.nn.Module, tuple[int, ...], str, np.ndarray | None]:
    """(model, input size C,H,W, where its weights came from, calibration images or None)."""
    if name == "demo":
        from tasks.layout import Workspace

        ws = Workspace(workspace) if workspace else None
        if ws and (ws.model_dir / "model.json").is_file():
            from tasks.data import load_split, model_inputs
            from tasks.model import load_model

            model, spec = load_model(ws.model_dir)
            calib = model_inputs(load_split(ws.data_dir, "calibration").images, spec.mean, spec.std)
            return model, tuple(spec.input_size), f"trained in this workspace ({ws.model_dir})", calib
        from tasks import zoo  # noqa: F401  (registers the demo ViT with timm)

        name = "vit_digits_patch4_32"
    if name.startswith("torchvision:"):
        import torchvision

        check_model_name(name)
        model = torchvision.models.get_model(name.split(":", 1)[1], weights=None)
        size = int(getattr(model, "image_size", 224))
        return model, (3, size, size), "random (torchvision, weights=None)", None
    import timm

    check_model_name(name)
    model = timm.create_model(name, pretrained=False)
    return model, tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))), "random (timm, pretrained=False)", None


def measure(name: str, workspace: Path | None, calibration_images: int = 8) -> dict:
    """Convert one model with every Core ML recipe and read sizes and coverage back."""
    model, size, weights, calib = build_model(name, workspace)
    if calib is None:
        calib = np.random.default_rng(0).standard_normal((calibration_images, *size)).astype(np.float32)
        calib_note = f"{calibration_images} random images (sizes and coverage do not depend on them)"
    else:
        calib_note = f"the workspace's calibration split ({len(calib)} images)"
    record: dict = {"model": name, "input_size": list(size), "weights": weights, "calibration": calib_note}
    with tempfile.TemporaryDirectory(prefix="vitq-coreml-") as tmp:
        facts = {}
        for recipe in RECIPES:
            out = Path(tmp) / recipe
            out.mkdir()
            log.info("coreml-bench: %s: %s", name, recipe)
            facts[recipe] = build_variant(copy.deepcopy(model), get_recipe(recipe), calib, out, batch_size=4)
            assert (out / PACKAGE).exists()
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

    from tasks.benchmark import machine_info

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
