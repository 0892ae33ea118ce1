"""Named quantization recipes: one registry, referred to by name from params.yaml and the CLI.

A recipe says *what* a variant is (target, weight/activation precision, calibration method);
the backend in `tasks/backends/` says *how* it is produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
RECOVERY_METHODS = ("auto", "smoothquant", "search", "qat")  # see Recipe.recovery


@dataclass(frozen=True)
class Recipe:
    name: str
    target: Literal["onnx", "coreml", "tensorrt"]  # where the artifact runs
    # dynamic: activations quantized at run time; static: calibrated int8 activations and weights;
    # weight-only: int8 weights, float activations; float: no int8 (a target's FP16 baseline)
    scheme: Literal["dynamic", "static", "weight-only", "float"]
    calibration: str | None  # calibration table the static scheme reads (one of CALIBRATION_METHODS)
    per_channel: bool  # per-output-channel weight scales (required by TensorRT explicit quantization)
    description: str
    # ONNX op types whose inputs get Q/DQ. Linear algebra only: residual Add, LayerNorm, Softmax and
    # GELU stay in float, where ViT activation outliers live and where int8 buys little speed.
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    # Also quantize the two activation-activation MatMuls of attention (q @ k^T, attn @ v).
    quantize_attention: bool = False
    # Accuracy recovery applied on the way to INT8 (tasks/recovery/): "auto" (sensitivity-driven
    # mixed precision under recovery.max_top1_drop / min_sqnr_db), "smoothquant", "search" (per-tensor calibration
    # method search), "qat" (quantization-aware fine-tune); None: plain post-training quantization.
    recovery: str | None = None
    # Targets calibrated in torch (Core ML, through PT2E): the torchao observer of activation ranges.
    observer: Literal["minmax", "histogram"] | None = None
    # Another recipe whose recovery decision this one applies on its own target: the layers that
    # variant left in float, and its recovered weights (SmoothQuant, QAT). Quantized after it.
    reuses: str | None = None


def _static_onnx(method: str) -> Recipe:
    return Recipe(
        name=f"onnx-w8a8-{method}",
        target="onnx",
        scheme="static",
        calibration=method,
        per_channel=True,
        description=(
            f"W8A8 static Q/DQ: symmetric int8 activations from the {method} calibration table, "
            "symmetric per-channel int8 weights; valid for ONNX Runtime and TensorRT explicit quantization"
        ),
    )


RECIPES: dict[str, Recipe] = {
    "onnx-w8-dynamic": Recipe(
        name="onnx-w8-dynamic",
        target="onnx",
        scheme="dynamic",
        calibration=None,
        per_channel=False,
        description="ONNX Runtime quantize_dynamic: int8 weights, activations quantized per batch at run time",
    ),
    **{r.name: r for r in (_static_onnx(m) for m in CALIBRATION_METHODS)},
    "onnx-w8a8-auto": Recipe(
        name="onnx-w8a8-auto",
        target="onnx",
        scheme="static",
        calibration="percentile",
        per_channel=True,
        recovery="auto",
        description=(
            "W8A8 static Q/DQ with automatic mixed precision: per-layer sensitivity, then the fewest "
            "layers back in float until recovery.max_top1_drop / min_sqnr_db hold"
        ),
    ),
    "onnx-w8a8-smoothquant": Recipe(
        name="onnx-w8a8-smoothquant",
        target="onnx",
        scheme="static",
        calibration=None,  # min/max of the smoothed model, measured by the recipe itself
        per_channel=True,
        recovery="smoothquant",
        description=(
            "W8A8 static Q/DQ after SmoothQuant on every LayerNorm -> qkv / fc1 pair (alpha searched "
            "on calibration data), min/max ranges of the smoothed model"
        ),
    ),
    "onnx-w8a8-search": Recipe(
        name="onnx-w8a8-search",
        target="onnx",
        scheme="static",
        calibration=None,  # its own table: per tensor, the best of minmax / percentiles / entropy / MSE
        per_channel=True,
        recovery="search",
        description=(
            "W8A8 static Q/DQ with the calibration method chosen per tensor (minmax, percentiles, "
            "entropy, MSE) by the error of the layer output it feeds"
        ),
    ),
    "onnx-w8a8-qat": Recipe(
        name="onnx-w8a8-qat",
        target="onnx",
        scheme="static",
        calibration="percentile",  # starting ranges; the fine-tune learns its own
        per_channel=True,
        recovery="qat",
        description=(
            "W8A8 static Q/DQ after a short quantization-aware fine-tune on the training split "
            "(fake quant, straight-through gradients, learned activation ranges)"
        ),
    ),
    "tensorrt-w8a8-percentile": Recipe(
        name="tensorrt-w8a8-percentile",
        target="tensorrt",
        scheme="static",
        calibration="percentile",
        per_channel=True,
        description=(
            "TensorRT engine (explicit quantization) built from the onnx-w8a8-percentile Q/DQ graph; "
            "layers outside Q/DQ in FP16, LayerNorm in FP32; needs a cuda worker with TensorRT"
        ),
    ),
}

_COREML_NOTE = "converted on any OS (coremltools), predicted and timed on macOS workers"
RECIPES.update(
    {
        "coreml-fp16": Recipe(
            name="coreml-fp16", target="coreml", scheme="float", calibration=None, per_channel=False,
            description=f"Core ML ML program (iOS17+), FP16 weights and compute: the Core ML baseline; {_COREML_NOTE}",
        ),
        "coreml-w8": Recipe(
            name="coreml-w8", target="coreml", scheme="weight-only", calibration=None, per_channel=True,
            description=(
                "Core ML, int8 weights (symmetric, per output channel) of every linear/conv, FP16 activations; "
                + _COREML_NOTE
            ),
        ),
        "coreml-w8a8": Recipe(
            name="coreml-w8a8", target="coreml", scheme="static", calibration=None, per_channel=True,
            observer="minmax",
            description=(
                "Core ML W8A8: int8 weights per channel and int8 inputs of every linear/conv and both attention "
                "matmuls (nn.MultiheadAttention rewritten), ranges calibrated in torch (PT2E) on the calibration "
                "split, exported through torch.export; " + _COREML_NOTE
            ),
        ),
    }
)


def _coreml_recovery(method: str, what: str) -> Recipe:
    return Recipe(
        name=f"coreml-w8a8-{method}", target="coreml", scheme="static", calibration=None, per_channel=True,
        observer="minmax", recovery=method, reuses=f"onnx-w8a8-{method}",
        description=f"Core ML W8A8 carrying onnx-w8a8-{method}'s decision: {what}; " + _COREML_NOTE,
    )


RECIPES.update(
    {
        r.name: r
        for r in (
            _coreml_recovery("auto", "the layers its sensitivity-driven search left in float stay FP16 here"),
            _coreml_recovery("smoothquant", "its smoothed weights, converted and calibrated for Core ML"),
            _coreml_recovery("qat", "its fine-tuned weights, converted and calibrated for Core ML"),
        )
    }
)


# Tensors the calibration stage measures: inputs/outputs of every op type any recipe quantizes,
# so one calibration pass serves every recipe.
CALIBRATED_OP_TYPES: tuple[str, ...] = tuple(sorted({t for r in RECIPES.values() for t in r.op_types}))


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a recipe to the registry (params.yaml and the CLI refer to it by `recipe.name`); returns it."""
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """Look a recipe up by name; a miss lists the valid names."""
    try:
        return RECIPES[name]
    except KeyError:
        from vitq.errors import ConfigError

        raise ConfigError(f"unknown recipe {name!r}; allowed: {', '.join(sorted(RECIPES))}") from None

