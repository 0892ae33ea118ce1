"""The ONNX-graph path (`OnnxGraphTarget`: a Q/DQ graph from the FP32 export and calibration tables, shared with
TensorRT) and the ONNX Runtime target (`OnnxTarget`: static variants served in its fused form, backend.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vitq.tasks import parallel
from vitq.tasks.targets.base import Reference, Target
from vitq.tasks.targets.onnx import backend as onnx_backend

if TYPE_CHECKING:  # only for annotations
    import numpy as np
    import onnx

    from vitq.config import BenchmarkConfig, Params
    from vitq.recipes import Recipe
    from vitq.tasks.benchmark import BenchmarkResult
    from vitq.tasks.layout import Workspace
    from vitq.tasks.validate import ValidationResult
    from vitq.tasks.variant import VariantArtifact


@dataclass(frozen=True)
class OnnxGraphTarget(Target):
    """Variants as Q/DQ ONNX graphs (vitq.tasks.quantize), served by `serve_graph`, run by `predict`."""

    def produce(self, recipe: Recipe, ref: Reference, out_dir: Path) -> VariantArtifact:
        """Variant `out_dir/<recipe>/` of `ref.model` (FP32), calibrated on `ref.calibration`: the calibration
        table the recipe reads (into `ref.derived_dir/calibration/`), then the Q/DQ graph from the FP32 export."""
        from vitq.config import CalibrationConfig
        from vitq.tasks import calibrate, quantize  # torch: loaded on first use

        prep = ref.onnx.with_name("model.prep.onnx")
        tables = ref.derived("calibration")
        if recipe.table():  # (method, percentile override)
            method, percentile = recipe.table()
            calibrate.calibrate_inputs(prep, ref.calibration, CalibrationConfig(methods=(method,)), tables,
                                       extra_percentiles=(percentile,) if percentile is not None else (),
                                       attention=bool(getattr(recipe, "quantize_attention", False)),
                                       residual=getattr(recipe, "qdq_placement", "weighted") != "weighted")
        return quantize.quantize_variant(recipe.name, prep, tables, out_dir, self.serve_graph)

    def serve_graph(self, recipe: Recipe, folder: Path, quantized: onnx.ModelProto, variants_dir: Path) -> str:
        """From the conformance-checked Q/DQ `folder/model.onnx` (`quantized`, loaded), write the file this
        target serves into `folder` and return its name."""
        return "model.onnx"

    def predict(self, path: Path, x, batch_size: int):
        """Outputs of the served graph at `path` on inputs `x` (N, C, H, W), by ONNX Runtime."""
        return onnx_backend.run_batched(onnx_backend.session(path), x, batch_size)

    def predict_outputs(self, path: Path, x, batch_size: int):
        """Batches of every output, by name, of the served graph at `path` (ONNX Runtime)."""
        return onnx_backend.run_outputs(onnx_backend.session(path), x, batch_size)

    def _time(self, paths: dict[str, Path], ref: Reference, x: np.ndarray, cfg: BenchmarkConfig) -> BenchmarkResult:
        from vitq.tasks import benchmark

        return benchmark.benchmark_onnx({"fp32": ref.onnx, **paths}, x, cfg)  # ONNX Runtime, beside the FP32 export

    # stages
    def quantize(self, ws: Workspace, name: str, p: Params) -> VariantArtifact:
        """The variant of recipe `name` from the workspace's FP32 export and calibration tables (recovery recipes
        also read its model, data and params)."""
        from vitq.recipes import get_recipe
        from vitq.tasks import quantize
        from vitq.tasks.recovery.variants import Inputs

        inputs = Inputs(ws.model_dir, ws.data_dir, ws.export_dir, ws.calibration_dir, p, ws.search_dir,
                        ws.smoothquant_dir) if get_recipe(name).recovery else None
        return quantize.quantize_variant(name, ws.export_dir / "model.prep.onnx", ws.calibration_dir, ws.variants_dir,
                                         self.serve_graph, inputs)

    def validate(self, ws: Workspace, p: Params, name: str, out_dir: Path | None = None) -> ValidationResult:
        """Validation of a variant produced from the ONNX graph, with its per-tensor error report, into `out_dir`
        (default: the variant's validation folder)."""
        from vitq.tasks import data, error_report, model, validate
        from vitq.tasks._memory import budget_bytes
        from vitq.tasks.variant import load_variant, variant_dir

        art = load_variant(ws.variants_dir, name)
        folder = variant_dir(ws.variants_dir, name)
        out_dir = out_dir or ws.validation_for(name)
        result = validate.validate_variant(name, folder / art.artifact, ws.model_dir, ws.data_dir, p.validate_, out_dir,
                                           self.predict, reference_dir=ws.validation_for(validate.REFERENCE),
                                           predict_outputs=self.predict_outputs)
        if art.recipe["scheme"] == "static" and p.validate_.error_report_images:
            spec = model.load_model_spec(ws.model_dir)
            images = data.load_split(ws.data_dir, "calibration").images[: p.validate_.error_report_images]
            own_float = folder / "float.prep.onnx"  # smoothquant/qat weights
            float_ref = own_float if own_float.is_file() else ws.export_dir / "model.prep.onnx"
            # On the Q/DQ graph, not the served file: a fused form (model.ort.onnx) or an engine has no Q/DQ pairs left.
            rows = error_report.tensor_errors(float_ref, folder / art.qdq_artifact,
                                              data.model_inputs(images, spec.mean, spec.std),
                                              memory_budget=budget_bytes(p.memory_budget_mb, parallel.workers(p.max_workers)))
            csv_path, png_path = ws.error_report_for(name, out_dir)
            error_report.write_error_report(rows, csv_path, png_path, name)
        return result


@dataclass(frozen=True)
class OnnxTarget(OnnxGraphTarget):
    """ONNX Runtime: static variants served in its fused form (backend.py: write_serving_form)."""

    def runtime_label(self) -> str:
        return "onnxruntime"

    def serve_graph(self, recipe: Recipe, folder: Path, quantized: onnx.ModelProto, variants_dir: Path) -> str:
        return onnx_backend.write_serving_form(recipe, folder, quantized)


ONNX = OnnxTarget("onnx", "cpu", ("onnxruntime",), python_api=True, several_outputs=True)
