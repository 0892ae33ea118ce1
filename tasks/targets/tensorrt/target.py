"""The TensorRT target: an engine built from the Q/DQ ONNX (TensorRT 11: its FP16 graph) on a CUDA worker,
predicted by TensorRT and timed against an FP16 engine of the FP32 graph built in the same run (backend.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vitq.tasks.targets.base import Reference
from vitq.tasks.targets.onnx.target import OnnxGraphTarget
from vitq.tasks.targets.tensorrt import backend as trt_backend

if TYPE_CHECKING:  # only for annotations
    from vitq.config import BenchmarkConfig, Params
    from vitq.tasks.benchmark import BenchmarkResult
    from vitq.tasks.layout import Workspace


@dataclass(frozen=True)
class TensorRTTarget(OnnxGraphTarget):
    def serve_graph(self, recipe, folder: Path, quantized, variants_dir: Path) -> str:
        return trt_backend.build_variant_engine(folder, variants_dir)

    def predict(self, path: Path, x, batch_size: int):
        return trt_backend.EngineRunner(path).predict(x, batch_size)

    def predict_outputs(self, path: Path, x, batch_size: int):
        from vitq.errors import VitqError

        raise VitqError(f"{Path(path).name}: vitq's TensorRT engine runner reads one output; a model with several "
                        "outputs takes the onnx-* (or coreml-*) recipes")

    def _time(self, paths: dict[str, Path], ref: Reference, x, cfg: BenchmarkConfig) -> BenchmarkResult:
        """Against an FP16 engine built from the FP32 export in the same run."""
        from vitq.tasks import benchmark

        return benchmark.BenchmarkResult(machine=benchmark.machine_info(), settings={**cfg.model_dump(),
                                         "input_shape": list(x.shape)}, models=trt_backend.time_engines(paths, ref.onnx, x, cfg))

    def benchmark(self, ws: Workspace, p: Params, paths: dict[str, Path]) -> tuple[dict, dict] | None:
        from vitq.tasks import benchmark

        x = benchmark.benchmark_inputs(ws.model_dir, ws.data_dir, p.benchmark)
        timed = self.time_against_baseline(paths, Reference(ws.export_dir), x, p.benchmark)
        return timed.models, timed.not_measured

    def artifacts(self, folder: Path, art) -> dict[str, list[Path]]:
        # The engine, the Q/DQ graph and the FP16 graph it is built from; the build and conversion records.
        return trt_backend.variant_artifacts(folder)


# Engines are built on a CUDA worker from the workspace's graphs (`vitq run`), not from a model object here.
TENSORRT = TensorRTTarget("tensorrt", "cuda", ("tensorrt", "torch"))
