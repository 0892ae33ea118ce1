"""Which summary MLflow already holds, known without importing MLflow: `reports/.mlflow-record.json`
(git-ignored, beside the DVC outputs) names the tracking URI, the parent run and the digest of the
summary.json it recorded. `vitq run` with every stage up to date and this summary recorded does nothing;
after `dvc repro` changed the summary, the flow records it (children only for variants MLflow lacks)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MARKER = Path("reports") / ".mlflow-record.json"
SUMMARY_TAG = "vitq.summary_sha256"  # on each parent run: the digest of the summary.json it recorded


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI, or the workspace's own SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root) / 'mlflow.db'}"


def summary_digest(summary_file: Path) -> str:
    return hashlib.sha256(Path(summary_file).read_bytes()).hexdigest()


def is_recorded(root: Path, summary_file: Path) -> bool:
    """True when the tracking store in use already holds this summary.json (as far as this workspace knows)."""
    marker = Path(root) / MARKER
    if not marker.is_file() or not Path(summary_file).is_file():
        return False
    try:
        rec = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return False  # the store was deleted
    return rec.get("tracking_uri") == uri and rec.get("summary_sha256") == summary_digest(summary_file)


def recorded_in_store(root: Path, summary_file: Path) -> str | None:
    """The finished parent run that recorded this summary.json in the tracking store in use, asked of the store
    itself (the marker is this folder's alone: a teammate's `git clone` + `dvc pull` of a workspace recorded in
    a shared store has none). Found, the marker is written, so the next check needs no MLflow. Imports MLflow."""
    uri = tracking_uri(root)
    if not Path(summary_file).is_file() or (uri.startswith("sqlite:///")
                                            and not Path(uri.removeprefix("sqlite:///")).is_file()):
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    found = client.search_runs(experiments, filter_string=f"tags.`{SUMMARY_TAG}` = '{summary_digest(summary_file)}' "
                                                          "and attributes.status = 'FINISHED'",
                               order_by=["attributes.start_time DESC"])
    for run in found:
        if "mlflow.parentRunId" not in run.data.tags:
            mark_recorded(root, summary_file, run.info.run_id)
            return run.info.run_id
    return None


def mark_recorded(root: Path, summary_file: Path, run_id: str) -> None:
    from vitq.tasks._io import atomic_file

    with atomic_file(Path(root) / MARKER) as tmp:
        tmp.write_text(json.dumps({"tracking_uri": tracking_uri(root), "run_id": run_id,
                                   "summary_sha256": summary_digest(summary_file)}, indent=1))
