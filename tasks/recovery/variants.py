"""The recovery recipes as the quantize stage runs them: each writes `model.onnx` (Q/DQ) into the
variant folder, plus its own records, and says which layers it left in float.

Every search judges on the held-out images (the data stage's `holdout` split, carved from the
validation images; `validate` reports on the rest), and every recipe records the final variant's
metrics on both: `held_out` (what it steered by) and `validation` (what `validate` will report).

- auto: composes. Tries the cheap fixes in order of cost, each built and run in ONNX Runtime in full
  INT8 against the recovery budget: the recipe's own table (`plain`), the per-tensor range search
  (`search`), SmoothQuant with its alpha search (`smoothquant`), and both (`smoothquant+search`: the
  ranges searched on the smoothed graph). The first within budget wins and the later ones are not built
  (`recovery.auto_choice: best_sqnr`: all are built, the best SQNR within budget wins; all are 100% INT8).
  None within budget: float fallback from the best of them (by SQNR): sensitivity (torch simulation of the Linear/
  Conv layers; ONNX Runtime builds for the attention products where the recipe quantizes them) ->
  `sensitivity.csv` / `.png`, then the fewest MACs back in float until the budget holds. `recovery.json`
  `path` lists every start tried and its result, `stopped` why it stopped. A smoothed choice keeps its
  weights in `torch/` (the Core ML carry converts those) and its FP32 graph in `float.prep.onnx`.
- smoothquant: alpha searched (ranges from calibration images, simulated W8A8 SQNR on held-out images);
  the smoothed torch model is exported, calibrated (min/max) and quantized; `torch/` keeps its weights.
- search: per-tensor calibration method -> `calibration.json` (the table) and
  `calibration_search.csv` (every candidate's range and layer-output error on held-out images).
- qat: fine-tune with fake quant on the training split, the epoch kept whose simulated W8A8 outputs are
  closest to FP32 on held-out images; export, quantize with the learned ranges; `torch/` keeps the weights.
Every one writes `recovery.json` with what it decided and why.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from vitq.tasks import parallel
from vitq.tasks._io import PARTIAL_MARK, read_json, write_json
from vitq.tasks.targets.onnx import backend as onnx_backend
from vitq.tasks.recovery import calib_search, layers as layer_map, shared
from vitq.tasks.recovery.layers import Layer
from vitq.config import Params
from vitq.errors import VitqError
from vitq.recipes import Recipe

log = logging.getLogger("vitq.recovery")

HOLDOUT = "holdout"  # the data stage's split the searches judge on (tasks/data.py)
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
    search_dir: Path | None = None  # the search stage's result (tasks/recovery/shared.py); None: made in scratch
    smoothquant_dir: Path | None = None  # the smoothquant stage's result


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
    from vitq.tasks.model import load_model_spec

    outputs = load_model_spec(inputs.model_dir).output_names
    if len(outputs) > 1:  # sensitivity, smoothing, range search and QAT steer on one output tensor
        raise VitqError(f"recipe {recipe.name!r} steers its recovery by one output, and the model has "
                        f"{len(outputs)} ({', '.join(outputs)}); use the post-training onnx-* recipes for it")
    torch.set_num_threads(parallel.session_threads() or inputs.params.model.train.threads)  # beside others: its share
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
    from vitq.tasks.data import load_split, model_inputs
    from vitq.tasks.model import load_model_spec

    spec = load_model_spec(inputs.model_dir)
    split = load_split(inputs.data_dir, name)
    idx = _index(inputs, len(split.labels), limit)
    labels = split.labels[idx] if spec.num_classes == len(spec.classes) else None
    return model_inputs(split.images[idx], spec.mean, spec.std), labels


def _judged(inputs: Inputs, name: str, limit: int | None = None):
    """Model inputs of a split (the same seeded subset as `_split`) and the task's Judge with its ground truth."""
    from vitq.tasks.data import load_split
    from vitq.tasks.validate import validation_judge

    n = len(load_split(inputs.data_dir, name).labels)
    return validation_judge(inputs.model_dir, inputs.data_dir, inputs.params.task, name, _index(inputs, n, limit))


def judging_split(inputs: Inputs) -> str:
    """The split the searches judge on: the held-out images, or (data without any: `data.holdout_size` 0, or
    too few validation images to hold a third out) the validation images themselves, with a warning."""
    from vitq.tasks.data import load_split
    from vitq.errors import DataError

    try:
        if len(load_split(inputs.data_dir, HOLDOUT).labels):
            return HOLDOUT
    except DataError:  # a data folder written before the holdout split existed
        pass
    log.warning("recovery: the data has no held-out images (data.holdout_size, at most a third of the validation "
                "images): the searches judge on the validation images validate reports on")
    return "validation"


def recovery_budget(inputs: Inputs):
    """recovery's budget for the task (tasks/task_kinds.py), warning where it is looser than validate's."""
    from vitq.tasks.recovery.mixed_precision import Budget

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
    """Linear/Conv layers that name a Linear/Conv module `model`'s forward calls (what the torch-side methods act
    on: they hook the module's input; see `simulate.quantizable_modules`)."""
    from vitq.tasks.recovery.simulate import quantizable_modules

    called = set(quantizable_modules(model))
    return [layer for layer in layers if layer.weighted and layer.name in called]


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
    from vitq.tasks.export import export_onnx

    export_dir = scratch / "export"
    export_onnx(torch_dir, inputs.data_dir, inputs.params.export, export_dir)
    prep = export_dir / "model.prep.onnx"
    return prep, layer_map.quantizable_layers(export_dir / "model.onnx", prep)


def metrics_record(m) -> dict:
    """The metrics that steer a recovery (JSON-ready: an infinite SQNR, identical outputs, as null)."""
    keys = ("top1", "top1_drop", "agreement", "sqnr_db", "mask_iou", "miou_drop")
    out = {k: getattr(m, k) for k in keys if getattr(m, k) is not None}
    if not math.isfinite(out["sqnr_db"]):
        out["sqnr_db"] = None
    return out


def _sqnr_key(m) -> float:
    return m.sqnr_db if math.isfinite(m.sqnr_db) else 1e9


class _Reference:
    """FP32 ONNX Runtime outputs (the export's model.onnx, the one validate compares with) on judging images."""

    def __init__(self, inputs: Inputs, split: str, limit: int | None):
        self.split = split
        self.x, self.judge = _judged(inputs, split, limit)
        self.batch_size = inputs.params.validate_.batch_size
        self.ref = onnx_backend.run_batched(onnx_backend.session(inputs.export_dir / "model.onnx"), self.x, self.batch_size)
        self.reference = self.judge.evaluate(self.ref, self.ref, None)  # FP32's own top-1 / mIoU on these images

    def evaluate(self, onnx_path: Path):
        out = onnx_backend.run_batched(onnx_backend.session(onnx_path), self.x, self.batch_size)
        return self.judge.evaluate(self.ref, out, self.reference)


class _OrtJudge:
    """Builds a Q/DQ candidate with some layers excluded and measures it in ONNX Runtime against FP32,
    with the task's metrics (tasks/task_kinds.py)."""

    def __init__(self, recipe: Recipe, prep: Path, layers: list[Layer], table: Path, scratch: Path, ref: _Reference):
        self.recipe, self.prep, self.layers, self.table, self.scratch, self.ref = recipe, prep, layers, table, scratch, ref
        self.builds = 0

    def __call__(self, float_layers) -> object:
        self.builds += 1
        path = self.scratch / f"candidate-{id(self)}-{self.builds}.onnx"
        onnx_backend.quantize(self.recipe, self.prep, path, self.table, layer_map.nodes_of(self.layers, float_layers))
        m = self.ref.evaluate(path)
        path.unlink()
        return m


def both_numbers(recipe: Recipe, inputs: Inputs, variant_onnx: Path, held: _Reference | None = None) -> dict:
    """The final variant's metrics on the images its search judged (`held_out`) and on the validation images
    `validate` reports on (`validation`), with the split and image count of each."""
    held = held or _Reference(inputs, judging_split(inputs), inputs.params.recovery.search_images)
    reported = _Reference(inputs, "validation", None)
    out = {}
    for key, r in (("held_out", held), ("validation", reported)):
        out[key] = {"split": r.split, "images": len(r.x), **metrics_record(r.evaluate(variant_onnx))}
    return out


def _search_ranges(model: torch.nn.Module, prep: Path, layers: list[Layer], base_table: Path | None, inputs: Inputs,
                   x_judge: np.ndarray, table_out: Path, csv_out: Path | None = None, exported: bool = False) -> dict:
    """The per-tensor range search on the graph `prep` (candidates from the calibration images, each judged by
    the error of the layer output it feeds on `x_judge`); writes the table (tensors no judged layer reads keep
    `base_table`'s range) and returns what it chose. `exported`: `prep` is the export stage's graph, whose
    calibration histograms the calibrate stage kept."""
    from vitq.tasks.calibrate import HISTOGRAMS

    rc = inputs.params.recovery
    x_cal, _ = _split(inputs, "calibration")
    reading = torch_layers(layers, model)
    ranges = calib_search.candidate_ranges(prep, x_cal, inputs.params.calibration, rc.search_percentiles,
                                           {layer.input for layer in reading},
                                           saved=inputs.calibration_dir / HISTOGRAMS if exported else None)
    choices = calib_search.search_calibration(model, {layer.name: layer.input for layer in reading}, ranges, x_judge)
    amax = calib_search.read_amax(base_table) if base_table is not None and base_table.is_file() else {}
    amax.update({c.tensor: c.amax[c.chosen] for c in choices})
    calib_search.write_table(table_out, amax)
    if csv_out is not None:
        calib_search.write_choices(choices, csv_out)
    counts: dict[str, int] = {}
    for c in choices:
        counts[c.chosen] = counts.get(c.chosen, 0) + 1
    return {"chosen": {c.tensor: c.chosen for c in choices}, "chosen_counts": counts,
            "candidates": sorted({m for c in choices for m in c.amax}), "judged_on_images": len(x_judge)}


def _smoothed(inputs: Inputs, model: torch.nn.Module, x_judge: np.ndarray, torch_dir: Path, scratch: Path,
              attention: bool | None = None):
    """SmoothQuant with its alpha search (ranges from the calibration images, judged on `x_judge`), the smoothed
    weights saved in `torch_dir`, exported and min/max-calibrated (`attention`: the attention products' inputs
    too; default: when a configured recipe quantizes them): (model, prep, layers, table, result)."""
    from vitq.tasks.calibrate import calibrate, table_path
    from vitq.tasks.recovery.smoothquant import search_alpha

    x_cal, _ = _split(inputs, "calibration")
    smoothed, sq = search_alpha(model, x_cal, inputs.params.recovery.smoothquant_alphas, x_judge=x_judge)
    _save_torch(smoothed, inputs, torch_dir, {"smoothquant_alpha": sq.alpha})
    prep, layers = _export_and_prepare(torch_dir, inputs, scratch)
    cfg = inputs.params.calibration.model_copy(update={"methods": ("minmax",)})
    calibrate(prep, torch_dir, inputs.data_dir, cfg, scratch / "calibration",
              attention=inputs.params.quantize.calibrates_attention if attention is None else attention)
    return smoothed, prep, layers, table_path(scratch / "calibration", "minmax"), sq


def _sq_details(sq) -> dict:
    return {"alpha": sq.alpha, "pairs": [list(p) for p in sq.pairs], "simulated_sqnr_db_by_alpha": sq.sqnr_db_by_alpha,
            "simulated_sqnr_db_unsmoothed": sq.unsmoothed_sqnr_db}


# --- the shared results' stages (tasks/recovery/shared.py says what they are) -----------------------


def make_search(inputs, needs_file: Path, folder: Path) -> dict:
    """Stage `search`: the per-tensor range search on the export's graph, into `folder` (replaced whole)."""
    from vitq.tasks._io import atomic_dir
    from vitq.tasks.calibrate import table_path
    from vitq.tasks.model import load_model

    if not read_json(needs_file)["needed"]:
        shared.not_needed(folder, "search")
        return {"needed": False}
    refused = shared.cannot_steer(inputs, folder, "search")
    if refused:
        return refused
    prep = inputs.export_dir / "model.prep.onnx"
    layers = layer_map.quantizable_layers(inputs.export_dir / "model.onnx", prep)
    split = judging_split(inputs)
    x, _ = _split(inputs, split, inputs.params.recovery.search_calibration_images)
    model, _ = load_model(inputs.model_dir)
    with atomic_dir(folder) as tmp:
        # tensors no layer reads (attention inputs) keep the min/max range
        found = _search_ranges(model, prep, layers, table_path(inputs.calibration_dir, "minmax"), inputs, x,
                               tmp / "calibration.json", tmp / "calibration_search.csv", exported=True)
        record = {"needed": True, **found, "judged_split": split}
        write_json(tmp / "search.json", record)
    log.info("search: %s", ", ".join(f"{m} x{n}" for m, n in sorted(found["chosen_counts"].items())))
    return record


def make_smoothquant(inputs, needs_file: Path, folder: Path) -> dict:
    """Stage `smoothquant`: alpha searched, the smoothed weights exported and min/max-calibrated, into `folder`."""
    from vitq.tasks._io import atomic_dir
    from vitq.tasks.model import load_model
    from vitq.tasks.recovery.smoothquant import smoothing_pairs

    need = read_json(needs_file)
    if not need["needed"]:
        shared.not_needed(folder, "smoothquant")
        return {"needed": False}
    refused = shared.cannot_steer(inputs, folder, "smoothquant")
    if refused:
        return refused
    model, _ = load_model(inputs.model_dir)
    with atomic_dir(folder) as tmp:
        record = {"needed": True, "pairs": [], "skipped": "no LayerNorm -> Linear pair to smooth"}
        if smoothing_pairs(model):
            split = judging_split(inputs)
            x_judge, _ = _split(inputs, split, inputs.params.recovery.search_calibration_images)
            try:
                *_, sq = _smoothed(inputs, model, x_judge, tmp / TORCH_DIR, tmp, need.get("calibrates_attention"))
                record = {"needed": True, **_sq_details(sq), "alpha_split": split, "alpha_images": len(x_judge)}
            except ValueError as exc:  # pairs whose statistics it cannot measure: its readers say why
                record["skipped"] = str(exc)
                log.warning("smoothquant: %s", exc)
        write_json(tmp / "smoothquant.json", record)
    return record


@dataclass
class Search:
    table: Path  # calibration.json
    csv: Path
    record: dict


@dataclass
class Smoothed:
    model: object  # the smoothed torch model
    prep: Path
    layers: list
    table: Path  # min/max of the smoothed graph
    torch_dir: Path
    record: dict


def _stage_or_scratch(name: str, folder: Path | None, scratch: Path, need: dict, make) -> tuple[Path, dict]:
    """(folder, record) of shared result `name`: its stage's, or (none here: outside a pipeline) made by
    `make(needs_file, folder)` in `scratch`."""
    rec = shared.stage_record(folder, name)
    if rec is not None:
        return folder, rec
    log.info("%s: no %s stage output here: made in this recipe's scratch folder", name, name)
    folder, needs_file = scratch / f"shared-{name}", scratch / f"needs-{name}.json"
    write_json(needs_file, need)
    return folder, make(needs_file, folder)


def load_search(inputs, scratch: Path) -> Search:
    """The search stage's result, or (no stage output: outside a pipeline) the same search made in `scratch`."""
    folder, rec = _stage_or_scratch("search", inputs.search_dir, scratch, {"needed": True},
                                    lambda n, f: make_search(inputs, n, f))
    return Search(folder / "calibration.json", folder / "calibration_search.csv", rec)


def load_smoothquant(inputs, scratch: Path) -> Smoothed | None:
    """The smoothquant stage's result (None: the model has no pair to smooth), or made in `scratch` outside a
    pipeline."""
    from vitq.tasks.calibrate import table_path
    from vitq.tasks.model import load_model

    need = {"needed": True, "calibrates_attention": bool(inputs.params.quantize.calibrates_attention)}
    folder, rec = _stage_or_scratch("smoothquant", inputs.smoothquant_dir, scratch, need,
                                    lambda n, f: make_smoothquant(inputs, n, f))
    if not rec.get("pairs"):
        return None
    model, _ = load_model(folder / TORCH_DIR)
    prep = folder / "export" / "model.prep.onnx"
    layers = layer_map.quantizable_layers(folder / "export" / "model.onnx", prep)
    return Smoothed(model, prep, layers, table_path(folder / "calibration", "minmax"), folder / TORCH_DIR, rec)


# --- recipes --------------------------------------------------------------------------------


@dataclass
class _Start:
    """A full-INT8 starting point of the auto recipe: a graph, its layers, its ranges, its torch weights."""

    name: str
    prep: Path
    layers: list[Layer]
    table: Path
    model: torch.nn.Module
    torch_dir: Path | None = None  # smoothed weights (None: the original model's)
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Composition:
    """What the auto recipe decided: the start, its float layers, whether the budget holds, and the path."""

    start: str
    float_layers: list[str]
    met: bool
    path: list[dict]  # every start in full INT8, then the fallback (if any): metrics, INT8 MAC share, met, reasons
    stopped: str  # why it stopped where it did
    details: dict = field(default_factory=dict)  # the fallback's builds


def compose(starts: list[str], full_int8, budget, fallback, int8_share, choice: str = "first") -> Composition:
    """The auto recipe's decision. Starts are judged in full INT8 in order (`full_int8(name)` -> OutputMetrics,
    cheapest first: a start is only built when judged). `choice` "first" (recovery.auto_choice): the first
    within `budget` wins and the later starts are never built; "best_sqnr": every start is judged and the best
    SQNR within budget wins. Only when none is within budget does `fallback(name)` (-> MixedPrecisionResult:
    layers back in float, fewest MACs) run, once, from the start with the best SQNR. `int8_share(name,
    float_layers)`: the INT8 share of Linear/Conv MACs."""
    path, results = [], {}
    for i, name in enumerate(starts):
        m = full_int8(name)
        reasons = budget.reasons(m)
        results[name] = m
        path.append({"start": name, "float_layers": [], "int8_mac_fraction": int8_share(name, []),
                     **metrics_record(m), "met": not reasons, "reasons": reasons})
        log.info("auto: start %s in full INT8: %s", name, "meets the budget" if not reasons else "; ".join(reasons))
        if not reasons and choice == "first":
            for rest in starts[i + 1:]:
                path.append({"start": rest, "skipped": f"not tried: {name} meets the budget in full INT8 "
                                                       "(recovery.auto_choice: first)"})
            stopped = (f"{name} meets the budget in full INT8 ({m.sqnr_db:.1f} dB), the first of "
                       f"{', '.join(starts)} to do: no later start tried, no layer needs float")
            log.info("auto: %s", stopped)
            return Composition(name, [], True, path, stopped)
    tried = list(results)
    within = [n for n in tried if not budget.reasons(results[n])]
    best = max(within or tried, key=lambda n: _sqnr_key(results[n]))  # ties: the earlier (cheaper) start
    if within:
        return Composition(best, [], True, path, f"{best} meets the budget in full INT8 with the best SQNR "
                           f"({results[best].sqnr_db:.1f} dB) of the {len(within)} start(s) that do "
                           "(recovery.auto_choice: best_sqnr): no layer needs float")
    mp = fallback(best)
    share = int8_share(best, mp.float_layers)
    path.append({"start": best, "float_layers": list(mp.float_layers), "int8_mac_fraction": share,
                 **metrics_record(mp.metrics), "met": mp.budget_met, "reasons": budget.reasons(mp.metrics)})
    stopped = (f"no start meets the budget in full INT8; float fallback from {best} (the best SQNR, "
               f"{results[best].sqnr_db:.1f} dB): {len(mp.float_layers)} layer(s) float, {100 * share:.1f}% INT8 MACs, "
               + ("budget met" if mp.budget_met else "budget not met even with every ranked layer float"))
    log.info("auto: %s", stopped)
    return Composition(best, list(mp.float_layers), mp.budget_met, path, stopped,
                       {"evaluations": mp.evaluations, "fallback_seconds": mp.seconds})


def _auto(recipe: Recipe, inputs: Inputs, out: Path, scratch: Path) -> Decision:
    from vitq.tasks.calibrate import table_path
    from vitq.tasks.model import load_model
    from vitq.tasks.recovery.mixed_precision import search_float_layers
    from vitq.tasks.recovery.sensitivity import attention_sensitivity, layer_sensitivity, rank, write_sensitivity
    from vitq.tasks.recovery.smoothquant import smoothing_pairs

    rc = inputs.params.recovery
    split = judging_split(inputs)
    held = _Reference(inputs, split, rc.search_images)
    budget = recovery_budget(inputs)
    model, _ = load_model(inputs.model_dir)
    prep0 = inputs.export_dir / "model.prep.onnx"
    layers0 = layer_map.quantizable_layers(inputs.export_dir / "model.onnx", prep0)
    x_judge, _ = _split(inputs, split, rc.search_calibration_images)  # the range and alpha searches' images

    # The cheap fixes, cheapest first, each built only when `compose` judges it (in full INT8 on the held-out
    # images); it stops at the first within budget (recovery.auto_choice: first) or falls back if it must.
    path: list[dict] = []
    # search and smoothquant are the shared stages' results (tasks/recovery/shared.py: made once, read here and by
    # onnx-w8a8-search / -smoothquant); smoothquant+search is auto's own, searched on the smoothed graph.
    names = ["plain", "search"]
    sq_record = shared.stage_record(inputs.smoothquant_dir, "smoothquant")  # None: no stage output (made here)
    no_pairs = (sq_record.get("skipped") if sq_record is not None and not sq_record.get("pairs") else
                None if sq_record is not None or smoothing_pairs(model) else "no LayerNorm -> Linear pair to smooth")
    if no_pairs:
        path.append({"start": "smoothquant", "skipped": no_pairs})
    else:
        names += ["smoothquant", "smoothquant+search"]
    by_name: dict[str, _Start] = {}
    judges: dict[str, _OrtJudge] = {}
    smoothed_parts: dict = {}

    def smoothed():
        if not smoothed_parts:
            smoothed_parts["v"] = load_smoothquant(inputs, scratch)
        return smoothed_parts["v"]

    def build(name: str) -> _Start:
        if name == "plain":
            table = table_path(inputs.calibration_dir, *recipe.table())
            return _Start("plain", prep0, layers0, table, model, details={"table": table.name})
        if name == "search":
            found = load_search(inputs, scratch)
            return _Start("search", prep0, layers0, found.table, model,
                          details={"chosen_counts": found.record["chosen_counts"]})
        sm = smoothed()
        if sm is None:
            raise VitqError(f"{recipe.name}: SmoothQuant could not smooth this model")
        if name == "smoothquant":
            return _Start("smoothquant", sm.prep, sm.layers, sm.table, sm.model, sm.torch_dir,
                          {"alpha": sm.record["alpha"], "table": "minmax of the smoothed model"})
        found_s = _search_ranges(sm.model, sm.prep, sm.layers, sm.table, inputs, x_judge,
                                 scratch / "smoothquant-search.json")
        return _Start("smoothquant+search", sm.prep, sm.layers, scratch / "smoothquant-search.json", sm.model,
                      sm.torch_dir, {"alpha": sm.record["alpha"], "chosen_counts": found_s["chosen_counts"]})

    def full_int8(name: str):
        by_name[name] = s = build(name)
        judges[name] = _OrtJudge(recipe, s.prep, s.layers, s.table, scratch, held)
        return judges[name](())

    xs, ls = _split(inputs, split, min(rc.sensitivity_images, rc.search_images))
    ranked: dict[str, list] = {}

    def sensitivity(name: str) -> list:
        """Sensitivity rows of a start (the Linear/Conv layers in torch; the attention products, where the recipe
        quantizes them, in ONNX Runtime), most sensitive first."""
        if name not in ranked:
            s = by_name[name]
            macs = {layer.name: layer.macs for layer in s.layers}
            rows = layer_sensitivity(s.model, _layer_amax(s.layers, s.model, s.table), macs, xs, ls)
            if recipe.quantize_attention:  # the attention products are quantized: they can go back to float too
                rows += attention_sensitivity([layer.name for layer in s.layers if not layer.weighted],
                                              [layer.name for layer in s.layers], macs, judges[name])
            ranked[name] = rank(rows)
        return ranked[name]

    def fallback(name: str):
        s = by_name[name]
        return search_float_layers([r.layer for r in sensitivity(name)], judges[name], budget,
                                   {layer.name: layer.macs for layer in s.layers})

    comp = compose(names, full_int8, budget, fallback,
                   lambda name, fl: layer_map.int8_mac_fraction(by_name[name].layers, fl), rc.auto_choice)
    chosen, float_set = by_name[comp.start], comp.float_layers
    for entry in comp.path:  # what each start tried is (its table, alpha, chosen ranges)
        if not entry.get("float_layers") and entry["start"] in by_name:
            entry.update(by_name[entry["start"]].details)
    path += comp.path
    ranking: dict = {"ranking": None, "ranking_note": f"not ranked: {chosen.name} meets the budget in full INT8 "
                     "(recovery.rank_layers: when_needed)"}
    if chosen.name in ranked or rc.rank_layers == "always":  # what a fallback from the chosen start ranks
        rows = sensitivity(chosen.name)
        write_sensitivity(rows, out / "sensitivity.csv", out / "sensitivity.png", f"{recipe.name} ({chosen.name})")
        ranking = {"ranking": [r.layer for r in rows]}

    # The variant: the chosen start's graph, ranges and float layers.
    calib_search.write_table(out / "calibration.json", calib_search.read_amax(chosen.table))
    prep = chosen.prep
    if chosen.torch_dir is not None:  # smoothed: the Core ML carry converts these weights
        shutil.copytree(chosen.torch_dir, out / TORCH_DIR)
        shutil.copyfile(chosen.prep, out / FLOAT_REFERENCE)
        prep = out / FLOAT_REFERENCE
    onnx_backend.quantize(recipe, prep, out / "model.onnx", out / "calibration.json",
                          layer_map.nodes_of(chosen.layers, float_set))
    return Decision(chosen.layers, prep, {
        "budget": asdict(budget), "budget_met": comp.met, "start": chosen.name, "stopped": comp.stopped, "path": path,
        "float_layers": float_set, **ranking, **comp.details,
        "search_split": split, "search_images": len(held.x), "sensitivity_images": len(xs),
        **both_numbers(recipe, inputs, out / "model.onnx", held),
    })


def _smoothquant(recipe: Recipe, inputs: Inputs, out: Path, scratch: Path) -> Decision:
    sm = load_smoothquant(inputs, scratch)
    if sm is None:
        why = (shared.stage_record(inputs.smoothquant_dir, "smoothquant") or {}).get("skipped", "nothing to smooth")
        raise VitqError(f"recipe {recipe.name!r}: SmoothQuant cannot smooth this model ({why}); "
                        "use onnx-w8a8-auto or another onnx-* recipe for it")
    onnx_backend.quantize(recipe, sm.prep, out / "model.onnx", sm.table)
    shutil.copytree(sm.torch_dir, out / TORCH_DIR)  # the Core ML carry converts these weights
    shutil.copyfile(sm.prep, out / FLOAT_REFERENCE)
    details = {k: v for k, v in sm.record.items() if k != "needed"}
    return Decision(sm.layers, out / FLOAT_REFERENCE, {
        **details, "calibration": "minmax of the smoothed model", "float_layers": [],
        **both_numbers(recipe, inputs, out / "model.onnx"),
    })


def _search(recipe: Recipe, inputs: Inputs, out: Path, scratch: Path) -> Decision:
    prep = inputs.export_dir / "model.prep.onnx"
    layers = layer_map.quantizable_layers(inputs.export_dir / "model.onnx", prep)
    found = load_search(inputs, scratch)  # the search stage's table (made once, auto reads it too)
    shutil.copyfile(found.table, out / "calibration.json")
    shutil.copyfile(found.csv, out / "calibration_search.csv")
    onnx_backend.quantize(recipe, prep, out / "model.onnx", out / "calibration.json")
    details = {k: v for k, v in found.record.items() if k != "needed"}
    return Decision(layers, prep, {**details, "float_layers": [], **both_numbers(recipe, inputs, out / "model.onnx")})


def _qat(recipe: Recipe, inputs: Inputs, out: Path, scratch: Path) -> Decision:
    from vitq.tasks.calibrate import table_path
    from vitq.tasks.model import load_model, predict
    from vitq.tasks.recovery.qat import QatSettings, finetune
    from vitq.tasks.recovery.simulate import input_amax
    from vitq.tasks.recovery.smoothquant import search_alpha, smoothing_pairs

    prep0 = inputs.export_dir / "model.prep.onnx"
    layers0 = layer_map.quantizable_layers(inputs.export_dir / "model.onnx", prep0)
    table = table_path(inputs.calibration_dir, *recipe.table())  # a percentile override: its own table
    model, _ = load_model(inputs.model_dir)
    p, rc = inputs.params, inputs.params.recovery
    split = judging_split(inputs)
    x_judge, _ = _split(inputs, split, rc.search_images)
    start_amax, init = _layer_amax(layers0, model, table), {"init": "fp32"}
    if rc.qat_init == "smoothquant" and smoothing_pairs(model):
        # Fine-tune what SmoothQuant leaves: outliers too large for gradient steps to undo are gone first.
        x_cal, _ = _split(inputs, "calibration")
        model, sq = search_alpha(model, x_cal, rc.smoothquant_alphas, x_judge=x_judge[: rc.search_calibration_images])
        start_amax = input_amax(model, list(start_amax), x_cal)
        init = {"init": "smoothquant", "smoothquant_alpha": sq.alpha}
    x, y = _split(inputs, "train")
    if p.task.kind != "classification" or y is None:
        # No class labels to fine-tune on (dense outputs, or data without labels): distil the FP32 model's outputs.
        y = predict(load_model(inputs.model_dir)[0], x) if len(x) else np.zeros((0,), np.float32)
        init = {**init, "loss": "mse to the FP32 model's outputs (distillation)"}
    cfg = QatSettings(epochs=rc.qat_epochs, lr=rc.qat_lr, batch_size=rc.qat_batch_size,
                      label_smoothing=p.model.train.label_smoothing, seed=p.seed, threads=p.model.train.threads)
    from vitq.tasks.validate import compare_outputs

    fp32_judge = predict(load_model(inputs.model_dir)[0], x_judge)  # stopping: simulated W8A8 outputs vs FP32's
    tuned, qr = finetune(model, start_amax, x, y, cfg,
                         score=lambda m: _sqnr_key(compare_outputs(fp32_judge, predict(m, x_judge), None, None)))
    _save_torch(tuned, inputs, out / TORCH_DIR, {**init, "qat_epochs": qr.epochs, "qat_final_loss": qr.final_loss})
    prep, layers = _export_and_prepare(out / TORCH_DIR, inputs, scratch)
    amax = calib_search.read_amax(table)  # tensors outside the fine-tune keep the calibration range
    amax.update({layer.input: qr.act_amax[layer.name] for layer in torch_layers(layers, tuned) if layer.name in qr.act_amax})
    calib_search.write_table(out / "calibration.json", amax)
    onnx_backend.quantize(recipe, prep, out / "model.onnx", out / "calibration.json")
    shutil.copyfile(prep, out / FLOAT_REFERENCE)
    return Decision(layers, out / FLOAT_REFERENCE, {
        **init, "epochs": qr.epochs, "kept_epoch": qr.kept_epoch, "simulated_sqnr_db_by_epoch": qr.score_by_epoch,
        "stopping_split": split, "stopping_images": len(x_judge), "lr": rc.qat_lr, "final_loss": qr.final_loss,
        "train_images": len(y), "seconds": qr.seconds, "learned_act_amax": qr.act_amax, "float_layers": [],
        **both_numbers(recipe, inputs, out / "model.onnx"),
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
