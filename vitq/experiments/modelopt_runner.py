"""NVIDIA ModelOpt's ONNX INT8 post-training quantization of one FP32 ONNX file, in a process of its own.

Run with the ModelOpt venv's python (`make modelopt` builds `.venv-modelopt`), by path, one model per process
(ModelOpt patches ONNX Runtime's calibration classes in place when imported):

    .venv-modelopt/bin/python vitq/experiments/modelopt_runner.py FP32.onnx CALIBRATION.npy OUT.onnx

CALIBRATION.npy: (N, C, H, W) float32 model inputs. ModelOpt's CalibrationDataProvider splits it by the graph's
batch dimension (an unknown one counts as 1): one image per calibration step, as the other peers calibrate.

`modelopt.onnx.quantization.quantize(onnx_path, quantize_mode="int8", calibration_data=..., output_path=...,
calibration_eps=["cpu"], high_precision_dtype="fp32")`; every other argument is ModelOpt 0.47's default:
calibration_method None -> "entropy" (int8), per-channel weights / per-tensor activations, Q/DQ on the op types
ModelOpt quantizes by default (its own placement), MHA MatMuls quantized unless the sequence is longer than 512,
passes ["concat_elimination"], no simplify. Two departures from its defaults, both because the result runs in
ONNX Runtime on CPU here: calibration runs on the CPU execution provider (its default order tries TensorRT and
CUDA first), and the unquantized part stays FP32 (its default "fp16" converts it, which the CPU provider runs
slower, and which would mix an FP16 error into an INT8 comparison). `--calibration-method max` and
`--high-precision-dtype fp16` select ModelOpt's other settings.

The last stdout line is one JSON object: {"seconds": <the quantize call alone>, "modelopt": <version>, "settings":
{...}}. On failure the last stderr line is `modelopt-runner error: <Type>: <first line of the message>` and the
exit code is 1. Nothing from vitq is imported: the ModelOpt venv reads torch, onnx, onnxruntime and numpy from the
project's venv through a .pth file, and this file must run with or without vitq on the path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

ERROR_PREFIX = "modelopt-runner error: "


def settings(calibration_method: str | None = None, high_precision_dtype: str = "fp32") -> dict:
    """The keyword arguments given to `modelopt.onnx.quantization.quantize` besides the paths and data."""
    out = {"quantize_mode": "int8", "calibration_eps": ["cpu"], "high_precision_dtype": high_precision_dtype}
    if calibration_method:
        out["calibration_method"] = calibration_method
    return out


def quantize(fp32_onnx: str, calibration_npy: str, out_onnx: str, calibration_method: str | None = None,
             high_precision_dtype: str = "fp32", log_level: str = "WARNING") -> dict:
    import numpy as np

    calibration = np.load(calibration_npy)
    if calibration.ndim != 4:
        raise ValueError(f"calibration must be (N, C, H, W), got shape {calibration.shape}")
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    import os

    import modelopt
    from modelopt.onnx.quantization import quantize as mo_quantize

    os.makedirs(os.path.dirname(os.path.abspath(out_onnx)), exist_ok=True)  # ModelOpt asserts it exists

    kwargs = settings(calibration_method, high_precision_dtype)
    t = time.perf_counter()
    mo_quantize(onnx_path=fp32_onnx, calibration_data=calibration, output_path=out_onnx, log_level=log_level,
                **kwargs)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "modelopt": modelopt.__version__,
            "settings": {**kwargs, "calibration_method": calibration_method or "default (entropy)"}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fp32_onnx")
    ap.add_argument("calibration_npy", help="(N, C, H, W) float32 model inputs")
    ap.add_argument("out_onnx")
    ap.add_argument("--calibration-method", choices=("entropy", "max"), default=None,
                    help="default: ModelOpt's (entropy for int8)")
    ap.add_argument("--high-precision-dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    try:
        result = quantize(args.fp32_onnx, args.calibration_npy, args.out_onnx, args.calibration_method,
                          args.high_precision_dtype, args.log_level)
    except BaseException as exc:  # noqa: BLE001: one line for the caller, the traceback above it
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"{ERROR_PREFIX}{type(exc).__name__}: {first}".rstrip(": "), file=sys.stderr, flush=True)
        return 1
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
