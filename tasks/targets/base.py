"""The interface every deployment target implements: how it produces, runs and times a variant, which worker pool
its tasks need, and whether its runtime is here.

A recipe names a target; a target names the worker kind (`cpu`, `macos`, `cuda`) that can produce, validate and
time its artifacts, and the Python modules it needs. Tasks for a target whose runtime is absent are recorded as
not run, with the reason, never run somewhere else.

Two layers: object-level methods on a model, its FP32 export and arrays (`produce`, `predict`, `outputs`,
`time_against_baseline`: what the Python API calls), and the stages' methods on a workspace (`quantize`,
`validate`, `benchmark`), thin adapters from workspace paths to the same pieces.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vitq.errors import VitqError

if TYPE_CHECKING:  # only for annotations
    import numpy as np
    import torch

    from vitq.config import BenchmarkConfig, Params
    from vitq.recipes import Recipe
    from vitq.tasks.benchmark import BenchmarkResult
    from vitq.tasks.layout import Workspace
    from vitq.tasks.validate import ValidationResult
    from vitq.tasks.variant import VariantArtifact

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
            from vitq.config import ExportConfig
            from vitq.tasks import export  # torch: loaded on first use

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
    several_outputs: bool = False  # its runtime reads every output of a model with several (`predict_outputs`)

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

    # -- the object-level interface (the Python API) --------------------------------------------------------
    def produce(self, recipe: Recipe, ref: Reference, out_dir: Path) -> VariantArtifact:
        """Variant `out_dir/<recipe>/` of `ref.model` (FP32), calibrated on `ref.calibration`."""
        raise NotImplementedError(f"target {self.name!r} does not produce variants from a model object")

    def runtime_label(self) -> str:
        """What produces a variant's outputs where this target's runtime runs (recorded with validations)."""
        return self.name

    def predict(self, path: Path, x, batch_size: int):
        """Outputs of the served artifact at `path` on inputs `x` (N, C, H, W)."""
        raise NotImplementedError(f"target {self.name!r} has no predict")

    def predict_outputs(self, path: Path, x, batch_size: int):
        """A model with several outputs: batches of {name: array} of the served artifact at `path` on `x`."""
        raise VitqError(f"target {self.name!r} reads one output; a model with several outputs takes the onnx-* "
                        "(or coreml-*) recipes")

    def counterpart_batches(self, folder: Path, art: VariantArtifact, x, batch_size: int):
        """Where this machine cannot run a variant of a model with several outputs: batches of {name: array} of
        what stands in for it, or None when nothing does."""
        return None

    def outputs(self, folder: Path, art: VariantArtifact, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, str, dict[str, str]]:
        """(outputs, what produced them, checks not run here and why) of the variant in `folder` on inputs `x`
        (N, C, H, W): its runtime's where it runs here, else a counterpart's (`counterpart_outputs`), else an error."""
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
        from vitq.tasks import benchmark  # torch: loaded on first use

        why = self.missing_executor()
        if why:
            for name in paths:
                log.warning("%s: not timed: %s", name, why)
            return benchmark.BenchmarkResult(machine=benchmark.machine_info(), settings={**cfg.model_dump(),
                                             "input_shape": list(x.shape)}, models={}, not_measured=dict.fromkeys(paths, why))
        return self._time(paths, ref, x, cfg)

    def _time(self, paths: dict[str, Path], ref: Reference, x: np.ndarray, cfg: BenchmarkConfig) -> BenchmarkResult:
        raise NotImplementedError(f"target {self.name!r} has no timing")

    # -- the stages' interface: workspace paths in, the same pieces as above ---------------------------------
    def quantize(self, ws: Workspace, name: str, p: Params) -> VariantArtifact:
        """Produce the variant of recipe `name` from the workspace (its FP32 export, model, data, tables)."""
        raise NotImplementedError(f"target {self.name!r} has no quantize stage")

    def validate(self, ws: Workspace, p: Params, name: str, out_dir: Path | None = None) -> ValidationResult:
        """Load variant `name`, predict the validation split and compare with FP32; results into `out_dir`
        (default: the workspace's validation folder of the variant)."""
        raise NotImplementedError(f"target {self.name!r} has no validate stage")

    def benchmark(self, ws: Workspace, p: Params, paths: dict[str, Path]) -> tuple[dict, dict] | None:
        """Time the variants at `paths` against this target's own baseline: (timings, not_measured).
        None: timed by the benchmark stage beside FP32 (ONNX Runtime)."""
        return None

    def reads(self, p: Params) -> dict:
        """Parameters this target's path reads for every variant, beyond the recipe (recorded in the plan)."""
        return {}

    def artifacts(self, folder: Path, art) -> dict[str, list[Path]]:
        """What tracking logs of a variant (its folder, its VariantArtifact), by artifact folder: the served
        file and the portable Q/DQ graph under "model" (files or directories, those that exist)."""
        return {"model": [folder / f for f in sorted({art.artifact, "model.onnx"})]}
