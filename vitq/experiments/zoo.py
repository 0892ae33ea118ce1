"""`vitq zoo`: the world's vision transformers through every target form, side by side with ModelOpt and NNCF.

Each model (`MODELS`: timm and torchvision, random weights, the model's default input size) goes through the cells
of `vitq.experiments.zoo_cell` (onnx, tensorrt, coreml, modelopt, nncf), each in its own process with a timeout;
the parent records every cell's status (ok, or the stage and a one-line cause), wall seconds and peak RSS (the
child's rusage from wait4, its waited-for children included). Results:
- `reports/zoo.json`: {"machine", "settings", "models": {name: {"family", "dense", "cells": {cell: {...}}}}, "summary"}
  written after every model (an interrupted sweep keeps what it measured; `--resume` keeps the cells that passed
  and runs the rest: failed ones, and targets not run yet);
- a markdown table (`--markdown`, default docs/zoo.md) with the machine it ran on;
- an MLflow experiment (`vitq-zoo`, the workspace's tracking store) with one run per model, the cells' metrics as
  `<cell>.<metric>`, comparable in the UI.

`--slice ci` is the 3 models CI runs (tests/test_zoo.py); the default is the whole list.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vitq.errors import VitqError
from vitq.experiments.zoo_cell import CELLS

log = logging.getLogger("vitq.zoo")

EXPERIMENT = "vitq-zoo"
DEFAULT_TIMEOUT_S = 1200


@dataclass(frozen=True)
class ZooModel:
    name: str  # timm name, or torchvision:<name>
    family: str
    dense: bool = False  # judged on its feature map (timm forward_features: SAM's image encoder)


MODELS: tuple[ZooModel, ...] = (
    ZooModel("vit_tiny_patch16_224", "ViT"),
    ZooModel("vit_small_patch16_224", "ViT"),
    ZooModel("vit_base_patch16_224", "ViT"),
    ZooModel("vit_large_patch16_224", "ViT"),
    ZooModel("flexivit_small", "FlexiViT"),
    ZooModel("deit_tiny_patch16_224", "DeiT"),
    ZooModel("deit_small_distilled_patch16_224", "DeiT"),
    ZooModel("deit3_small_patch16_224", "DeiT-III"),
    ZooModel("beit_base_patch16_224", "BEiT"),
    ZooModel("eva02_tiny_patch14_224", "EVA-02"),
    ZooModel("vit_small_patch14_dinov2", "DINOv2"),
    ZooModel("vit_small_patch14_reg4_dinov2", "DINOv2 (registers)"),
    ZooModel("swin_tiny_patch4_window7_224", "Swin"),
    ZooModel("swinv2_tiny_window8_256", "SwinV2"),
    ZooModel("maxvit_nano_rw_256", "MaxViT"),
    ZooModel("hiera_tiny_224", "Hiera"),
    ZooModel("twins_svt_small", "Twins"),
    ZooModel("twins_pcpvt_small", "Twins"),
    ZooModel("pvt_v2_b0", "PVTv2"),
    ZooModel("cait_xxs24_224", "CaiT"),
    ZooModel("xcit_nano_12_p16_224", "XCiT"),
    ZooModel("pit_ti_224", "PiT"),
    ZooModel("coat_lite_tiny", "CoaT"),
    ZooModel("convit_tiny", "ConViT"),
    ZooModel("crossvit_tiny_240", "CrossViT"),
    ZooModel("tiny_vit_5m_224", "TinyViT"),
    ZooModel("fastvit_t8", "FastViT"),
    ZooModel("efficientformer_l1", "EfficientFormer"),
    ZooModel("efficientformerv2_s0", "EfficientFormerV2"),
    ZooModel("efficientvit_b0", "EfficientViT (MIT)"),
    ZooModel("efficientvit_m0", "EfficientViT (MSRA)"),
    ZooModel("mobilevit_xxs", "MobileViT"),
    ZooModel("mobilevitv2_050", "MobileViTV2"),
    ZooModel("levit_128s", "LeViT"),
    ZooModel("gcvit_xxtiny", "GCViT"),
    ZooModel("nextvit_small", "NextViT"),
    ZooModel("mvitv2_tiny", "MViTv2"),
    ZooModel("volo_d1_224", "VOLO"),
    ZooModel("samvit_base_patch16", "SAM ViT-B image encoder", dense=True),
    ZooModel("torchvision:vit_b_16", "ViT (torchvision)"),
    ZooModel("torchvision:swin_t", "Swin (torchvision)"),
    ZooModel("torchvision:maxvit_t", "MaxViT (torchvision)"),
)
# Why a model scores low where it does, found by tracing per-tensor errors (tasks/error_report.py) on the zoo's own
# setting; the table prints them beside the numbers.
REASONS = {
    "convit_tiny": "ConViT's gated positional self-attention mixes a peaked positional softmax (max about 0.57) with a "
                   "near-uniform content softmax (about 0.0014 per value): one int8 scale (step 0.0045) rounds the "
                   "content part to zero, and attn @ v falls from 43.6 to 17.0 dB in its blocks. Where attention's "
                   "products stay float (the TensorRT column; `quantize_attention: false`; `onnx-w8a8-auto`) it "
                   "keeps about 31 dB. Its pos_proj MatMuls read a constant position table and stay float (their "
                   "one range of 338 left dx, dy five int8 levels: 3.5 dB in block 1 before).",
    "nextvit_small": "Core ML: timm initialises NextViT's convs and linears with std 0.02 whatever their width and its "
                     "BatchNorms do not rescale in eval mode, so these random-weight activations shrink to |x| 1e-4 "
                     "to 1e-5 from stage 1 on: below 127 x 2^-17 (the scale floor that keeps Core ML's FP16 scales "
                     "normal), 105 of its 121 activation quantizers hold 0.1-4 rms steps (7.4 dB; floors 2^-20 / "
                     "2^-24 would give 25 / 32 dB, with FP16-subnormal scales Core ML would not run as judged). An "
                     "artefact of random weights: trained NextViT has activations of order 1.",
    "mobilevitv2_050": "Core ML: no single op; its 130 int8 quantizers (65 per-channel weights, 65 per-tensor conv "
                       "inputs) each cost 30-59 dB at the logits and together 22 dB (weights) and 24 dB "
                       "(activations), 18 dB combined; the separable attention's token softmax is not quantized "
                       "(mul/sum, no matmul). Keeping the stem and stages 0-1 float (10 of 65 layers) gains 2.4 dB. "
                       "Its ONNX Runtime and TensorRT graphs (17.1 dB) were not traced apart; the same accumulation "
                       "is the likely cause.",
    "beit_base_patch16_224": "Core ML 19.2 dB against 39.2 dB in ONNX Runtime: not investigated yet.",
    "vit_small_patch14_dinov2": "DINOv2's LayerScale starts at 1e-5, so in random weights every block adds about 1e-5 "
                                "of the residual stream: the output is the patch embedding through the final norm, "
                                "which quantizing the blocks barely moves (SQNR near 100 dB is no evidence here).",
    "vit_small_patch14_reg4_dinov2": "As DINOv2 above: LayerScale 1e-5 in random weights, blocks nearly silent.",
    "cait_xxs24_224": "CaiT's LayerScale starts at 1e-5 as DINOv2's: its blocks are nearly silent in random weights, "
                      "so its high SQNRs (ModelOpt's 115 dB keeps the head float) are no evidence.",
}
PEER_NOTES = (
    "(Figures in this note and in REASONS come from one-off per-tensor traces of this session, not from a command "
    "in the repository; the table's own numbers do.) ModelOpt (0.47, its defaults: entropy calibration, Q/DQ on attention's MatMuls, residual Adds and "
    "LayerNormalization inputs, weights stored FP32 behind QuantizeLinear): on timm deit_small_patch16_224 with "
    "these random weights its graph scores 8.2 dB; without Q/DQ on attention (`disable_mha_qdq`) 15.3 dB, and "
    "neither its Add nor its LayerNormalization Q/DQ account for the rest (8.1 / 8.2 dB without them): the ranges "
    "of its entropy and max calibration on the outlier channels do. NNCF's TRANSFORMER preset applies "
    "SmoothQuant and leaves some attention MatMuls float."
)
# Small, and each failed somewhere before issue 29's fixes: EfficientViT-M's constant softmax (calibration), LeViT's
# tiny activations (Core ML's scale floor), PVTv2's served-form check.
CI_SLICE = ("efficientvit_m0", "levit_128s", "pvt_v2_b0")


def model_spec(name: str) -> ZooModel:
    for m in MODELS:
        if m.name == name:
            return m
    return ZooModel(name, "other")  # any timm / torchvision name given on the command line


def select_models(models: str | None, slice_: str | None) -> list[ZooModel]:
    """The models a sweep runs: `--models a,b` (any timm or torchvision:<name>), `--slice ci`, or all of MODELS."""
    from vitq.experiments._models import check_model_name

    if models and slice_:
        raise VitqError("give --models or --slice, not both")
    if slice_ is not None:
        if slice_ != "ci":
            raise VitqError(f"--slice {slice_!r} is not known; allowed: ci")
        return [model_spec(n) for n in CI_SLICE]
    if not models:
        return list(MODELS)
    names = [n.strip() for n in models.split(",") if n.strip()]
    for n in names:
        check_model_name(n, torchvision=True)
    return [model_spec(n) for n in names]


def select_cells(cells: str | None) -> list[str]:
    if not cells:
        return list(CELLS)
    chosen = [c.strip() for c in cells.split(",") if c.strip()]
    bad = [c for c in chosen if c not in CELLS]
    if bad:
        raise VitqError(f"unknown --targets {', '.join(bad)}; allowed: {', '.join(CELLS)}")
    if any(c in NEEDS_EXPORT for c in chosen) and "onnx" not in chosen:  # they read its FP32 export and images
        chosen.insert(0, "onnx")
    return [c for c in CELLS if c in chosen]


def run_cell(name: str, cell: str, folder: Path, timeout_s: float, latency_s: float | None = None,
             dense: bool = False) -> dict:
    """One cell in its own process (own process group), killed at `timeout_s`; its record with wall seconds and
    peak RSS (MB) measured from here."""
    result = folder / f"{cell}.json"
    result.unlink(missing_ok=True)
    logfile = folder / f"{cell}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if latency_s is not None:
        env["VITQ_ZOO_LATENCY_S"] = str(latency_s)
    from vitq import interrupt

    start = time.perf_counter()
    with open(logfile, "w") as out, interrupt.stage(f"zoo {name} {cell}"):
        proc = subprocess.Popen([sys.executable, "-m", "vitq.experiments.zoo_cell", name, cell, str(folder), str(result),
                                 *(["--dense"] if dense else [])],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        # Ctrl-C / SIGTERM of the sweep: the cell's process group (ModelOpt's process included) goes with it.
        unregister = interrupt.on_interrupt(lambda: _kill_group(proc.pid))
        timed_out = False
        rusage = None
        try:
            while True:
                pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - start > timeout_s:
                    timed_out = True
                    _kill_group(proc.pid)
                    _, status, rusage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.5)
        finally:
            unregister()
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    peak_mb = rusage.ru_maxrss / 1024 if rusage is not None else None  # Linux: kB
    stage_file = folder / f"{cell}.stage.txt"
    stage = stage_file.read_text().strip() if stage_file.is_file() else "start"
    if timed_out:
        record = {"status": "failed", "stage": stage, "cause": f"timed out after {timeout_s:.0f} s (--timeout)"}
    elif result.is_file():
        record = json.loads(result.read_text())
    else:  # killed (OOM killer: -9) or crashed in native code
        code = proc.returncode
        why = f"killed by signal {-code}" + (" (the OOM killer, or kill -9)" if code == -9 else "") if code < 0 \
            else f"exited with code {code} without a result"
        record = {"status": "failed", "stage": stage, "cause": why}
    record.update(seconds=round(seconds, 1), peak_rss_mb=round(peak_mb) if peak_mb else None)
    return record


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def run_zoo(models: list[ZooModel], cells: list[str], out: Path, timeout_s: float, workdir: Path | None = None,
            resume: bool = False, mlflow_root: Path | None = None, on_cell=None, latency_s: float | None = None) -> dict:
    """Every model through `cells`; each model's cells merged into `out` (JSON) as soon as they ran, under a lock,
    so sweeps of other targets may write the same file at the same time. `workdir`: where the models' folders go
    (default: a temporary folder, removed). `mlflow_root`: one MLflow run per model and results file there."""
    from vitq.tasks.benchmark import machine_info

    machine, settings = machine_info(), _settings(timeout_s, latency_s)
    if not resume:
        _update(out, machine, settings, fresh=True)
    scratch = None if workdir is not None else tempfile.TemporaryDirectory(prefix="vitq-zoo-")
    root = Path(workdir if workdir is not None else scratch.name)
    try:
        for i, m in enumerate(models, 1):
            folder = root / m.name.replace(":", "_")
            exported = (folder / "export" / "model.onnx").is_file()
            known = _read(out).get("models", {}).get(m.name, {}).get("cells", {})
            # --resume: a cell that passed is kept; onnx runs again when a cell to run reads its export and it is gone
            done = {c for c, rec in known.items() if rec.get("status") == "ok"}
            todo = [c for c in cells if c not in done]
            if "onnx" in cells and "onnx" not in todo and not exported and any(c in NEEDS_EXPORT for c in todo):
                todo.insert(0, "onnx")
            if not todo:
                log.info("zoo: %d/%d %s: already measured (--resume)", i, len(models), m.name)
                continue
            folder.mkdir(parents=True, exist_ok=True)
            ran: dict[str, dict] = {}
            for cell in todo:
                # the export, not the whole onnx cell: a model whose static variant fails still has its FP32 ONNX
                exported = (folder / "export" / "model.onnx").is_file() and (folder / "export" / "export.json").is_file()
                if cell in NEEDS_EXPORT and not exported:
                    ran[cell] = {"status": "failed", "stage": "input", "cause": "no FP32 export (the onnx cell failed in export)"}
                else:
                    ran[cell] = run_cell(m.name, cell, folder, timeout_s, latency_s, m.dense)
                if on_cell is not None:
                    on_cell(i, len(models), m.name, cell, ran[cell])
                row = _update(out, machine, settings, model=m, cells={cell: ran[cell]})
            if mlflow_root is not None:
                log_model_run(mlflow_root, m.name, row, machine, out)
        result = _update(out, machine, settings, summary=True)
    finally:
        if scratch is not None:
            scratch.cleanup()
    return result


def table_only(out: Path, mlflow_root: Path | None = None) -> dict:
    """What `out` holds, its summary brought up to date (and every model's MLflow run, with `mlflow_root`)."""
    if not out.is_file():
        raise VitqError(f"{out} does not exist; run `vitq zoo` first (--table-only writes the table from its results)")
    result = _read(out)
    result = _update(out, result.get("machine", {}), result.get("settings", {}), summary=True)
    if mlflow_root is not None:
        for name, row in result["models"].items():
            log_model_run(mlflow_root, name, row, result["machine"], out)
    return result


NEEDS_EXPORT = ("tensorrt", "modelopt", "nncf")  # cells that read the onnx cell's FP32 export


def _read(out: Path) -> dict:
    return json.loads(out.read_text()) if out.is_file() else {}


def _update(out: Path, machine: dict, settings: dict, model: ZooModel | None = None, cells: dict | None = None,
            fresh: bool = False, summary: bool = False):
    """Merge into `out` under an exclusive lock (`<out>.lock`): a model's cells, or the summary. Returns the model's
    merged row (with `model`), else the whole result."""
    from vitq.experiments.zoo_cell import file_lock
    from vitq.tasks._io import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.with_name(out.name + ".lock")):
        result = {} if fresh else _read(out)
        result.setdefault("models", {})
        result["machine"], result["settings"] = machine, {**result.get("settings", {}), **settings}
        if model is not None:
            row = result["models"].setdefault(model.name, {"family": model.family, "dense": model.dense, "cells": {}})
            row["cells"].update(cells or {})
            row["cells"] = {c: row["cells"][c] for c in CELLS if c in row["cells"]}  # the table's order
        if summary or model is not None:
            result["summary"] = summarize(result)
        write_json(out, result)
    return result["models"][model.name] if model is not None else result


def _settings(timeout_s: float, latency_s: float | None = None) -> dict:
    from vitq.experiments import zoo_cell

    return {"static_recipe": zoo_cell.STATIC_RECIPE, "dynamic_recipe": zoo_cell.DYNAMIC_RECIPE,
            "tensorrt_recipe": zoo_cell.TENSORRT_RECIPE, "coreml_recipe": zoo_cell.COREML_RECIPE,
            "calibration_images": zoo_cell.CALIBRATION_IMAGES, "validation_images": zoo_cell.VALIDATION_IMAGES,
            "images": "scikit-learn digits resized to each model's input size, RGB, normalised as the model expects",
            "weights": "random (timm / torchvision init, seed 0; weights initialised to zero drawn instead: "
                       "zoo_cell.redraw_zero_init): nothing can be downloaded here", "timeout_s": timeout_s,
            "latency_seconds": latency_s or zoo_cell.LATENCY_SECONDS,
            "sqnr": "10 log10(sum fp32^2 / sum (fp32 - variant)^2) over every output element, vs the FP32 ONNX "
                    "export in ONNX Runtime"}


def summarize(result: dict) -> dict:
    """Pass rate over model x target cells, SQNR against the peers, quantization time against ModelOpt."""
    models = result["models"]
    cells = [(name, c, rec) for name, row in models.items() for c, rec in row["cells"].items()
             if c in ("onnx", "tensorrt", "coreml")]
    ok = [x for x in cells if x[2].get("status") == "ok"]
    out = {"target_cells": len(cells), "target_cells_ok": len(ok),
           "pass_rate": round(len(ok) / len(cells), 3) if cells else None}
    for peer in ("modelopt", "nncf"):
        pairs = [(row["cells"]["onnx"]["static"]["sqnr_db"], row["cells"][peer]["sqnr_db"],
                  row["cells"]["onnx"]["static"]["quantize_s"], row["cells"][peer]["quantize_s"])
                 for row in models.values()
                 if row["cells"].get("onnx", {}).get("status") == "ok" and row["cells"].get(peer, {}).get("status") == "ok"]
        if pairs:
            out[f"sqnr_at_or_above_{peer}"] = f"{sum(a >= b for a, b, _, _ in pairs)}/{len(pairs)}"
            out[f"quantize_time_at_most_{peer}"] = f"{sum(c <= d for _, _, c, d in pairs)}/{len(pairs)}"
    onnx_s = sum(row["cells"].get("onnx", {}).get("seconds", 0) for row in models.values())
    all_s = sum(rec.get("seconds", 0) for row in models.values() for rec in row["cells"].values())
    out.update(onnx_column_minutes=round(onnx_s / 60, 1), all_cells_minutes=round(all_s / 60, 1))
    return out


def log_model_run(root: Path, name: str, row: dict, machine: dict, out: Path) -> None:
    """One MLflow run per model and results file (`out`) in the `vitq-zoo` experiment, updated by every sweep that
    writes the file: params (family, sizes), metrics `<cell>.<metric>`, tags `<cell>.status` and the cause of a
    failed cell."""
    import mlflow

    from vitq.flows.recorded import tracking_uri

    for noisy in ("mlflow", "alembic"):  # store creation and migration lines: not the sweep's progress
        logging.getLogger(noisy).setLevel(logging.WARNING)

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root))
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(EXPERIMENT)
    results = str(Path(out).resolve())
    found = client.search_runs([exp_id], filter_string=f"tags.`vitq.zoo.model` = '{name}' and "
                                                       f"tags.`vitq.zoo.results` = '{results}'", max_results=1)
    run = found[0] if found else client.create_run(
        exp_id, run_name=name, tags={"vitq.zoo.model": name, "vitq.zoo.results": results, "family": row["family"],
                                     "machine.cpu": str(machine.get("cpu"))})
    onnx_rec = row["cells"].get("onnx", {})
    logged = run.data.params if found else {}
    for key in ("params_m", "exporter", "export_s", "fp32_mb"):
        if key in onnx_rec and key not in logged:  # a param is written once
            client.log_param(run.info.run_id, key, onnx_rec[key])
    for cell, rec in row["cells"].items():
        client.set_tag(run.info.run_id, f"{cell}.status", rec.get("status"))
        if rec.get("status") != "ok":
            client.set_tag(run.info.run_id, f"{cell}.cause", f"{rec.get('stage')}: {rec.get('cause')}"[:5000])
        for key, value in _flat(rec).items():
            client.log_metric(run.info.run_id, f"{cell}.{key}", value)
    client.set_terminated(run.info.run_id)


def _flat(rec: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            out[f"{prefix}{k}"] = float(v)
    return out


# --- the markdown table ------------------------------------------------------------------------------------------

def _f(v, fmt="{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def _cell_text(rec: dict | None) -> str:
    if rec is None:
        return "not run"
    if rec.get("status") != "ok":
        return f"**failed** ({rec.get('stage')})"
    return f"{_f(rec.get('sqnr_db'))} dB"


def _in_list_order(models: dict) -> list[tuple[str, dict]]:
    """The table's rows in MODELS' order (families together), whatever order the sweeps ran them in."""
    order = {m.name: i for i, m in enumerate(MODELS)}
    return sorted(models.items(), key=lambda kv: order.get(kv[0], len(order)))


def markdown(result: dict) -> str:
    m = result["machine"]
    s = result.get("summary") or summarize(result)
    lines = [
        "# The zoo matrix",
        "",
        "Written by `vitq zoo` (vitq/experiments/zoo.py); rerun it to reproduce. Machine: "
        f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('system')}, ONNX Runtime {m.get('onnxruntime')}.",
        f"Settings: {result['settings']['weights']}; {result['settings']['calibration_images']} calibration and "
        f"{result['settings']['validation_images']} validation images ({result['settings']['images']}). "
        f"SQNR: {result['settings']['sqnr']}.",
        "",
        f"Cells passed (ONNX Runtime, TensorRT graphs, Core ML): {s['target_cells_ok']}/{s['target_cells']}"
        + "".join(f"; vitq's SQNR at or above {p}'s: {s[f'sqnr_at_or_above_{p}']}, calibration + quantization "
                  f"time at most {p}'s: {s[f'quantize_time_at_most_{p}']}" for p in ("modelopt", "nncf")
                  if f"sqnr_at_or_above_{p}" in s)
        + f". Minutes: ONNX column {s['onnx_column_minutes']}, all cells {s['all_cells_minutes']}.",
        "",
        "## SQNR vs FP32 per target form and peer",
        "",
        "ONNX: vitq's static W8A8 (`{}`) served by ONNX Runtime; TensorRT: its INT8 Q/DQ graph in ONNX Runtime "
        "(the engine is not built: TensorRT cannot run here); Core ML: W8A8 judged by the torch program it was "
        "converted from (Core ML runs on macOS only); ModelOpt / NNCF: their defaults on the same FP32 ONNX and "
        "images.".format(result["settings"]["static_recipe"]),
        "",
        "| model | family | params M | exporter | ONNX | INT8 MACs | attention INT8 | TensorRT Q/DQ | TRT FP16 graph"
        " | Core ML | ModelOpt | NNCF | peak RSS GB (max cell) | seconds (all cells) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in _in_list_order(result["models"]):
        c = row["cells"]
        onnx_rec = c.get("onnx", {})
        st = onnx_rec.get("static", {}) if onnx_rec.get("status") == "ok" else {}
        trt = c.get("tensorrt", {})
        peaks = [r.get("peak_rss_mb") or 0 for r in c.values()]
        lines.append(" | ".join([
            f"| `{name}`", row["family"], _f(onnx_rec.get("params_m")), onnx_rec.get("exporter", "–"),
            _cell_text({**onnx_rec, "sqnr_db": st.get("sqnr_db")} if onnx_rec else None),
            _f(100 * st["int8_mac_fraction"], "{:.0f}%") if st.get("int8_mac_fraction") is not None else "–",
            f"{st.get('attention_int8')}/{st.get('attention_matmuls')}" if st else "–",
            _cell_text(trt or None),
            _f(trt.get("int8_fp16_sqnr_db")) + " dB" if trt.get("status") == "ok" else "–",
            _cell_text(c.get("coreml")), _cell_text(c.get("modelopt")), _cell_text(c.get("nncf")),
            _f(max(peaks) / 1024, "{:.1f}") if peaks else "–",
            _f(sum(r.get("seconds", 0) for r in c.values()), "{:.0f}"),
        ]) + " |")
    lines += ["", "## ONNX Runtime at batch 1 (2 threads; paired per interleaved round)", "",
              "| model | FP32 ms | dynamic ms | static ms | FP32/static | dynamic/static | FP32 MB | static MB | "
              "export s | vitq calib+quant s | ModelOpt s | NNCF s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in _in_list_order(result["models"]):
        o = row["cells"].get("onnx", {})
        if o.get("status") != "ok":
            continue
        lat = o.get("latency", {})
        peer_s = [row["cells"].get(p, {}).get("quantize_s") if row["cells"].get(p, {}).get("status") == "ok" else None
                  for p in ("modelopt", "nncf")]
        lines.append(f"| `{name}` | {_f(lat.get('fp32_ms'))} | {_f(lat.get('dynamic_ms'))} | {_f(lat.get('static_ms'))} "
                     f"| {_f(lat.get('fp32_over_static'), '{:.2f}')} | {_f(lat.get('dynamic_over_static'), '{:.2f}')} "
                     f"| {_f(o.get('fp32_mb'))} | {_f(o['static'].get('size_mb'))} | {_f(o.get('export_s'))} "
                     f"| {_f(o['static'].get('quantize_s'))} | {_f(peer_s[0])} | {_f(peer_s[1])} |")
    notes = [f"- `{name}`: {why}" for name, why in REASONS.items() if name in result["models"]]
    lines += ["", "## Why some models score low", "", *notes, f"- Peers: {PEER_NOTES}"]
    missing = [m.name for m in MODELS if m.name not in result["models"]]
    if missing:
        lines += ["", f"Not measured in this results file ({len(missing)} of the list; `vitq zoo --resume` runs them): "
                  + ", ".join(f"`{n}`" for n in missing) + "."]
    failures = [(name, cell, rec) for name, row in result["models"].items() for cell, rec in row["cells"].items()
                if rec.get("status") != "ok"]
    lines += ["", "## Failures (model, target, stage: cause)", ""]
    lines += [f"- `{name}` {cell}, {rec.get('stage')}: {rec.get('cause')}" for name, cell, rec in failures] or ["None."]
    placed = []
    for name, row in result["models"].items():
        c = row["cells"]
        tools = (("vitq", c.get("onnx", {}).get("static", {})), ("ModelOpt", c.get("modelopt", {})),
                 ("NNCF", c.get("nncf", {})))
        shown = [f"{tool}: {_placement(rec['placement'])}" for tool, rec in tools if rec.get("placement")]
        if shown:
            placed.append(f"- `{name}`: " + "; ".join(shown))
    if placed:
        lines += ["", "## Where Q/DQ sits (inputs read from DequantizeLinear, by the op reading them)", "", *placed]
    return "\n".join(lines) + "\n"


def _placement(p: dict) -> str:
    by_op = p.get("dq_inputs", {})
    attention = p.get("attention_quantized")
    shown = ", ".join(f"{op} {n}" for op, n in sorted(by_op.items(), key=lambda kv: -kv[1]))
    return f"{shown} (attention {attention})" if attention is not None else shown
