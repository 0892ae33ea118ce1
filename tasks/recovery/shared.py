"""Results several recovery recipes read, made once per workspace by stages of their own (issue 32).

- `search` (artifacts/search/): the per-tensor range search on the export's graph: `calibration.json` (the
  table), `calibration_search.csv` (every candidate's range and layer-output error), `search.json` (what it
  chose, on which images). Read by onnx-w8a8-search (its table) and onnx-w8a8-auto (its `search` start).
- `smoothquant` (artifacts/smoothquant/): SmoothQuant with its alpha search: `torch/` (the smoothed weights),
  `export/` (their FP32 ONNX and prep graph), `calibration/minmax.json` (their min/max ranges) and
  `smoothquant.json` (alpha, pairs, simulated SQNR per alpha). Read by onnx-w8a8-smoothquant and
  onnx-w8a8-auto (its `smoothquant` and `smoothquant+search` starts).

Each is a DVC stage (dvc.yaml: `search`, `smoothquant`; made by `make_search` / `make_smoothquant` in
tasks/recovery/variants.py, beside the searches they share code with) reading `artifacts/needs/<name>.json`, written by the
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
from pathlib import Path

from vitq.tasks._io import file_digest, read_json, write_json

log = logging.getLogger("vitq.recovery")

READERS = {"search": ("search", "auto"), "smoothquant": ("smoothquant", "auto")}  # result -> recipe.recovery kinds


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


def not_needed(folder: Path, name: str) -> None:
    from vitq.tasks._io import atomic_dir

    with atomic_dir(folder) as tmp:
        write_json(tmp / f"{name}.json", {"needed": False,
                                         "why": f"no configured recipe reads it ({', '.join(READERS[name])})"})
    log.info("%s: not needed by the configured recipes: nothing made", name)


def cannot_steer(inputs, folder: Path, name: str) -> dict | None:
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


def stage_record(folder: Path | None, name: str) -> dict | None:
    """The record of shared result `name` in its stage's `folder`, when the stage made it (needed); else None."""
    f = folder / f"{name}.json" if folder is not None else None
    if f is None or not f.is_file():
        return None
    rec = read_json(f)
    return rec if rec.get("needed") else None
