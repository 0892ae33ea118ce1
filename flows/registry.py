"""MLflow Model Registry: the best passing variant per target, under an alias named for the target.

One registered model per experiment (the model name); aliases `@onnx`, `@coreml`, `@tensorrt`.
A version carries the variant's metrics, recipe, data digest and params hash as tags. Before an
alias moves, the candidate is compared with the version holding it: only a strictly better
variant (smaller top-1 drop, then smaller size, then lower latency) takes it, so a worse run never
steals the alias, and rerunning the same run changes nothing.
"""

from __future__ import annotations

import json
import logging
import math

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from vitq.tasks.task_kinds import accuracy_loss_pts

log = logging.getLogger("vitq.flow")

# Tags on a registered version, compared when a candidate challenges the alias holder.
RANK_TAGS = ("top1_drop", "size_mb", "latency_ms_p50")


def rank(metrics: dict) -> tuple[float, float, float]:
    """Smaller is better: the accuracy lost in points (vitq.tasks.task_kinds.accuracy_loss_pts), size, latency."""
    drop = accuracy_loss_pts(metrics)
    size, latency = metrics.get("size_mb"), metrics.get("latency_ms_p50")
    return (
        float(drop) if drop is not None else math.inf,
        float(size) if size is not None else math.inf,
        float(latency) if latency is not None else math.inf,
    )


def _quality(v: dict) -> str:
    if v.get("mask_iou") is not None:
        return f"mIoU drop {v.get('miou_drop')} pts, mask IoU vs FP32 {v['mask_iou']:.4f}"
    return f"top-1 drop {v['top1_drop']} pts"


def best_per_target(summary: dict) -> dict[str, dict]:
    """The best passing variant of each target in one summary.json (targets with none passing: absent). A variant
    timed no faster than its target's float baseline in the same run (`faster_than_baseline: false`) never
    takes the alias; one not timed (null) is judged by accuracy and size."""
    best: dict[str, dict] = {}
    for v in summary["variants"]:
        if not v["passed"] or v.get("faster_than_baseline") is False:
            continue
        if v["target"] not in best or rank(v) < rank(best[v["target"]]):
            best[v["target"]] = v
    return best


def _holder(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _holder_metrics(version) -> dict:
    tags = version.tags or {}
    return {k: (float(tags[k]) if tags.get(k) not in (None, "", "None") else None)
            for k in (*RANK_TAGS, "miou_drop", "mask_iou", "agreement")}


def register_best(
    client: MlflowClient,
    model_name: str,
    summary: dict,
    child_runs: dict[str, str],
    extra_tags: dict[str, str],
) -> dict[str, str]:
    """Register each target's best passing variant of this run if it beats the alias holder.

    `child_runs` maps variant name -> its MLflow run id; the version's source is the LoggedModel that run
    output (`models:/<model_id>`; a run logged before variants were LoggedModels: its `model/` artifacts).
    Returns target -> decision, one line each, for the log and the parent run.
    """
    decisions = {}
    for target, v in sorted(best_per_target(summary).items()):
        run_id = child_runs.get(v["name"])
        if run_id is None:
            decisions[target] = f"{v['name']} has no MLflow run; not registered"
            continue
        alias = target
        holder = _holder(client, model_name, alias)
        if holder is not None and holder.run_id == run_id:
            decisions[target] = f"@{alias} already is v{holder.version} ({v['name']}, this run)"
            continue
        if holder is not None and not rank(v) < rank(_holder_metrics(holder)):
            decisions[target] = (f"@{alias} kept v{holder.version} ({holder.tags.get('variant')}): "
                                 f"{_fmt(rank(_holder_metrics(holder)))} is not worse than {v['name']} {_fmt(rank(v))}")
            continue
        try:
            client.get_registered_model(model_name)
        except MlflowException:
            client.create_registered_model(model_name, tags={"vitq": "true"},
                                           description="vitq: best passing INT8 variant per target, alias = target")
        tags = {
            **{k: str(v[k]) for k in (*RANK_TAGS, "agreement", "sqnr_db", "int8_weight_fraction", "compression",
                                      "latency_ms_p95", "top1", "miou", "miou_drop", "mask_iou") if v.get(k) is not None},
            "variant": v["name"], "recipe": v["recipe"], "target": target, "data_digest": summary["data"]["digest"],
            **extra_tags,
        }
        model_id = logged_model_of(client, run_id)
        source = f"models:/{model_id}" if model_id else f"runs:/{run_id}/model"
        mv = client.create_model_version(model_name, source=source, run_id=run_id, tags=tags, model_id=model_id,
                                         description=f"{v['name']}: {_quality(v)}, {v['size_mb']:.3f} MB")
        if model_id:
            _link_version(client, model_id, model_name, mv.version)
        client.set_registered_model_alias(model_name, alias, mv.version)
        was = f" (was v{holder.version}, {_fmt(rank(_holder_metrics(holder)))})" if holder is not None else ""
        decisions[target] = f"@{alias} -> v{mv.version} ({v['name']}, {_fmt(rank(v))}){was}"
    for target, line in decisions.items():
        log.info("registry %s: %s", model_name, line)
    return decisions


def logged_model_of(client: MlflowClient, run_id: str) -> str | None:
    """The id of the LoggedModel run `run_id` output (a variant's child run outputs one), or None."""
    outputs = client.get_run(run_id).outputs
    models = outputs.model_outputs if outputs is not None else []
    return max(models, key=lambda m: m.step).model_id if models else None


def _link_version(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Name the registered version on its LoggedModel (the tag `mlflow.register_model` sets: the model page
    and the runs table link to the version through it)."""
    versions = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if {"name": name, "version": str(version)} not in versions:
        versions.append({"name": name, "version": str(version)})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})


def _fmt(r: tuple[float, float, float]) -> str:
    latency = "not measured" if math.isinf(r[2]) else f"{r[2]:.3f} ms"
    return f"drop {r[0]:.2f} pts, {r[1]:.3f} MB, p50 {latency}"
