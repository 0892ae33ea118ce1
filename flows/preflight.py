"""What an orchestrated run needs, checked before any step is submitted (`vitq orchestrate`, `vitq deploy`).

    check_dvc_remote   the DVC remote named by --dvc-remote is in the workspace's DVC config (--create-remote adds
                       `s3` as VITQ_DVC_S3_URL, set by the local stack), and it answers: a local directory exists
                       or can be created; any other remote lists through DVC's own filesystem for it, in seconds
    check_mlflow       an http(s) MLFLOW_TRACKING_URI answers GET <uri>/health
    check_prefect      PREFECT_API_URL answers GET <url>/health
    check_workers      each work pool a configured recipe needs has a live worker; a pool without one is a warning
                       line (the run's --start-timeout decides), a pool that does not exist is an error

Each failure is a `VitqError` of one line (the CLI prints it and exits 2), raised before any work starts: a run
no longer trains the model for 15 minutes and then finds that `dvc push` has no remote to push to.
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from vitq.errors import VitqError
from vitq.logs import CONSOLE

log = logging.getLogger("vitq.preflight")

S3_URL_ENV = "VITQ_DVC_S3_URL"  # the local stack's DVC bucket (infra/local/stack.py; `source .stack/env`)
CREATABLE_REMOTE = "s3"  # the remote --create-remote adds, as S3_URL_ENV: the name the docs and the stack use
HTTP_TIMEOUT_S = 5.0  # MLflow's and Prefect's /health
REMOTE_TIMEOUT_S = 15.0  # the DVC remote's listing (s3fs and botocore retry a refused connection for ~10 s)

T = TypeVar("T")


def _one_line(exc: BaseException | str) -> str:
    """An exception (or text) as one line: its type and its words, newlines folded."""
    text = str(exc) if isinstance(exc, str) else (f"{type(exc).__name__}: {exc}" if str(exc).strip()
                                                  else type(exc).__name__)
    return " ".join(text.split())


def _within(seconds: float, what: str, call: Callable[[], T]) -> T:
    """`call()`, given up after `seconds` (it runs in a daemon thread, which a hung client cannot keep alive)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"vitq-preflight-{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


# -- DVC -----------------------------------------------------------------------------------------

def remote_names(root: Path) -> list[str]:
    """The remotes the workspace's DVC config defines (every level DVC merges: .dvc/config, config.local, ...)."""
    with _open_repo(root) as repo:
        return sorted(repo.config["remote"])


def _open_repo(root: Path):
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        return Repo(str(root))  # the workspace's own .dvc/: a DVC repo nested in git, or `dvc init --no-scm`
    except DvcException as exc:
        raise VitqError(f"{root}: DVC cannot open the workspace: {_one_line(exc)}") from None


def add_remote(root: Path, name: str, url: str, *, default: bool = False) -> None:
    """`dvc remote add [-d] NAME URL` in the workspace at `root`: written to its .dvc/config (a relative local path
    is taken from the current directory, as `dvc remote add` takes it, and stored relative to .dvc/)."""
    from dvc.exceptions import DvcException

    name = name.lower()  # as `dvc remote add` stores it (DVC looks remotes up by the lower-case name)
    with _open_repo(root) as repo:
        try:
            with repo.config.edit("repo") as conf:
                if name in conf["remote"]:
                    raise VitqError(f"DVC remote {name!r} exists already in {root / '.dvc' / 'config'}")
                conf["remote"][name] = {"url": url}
                if default:
                    conf["core"]["remote"] = name
        except DvcException as exc:
            raise VitqError(f"cannot add DVC remote {name!r} ({url}) to {root / '.dvc' / 'config'}: "
                            f"{_one_line(exc)}") from None


def check_remote_url(url: str, option: str = "--dvc-remote") -> str:
    """A URL DVC can use as a remote (its config schema, and a filesystem installed for its scheme); returns it.
    Nothing is contacted."""
    from dvc.fs import get_cloud_fs

    url = (url or "").strip()
    if not url:
        raise VitqError(f"{option} is empty; pass a DVC remote URL, e.g. s3://bucket/path or a directory")
    try:
        get_cloud_fs({}, url=url)
    except Exception as exc:  # noqa: BLE001 - DVC's ConfigError (unknown scheme), ImportError (plugin missing), ...
        cause = str(exc).removeprefix("config file error: ")
        raise VitqError(f"{option} {url!r} is not a URL DVC can use as a remote: {_one_line(cause)}") from None
    return url


def check_dvc_remote(root: Path, name: str, create: bool = False, timeout_s: float = REMOTE_TIMEOUT_S) -> str:
    """The remote `name` exists in the workspace's DVC config (created from VITQ_DVC_S3_URL with `create` when it is
    `s3` and missing) and answers; returns its URL."""
    root = Path(root)
    config_file = root / ".dvc" / "config"
    existing = remote_names(root)
    if name.lower() not in existing:
        s3_url = os.environ.get(S3_URL_ENV, "").strip()
        if create and name.lower() == CREATABLE_REMOTE and s3_url:
            add_remote(root, name, check_remote_url(s3_url, S3_URL_ENV))
            log.info("DVC remote %r added to %s: %s (--create-remote, from %s)", name, config_file, s3_url, S3_URL_ENV,
                     extra=CONSOLE)
        else:
            listed = ", ".join(existing) or "none"
            if create and name.lower() != CREATABLE_REMOTE:
                fix = (f"--create-remote adds only {CREATABLE_REMOTE!r} (as {S3_URL_ENV}); add {name!r} with "
                       f"`dvc remote add {name} URL` in {root}")
            elif create:
                fix = (f"--create-remote needs {S3_URL_ENV} (the local stack sets it: `source .stack/env`), or add it "
                       f"with `dvc remote add {name} URL` in {root}")
            else:
                fix = (f"add it with `dvc remote add {name} URL` in {root}, or make the workspace with "
                       f"`vitq init --dvc-remote URL --dvc-remote-name {name}`")
                if name.lower() == CREATABLE_REMOTE:
                    fix += (f", or pass --create-remote with {S3_URL_ENV} set (" +
                            (f"now {s3_url}" if s3_url else "the local stack sets it: `source .stack/env`") + ")")
            raise VitqError(f"DVC remote {name!r} does not exist in {config_file} (remotes there: {listed}); {fix}")
    return _check_remote_answers(root, name, timeout_s)


def _check_remote_answers(root: Path, name: str, timeout_s: float) -> str:
    from dvc.exceptions import DvcException

    with _open_repo(root) as repo:
        url = str(repo.config["remote"][name.lower()].get("url", ""))
        where = f"DVC remote {name!r} ({url})"
        try:
            remote = repo.cloud.get_remote(name)
        except (DvcException, ImportError) as exc:
            raise VitqError(f"{where} cannot be used: {_one_line(exc)}") from None
        fs, path = remote.fs, remote.path
        if fs.protocol == "local":
            _check_local_dir(Path(path), where)
            return url
        try:
            _within(timeout_s, name, lambda: _list(fs, path))
        except Exception as exc:  # noqa: BLE001 - the remote's own error, named in the line
            raise VitqError(f"{where} does not answer: {_one_line(exc)}") from None
    return url


def _check_local_dir(path: Path, where: str) -> None:
    """The directory exists, or its nearest existing parent is a directory this user can create it in."""
    if path.exists():
        if not path.is_dir():
            raise VitqError(f"{where}: {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise VitqError(f"{where}: the directory {path} is not writable")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise VitqError(f"{where}: {path} does not exist and cannot be created ({parent} is not a writable directory)")


def _list(fs, path: str) -> None:
    """A cheap listing of the remote: its folder, or, before the first push made that, the bucket/root above it
    (a filesystem that cannot list, HTTP: whether the folder exists, which a refused connection makes an error)."""
    try:
        fs.ls(path, detail=False)
        return
    except FileNotFoundError:
        pass
    except NotImplementedError:
        fs.exists(path)
        return
    top = path.strip("/").split("/")[0]
    if top and top != path.strip("/"):
        fs.ls(top, detail=False)  # the bucket: FileNotFoundError when it does not exist
        return
    raise FileNotFoundError(f"{path} does not exist")


# -- servers -------------------------------------------------------------------------------------

def _get_health(url: str) -> None:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:  # noqa: S310 - http(s) only, checked by callers
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}")


def _health_cause(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return _one_line(str(exc.reason))
    return _one_line(exc)


def check_mlflow(uri: str | None = None) -> None:
    """An http(s) MLFLOW_TRACKING_URI answers GET <uri>/health (MLflow's server: "OK") within 5 s; other URIs
    (the workspace's SQLite file, databricks, ...) are not checked here."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "") if uri is None else uri
    if not uri.lower().startswith(("http://", "https://")):
        return
    try:
        _get_health(f"{uri.rstrip('/')}/health")
    except Exception as exc:  # noqa: BLE001
        raise VitqError(f"MLflow tracking server MLFLOW_TRACKING_URI={uri} does not answer at /health "
                        f"({_health_cause(exc)}); start it, or set MLFLOW_TRACKING_URI to one that runs") from None


def check_prefect(url: str | None = None) -> None:
    """PREFECT_API_URL answers GET <url>/health within 5 s (before any Prefect client starts retrying)."""
    url = os.environ.get("PREFECT_API_URL", "") if url is None else url
    if not url:
        raise VitqError("PREFECT_API_URL is not set: work pools need a Prefect server (start one with "
                        "`python infra/local/stack.py up` and `source .stack/env`)")
    try:
        _get_health(f"{url.rstrip('/')}/health")
    except Exception as exc:  # noqa: BLE001
        raise VitqError(f"Prefect API PREFECT_API_URL={url} does not answer at /health ({_health_cause(exc)}); "
                        "start the server (`python infra/local/stack.py up`), or set PREFECT_API_URL to one that runs") \
            from None


# -- work pools ----------------------------------------------------------------------------------

def pools_needed(params, overrides: dict[str, str] | None = None) -> list[str]:
    """The work pools a run of `params` dispatches to: the preparation pool (and the orchestrator with --submit),
    and the pool of each configured variant's target, as `orchestrate_flow` routes them."""
    from vitq.flows.routing import PREPARE, pool_map
    from vitq.recipes import get_recipe

    pools = pool_map(overrides)
    needed = [pools[PREPARE], *(pools[get_recipe(r).target] for r in params.quantize.variants)]
    return list(dict.fromkeys(needed))


def check_workers(pools: Iterable[str], *, start_timeout_s: float | None = None, pools_exist: bool = True,
                  client=None) -> list[str]:
    """A warning line per pool without a live worker; returns those pools. `pools_exist`: a missing pool is an
    error (`vitq orchestrate`: only `vitq deploy` creates them); else it is one of the warnings (`vitq deploy`)."""
    from vitq.flows.routing import check_pool, live_workers

    if client is None:
        from prefect import get_client

        with get_client(sync_client=True) as c:
            return check_workers(pools, start_timeout_s=start_timeout_s, pools_exist=pools_exist, client=c)
    waiting = []
    wait = f"waits up to {start_timeout_s:.0f} s" if start_timeout_s else "waits"
    for pool in pools:
        if pools_exist:
            check_pool(client, pool)
        else:
            from prefect.exceptions import ObjectNotFound

            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                log.warning("work pool %r does not exist yet (vitq deploy creates it): no worker yet; start one with "
                            "`prefect worker start --pool %s`", pool, pool, extra=CONSOLE)
                waiting.append(pool)
                continue
        if not live_workers(client, pool):
            log.warning("work pool %r has no live worker yet: its steps wait for one (a step %s, then fails); start "
                        "one with `prefect worker start --pool %s`", pool, wait, pool, extra=CONSOLE)
            waiting.append(pool)
    return waiting


# -- everything a command needs ------------------------------------------------------------------

def check_orchestration(ws, params, dvc_remote: str | None, create_remote: bool = False, *,
                        pools: dict[str, str] | None = None, start_timeout_s: float | None = None,
                        client=None) -> None:
    """`vitq orchestrate`: the DVC remote, MLflow, Prefect and the work pools, in that order (the DVC remote and
    MLflow before anything contacts Prefect), each failure one line."""
    if create_remote and not dvc_remote:
        raise VitqError(f"--create-remote needs --dvc-remote NAME (e.g. --dvc-remote {CREATABLE_REMOTE})")
    if dvc_remote:
        check_dvc_remote(ws.root, dvc_remote, create_remote)
    check_mlflow()
    if client is None:
        check_prefect()
    check_workers(pools_needed(params, pools), start_timeout_s=start_timeout_s, client=client)


def check_deploy(workspaces: list, dvc_remote: str | None, create_remote: bool = False, *,
                 pools: dict[str, str] | None = None, client=None) -> None:
    """`vitq deploy`: as `check_orchestration` for each --workspace (the DVC remote in each), MLflow and Prefect once;
    pools that `vitq deploy` is about to create, or that have no live worker, are warnings."""
    from vitq.params import load_params

    if create_remote and not dvc_remote:
        raise VitqError(f"--create-remote needs --dvc-remote NAME (e.g. --dvc-remote {CREATABLE_REMOTE})")
    if create_remote and not workspaces:
        raise VitqError("--create-remote needs --workspace DIR: the workspace whose .dvc/config gets the remote")
    if dvc_remote:
        for ws in workspaces:
            check_dvc_remote(ws.root, dvc_remote, create_remote)
    # A --workspace without params.yaml (yet): its recipes, and so their pools, are not known here.
    loaded = [(ws, load_params(ws.params_file)) for ws in workspaces if ws.params_file.is_file()]
    check_mlflow()
    if client is None:
        check_prefect()
    from vitq.flows.routing import PREPARE, pool_map

    needed = [pool_map(pools)[PREPARE]]  # the orchestrator's and the schedules' pool
    for _, p in loaded:
        needed += pools_needed(p, pools)
    check_workers(list(dict.fromkeys(needed)), pools_exist=False, client=client)


__all__ = ["add_remote", "check_deploy", "check_dvc_remote", "check_mlflow", "check_orchestration", "check_prefect",
           "check_remote_url", "check_workers", "pools_needed", "remote_names"]
