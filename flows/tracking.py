"""MLflow records: an experiment per model, a parent run per pipeline run, a child run per variant.

Tracking URI from MLFLOW_TRACKING_URI; default: a SQLite file in the workspace (`mlflow ui
--backend-store-uri sqlite:///mlflow.db` shows it), artifacts under `mlartifacts/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

import mlflow

from flows import recorded
from flows.registry import register_best
from tasks.layout import Workspace
from tasks.quantize import load_variant, variant_dir
from tasks.stages import error_report_paths
from tasks.targets import get_target
from vitq.config import Params, params_hash

log = logging.getLogger("vitq.flow")


def configure(ws: Workspace) -> str:
    uri = recorded.tracking_uri(ws.root)
    mlflow.set_tracking_uri(uri)
    return uri


def _experiment_id(name: str, ws: Workspace) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (ws.root / "mlartifacts").as_uri()  # beside the default SQLite store
    return mlflow.create_experiment(name, artifact_location=location)


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "not a git repository"


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = str(v)
    return flat


_VARIANT_METRICS = (
    "size_mb", "compression", "int8_weight_fraction", "top1", "top1_drop", "agreement", "cosine", "sqnr_db",
    "psnr_db", "mask_iou", "miou", "miou_drop", "latency_ms_p50", "latency_ms_p95", "throughput_ips", "speedup",
)


def log_pipeline_run(
    ws: Workspace,
    params: Params,
    summary: dict,
    stage_metrics: dict[str, float],
    ran: list[str],
    run_key: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str | None:
    """Log one pipeline run (parent) and its variants (children), register the best variant per
    target, and return the parent run id.

    `run_key` (the Prefect flow run id) makes this idempotent: a finished parent run with the same
    key is returned as is, a half-logged one (its process died) is deleted and logged again, so a
    retry never duplicates or loses a record. Nothing ran (every stage up to date): nothing is logged, None.
    """
    if not ran and recorded.is_recorded(ws.root, ws.summary_file):
        # Every stage was up to date and MLflow holds this summary (a scheduled run on an unchanged workspace).
        log.info("MLflow: nothing ran and this summary is recorded already: no new run")
        return None
    configure(ws)
    exp_id = _experiment_id(params.experiment_name, ws)
    tags = {
        "git_commit": git_commit(ws.root),
        "data_digest": summary["data"]["digest"],
        "params_hash": params_hash(params),
        "model": summary["model"],
        "stages_run": ",".join(ran) or "none (all up to date)",
        **(extra_tags or {}),
    }
    if run_key:
        tags["vitq.run_key"] = run_key
        done = _existing_parent(exp_id, run_key)
        if done is not None:
            recorded.mark_recorded(ws.root, ws.summary_file, done)
            return done
    child_runs: dict[str, str] = {}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{summary['model']}-pipeline", tags=tags) as parent:
        mlflow.log_params(_flatten(params.model_dump(mode="json", by_alias=True)))
        base = {f"baseline_{k}": v for k, v in summary["baseline"].items() if isinstance(v, (int, float))}
        mlflow.log_metrics({**base, **stage_metrics})
        for f in (ws.summary_file, ws.report_file, ws.params_file, ws.benchmark_file):
            if f.is_file():
                mlflow.log_artifact(str(f), artifact_path="reports")
        # A child per variant MLflow does not hold yet: one already holding the same variant.json and verdict
        # (a variant this run did not remake, or remade identically) is linked from the parent instead.
        kept: dict[str, str] = {}
        for v in summary["variants"]:
            digest = _variant_digest(ws, v["name"])
            holder = _child_holding(exp_id, v["name"], digest)
            if holder is not None:
                child_runs[v["name"]] = kept[v["name"]] = holder
                continue
            with mlflow.start_run(
                experiment_id=exp_id, run_name=v["name"], nested=True,
                tags={**tags, "target": v["target"], "recipe": v["recipe"], "passed": str(v["passed"]),
                      "vitq.variant": v["name"], "vitq.variant_digest": digest},
            ) as child:
                child_runs[v["name"]] = child.info.run_id
                folder = variant_dir(ws.variants_dir, v["name"])
                meta = (folder / "variant.json")
                mlflow.log_params({f"recipe.{k}": str(val) for k, val in _recipe(meta).items()})
                mlflow.log_metrics({k: float(v[k]) for k in _VARIANT_METRICS if v.get(k) is not None})
                mlflow.log_metric("passed", float(v["passed"]))
                record = json.loads(meta.read_text())
                if record.get("int8_mac_fraction") is not None:  # share of Linear/Conv MACs in INT8
                    mlflow.log_metric("int8_mac_fraction", float(record["int8_mac_fraction"]))
                    mlflow.set_tag("float_layers", ",".join(record.get("float_layers", []))[:5000] or "none")
                art = load_variant(ws.variants_dir, v["name"])
                for artifact_path, files in get_target(v["target"]).artifacts(folder, art).items():
                    for f in files:
                        if f.is_file():
                            mlflow.log_artifact(str(f), artifact_path=artifact_path)
                        elif f.is_dir():  # e.g. a Core ML .mlpackage
                            mlflow.log_artifacts(str(f), artifact_path=f"{artifact_path}/{f.name}")
                mlflow.log_artifact(str(meta), artifact_path="model")
                # Recovery recipes: what was decided and why (sensitivity table + plot, calibration choices).
                for f in ("recovery.json", "sensitivity.csv", "sensitivity.png", "calibration_search.csv"):
                    if (folder / f).is_file():
                        mlflow.log_artifact(str(folder / f), artifact_path="recovery")
                for f in (ws.validation_for(v["name"]) / f"{v['name']}.json", *error_report_paths(ws, v["name"])):
                    if f.is_file():
                        mlflow.log_artifact(str(f), artifact_path="reports")
        for nr in summary["not_run"]:
            digest = "not-run:" + hashlib.sha256(nr["reason"].encode()).hexdigest()[:16]
            holder = _child_holding(exp_id, nr["name"], digest)
            if holder is not None:
                kept[nr["name"]] = holder
                continue
            with mlflow.start_run(experiment_id=exp_id, run_name=nr["name"], nested=True,
                                  tags={**tags, "not_run": nr["reason"], "vitq.variant": nr["name"],
                                        "vitq.variant_digest": digest}):
                pass
        # The parent links every variant it did not make to the run that holds it (same artifact, same verdict).
        mlflow.set_tags({f"vitq.kept.{name}": run for name, run in kept.items()})
        mlflow.set_tag("variants_kept", ",".join(sorted(kept)) or "none")
        for png in sorted(ws.plots_dir.glob("tradeoff-*.png")):
            mlflow.log_artifact(str(png), artifact_path="plots")
        version_tags = {"params_hash": tags["params_hash"], "git_commit": tags["git_commit"],
                        "parent_run_id": parent.info.run_id, "workspace": str(ws.root)}
        decisions = register_best(mlflow.MlflowClient(), params.experiment_name, summary, child_runs, version_tags)
        mlflow.set_tags({f"registry.{target}": line[:500] for target, line in decisions.items()})
    recorded.mark_recorded(ws.root, ws.summary_file, parent.info.run_id)
    return parent.info.run_id


def _variant_digest(ws: Workspace, name: str) -> str:
    """What identifies a variant's record: its variant.json and its validation result, byte for byte."""
    h = hashlib.sha256()
    for f in (variant_dir(ws.variants_dir, name) / "variant.json", ws.validation_for(name) / f"{name}.json"):
        h.update(f.read_bytes() if f.is_file() else b"-")
    return h.hexdigest()[:32]


def _child_holding(exp_id: str, name: str, digest: str) -> str | None:
    """The newest finished child run of variant `name` with this digest, or None."""
    found = mlflow.MlflowClient().search_runs(
        [exp_id], filter_string=f"tags.`vitq.variant` = '{name}' and tags.`vitq.variant_digest` = '{digest}' "
                                "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


def _existing_parent(exp_id: str, run_key: str) -> str | None:
    """The finished parent run logged under `run_key`, after deleting any unfinished one."""
    client = mlflow.MlflowClient()
    found = client.search_runs([exp_id], filter_string=f"tags.`vitq.run_key` = '{run_key}'")
    for run in found:
        if "mlflow.parentRunId" not in run.data.tags and run.info.status == "FINISHED":
            return run.info.run_id
    for run in found:  # a half-logged attempt: parent and children share the key
        client.delete_run(run.info.run_id)
    return None


def _recipe(meta: Path) -> dict:
    import json

    return json.loads(meta.read_text())["recipe"]
