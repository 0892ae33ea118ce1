"""Export stage: FP32 ONNX (single file, dynamic batch), verified by the ONNX checker and by
ONNX Runtime against torch on real validation images; plus the quantization-ready copy
(`model.prep.onnx`: ONNX Runtime's shape inference + graph optimisation) that calibration and
quantization read.

For an ONNX source (`model.source: onnx`) the file is checked again (FP32, ONNX checker) and normalised to
what the later stages expect: input `input`, output `logits`, a dynamic batch axis, every node named
(layers are found by node name); the result is verified against the file as given.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vitq.tasks._io import atomic_dir, read_json, write_json
from vitq.tasks.data import load_split, model_inputs
from vitq.tasks.model import ONNX_FILE, load_model, load_model_spec, predict
from vitq.tasks.tracing import TRACE_LOCK
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
    spec = load_model_spec(model_dir)
    images = load_split(data_dir, "validation").images[:VERIFY_IMAGES]
    x = model_inputs(images, spec.mean, spec.std)
    if not spec.torch_model:
        return export_onnx_file(Path(model_dir) / ONNX_FILE, x, cfg, out_dir)
    model, spec = load_model(model_dir)
    return export_model(model, x, cfg, out_dir)


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


def normalize_onnx(model, batch_dim: str = "batch"):
    """The graph the later stages read: its one input renamed `input`, its one output `logits`, the batch axis
    of both symbolic (`batch_dim`), every node named (`<op>_<i>` where unnamed), stale value_info dropped
    (shape inference redoes it). Changes `model` (an onnx.ModelProto) in place and returns it."""
    from vitq.tasks.sources import onnx_input_output

    g = model.graph
    inp, out = onnx_input_output(model)
    used = {n for node in g.node for n in (*node.input, *node.output)} | {i.name for i in g.initializer}
    renames = {inp.name: INPUT_NAME, out.name: OUTPUT_NAME}
    for old, new in list(renames.items()):  # a tensor already called `input` / `logits` makes room first
        if new in used and new not in renames:
            renames[new] = next(f"{new}_{i}" for i in range(1, len(used) + 2) if f"{new}_{i}" not in used)
    renames = {k: v for k, v in renames.items() if k != v}

    def rename(names) -> None:
        for i, n in enumerate(names):
            if n in renames:
                names[i] = renames[n]

    for node in g.node:
        rename(node.input)
        rename(node.output)
    for vi in (*g.input, *g.output):
        vi.name = renames.get(vi.name, vi.name)
    del g.value_info[:]
    for vi in (inp, out):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = batch_dim
    taken = {n.name for n in g.node if n.name}
    for i, node in enumerate(g.node):
        if not node.name:
            node.name = next(f"{node.op_type}_{j}" for j in range(i, i + len(g.node) + 1) if f"{node.op_type}_{j}" not in taken)
            taken.add(node.name)
    return model


def export_onnx_file(path: Path, x: np.ndarray, cfg: ExportConfig, out_dir: Path) -> ExportResult:
    """An ONNX source's export: `path` (an FP32 ONNX file) checked (`vitq.tasks.sources.check_onnx_file`), normalised
    (`normalize_onnx`) into `out_dir/model.onnx` + `model.prep.onnx` (+ `export.json`), and verified by ONNX
    Runtime against the file as given on `x` (N, C, H, W)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from vitq.tasks.model import predict_onnx
    from vitq.tasks.sources import check_onnx_file
    from vitq.errors import ModelError

    shown = f"the model's ONNX file {str(path)!r}"
    model = check_onnx_file(Path(path), shown)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    with atomic_dir(out_dir) as tmp:
        onnx_path = tmp / "model.onnx"
        onnx.save(normalize_onnx(model), str(onnx_path))
        onnx.checker.check_model(str(onnx_path), full_check=True)
        expected = predict_onnx(Path(path), x, shown)
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        try:
            got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        except Exception as exc:  # a batch size fixed inside the graph (a Reshape to [1, ...])
            raise ModelError(f"{shown} does not run at batch {len(x)} once its batch axis is dynamic "
                             f"({str(exc).strip().splitlines()[0]}); export it with a dynamic batch axis") from None
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= cfg.max_abs_diff:
            raise ModelError(f"{shown} gives other outputs at batch {len(x)} than at its own batch size (max abs diff "
                             f"{diff:.3g} > export.max_abs_diff {cfg.max_abs_diff}); export it with a dynamic batch axis")
        quant_pre_process(str(onnx_path), str(tmp / "model.prep.onnx"), skip_symbolic_shape=True)
        onnx.checker.check_model(str(tmp / "model.prep.onnx"))
        result = ExportResult(
            onnx_path="model.onnx",
            prep_path="model.prep.onnx",
            opset=opset,
            max_abs_diff=diff,
            verified_images=len(x),
            size_mb=onnx_path.stat().st_size / 2**20,
            versions={"onnx": onnx.__version__, "onnxruntime": ort.__version__},
        )
        write_json(tmp / "export.json", asdict(result))
    log.info("export: ONNX file %s, opset %d, %.2f MB, max |normalised - given| = %.2e on %d images",
             path, opset, result.size_mb, diff, len(x))
    return result


def load_export_result(export_dir: Path) -> ExportResult:
    return ExportResult(**read_json(Path(export_dir) / "export.json"))
