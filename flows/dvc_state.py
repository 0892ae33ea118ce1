"""DVC owns the pipeline's data and artifacts; the flow asks it, stage by stage, what is stale.

A stage DVC reports as up to date is not rerun (its results are read from its files), and a stage
the flow ran is committed to dvc.lock and DVC's cache, so `vitq run` and `dvc repro` share one
record: after either, the other finds nothing to do.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

log = logging.getLogger("vitq.flow")


def up_to_date_summary(ws) -> dict | None:
    """summary.json when DVC says every stage of the workspace's dvc.yaml is up to date, MLflow holds
    that summary (flows/recorded.py) and no variant recorded as not run could run here now; None when
    anything is to do. Imports DVC, not the stages:
    a run with nothing to do answers in about a second."""
    import json

    from vitq.flows.recorded import is_recorded, recorded_in_store

    if not ws.summary_file.is_file() or not (ws.root / "dvc.lock").is_file():
        return None
    marked = is_recorded(ws.root, ws.summary_file)  # False: `dvc repro` made it, or a clone (no marker) came
    summary = json.loads(ws.summary_file.read_text())
    from vitq.tasks.targets.registry import get_target
    from vitq.errors import VitqError
    from vitq.recipes import get_recipe

    for nr in summary.get("not_run", []):
        try:
            if get_target(get_recipe(nr["name"]).target).missing_runtime() is None:
                return None  # its runtime is here now: the flow makes it
        except VitqError:  # a recipe this process does not know: let the flow decide
            return None
    if not (ws.root / ".dvc").is_dir():
        return None  # the flow's preflight says what is wrong
    from dvc.repo import Repo  # not DvcStages: its check imports the stages (torch, ONNX Runtime: seconds)

    root = Path(ws.root).resolve()
    repo = Repo(str(root))
    try:
        stale = repo.status(targets=[str(root / "dvc.yaml")])
    finally:
        repo.close()
    if stale:
        return None
    if not marked and recorded_in_store(ws.root, ws.summary_file) is None:
        return None  # MLflow lacks this summary: the flow records it
    return summary


def declared(root: Path, names) -> list[str]:
    """`names` (plain stages) that the workspace's dvc.yaml has. A dvc.yaml written before the needs / search /
    smoothquant stages existed runs without them: the recipes that read those results make them in their own
    scratch folders (the log says so)."""
    import yaml

    have = set((yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}).get("stages") or {})
    missing = [n for n in names if n not in have]
    if missing:
        log.warning("%s has no stage %s (written by an older vitq): the recipes that read them make them in their "
                    "scratch folders; the current stages are in vitq/templates/dvc-pipeline.yaml",
                    Path(root) / "dvc.yaml", ", ".join(missing))
    return [n for n in names if n not in missing]


class DvcStages:
    def __init__(self, root: Path):
        from dvc.repo import Repo

        from vitq.tasks.stages import require_dvc_workspace

        require_dvc_workspace(Path(root))
        self.root = Path(root).resolve()
        self.repo = Repo(str(self.root))

    def target(self, stage: str) -> str:
        """`<root>/dvc.yaml:<stage>`: DVC resolves bare stage names against the process's cwd, which
        for a worker's flow run is not the workspace."""
        return f"{self.root / 'dvc.yaml'}:{stage}"

    def prepared(self, names) -> list[str]:
        return declared(self.root, names)

    def is_fresh(self, stage: str) -> bool:
        """True when the stage's deps, params and outs all match dvc.lock."""
        return not self.repo.status(targets=[self.target(stage)])

    def commit(self, stage: str) -> None:
        """Record the stage's current deps/params/outs in dvc.lock and its outs in the cache."""
        # DVC refuses to commit while the process's cwd is outside the repository (a worker's
        # scratch dir, `vitq run --workdir` from elsewhere); no stage runs concurrently with a commit.
        with contextlib.chdir(self.root):
            self.repo.commit(self.target(stage), force=True)

    def close(self) -> None:
        self.repo.close()
