"""The whole vitq stack on one Linux machine, without Docker: what the integration tests start.

    python infra/local/stack.py up   --state .stack [--postgres] [--workers cpu,macos]
    source .stack/env                 # PREFECT_API_URL, MLFLOW_TRACKING_URI, S3 endpoint and keys
    python infra/local/stack.py down --state .stack

Components, each its own process group on 127.0.0.1 and a free port:
- S3: `moto_server` (in memory), buckets for MLflow artifacts and the DVC remote
- MLflow: `mlflow server`, backend SQLite (or PostgreSQL with --postgres), artifacts proxied to S3
- Prefect: `prefect server start` (SQLite in the state folder, or PostgreSQL)
- Prefect process workers, one per pool named with --workers

`Stack` is also importable (tests/integration/conftest.py): start what a test needs, `stop()` ends
every process group it started. The pids live in <state>/pids.json so `down` works from a shell.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's console scripts: prefect, mlflow, moto_server
MLFLOW_BUCKET = "vitq-mlflow"
DVC_BUCKET = "vitq-dvc"
# moto accepts any credentials; real deployments take them from the environment / instance role.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "vitq-local", "AWS_SECRET_ACCESS_KEY": "vitq-local-secret", "AWS_DEFAULT_REGION": "us-east-1"}


class StackError(RuntimeError):
    """A component did not start; the message names it and ends with its log's last lines."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name!r} is not installed (pip install -e '.[test]' provides it)")
    return found


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise StackError(f"{what} did not answer {url} within {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Stack:
    state: Path  # logs, databases, pids.json, env
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # what a client (vitq, a worker, a test) needs

    def __post_init__(self) -> None:
        self.state = Path(self.state).resolve()
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "logs").mkdir(exist_ok=True)

    # -- processes -------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        if name in self.procs and self.procs[name].poll() is None:
            raise StackError(f"{name} is already running (pid {self.procs[name].pid})")
        log = self.state / "logs" / f"{name}.log"
        full_env = {**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        with open(log, "ab") as out:
            # Own session = own process group: stop() ends the component and everything it spawned
            # (a worker's flow-run subprocesses included).
            proc = subprocess.Popen(cmd, env=full_env, cwd=cwd or self.state, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        self._save_pids()
        return proc

    def log(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def _save_pids(self) -> None:
        """Merge with what other Stack objects on this state folder recorded (`add-worker` from a shell)."""
        path = self.state / "pids.json"
        pids = json.loads(path.read_text()) if path.is_file() else {}
        pids = {n: pid for n, pid in pids.items() if n not in self.procs and _alive(pid)}
        pids.update({n: p.pid for n, p in self.procs.items() if p.poll() is None})
        path.write_text(json.dumps(pids, indent=1))

    @classmethod
    def attach(cls, state: Path) -> Stack:
        """A Stack on a running stack's state folder (its env), to add workers to it."""
        stack = cls(state)
        stack.env = json.loads((stack.state / "env.json").read_text())
        return stack

    def kill(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15) -> None:
        """Signal one component's process group; escalate to SIGKILL after `timeout_s`."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            self.procs.pop(name, None)
            return
        _signal_group(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        _signal_group(proc.pid, signal.SIGKILL)  # children that outlived their parent
        self.procs.pop(name, None)
        self._save_pids()

    def stop(self) -> None:
        """Stop everything this Stack started, workers first, servers last."""
        order = sorted(self.procs, key=lambda n: (not n.startswith("worker-"), n != "postgres"))
        for name in order:
            self.kill(name)
        if self.env.get("VITQ_STACK_PGDATA"):
            _pg_ctl(Path(self.env["VITQ_STACK_PGDATA"]), "stop")

    # -- components ------------------------------------------------------------------------------
    def start_s3(self) -> str:
        import boto3

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = self._spawn("s3", [_tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)], {})
        _wait_http(url + "/moto-api/", 60, proc, self.log("s3"), "moto_server (S3)")
        s3 = boto3.client("s3", endpoint_url=url, region_name=S3_KEYS["AWS_DEFAULT_REGION"],
                          aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])
        for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
            s3.create_bucket(Bucket=bucket)
        # Both spellings: MLflow's S3 artifact repository reads MLFLOW_S3_ENDPOINT_URL; boto3 and
        # DVC (s3fs/aiobotocore) read AWS_ENDPOINT_URL.
        self.env.update(S3_KEYS, MLFLOW_S3_ENDPOINT_URL=url, AWS_ENDPOINT_URL=url,
                        VITQ_DVC_S3_URL=f"s3://{DVC_BUCKET}/cache")
        return url

    def start_postgres(self) -> tuple[str, str]:
        """PostgreSQL for Prefect and MLflow (needs initdb/pg_ctl); returns (prefect_url, mlflow_url)."""
        if not shutil.which("initdb") or not shutil.which("pg_ctl"):
            raise StackError("PostgreSQL is not installed (initdb/pg_ctl not on PATH); use the SQLite default")
        pgdata = self.state / "pgdata"
        port = free_port()
        if os.geteuid() == 0:  # the postgres user must reach the state folder (mkdtemp makes it 0700)
            self.state.chmod(self.state.stat().st_mode | 0o011)
        if not (pgdata / "PG_VERSION").exists():
            pgdata.mkdir(exist_ok=True)
            _as_pg_user(pgdata)
            _run_pg(["initdb", "-D", str(pgdata), "-U", "vitq", "--auth=trust", "-E", "UTF8"])
        sock = self.state / "pgsock"  # socket and server log: written by the postgres user
        sock.mkdir(exist_ok=True)
        _as_pg_user(sock)
        _run_pg(["pg_ctl", "-D", str(pgdata), "-l", str(sock / "postgres.log"), "-w", "-o",
                 f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"])
        self.env["VITQ_STACK_PGDATA"] = str(pgdata)
        for db in ("prefect", "mlflow"):
            subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "vitq", "-d", "postgres", "-c",
                            f"CREATE DATABASE {db}"], capture_output=True, text=True)
        base = f"127.0.0.1:{port}"
        return f"postgresql+asyncpg://vitq@{base}/prefect", f"postgresql+psycopg2://vitq@{base}/mlflow"

    def start_mlflow(self, backend_uri: str | None = None) -> str:
        if "MLFLOW_S3_ENDPOINT_URL" not in self.env:
            raise StackError("start S3 first: MLflow's artifacts are proxied to it")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        backend = backend_uri or f"sqlite:///{self.state / 'mlflow.db'}"
        cmd = [_tool("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", backend, "--serve-artifacts",
               "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts"]
        # No GenAI job runner (a pool of huey consumers): tracking, artifacts and the registry only.
        proc = self._spawn("mlflow", cmd, {**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        _wait_http(url + "/health", 120, proc, self.log("mlflow"), "mlflow server")
        self.env["MLFLOW_TRACKING_URI"] = url
        return url

    def start_prefect(self, database_url: str | None = None) -> str:
        port = free_port()
        url = f"http://127.0.0.1:{port}/api"
        env = {"PREFECT_HOME": str(self.state / "prefect-server"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_UI_ENABLED": "false",
               # Workers here heartbeat every 5 s: mark one offline after 3 missed beats, checked every 5 s.
               "PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS": "5"}
        if database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        cmd = [_tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
        proc = self._spawn("prefect", cmd, env)
        _wait_http(url + "/health", 180, proc, self.log("prefect"), "prefect server")
        self.env.update(PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        return url

    def worker_env(self, name: str) -> dict[str, str]:
        return {
            **self.env,
            "PREFECT_HOME": str(self.state / f"prefect-{name}"),
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick up a step within a second (default 10)
            "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
            # Flow-run heartbeats (Prefect's minimum is 30 s) let the zombie automation mark a
            # flow run Crashed when its worker's machine dies; the orchestrator then retries it.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }

    def start_worker(self, pool: str, name: str | None = None, limit: int | None = None) -> str:
        """A process worker on `pool` (created if missing); returns the worker's name."""
        if "PREFECT_API_URL" not in self.env:
            raise StackError("start the Prefect server first: workers need a real API")
        name = name or f"{pool}-1"
        cmd = [_tool("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name,
               "--install-policy", "never"]
        if limit:
            cmd += ["--limit", str(limit)]
        proc = self._spawn(f"worker-{name}", cmd, self.worker_env(name))
        _wait_worker_online(self.env["PREFECT_API_URL"], pool, name, proc, self.log(f"worker-{name}"))
        return name

    def write_env(self) -> Path:
        path = self.state / "env"
        path.write_text("".join(f"export {k}={v}\n" for k, v in sorted(self.env.items())))
        (self.state / "env.json").write_text(json.dumps(self.env, indent=1))
        return path


def _wait_worker_online(api: str, pool: str, name: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"worker {name!r} (pool {pool!r}) exited with code {proc.returncode}:\n{_tail(log)}")
        req = urllib.request.Request(f"{api}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if any(w["name"] == name and w["status"] == "ONLINE" for w in json.load(r)):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise StackError(f"worker {name!r} did not come online in pool {pool!r} within {timeout_s:.0f} s:\n{_tail(log)}")


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # pid == pgid: each component leads its own session
    except (ProcessLookupError, PermissionError):
        pass


# PostgreSQL refuses to run as root: as root, initdb/pg_ctl run as the `postgres` user.
def _pg_prefix() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _as_pg_user(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _run_pg(cmd: list[str]) -> None:
    proc = subprocess.run(_pg_prefix() + cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StackError(f"{' '.join(cmd[:2])} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")


def _pg_ctl(pgdata: Path, action: str) -> None:
    subprocess.run(_pg_prefix() + ["pg_ctl", "-D", str(pgdata), "-m", "fast", action], capture_output=True)


def down(state: Path) -> None:
    """Stop what `up` started, from its pids.json (a separate process from the one that started it)."""
    pids_file = Path(state) / "pids.json"
    pids = json.loads(pids_file.read_text()) if pids_file.is_file() else {}
    for name, pid in sorted(pids.items(), key=lambda kv: not kv[0].startswith("worker-")):
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for pid in pids.values():
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        _signal_group(pid, signal.SIGKILL)
    env_file = Path(state) / "env.json"
    if env_file.is_file() and (pg := json.loads(env_file.read_text()).get("VITQ_STACK_PGDATA")):
        _pg_ctl(Path(pg), "stop")
    pids_file.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def up(state: Path, workers: list[str], postgres: bool = False) -> Stack:
    stack = Stack(state)
    try:
        stack.start_s3()
        prefect_db = mlflow_db = None
        if postgres:
            prefect_db, mlflow_db = stack.start_postgres()
        stack.start_mlflow(mlflow_db)
        stack.start_prefect(prefect_db)
        for pool in workers:
            stack.start_worker(pool)
    except BaseException:
        stack.stop()
        raise
    stack.write_env()
    return stack


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("up", "down", "add-worker"))
    ap.add_argument("--state", default=".stack", help="folder for logs, databases, pids and the env file")
    ap.add_argument("--workers", default="cpu", help="comma-separated pools to start one process worker on")
    ap.add_argument("--postgres", action="store_true", help="PostgreSQL for Prefect and MLflow (default SQLite)")
    args = ap.parse_args(argv)
    if args.action == "add-worker":  # one more process worker per pool in --workers, on the running stack
        stack = Stack.attach(Path(args.state))
        for pool in [p for p in args.workers.split(",") if p]:
            n = sum(1 for k in json.loads((stack.state / "pids.json").read_text()) if k.startswith(f"worker-{pool}-"))
            print(f"worker {stack.start_worker(pool, f'{pool}-{n + 1}')} on pool {pool}")
        return 0
    if args.action == "down":
        down(Path(args.state))
        print(f"stopped the stack in {args.state}")
        return 0
    try:
        stack = up(Path(args.state), [p for p in args.workers.split(",") if p], args.postgres)
    except StackError as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        return 2
    print(f"Prefect  {stack.env['PREFECT_API_URL']}\nMLflow   {stack.env['MLFLOW_TRACKING_URI']}\n"
          f"S3       {stack.env['AWS_ENDPOINT_URL']}\nworkers  {args.workers}\n"
          f"env:     source {stack.state / 'env'}\nstop:    python {Path(__file__).name} down --state {args.state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
