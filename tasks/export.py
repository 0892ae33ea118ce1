"""Export stage: FP32 ONNX (single file, dynamic batch), verified by the ONNX checker and by
ONNX Runtime against torch on real validation images; plus the quantization-ready copy
(`model.prep.onnx`: ONNX Runtime's shape inference + graph optimisation) that calibration and
quantization read.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tasks._io import atomic_dir, read_json, write_json
from tasks.data import load_split, model_inputs
from tasks.model import load_model, predict
from tasks.tracing import TRACE_LOCK
from vitq.config import ExportConfig

log = logging.getLogger("vitq.export")

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
VERIFY_IMAGES = 64  # validation images compared between torch and ONNX Runtime


class ExportMismatch(RuntimeError):
    """ONNX Runtime disagrees with torch beyond the tolerance: the exported graph is wrong."""


@dataclass(frozen=True)
class ExportResult:
    onnx_path: str  # relative to the export dir
    prep_path: str
    opset: int
    max_abs_diff: float  # ONNX Runtime vs torch, FP32 logits, on `verified_images` validation images
    verified_images: int
    size_mb: float
    versions: dict


def export_onnx(model_dir: Path, data_dir: Path, cfg: ExportConfig, out_dir: Path) -> ExportResult:
    """The export stage: the workspace's FP32 model, verified on its first validation images."""
    model, spec = load_model(model_dir)
    images = load_split(data_dir, "validation").images[:VERIFY_IMAGES]
    return export_model(model, model_inputs(images, spec.mean, spec.std), cfg, out_dir)


def export_model(model: torch.nn.Module, x: np.ndarray, cfg: ExportConfig, out_dir: Path) -> ExportResult:
    """Export `model` (eval mode) to `out_dir/model.onnx` + `model.prep.onnx` (+ `export.json`), verified
    by ONNX Runtime against torch on `x` (N, C, H, W), N >= 2, preprocessed as the model expects."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with atomic_dir(out_dir) as tmp:
        onnx_path = tmp / "model.onnx"
        batch = torch.export.Dim("batch", min=1, max=1024)
        example = np.concatenate([x[:2]] * (3 - min(len(x), 2)))[:2]  # 2 rows: a batch of 1 would be specialised
        with TRACE_LOCK:  # graph capture is not thread-safe; variants may export concurrently
            program = torch.onnx.export(
                model,
                (torch.from_numpy(example),),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=cfg.opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: batch},),  # by position: any name of forward's argument
                optimize=True,
                verbose=False,
            )
        program.save(str(onnx_path), external_data=False)
        onnx.checker.check_model(str(onnx_path), full_check=True)
        expected = predict(model, x)
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= cfg.max_abs_diff:
            raise ExportMismatch(
                f"ONNX Runtime differs from torch by {diff:.3g} (max abs, logits) > export.max_abs_diff "
                f"{cfg.max_abs_diff}; the exported graph is not faithful"
            )
        quant_pre_process(str(onnx_path), str(tmp / "model.prep.onnx"), skip_symbolic_shape=True)
        onnx.checker.check_model(str(tmp / "model.prep.onnx"))
        result = ExportResult(
            onnx_path="model.onnx",
            prep_path="model.prep.onnx",
            opset=cfg.opset,
            max_abs_diff=diff,
            verified_images=len(x),
            size_mb=onnx_path.stat().st_size / 2**20,
            versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        )
        write_json(tmp / "export.json", asdict(result))
    log.info("export: opset %d, %.2f MB, max |ORT - torch| = %.2e on %d images", cfg.opset, result.size_mb, diff, len(x))
    return result


def load_export_result(export_dir: Path) -> ExportResult:
    return ExportResult(**read_json(Path(export_dir) / "export.json"))
