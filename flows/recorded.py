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


def mark_recorded(root: Path, summary_file: Path, run_id: str) -> None:
    from vitq.tasks._io import atomic_file

    with atomic_file(Path(root) / MARKER) as tmp:
        tmp.write_text(json.dumps({"tracking_uri": tracking_uri(root), "run_id": run_id,
                                   "summary_sha256": summary_digest(summary_file)}, indent=1))
