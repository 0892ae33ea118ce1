"""The repository root is a workspace users clone: DVC must accept its git setup (it refuses a
git-ignored dvc.lock, and the metrics file belongs to git)."""

import shutil
import subprocess

import pytest

from conftest import REPO


def _ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO).returncode == 0


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_dvc_records_are_not_git_ignored_and_outputs_are():
    assert not _ignored("dvc.lock"), "DVC refuses a git-ignored dvc.lock (FileIsGitIgnored) in every git clone"
    assert not _ignored("reports/summary.json"), "the DVC metrics file (cache: false) is git's to track"
    for out in ("data/prepared", "models/fp32", "artifacts/variants", "reports/report.md", "mlflow.db"):
        assert _ignored(out), f"{out} is a DVC/MLflow output and must stay out of git"
