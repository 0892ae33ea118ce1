"""The Python API: quantize a torch model object with a named recipe, in one call.

    variant = vitq.quantize(model, "onnx-w8a8-percentile", calibration=x)  # x: (N, C, H, W), preprocessed
    variant.validate(x_val, labels)     # against the FP32 model on the same inputs
    variant.benchmark()                 # FP32 ONNX and the variant, timed in one run
    variant.save("vit-int8")            # variant.json, model.onnx, the served form

What differs per target (how a variant is produced, run, stood in for, timed) is the target's own
(`tasks/targets/registry.py`: `produce`, `predict`, `outputs`, `time_against_baseline`); this module names no target.
The stages adapt workspace paths to the same pieces (export, calibrate, quantize, the Core ML conversion,
validate.compare_outputs, benchmark's timing).
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vitq.tasks._io import file_digest
from vitq.errors import ConfigError, DataError, ModelError, VitqError
from vitq.recipes import RECIPES, Recipe, get_recipe

if TYPE_CHECKING:
    import torch

    from vitq.tasks.benchmark import BenchmarkResult
    from vitq.tasks.targets.base import Reference
    from vitq.tasks.variant import VariantArtifact
    from vitq.tasks.validate import ValidationResult
    from vitq.config import TaskConfig, ValidateConfig

log = logging.getLogger("vitq.api")


def supported_recipes() -> list[str]:
    """Recipe names `quantize` accepts: post-training recipes of the targets that produce from a model object
    (`Target.python_api`: ONNX Runtime, Core ML). TensorRT builds its engine on a CUDA worker from the
    workspace's graphs (`vitq run`); recovery recipes read labelled splits and params.yaml."""
    from vitq.tasks.targets.registry import TARGETS

    return sorted(n for n, r in RECIPES.items()
                  if r.target in TARGETS and TARGETS[r.target].python_api and not r.recovery and not r.reuses)


def quantize(
    model: torch.nn.Module,
    recipe: str,
    calibration,
    example_input=None,
    *,
    workdir: str | Path | None = None,
) -> Variant:
    """Quantize `model` (FP32: one output tensor, or several as a tuple or a dict of tensors) with the named recipe.

    `calibration`: model inputs (N, C, H, W), preprocessed as the model expects: a tensor, an array, or an
    iterable of such batches (a DataLoader's `(images, labels)` items: the images are used).
    `example_input`: one batch the variant is benchmarked on by default (default: the first calibration
    image); its shape (C, H, W) must match the calibration's.
    `workdir`: where the variant is written (`<recipe>/`) beside what it was made from (`<recipe>.fp32/`: the
    FP32 export and the calibration table); default: a temporary folder removed with the Variant (`save` keeps
    it). Variants of several recipes (and models) share a workdir, each judged against its own export; the
    same recipe again replaces its folders.
    The model itself is not changed (a copy is exported and converted).
    """
    import torch

    from vitq.tasks.targets.base import Reference
    from vitq.tasks.targets.registry import get_target

    r = _api_recipe(recipe)
    target = get_target(r.target)
    why = target.missing_runtime()
    if why:
        raise VitqError(why)
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x = as_model_inputs(calibration, "calibration")
    example = x[:1] if example_input is None else as_model_inputs(example_input, "example_input")
    if example.shape[1:] != x.shape[1:]:
        raise DataError(f"example_input has shape (C, H, W) = {example.shape[1:]}, the calibration {x.shape[1:]}; "
                        "give both as the model's inputs")
    model = copy.deepcopy(model).eval()
    try:
        with torch.inference_mode():
            out = model(torch.from_numpy(x[:2]))
    except Exception as exc:  # the user's model on the user's inputs: say which, in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"the model cannot run on calibration inputs of shape {tuple(x[:2].shape)}: {first}") from None
    from vitq.tasks.model import named_outputs

    named_outputs(out, "the model")  # a tensor, a tuple or a dict of them: anything else is one line here

    scratch = None if workdir is not None else tempfile.TemporaryDirectory(prefix="vitq-")
    root = Path(workdir if workdir is not None else scratch.name)
    own = root / f"{r.name}.fp32"  # this variant's FP32 export, calibration table, baselines
    if own.exists():  # the same recipe again: nothing of the last model's may stand in for this one's
        shutil.rmtree(own)
    # The FP32 ONNX (the reference `validate` compares with, the baseline ONNX Runtime times) is exported
    # when first needed: at once by targets that quantize the graph, at `validate` by those that convert the model.
    ref = Reference(own / "export", model=model, calibration=x, derived_dir=own)
    artifact = target.produce(r, ref, root)
    return Variant(recipe=r, path=root / r.name, artifact=artifact, example_input=example, _ref=ref, _scratch=scratch)


@dataclass
class Variant:
    """One quantized variant of a model: its folder, its record, and what can be done with it here."""

    recipe: Recipe
    path: Path  # the variant folder: variant.json, model.onnx, the served form
    artifact: VariantArtifact  # size_mb, int8_weight_fraction, op_counts, float_layers, ...
    example_input: np.ndarray = field(repr=False)  # (N, C, H, W): the default benchmark batch
    _ref: Reference = field(repr=False)  # the FP32 copy of the model, its calibration inputs, its export
    _scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)  # removed with the Variant

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def fp32_onnx(self) -> Path:
        """The FP32 ONNX export the variant is compared with (and, in ONNX Runtime, timed against)."""
        return self._ref.onnx

    @property
    def _model(self) -> torch.nn.Module:
        return self._ref.model

    @property
    def _target(self):
        from vitq.tasks.targets.registry import get_target

        return get_target(self.recipe.target)

    def __repr__(self) -> str:
        a = self.artifact
        return (f"Variant({self.name!r}, {a.size_mb:.3f} MB, int8 weights {a.int8_weight_fraction:.0%}, "
                f"path={str(self.path)!r})")

    @property
    def served(self) -> Path:
        """The file (or .mlpackage) the target's runtime serves."""
        return self.path / self.artifact.artifact

    @property
    def output_names(self) -> tuple[str, ...]:
        """The model's outputs, in order, as the FP32 export names them: one is `logits`; a tuple's `output_0`,
        `output_1`, ...; a dict's keys."""
        from vitq.tasks.model import output_names

        return output_names(self._model, self._ref.calibration)  # one forward pass on 2 images, no export

    def predict(self, x, batch_size: int = 64) -> np.ndarray | dict[str, np.ndarray]:
        """Outputs of the variant, run by its target's runtime, on model inputs `x` (N, C, H, W): one array for a
        single-output model, `{name: array}` for a model with several (`output_names`)."""
        from vitq.tasks import validate

        x = as_model_inputs(x, "x")
        why = self._target.missing_executor()
        if why:
            raise VitqError(f"cannot predict with {self.name} here: {why}")
        names = self.output_names
        out = validate.variant_batches(self.served, x, batch_size, self._target.predict, names,
                                       self._target.predict_outputs)
        if isinstance(out, np.ndarray):
            return out
        batches = list(out)
        return {n: np.concatenate([b[n] for b in batches]) for n in names}

    def validate(self, inputs, labels=None, budget: ValidateConfig | None = None,
                 task: TaskConfig | dict | None = None) -> ValidationResult:
        """Compare the variant with the FP32 model (its ONNX export, in ONNX Runtime) on `inputs` (N, C, H, W):
        top-1 and its drop (with `labels`), agreement, cosine, SQNR, as the validate stage computes them;
        `passed` against `budget` (default: params.yaml's validate defaults). Off macOS a Core ML variant is
        judged by the torch program it was converted from, and the result says so (`runtime`, `not_measured`).
        `task`: params.yaml's task section (a TaskConfig or its mapping): the kind (`labels`: class labels, or
        ground-truth masks (N, H, W) for dense) and, for a model with several outputs, `outputs`: which are
        judged and how; every other output is checked against FP32 (`result.outputs`: per output)."""
        from vitq.tasks import validate
        from vitq.tasks.targets.onnx import backend as onnx_backend
        from vitq.config import ValidateConfig

        budget = budget or ValidateConfig()
        x = as_model_inputs(inputs, "inputs")
        if task is not None or len(self.output_names) > 1:
            return self._validate_task(x, labels, budget, task)
        if labels is not None:
            labels = _as_array(labels, "labels").astype(np.int64).reshape(-1)
            if len(labels) != len(x):
                raise DataError(f"labels has {len(labels)} entries for {len(x)} inputs; give one label per input")
        ref = onnx_backend.run_batched(onnx_backend.session(self.fp32_onnx), x, budget.batch_size)
        ref_top1 = validate.compare_outputs(ref, ref, labels, None).top1
        out, runtime, not_measured = self._target.outputs(self.path, self.artifact, x, budget.batch_size)
        metrics = validate.compare_outputs(ref, out, labels, ref_top1)
        reasons = validate.budget_reasons(metrics, budget.max_top1_drop, budget.min_sqnr_db)
        return validate.ValidationResult(
            name=self.name, images=len(x), metrics=metrics, passed=not reasons, reasons=reasons,
            runtime=runtime, not_measured=not_measured,
        )

    def _validate_task(self, x: np.ndarray, labels, budget: ValidateConfig, task) -> ValidationResult:
        """`validate` by a task: several outputs (task.outputs names the judged ones), or a task kind given."""
        from vitq.tasks import validate
        from vitq.config import TaskConfig

        if not isinstance(task, TaskConfig):
            task = _config(TaskConfig, "task", **(task or {})) if isinstance(task, dict) or task is None else None
            if task is None:
                raise ConfigError("task must be a TaskConfig or a mapping like params.yaml's task section")
        truth = None
        if labels is not None:
            truth = _as_array(labels, "labels")
            truth = truth.astype(np.int64).reshape(-1) if task.kind == "classification" else truth.astype(np.int64)
            if len(truth) != len(x):
                raise DataError(f"labels has {len(truth)} entries for {len(x)} inputs; give one per input")
        why = self._target.missing_executor()
        names = self.output_names
        runtime, not_measured = self._target.runtime_label(), {}
        if why:  # judged by what stands in for the variant here (Core ML off macOS: its torch program)
            if self._target.counterpart_batches(self.path, self.artifact, x[:1], 1) is None:
                raise VitqError(f"cannot predict with {self.name} here: {why}")
            counterpart = self._target.counterpart_batches
            runtime, source = "torch counterpart", "the torch program it was converted from"
            not_measured = {f"{self._target.name}_predict": f"{why}; metrics are from {source}"}
            outputs = lambda x, bs: counterpart(self.path, self.artifact, x, bs)  # noqa: E731
        else:
            outputs = lambda x, bs: validate.variant_batches(  # noqa: E731
                self.served, x, bs, self._target.predict, names, self._target.predict_outputs)
        return validate.validate_against(self.name, self.fp32_onnx, outputs, x, task, truth, budget,
                                         runtime=runtime, not_measured=not_measured)

    def benchmark(
        self, batch_size: int = 1, repeats: int = 200, *, warmup: int = 10, rounds: int = 20, threads: int = 2, inputs=None,
        alongside: Iterable[Variant] = (),
    ) -> BenchmarkResult:
        """Latency p50/p95 and throughput of the variant and its target's baseline, timed interleaved in one run,
        with this machine's description: ONNX variants against the FP32 export in ONNX Runtime (`models["fp32"]`);
        Core ML variants against `coreml-fp16` on macOS (elsewhere: `not_measured`, with why). `inputs`: the
        batch to time (default: `example_input`, repeated to `batch_size`). `alongside`: other variants of the
        same model and target, timed in the same run (their FP32 export must be this one's)."""
        from vitq.config import BenchmarkConfig

        cfg = _config(BenchmarkConfig, "benchmark", batch_size=batch_size, repeats=repeats, warmup=warmup,
                      rounds=rounds, threads=threads)
        x = self.example_input if inputs is None else as_model_inputs(inputs, "inputs")
        x = np.concatenate([x] * math.ceil(batch_size / len(x)))[:batch_size]
        paths = {self.name: self.served}
        for other in alongside:
            self._check_same_baseline(other)
            paths[other.name] = other.served
        return self._target.time_against_baseline(paths, self._ref, x, cfg)

    def _check_same_baseline(self, other: Variant) -> None:
        if not isinstance(other, Variant):
            raise VitqError(f"alongside takes Variants (from vitq.quantize), got {type(other).__name__}")
        if other._target is not self._target:
            raise VitqError(f"{other.name} runs on target {other.recipe.target!r}, {self.name} on "
                            f"{self.recipe.target!r}; time variants of one target together")
        if other.name == self.name or file_digest(other.fp32_onnx) != file_digest(self.fp32_onnx):
            raise VitqError(f"{other.name} is not another variant of {self.name}'s model (its FP32 export differs); "
                            "quantize the same model with another recipe to time it alongside")

    def save(self, folder: str | Path) -> Path:
        """Copy the variant folder (variant.json, model.onnx, the served form, its reports) to `folder`,
        which must not exist or be empty. Returns the folder."""
        from vitq.tasks._io import atomic_dir

        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise VitqError(f"{folder} exists and is not an empty folder; give a new path to save {self.name} to")
        with atomic_dir(folder) as tmp:
            shutil.copytree(self.path, tmp, dirs_exist_ok=True)
        return folder


def _api_recipe(name) -> Recipe:
    if not isinstance(name, str):
        raise ConfigError(f"recipe must be a recipe name (str), got {type(name).__name__}; "
                          f"allowed: {', '.join(supported_recipes())}")
    r = get_recipe(name)  # unknown: ConfigError listing every recipe
    if r.name not in supported_recipes():
        why = ("it needs labelled data and params.yaml (accuracy recovery)" if r.recovery or r.reuses
               else f"its target {r.target!r} builds on a {_worker(r.target)} worker from the workspace's graphs")
        raise ConfigError(f"recipe {name!r} runs through `vitq run` only ({why}); "
                          f"the Python API supports: {', '.join(supported_recipes())}")
    return r


def _worker(target: str) -> str:
    from vitq.tasks.targets.registry import get_target

    return get_target(target).worker


def _config(cls, what: str, **values):
    """A config object from keyword values; a bad value is one ConfigError line naming it."""
    from pydantic import ValidationError

    from vitq.config import _format_error

    try:
        return cls(**values)
    except ValidationError as err:
        raise ConfigError(_format_error(err, what)) from None


def _as_array(obj, what: str) -> np.ndarray:
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch.Tensor (torch not imported for the check)
        return obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return obj
    raise DataError(f"{what} must be a torch.Tensor or numpy array, got {type(obj).__name__}")


def as_model_inputs(obj, what: str = "inputs") -> np.ndarray:
    """Model inputs as float32 (N, C, H, W), from a tensor / array or an iterable of such batches (an item
    that is a tuple or list, as a DataLoader yields `(images, labels)`, gives its first element)."""
    if hasattr(obj, "detach") or isinstance(obj, np.ndarray):
        x = _as_array(obj, what)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, dict)):
        batches = [_as_array(b[0] if isinstance(b, (tuple, list)) else b, f"each batch of {what}") for b in obj]
        if not batches:
            raise DataError(f"{what} is empty; give at least one image (N, C, H, W)")
        shapes = {b.shape[1:] for b in batches}
        if len(shapes) > 1 or batches[0].ndim != 4:
            raise DataError(f"the batches of {what} must all be (N, C, H, W) with one (C, H, W); got "
                            f"{sorted({tuple(b.shape) for b in batches})[:3]}")
        x = np.concatenate(batches)
    else:
        raise DataError(f"{what} must be a tensor, an array or an iterable of batches, got {type(obj).__name__}")
    if x.ndim != 4:
        raise DataError(f"{what} must be model inputs (N, C, H, W), got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise DataError(f"{what} is empty; give at least one image (N, C, H, W)")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{what} must be float images preprocessed as the model expects (normalised), got {x.dtype}")
    if not np.isfinite(x).all():
        raise DataError(f"{what} holds NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)
