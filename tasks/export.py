"""Export stage: FP32 ONNX (single file, dynamic batch), verified by the ONNX checker and by
ONNX Runtime against torch on real validation images; plus the quantization-ready copy
(`model.prep.onnx`: ONNX Runtime's shape inference + graph optimisation) that calibration and
quantization read.

For an ONNX source (`model.source: onnx`) the file is checked again (FP32, ONNX checker) and normalised to
what the later stages expect: input `input`, output `logits`, a dynamic batch axis, every node named
(layers are found by node name); the result is verified against the file as given.

A model with several outputs keeps their names (`vitq.tasks.model.named_outputs`: a tuple's `output_0`, ...,
a dict's keys, an ONNX file's graph outputs); each is verified, and `export.json` lists them in order.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitq.tasks._io import atomic_dir, read_json, write_json
from vitq.tasks.data import load_split, model_inputs
from vitq.tasks.model import ONNX_FILE, load_model, load_model_spec, output_names, predict_outputs
from vitq.tasks.tracing import TRACE_LOCK
from vitq.config import ExportConfig

log = logging.getLogger("vitq.export")

INPUT_NAME = "input"
OUTPUT_NAME = "logits"  # a model's one output; several keep their own names
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
    outputs: list[str] = field(default_factory=lambda: [OUTPUT_NAME])  # the graph's outputs, in order


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

    example = np.concatenate([x[:2]] * (3 - min(len(x), 2)))[:2]  # 2 rows: a batch of 1 would be specialised
    names = _graph_names(output_names(model, example))
    with atomic_dir(out_dir) as tmp:
        onnx_path = tmp / "model.onnx"
        batch = torch.export.Dim("batch", min=1, max=1024)
        with TRACE_LOCK:  # graph capture is not thread-safe; variants may export concurrently
            program = torch.onnx.export(
                model,
                (torch.from_numpy(example),),
                input_names=[INPUT_NAME],
                output_names=list(names),
                opset_version=cfg.opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: batch},),  # by position: any name of forward's argument
                optimize=True,
                verbose=False,
            )
        program.save(str(onnx_path), external_data=False)
        onnx.checker.check_model(str(onnx_path), full_check=True)
        expected = dict(zip(names, predict_outputs(model, x).values()))
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = dict(zip(names, sess.run(list(names), {INPUT_NAME: x})))
        diff, worst = _max_abs_diff(got, expected)
        if not diff <= cfg.max_abs_diff:
            raise ExportMismatch(
                f"ONNX Runtime differs from torch by {diff:.3g} (max abs, {worst}) > export.max_abs_diff "
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
            outputs=list(names),
        )
        write_json(tmp / "export.json", asdict(result))
    log.info("export: opset %d, %.2f MB, max |ORT - torch| = %.2e on %d images", cfg.opset, result.size_mb, diff, len(x))
    return result


def _graph_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """The ONNX names of a model's outputs: one is `logits`; several keep theirs, none may be the input's."""
    from vitq.errors import ModelError

    if len(names) > 1 and INPUT_NAME in names:
        raise ModelError(f"the model has an output named {INPUT_NAME!r} (outputs: {', '.join(names)}), the name of "
                         "its input in the exported graph; rename that output")
    return (OUTPUT_NAME,) if len(names) == 1 else names


def _max_abs_diff(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> tuple[float, str]:
    """The largest |got - expected| over every output, and which output it is in."""
    diffs = {k: float(np.max(np.abs(got[k] - expected[k]))) if got[k].size else 0.0 for k in expected}
    worst = max(diffs, key=lambda k: diffs[k] if diffs[k] == diffs[k] else float("inf"))  # NaN: the worst
    return diffs[worst], worst


def normalize_onnx(model, batch_dim: str = "batch"):
    """The graph the later stages read: its one input renamed `input`, its one output `logits` (several outputs
    keep their names), the batch axis of each symbolic (`batch_dim`), every node named (`<op>_<i>` where unnamed),
    stale value_info dropped (shape inference redoes it). Changes `model` (an onnx.ModelProto) in place and
    returns it."""
    from vitq.tasks.sources import onnx_input_output, onnx_output_names

    g = model.graph
    inp, out = onnx_input_output(model)
    _graph_names(onnx_output_names(model))  # several outputs: none may be called `input`
    used = {n for node in g.node for n in (*node.input, *node.output)} | {i.name for i in g.initializer}
    renames = {inp.name: INPUT_NAME, **({out.name: OUTPUT_NAME} if len(g.output) == 1 else {})}
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
    for vi in (inp, *g.output):
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

    from vitq.tasks.model import predict_onnx_outputs
    from vitq.tasks.sources import check_onnx_file, onnx_output_names
    from vitq.errors import ModelError

    shown = f"the model's ONNX file {str(path)!r}"
    model = check_onnx_file(Path(path), shown)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    names = onnx_output_names(model)
    with atomic_dir(out_dir) as tmp:
        onnx_path = tmp / "model.onnx"
        onnx.save(normalize_onnx(model), str(onnx_path))
        onnx.checker.check_model(str(onnx_path), full_check=True)
        expected = predict_onnx_outputs(Path(path), x, shown)
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        try:
            got = dict(zip(names, sess.run(list(names), {INPUT_NAME: x})))
        except Exception as exc:  # a batch size fixed inside the graph (a Reshape to [1, ...])
            raise ModelError(f"{shown} does not run at batch {len(x)} once its batch axis is dynamic "
                             f"({str(exc).strip().splitlines()[0]}); export it with a dynamic batch axis") from None
        diff, worst = _max_abs_diff(got, expected)
        if not diff <= cfg.max_abs_diff:
            raise ModelError(f"{shown} gives other outputs at batch {len(x)} than at its own batch size (max abs diff "
                             f"{diff:.3g} in {worst!r} > export.max_abs_diff {cfg.max_abs_diff}); export it with a "
                             "dynamic batch axis")
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
            outputs=list(names),
        )
        write_json(tmp / "export.json", asdict(result))
    log.info("export: ONNX file %s, opset %d, %.2f MB, max |normalised - given| = %.2e on %d images",
             path, opset, result.size_mb, diff, len(x))
    return result


def load_export_result(export_dir: Path) -> ExportResult:
    return ExportResult(**read_json(Path(export_dir) / "export.json"))
