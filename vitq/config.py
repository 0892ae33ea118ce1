"""The schema of params.yaml: typed, frozen config objects, strict (unknown keys and wrong types are errors naming
the key). A leaf: it imports no stage, source or target; `vitq.params` reads the file and checks what only the
registries know. Stage functions receive these objects and never read YAML or the environment themselves.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitq.recipes import CALIBRATION_METHODS, RecipeConfig, derive_recipe, get_recipe, presets


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataConfig(_Strict):
    # digits: scikit-learn's bundled handwritten digits; imagefolder: `path/<split>/<class>/<image>`.
    source: Literal["digits", "imagefolder"] = "digits"
    path: str | None = None  # imagefolder root with val/ and calibration/ or train/ (and train/ to fine-tune)
    image_size: int = Field(32, ge=8, le=1024)  # square side in pixels after resize (+ center crop)
    channels: Literal[1, 3] = 1  # 1: grayscale, 3: RGB
    validation_size: int = Field(450, ge=1)  # digits: held-out labelled images
    calibration_size: int = Field(200, ge=1)  # images in the calibration split
    # validation images held out for the recovery recipes' searches (at most a third; validate reports on the rest)
    holdout_size: int = Field(150, ge=0)

    @model_validator(mode="after")
    def _path_for_imagefolder(self) -> DataConfig:
        if self.source == "imagefolder" and not self.path:
            raise ValueError("data.path is required when data.source is 'imagefolder'")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)  # peak AdamW learning rate (one-cycle schedule)
    weight_decay: float = Field(0.05, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    max_shift_px: int = Field(0, ge=0)  # random translation augmentation, pixels
    threads: int = Field(2, ge=1)  # torch CPU threads; fixed so training is deterministic


class ModelConfig(_Strict):
    # Where the FP32 model comes from: one entry of tasks/sources.py's registry each.
    # train: build `name` (a timm name) with `arch` overrides and train it on the training split;
    # timm: `timm.create_model(name, **arch)`, then `checkpoint` loaded strictly (every key and shape must
    #   fit; tasks/model.py), or timm's hub weights with `pretrained` and no checkpoint;
    # torchvision: `torchvision.models.get_model(name, weights=None, **arch)` + `checkpoint` (required);
    # python: `factory` ('path/to/file.py:function', relative to the workspace, or 'package.module:function')
    #   called with `arch` as keyword arguments, + optional `checkpoint`;
    # onnx: the FP32 ONNX file `path` (ONNX Runtime and TensorRT recipes only: there is no torch model).
    # A key a source does not read is refused where written (vitq.tasks.sources.ModelSource.check_config, when
    # vitq.params reads params.yaml); this schema knows no source: the sources register themselves there.
    source: str = "train"  # train | timm | torchvision | python | onnx
    # timm / torchvision: the registry name; python / onnx: the model's name in reports (default: the
    # function's name / the file's stem). Default for train and timm: vitq's digits ViT (registered with timm).
    # Filled in by vitq.params from the source where params.yaml leaves it out.
    name: str | None = None
    pretrained: bool = False  # timm: hub weights (needs a network; offline, give checkpoint)
    checkpoint: str | None = None  # local state dict (torch.save, weights_only) or *.safetensors, loaded strictly
    factory: str | None = None  # python: 'path/to/file.py:function' or 'package.module:function'
    path: str | None = None  # onnx: an FP32 ONNX file
    num_classes: int | None = None  # None: the data's class count when training, the model's own otherwise
    # Input normalisation, one value per channel ((x / 255 - mean) / std); null: from the model's library
    # (timm's data config, torchvision's weights transforms). Required for python and onnx.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    arch: dict[str, Any] = Field(default_factory=dict)  # builder / factory kwargs, e.g. depth: 2
    train: TrainConfig = TrainConfig()

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _per_channel(cls, v):
        if v is None:
            return v
        if not isinstance(v, (list, tuple)) or not v or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise ValueError("must be a list of numbers, one per channel, e.g. [0.5] or [0.485, 0.456, 0.406]")
        return tuple(float(x) for x in v)

    @field_validator("arch")
    @classmethod
    def _json_values(cls, v):
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError("values must be numbers, strings, booleans, null, or lists / mappings of them") from None
        return v

    @model_validator(mode="after")
    def _per_channel_pairs(self) -> ModelConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("model.mean and model.std go together: set both or neither")
        if self.mean is not None:
            if len(self.mean) != len(self.std):
                raise ValueError(f"model.mean has {len(self.mean)} values but model.std {len(self.std)}: one per channel")
            if min(self.std) <= 0:
                raise ValueError(f"model.std {list(self.std)} must be > 0 for every channel")
        return self


class ExportConfig(_Strict):
    opset: int = Field(20, ge=17, le=23)  # >= 17: LayerNormalization is one op; >= 20: so is GELU
    max_abs_diff: float = Field(1e-3, gt=0)  # ONNX Runtime vs torch on validation images, logits


class CalibrationConfig(_Strict):
    methods: tuple[str, ...] = CALIBRATION_METHODS
    percentile: float = Field(99.999, gt=50, le=100)  # of |x|, for the percentile table
    num_bins: int = Field(2048, ge=128)  # histogram bins for percentile and entropy
    num_quantized_bins: int = Field(128, ge=16)  # entropy (KL) candidate thresholds
    # images a pass; null: as many as fit the memory budget (memory_budget_mb), at most 32 (calibration.json
    # records the batch used); a number: that many, refused in one line when a pass of them would not fit
    batch_size: int | None = Field(None, ge=1)

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v):
        v = tuple(v) if isinstance(v, list) else v
        for m in v:
            if m not in CALIBRATION_METHODS:
                raise ValueError(f"unknown calibration method {m!r}; allowed: {', '.join(CALIBRATION_METHODS)}")
        if not v:
            raise ValueError(f"at least one calibration method is needed; allowed: {', '.join(CALIBRATION_METHODS)}")
        return v


class QuantizeConfig(_Strict):
    # Recipes defined here as a preset plus overrides, name -> {preset: <recipe>, <field>: <value>, ...}, e.g.
    # `my-pct: {preset: onnx-w8a8-percentile, percentile: 99.99, float_layers: ["blocks.11.*"]}`; the fields a
    # preset's target has are its config type's (vitq.recipes). Registered when params are parsed.
    define: dict[str, dict[str, Any]] = {}
    # Variants made from the FP32 model, two DVC stages each (`quantize@<recipe>`, `validate@<recipe>`).
    recipes: tuple[str, ...] = (
        "onnx-w8-dynamic", "onnx-w8a8-minmax", "onnx-w8a8-percentile", "onnx-w8a8-entropy", "onnx-w8a8-auto",
        "onnx-w8a8-smoothquant", "onnx-w8a8-search", "tensorrt-w8a8-percentile", "coreml-fp16", "coreml-w8", "coreml-w8a8",
    )
    # Variants that apply another variant's recovery decision on their own target, recipe -> the recipe
    # it applies (its `reuses`); two DVC stages each (`carry-quantize@<recipe>`, `carry-validate@<recipe>`),
    # made after the one it applies.
    carry: dict[str, str] = {"coreml-w8a8-auto": "onnx-w8a8-auto", "coreml-w8a8-smoothquant": "onnx-w8a8-smoothquant"}

    @field_validator("define", mode="before")
    @classmethod
    def _define(cls, v):
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of recipe name -> {preset: <recipe>, <field>: <value>, ...}")
        for name, spec in v.items():
            derive_recipe(name, spec)  # ValueError naming the key
        return v

    @staticmethod
    def _known(info) -> dict[str, RecipeConfig]:
        """Presets and the recipes `define` adds (validated before `recipes` and `carry`, declared first)."""
        return {**presets(), **{n: derive_recipe(n, s) for n, s in info.data.get("define", {}).items()}}

    @field_validator("recipes", mode="before")
    @classmethod
    def _recipes(cls, v, info):
        v = tuple(v) if isinstance(v, list) else v
        known = cls._known(info)
        for r in v:
            if r not in known:
                raise ValueError(f"unknown recipe {r!r}; allowed: {', '.join(sorted(known))}")
            if known[r].reuses:
                raise ValueError(f"recipe {r!r} applies {known[r].reuses!r}'s decision: list it under quantize.carry "
                                 f"as '{r}: {known[r].reuses}', not under quantize.recipes")
        if len(set(v)) != len(v):
            raise ValueError("recipes are listed more than once")
        return v

    @field_validator("carry", mode="before")
    @classmethod
    def _carry(cls, v, info):
        if v is None:
            return {}
        known = cls._known(info)
        for r, source in (v.items() if isinstance(v, dict) else ()):
            allowed = ", ".join(sorted(n for n, x in known.items() if x.reuses))
            if r not in known or not known[r].reuses:
                raise ValueError(f"{r!r} is not a recipe that applies another's decision; allowed: {allowed}")
            if source != known[r].reuses:
                raise ValueError(f"{r!r} applies {known[r].reuses!r}'s decision, not {source!r}")
        return v

    @model_validator(mode="after")
    def _sources_listed(self) -> QuantizeConfig:
        for r, source in self.carry.items():
            if source not in self.recipes:
                raise ValueError(f"recipe {r!r} applies {source!r}'s decision; add {source!r} to quantize.recipes")
        return self

    @property
    def variants(self) -> tuple[str, ...]:
        """Every configured variant: those made from the FP32 model, then those that apply their decisions."""
        return (*self.recipes, *self.carry)

    def defined_recipes(self) -> dict[str, RecipeConfig]:
        """The recipes `define` adds, as typed configs."""
        return {n: derive_recipe(n, s) for n, s in self.define.items()}

    def recipe(self, name: str) -> RecipeConfig:
        """A recipe by name, as these params define it (a preset, or one `define` adds)."""
        return self.defined_recipes().get(name) or get_recipe(name)

    @property
    def extra_percentiles(self) -> tuple[float, ...]:
        """Percentile overrides of the defined recipes: the calibrate stage writes a table for each
        (`percentile-<p>.json`), from the same histograms. Every defined recipe, configured or not, so
        calibration depends on `quantize.define` alone (dvc.yaml), not on which recipes are listed."""
        tables = (r.table() for r in self.defined_recipes().values())
        return tuple(sorted({t[1] for t in tables if t and t[1] is not None}))

    @property
    def calibrates_residual(self) -> bool:
        """Whether the calibrate stage measures the skip inputs of residual Adds: when a defined recipe places Q/DQ
        there (`qdq_placement: tensorrt`; no preset does). Every defined recipe, configured or not, as above."""
        return any(getattr(r, "qdq_placement", "weighted") != "weighted" for r in self.defined_recipes().values())

    @property
    def calibrates_attention(self) -> bool:
        """Whether the calibrate stage measures the inputs of attention's activation-activation MatMuls (q, k^T,
        the softmax, v): when a preset or a defined recipe quantizes them (`quantize_attention`; the plain static
        presets do). Presets and every defined recipe, configured or not, as above: calibration depends on
        `quantize.define` alone (dvc.yaml), not on which recipes are listed."""
        recipes = (*presets().values(), *self.defined_recipes().values())
        return any(getattr(r, "quantize_attention", False) for r in recipes)


class OutputConfig(_Strict):
    """One named output of a model with several (task.outputs): judged by the task, or checked against FP32."""

    # true: judged by task.kind's metrics and the validate budget (and task.metric); the first judged output's
    # metrics are the variant's headline numbers. false: checked against FP32 only (SQNR, cosine).
    judged: bool = False
    metric: str | None = None  # a metric function of this output's own (file.py:function), called (ref, out, truth)
    min_metrics: dict[str, float] = {}  # floors on what `metric` returns, by name: below one the variant fails
    min_sqnr_db: float | None = None  # floor on this output's SQNR vs FP32, dB: below it the variant fails

    @field_validator("min_metrics", mode="before")
    @classmethod
    def _floors(cls, v):
        if v is None:
            return {}
        if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, (int, float))
                                               and not isinstance(x, bool) for k, x in v.items()):
            raise ValueError("must be a mapping of metric name -> number, e.g. {box_iou: 0.9}")
        return {k: float(x) for k, x in v.items()}

    @model_validator(mode="after")
    def _floors_need_metric(self) -> OutputConfig:
        if self.min_metrics and not self.metric:
            raise ValueError("min_metrics are floors on what `metric` returns: set metric: file.py:function too")
        return self


class TaskConfig(_Strict):
    """What the model's outputs are (tasks/task_kinds.py): the metrics and budget keys that apply."""

    kind: Literal["classification", "dense"] = "classification"  # dense: output maps (N, K, H, W)
    mask_threshold: float = 0.0  # dense: a pixel is in a mask where the output exceeds this (mask logits: 0)
    # dense: threshold: each output channel is one mask's logits (SAM-style); argmax: the channels are classes
    masks: Literal["threshold", "argmax"] = "threshold"
    metric: str | None = None  # a metric function of your own, file.py:function or package.module:function
    # A model with several outputs (SAM: masks, iou_predictions; a detector: boxes, scores), by the model's names
    # (a tuple: output_0, output_1, ...; a dict: its keys; an ONNX file: its graph outputs): which are judged by
    # the task and how; every output not judged is still checked against FP32 (SQNR, cosine). Empty: one output.
    outputs: dict[str, OutputConfig] = {}

    @model_validator(mode="after")
    def _dense_keys(self) -> TaskConfig:
        if self.kind == "classification":
            for key, default in (("mask_threshold", 0.0), ("masks", "threshold")):
                if getattr(self, key) != default:
                    raise ValueError(f"task.{key} applies to task.kind 'dense', not 'classification'")
        return self

    @model_validator(mode="after")
    def _one_judged(self) -> TaskConfig:
        if self.outputs and not any(o.judged for o in self.outputs.values()):
            raise ValueError(f"task.outputs names {', '.join(self.outputs)} but judges none: set judged: true on "
                             "the output(s) the task's metrics judge")
        return self

    @property
    def judged_outputs(self) -> tuple[str, ...]:
        """The outputs judged by the task, in task.outputs' order (the first: the headline numbers)."""
        return tuple(n for n, o in self.outputs.items() if o.judged)


# Budget keys per task (validate and recovery alike): the other task's keys are refused where written.
BUDGET_KEYS = {"classification": ("max_top1_drop",), "dense": ("min_mask_iou", "max_miou_drop")}


class ValidateConfig(_Strict):
    max_top1_drop: float = Field(1.0, ge=0)  # classification: percentage points of top-1 a variant may lose vs FP32
    min_sqnr_db: float | None = None  # optional floor on the outputs' SQNR
    min_mask_iou: float = Field(0.9, ge=0, le=1)  # dense: IoU of a variant's masks with FP32's
    max_miou_drop: float | None = Field(None, ge=0)  # dense: points of mIoU vs ground-truth masks (needs masks)
    batch_size: int = Field(64, ge=1)
    error_report_images: int = Field(32, ge=0)  # calibration images for the per-tensor error report; 0: off


class RecoveryConfig(_Strict):
    """Settings of the accuracy-recovery recipes (onnx-w8a8-auto/-smoothquant/-search/-qat)."""

    # The budget onnx-w8a8-auto steers to (validate.* is the verdict; keep this at least as strict).
    max_top1_drop: float = Field(1.0, ge=0)  # classification: points (disagreement with FP32 without labels)
    min_sqnr_db: float | None = None  # optional floor on the outputs' SQNR
    min_mask_iou: float = Field(0.9, ge=0, le=1)  # dense: IoU of the masks with FP32's
    max_miou_drop: float | None = Field(None, ge=0)  # dense: points of mIoU vs ground-truth masks
    sensitivity_images: int = Field(128, ge=1)  # validation images the per-layer sensitivity ranking measures on
    # onnx-w8a8-auto's per-layer sensitivity (4 simulated forwards per layer: the costly part at ViT-B scale) only
    # when a fallback to float needs the ranking, or always (recorded as sensitivity.csv either way it runs).
    rank_layers: Literal["when_needed", "always"] = "when_needed"
    # onnx-w8a8-auto's cheap fixes (plain, search, smoothquant, smoothquant+search, cheapest first): stop at the
    # first that meets the budget in full INT8 (first), or build every one and keep the best SQNR (best_sqnr)
    auto_choice: Literal["first", "best_sqnr"] = "first"
    search_images: int = Field(450, ge=1)  # validation images the mixed-precision search judges the budget on
    smoothquant_alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # candidates, each in (0, 1)
    search_percentiles: tuple[float, ...] = (99.9, 99.99, 99.999)  # of |x|, calibration-search candidates
    search_calibration_images: int = Field(64, ge=1)  # calibration images whose layer outputs judge each range
    qat_epochs: int = Field(2, ge=1)  # epochs over the training split
    qat_lr: float = Field(1e-4, gt=0)  # peak AdamW learning rate, cosine decay
    qat_batch_size: int = Field(64, ge=1)
    qat_init: Literal["smoothquant", "fp32"] = "smoothquant"  # fine-tune the SmoothQuant model (when it has pairs) or FP32

    @field_validator("smoothquant_alphas", "search_percentiles", mode="before")
    @classmethod
    def _floats(cls, v, info):
        v = tuple(float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v) if isinstance(v, list) else v
        if not v:
            raise ValueError("needs at least one value")
        lo, hi = (0.0, 1.0) if info.field_name == "smoothquant_alphas" else (50.0, 100.0)
        for x in v:
            if not isinstance(x, float) or not lo < x <= hi or (info.field_name == "smoothquant_alphas" and x >= 1.0):
                allowed = "in (0, 1)" if info.field_name == "smoothquant_alphas" else "in (50, 100]"
                raise ValueError(f"{x!r} is not a number {allowed}")
        return v


class BenchmarkConfig(_Strict):
    threads: int = Field(2, ge=1)  # ONNX Runtime intra-op threads, the same for every model
    batch_size: int = Field(1, ge=1)
    warmup: int = Field(10, ge=0)  # untimed runs per model
    repeats: int = Field(200, ge=1)  # timed runs per model, interleaved across models in rounds
    rounds: int = Field(20, ge=1)  # speedups: the median of per-round ratios (vitq.tasks.benchmark.paired_ratio)
    # Core ML (macOS workers): the compute units MLModel may use; recorded with every timing
    coreml_compute_units: Literal["ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY"] = "ALL"


class Params(_Strict):
    seed: int = 0
    experiment: str | None = None  # MLflow experiment; default: the model name
    # variants quantized / validated concurrently; null: from the machine's cores and memory (tasks/parallel.py)
    max_workers: int | None = Field(None, ge=1)
    # MB the per-batch working sets that grow with images x tensors may take in all (the per-tensor error report,
    # calibration's pass; shared by the max_workers validations); null: 2048, or half the memory available when
    # the stage starts if less (tasks/_memory.py). Only calibration's fitted pass (calibration.batch_size: null)
    # can move a range, by a histogram bin; the batch it used is in calibration.json.
    memory_budget_mb: int | None = Field(None, ge=64)
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    export: ExportConfig = ExportConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    benchmark: BenchmarkConfig = BenchmarkConfig()
    recovery: RecoveryConfig = RecoveryConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @model_validator(mode="after")
    def _budget_keys_for_task(self) -> Params:
        kind = self.task.kind
        for section, cfg in (("validate", self.validate_), ("recovery", self.recovery)):
            for other, keys in BUDGET_KEYS.items():
                for key in keys:
                    if other != kind and key in cfg.model_fields_set:
                        allowed = ", ".join(f"{section}.{k}" for k in (*BUDGET_KEYS[kind], "min_sqnr_db"))
                        raise ValueError(f"{section}.{key} is a budget of task.kind {other!r}, but task.kind is "
                                         f"{kind!r}; its budget keys: {allowed}")
        return self

    @model_validator(mode="after")
    def _tables_for_recipes(self) -> Params:
        for name in self.quantize.variants:
            table = self.quantize.recipe(name).table()
            method = table[0] if table else None
            if method and method not in self.calibration.methods:
                raise ValueError(
                    f"recipe {name!r} needs the {method!r} calibration table; add it to calibration.methods"
                )
        return self

    @model_validator(mode="after")
    def _model_fits(self) -> Params:
        if self.model.mean is not None and len(self.model.mean) != self.data.channels:
            raise ValueError(f"model.mean has {len(self.model.mean)} values but data.channels is {self.data.channels}: "
                             "one per channel")
        return self

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.model.name


def _format_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key {loc!r}; check its spelling against the documented keys"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = "" if isinstance(got, dict) or e["type"].startswith("value_error") else f" (got {got!r})"
    return f"{source}: {msg}{shown}" if not e["loc"] else f"{source}: {loc}: {msg}{shown}"


def params_hash(params: Params) -> str:
    """A short stable digest of the effective parameters (defaults filled in)."""
    blob = json.dumps(params.model_dump(mode="json", by_alias=True), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
