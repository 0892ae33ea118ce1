"""Shared fixtures: tiny real workspaces (digits data, a 1-block ViT trained for a few epochs)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VITQ = str(Path(sys.executable).with_name("vitq"))

# Small enough for every test run, real enough to learn: 1 block of width 32.
TINY = {
    "data": {"validation_size": 120, "calibration_size": 32},
    "model": {"arch": {"depth": 1, "embed_dim": 32, "num_heads": 2}, "train": {"epochs": 8, "lr": 0.003}},
    "calibration": {"num_bins": 512},
    "validate": {"max_top1_drop": 5.0},
    "benchmark": {"warmup": 2, "repeats": 20, "rounds": 2},
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and v else v
    return out


def tiny_params(**overrides) -> dict:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    return _merge(_merge(base, TINY), overrides)


def make_workspace(root: Path, params: dict, dvc: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    if dvc:
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    return root


def run_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(tmp / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL="",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def vitq(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VITQ, *args], cwd=cwd, env=run_env(cwd), capture_output=True, text=True, timeout=timeout
    )


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(root)): (f.stat().st_size, f.stat().st_mtime_ns) for f in root.rglob("*") if f.is_file()}


@pytest.fixture(scope="session")
def staged_workspace(tmp_path_factory) -> Iterator[Path]:
    """A workspace with data, model, export, calibration and the shared recovery results' stages run (no DVC,
    no Prefect).

    Read-only, shared by every module: a module that runs stages on it takes `workspace_copy(...)`,
    so what one module writes (variants, validation results) never reaches another and no test
    depends on the order modules run in. Teardown fails if anything in it changed."""
    from vitq.tasks import stages
    from vitq.tasks.layout import Workspace
    from vitq.params import parse_params

    root = make_workspace(tmp_path_factory.mktemp("staged"), tiny_params(), dvc=False)
    ws, p = Workspace(root), parse_params(tiny_params())
    for name in ("data", "model", "export", "calibrate", "needs", "search", "smoothquant"):
        stages.STAGES[name](ws, p)
    before = _listing(root)
    yield root
    after = _listing(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into the shared staged_workspace (use workspace_copy): {changed[:10]}"


def workspace_copy(staged: Path, tmp_path_factory, name: str):
    """A private copy of the staged workspace (a `Workspace`) for a module that runs stages on it."""
    from vitq.tasks.layout import Workspace

    root = tmp_path_factory.mktemp(name) / "ws"
    shutil.copytree(staged, root)
    return Workspace(root)
