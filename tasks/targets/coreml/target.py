"""The Core ML target: ML programs converted from the torch model (variants.py, through backend.py), predicted on
macOS; elsewhere judged by the torch program each was converted from, and timed nowhere."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vitq.tasks.targets.base import Reference, Target

if TYPE_CHECKING:  # only for annotations
    from vitq.config import BenchmarkConfig, Params
    from vitq.recipes import Recipe
    from vitq.tasks.benchmark import BenchmarkResult
    from vitq.tasks.layout import Workspace
    from vitq.tasks.variant import VariantArtifact


@dataclass(frozen=True)
class CoreMLTarget(Target):
    """Variants are produced by variants.py, imported on first use: it loads torch, which the registry (and
    `vitq run` when DVC says nothing changed) does without."""

    compute_units: str = "ALL"  # Core ML compute units for the Python API's predictions (the stages: params.yaml's)

    def produce(self, recipe: Recipe, ref: Reference, out_dir: Path) -> VariantArtifact:
        import copy

        from vitq.tasks.targets.coreml import variants

        return variants.quantize_model(recipe, copy.deepcopy(ref.model), ref.calibration, out_dir)

    def runtime_label(self) -> str:
        return f"coreml ({self.compute_units})"

    def predict(self, path: Path, x, batch_size: int):
        from vitq.tasks.targets.coreml import variants

        return variants.predict_coreml(path, x, self.compute_units)

    def predict_outputs(self, path: Path, x, batch_size: int):
        """Every output of a model with several, by name, a batch at a time, from Core ML (macOS)."""
        import coremltools as ct

        from vitq.tasks.targets.coreml import variants

        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
        names = tuple(o.name for o in spec.description.output)
        return variants.coreml_batches(path, x, self.compute_units, names, batch_size)

    def counterpart_batches(self, folder: Path, art: VariantArtifact, x, batch_size: int):
        """Every output of the torch program a variant was converted from, by name, a batch at a time (where Core
        ML cannot run: the Python API's judgement of a model with several outputs)."""
        from vitq.tasks.targets.coreml import variants

        return variants.counterpart_batches(folder / variants.PROGRAM, x, batch_size, fp16=art.recipe["scheme"] == "float")

    def counterpart_outputs(self, folder: Path, art: VariantArtifact, x, batch_size: int):
        from vitq.tasks.targets.coreml import variants

        out = variants.predict_counterpart(folder / variants.PROGRAM, x, batch_size, fp16=art.recipe["scheme"] == "float")
        return out, "torch counterpart (model.pt2)", "the torch program it was converted from"

    def _time(self, paths: dict[str, Path], ref: Reference, x, cfg: BenchmarkConfig) -> BenchmarkResult:
        """Against `coreml-fp16`: the variant of that name when timed too, else converted here from `ref.model`
        (into `ref.derived_dir/baseline/`); batch 1, as the ML programs are built."""
        import copy

        from vitq.recipes import get_recipe
        from vitq.tasks import benchmark
        from vitq.tasks.targets.coreml import variants

        baseline = "coreml-fp16"
        if baseline not in paths and ref.model is not None:
            fp16 = variants.quantize_model(get_recipe(baseline), copy.deepcopy(ref.model), ref.calibration[:2],
                                           ref.derived("baseline"))
            paths = {baseline: ref.derived("baseline") / baseline / fp16.artifact, **paths}
        timings, not_measured = variants.benchmark_packages(paths, x[:1], cfg, self.missing_executor())
        return benchmark.BenchmarkResult(machine=benchmark.machine_info(), settings={**cfg.model_dump(),
                                         "input_shape": list(x[:1].shape)}, models=timings, not_measured=not_measured)

    # stages
    def quantize(self, ws: Workspace, name: str, p: Params) -> VariantArtifact:
        from vitq.recipes import get_recipe
        from vitq.tasks.targets.coreml import variants

        return variants.quantize_variant(get_recipe(name), ws.model_dir, ws.data_dir, ws.variants_dir)

    def validate(self, ws: Workspace, p: Params, name: str, out_dir: Path | None = None):
        from vitq.tasks.targets.coreml import variants
        from vitq.tasks.validate import REFERENCE
        from vitq.tasks.variant import variant_dir

        return variants.validate_variant(
            name, variant_dir(ws.variants_dir, name), ws.model_dir, ws.data_dir, p.validate_,
            out_dir or ws.validation_for(name), self.missing_executor(), p.benchmark.coreml_compute_units,
            reference_dir=ws.validation_for(REFERENCE),
        )

    def benchmark(self, ws: Workspace, p: Params, paths: dict[str, Path]) -> tuple[dict, dict] | None:
        from vitq.tasks.data import load_split, model_inputs
        from vitq.tasks.model import load_model_spec

        spec = load_model_spec(ws.model_dir)
        x1 = model_inputs(load_split(ws.data_dir, "validation").images[:1], spec.mean, spec.std)
        timed = self.time_against_baseline(paths, Reference(ws.export_dir), x1, p.benchmark)
        return timed.models, timed.not_measured

    def reads(self, p: Params) -> dict:
        return {"seed": p.seed}  # converted from the torch model, calibrated in torch on the calibration split

    def artifacts(self, folder: Path, art) -> dict[str, list[Path]]:
        # Which layers are int8, read from the saved program.
        return {**super().artifacts(folder, art), "reports": [folder / "coverage.csv", folder / "coreml.json"]}


# Core ML programs are converted and inspected anywhere; only macOS predicts and times them.
COREML = CoreMLTarget("coreml", "macos", ("coremltools",), run_platforms=("darwin",), python_api=True,
                      from_torch=True, several_outputs=True)
