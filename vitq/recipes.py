"""Named quantization recipes: typed configs per target, in one registry of named presets.

A recipe says *what* a variant is; the target's backend (`tasks/backends/`) says *how* it is produced.
Each target has its own config type, named for what it does, carrying only the fields that target
reads (torchao-style): `OnnxDynamicConfig`, `OnnxStaticConfig`, `TensorRTStaticConfig`, `CoreMLConfig`.
`RECIPES` holds the named presets; params.yaml and the CLI refer to them by name, and params.yaml's
`quantize.define` may add a recipe as a preset plus overrides (`derive_recipe`), registered when the
params are parsed (`register_defined`), so every vitq process that reads params.yaml sees it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
RECOVERY_METHODS = ("auto", "smoothquant", "search", "qat")  # see OnnxStaticConfig.recovery
LINEAR_OP_TYPES = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True, kw_only=True)
class RecipeConfig:
    """What every recipe has, whatever its target. A target outside vitq (a plugin) may use it as is."""

    name: str
    target: str  # where the artifact runs: a name in vitq.tasks.targets.registry.TARGETS
    # dynamic: activations quantized at run time; static: calibrated int8 activations and weights;
    # weight-only: int8 weights, float activations; float: no int8 (a target's FP16 baseline)
    scheme: Literal["dynamic", "static", "weight-only", "float"]
    description: str
    # Another recipe whose decision this one applies on its own target (the layers that variant left in
    # float, its recovered weights); the pipeline makes it after that one (quantize.carry). None: made
    # from the FP32 model alone.
    reuses: str | None = None
    # The accuracy-recovery method the recipe runs: a field on the configs that have one (ONNX static,
    # Core ML), None on the rest, so the pipeline can ask any recipe.
    recovery: ClassVar[str | None] = None
    # Keys a params.yaml `quantize.define` entry may override on a preset of this type.
    OVERRIDABLE: ClassVar[tuple[str, ...]] = ("description",)

    def table(self) -> tuple[str, float | None] | None:
        """(method, percentile override or None) of the calibration-stage table this recipe reads; None: none."""
        return None

    def check(self) -> None:
        """Raise ValueError naming the field when a value is out of range (called on derived recipes)."""
        if not isinstance(self.description, str) or not self.description:
            raise ValueError("description must be a non-empty string")


def _check_float_layers(patterns) -> None:
    if not isinstance(patterns, tuple) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"float_layers must be a list of glob patterns over module names (e.g. ['blocks.11.*']), "
                         f"got {list(patterns) if isinstance(patterns, tuple) else patterns!r}")


def _check_op_types(op_types) -> None:
    if not isinstance(op_types, tuple) or not op_types or any(t not in LINEAR_OP_TYPES for t in op_types):
        raise ValueError(f"op_types must be a non-empty list of {', '.join(LINEAR_OP_TYPES)}, got {op_types!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class OnnxDynamicConfig(RecipeConfig):
    """ONNX Runtime `quantize_dynamic`: int8 weights, activations quantized per batch at run time."""

    target: str = "onnx"
    scheme: Literal["dynamic"] = "dynamic"
    per_channel: bool = False  # per-output-channel weight scales
    op_types: tuple[str, ...] = LINEAR_OP_TYPES  # ONNX op types quantized
    # Glob patterns over the model's quantizable torch module names (`blocks.11.*`) kept in float.
    float_layers: tuple[str, ...] = ()
    OVERRIDABLE: ClassVar[tuple[str, ...]] = ("per_channel", "op_types", "float_layers", "description")

    def check(self) -> None:
        super().check()
        _check_bool("per_channel", self.per_channel)
        _check_op_types(self.op_types)
        _check_float_layers(self.float_layers)


@dataclass(frozen=True, kw_only=True)
class OnnxStaticConfig(RecipeConfig):
    """W8A8 static Q/DQ (ONNX Runtime `quantize_static`) from a calibration-stage table."""

    target: str = "onnx"
    scheme: Literal["static"] = "static"
    calibration: str | None  # calibration table the static scheme reads (one of CALIBRATION_METHODS); None: its own
    # Percentile of |x| for the `percentile` table; None: calibration.percentile of params.yaml. Another value
    # gets its own table (`percentile-<p>.json`), computed by the calibrate stage from the same histograms.
    percentile: float | None = None
    per_channel: bool = True  # per-output-channel weight scales (required by TensorRT explicit quantization)
    # ONNX op types whose inputs get Q/DQ. Linear algebra only: residual Add, LayerNorm, Softmax and
    # GELU stay in float, where ViT activation outliers live and where int8 buys little speed.
    op_types: tuple[str, ...] = LINEAR_OP_TYPES
    # Also quantize the two activation-activation MatMuls of attention (q @ k^T, attn @ v); the plain static
    # presets do (see _static_onnx), the recovery presets and TensorRT's do not.
    quantize_attention: bool = False
    # Accuracy recovery applied on the way to INT8 (tasks/recovery/): "auto" (sensitivity-driven
    # mixed precision under recovery.max_top1_drop / min_sqnr_db), "smoothquant", "search" (per-tensor calibration
    # method search), "qat" (quantization-aware fine-tune); None: plain post-training quantization.
    recovery: str | None = None
    # Glob patterns over the model's quantizable torch module names (`blocks.11.*`) kept in float.
    float_layers: tuple[str, ...] = ()
    OVERRIDABLE: ClassVar[tuple[str, ...]] = (
        "calibration", "percentile", "per_channel", "op_types", "quantize_attention", "float_layers", "description")

    def table(self) -> tuple[str, float | None] | None:
        return (self.calibration, self.percentile) if self.calibration else None

    def check(self) -> None:
        super().check()
        if self.calibration is not None and self.calibration not in CALIBRATION_METHODS:
            raise ValueError(f"calibration {self.calibration!r} is not a method; allowed: {', '.join(CALIBRATION_METHODS)}")
        if self.percentile is not None:
            if isinstance(self.percentile, bool) or not isinstance(self.percentile, float) or not 50 < self.percentile <= 100:
                raise ValueError(f"percentile must be a number in (50, 100], got {self.percentile!r}")
            if self.calibration != "percentile":
                raise ValueError(f"percentile applies to the 'percentile' calibration table; this recipe reads "
                                 f"{self.calibration!r} (set calibration: percentile)")
        _check_bool("per_channel", self.per_channel)
        _check_bool("quantize_attention", self.quantize_attention)
        _check_op_types(self.op_types)
        _check_float_layers(self.float_layers)
        if self.float_layers and self.recovery:
            raise ValueError(f"float_layers cannot be set on a recovery recipe ({self.recovery}): it decides its own "
                             "precision; derive from a plain static recipe instead")


QDQ_PLACEMENTS = ("weighted", "tensorrt")  # see TensorRTStaticConfig.qdq_placement


@dataclass(frozen=True, kw_only=True)
class TensorRTStaticConfig(OnnxStaticConfig):
    """A TensorRT engine (explicit quantization) built from the recipe's W8A8 Q/DQ graph."""

    target: str = "tensorrt"
    # Where Q/DQ goes. "weighted": the inputs of the `op_types` nodes only. "tensorrt": also the skip input of each
    # residual Add that follows a quantized weighted op, one Q/DQ pair that the LayerNorms reading the same tensor
    # read too: TensorRT's Q/DQ placement recommendation "quantize the residual input in skip connections" (its
    # GEMM + residual Add fusion then writes INT8; docs/targets.md). ModelOpt's ONNX PTQ quantizes as many residual Add
    # and LayerNorm inputs, but on ViTs the Add's branch input, not the skip. Symmetric int8 ranges from the same
    # calibration table (calibrate(..., residual=True)). A recipe of your own sets it (quantize.define:
    # `{preset: tensorrt-w8a8-percentile, qdq_placement: tensorrt}`): the calibrate stage then measures the skip
    # tensors too (Params.quantize.calibrates_residual), which no preset costs.
    qdq_placement: Literal["weighted", "tensorrt"] = "weighted"
    OVERRIDABLE: ClassVar[tuple[str, ...]] = (
        "calibration", "percentile", "op_types", "quantize_attention", "float_layers", "qdq_placement", "description")

    def check(self) -> None:
        super().check()
        if not self.per_channel:
            raise ValueError("TensorRT explicit quantization needs per-channel weight scales (per_channel: true)")
        if self.qdq_placement not in QDQ_PLACEMENTS:
            raise ValueError(f"qdq_placement must be one of {', '.join(QDQ_PLACEMENTS)}, got {self.qdq_placement!r}")


@dataclass(frozen=True, kw_only=True)
class CoreMLConfig(RecipeConfig):
    """A Core ML ML program converted from the torch model; int8 through PT2E (tasks/targets/coreml/backend.py)."""

    target: str = "coreml"
    scheme: Literal["float", "weight-only", "static"]
    # Static: the torchao observer of activation ranges, calibrated in torch on the calibration split.
    observer: Literal["minmax", "histogram"] | None = None
    # Glob patterns over the model's quantizable torch module names (`blocks.11.*`) kept in FP16.
    float_layers: tuple[str, ...] = ()
    # The recovery whose decision it carries (with `reuses`): "auto" also keeps that variant's float
    # attention matmuls in float.
    recovery: str | None = None
    OVERRIDABLE: ClassVar[tuple[str, ...]] = ("observer", "float_layers", "description")

    def check(self) -> None:
        super().check()
        if self.observer not in (None, "minmax", "histogram"):
            raise ValueError(f"observer must be minmax or histogram, got {self.observer!r}")
        if self.observer is not None and self.scheme != "static":
            raise ValueError(f"observer applies to static Core ML recipes (calibrated activations), not {self.scheme!r}")
        _check_float_layers(self.float_layers)
        if self.float_layers and self.scheme == "float":
            raise ValueError("float_layers applies to int8 Core ML recipes; this one is all float")


Recipe = RecipeConfig  # the type every recipe is (annotations)


def _static_onnx(method: str) -> OnnxStaticConfig:
    # Attention's products too (as ONNX Runtime's quantize_static and Core ML W8A8 do): in ONNX Runtime they run
    # on int8 kernels (tasks/targets/onnx/backend.py: fuse_attention), where a static variant gains most over dynamic
    # quantization; the attention probabilities keep their observed range (tasks/calibrate.py). The recovery
    # presets keep them float (quantize_attention: false), and auto can return them to float.
    return OnnxStaticConfig(
        name=f"onnx-w8a8-{method}",
        calibration=method,
        quantize_attention=True,
        description=(
            f"W8A8 static Q/DQ: symmetric int8 activations from the {method} calibration table (attention's "
            "q @ k^T and probs @ v included), symmetric per-channel int8 weights; valid for ONNX Runtime and "
            "TensorRT explicit quantization"
        ),
    )


RECIPES: dict[str, RecipeConfig] = {
    "onnx-w8-dynamic": OnnxDynamicConfig(
        name="onnx-w8-dynamic",
        description="ONNX Runtime quantize_dynamic: int8 weights, activations quantized per batch at run time",
    ),
    **{r.name: r for r in (_static_onnx(m) for m in CALIBRATION_METHODS)},
    "onnx-w8a8-auto": OnnxStaticConfig(
        name="onnx-w8a8-auto",
        calibration="percentile",
        recovery="auto",
        description=(
            "W8A8 static Q/DQ that recovers accuracy automatically: the cheap fixes first in full INT8 (its "
            "own table, range search, SmoothQuant, both), the best within the recovery budget; only if none "
            "meets it, the fewest layers back in float by per-layer sensitivity"
        ),
    ),
    "onnx-w8a8-smoothquant": OnnxStaticConfig(
        name="onnx-w8a8-smoothquant",
        calibration=None,  # min/max of the smoothed model, measured by the recipe itself
        recovery="smoothquant",
        description=(
            "W8A8 static Q/DQ after SmoothQuant on every LayerNorm -> qkv / fc1 pair (alpha searched "
            "on calibration data), min/max ranges of the smoothed model"
        ),
    ),
    "onnx-w8a8-search": OnnxStaticConfig(
        name="onnx-w8a8-search",
        calibration=None,  # its own table: per tensor, the best of minmax / percentiles / entropy / MSE
        recovery="search",
        description=(
            "W8A8 static Q/DQ with the calibration method chosen per tensor (minmax, percentiles, "
            "entropy, MSE) by the error of the layer output it feeds"
        ),
    ),
    "onnx-w8a8-qat": OnnxStaticConfig(
        name="onnx-w8a8-qat",
        calibration="percentile",  # starting ranges; the fine-tune learns its own
        recovery="qat",
        description=(
            "W8A8 static Q/DQ after a short quantization-aware fine-tune on the training split "
            "(fake quant, straight-through gradients, learned activation ranges)"
        ),
    ),
    "tensorrt-w8a8-percentile": TensorRTStaticConfig(
        name="tensorrt-w8a8-percentile",
        calibration="percentile",
        description=(
            "TensorRT engine (explicit quantization) built from a W8A8 Q/DQ graph as onnx-w8a8-percentile's, "
            "attention's products outside Q/DQ (TensorRT's FP16 attention); layers outside Q/DQ in FP16, "
            "LayerNorm in FP32; needs a cuda worker with TensorRT"
        ),
    ),
}

_COREML_NOTE = "converted on any OS (coremltools), predicted and timed on macOS workers"
RECIPES.update(
    {
        "coreml-fp16": CoreMLConfig(
            name="coreml-fp16", scheme="float",
            description=f"Core ML ML program (iOS17+), FP16 weights and compute: the Core ML baseline; {_COREML_NOTE}",
        ),
        "coreml-w8": CoreMLConfig(
            name="coreml-w8", scheme="weight-only",
            description=(
                "Core ML, int8 weights (symmetric, per output channel) of every linear/conv, FP16 activations; "
                + _COREML_NOTE
            ),
        ),
        "coreml-w8a8": CoreMLConfig(
            name="coreml-w8a8", scheme="static", observer="minmax",
            description=(
                "Core ML W8A8: int8 weights per channel and int8 inputs of every linear/conv and both attention "
                "matmuls (nn.MultiheadAttention rewritten), ranges calibrated in torch (PT2E) on the calibration "
                "split, exported through torch.export; " + _COREML_NOTE
            ),
        ),
    }
)


def _coreml_recovery(method: str, what: str) -> CoreMLConfig:
    return CoreMLConfig(
        name=f"coreml-w8a8-{method}", scheme="static", observer="minmax", recovery=method, reuses=f"onnx-w8a8-{method}",
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
CALIBRATED_OP_TYPES: tuple[str, ...] = tuple(sorted(LINEAR_OP_TYPES))


def register_recipe(recipe: RecipeConfig) -> RecipeConfig:
    """Add a recipe to the registry (params.yaml and the CLI refer to it by `recipe.name`); returns it."""
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> RecipeConfig:
    """Look a recipe up by name; a miss lists the valid names."""
    try:
        return RECIPES[name]
    except KeyError:
        from vitq.errors import ConfigError

        raise ConfigError(f"unknown recipe {name!r}; allowed: {', '.join(sorted(RECIPES))}") from None


def describe_recipe(recipe: RecipeConfig) -> str:
    """Two lines for `vitq recipes`: name, config type and typed fields; then the description."""
    skip = {"name", "target", "description"}
    shown = " ".join(f"{f.name}={getattr(recipe, f.name)!r}" for f in dataclasses.fields(recipe) if f.name not in skip)
    return f"{recipe.name:24s} {type(recipe).__name__}(target={recipe.target!r} {shown})\n{'':24s} {recipe.description}"


# -- recipes defined in params.yaml (quantize.define): a preset plus overrides ------------------------

_DEFINED: set[str] = set()  # names registered from params.yaml in this process (replaced on the next parse)


def presets() -> dict[str, RecipeConfig]:
    """The registry less the recipes params.yaml defined: what `quantize.define` may derive from."""
    return {n: r for n, r in RECIPES.items() if n not in _DEFINED}


def _coerce(key: str, value):
    """YAML values to the field's type: lists of patterns / op types -> tuples, integer percentiles -> float."""
    if key in ("float_layers", "op_types") and isinstance(value, list):
        return tuple(value)
    if key == "percentile" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def derive_recipe(name: str, spec) -> RecipeConfig:
    """The recipe `name` defined as `{preset: <name>, <field>: <value>, ...}`: the preset with those fields
    replaced. Raises ValueError (one line naming the key) on an unknown preset, a key the preset's target
    does not have, a bad value or a name clashing with a preset."""
    base = presets()
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise ValueError(f"{name!r} is not a usable recipe name: letters, digits, '_', '-' (a folder and "
                         "DVC stages are named after it)")
    if name in base:
        raise ValueError(f"{name}: clashes with the preset of that name; choose another name")
    if not isinstance(spec, dict) or "preset" not in spec:
        raise ValueError(f"{name}: needs 'preset: <recipe>' and the fields it overrides; "
                         f"e.g. {{preset: onnx-w8a8-percentile, percentile: 99.99}}")
    preset = spec["preset"]
    if not isinstance(preset, str) or preset not in base:
        raise ValueError(f"{name}.preset: unknown recipe {preset!r}; allowed: {', '.join(sorted(base))}")
    recipe = base[preset]
    allowed = type(recipe).OVERRIDABLE
    overrides = {k: v for k, v in spec.items() if k != "preset"}
    for key in overrides:
        if key not in allowed:
            raise ValueError(f"{name}.{key}: not a setting of {preset} ({type(recipe).__name__}, target "
                             f"{recipe.target}); allowed: {', '.join(allowed)}")
    overrides = {k: _coerce(k, v) for k, v in overrides.items()}
    shown = ", ".join(f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in overrides.items() if k != "description")
    overrides.setdefault("description", f"{preset} with {shown or 'no changes'}: {recipe.description}")
    derived = dataclasses.replace(recipe, name=name, **overrides)
    try:
        derived.check()
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return derived


def register_defined(recipes: dict[str, RecipeConfig]) -> None:
    """Make params.yaml's defined recipes the ones in the registry (those of an earlier parse are removed)."""
    for name in _DEFINED - set(recipes):
        RECIPES.pop(name, None)
    _DEFINED.clear()
    _DEFINED.update(recipes)
    RECIPES.update(recipes)
