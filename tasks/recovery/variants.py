"""The recovery recipes as the quantize stage runs them: each writes `model.onnx` (Q/DQ) into the
variant folder, plus its own records, and says which layers it left in float.

- auto: sensitivity (torch simulation, calibration table ranges) -> `sensitivity.csv` / `.png`;
  mixed-precision search judged in ONNX Runtime on validation images against the validate budget.
- smoothquant: alpha searched on calibration images; the smoothed torch model is exported,
  calibrated (min/max) and quantized; `torch/` keeps its weights for the Core ML target.
- search: per-tensor calibration method -> `calibration.json` (the table) and
  `calibration_search.csv` (every candidate's range and layer-output error).
- qat: fine-tune with fake quant on the training split, export, quantize with the learned ranges;
  `torch/` keeps the fine-tuned weights.
Every one writes `recovery.json` with what it decided and why.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from tasks._io import PARTIAL_MARK, read_json, write_json
from tasks.backends import onnx as onnx_backend
from tasks.recovery import calib_search, layers as layer_map
from tasks.recovery.layers import Layer
from vitq.config import Params
from vitq.recipes import Recipe

log = logging.getLogger("vitq.recovery")

FLOAT_REFERENCE = "float.prep.onnx"  # a variant's own FP32 model (smoothquant, qat): weights differ from the export's
TORCH_DIR = "torch"  # model.pt + model.json of the transformed torch model, for the Core ML target


@dataclass(frozen=True)
class Inputs:
    """What a recovery recipe reads besides the quantization-ready ONNX: the workspace's stage outputs."""

    model_dir: Path  # model.pt + model.json
    data_dir: Path  # train / calibration / validation splits
    export_dir: Path  # model.onnx (torch scopes) + model.prep.onnx
    calibration_dir: Path  # <method>.json tables
    params: Params


@dataclass
class Decision:
    layers: list[Layer]  # the quantizable layers of the graph that was quantized
    prep_onnx: Path  # that graph (the export's, or the variant's own FP32 model)
    details: dict = field(default_factory=dict)  # written to recovery.json


def build(recipe: Recipe, inputs: Inputs, out: Path, scratch: Path) -> Decision:
    """Write `out/model.onnx` for a recovery recipe; temporary files go to `scratch`."""
    builders = {"auto": _auto, "smoothquant": _smoothquant, "search": _search, "qat": _qat}
    if recipe.recovery not in builders:
        raise ValueError(f"unknown recovery {recipe.recovery!r}; allowed: {', '.join(builders)}")
    torch.set_num_threads(inputs.params.model.train.threads)
    decision = builders[recipe.recovery](recipe, inputs, Path(out), Path(scratch))
    write_json(Path(out) / "recovery.json", {"recipe": recipe.name, "recovery": recipe.recovery, **decision.details})
    return decision


# --- shared pieces -------------------------------------------------------------------------


def _index(inputs: Inputs, n: int, limit: int | None) -> np.ndarray:
    """All rows of a split of `n` images, or a seeded sorted subset of `limit`."""
    idx = np.arange(n)
    if limit is not None and limit < n:
        idx = np.sort(np.random.default_rng(inputs.params.seed).choice(n, limit, replace=False))
    return idx


def _split(inputs: Inputs, name: str, limit: int | None = None):
    """Model inputs (N, C, H, W) and labels of a split; a seeded subset of `limit` images."""
    from tasks.data import load_split, model_inputs
    from tasks.model import load_model_spec

    spec = load_model_spec(inputs.model_dir)
    split = load_split(inputs.data_dir, name)
    idx = _index(inputs, len(split.labels), limit)
    labels = split.labels[idx] if spec.num_classes == len(spec.classes) else None
    return model_inputs(split.images[idx], spec.mean, spec.std), labels


def _judged(inputs: Inputs, name: str, limit: int | None = None):
    """Model inputs of a split (the same seeded subset as `_split`) and the task's Judge with its ground truth."""
    from tasks.data import load_split
    from tasks.validate import validation_judge

    n = len(load_split(inputs.data_dir, name).labels)
    return validation_judge(inputs.model_dir, inputs.data_dir, inputs.params.task, name, _index(inputs, n, limit))


def recovery_budget(inputs: Inputs):
    """recovery's budget for the task (tasks/task_kinds.py), warning where it is looser than validate's."""
    from tasks.recovery.mixed_precision import Budget

    p = inputs.params
    budget = Budget.of(p.recovery, p.task.kind)
    looser = [(k, getattr(p.recovery, k), getattr(p.validate_, k)) for k in ("max_top1_drop", "max_miou_drop", "min_mask_iou")
              if getattr(budget, k) is not None and getattr(p.validate_, k) is not None
              and (getattr(p.recovery, k) > getattr(p.validate_, k) if k.startswith("max") else
                   getattr(p.recovery, k) < getattr(p.validate_, k))]
    for k, mine, theirs in looser:
        log.warning("recovery.%s %s is looser than validate.%s %s: a variant may meet its own budget and still fail "
                    "validation", k, mine, k, theirs)
    return budget


def torch_layers(layers: list[Layer], model: torch.nn.Module) -> list[Layer]:
    """Linear/Conv layers that name a Linear/Conv module of `model` (what the torch-side methods act on)."""
    from tasks.recovery.simulate import QUANTIZABLE_MODULES

    modules = dict(model.named_modules())
    return [layer for layer in layers if layer.weighted and isinstance(modules.get(layer.name), QUANTIZABLE_MODULES)]


def _layer_amax(layers: list[Layer], model: torch.nn.Module, table: Path) -> dict[str, float]:
    ranges = calib_search.read_amax(table)
    return {layer.name: ranges[layer.input] for layer in torch_layers(layers, model) if layer.input in ranges}


def _save_torch(model: torch.nn.Module, inputs: Inputs, folder: Path, note: dict) -> None:
    """A model dir (`model.pt`, `model.json`) the export stage and the Core ML target load as the original."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    spec = read_json(inputs.model_dir / "model.json")
    write_json(folder / "model.json", {**spec, "train": {**spec.get("train", {}), "recovery": note}})


def _export_and_prepare(torch_dir: Path, inputs: Inputs, scratch: Path) -> tuple[Path, list[Layer]]:
    """FP32 ONNX of a transformed torch model (checked against torch), its prep copy and layers."""
    from tasks.export import export_onnx

    export_dir = scratch / "export"
    export_onnx(torch_dir, inputs.data_dir, inputs.params.export, export_dir)
    prep = export_dir / "model.prep.onnx"
    return prep, layer_map.quantizable_layers(export_dir / "model.onnx", prep)


class _OrtJudge:
    """Builds a Q/DQ candidate with some layers excluded and measures it in ONNX Runtime against FP32,
    with the task's metrics (tasks/task_kinds.py)."""

    def __init__(self, recipe: Recipe, inputs: Inputs, prep: Path, layers: list[Layer], table: Path, scratch: Path,
                 x: np.ndarray, judge):
        self.recipe, self.prep, self.layers, self.table, self.scratch = recipe, prep, layers, table, scratch
        self.x, self.judge = x, judge
        bs = inputs.params.validate_.batch_size
        self.batch_size = bs
        self.ref = onnx_backend.run_batched(onnx_backend.session(inputs.export_dir / "model.onnx"), x, bs)
        self.reference = judge.evaluate(self.ref, self.ref, None)  # FP32's own top-1 / mIoU on these images
        self.builds = 0

    def __call__(self, float_layers) -> object:
        self.builds += 1
        path = self.scratch / f"candidate-{self.builds}.onnx"
        onnx_backend.quantize(self.recipe, self.prep, path, self.table, layer_map.nodes_of(self.layers, float_layers))
        out = onnx_backend.run_batched(onnx_backend.session(path), self.x, self.batch_size)
        path.unlink()
        return self.judge.evaluate(self.ref, out, self.reference)


# --- recipes --------------------------------------------------------------------------------


def _auto(recipe: Recipe, inputs: Inputs, out: Path, scratch: Path) -> Decision:
    from tasks.calibrate import table_path
    from tasks.model import load_model
    from tasks.recovery.mixed_precision import Budget, search_float_layers
    from tasks.recovery.sensitivity import layer_sensitivity, write_sensitivity

    prep = inputs.export_dir / "model.prep.onnx"
    layers = layer_map.quantizable_layers(inputs.export_dir / "model.onnx", prep)
    table = table_path(inputs.calibration_dir, *recipe.table())  # a percentile override: its own table
    model, _ = load_model(inputs.model_dir)
    rc = inputs.params.recovery
    xs, ls = _split(inputs, "validation", min(rc.sensitivity_images, rc.search_images))
    macs = {layer.name: layer.macs for layer in layers}
    rows = layer_sensitivity(model, _layer_amax(layers, model, table), macs, xs, ls)
    x, truth_judge = _judged(inputs, "validation", rc.search_images)
    write_sensitivity(rows, out / "sensitivity.csv", out / "sensitivity.png", recipe.name)
    budget = recovery_budget(inputs)
    judge = _OrtJudge(recipe, inputs, prep, layers, table, scratch, x, truth_judge)
    mp = search_float_layers([r.layer for r in rows], judge, budget, macs)
    onnx_backend.quantize(recipe, prep, out / "model.onnx", table, layer_map.nodes_of(layers, mp.float_layers))
    return Decision(layers, prep, {
        "budget": asdict(budget), "budget_met": mp.budget_met, "search_images": len(x), "sensitivity_images": len(xs),
        "search_split": "validation",
        "float_layers": mp.float_layers, "ranking": [r.layer for r in rows],
        "evaluations": mp.evaluations, "seconds": mp.seconds,
    })


def _smoothquant(recipe: Recipe, inputs: Inputs, out: Path, scratch: Path) -> Decision:
    from tasks.calibrate import calibrate, table_path
    from tasks.model import load_model
    from tasks.recovery.smoothquant import search_alpha

    model, _ = load_model(inputs.model_dir)
    x, _ = _split(inputs, "calibration")
    smoothed, sq = search_alpha(model, x, inputs.params.recovery.smoothquant_alphas)
    _save_torch(smoothed, inputs, out / TORCH_DIR, {"smoothquant_alpha": sq.alpha})
    prep, layers = _export_and_prepare(out / TORCH_DIR, inputs, scratch)
    cfg = inputs.params.calibration.model_copy(update={"methods": ("minmax",)})
    calibrate(prep, out / TORCH_DIR, inputs.data_dir, cfg, scratch / "calibration")
    onnx_backend.quantize(recipe, prep, out / "model.onnx", table_path(scratch / "calibration", "minmax"))
    shutil.copyfile(prep, out / FLOAT_REFERENCE)
    return Decision(layers, out / FLOAT_REFERENCE, {
        "alpha": sq.alpha, "pairs": [list(p) for p in sq.pairs], "simulated_sqnr_db_by_alpha": sq.sqnr_db_by_alpha,
        "simulated_sqnr_db_unsmoothed": sq.unsmoothed_sqnr_db, "calibration": "minmax of the smoothed model",
        "float_layers": [],
    })


def _search(recipe: Recipe, inputs: Inputs, out: Path, scratch: Path) -> Decision:
    from tasks.calibrate import table_path
    from tasks.model import load_model

    prep = inputs.export_dir / "model.prep.onnx"
    layers = layer_map.quantizable_layers(inputs.export_dir / "model.onnx", prep)
    rc = inputs.params.recovery
    x_all, _ = _split(inputs, "calibration")
    model, _ = load_model(inputs.model_dir)
    judged = {layer.input for layer in torch_layers(layers, model)}
    ranges = calib_search.candidate_ranges(prep, x_all, inputs.params.calibration, rc.search_percentiles, judged)
    x, _ = _split(inputs, "calibration", rc.search_calibration_images)
    choices = calib_search.search_calibration(model, {l.name: l.input for l in torch_layers(layers, model)}, ranges, x)
    amax = calib_search.read_amax(table_path(inputs.calibration_dir, "minmax")) if (
        table_path(inputs.calibration_dir, "minmax").is_file()) else {}  # tensors no layer reads (attention inputs)
    amax.update({c.tensor: c.amax[c.chosen] for c in choices})
    calib_search.write_table(out / "calibration.json", amax)
    calib_search.write_choices(choices, out / "calibration_search.csv")
    onnx_backend.quantize(recipe, prep, out / "model.onnx", out / "calibration.json")
    counts: dict[str, int] = {}
    for c in choices:
        counts[c.chosen] = counts.get(c.chosen, 0) + 1
    return Decision(layers, prep, {
        "chosen": {c.tensor: c.chosen for c in choices}, "chosen_counts": counts,
        "candidates": sorted({m for c in choices for m in c.amax}), "judged_on_images": len(x),
        "float_layers": [],
    })


def _qat(recipe: Recipe, inputs: Inputs, out: Path, scratch: Path) -> Decision:
    from tasks.calibrate import table_path
    from tasks.model import load_model
    from tasks.recovery.qat import QatSettings, finetune

    from tasks.recovery.simulate import input_amax
    from tasks.recovery.smoothquant import search_alpha, smoothing_pairs

    prep0 = inputs.export_dir / "model.prep.onnx"
    layers0 = layer_map.quantizable_layers(inputs.export_dir / "model.onnx", prep0)
    table = table_path(inputs.calibration_dir, *recipe.table())  # a percentile override: its own table
    model, _ = load_model(inputs.model_dir)
    p, rc = inputs.params, inputs.params.recovery
    start_amax, init = _layer_amax(layers0, model, table), {"init": "fp32"}
    if rc.qat_init == "smoothquant" and smoothing_pairs(model):
        # Fine-tune what SmoothQuant leaves: outliers too large for gradient steps to undo are gone first.
        x_cal, _ = _split(inputs, "calibration")
        model, sq = search_alpha(model, x_cal, rc.smoothquant_alphas)
        start_amax = input_amax(model, list(start_amax), x_cal)
        init = {"init": "smoothquant", "smoothquant_alpha": sq.alpha}
    x, y = _split(inputs, "train")
    if p.task.kind != "classification" or y is None:
        # No class labels to fine-tune on (dense outputs, or data without labels): distil the FP32 model's outputs.
        from tasks.model import predict

        y = predict(load_model(inputs.model_dir)[0], x) if len(x) else np.zeros((0,), np.float32)
        init = {**init, "loss": "mse to the FP32 model's outputs (distillation)"}
    cfg = QatSettings(epochs=rc.qat_epochs, lr=rc.qat_lr, batch_size=rc.qat_batch_size,
                      label_smoothing=p.model.train.label_smoothing, seed=p.seed, threads=p.model.train.threads)
    tuned, qr = finetune(model, start_amax, x, y, cfg)
    _save_torch(tuned, inputs, out / TORCH_DIR, {**init, "qat_epochs": qr.epochs, "qat_final_loss": qr.final_loss})
    prep, layers = _export_and_prepare(out / TORCH_DIR, inputs, scratch)
    amax = calib_search.read_amax(table)  # tensors outside the fine-tune keep the calibration range
    amax.update({layer.input: qr.act_amax[layer.name] for layer in torch_layers(layers, tuned) if layer.name in qr.act_amax})
    calib_search.write_table(out / "calibration.json", amax)
    onnx_backend.quantize(recipe, prep, out / "model.onnx", out / "calibration.json")
    shutil.copyfile(prep, out / FLOAT_REFERENCE)
    return Decision(layers, out / FLOAT_REFERENCE, {
        **init, "epochs": qr.epochs, "lr": rc.qat_lr, "final_loss": qr.final_loss, "train_images": len(y),
        "seconds": qr.seconds, "learned_act_amax": qr.act_amax, "float_layers": [],
    })


# --- what every variant records ---------------------------------------------------------------


def layer_precision(layers: list[Layer], quantized: onnx.ModelProto) -> dict:
    """`float_layers` (Linear/Conv left float), `float_attention` and `int8_mac_fraction` of a quantized graph.

    A layer is float when its node is still there, same op, not reading DequantizeLinear on both
    inputs (static Q/DQ); a node rewritten into an integer op (dynamic quantization) is INT8.
    """
    dq_out = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    nodes = {n.name: n for n in quantized.graph.node}

    def is_float(layer: Layer) -> bool:
        for name in layer.nodes:
            n = nodes.get(name)
            if n is not None and n.op_type in layer_map.LINEAR_OPS and not (n.input[0] in dq_out and n.input[1] in dq_out):
                return True
        return False

    float_layers = [layer.name for layer in layers if layer.weighted and is_float(layer)]
    return {
        "float_layers": float_layers,
        "float_attention": [layer.name for layer in layers if not layer.weighted and is_float(layer)],
        "int8_mac_fraction": layer_map.int8_mac_fraction(layers, float_layers),
    }


def scratch_dir(parent: Path):
    return tempfile.TemporaryDirectory(prefix=f".recovery{PARTIAL_MARK}", dir=parent)
