"""Deployment targets: how a target produces, runs and times a variant, which worker pool its tasks
need, and whether its runtime is here.

A recipe names a target; a target names the worker kind (`cpu`, `macos`, `cuda`) that can
produce, validate and time its artifacts, and the Python modules it needs. Tasks for a target
whose runtime is absent are recorded as not run, with the reason, never run somewhere else.

Two layers: object-level methods on a model, its FP32 export and arrays (`produce`, `predict`,
`outputs`, `time_against_baseline`: what the Python API calls), and the stages' methods on a workspace
(`quantize`, `validate`, `benchmark`), thin adapters from workspace paths to the same pieces.
"""

from __future__ import annotations

import importlib.util
import sys
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # only for annotations: this module stays importable without the stages
    import numpy as np
    import torch

    from tasks.benchmark import BenchmarkResult
    from tasks.layout import Workspace
    from tasks.quantize import VariantArtifact
    from vitq.config import BenchmarkConfig, Params
    from vitq.recipes import Recipe

log = logging.getLogger("vitq.targets")

Worker = Literal["cpu", "macos", "cuda"]


@dataclass
class Reference:
    """The FP32 side of a variant: what it is produced from and measured against.

    The Python API gives all of it (`<recipe>.fp32/` of its workdir); the stages give the workspace's
    export only (`Reference(ws.export_dir)`): their model, data and tables are read from the workspace."""

    export_dir: Path  # the FP32 export: model.onnx (the reference graph) and model.prep.onnx (quantization-ready)
    model: torch.nn.Module | None = None  # the FP32 model; targets copy it, never change it
    calibration: np.ndarray | None = None  # (N, C, H, W) model inputs, preprocessed as the model expects
    derived_dir: Path | None = None  # where a target writes what it derives from them (tables, baselines)

    @property
    def onnx(self) -> Path:
        """The FP32 ONNX, exported from `model` (checked against it on calibration inputs) on first use."""
        path = self.export_dir / "model.onnx"
        if not path.is_file():
            if self.model is None or self.calibration is None:
                raise FileNotFoundError(f"{path} is missing; run the export stage")
            from tasks import export
            from vitq.config import ExportConfig

            export.export_model(self.model, self.calibration[: export.VERIFY_IMAGES], ExportConfig(), self.export_dir)
        return path

    def derived(self, what: str) -> Path:
        if self.derived_dir is None:
            raise ValueError(f"this reference has no folder for derived {what}")
        return self.derived_dir / what


@dataclass(frozen=True)
class Target:
    name: str
    worker: Worker  # the worker pool whose machines run this target's tasks
    modules: tuple[str, ...]  # Python modules the runtime needs
    platforms: tuple[str, ...] | None = None  # sys.platform values that can produce its artifacts; None: any
    run_platforms: tuple[str, ...] | None = None  # where its runtime predicts / times them; None: as platforms
    python_api: bool = False  # `vitq.quantize` may produce its variants from a model object (`produce`)
    from_torch: bool = False  # its variants are converted from the torch model (an ONNX-file source has none)

    def missing_runtime(self) -> str | None:
        """None when this machine can produce the target's artifacts, else the reason it cannot."""
        if self.platforms is not None and sys.platform not in self.platforms:
            return f"target {self.name!r} needs a {self.worker} worker ({'/'.join(self.platforms)}); this is {sys.platform}"
        for mod in self.modules:
            if importlib.util.find_spec(mod) is None:
                return f"target {self.name!r} needs the Python module {mod!r}, which is not installed here"
        return None

    def missing_executor(self) -> str | None:
        """None when this machine can also run (predict, time) the artifacts, else why not."""
        platforms = self.run_platforms or self.platforms
        if platforms is not None and sys.platform not in platforms:
            return f"target {self.name!r} runs its models on a {self.worker} worker ({'/'.join(platforms)}); this is {sys.platform}"
        return self.missing_runtime()

    # The object-level interface (the Python API). The defaults are the ONNX-graph path (onnx and
    # tensorrt: a Q/DQ graph from the FP32 ONNX and calibration tables, run by ONNX Runtime or TensorRT);
    # a target with another path (Core ML) overrides them.
    def produce(self, recipe: Recipe, ref: Reference, out_dir: Path) -> VariantArtifact:
        """Variant `out_dir/<recipe>/` of `ref.model` (FP32), calibrated on `ref.calibration`: the calibration
        table the recipe reads (into `ref.derived_dir/calibration/`), then the Q/DQ graph from the FP32 export."""
        from tasks import calibrate, quantize
        from vitq.config import CalibrationConfig

        prep = ref.onnx.with_name("model.prep.onnx")
        tables = ref.derived("calibration")
        if recipe.table():  # (method, percentile override)
            method, percentile = recipe.table()
            calibrate.calibrate_inputs(prep, ref.calibration, CalibrationConfig(methods=(method,)), tables,
                                       extra_percentiles=(percentile,) if percentile is not None else (),
                                       attention=bool(getattr(recipe, "quantize_attention", False)))
        return quantize.quantize_variant(recipe.name, prep, tables, out_dir)

    def runtime_label(self) -> str:
        """What produces a variant's outputs where this target's runtime runs (recorded with validations)."""
        return self.name

    def outputs(self, folder: Path, art: VariantArtifact, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, str, dict[str, str]]:
        """(outputs, what produced them, checks not run here and why) of the variant in `folder` on inputs `x`
        (N, C, H, W): its runtime's where it runs here, else a counterpart's (`counterpart_outputs`), else an error."""
        from vitq.errors import VitqError

        why = self.missing_executor()
        if why:
            counterpart = self.counterpart_outputs(folder, art, x, batch_size)
            if counterpart is None:
                raise VitqError(f"cannot predict with {art.name} here: {why}")
            out, runtime, source = counterpart
            log.warning("%s: %s runs on a %s worker only; judged by %s here", art.name, self.name, self.worker, source)
            return out, runtime, {f"{self.name}_predict": f"{why}; metrics are from {source}"}
        return self.predict(folder / art.artifact, x, batch_size), self.runtime_label(), {}

    def counterpart_outputs(self, folder: Path, art: VariantArtifact, x: np.ndarray, batch_size: int):
        """Where this machine cannot run the variant: (outputs of what stands in for it, its runtime label, what
        it is), or None when nothing does."""
        return None

    def time_against_baseline(self, paths: dict[str, Path], ref: Reference, x: np.ndarray,
                              cfg: BenchmarkConfig) -> BenchmarkResult:
        """Latency of the variants at `paths` and of this target's baseline, interleaved in one run on the batch
        `x` (N, C, H, W); where this machine cannot run them, each is under `not_measured` with why."""
        from tasks import benchmark

        why = self.missing_executor()
        if why:
            for name in paths:
                log.warning("%s: not timed: %s", name, why)
            return benchmark.BenchmarkResult(machine=benchmark.machine_info(), settings={**cfg.model_dump(),
                                             "input_shape": list(x.shape)}, models={}, not_measured=dict.fromkeys(paths, why))
        return self._time(paths, ref, x, cfg)

    def _time(self, paths: dict[str, Path], ref: Reference, x: np.ndarray, cfg: BenchmarkConfig) -> BenchmarkResult:
        from tasks import benchmark

        return benchmark.benchmark_onnx({"fp32": ref.onnx, **paths}, x, cfg)  # ONNX Runtime, beside the FP32 export

    # The stages' interface: workspace paths in, the same pieces as above.
    def quantize(self, ws: Workspace, name: str, p: Params | None = None):
        """Produce the variant of recipe `name` from the workspace's FP32 export and calibration tables."""
        from tasks import quantize
        from vitq.recipes import get_recipe

        inputs = None
        if get_recipe(name).recovery:
            from tasks.recovery.variants import Inputs
            from vitq.config import load_params

            inputs = Inputs(ws.model_dir, ws.data_dir, ws.export_dir, ws.calibration_dir, p or load_params(ws.params_file))
        return quantize.quantize_variant(name, ws.export_dir / "model.prep.onnx", ws.calibration_dir, ws.variants_dir, inputs)

    def validate(self, ws: Workspace, p: Params, name: str, out_dir: Path | None = None):
        """Load variant `name`, predict the validation split and compare with FP32; results into `out_dir`
        (default: the workspace's validation folder of the variant)."""
        from tasks import stages

        return stages.validate_onnx_graph(ws, p, name, out_dir)

    def benchmark(self, ws: Workspace, p: Params, paths: dict[str, Path]) -> tuple[dict, dict] | None:
        """Time the variants at `paths` against this target's own baseline: (timings, not_measured).
        None: timed by the benchmark stage beside FP32 (ONNX Runtime, or TensorRT for an engine)."""
        return None

    def reads(self, p: Params) -> dict:
        """Parameters this target's path reads for every variant, beyond the recipe (recorded in the plan)."""
        return {}

    def serve_graph(self, recipe, folder: Path, quantized, variants_dir: Path) -> str:
        """ONNX-graph targets: from the conformance-checked Q/DQ `folder/model.onnx` (`quantized`, loaded),
        write the file this target serves into `folder` and return its name."""
        return "model.onnx"

    def predict(self, path: Path, x, batch_size: int):
        """Logits (N, classes) of the served artifact at `path` on inputs `x` (N, C, H, W)."""
        from tasks.backends import onnx as onnx_backend

        return onnx_backend.run_batched(onnx_backend.session(path), x, batch_size)

    def artifacts(self, folder: Path, art) -> dict[str, list[Path]]:
        """What tracking logs of a variant (its folder, its VariantArtifact), by artifact folder: the served
        file and the portable Q/DQ graph under "model" (files or directories, those that exist)."""
        return {"model": [folder / f for f in sorted({art.artifact, "model.onnx"})]}


@dataclass(frozen=True)
class CoreMLTarget(Target):
    """Core ML programs: converted from the torch model (tasks/coreml.py), predicted on macOS; elsewhere
    judged by the torch program each was converted from, and timed nowhere."""

    compute_units: str = "ALL"  # Core ML compute units for the Python API's predictions (the stages: params.yaml's)

    def produce(self, recipe: Recipe, ref: Reference, out_dir: Path) -> VariantArtifact:
        import copy

        from tasks import coreml

        return coreml.quantize_model(recipe, copy.deepcopy(ref.model), ref.calibration, out_dir)

    def runtime_label(self) -> str:
        return f"coreml ({self.compute_units})"

    def predict(self, path: Path, x, batch_size: int):
        from tasks import coreml

        return coreml.predict_coreml(path, x, self.compute_units)

    def counterpart_outputs(self, folder: Path, art: VariantArtifact, x, batch_size: int):
        from tasks import coreml

        out = coreml.predict_counterpart(folder / coreml.PROGRAM, x, batch_size, fp16=art.recipe["scheme"] == "float")
        return out, "torch counterpart (model.pt2)", "the torch program it was converted from"

    def _time(self, paths: dict[str, Path], ref: Reference, x, cfg: BenchmarkConfig) -> BenchmarkResult:
        """Against `coreml-fp16`: the variant of that name when timed too, else converted here from `ref.model`
        (into `ref.derived_dir/baseline/`); batch 1, as the ML programs are built."""
        import copy

        from tasks import benchmark, coreml
        from vitq.recipes import get_recipe

        baseline = "coreml-fp16"
        if baseline not in paths and ref.model is not None:
            fp16 = coreml.quantize_model(get_recipe(baseline), copy.deepcopy(ref.model), ref.calibration[:2],
                                         ref.derived("baseline"))
            paths = {baseline: ref.derived("baseline") / baseline / fp16.artifact, **paths}
        timings, not_measured = coreml.benchmark_packages(paths, x[:1], cfg)
        return benchmark.BenchmarkResult(machine=benchmark.machine_info(), settings={**cfg.model_dump(),
                                         "input_shape": list(x[:1].shape)}, models=timings, not_measured=not_measured)

    # stages
    def quantize(self, ws: Workspace, name: str, p: Params | None = None):
        from tasks import coreml
        from vitq.recipes import get_recipe

        return coreml.quantize_variant(get_recipe(name), ws.model_dir, ws.data_dir, ws.variants_dir)

    def validate(self, ws: Workspace, p: Params, name: str, out_dir: Path | None = None):
        from tasks import coreml, quantize
        from tasks.validate import REFERENCE

        folder = quantize.variant_dir(ws.variants_dir, name)
        return coreml.validate_variant(
            name, folder, ws.model_dir, ws.data_dir, p.validate_, out_dir or ws.validation_for(name),
            p.benchmark.coreml_compute_units, reference_dir=ws.validation_for(REFERENCE),
        )

    def benchmark(self, ws: Workspace, p: Params, paths: dict[str, Path]) -> tuple[dict, dict] | None:
        from tasks import data, model

        spec = model.load_model_spec(ws.model_dir)
        x1 = data.model_inputs(data.load_split(ws.data_dir, "validation").images[:1], spec.mean, spec.std)
        timed = self.time_against_baseline(paths, Reference(ws.export_dir), x1, p.benchmark)
        return timed.models, timed.not_measured

    def reads(self, p: Params) -> dict:
        return {"seed": p.seed}  # converted from the torch model, calibrated in torch on the calibration split

    def artifacts(self, folder: Path, art) -> dict[str, list[Path]]:
        # Which layers are int8, read from the saved program.
        return {**super().artifacts(folder, art), "reports": [folder / "coverage.csv", folder / "coreml.json"]}


@dataclass(frozen=True)
class OnnxTarget(Target):
    """ONNX Runtime: static variants served in its fused form (tasks/backends/onnx.py)."""

    def runtime_label(self) -> str:
        return "onnxruntime"

    def serve_graph(self, recipe, folder: Path, quantized, variants_dir: Path) -> str:
        from tasks.backends import onnx as onnx_backend

        return onnx_backend.write_serving_form(recipe, folder, quantized)


@dataclass(frozen=True)
class TensorRTTarget(Target):
    """TensorRT (tasks/backends/tensorrt.py): an engine built from the Q/DQ ONNX (TensorRT 11: its FP16 graph) on a
    CUDA worker, predicted by TensorRT and timed against an FP16 engine of the FP32 graph built in the same run."""

    def serve_graph(self, recipe, folder: Path, quantized, variants_dir: Path) -> str:
        from tasks.backends import tensorrt as trt_backend

        return trt_backend.build_variant_engine(folder, variants_dir)

    def predict(self, path: Path, x, batch_size: int):
        from tasks.backends.tensorrt import EngineRunner

        return EngineRunner(path).predict(x, batch_size)

    def _time(self, paths: dict[str, Path], ref: Reference, x, cfg: BenchmarkConfig) -> BenchmarkResult:
        """Against an FP16 engine built from the FP32 export in the same run."""
        from tasks import benchmark
        from tasks.backends import tensorrt as trt_backend

        return benchmark.BenchmarkResult(machine=benchmark.machine_info(), settings={**cfg.model_dump(),
                                         "input_shape": list(x.shape)}, models=trt_backend.time_engines(paths, ref.onnx, x, cfg))

    def benchmark(self, ws: Workspace, p: Params, paths: dict[str, Path]) -> tuple[dict, dict] | None:
        from tasks import benchmark

        x = benchmark.benchmark_inputs(ws.model_dir, ws.data_dir, p.benchmark)
        timed = self.time_against_baseline(paths, Reference(ws.export_dir), x, p.benchmark)
        return timed.models, timed.not_measured

    def artifacts(self, folder: Path, art) -> dict[str, list[Path]]:
        # The engine, the Q/DQ graph and the FP16 graph it is built from; the build and conversion records.
        from tasks.backends import tensorrt as trt_backend

        return trt_backend.variant_artifacts(folder)


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add a target to the registry (recipes name it by `target.name`); returns it."""
    TARGETS[target.name] = target
    return target


register_target(OnnxTarget("onnx", "cpu", ("onnxruntime",), python_api=True))
# Core ML programs are converted and inspected anywhere; only macOS predicts and times them.
register_target(CoreMLTarget("coreml", "macos", ("coremltools",), run_platforms=("darwin",), python_api=True,
                              from_torch=True))
# Engines are built on a CUDA worker from the workspace's graphs (`vitq run`), not from a model object here.
register_target(TensorRTTarget("tensorrt", "cuda", ("tensorrt", "torch")))


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        from vitq.errors import ConfigError

        raise ConfigError(f"unknown target {name!r}; allowed: {', '.join(sorted(TARGETS))}") from None


def worker_tags(recipe_name: str) -> list[str]:
    """Tags that route a variant's tasks: the worker kind and target its recipe needs."""
    from vitq.recipes import get_recipe

    target = get_target(get_recipe(recipe_name).target)
    return [f"worker:{target.worker}", f"target:{target.name}"]
