"""What an orchestrated run needs, checked before any work (flows/preflight.py, `vitq orchestrate`, `vitq deploy`,
`vitq init --dvc-remote`): real DVC repositories, a real MLflow server and S3 (moto) on loopback; no model trained."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import run_env
from vitq.errors import VitqError
from vitq.flows import preflight

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dvc_repo(root: Path, *remotes: tuple[str, str]) -> Path:
    """`dvc init --no-scm` in `root`, then `dvc remote add NAME URL` for each of `remotes`."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=root, check=True, capture_output=True)
    for name, url in remotes:
        subprocess.run([DVC, "remote", "add", name, url], cwd=root, check=True, capture_output=True)
    return root


def remote_config(root: Path) -> dict:
    """The remotes and the default remote as DVC itself reads them from the workspace."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {"remote": {n: dict(c) for n, c in repo.config["remote"].items()},
                "default": repo.config["core"].get("remote")}


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# -- the DVC remote ------------------------------------------------------------------------------

def test_a_local_remote_that_exists_or_can_be_created_passes(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    root = dvc_repo(tmp_path / "ws", ("store", str(store)), ("later", str(tmp_path / "not-yet" / "cache")))
    assert preflight.check_dvc_remote(root, "store") == str(store)
    assert preflight.check_dvc_remote(root, "later") == str(tmp_path / "not-yet" / "cache")  # created on push
    assert not (tmp_path / "not-yet").exists()  # the check itself writes nothing


def test_a_local_remote_that_cannot_be_a_directory_fails_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("x")
    root = dvc_repo(tmp_path / "ws", ("store", str(tmp_path / "a-file" / "cache")))
    with pytest.raises(VitqError) as exc:
        preflight.check_dvc_remote(root, "store")
    assert "DVC remote 'store'" in one_line(exc) and "cannot be created" in str(exc.value)


def test_a_missing_remote_is_named_with_the_remotes_that_exist(tmp_path):
    root = dvc_repo(tmp_path / "ws", ("store", str(tmp_path / "store")), ("backup", str(tmp_path / "backup")))
    with pytest.raises(VitqError) as exc:
        preflight.check_dvc_remote(root, "nosuch")
    line = one_line(exc)
    assert "DVC remote 'nosuch' does not exist" in line and "(remotes there: backup, store)" in line, line
    assert "dvc remote add nosuch URL" in line and "vitq init --dvc-remote URL" in line
    with pytest.raises(VitqError, match=r"remotes there: none"):
        preflight.check_dvc_remote(dvc_repo(tmp_path / "bare"), "s3")


def test_create_remote_adds_s3_from_the_stack_variable(tmp_path, monkeypatch):
    root = dvc_repo(tmp_path / "ws", ("store", str(tmp_path / "store")))
    bucket = tmp_path / "bucket"  # DVC takes a directory as the URL too
    monkeypatch.delenv(preflight.S3_URL_ENV, raising=False)
    with pytest.raises(VitqError, match=r"--create-remote needs VITQ_DVC_S3_URL"):
        preflight.check_dvc_remote(root, "s3", create=True)
    monkeypatch.setenv(preflight.S3_URL_ENV, str(bucket))
    with pytest.raises(VitqError) as exc:  # without the option: nothing written, the option named
        preflight.check_dvc_remote(root, "s3")
    assert "--create-remote" in one_line(exc) and str(bucket) in str(exc.value)
    assert "s3" not in remote_config(root)["remote"]
    with pytest.raises(VitqError, match=r"--create-remote adds only 's3'"):
        preflight.check_dvc_remote(root, "other", create=True)

    assert preflight.check_dvc_remote(root, "s3", create=True) == str(bucket)
    conf = remote_config(root)
    assert conf["remote"]["s3"]["url"] == str(bucket) and conf["remote"]["store"]["url"] == str(tmp_path / "store")
    assert 'remote "s3"' in (root / ".dvc" / "config").read_text()  # the repository's config, as `dvc remote add` writes it
    assert preflight.check_dvc_remote(root, "s3", create=True) == str(bucket)  # there now: left as it is


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """S3 (moto) on a loopback port with one bucket, as the local stack serves it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "vitq-test",
           "AWS_SECRET_ACCESS_KEY": "vitq-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="y").create_bucket(Bucket="vitq-dvc")
    yield env
    server.stop()


def test_an_s3_remote_answers_through_dvc_or_fails_naming_remote_url_and_cause(tmp_path, monkeypatch, s3):
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    root = dvc_repo(tmp_path / "ws", ("s3", "s3://vitq-dvc/cache"), ("gone", "s3://no-such-bucket/cache"))
    assert preflight.check_dvc_remote(root, "s3") == "s3://vitq-dvc/cache"  # the bucket is there; cache/ comes on push
    with pytest.raises(VitqError) as exc:
        preflight.check_dvc_remote(root, "gone")
    line = one_line(exc)
    assert "DVC remote 'gone' (s3://no-such-bucket/cache) does not answer:" in line and "no-such-bucket" in line, line


def test_a_remote_that_does_not_answer_in_time_fails(tmp_path, monkeypatch):
    """A listing that hangs is given up after the timeout, naming the remote (a stand-in for an unreachable store)."""
    root = dvc_repo(tmp_path / "ws", ("s3", "s3://vitq-dvc/cache"))
    hang = threading.Event()
    monkeypatch.setattr(preflight, "_list", lambda fs, path: hang.wait(60))
    started = time.monotonic()
    try:
        with pytest.raises(VitqError) as exc:
            preflight.check_dvc_remote(root, "s3", timeout_s=0.5)
    finally:
        hang.set()
    assert time.monotonic() - started < 10
    assert "DVC remote 's3' (s3://vitq-dvc/cache) does not answer: TimeoutError: no answer within" in one_line(exc)


# -- MLflow and Prefect --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port with a SQLite store; its URI once /health answers."""
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp / 'm.db'}", "--workers", "1"],
                            cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.read().decode().strip() == "OK":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_a_running_mlflow_server_passes(mlflow_server, monkeypatch):
    preflight.check_mlflow(mlflow_server)
    preflight.check_mlflow(mlflow_server + "/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    preflight.check_mlflow()


def test_a_closed_port_fails_in_one_line_naming_the_uri(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(VitqError) as exc:
        preflight.check_mlflow(uri)
    assert f"MLFLOW_TRACKING_URI={uri} does not answer" in one_line(exc)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(VitqError, match="does not answer"):
        preflight.check_mlflow()
    with pytest.raises(VitqError) as exc:
        preflight.check_prefect(f"{uri}/api")
    assert f"PREFECT_API_URL={uri}/api does not answer" in one_line(exc)


def test_a_local_tracking_store_is_not_contacted():
    preflight.check_mlflow("sqlite:////nonexistent/mlflow.db")
    preflight.check_mlflow("")


# -- work pools ----------------------------------------------------------------------------------

class FakePrefect:
    """The three calls the pool check makes, on a server with `pools` ({pool: [(worker, online)]})."""

    api_url = "http://prefect.test/api/"

    def __init__(self, pools: dict[str, list[tuple[str, bool]]]):
        self.pools = pools

    def read_work_pool(self, name):
        from prefect.exceptions import ObjectNotFound

        if name not in self.pools:
            raise ObjectNotFound(http_exc=Exception("404"))
        return SimpleNamespace(name=name)

    def read_workers_for_work_pool(self, work_pool_name):
        from prefect.client.schemas.objects import WorkerStatus

        return [SimpleNamespace(name=n, status=WorkerStatus.ONLINE if up else WorkerStatus.OFFLINE)
                for n, up in self.pools[work_pool_name]]


def params_with(*recipes: str):
    from vitq.config import Params

    return Params.model_validate({"quantize": {"recipes": list(recipes), "carry": {}}})


def test_pools_needed_follow_the_recipes_targets_and_the_overrides():
    p = params_with("onnx-w8a8-minmax", "tensorrt-w8a8-percentile", "coreml-w8")
    assert preflight.pools_needed(p) == ["cpu", "cuda", "macos"]
    assert preflight.pools_needed(p, {"tensorrt": "h100", "prepare": "big"}) == ["big", "cpu", "h100", "macos"]
    assert preflight.pools_needed(params_with("onnx-w8-dynamic")) == ["cpu"]


def test_a_pool_without_a_live_worker_is_a_warning_line_and_a_missing_pool_an_error(caplog):
    client = FakePrefect({"cpu": [("cpu-1", True)], "cuda": [("gpu-1", False)]})
    with caplog.at_level(logging.WARNING, logger="vitq.preflight"):
        assert preflight.check_workers(["cpu", "cuda"], start_timeout_s=600, client=client) == ["cuda"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "work pool 'cuda' has no live worker yet" in lines[0] and "600 s" in lines[0], lines
    with pytest.raises(VitqError, match=r"work pool 'macos' does not exist on .*vitq deploy"):
        preflight.check_workers(["cpu", "macos"], client=client)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitq.preflight"):  # `vitq deploy` creates the pools it names
        assert preflight.check_workers(["cpu", "macos"], pools_exist=False, client=client) == ["macos"]
    assert "work pool 'macos' does not exist yet (vitq deploy creates it)" in caplog.records[0].getMessage()


def test_check_orchestration_checks_the_remote_before_prefect(tmp_path):
    from vitq.tasks.layout import Workspace

    ws = Workspace(dvc_repo(tmp_path / "ws", ("store", str(tmp_path / "store"))))
    p = params_with("onnx-w8a8-minmax")
    client = FakePrefect({})  # no pool at all: reached only after the remote
    with pytest.raises(VitqError, match=r"DVC remote 'nosuch' does not exist"):
        preflight.check_orchestration(ws, p, "nosuch", client=client)
    with pytest.raises(VitqError, match=r"work pool 'cpu' does not exist"):
        preflight.check_orchestration(ws, p, "store", client=client)
    with pytest.raises(VitqError, match=r"--create-remote needs --dvc-remote"):
        preflight.check_orchestration(ws, p, None, True, client=client)


# -- vitq init --dvc-remote ----------------------------------------------------------------------

def vitq_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    e = run_env(cwd)
    e.update(env)
    return subprocess.run([sys.executable, "-m", "vitq.cli", *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=300)


def test_init_writes_the_remote_as_the_default(tmp_path):
    res = vitq_cli("init", "local-ws", "--dvc-remote", "store", cwd=tmp_path)  # a directory, from the shell's cwd
    assert res.returncode == 0, res.stderr
    conf = remote_config(tmp_path / "local-ws")
    assert conf["default"] == "storage" and conf["remote"]["storage"]["url"] == str(tmp_path / "store")
    assert "DVC remote 'storage' (the default remote)" in res.stdout
    assert preflight.check_dvc_remote(tmp_path / "local-ws", "storage") == str(tmp_path / "store")

    res = vitq_cli("init", "s3-ws", "--dvc-remote", "s3://vitq-dvc/cache", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    conf = remote_config(tmp_path / "s3-ws")
    assert conf["default"] == "s3" and list(conf["remote"]) == ["s3"]
    assert conf["remote"]["s3"]["url"] == "s3://vitq-dvc/cache"

    res = vitq_cli("init", "named-ws", "--dvc-remote", "s3://vitq-dvc/cache", "--dvc-remote-name", "team", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert remote_config(tmp_path / "named-ws")["default"] == "team"


def test_init_without_the_option_writes_no_remote(tmp_path):
    res = vitq_cli("init", "ws", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert remote_config(tmp_path / "ws") == {"remote": {}, "default": None}


@pytest.mark.parametrize("url, message", [
    ("", "--dvc-remote is empty"),
    ("ftp://host/cache", "is not a URL DVC can use as a remote: Unsupported URL type ftp://"),
])
def test_init_with_a_bad_remote_url_is_one_line_and_writes_nothing(tmp_path, url, message):
    res = vitq_cli("init", "ws", "--dvc-remote", url, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("vitq: error: ") and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "ws").exists()


# -- the commands --------------------------------------------------------------------------------

@pytest.fixture
def workspace(tmp_path) -> Path:
    """A `vitq init` workspace (the embedded digits, nothing trained), no DVC remote."""
    res = vitq_cli("init", "ws", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return tmp_path / "ws"


def test_orchestrate_with_a_missing_remote_is_one_line_before_prefect(workspace):
    res = vitq_cli("orchestrate", "--workdir", str(workspace), "--dvc-remote", "nosuch", cwd=workspace.parent,
                   PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitq: error: DVC remote 'nosuch' does not exist"), res.stderr
    assert "Traceback" not in res.stderr and "(remotes there: none)" in lines[0]
    assert not (workspace / "reports").exists()  # no log file opened: nothing started


def test_create_remote_then_the_next_check_on_the_command_line(workspace, tmp_path):
    """orchestrate --create-remote: the remote is added, then the (closed) Prefect API is the one line."""
    api = f"http://127.0.0.1:{free_port()}/api"
    res = vitq_cli("orchestrate", "--workdir", str(workspace), "--dvc-remote", "s3", "--create-remote", cwd=tmp_path,
                   PREFECT_API_URL=api, VITQ_DVC_S3_URL=str(tmp_path / "bucket"))
    assert not (workspace / "reports").exists()  # stopped before the log file: nothing started
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert lines[-1].startswith(f"vitq: error: Prefect API PREFECT_API_URL={api} does not answer"), res.stderr
    assert "Traceback" not in res.stderr and any("DVC remote 's3' added" in line for line in lines), res.stderr
    assert remote_config(workspace)["remote"]["s3"]["url"] == str(tmp_path / "bucket")
    res = vitq_cli("deploy", "--workspace", str(workspace), "--dvc-remote", "nosuch", cwd=tmp_path, PREFECT_API_URL=api)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "DVC remote 'nosuch'" in res.stderr, res.stderr
    assert "(remotes there: s3)" in res.stderr
