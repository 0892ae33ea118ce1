"""Results several recovery recipes read, made once per workspace by stages of their own (issue 32).

- `search` (artifacts/search/): the per-tensor range search on the export's graph: `calibration.json` (the
  table), `calibration_search.csv` (every candidate's range and layer-output error), `search.json` (what it
  chose, on which images). Read by onnx-w8a8-search (its table) and onnx-w8a8-auto (its `search` start).
- `smoothquant` (artifacts/smoothquant/): SmoothQuant with its alpha search: `torch/` (the smoothed weights),
  `export/` (their FP32 ONNX and prep graph), `calibration/minmax.json` (their min/max ranges) and
  `smoothquant.json` (alpha, pairs, simulated SQNR per alpha). Read by onnx-w8a8-smoothquant and
  onnx-w8a8-auto (its `smoothquant` and `smoothquant+search` starts).

Each is a DVC stage (dvc.yaml: `search`, `smoothquant`) reading `artifacts/needs/<name>.json`, written by the
`needs` stage from the configured recipes: whether any reads it (and, for SmoothQuant, whether its ranges
cover the attention products), so a stage no recipe needs writes only that it was not needed, and a change to
the recipe list reruns it only when that answer changes. A variant's plan file (artifacts/plan/<variant>.json)
holds the digest of each result it reads, so a changed result requantizes exactly its readers. DVC is the one
cache: outside a pipeline (a test's bare folders, the API's own workspace before these stages ran) a recipe
makes what it reads in its scratch folder, and says so in the log.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from vitq.tasks._io import file_digest, read_json, write_json

log = logging.getLogger("vitq.recovery")

READERS = {"search": ("search", "auto"), "smoothquant": ("smoothquant", "auto")}  # result -> recipe.recovery kinds
NAMES = tuple(READERS)


def needs(p) -> dict[str, dict]:
    """artifacts/needs/<name>.json for each shared result: {"needed": bool, ...how it is made}."""
    from vitq.recipes import get_recipe

    kinds = {get_recipe(n).recovery for n in p.quantize.variants}
    out = {name: {"needed": any(k in kinds for k in readers)} for name, readers in READERS.items()}
    if out["smoothquant"]["needed"]:  # the smoothed graph's min/max table covers what the recipes quantize
        out["smoothquant"]["calibrates_attention"] = bool(p.quantize.calibrates_attention)
    return out


def write_needs(p, folder: Path) -> dict[str, dict]:
    from vitq.tasks._io import atomic_dir

    records = needs(p)
    with atomic_dir(folder) as tmp:
        for name, rec in records.items():
            write_json(tmp / f"{name}.json", rec)
    return records


def folder_digest(folder: Path) -> str | None:
    """sha256 over a folder's files (relative paths and contents, in order); None when it does not exist."""
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + file_digest(f).encode())
    return h.hexdigest()


def _not_needed(folder: Path, name: str) -> None:
    from vitq.tasks._io import atomic_dir

    with atomic_dir(folder) as tmp:
        write_json(tmp / f"{name}.json", {"needed": False,
                                         "why": f"no configured recipe reads it ({', '.join(READERS[name])})"})
    log.info("%s: not needed by the configured recipes: nothing made", name)


def _cannot_steer(inputs, folder: Path, name: str) -> dict | None:
    """A model of several outputs: the recovery recipes refuse it (they steer by one output); the stage records
    why it made nothing instead of failing the pipeline."""
    from vitq.tasks._io import atomic_dir
    from vitq.tasks.model import load_model_spec

    outputs = load_model_spec(inputs.model_dir).output_names
    if len(outputs) <= 1:
        return None
    record = {"needed": True, "pairs": [], "skipped": f"the model has {len(outputs)} outputs ({', '.join(outputs)}); "
              "the recovery recipes steer by one"}
    with atomic_dir(folder) as tmp:
        write_json(tmp / f"{name}.json", record)
    log.warning("%s: %s", name, record["skipped"])
    return record


def make_search(inputs, needs_file: Path, folder: Path) -> dict:
    """Stage `search`: the per-tensor range search on the export's graph, into `folder` (replaced whole)."""
    from vitq.tasks._io import atomic_dir
    from vitq.tasks.calibrate import table_path
    from vitq.tasks.model import load_model
    from vitq.tasks.recovery import layers as layer_map
    from vitq.tasks.recovery.variants import _search_ranges, _split, judging_split

    if not read_json(needs_file)["needed"]:
        _not_needed(folder, "search")
        return {"needed": False}
    refused = _cannot_steer(inputs, folder, "search")
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
    from vitq.tasks.recovery.variants import TORCH_DIR, _smoothed, _split, _sq_details, judging_split

    need = read_json(needs_file)
    if not need["needed"]:
        _not_needed(folder, "smoothquant")
        return {"needed": False}
    refused = _cannot_steer(inputs, folder, "smoothquant")
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


def stage_record(folder: Path | None, name: str) -> dict | None:
    """The record of shared result `name` in its stage's `folder`, when the stage made it (needed); else None."""
    f = folder / f"{name}.json" if folder is not None else None
    if f is None or not f.is_file():
        return None
    rec = read_json(f)
    return rec if rec.get("needed") else None


def _stage_or_scratch(name: str, folder: Path | None, scratch: Path, need: dict, make) -> tuple[Path, dict]:
    """(folder, record) of shared result `name`: its stage's, or (none here: outside a pipeline) made by
    `make(needs_file, folder)` in `scratch`."""
    rec = stage_record(folder, name)
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
    from vitq.tasks.recovery import layers as layer_map
    from vitq.tasks.recovery.variants import TORCH_DIR

    need = {"needed": True, "calibrates_attention": bool(inputs.params.quantize.calibrates_attention)}
    folder, rec = _stage_or_scratch("smoothquant", inputs.smoothquant_dir, scratch, need,
                                    lambda n, f: make_smoothquant(inputs, n, f))
    if not rec.get("pairs"):
        return None
    model, _ = load_model(folder / TORCH_DIR)
    prep = folder / "export" / "model.prep.onnx"
    layers = layer_map.quantizable_layers(folder / "export" / "model.onnx", prep)
    return Smoothed(model, prep, layers, table_path(folder / "calibration", "minmax"), folder / TORCH_DIR, rec)
