"""Deployment targets: which worker pool a target's tasks need and whether its runtime is here.

A recipe names a target; a target names the worker kind (`cpu`, `macos`, `cuda`) that can
produce, validate and time its artifacts, and the Python modules it needs. Tasks for a target
whose runtime is absent are recorded as not run, with the reason, never run somewhere else.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # only for annotations: this module stays importable without the stages
    from tasks.layout import Workspace
    from vitq.config import Params

Worker = Literal["cpu", "macos", "cuda"]


@dataclass(frozen=True)
class Target:
    name: str
    worker: Worker  # the worker pool whose machines run this target's tasks
    modules: tuple[str, ...]  # Python modules the runtime needs
    platforms: tuple[str, ...] | None = None  # sys.platform values that can produce its artifacts; None: any
    run_platforms: tuple[str, ...] | None = None  # where its runtime predicts / times them; None: as platforms

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

    # The interface the stages call. The defaults are the ONNX-graph path (onnx and tensorrt: a Q/DQ
    # graph from the FP32 ONNX and the calibration tables, run by ONNX Runtime or TensorRT); a target
    # with another path (Core ML) overrides them.
    def quantize(self, ws: Workspace, name: str, p: Params | None = None):
        """Produce the variant of recipe `name` from the workspace's FP32 model and calibration data."""
        from tasks import quantize
        from vitq.recipes import get_recipe

        inputs = None
        if get_recipe(name).recovery:
            from tasks.recovery.variants import Inputs
            from vitq.config import load_params

            inputs = Inputs(ws.model_dir, ws.data_dir, ws.export_dir, ws.calibration_dir, p or load_params(ws.params_file))
        return quantize.quantize_variant(name, ws.export_dir / "model.prep.onnx", ws.calibration_dir, ws.variants_dir, inputs)

    def validate(self, ws: Workspace, p: Params, name: str):
        """Load variant `name`, predict the validation split and compare with FP32."""
        from tasks import stages

        return stages.validate_onnx_graph(ws, p, name)

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
    """Core ML programs: converted from the torch model (tasks/coreml.py), predicted on macOS."""

    def quantize(self, ws: Workspace, name: str, p: Params | None = None):
        from tasks import coreml
        from vitq.recipes import get_recipe

        return coreml.quantize_variant(get_recipe(name), ws.model_dir, ws.data_dir, ws.variants_dir)

    def validate(self, ws: Workspace, p: Params, name: str):
        from tasks import coreml, quantize
        from tasks.validate import REFERENCE

        folder = quantize.variant_dir(ws.variants_dir, name)
        return coreml.validate_variant(
            name, folder, ws.model_dir, ws.data_dir, p.validate_, ws.validation_for(name),
            p.benchmark.coreml_compute_units, reference_dir=ws.validation_for(REFERENCE),
        )

    def benchmark(self, ws: Workspace, p: Params, paths: dict[str, Path]) -> tuple[dict, dict] | None:
        from tasks import coreml, data, model

        spec = model.load_model_spec(ws.model_dir)
        x1 = data.model_inputs(data.load_split(ws.data_dir, "validation").images[:1], spec.mean, spec.std)
        return coreml.benchmark_packages(paths, x1, p.benchmark)

    def reads(self, p: Params) -> dict:
        return {"seed": p.seed}  # converted from the torch model, calibrated in torch on the calibration split

    def artifacts(self, folder: Path, art) -> dict[str, list[Path]]:
        # Which layers are int8, read from the saved program.
        return {**super().artifacts(folder, art), "reports": [folder / "coverage.csv", folder / "coreml.json"]}


@dataclass(frozen=True)
class OnnxTarget(Target):
    """ONNX Runtime: static variants served in its fused form (tasks/backends/onnx.py)."""

    def serve_graph(self, recipe, folder: Path, quantized, variants_dir: Path) -> str:
        from tasks.backends import onnx as onnx_backend

        return onnx_backend.write_serving_form(recipe, folder, quantized)


@dataclass(frozen=True)
class TensorRTTarget(Target):
    """TensorRT (tasks/backends/tensorrt.py): an engine built from the Q/DQ ONNX on a CUDA worker,
    predicted by TensorRT and timed against an FP16 engine built from the FP32 graph in the same run."""

    def serve_graph(self, recipe, folder: Path, quantized, variants_dir: Path) -> str:
        from tasks.backends import tensorrt as trt_backend

        return trt_backend.build_variant_engine(folder, variants_dir)

    def predict(self, path: Path, x, batch_size: int):
        from tasks.backends.tensorrt import EngineRunner

        return EngineRunner(path).predict(x, batch_size)

    def benchmark(self, ws: Workspace, p: Params, paths: dict[str, Path]) -> tuple[dict, dict] | None:
        from tasks import benchmark
        from tasks.backends import tensorrt as trt_backend

        x = benchmark.benchmark_inputs(ws.model_dir, ws.data_dir, p.benchmark)
        return trt_backend.time_engines(paths, ws.export_dir / "model.onnx", x, p.benchmark), {}


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add a target to the registry (recipes name it by `target.name`); returns it."""
    TARGETS[target.name] = target
    return target


register_target(OnnxTarget("onnx", "cpu", ("onnxruntime",)))
# Core ML programs are converted and inspected anywhere; only macOS predicts and times them.
register_target(CoreMLTarget("coreml", "macos", ("coremltools",), run_platforms=("darwin",)))
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
