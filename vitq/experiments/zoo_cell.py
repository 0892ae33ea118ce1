"""One cell of the zoo matrix (`vitq zoo`): one model through one target form, in its own process.

    python -m vitq.experiments.zoo_cell <model> <cell> <model folder> <result.json> [--dense]

Cells (`CELLS`, in the order the matrix runs them; tensorrt, modelopt and nncf read what `onnx` wrote into the
model folder: `calibration.npy`, `validation.npy`, `export/model.onnx` + `model.prep.onnx`):
- onnx: the model built (random weights, seed 0), real images at its input size, the FP32 export (which exporter,
  seconds), the default static recipe's Q/DQ variant served by ONNX Runtime and ONNX Runtime's dynamic
  quantization, each validated against FP32 on the validation images, and ONNX Runtime latency at batch 1 of
  FP32, dynamic and static INT8 timed in interleaved rounds (paired ratios, as the benchmark stage does).
- tensorrt: the TensorRT recipe's INT8 Q/DQ graph and the FP16 graphs TensorRT 11 builds from (the variant's and
  the FP32 baseline's), judged in ONNX Runtime (the FP16 graphs in FP16 emulation); the engines are not built:
  TensorRT cannot run on this machine, so they are recorded as not measured with the reason.
- coreml: the Core ML W8A8 variant (PT2E in torch, converted by coremltools), against the FP32 torch model's
  outputs; off macOS judged by the torch program it was converted from (as `vitq run` does), and the record says
  so. It reads nothing of the onnx cell (a sweep of Core ML alone runs beside one of the other targets).
- modelopt, nncf: the peers (vitq/experiments/peers.py `quantize_peer`) on the same FP32 ONNX and calibration
  images, judged like vitq's variant.

The cell writes `stage.txt` before each stage (so a timeout names where it was) and its result JSON at the end:
{"status": "ok"|"failed", "stage", "cause" (one line), ...measurements}. The parent process records wall time
and peak RSS (wait4) around it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("vitq.zoo")

CELLS = ("onnx", "tensorrt", "coreml", "modelopt", "nncf")
STATIC_RECIPE = "onnx-w8a8-percentile"  # the ONNX Runtime column: vitq's default static recipe
DYNAMIC_RECIPE = "onnx-w8-dynamic"
TENSORRT_RECIPE = "tensorrt-w8a8-percentile"
COREML_RECIPE = "coreml-w8a8"
CALIBRATION_IMAGES = 16
VALIDATION_IMAGES = 32
LATENCY_SECONDS = 15.0  # the latency measurement's target length per model (all three timed together)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first non-empty line of its message, colour codes removed."""
    text = ANSI.sub("", str(exc)).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first}"[:400] if first else type(exc).__name__


class Stages:
    """Names the stage being run (in `stage.txt`, for the parent to read after a timeout) and times it."""

    def __init__(self, folder: Path, cell: str):
        self.file = folder / f"{cell}.stage.txt"
        self.current = "start"
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        if self.current != "start":
            self.seconds[self.current] = round(now - self._t, 3)
        self.current, self._t = name, now
        self.file.write_text(name)
        log.info("zoo: stage %s", name)

    def done(self) -> None:
        self("done")


def batch_for(x: np.ndarray) -> int:
    """Images per ONNX Runtime call: fewer for large inputs (SAM's 1024x1024)."""
    return 2 if x.shape[-1] * x.shape[-2] > 400 * 400 else 8


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - out)^2) over every element: the same measure for every cell and peer."""
    from vitq.tasks.validate import compare_outputs

    return float(compare_outputs(ref.reshape(len(ref), -1) if ref.ndim != 4 else ref,
                                 out.reshape(len(out), -1) if out.ndim != 4 else out, None, None).sqnr_db)


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    from vitq.tasks.targets.onnx import backend

    return backend.run_batched(backend.session(path), x, batch_for(x))


def reference_outputs(folder: Path, x: np.ndarray) -> np.ndarray:
    """The FP32 export's outputs on the validation images, computed once per model folder."""
    cached = folder / "fp32_outputs.npy"
    if cached.is_file():
        return np.load(cached)
    out = run_onnx(folder / "export" / "model.onnx", x)
    np.save(cached, out)
    return out


def coverage(folder: Path, quantized) -> dict:
    """INT8 share of Linear/Conv MACs and of weights, attention's matmuls, and where Q/DQ sits, for any Q/DQ graph
    made from this folder's FP32 export (vitq's, TensorRT's, a peer's): the same functions count every one."""
    import onnx

    from vitq.experiments.peers import qdq_placement
    from vitq.tasks.recovery import layers as layer_map
    from vitq.tasks.recovery.variants import layer_precision
    from vitq.tasks.targets.onnx import backend

    export = folder / "export"
    layers = layer_map.quantizable_layers(export / "model.onnx", export / "model.prep.onnx")
    precision = layer_precision(layers, quantized)
    fp32_weights = backend.linear_weight_elements(onnx.load(str(export / "model.prep.onnx")))
    placement = qdq_placement(quantized)
    attention = [layer for layer in layers if not layer.weighted]
    return {
        "int8_mac_fraction": precision["int8_mac_fraction"],
        "int8_weight_fraction": min(1.0, backend.int8_weight_elements(quantized) / max(fp32_weights, 1)),
        "attention_matmuls": len(attention),
        "attention_int8": len(attention) - len(precision["float_attention"]),
        "placement": placement,
    }


def build_model(name: str, dense: bool = False):
    """(FP32 module in eval mode, ExperimentModel, the names of the weights `redraw_zero_init` drew) for a timm or
    `torchvision:<name>` model; random weights (seed torch first). `dense`: judged on its feature map."""
    from vitq.experiments._models import resolve_model
    from vitq.tasks.zoo import FeatureMap

    m = resolve_model(name, None, torchvision=True)
    if m.mean is None:  # torchvision: ImageNet normalisation, as its weights' transforms use
        from dataclasses import replace

        m = replace(m, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    model = m.build().eval()
    redrawn = redraw_zero_init(model)
    return (FeatureMap(model).eval() if dense else model), m, redrawn


def redraw_zero_init(model) -> list[str]:
    """Weights a fresh timm / torchvision model holds at zero, which leave a random-weight model's output constant
    or tiny (Hiera's and others' zero-init heads, LeViT's zero-init residual BatchNorm gammas) and its SQNR
    meaningless (inf on an all-zero output): drawn as a trained model would hold them (a matrix: normal, std 0.02;
    a norm's gamma: 1). Returns their names; a model without such weights is unchanged."""
    import torch

    redrawn = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.numel() > 1 and not p.any():
                p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02)
                redrawn.append(name)
    return redrawn


# --- the cells ---------------------------------------------------------------------------------------------------

def cell_onnx(name: str, dense: bool, folder: Path, stage: Stages) -> dict:
    import torch

    from vitq.api import Variant
    from vitq.config import ExportConfig
    from vitq.recipes import get_recipe
    from vitq.tasks import export
    from vitq.tasks.targets.base import Reference
    from vitq.tasks.targets.registry import get_target

    stage("model")
    torch.manual_seed(0)
    model, m, redrawn = build_model(name, dense)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    stage("data")
    calibration, validation = model_images(m, folder)
    stage("export")
    (folder / "fp32_outputs.npy").unlink(missing_ok=True)  # the reference of an earlier export of this folder
    t = time.perf_counter()
    result = export.export_model(model, calibration, ExportConfig(), folder / "export")
    export_s = time.perf_counter() - t
    ref = reference_outputs(folder, validation)
    record = {"params_m": round(params_m, 2), "input_size": list(m.input_size), "dense": dense,
              "zero_init_redrawn": len(redrawn),
              "exporter": getattr(result, "exporter", "dynamo"), "export_s": round(export_s, 2),
              "fp32_mb": round(result.size_mb, 2), "output_shape": list(ref.shape[1:])}
    variants = {}
    for label, recipe in (("static", STATIC_RECIPE), ("dynamic", DYNAMIC_RECIPE)):
        stage(f"quantize {label}")
        r = get_recipe(recipe)
        reference = Reference(folder / "export", model=model, calibration=calibration,
                              derived_dir=folder / f"{recipe}.fp32")
        t = time.perf_counter()
        artifact = get_target(r.target).produce(r, reference, folder / "variants")
        seconds = time.perf_counter() - t
        variant = Variant(recipe=r, path=folder / "variants" / r.name, artifact=artifact,
                          example_input=validation[:1], _ref=reference)
        variants[label] = variant
        stage(f"validate {label}")
        out = variant.predict(validation, batch_size=batch_for(validation))
        record[label] = {"recipe": recipe, "sqnr_db": sqnr_db(ref, out), "quantize_s": round(seconds, 2),
                         "size_mb": round(artifact.size_mb, 2)}
        if label == "static":
            import onnx

            record[label].update(coverage(folder, onnx.load(str(variant.path / artifact.qdq_artifact))))
            record[label]["served"] = artifact.artifact
    stage("latency")
    record["latency"] = latency(variants["dynamic"], variants["static"], validation[:1])
    return record


def model_images(m, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, validation) model inputs of the model `m` (an ExperimentModel): real images at its input size
    (made once per size for the sweep, beside the models' folders), normalised as it expects; kept in `folder`."""
    from vitq.config import DataConfig
    from vitq.tasks import data

    if (folder / "calibration.npy").is_file() and (folder / "validation.npy").is_file():
        return np.load(folder / "calibration.npy"), np.load(folder / "validation.npy")
    c, h, _ = m.input_size
    images = folder.parent / f"data-{c}x{h}"
    with file_lock(folder.parent / f"data-{c}x{h}.lock"):  # sweeps of other targets may make it at the same time
        if not (images / "meta.json").is_file():
            data.prepare_data(DataConfig(image_size=h, channels=c, validation_size=VALIDATION_IMAGES, holdout_size=0,
                                         calibration_size=CALIBRATION_IMAGES), seed=0, out_dir=images)
    calibration = m.inputs(data.load_split(images, "calibration").images)
    validation = m.inputs(data.load_split(images, "validation").images)
    np.save(folder / "calibration.npy", calibration)
    np.save(folder / "validation.npy", validation)
    return calibration, validation


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on `path` (created), held for the block: sweeps of other targets share a folder and a file."""
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def torch_outputs(model, x: np.ndarray) -> np.ndarray:
    """The FP32 torch model's outputs on `x`, a batch at a time (the reference of a variant converted from torch)."""
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch_for(x)])).numpy()
                               for i in range(0, len(x), batch_for(x))])


def latency(dynamic, static, x: np.ndarray) -> dict:
    """ONNX Runtime at batch 1: FP32, dynamic and static INT8 timed in interleaved rounds (the benchmark stage's
    timing), repeats sized so the three take about LATENCY_SECONDS; paired per-round ratios beside the p50s."""
    from vitq.tasks import benchmark
    from vitq.tasks.targets.onnx import backend

    sess = backend.session(dynamic.fp32_onnx, threads=2)
    sess.run(None, {sess.get_inputs()[0].name: x})
    t = time.perf_counter()
    sess.run(None, {sess.get_inputs()[0].name: x})
    one = time.perf_counter() - t
    del sess
    import os

    rounds = 5
    seconds = float(os.environ.get("VITQ_ZOO_LATENCY_S", LATENCY_SECONDS))  # `vitq zoo --latency-seconds`
    repeats = int(min(100, max(2, seconds / (3.0 * one * rounds))))
    timed = dynamic.benchmark(batch_size=1, repeats=repeats * rounds, warmup=2, rounds=rounds, threads=2, inputs=x,
                              alongside=[static])
    names = {"fp32": "fp32", dynamic.name: "dynamic", static.name: "static"}
    ms = {names[k]: v for k, v in timed.models.items()}
    out = {f"{k}_ms": round(v.latency_ms_p50, 3) for k, v in ms.items()}
    for slow, fast in (("fp32", "static"), ("fp32", "dynamic"), ("dynamic", "static")):
        a, b = ms[slow], ms[fast]
        out[f"{slow}_over_{fast}"] = round(benchmark.latency_ratio(a.latency_ms_p50, b.latency_ms_p50,
                                                                   a.round_p50_ms, b.round_p50_ms), 3)
    out.update(threads=2, repeats=repeats * rounds, rounds=rounds)
    return out


def cell_tensorrt(name: str, folder: Path, stage: Stages) -> dict:
    import onnx

    from vitq.recipes import get_recipe
    from vitq.tasks.targets.base import Reference
    from vitq.tasks.targets.onnx.target import OnnxGraphTarget
    from vitq.tasks.targets.tensorrt import backend as trt_backend, fp16

    class GraphsOnly(OnnxGraphTarget):
        """The TensorRT variant's graphs (Q/DQ and FP16), without the engine TensorRT would build from them."""

        def serve_graph(self, recipe, out, quantized, variants_dir) -> str:
            trt_backend.write_variant_fp16_graph(out)
            return "model.onnx"

    stage("quantize")
    calibration, validation = np.load(folder / "calibration.npy"), np.load(folder / "validation.npy")
    ref = reference_outputs(folder, validation)
    recipe = get_recipe(TENSORRT_RECIPE)
    reference = Reference(folder / "export", calibration=calibration, derived_dir=folder / f"{recipe.name}.fp32")
    t = time.perf_counter()
    artifact = GraphsOnly("tensorrt-graphs", "cpu", ()).produce(recipe, reference, folder / "variants")
    seconds = time.perf_counter() - t
    variant = folder / "variants" / recipe.name
    stage("validate int8")
    quantized = onnx.load(str(variant / "model.onnx"))
    record = {"recipe": recipe.name, "quantize_s": round(seconds, 2), "size_mb": round(artifact.size_mb, 2),
              "tensorrt_ready": artifact.tensorrt_ready, "tensorrt_note": artifact.tensorrt_note,
              "sqnr_db": sqnr_db(ref, run_onnx(variant / "model.onnx", validation)), **coverage(folder, quantized)}
    del quantized
    stage("validate fp16")
    emulated = fp16.fp16_emulation(onnx.load(str(variant / trt_backend.FP16_GRAPH)))
    record["int8_fp16_sqnr_db"] = sqnr_db(ref, run_onnx(emulated.SerializeToString(), validation))
    del emulated
    baseline = folder / "tensorrt-fp16-baseline.onnx"
    fp16.write_fp16_graph(folder / "export" / "model.onnx", baseline)
    record["fp16_baseline_sqnr_db"] = sqnr_db(ref, run_onnx(
        fp16.fp16_emulation(onnx.load(str(baseline))).SerializeToString(), validation))
    why = trt_backend.missing()
    record["engine"] = "not built: " + why if why else "not built by the zoo (run `vitq run` on a cuda worker)"
    record["not_measured"] = {"engine_latency": why or "engines are timed by `vitq run` on a cuda worker"}
    return record


def cell_coreml(name: str, dense: bool, folder: Path, stage: Stages) -> dict:
    import torch

    from vitq.recipes import get_recipe
    from vitq.tasks.targets.base import Reference
    from vitq.tasks.targets.registry import get_target

    stage("model")
    torch.manual_seed(0)
    model, m, _ = build_model(name, dense)
    stage("data")
    calibration, validation = model_images(m, folder)
    ref = torch_outputs(model, validation)  # converted from torch: judged against torch FP32
    stage("quantize")
    recipe = get_recipe(COREML_RECIPE)
    target = get_target(recipe.target)
    reference = Reference(folder / "coreml.fp32" / "export", model=model, calibration=calibration,
                          derived_dir=folder / "coreml.fp32")  # no ONNX export needed: nothing here reads one
    t = time.perf_counter()
    artifact = target.produce(recipe, reference, folder / "variants")
    seconds = time.perf_counter() - t
    stage("validate")
    path = folder / "variants" / recipe.name
    out, runtime, not_measured = target.outputs(path, artifact, validation, batch_for(validation))
    return {"recipe": recipe.name, "quantize_s": round(seconds, 2), "size_mb": round(artifact.size_mb, 2),
            "sqnr_db": sqnr_db(ref, out), "runtime": runtime, "not_measured": not_measured,
            "int8_mac_fraction": artifact.int8_mac_fraction, "int8_weight_fraction": artifact.int8_weight_fraction,
            "float_layers": len(artifact.float_layers), "float_attention": len(artifact.float_attention or [])}


def cell_peer(peer: str, folder: Path, stage: Stages) -> dict:
    import onnx

    from vitq.experiments.peers import quantize_peer

    stage("quantize")
    calibration, validation = np.load(folder / "calibration.npy"), np.load(folder / "validation.npy")
    ref = reference_outputs(folder, validation)
    out = folder / "peers" / f"{peer}.onnx"
    out.parent.mkdir(exist_ok=True)
    run = quantize_peer(peer, folder / "export" / "model.prep.onnx", calibration, out)
    if run.error:
        raise PeerFailed(run.error)
    stage("validate")
    record = {"quantize_s": round(run.seconds, 2), "size_mb": round(out.stat().st_size / 2**20, 2),
              "sqnr_db": sqnr_db(ref, run_onnx(out, validation))}
    record.update(coverage(folder, onnx.load(str(out))))
    return record


class PeerFailed(RuntimeError):
    """The peer tool failed; its own one-line error is the cause."""


def main(argv: list[str]) -> int:
    name, cell, folder, result_path = argv[0], argv[1], Path(argv[2]), Path(argv[3])
    dense = "--dense" in argv[4:]  # judged on its feature map
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stage = Stages(folder, cell)
    start = time.perf_counter()
    try:
        if cell == "onnx":
            record = cell_onnx(name, dense, folder, stage)
        elif cell == "tensorrt":
            record = cell_tensorrt(name, folder, stage)
        elif cell == "coreml":
            record = cell_coreml(name, dense, folder, stage)
        elif cell in ("modelopt", "nncf"):
            record = cell_peer(cell, folder, stage)
        else:
            raise ValueError(f"unknown cell {cell!r}; allowed: {', '.join(CELLS)}")
        record = {"status": "ok", **record}
    except Exception as exc:  # the cell's outcome: one line, the stage it was in
        log.exception("zoo: %s %s failed in %s", name, cell, stage.current)
        cause = str(exc) if isinstance(exc, PeerFailed) else one_line(exc)
        record = {"status": "failed", "stage": stage.current, "cause": cause}
    stage.done()
    record["stage_s"] = stage.seconds
    record["cell_s"] = round(time.perf_counter() - start, 2)
    result_path.write_text(json.dumps(record, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
