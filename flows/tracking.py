"""MLflow records: an experiment per model, a parent run per pipeline run, a child run per variant.

In MLflow's own terms: the experiment is a model-training experiment (the UI opens on its runs table);
the calibration and validation splits are dataset inputs of every run (named by their source, digest =
DVC's md5 of the split's file); each variant is a LoggedModel of its child run (ONNX variants in the ONNX
flavor with a signature and an input example; Core ML packages and TensorRT engines as model artifacts
with their metadata), carrying the child's metrics on the validation dataset; the registry's versions
come from those models.

Tracking URI from MLFLOW_TRACKING_URI; default: a SQLite file in the workspace (`mlflow ui
--backend-store-uri sqlite:///mlflow.db` shows it), artifacts under `mlartifacts/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import zipfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource  # made per artifact repository when mlflow.data loads
from mlflow.entities import LoggedModelOutput
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from vitq.flows import recorded
from vitq.tasks._io import file_digest
from vitq.flows.registry import register_best
from vitq.tasks.data import load_data_result, load_split, model_inputs
from vitq.tasks.layout import Workspace
from vitq.tasks.model import load_model_spec
from vitq.tasks.variant import load_variant, variant_dir
from vitq.tasks.targets.registry import get_target
from vitq.config import Params, params_hash
from vitq.logs import CONSOLE

log = logging.getLogger("vitq.flow")


def configure(ws: Workspace) -> str:
    """Point MLflow at this workspace's tracking store (MLFLOW_TRACKING_URI, else its SQLite file)."""
    uri = recorded.tracking_uri(ws.root)
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # MLflow 3 also exports the URI as MLFLOW_TRACKING_URI: undo that, or this workspace's store would pass for
    # a user's server (experiment artifacts in ./mlruns instead of mlartifacts/) and follow into later workspaces.
    if user_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return uri


# MLflow 3's UI reads this experiment tag: "custom_model_development" opens the experiment on its runs table
# (the model-training view); without it the UI guesses and opens the GenAI view (traces, sessions).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def _experiment_id(name: str, ws: Workspace) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made before vitq marked its experiments; a user's choice stays
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (ws.root / "mlartifacts").as_uri()  # beside the default SQLite store
    return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "not a git repository"


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = str(v)
    return flat


def _output_metrics(outputs: dict) -> dict[str, float]:
    """A model with several outputs: each output's numbers as `output.<name>.<metric>` (its own metric function's
    under `output.<name>.metrics.<key>`), `output.<name>.passed` as 0/1; names outside MLflow's characters get `_`."""
    flat: dict[str, float] = {}
    for name, record in outputs.items():
        key = re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(name))
        for metric, value in record.items():
            if isinstance(value, bool):
                flat[f"output.{key}.{metric}"] = float(value)
            elif isinstance(value, (int, float)):
                flat[f"output.{key}.{metric}"] = float(value)
            elif isinstance(value, dict):
                flat.update({f"output.{key}.metrics.{re.sub(r'[^A-Za-z0-9_.-]', '_', str(k))}": float(x)
                             for k, x in value.items() if isinstance(x, (int, float)) and not isinstance(x, bool)})
    return flat


_VARIANT_METRICS = (
    "size_mb", "compression", "int8_weight_fraction", "top1", "top1_drop", "agreement", "cosine", "sqnr_db",
    "psnr_db", "mask_iou", "miou", "miou_drop", "latency_ms_p50", "latency_ms_p95", "throughput_ips", "speedup",
)


def stage_resource_metrics(summary: dict, ran: list[str]) -> dict[str, float]:
    """`stage.<stage>.seconds` and `.peak_rss_mb` of each stage this run ran (summary.json's records; a variant's
    stage `quantize@r` as `stage.quantize.r.*`: MLflow keys take no '@')."""
    out = {}
    for r in summary.get("stages") or []:
        if r["stage"] in ran:
            key = "stage." + r["stage"].replace("@", ".")
            out[f"{key}.seconds"] = float(r["seconds"])
            if r.get("peak_rss_mb") is not None:
                out[f"{key}.peak_rss_mb"] = float(r["peak_rss_mb"])
    return out


def log_pipeline_run(
    ws: Workspace,
    params: Params,
    summary: dict,
    stage_metrics: dict[str, float],
    ran: list[str],
    run_key: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str | None:
    """Log one pipeline run (parent) and its variants (children), register the best variant per
    target, and return the parent run id.

    `run_key` (the Prefect flow run id) makes this idempotent: a finished parent run with the same
    key is returned as is, a half-logged one (its process died) is deleted and logged again, so a
    retry never duplicates or loses a record. Nothing ran (every stage up to date): nothing is logged, None.
    """
    if not ran and (recorded.is_recorded(ws.root, ws.summary_file) or recorded.recorded_in_store(ws.root, ws.summary_file)):
        # Every stage was up to date and MLflow holds this summary (a scheduled run on an unchanged workspace).
        log.info("MLflow: nothing ran and this summary is recorded already: no new run", extra=CONSOLE)
        return None
    configure(ws)
    exp_id = _experiment_id(params.experiment_name, ws)
    tags = {
        "git_commit": git_commit(ws.root),
        "data_digest": summary["data"]["digest"],
        "params_hash": params_hash(params),
        "model": summary["model"],
        "stages_run": ",".join(ran) or "none (all up to date)",
        **(extra_tags or {}),
    }
    if run_key:
        tags["vitq.run_key"] = run_key
        done = _existing_parent(exp_id, run_key)
        if done is not None:
            recorded.mark_recorded(ws.root, ws.summary_file, done)
            return done
    child_runs: dict[str, str] = {}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{summary['model']}-pipeline", tags=tags) as parent:
        mlflow.log_params(_flatten(params.model_dump(mode="json", by_alias=True)))
        base = {f"baseline_{k}": v for k, v in summary["baseline"].items() if isinstance(v, (int, float))}
        mlflow.log_metrics({**base, **stage_metrics, **stage_resource_metrics(summary, ran)})
        path = summary.get("critical_path") or []
        if path:
            mlflow.set_tag("critical_path", " -> ".join(f"{c['stage']} ({c['seconds']:.0f} s)" for c in path)[:5000])
        datasets = data_inputs(ws)
        _log_inputs(datasets)
        for f in (ws.summary_file, ws.report_file, ws.params_file, ws.benchmark_file):
            if f.is_file():
                mlflow.log_artifact(str(f), artifact_path="reports")
        # A child per variant MLflow does not hold yet: one already holding the same variant.json and verdict
        # (a variant this run did not remake, or remade identically) is linked from the parent instead.
        kept: dict[str, str] = {}
        for v in summary["variants"]:
            digest = _variant_digest(ws, v["name"])
            holder = _child_holding(exp_id, v["name"], digest)
            if holder is not None:
                child_runs[v["name"]] = kept[v["name"]] = holder
                continue
            with mlflow.start_run(
                experiment_id=exp_id, run_name=v["name"], nested=True,
                tags={**tags, "target": v["target"], "recipe": v["recipe"], "passed": str(v["passed"]),
                      "vitq.variant": v["name"], "vitq.variant_digest": digest},
            ) as child:
                child_runs[v["name"]] = child.info.run_id
                _log_inputs(datasets)
                folder = variant_dir(ws.variants_dir, v["name"])
                meta = (folder / "variant.json")
                recipe = {f"recipe.{k}": str(val) for k, val in _recipe(meta).items()}
                mlflow.log_params(recipe)
                record = json.loads(meta.read_text())
                metrics = {k: float(v[k]) for k in _VARIANT_METRICS if v.get(k) is not None}
                metrics["passed"] = float(v["passed"])
                metrics.update({f"{step}_seconds": float(sec) for step, sec in (v.get("seconds") or {}).items()})
                if v.get("peak_rss_mb") is not None:
                    metrics["peak_rss_mb"] = float(v["peak_rss_mb"])
                metrics.update(_output_metrics(v.get("outputs") or {}))
                if record.get("int8_mac_fraction") is not None:  # share of Linear/Conv MACs in INT8
                    metrics["int8_mac_fraction"] = float(record["int8_mac_fraction"])
                    mlflow.set_tag("float_layers", ",".join(record.get("float_layers", []))[:5000] or "none")
                art = load_variant(ws.variants_dir, v["name"])
                target = get_target(v["target"])
                model_id = log_variant_model(ws, v, folder, art, recipe, child.info.run_id)
                # The metrics on the run and on its model, measured on the validation dataset.
                mlflow.log_metrics(metrics, model_id=model_id, dataset=datasets["validation"])
                mlflow.set_tags({f"not_measured.{k}": str(why)[:5000] for k, why in (v.get("not_measured") or {}).items()})
                for artifact_path, files in target.artifacts(folder, art).items():
                    if artifact_path == "model":  # in the LoggedModel
                        continue
                    for f in files:
                        if f.is_file():
                            mlflow.log_artifact(str(f), artifact_path=artifact_path)
                        elif f.is_dir():
                            mlflow.log_artifacts(str(f), artifact_path=f"{artifact_path}/{f.name}")
                # Recovery recipes: what was decided and why (sensitivity table + plot, calibration choices).
                for f in ("recovery.json", "sensitivity.csv", "sensitivity.png", "calibration_search.csv"):
                    if (folder / f).is_file():
                        mlflow.log_artifact(str(folder / f), artifact_path="recovery")
                for f in (ws.validation_for(v["name"]) / f"{v['name']}.json", *ws.error_report_for(v["name"])):
                    if f.is_file():
                        mlflow.log_artifact(str(f), artifact_path="reports")
        for nr in summary["not_run"]:
            digest = "not-run:" + hashlib.sha256(nr["reason"].encode()).hexdigest()[:16]
            holder = _child_holding(exp_id, nr["name"], digest)
            if holder is not None:
                kept[nr["name"]] = holder
                continue
            with mlflow.start_run(experiment_id=exp_id, run_name=nr["name"], nested=True,
                                  tags={**tags, "not_run": nr["reason"], "vitq.variant": nr["name"],
                                        "vitq.variant_digest": digest}):
                pass
        # The parent links every variant it did not make to the run that holds it (same artifact, same verdict).
        mlflow.set_tags({f"vitq.kept.{name}": run for name, run in kept.items()})
        mlflow.set_tag("variants_kept", ",".join(sorted(kept)) or "none")
        for png in sorted(ws.plots_dir.glob("tradeoff-*.png")):
            mlflow.log_artifact(str(png), artifact_path="plots")
        version_tags = {"params_hash": tags["params_hash"], "git_commit": tags["git_commit"],
                        "parent_run_id": parent.info.run_id, "workspace": str(ws.root)}
        decisions = register_best(mlflow.MlflowClient(), params.experiment_name, summary, child_runs, version_tags)
        mlflow.set_tags({f"registry.{target}": line[:500] for target, line in decisions.items()})
        mlflow.set_tag(recorded.SUMMARY_TAG, recorded.summary_digest(ws.summary_file))  # last: a whole record
    recorded.mark_recorded(ws.root, ws.summary_file, parent.info.run_id)
    return parent.info.run_id


# Data and models in MLflow's own terms.
DATA_SPLITS = ("calibration", "validation")  # the splits every run reads (dataset input contexts)


def _npz_schema(path: Path) -> Schema:
    """The arrays of an .npz as tensor specs (batch axis -1), read from their headers without loading them."""
    specs = []
    with zipfile.ZipFile(path) as z:
        for entry in z.namelist():
            with z.open(entry) as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
            specs.append(TensorSpec(dtype, (-1, *shape[1:]), entry.removesuffix(".npy")))
    return Schema(specs)


def data_inputs(ws: Workspace) -> dict[str, MetaDataset]:
    """The calibration and validation splits as MLflow datasets: the DVC-tracked `.npz` as the source, named
    `<data.source>-<split>`, digest DVC's md5 of that file, schema its arrays (images, labels, masks)."""
    result = load_data_result(ws.data_dir)
    out = {}
    for split in DATA_SPLITS:
        path = ws.data_dir / f"{split}.npz"
        out[split] = MetaDataset(LocalArtifactDatasetSource(str(path)), name=f"{result.source}-{split}",
                                 digest=file_digest(path, "md5"), schema=_npz_schema(path))
    return out


def _log_inputs(datasets: dict[str, MetaDataset]) -> None:
    for split, ds in datasets.items():
        mlflow.log_input(ds, context=split)


def _onnx_signature(model) -> ModelSignature:
    """The ONNX graph's own inputs and outputs as tensor specs (symbolic axes such as the batch: -1)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    def specs(values):
        return Schema([TensorSpec(tensor_dtype_to_np_dtype(t.type.tensor_type.elem_type),
                                  tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.type.tensor_type.shape.dim),
                                  t.name) for t in values])

    initializers = {i.name for i in model.graph.initializer}
    return ModelSignature(specs([i for i in model.graph.input if i.name not in initializers]), specs(model.graph.output))


def _input_example(ws: Workspace) -> np.ndarray:
    """One validation image preprocessed as the model expects: (1, C, H, W) float32."""
    spec = load_model_spec(ws.model_dir)
    return model_inputs(load_split(ws.data_dir, "validation").images[:1], spec.mean, spec.std)


_ONNX_EXTERNAL_DATA_BYTES = 1 << 30  # larger graphs keep their weights in a side file (protobuf's 2 GiB limit)


def log_variant_model(ws: Workspace, v: dict, folder: Path, art, recipe: dict[str, str], run_id: str) -> str:
    """Log variant `v` as a LoggedModel of the active (child) run and return its model id.

    A served ONNX file goes in the ONNX flavor (pyfunc-loadable by ONNX Runtime) with the graph's signature
    and a validation image as input example; the target's other model files (the portable Q/DQ graph) and
    variant.json ride along. Any other artifact (a Core ML .mlpackage, a TensorRT engine) is a LoggedModel of
    model type `<target>` holding the target's model files and variant.json, its metadata as tags."""
    import onnx

    files = [f for f in get_target(v["target"]).artifacts(folder, art)["model"] if f.exists()]
    served = folder / art.artifact
    meta = {"vitq.variant": v["name"], "vitq.target": v["target"], "vitq.recipe": v["recipe"],
            "vitq.served_file": art.artifact, "vitq.qdq_file": art.qdq_artifact,
            "vitq.int8_weight_fraction": str(art.int8_weight_fraction), "vitq.size_mb": str(art.size_mb),
            "vitq.tensorrt_ready": str(art.tensorrt_ready), **_target_metadata(folder)}
    if served.suffix == ".onnx" and served.is_file():
        import onnxruntime

        model = onnx.load(str(served))
        info = mlflow.onnx.log_model(
            model, name=v["name"], signature=_onnx_signature(model), input_example=_input_example(ws),
            # Pinned here: MLflow would otherwise infer them by loading the model in a subprocess (seconds each).
            pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
            extra_files=[str(f) for f in files if f != served and f.is_file()] + [str(folder / "variant.json")],
            save_as_external_data=served.stat().st_size > _ONNX_EXTERNAL_DATA_BYTES,
            onnx_execution_providers=["CPUExecutionProvider"],  # the served form is ONNX Runtime CPU-fused
            params=recipe, tags=meta, model_type=f"{v['target']}-int8")
        return info.model_id
    client = mlflow.MlflowClient()
    lm = mlflow.initialize_logged_model(name=v["name"], source_run_id=run_id, params=recipe, tags=meta,
                                        model_type=v["target"])
    try:
        with tempfile.TemporaryDirectory() as tmp:  # files first, then each directory (e.g. a .mlpackage) under its name
            for f in [*(f for f in files if f.is_file()), folder / "variant.json"]:
                os.symlink(f, Path(tmp) / f.name)
            client.log_model_artifacts(lm.model_id, tmp)
        for d in (f for f in files if f.is_dir()):
            client.log_model_artifacts(lm.model_id, str(d), artifact_path=d.name)
    except BaseException:
        mlflow.finalize_logged_model(lm.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(lm.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, step=0)])  # the run's Models column
    return lm.model_id


def _target_metadata(folder: Path) -> dict[str, str]:
    """Scalar fields of a target's own record in the variant folder (Core ML: coreml.json), as model tags."""
    out = {}
    for name in ("coreml.json", "tensorrt.json", "engine.json"):
        f = folder / name
        if f.is_file():
            rec = json.loads(f.read_text())
            if isinstance(rec, dict):
                out.update({f"vitq.{f.stem}.{k}": str(val)[:500] for k, val in _flatten(rec).items()})
    return out


def _variant_digest(ws: Workspace, name: str) -> str:
    """What identifies a variant's record: its variant.json and its validation result, byte for byte."""
    h = hashlib.sha256()
    for f in (variant_dir(ws.variants_dir, name) / "variant.json", ws.validation_for(name) / f"{name}.json"):
        h.update(f.read_bytes() if f.is_file() else b"-")
    return h.hexdigest()[:32]


def _child_holding(exp_id: str, name: str, digest: str) -> str | None:
    """The newest finished child run of variant `name` with this digest, or None."""
    found = mlflow.MlflowClient().search_runs(
        [exp_id], filter_string=f"tags.`vitq.variant` = '{name}' and tags.`vitq.variant_digest` = '{digest}' "
                                "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


def _existing_parent(exp_id: str, run_key: str) -> str | None:
    """The finished parent run logged under `run_key`, after deleting any unfinished one."""
    client = mlflow.MlflowClient()
    found = client.search_runs([exp_id], filter_string=f"tags.`vitq.run_key` = '{run_key}'")
    for run in found:
        if "mlflow.parentRunId" not in run.data.tags and run.info.status == "FINISHED":
            return run.info.run_id
    for run in found:  # a half-logged attempt: parent and children share the key
        client.delete_run(run.info.run_id)
    return None


def _recipe(meta: Path) -> dict:
    import json

    return json.loads(meta.read_text())["recipe"]
