"""Does plain INT8 hurt the segmenter's masks? ONNX Runtime's own static quantization, outside vitq.

Exports the trained model (torch.onnx.export, dynamo, dynamic batch; ONNX Runtime checked against
torch), quantizes it with `onnxruntime.quantization.quantize_static` (QDQ, MinMax calibration on
ROOT/calibration, symmetric int8 weights per channel and activations per tensor) and compares the
masks on ROOT/val: mIoU against the ground truth, mask IoU against FP32's masks, SQNR of the logits.
With `--outliers`, the same again after `vitq.tasks.recovery.outliers.inject_outliers` (a
function-preserving transform that gives a few LayerNorm output channels the large activations
trained ViTs have; FP32's masks do not change) on the encoder's LayerNorm -> qkv pairs.

    python check_int8.py ROOT CHECKPOINT [--outliers] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from model import build  # noqa: E402
from train import load_split, miou, predict, to_inputs  # noqa: E402


def mask_iou_vs(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean over masks of IoU(out > 0, ref > 0), each over the whole split; masks empty in both skipped."""
    a, b = ref > 0, out > 0
    inter = (a & b).sum((0, 2, 3)).astype(np.float64)
    union = (a | b).sum((0, 2, 3)).astype(np.float64)
    return float(np.mean(inter[union > 0] / union[union > 0]))


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - out|^2) over all logits."""
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - out).astype(np.float64) ** 2)))


def export(model: torch.nn.Module, x: np.ndarray, path: Path) -> float:
    """FP32 ONNX at `path` (dynamic batch, one file); returns max |ONNX Runtime - torch| on `x`."""
    import onnx
    import onnxruntime as ort

    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(model.eval(), (torch.from_numpy(x[:2]),), input_names=["input"],
                                output_names=["masks"], opset_version=20, dynamo=True, external_data=False,
                                dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    got = run(path, x)
    return float(np.abs(got - predict(model, torch.from_numpy(x)).numpy()).max())


def run(path: Path, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def quantize(fp32: Path, calibration: np.ndarray, out: Path) -> None:
    """Plain static INT8: QDQ, MinMax, s8 weights per channel, s8 activations per tensor (symmetric)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calibration[i : i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self):
            return next(self.batches, None)

    prep = out.with_name(out.stem + ".prep.onnx")
    quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
    quantize_static(str(prep), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


def evaluate(model: torch.nn.Module, cal: np.ndarray, val: np.ndarray, val_masks: np.ndarray, work: Path,
             tag: str) -> list[dict]:
    """FP32 ONNX and plain INT8 rows for `model`."""
    fp32, int8 = work / f"{tag}.onnx", work / f"{tag}.int8.onnx"
    diff = export(model, val[:8], fp32)
    quantize(fp32, cal, int8)
    ref, out = run(fp32, val), run(int8, val)
    return [
        {"model": tag, "variant": "fp32", "miou": miou(torch.from_numpy(ref), val_masks)[0], "mask_iou": 1.0,
         "sqnr_db": float("inf"), "note": f"max |ORT - torch| {diff:.1e}"},
        {"model": tag, "variant": "int8 (quantize_static)", "miou": miou(torch.from_numpy(out), val_masks)[0],
         "mask_iou": mask_iou_vs(ref, out), "sqnr_db": sqnr_db(ref, out), "note": ""},
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="check_int8.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="scenes root (scenes.py)")
    ap.add_argument("checkpoint", type=Path, help="state dict written by train.py")
    ap.add_argument("--outliers", action="store_true", help="also with the outlier transform")
    ap.add_argument("--ratio", type=float, default=100.0, help="outlier |max| / largest other channel |max|")
    ap.add_argument("--out", type=Path, default=None, help="keep the ONNX files here (default: a temp dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    cal_images, _ = load_split(args.root, "calibration")
    val_images, val_masks = load_split(args.root, "val")
    cal, val = to_inputs(cal_images).numpy(), to_inputs(val_images).numpy()
    model = build(img_size=val_images.shape[1])
    model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = evaluate(model, cal, val, val_masks, work, args.checkpoint.stem)
        if args.outliers:
            from vitq.tasks.recovery.outliers import OutlierSpec, inject_outliers

            before = predict(model, torch.from_numpy(val)).numpy()
            pairs = tuple((f"blocks.{i}.norm1", f"blocks.{i}.attn.qkv") for i in range(len(model.blocks)))
            spec = inject_outliers(model, cal, OutlierSpec(pairs=pairs, ratio=args.ratio))
            after = predict(model, torch.from_numpy(val)).numpy()
            rows += evaluate(model, cal, val, val_masks, work, f"outliers x{args.ratio:g}")
            rows[-2]["note"] += f"; FP32 logits moved {np.abs(after - before).max():.1e} by the transform"
            print(f"outlier factors: {spec.factors}")
    print("| model | variant | mIoU vs ground truth | mask IoU vs FP32 | SQNR dB | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['miou']:.4f} | {r['mask_iou']:.4f} | {r['sqnr_db']:.1f} | "
              f"{r['note']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
