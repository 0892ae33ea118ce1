"""`vitq` command line: `vitq run` (the Prefect flow), `vitq stage <name>` (one stage, as dvc.yaml
calls it), `vitq recipes` (the registry), and the experiments in vitq/experiments/ (`vitq latency`,
`vitq coreml-coverage`, `vitq recovery-accuracy`, `vitq peers`, `vitq calibration-bench`, `vitq zoo`; the first
three also called `bench`, `coreml-bench`, `recovery`).
Bad input: one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from vitq import interrupt, logs
from vitq.errors import VitqError

STAGE_NAMES = ("data", "model", "export", "calibrate", "needs", "search", "smoothquant", "reference", "plan", "quantize",
               "validate", "benchmark", "report")
VARIANT_STAGES = ("quantize", "validate")  # one per variant: `vitq stage quantize RECIPE` (dvc.yaml's quantize@RECIPE)
_console = logging.getLogger("vitq")  # its lines with extra=logs.CONSOLE: on the console also while a log file is open


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vitq", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="a new workspace for your own model and data (params.yaml, dvc.yaml, git, DVC)")
    init.add_argument("directory", help="the workspace folder (created if missing; an existing workspace is refused)")
    init.add_argument("--model", default="train", help="timm:NAME | torchvision:NAME | python:FILE.py:FUNCTION | "
                      "onnx:FILE.onnx | train (default: the embedded digits ViT, trained here)")
    init.add_argument("--checkpoint", help="local weights for timm / torchvision / python (state dict or .safetensors)")
    init.add_argument("--data", help="image folder: val/<class>/<image> (or val/<image>: no labels; val_masks/<image>.png: "
                      "ground-truth masks for --task dense), and calibration/ or train/ (required but for --model train)")
    init.add_argument("--image-size", type=int, help="input side in pixels (default: the model's own)")
    init.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3 (default: the model's own)")
    init.add_argument("--mean", help="per-channel input mean, e.g. 0.485,0.456,0.406 (default: the model library's)")
    init.add_argument("--std", help="per-channel input std, with --mean")
    init.add_argument("--num-classes", type=int, help="the model's outputs (default: the class folders of val/)")
    init.add_argument("--arch", default="{}", help="builder keyword arguments as a YAML mapping, e.g. '{img_size: 384}'")
    init.add_argument("--task", default="classification", choices=("classification", "dense"),
                      help="what the model outputs: classification logits (N, classes) or dense maps (N, K, H, W); "
                      "sets the budget keys (max_top1_drop, or min_mask_iou / max_miou_drop)")
    init.add_argument("--recipes", help="comma-separated recipes (default: the documented list, less what the model "
                      "source cannot take; `vitq recipes`)")
    init.add_argument("--name", help="the model's name in reports and MLflow (default: from the model)")
    init.add_argument("--outputs", help="a model with several outputs (SAM: masks, IoU predictions): the one(s) --task "
                      "judges, comma-separated (output_0,.. for a tuple, the keys of a dict, an ONNX file's names); "
                      "every other output is checked against FP32 (task.outputs)")
    init.add_argument("--dvc-remote", metavar="URL", help="a DVC remote for the workspace, made its default remote: "
                      "s3://bucket/path, a directory, or any URL DVC supports (what `vitq orchestrate --dvc-remote` "
                      "pushes to)")
    init.add_argument("--dvc-remote-name", metavar="NAME", help="the remote's name (default: s3 for an s3:// URL, "
                      "storage otherwise)")
    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow, tracked in MLflow and DVC")
    run.add_argument("--workdir", default=".", help="workspace holding params.yaml and dvc.yaml (default: .)")
    run.add_argument("--force", action="store_true", help="rerun every stage even if DVC says it is up to date")
    _verbose(run)
    stage = sub.add_parser("stage", help="run one stage in the workspace (what dvc.yaml calls)")
    stage.add_argument("name", help=f"one of: {', '.join(STAGE_NAMES)}")
    stage.add_argument("recipe", nargs="?", help="for quantize and validate: the variant's recipe (quantize@<recipe>)")
    stage.add_argument("--workdir", default=".")
    _verbose(stage)
    rec = sub.add_parser("recipes", help="list the quantization recipes (presets, and those params.yaml defines)")
    rec.add_argument("--workdir", default=".", help="workspace whose params.yaml `quantize.define` adds recipes")
    for lat in _experiment(sub, "latency", "bench", _latency,
                           "FP32 vs dynamic vs default static INT8 latency, side by side (reports/bench.json)"):
        lat.add_argument("--models", default="vit_base_patch16_224,demo",
                         help="comma-separated timm names (random weights) and/or 'demo' (the workspace's trained model)")
        lat.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
        lat.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
        lat.add_argument("--repeats", type=int, default=50, help="timed runs per variant and batch")
        lat.add_argument("--rounds", type=int, default=10,
                         help="interleaved rounds the repeats are split into (more: finer pairing on a shared machine)")
        lat.add_argument("--static-recipe", default=None, help="static recipe to compare (default: the pipeline default)")
        lat.add_argument("--workdir", default=".")
        lat.add_argument("--out", default="reports/bench.json")
        lat.add_argument("--profile", action="store_true",
                         help="also ONNX Runtime's profile of each model (op types by time; bench.json 'profiles')")
    for rec in _experiment(sub, "recovery-accuracy", "recovery", _recovery_accuracy,
                           "plain INT8 vs the accuracy-recovery recipes per case (reports/recovery.json)"):
        rec.add_argument("--cases", default="digits,outliers,efficientvit_b0",
                         help="comma-separated: digits, outliers, outliers_multi, outliers_heavy, "
                              "outliers_alternating, efficientvit_b0")
        rec.add_argument("--workdir", default=".")
        rec.add_argument("--out", default="reports/recovery.json")
    for sc in _experiment(sub, "recovery-scale", None, _recovery_scale,
                          "seconds per stage and per recovery recipe on a full-size timm ViT with random weights "
                          "(reports/recovery_scale.json)"):
        sc.add_argument("--model", default="vit_base_patch16_224", help="a timm name (random weights)")
        sc.add_argument("--calibration", type=int, default=256, help="calibration images")
        sc.add_argument("--validation", type=int, default=500, help="validation images (data.holdout_size of them held out)")
        sc.add_argument("--recipes", default="onnx-w8a8-auto,onnx-w8a8-smoothquant,onnx-w8a8-search",
                        help="comma-separated recipes, each timed")
        sc.add_argument("--scratch", default=".recovery-scale", help="folder for its own workspace (reused: the "
                        "prepared stages run again, the random checkpoint is kept)")
        sc.add_argument("--workdir", default=".")
        sc.add_argument("--out", default="reports/recovery_scale.json")
    for peers in _experiment(sub, "peers", None, _peers,
                             "ONNX Runtime's, NNCF's and ModelOpt's INT8 next to vitq's recipes, same FP32 ONNX and images "
                             "(reports/peers.json, reports/peers.md)"):
        peers.add_argument("--cases", default="digits,outliers,outliers_multi,outliers_heavy,outliers_alternating",
                           help="comma-separated cases of `vitq recovery-accuracy`")
        peers.add_argument("--peers", default="ort,nncf,nncf-ac",
                           help="comma-separated: ort (onnxruntime quantize_static, defaults), nncf "
                                "(nncf.quantize, TRANSFORMER), nncf-ac (nncf.quantize_with_accuracy_control), "
                                "modelopt (NVIDIA ModelOpt's ONNX INT8 PTQ, its own venv and process); "
                                "nncf and nncf-ac need the optional extra: pip install -e '.[nncf]'; modelopt: "
                                "make modelopt")
        peers.add_argument("--recipes", default="onnx-w8a8-minmax,onnx-w8a8-auto",
                           help="comma-separated vitq ONNX recipes to run beside them")
        peers.add_argument("--workdir", default=".")
        peers.add_argument("--out", default="reports/peers.json")
    for cb in _experiment(sub, "calibration-bench", None, _calibration_bench,
                          "calibrate-stage time vs ONNX Runtime FP32 forward time, same images and batches "
                          "(reports/calibration_bench.json)"):
        cb.add_argument("--model", default="vit_base_patch16_224", help="timm name (random weights) or 'demo'")
        cb.add_argument("--images", type=int, default=256, help="calibration images (a seeded random tensor)")
        cb.add_argument("--batch-size", type=int, default=None, help="images a run (default: calibration.batch_size's default)")
        cb.add_argument("--workdir", default=".")
        cb.add_argument("--out", default="reports/calibration_bench.json")
    for cm in _experiment(sub, "coreml-coverage", "coreml-bench", _coreml_coverage,
                          "Core ML FP16 / W8 / W8A8 sizes and int8 coverage per model "
                          "(reports/coreml.json); runs on Linux, no Core ML runtime needed"):
        cm.add_argument("--models", default=None, help="comma-separated: 'demo' (the workspace's model), timm names, "
                        "'torchvision:<name>' (default: demo and the five reference ViTs)")
        cm.add_argument("--workdir", default=".")
        cm.add_argument("--out", default="reports/coreml.json")
    for sc in _experiment(sub, "scale", None, _scale,
                          "the default `vitq init` + `vitq run` on swin_t, ViT-B/16, ViT-L/16 and SAM's encoder at "
                          "1024x1024, each run's wall time and peak RSS, per stage too (reports/scale.json, docs/scale.md)"):
        sc.add_argument("--models", default=None, help="comma-separated 'timm:<name>' / 'torchvision:<name>' "
                        "(default: torchvision:swin_t, timm:vit_base_patch16_224, timm:vit_large_patch16_224, "
                        "timm:samvit_base_patch16)")
        sc.add_argument("--runs", type=int, default=2, help="runs per model (default 2)")
        sc.add_argument("--images", type=int, default=48, help="validation images (calibration: half as many)")
        sc.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is killed")
        sc.add_argument("--workdir", default=".")
        sc.add_argument("--scratch", default=None, help="folder for the users' folders and workspaces "
                        "(default: reports/scale-runs under --workdir)")
        sc.add_argument("--out", default="reports/scale.json")
        sc.add_argument("--markdown", default="docs/scale.md", help="the table's file ('' for none)")
    for zoo in _experiment(sub, "zoo", None, _zoo,
                           "the zoo matrix: 42 vision transformers through ONNX Runtime, TensorRT graphs, Core ML, "
                           "ModelOpt and NNCF, each model and target in its own process (reports/zoo.json, docs/zoo.md)"):
        zoo.add_argument("--models", default=None,
                         help="comma-separated timm names or 'torchvision:<name>' (default: the whole list)")
        zoo.add_argument("--slice", default=None, help="'ci': the 3 models CI runs (tests/test_zoo.py)")
        zoo.add_argument("--targets", default=None,
                         help="comma-separated cells: onnx, tensorrt, coreml, modelopt, nncf (default: all; onnx "
                              "always runs: the others read its export)")
        zoo.add_argument("--timeout", type=float, default=1200.0, help="seconds per model and target (default 1200)")
        zoo.add_argument("--latency-seconds", type=float, default=15.0,
                         help="about how long the batch-1 latency of FP32, dynamic and static INT8 is timed per model")
        zoo.add_argument("--resume", action="store_true", help="keep the cells --out holds that passed; run the failed ones and those not run yet "
                         "(with --keep: the exports there are reused)")
        zoo.add_argument("--keep", default=None, help="folder to keep the models' exports and variants in "
                         "(default: a temporary folder, removed)")
        zoo.add_argument("--table-only", action="store_true",
                         help="run nothing: write the table (and the MLflow runs) from what --out holds")
        zoo.add_argument("--no-mlflow", action="store_true", help="do not log the MLflow runs (experiment vitq-zoo)")
        zoo.add_argument("--workdir", default=".")
        zoo.add_argument("--out", default="reports/zoo.json")
        zoo.add_argument("--markdown", default="docs/zoo.md", help="the table's file ('' for none)")
    pool_help = "KEY=POOL: the work pool for 'prepare' or a target (onnx, coreml, tensorrt); repeatable"
    orch = sub.add_parser("orchestrate", help="run the pipeline on Prefect work pools (needs PREFECT_API_URL and "
                                               "`vitq deploy`); steps go to the pool of their target")
    orch.add_argument("--workdir", default=".", help="workspace, at the same path on every worker (shared storage)")
    orch.add_argument("--pool", action="append", default=[], metavar="KEY=POOL", help=pool_help)
    orch.add_argument("--dvc-remote", default=None, help="DVC remote the prepared inputs and outputs are pushed to")
    orch.add_argument("--create-remote", action="store_true", help="add the DVC remote 's3' to the workspace's "
                      ".dvc/config as VITQ_DVC_S3_URL (set by the local stack) when it has none")
    orch.add_argument("--force", action="store_true", help="rerun every stage")
    orch.add_argument("--requantize", action="store_true", help="rerun quantize onward (prepared stages reused)")
    orch.add_argument("--start-timeout", type=float, default=600.0,
                      help="seconds a step waits for a live worker of its pool before failing (default 600)")
    orch.add_argument("--submit", action="store_true",
                      help="run the orchestrator itself as a flow run of the vitq-orchestrate deployment")
    _verbose(orch)
    dep = sub.add_parser("deploy", help="create the work pools, deployments, schedules and triggers on PREFECT_API_URL")
    dep.add_argument("--pool", action="append", default=[], metavar="KEY=POOL", help=pool_help)
    dep.add_argument("--workspace", action="append", default=[],
                     help="workspace the nightly and data-watch schedules cover (besides registered ones); repeatable")
    dep.add_argument("--dvc-remote", default=None, help="DVC remote for scheduled and triggered runs")
    dep.add_argument("--create-remote", action="store_true", help="add the DVC remote 's3' to each --workspace's "
                     ".dvc/config as VITQ_DVC_S3_URL (set by the local stack) where it has none")
    dep.add_argument("--paused", action="store_true", help="create the schedules inactive")
    cmp_ = sub.add_parser("compare", help="the variants of the last N pipeline runs side by side, from MLflow")
    cmp_.add_argument("--workdir", default=".")
    cmp_.add_argument("--runs", type=int, default=3, help="how many of the latest finished runs (default 3)")
    cmp_.add_argument("--experiment", default=None, help="MLflow experiment (default: params.yaml's)")
    return ap


def _verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything live: other libraries' logs and warnings, progress bars, Prefect's state "
                             "lines (by default they go to the log file, reports/logs/, named at the end)")


def _experiment(sub, name: str, old_name: str | None, run, help: str) -> list[argparse.ArgumentParser]:
    """The parsers of an experiment command and of its old name, if it has one: the same options, each with its own
    usage line (an argparse alias would print the new name in `vitq <old name> --help`)."""
    parsers = [sub.add_parser(name, help=help)]
    if old_name:
        parsers.append(sub.add_parser(old_name, help=f"old name of `vitq {name}`"))
    for parser in parsers:
        parser.set_defaults(run_experiment=run)
    return parsers


def _prefect_api() -> str:
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        raise VitqError("PREFECT_API_URL is not set: work pools need a Prefect server (start one with "
                        "`python infra/local/stack.py up` and `source .stack/env`)")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return url


def _orchestrate(args) -> int:
    from vitq.flows.routing import parse_pool_overrides
    from vitq.tasks.stages import preflight
    from vitq.params import load_params

    ws = _workspace(args.workdir)
    params = load_params(ws.params_file)
    preflight(ws, params)  # fail fast, before any server is asked
    pools = parse_pool_overrides(args.pool)
    if args.start_timeout <= 0:
        raise VitqError(f"--start-timeout {args.start_timeout} must be > 0 seconds")
    _prefect_api()
    from vitq.flows.preflight import check_orchestration

    # What the run needs, before any step is submitted: the DVC remote, MLflow, Prefect, the pools' workers.
    check_orchestration(ws, params, args.dvc_remote, args.create_remote, pools=pools or None,
                        start_timeout_s=args.start_timeout)
    parameters = dict(workspace=str(ws.root), force=args.force, requantize=args.requantize, dvc_remote=args.dvc_remote,
                      pools=pools or None, start_timeout_s=args.start_timeout)
    with _command_log(ws, "orchestrate", args.verbose) as log:
        _console.info("log file: %s (-v shows it here)", _shown(log.path), extra=logs.CONSOLE)
        if args.submit:
            from vitq.flows.routing import pool_map, run_step

            pool = pool_map(pools)["prepare"]
            step = run_step(f"vitq-orchestrate/{pool}", pool, parameters, run_name="orchestrate",
                            start_timeout_s=args.start_timeout, retries=0)
            _console.info("orchestrated run %s completed on pool %s (worker %s)", step.flow_run_id, step.pool,
                          step.worker, extra=logs.CONSOLE)
            summary = json.loads(ws.summary_file.read_text())
        else:
            from vitq.flows.distributed import orchestrate_flow

            summary = orchestrate_flow(**parameters)
    from vitq.tasks.report import summary_table

    print(summary_table(summary))
    print(f"summary: {ws.summary_file}  report: {ws.report_file}")
    print(f"full log: {_shown(log.path)}")
    return 0


def _deploy(args) -> int:
    from vitq.flows.deployments import deploy
    from vitq.flows.routing import parse_pool_overrides

    pools = parse_pool_overrides(args.pool)
    checked = [_workspace(w) for w in args.workspace]
    workspaces = [str(ws.root) for ws in checked]
    api = _prefect_api()
    from vitq.flows.preflight import check_deploy

    # What the deployments' runs need, before anything is applied: the DVC remote, MLflow, Prefect, the pools' workers.
    check_deploy(checked, args.dvc_remote, args.create_remote, pools=pools or None)
    for name in deploy(pools or None, workspaces, args.dvc_remote, schedules_active=not args.paused):
        print(f"deployment {name}")
    print(f"applied to {api}; start workers with `prefect worker start --pool <pool>` on each machine")
    return 0


def _floats(option: str, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise VitqError(f"{option} {value!r} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def _init(args) -> int:
    import yaml

    from vitq.init_workspace import InitOptions, init_workspace
    from vitq.recipes import RECIPES

    try:
        arch = yaml.safe_load(args.arch)
    except yaml.YAMLError:
        arch = None
    if not isinstance(arch, dict):
        raise VitqError(f"--arch {args.arch!r} must be a YAML mapping, e.g. '{{img_size: 384, num_heads: 6}}'")
    recipes = None
    if args.recipes is not None:
        recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
        unknown = [r for r in recipes if r not in RECIPES]
        if unknown or not recipes:
            raise VitqError(f"--recipes {args.recipes!r}: unknown {', '.join(unknown) or 'empty list'}; allowed: "
                            f"{', '.join(RECIPES)}")
    for option, value in (("--image-size", args.image_size), ("--num-classes", args.num_classes)):
        if value is not None and value < 1:
            raise VitqError(f"{option} {value} must be >= 1")
    opts = InitOptions(Path(args.directory), model=args.model, checkpoint=args.checkpoint, data=args.data,
                       image_size=args.image_size, channels=args.channels, mean=_floats("--mean", args.mean),
                       std=_floats("--std", args.std), num_classes=args.num_classes, arch=arch, task=args.task,
                       recipes=recipes, name=args.name,
                       outputs=[o.strip() for o in args.outputs.split(",") if o.strip()] if args.outputs else None,
                       dvc_remote=args.dvc_remote, dvc_remote_name=args.dvc_remote_name)
    for line in init_workspace(opts):
        print(line)
    return 0


def _compare(args) -> int:
    from vitq.tasks.layout import Workspace
    from vitq.params import load_params

    ws: Workspace = _workspace(args.workdir)
    experiment = args.experiment
    if experiment is None:
        if not ws.params_file.is_file():
            raise VitqError(f"no params.yaml in {ws.root}; pass --experiment or --workdir")
        experiment = load_params(ws.params_file).experiment_name
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ws.root / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise VitqError(f"no MLflow records at {uri}: run `vitq run` first, or set MLFLOW_TRACKING_URI")
    from vitq.flows.compare import compare_table

    print(compare_table(uri, experiment, args.runs))
    return 0


def _latency(args) -> int:
    from vitq.config import BenchmarkConfig
    from vitq.experiments import latency
    from vitq.experiments._models import resolve_model
    from vitq.recipes import get_recipe

    ws = _workspace(args.workdir)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise VitqError(f"--batches {args.batches!r} must be comma-separated integers, e.g. 1,8") from None
    if not batches or min(batches) < 1:
        raise VitqError(f"--batches {args.batches!r} must be positive integers")
    if args.threads < 1 or args.repeats < 1 or args.rounds < 1:
        raise VitqError(f"--threads {args.threads}, --repeats {args.repeats} and --rounds {args.rounds} must be >= 1")
    static = args.static_recipe or latency.DEFAULT_STATIC
    if get_recipe(static).scheme != "static" or get_recipe(static).target != "onnx":
        raise VitqError(f"--static-recipe {static!r} is not a static ONNX recipe")
    models = [resolve_model(name.strip(), ws) for name in args.models.split(",") if name.strip()]
    cfg = BenchmarkConfig(threads=args.threads, repeats=args.repeats, warmup=5, rounds=args.rounds)
    result = latency.run_bench(models, batches, cfg, ws.root / args.out, static, profile=args.profile)
    print(latency.bench_table(result))
    if args.profile:
        print(latency.profiles_table(result))
    print(f"machine: {result['machine']['cpu']} ({result['machine']['cores']} cores); wrote {args.out}")
    return 0


def _calibration_bench(args) -> int:
    from vitq.config import CalibrationConfig
    from vitq.experiments import calibration_bench
    from vitq.experiments._models import resolve_model

    if args.images < 1:
        raise VitqError(f"--images {args.images} must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise VitqError(f"--batch-size {args.batch_size} must be >= 1")
    ws = _workspace(args.workdir)
    model = resolve_model(args.model, ws)
    cfg = CalibrationConfig() if args.batch_size is None else CalibrationConfig(batch_size=args.batch_size)
    record = calibration_bench.run_calibration_bench(model, args.images, cfg, ws.root / args.out)
    print(calibration_bench.bench_line(record))
    print(f"machine: {record['machine']['cpu']} ({record['machine']['cores']} cores, load average at start "
          f"{record['machine']['load_average_at_start']}); wrote {args.out}")
    return 0


def _coreml_coverage(args) -> int:
    from vitq.experiments import coreml_coverage

    ws = _workspace(args.workdir)
    names = ([m.strip() for m in args.models.split(",") if m.strip()] if args.models
             else list(coreml_coverage.DEFAULT_MODELS))
    if not names:
        raise VitqError(f"--models {args.models!r} names no model")
    coreml_coverage.check_names(names)  # every name before the first (minutes-long) conversion
    records = coreml_coverage.run(names, ws.root / args.out, ws.root)
    print(coreml_coverage.table(records))
    print(f"wrote {args.out}")
    return 0


def _recovery_accuracy(args) -> int:
    from vitq.params import load_params
    from vitq.experiments.recovery_accuracy import recovery_table, run_recovery

    ws = _workspace(args.workdir)
    params = load_params(ws.params_file)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    records = run_recovery(ws, params, cases, ws.root / args.out)
    print(recovery_table(records))
    print(f"wrote {args.out}")
    return 0


def _recovery_scale(args) -> int:
    from vitq.experiments import recovery_scale

    recipes = recovery_scale.check_recipes([r.strip() for r in args.recipes.split(",") if r.strip()])
    if args.calibration < 1 or args.validation < 3:
        raise VitqError(f"--calibration {args.calibration} must be >= 1 and --validation {args.validation} >= 3")
    root = Path(args.workdir).resolve()
    result = recovery_scale.run_scale(args.model, args.calibration, args.validation, recipes,
                                      root / args.scratch, root / args.out)
    print(recovery_scale.scale_table(result))
    print(f"wrote {args.out}")
    return 0


def _peers(args) -> int:
    from vitq.params import load_params
    from vitq.experiments import peers

    chosen = peers.check_peers([n.strip() for n in args.peers.split(",") if n.strip()])  # before any work
    ws = _workspace(args.workdir)
    params = load_params(ws.params_file)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    result = peers.run_peers(ws, params, cases, chosen, recipes, ws.root / args.out)
    print(peers.peers_table(result))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


def _scale(args) -> int:
    from vitq.experiments import scale

    root = _workspace(args.workdir).root
    scratch = Path(args.scratch).resolve() if args.scratch else root / "reports" / "scale-runs"
    scale.main(args.models, args.runs, scratch, root / args.out, root / args.markdown if args.markdown else None,
               args.timeout, args.images)
    return 0


def _zoo(args) -> int:
    from vitq.experiments import zoo

    models = zoo.select_models(args.models, args.slice)  # every name checked before the first model
    interrupt.install()  # Ctrl-C / SIGTERM: the running cell's processes end with the sweep, one line says where
    cells = zoo.select_cells(args.targets)
    if args.timeout <= 0 or args.latency_seconds <= 0:
        raise VitqError(f"--timeout {args.timeout} and --latency-seconds {args.latency_seconds} must be > 0 seconds")
    root = _workspace(args.workdir).root
    out = root / args.out
    out.parent.mkdir(parents=True, exist_ok=True)

    def progress(i, n, name, cell, rec):
        what = (f"{rec['sqnr_db']:.1f} dB" if "sqnr_db" in rec else
                f"{rec['static']['sqnr_db']:.1f} dB static" if "static" in rec else "ok") \
            if rec["status"] == "ok" else f"FAILED in {rec['stage']}: {rec['cause']}"
        print(f"[{i}/{n}] {name} {cell}: {what} ({rec.get('seconds', 0):.0f} s, peak {rec.get('peak_rss_mb') or 0:.0f} MB)",
              flush=True)

    if args.table_only:
        result = zoo.table_only(out, mlflow_root=None if args.no_mlflow else root)
    else:
        result = zoo.run_zoo(models, cells, out, args.timeout, Path(args.keep).resolve() if args.keep else None,
                             resume=args.resume, mlflow_root=None if args.no_mlflow else root, on_cell=progress,
                             latency_s=args.latency_seconds)
    print(json.dumps(result["summary"], indent=1))
    if args.markdown:
        md = root / args.markdown
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(zoo.markdown(result))
        print(f"wrote {args.out} and {args.markdown}")
    else:
        print(f"wrote {args.out}")
    return 0


def _workspace(workdir: str):
    from vitq.tasks.layout import Workspace

    root = Path(workdir).resolve()
    if not root.is_dir():
        raise VitqError(f"workspace {workdir!r} is not a directory")
    return Workspace(root)


def _stage(args) -> int:
    if args.name not in STAGE_NAMES:
        raise VitqError(f"unknown stage {args.name!r}; allowed: {', '.join(STAGE_NAMES)}")
    from vitq.tasks.stages import run_stage, stage_record
    from vitq.params import load_params

    if (args.name in VARIANT_STAGES) != (args.recipe is not None):
        raise VitqError(f"`vitq stage {args.name}` " + ("names one recipe, e.g. `vitq stage quantize "
                        "onnx-w8a8-minmax`" if args.name in VARIANT_STAGES else "takes no recipe"))
    ws = _workspace(args.workdir)
    _take_signals(ws)
    extra = () if args.recipe is None else (args.recipe,)
    name = "@".join((args.name, *extra))
    params = load_params(ws.params_file)
    with _command_log(ws, f"stage-{name}", args.verbose) as log:
        with interrupt.stage(name):
            result = run_stage(args.name, ws, params, *extra)
        if not log.relayed:  # a stage the flow started: the flow says when it ended
            from vitq.tasks import resources

            record = stage_record(ws, args.name, *extra) or {}
            _console.info("%s: done in %.1f s%s", name, record.get("seconds", 0), resources.console_suffix(record),
                          extra=logs.CONSOLE)
    if isinstance(result, str):  # the report stage's table
        print(result)
    if not log.relayed:
        print(f"full log: {_shown(log.path)}")
    return 0


def _run(args) -> int:
    ws = _workspace(args.workdir)
    _take_signals(ws)
    from vitq.params import load_params

    params = load_params(ws.params_file)  # fail fast, before any server starts
    with _command_log(ws, "run", args.verbose) as log:
        summary = None
        if not args.force:
            from vitq.flows.dvc_state import up_to_date_summary

            summary = up_to_date_summary(ws)  # everything fresh: no server, no stage, no record
        fresh = summary is not None
        if not fresh:
            from vitq.tasks.stages import preflight

            preflight(ws, params)
            _console.info("log file: %s (-v shows it here)", _shown(log.path), extra=logs.CONSOLE)
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            from vitq import watchdog
            from vitq.flows.pipeline import run_pipeline

            watchdog.start()  # a kill -9 / OOM kill of this process leaves none of its server or stage processes

            summary = run_pipeline(ws.root, params, force=args.force)
    from vitq.tasks.report import summary_table

    print(summary_table(summary))
    if fresh:
        print(f"up to date (dvc.lock): nothing ran, nothing new recorded; summary: {ws.summary_file}")
    else:
        print(f"summary: {ws.summary_file}  report: {ws.report_file}")
    failed = [v["name"] for v in summary["variants"] if not v["passed"]]
    if failed:
        print(f"variants outside the accuracy budget: {', '.join(failed)}", file=sys.stderr)
    sys.stderr.flush()
    print(f"full log: {_shown(log.path)}")
    return 0


@contextlib.contextmanager
def _command_log(ws, command: str, verbose: bool) -> Iterator[logs.LogFile]:
    """`logs.log_file` for `run`, `stage` and `orchestrate`; a crash also names the log file on stderr, before
    its traceback (a VitqError's one line names it: `main`)."""
    opened = None
    try:
        with logs.log_file(ws.root, command, verbose or logs.verbose_default()) as opened:
            yield opened
    except (VitqError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        if opened is not None and not opened.relayed:
            print(f"vitq: full log: {_shown(opened.path)}", file=sys.stderr, flush=True)
        raise


def _shown(path: Path) -> str:
    """`path` relative to the current directory when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup()
    try:
        if getattr(args, "run_experiment", None):  # latency, coreml-coverage, recovery-accuracy, peers, or old names
            return args.run_experiment(args)
        if args.command == "orchestrate":
            from vitq.flows.routing import StepFailed

            try:
                return _orchestrate(args)
            except StepFailed as exc:  # a step failed or found no worker: not bad input, but one clear line
                log = logs.last()
                print(f"vitq: error: {exc}" + (f" (full log: {_shown(log.path)})" if log else ""), file=sys.stderr)
                return 1
        if args.command == "init":
            return _init(args)
        if args.command == "deploy":
            return _deploy(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "recipes":
            from vitq.plugins import load_plugins
            from vitq.recipes import RECIPES, describe_recipe

            load_plugins()
            params_file = Path(args.workdir) / "params.yaml"
            if params_file.is_file():  # registers the recipes its quantize.define adds
                from vitq.params import load_params

                load_params(params_file)
            for r in RECIPES.values():
                print(describe_recipe(r))
            return 0
        if args.command == "stage":
            return _stage(args)
        if args.command == "run":
            return _run(args)
    except VitqError as exc:
        log = logs.last()  # an error after the command opened its log file: where the rest of the story is
        where = f" (full log: {_shown(log.path)})" if log is not None and not log.relayed else ""
        print(f"vitq: error: {exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # commands without a teardown of their own (the experiments, ...)
        print(f"vitq: interrupted during {interrupt.describe()}", file=sys.stderr)
        return 130
    return 0


def _take_signals(ws) -> None:
    """`run` and `stage`: Ctrl-C / SIGTERM end the command within seconds, naming the stage
    (`vitq.interrupt`); first remove what a killed run may have left half-written."""
    from vitq.tasks._io import remove_partial_outputs

    interrupt.install(ws.root)
    for path in remove_partial_outputs(ws.root):
        logging.getLogger("vitq").info("removed %s (left by an interrupted run)", path.relative_to(ws.root))


if __name__ == "__main__":
    sys.exit(main())
