"""What runs without anyone asking: the nightly re-quantization and the calibration-data watch.

- `vitq-nightly` (cron): re-quantizes every workspace a registered model came from (the
  `workspace` tag of each version in the MLflow Model Registry), plus any listed explicitly.
- `vitq-watch-data` (interval): computes each workspace's calibration-data digest and, when it
  differs from the last one seen (kept in a Prefect Variable), emits the event
  `vitq.calibration-data.changed`; the orchestrator's deployment trigger starts a run for it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import yaml
from prefect import flow

from vitq.flows.distributed import orchestrate_flow
from vitq.tasks.layout import Workspace
from vitq.config import Params
from vitq.params import load_params

log = logging.getLogger("vitq.flow")

DATA_CHANGED = "vitq.calibration-data.changed"


def workspace_resource_id(workspace: str) -> str:
    return f"vitq.workspace.{hashlib.sha256(str(Path(workspace).resolve()).encode()).hexdigest()[:16]}"


def calibration_digest(ws: Workspace, params: Params) -> str:
    """The calibration source's digest: DVC's md5 from `<data.path>.dvc` when the folder is DVC-tracked
    (`dvc add`), else a sha256 of its files; for the built-in digits set, of the parameters that define it."""
    d = params.data
    if d.source == "imagefolder":
        root = Path(d.path) if Path(d.path).is_absolute() else ws.root / d.path
        dvc_file = root.with_name(root.name + ".dvc")
        if dvc_file.is_file():
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [])
            if outs and outs[0].get("md5"):
                return f"md5:{outs[0]['md5']}"
        h = hashlib.sha256()
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
        return f"sha256:{h.hexdigest()}"
    spec = {"seed": params.seed, "data": d.model_dump(mode="json")}
    import sklearn

    spec["sklearn"] = sklearn.__version__
    return "params:" + hashlib.sha256(repr(sorted(spec.items())).encode()).hexdigest()


def registered_workspaces() -> list[str]:
    """Workspaces recorded on the versions of vitq's registered models (MLflow from the environment)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    found = []
    for rm in client.search_registered_models(filter_string="tags.vitq = 'true'"):
        for mv in client.search_model_versions(f"name = '{rm.name}'"):
            ws = (mv.tags or {}).get("workspace")
            if ws and ws not in found:
                found.append(ws)
    return found


@flow(name="vitq-nightly")
def nightly_flow(workspaces: list[str] | None = None, pools: dict[str, str] | None = None,
                 dvc_remote: str | None = None) -> dict[str, str]:
    """Re-quantize (quantize onward; prepared stages reused when current) every registered workspace."""
    targets = list(dict.fromkeys([*(workspaces or []), *registered_workspaces()]))
    outcome = {}
    for w in targets:
        try:
            orchestrate_flow(workspace=w, requantize=True, pools=pools, dvc_remote=dvc_remote)
            outcome[w] = "ok"
        except Exception as exc:  # one broken workspace must not stop the others; all are reported
            outcome[w] = f"failed: {exc}"
            log.error("nightly: %s failed: %s", w, exc)
    failed = {w: o for w, o in outcome.items() if o != "ok"}
    if failed:
        raise RuntimeError(f"nightly: {len(failed)} of {len(outcome)} workspaces failed: {failed}")
    log.info("nightly: re-quantized %d workspaces", len(outcome))
    return outcome


@flow(name="vitq-watch-data")
def watch_data_flow(workspaces: list[str]) -> list[str]:
    """Emit `vitq.calibration-data.changed` for each workspace whose calibration digest changed."""
    from prefect.events import emit_event
    from prefect.variables import Variable

    changed = []
    for w in workspaces:
        ws = Workspace(Path(w).resolve())
        digest = calibration_digest(ws, load_params(ws.params_file))
        resource = workspace_resource_id(w)
        var = resource.replace(".", "_")  # variable names: letters, digits, _ and -
        previous = Variable.get(var, default=None)
        if previous is None:
            log.info("%s: calibration digest %s recorded (first look; no run)", w, digest)
        elif previous != digest:
            emit_event(event=DATA_CHANGED, resource={"prefect.resource.id": resource, "prefect.resource.name": str(ws.root)},
                       payload={"workspace": str(ws.root), "digest": digest, "previous": previous})
            log.info("%s: calibration data changed (%s -> %s); event %s emitted", w, previous, digest, DATA_CHANGED)
            changed.append(str(ws.root))
        Variable.set(var, digest, overwrite=True)
    return changed
