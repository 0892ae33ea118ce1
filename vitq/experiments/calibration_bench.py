"""`vitq calibration-bench`: the calibrate stage's time next to ONNX Runtime's FP32 forward pass over the
same images, on this machine.

The model is exported as the pipeline exports it (tasks/export.py: dynamo ONNX, TorchScript where dynamo fails,
then ORT's quantization pre-processing), then timed twice on the same inputs, batch for batch (`batch_size` images a run, ORT's
default threads in both): the plain FP32 forward pass (after one warm-up batch), and `calibrate_inputs` with
every default calibration method, end to end (graph augmentation, session, the pass, every table), measuring
what the calibrate stage measures with the preset recipes (the linear ops' inputs; not the attention MatMuls').
Inputs are a seeded random N(0, 1) tensor: timing does not depend on image content, and nothing is downloaded.
Writes `reports/calibration_bench.json`: {model, images, fp32_forward_s, calibrate_s, ratio, machine, ...}.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from vitq.config import CalibrationConfig, ExportConfig, QuantizeConfig
from vitq.experiments._models import ExperimentModel

log = logging.getLogger("vitq.experiments.calibration_bench")

INPUTS = "seeded random N(0, 1) tensor (seed 0), not images: timing only"


def fp32_forward_seconds(prep_onnx: Path, x: np.ndarray, batch_size: int) -> float:
    """Seconds ONNX Runtime (CPU, default threads and graph optimisation) takes for `x`, `batch_size` images a run."""
    from vitq.tasks.targets.onnx import backend as onnx_backend

    session = onnx_backend.session(prep_onnx)
    onnx_backend.run_batched(session, x[:batch_size], batch_size)  # warm-up: first-run allocations are not the model's
    start = time.perf_counter()
    onnx_backend.run_batched(session, x, batch_size)
    return time.perf_counter() - start


def run_calibration_bench(m: ExperimentModel, images: int, cfg: CalibrationConfig, out: Path) -> dict:
    import torch

    from vitq.tasks._io import write_json
    from vitq.tasks.benchmark import machine_info
    from vitq.tasks.calibrate import calibrate_inputs
    from vitq.tasks.export import export_model

    load_average = [round(v, 2) for v in os.getloadavg()]  # the machine may be shared: what else ran at the start
    c, h, w = m.input_size
    x = np.random.default_rng(0).standard_normal((images, c, h, w)).astype(np.float32)
    torch.manual_seed(0)
    model = m.build().eval()
    with tempfile.TemporaryDirectory(prefix="vitq-calibration-bench-") as scratch:
        log.info("calibration-bench: %s: export", m.name)
        export_model(model, x[:2], ExportConfig(), Path(scratch) / "export")
        del model
        prep = Path(scratch) / "export" / "model.prep.onnx"
        log.info("calibration-bench: %s: calibrate (%s), %d images", m.name, ", ".join(cfg.methods), images)
        start = time.perf_counter()
        # as the calibrate stage with the preset recipes: the static presets quantize attention's products too
        result = calibrate_inputs(prep, x, cfg, Path(scratch) / "calibration",
                                  attention=QuantizeConfig().calibrates_attention)
        calibrate_s = time.perf_counter() - start
        log.info("calibration-bench: %s: FP32 forward, %d images", m.name, images)
        fp32_s = fp32_forward_seconds(prep, x, result.batch_size)  # the same batches as calibration's
    record = {
        "model": m.name,
        "images": images,
        "fp32_forward_s": round(fp32_s, 3),
        "calibrate_s": round(calibrate_s, 3),
        "ratio": round(calibrate_s / fp32_s, 3),  # calibrate / FP32 forward, same images and batches
        "machine": {**machine_info(), "load_average_at_start": load_average, "torch_threads": torch.get_num_threads()},
        "batch_size": result.batch_size,
        "methods": list(cfg.methods),
        "num_bins": cfg.num_bins,
        "tensors": result.tensors,
        "attention_inputs": result.attention,  # the attention MatMuls' inputs measured (a quantize_attention recipe)
        "inputs": INPUTS,
        "weights": m.weights,
    }
    write_json(out, record)
    return record


def bench_line(record: dict) -> str:
    return (f"{record['model']}: {record['images']} images, batch {record['batch_size']}: FP32 forward "
            f"{record['fp32_forward_s']:.1f} s, calibrate ({', '.join(record['methods'])}) {record['calibrate_s']:.1f} s, "
            f"ratio {record['ratio']:.2f}")
