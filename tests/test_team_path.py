"""The team path, for real: a workspace is run, committed and pushed (`git push` to a bare repository,
`dvc push` to a local folder remote and to S3 served by moto_server); a teammate's `git clone` then gets the
data with `dvc pull`, `dvc status` finds nothing to do, and `vitq run` there runs nothing and records nothing
new in the MLflow store both share.

Two kinds of workspace: one made by `vitq init` in its own git repository (what a team does for its model),
and this repository itself (its root is a workspace: `make demo`), whose tree holds the package folder and
with it the workspace templates, which DVC must not read as a pipeline.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, VITQ, _merge, run_env, tiny_params

RECIPES = ["onnx-w8a8-minmax"]
UP_TO_DATE = "up to date (dvc.lock): nothing ran, nothing new recorded"
CLEAN = "Data and pipelines are up to date."
GIT_ID = {"GIT_AUTHOR_NAME": "vitq test", "GIT_AUTHOR_EMAIL": "test@vitq.invalid",
          "GIT_COMMITTER_NAME": "vitq test", "GIT_COMMITTER_EMAIL": "test@vitq.invalid"}

needs_git_checkout = pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                                        reason="needs git and a git checkout of the repository")


def _run(args: list[str], cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _dvc(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd, env, timeout=600)


def _git(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return _ok(_run(["git", *args], cwd, env, timeout=120), f"git {' '.join(args)}")


def copy_repository_tree(dest: Path) -> Path:
    """This repository as its next commit would hold it (tracked and new files, deletions applied, nothing
    git ignores), in a new git repository: what a teammate's `git clone` of vitq gets."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file() and not src.is_symlink():  # a deleted file is still listed until committed
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@needs_git_checkout
def test_dvc_reads_one_pipeline_in_the_repository(tmp_path):
    """In a git copy of this repository DVC finds the root's pipeline alone: not the package's templates
    (vitq/templates), whose outputs a clone's `dvc pull` would fail on, nor anything else."""
    root = copy_repository_tree(tmp_path / "vitq")
    env = run_env(tmp_path)
    every = _ok(_dvc(["stage", "list", "--all", "--name-only"], root, env), "dvc stage list --all").stdout.split()
    own = _ok(_dvc(["stage", "list", "--name-only", "dvc.yaml"], root, env), "dvc stage list dvc.yaml").stdout.split()
    assert every and sorted(every) == sorted(own), sorted(set(every) - set(own))


# -- the whole path ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto_server on a free loopback port (infra/local/stack.py), its buckets made; stopped at the end."""
    sys.path.insert(0, str(REPO / "infra" / "local"))
    try:
        import stack as local_stack
    finally:
        sys.path.remove(str(REPO / "infra" / "local"))
    st = local_stack.Stack(tmp_path_factory.mktemp("moto"))
    try:
        url = st.start_s3()
        yield {"endpoint": url, "bucket": local_stack.DVC_BUCKET, "keys": dict(local_stack.S3_KEYS)}
    finally:
        st.stop()


def _mlflow_runs(uri: str) -> int:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    return sum(len(client.search_runs([e.experiment_id], max_results=50000)) for e in client.search_experiments())


def _s3_keys(s3: dict, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["endpoint"], region_name=s3["keys"]["AWS_DEFAULT_REGION"],
                          aws_access_key_id=s3["keys"]["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=s3["keys"]["AWS_SECRET_ACCESS_KEY"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _origin(kind: str, tmp: Path, env: dict) -> Path:
    if kind == "init":  # a team's own workspace: `vitq init` makes it a git repository with DVC
        _ok(_run([VITQ, "init", "origin", "--recipes", ",".join(RECIPES)], tmp, env), "vitq init")
        root = tmp / "origin"
        params = yaml.safe_load((root / "params.yaml").read_text())
        (root / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))  # tiny settings
        return root
    root = copy_repository_tree(tmp / "origin")  # vitq itself: the root is a workspace, the package folder beside it
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(quantize={"recipes": RECIPES, "carry": {}}),
                                                     sort_keys=False))
    return root


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("kind", ["init", pytest.param("repository", marks=needs_git_checkout)])
def test_push_then_a_clone_pulls_and_finds_everything_done(kind, tmp_path, s3):
    env = {**run_env(tmp_path), **GIT_ID, **s3["keys"],
           # one tracking store for the team, outside both folders
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"}
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        env.pop(name, None)  # the S3 endpoint comes from the committed DVC config, as in a teammate's clone
    (tmp_path / "tracking").mkdir()
    root = _origin(kind, tmp_path, env)
    prefix = f"team-{kind}"
    for args in (["remote", "add", "--force", "--default", "team-dir", str(tmp_path / "dvc-storage")],
                 ["remote", "add", "--force", "team-s3", f"s3://{s3['bucket']}/{prefix}"],
                 ["remote", "modify", "team-s3", "endpointurl", s3["endpoint"]]):
        _ok(_dvc(args, root, env), f"dvc {' '.join(args)}")

    _ok(_run([VITQ, "run"], root, env), "vitq run")
    runs = _mlflow_runs(env["MLFLOW_TRACKING_URI"])
    assert runs >= 1 + len(RECIPES)  # the parent and a child per variant

    _git(["add", "--all"], root, env)
    _git(["commit", "-q", "-m", "quantized"], root, env)
    tracked = _git(["ls-files"], root, env).stdout.split()
    assert {"dvc.yaml", "dvc.lock", "params.yaml", "reports/summary.json", ".dvc/config"} <= set(tracked)
    outputs = [f for f in tracked if f.startswith(("data/prepared/", "models/", "artifacts/", "reports/validation/"))]
    assert not outputs, f"DVC's outputs reached git: {outputs[:5]}"
    _git(["init", "-q", "--bare", str(tmp_path / "team.git")], tmp_path, env)
    _git(["push", "-q", str(tmp_path / "team.git"), "HEAD:refs/heads/main"], root, env)
    _ok(_dvc(["push"], root, env), "dvc push (the folder remote)")
    _ok(_dvc(["push", "-r", "team-s3"], root, env), "dvc push -r team-s3")
    assert _s3_keys(s3, prefix + "/"), "nothing reached S3"

    for remote in ("team-dir", "team-s3"):
        clone = tmp_path / f"clone-{remote}"
        _git(["clone", "-q", "-b", "main", str(tmp_path / "team.git"), str(clone)], tmp_path, env)
        pull = _dvc(["pull", "-r", remote], clone, env)
        print(f"\n[{kind}] dvc pull -r {remote}: rc {pull.returncode}\n{pull.stdout[-1500:]}{pull.stderr[-1500:]}")
        _ok(pull, f"dvc pull -r {remote}")
        status = _ok(_dvc(["status"], clone, env), "dvc status")
        print(f"[{kind}] dvc status: {status.stdout.strip()}")
        assert status.stdout.strip() == CLEAN, status.stdout
        for rel in ("models/fp32/model.json", f"artifacts/variants/{RECIPES[0]}/model.onnx", "reports/report.md"):
            assert (clone / rel).read_bytes() == (root / rel).read_bytes(), rel
        again = _ok(_run([VITQ, "run"], clone, env), f"vitq run in the clone (from {remote})")
        out = again.stdout + again.stderr
        print(f"[{kind}] vitq run in the clone: {out.strip().splitlines()[-1]}")
        assert UP_TO_DATE in out and ": running" not in out, out[-3000:]
        assert _mlflow_runs(env["MLFLOW_TRACKING_URI"]) == runs, "the clone's `vitq run` recorded the same run again"
