"""Checks of `make demo`'s result for .ci/run, from the workspace's own params.yaml.

    check_demo.py summary        reports/summary.json has the baseline and every configured recipe
    check_demo.py runs           the number of MLflow runs in the workspace's store
    check_demo.py skipped LOG N  the rerun's log says nothing ran (up to date) and MLflow still holds N runs
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from vitq.tasks.stages import plan_variants
from vitq.params import load_params


def check_summary(root: Path) -> list[str]:
    params = load_params(root / "params.yaml")
    summary = json.loads((root / "reports" / "summary.json").read_text())
    problems = []
    base = summary.get("baseline", {})
    if not (isinstance(base.get("top1"), float) and base.get("size_mb", 0) > 0 and base.get("latency_ms_p50")):
        problems.append(f"baseline incomplete: {base}")
    runnable, not_run = plan_variants(params)
    variants = {v["name"]: v for v in summary.get("variants", [])}
    reported_not_run = {n["name"] for n in summary.get("not_run", [])}
    for name in runnable:
        v = variants.get(name)
        if v is None:
            problems.append(f"configured recipe {name} has no variant in summary.json")
        elif not (v["size_mb"] > 0 and isinstance(v["agreement"], float) and Path(root, v["artifact"]).exists()):
            problems.append(f"variant {name} incomplete: {v}")
    for name in not_run:
        if name not in reported_not_run:
            problems.append(f"recipe {name} cannot run here but summary.json does not say why")
    extra = set(variants) - set(runnable)
    if extra:
        problems.append(f"summary.json has variants nobody configured: {sorted(extra)}")
    print(f"ci: summary.json: baseline top-1 {base.get('top1')}, {len(variants)} variants, "
          f"{len(reported_not_run)} not run here")
    return problems


def dvc_stages(root: Path) -> list[str]:
    """Every stage of the workspace's pipeline, as DVC itself expands dvc.yaml (two per variant)."""
    out = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return out.split()


UP_TO_DATE = "up to date (dvc.lock): nothing ran, nothing new recorded"


def mlflow_runs(root: Path) -> int:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return sum(len(client.search_runs([e.experiment_id], max_results=50000)) for e in client.search_experiments())


def check_skipped(log: Path, runs_before: int) -> list[str]:
    text = log.read_text()
    stages = dvc_stages(Path.cwd())
    ran = re.findall(r"^([\w@.-]+): .*\bdone in\b", text, re.M)  # the console's line per stage or variant run
    problems = [f"{name} ran on a rerun with nothing changed" for name in ran]
    if UP_TO_DATE not in text:
        problems.append(f"the rerun did not report '{UP_TO_DATE}'")
    runs = mlflow_runs(Path.cwd())
    if runs != runs_before:
        problems.append(f"the rerun added MLflow runs: {runs_before} before, {runs} after")
    print(f"ci: rerun: nothing ran of {len(stages)} stages; MLflow runs {runs_before} -> {runs}")
    return problems


if __name__ == "__main__":
    root = Path.cwd()
    if sys.argv[1] == "runs":
        print(mlflow_runs(root))
        sys.exit(0)
    found = check_summary(root) if sys.argv[1] == "summary" else check_skipped(Path(sys.argv[2]), int(sys.argv[3]))
    for p in found:
        print(f"ci: {p}", file=sys.stderr)
    sys.exit(1 if found else 0)
