"""`vitq` command line: `vitq run` (the Prefect flow), `vitq stage <name>` (one stage, as dvc.yaml
calls it), `vitq recipes` (the registry). Bad input: one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from vitq.errors import VitqError

STAGE_NAMES = ("data", "model", "export", "calibrate", "quantize", "validate", "benchmark", "report")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("vitq").setLevel(level)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vitq", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow, tracked in MLflow and DVC")
    run.add_argument("--workdir", default=".", help="workspace holding params.yaml and dvc.yaml (default: .)")
    run.add_argument("--force", action="store_true", help="rerun every stage even if DVC says it is up to date")
    stage = sub.add_parser("stage", help="run one stage in the workspace (what dvc.yaml calls)")
    stage.add_argument("name", help=f"one of: {', '.join(STAGE_NAMES)}")
    stage.add_argument("--workdir", default=".")
    sub.add_parser("recipes", help="list the quantization recipes")
    bench = sub.add_parser("bench", help="FP32 vs dynamic vs default static INT8 latency, side by side (reports/bench.json)")
    bench.add_argument("--models", default="vit_base_patch16_224,demo",
                       help="comma-separated timm names (random weights) and/or 'demo' (the workspace's trained model)")
    bench.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    bench.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    bench.add_argument("--repeats", type=int, default=50, help="timed runs per variant and batch")
    bench.add_argument("--static-recipe", default=None, help="static recipe to compare (default: the pipeline default)")
    bench.add_argument("--workdir", default=".")
    bench.add_argument("--out", default="reports/bench.json")
    return ap


def _bench(args) -> int:
    from tasks import bench
    from vitq.config import BenchmarkConfig
    from vitq.recipes import get_recipe

    ws = _workspace(args.workdir)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise VitqError(f"--batches {args.batches!r} must be comma-separated integers, e.g. 1,8") from None
    if not batches or min(batches) < 1:
        raise VitqError(f"--batches {args.batches!r} must be positive integers")
    if args.threads < 1 or args.repeats < 1:
        raise VitqError(f"--threads {args.threads} and --repeats {args.repeats} must be >= 1")
    static = args.static_recipe or bench.DEFAULT_STATIC
    if get_recipe(static).scheme != "static" or get_recipe(static).target != "onnx":
        raise VitqError(f"--static-recipe {static!r} is not a static ONNX recipe")
    models = [bench.resolve_bench_model(name.strip(), ws) for name in args.models.split(",") if name.strip()]
    cfg = BenchmarkConfig(threads=args.threads, repeats=args.repeats, warmup=5, rounds=5)
    result = bench.run_bench(models, batches, cfg, ws.root / args.out, static)
    print(bench.bench_table(result))
    print(f"machine: {result['machine']['cpu']} ({result['machine']['cores']} cores); wrote {args.out}")
    return 0


def _workspace(workdir: str):
    from tasks.layout import Workspace

    root = Path(workdir).resolve()
    if not root.is_dir():
        raise VitqError(f"workspace {workdir!r} is not a directory")
    return Workspace(root)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        if args.command == "bench":
            return _bench(args)
        if args.command == "recipes":
            from vitq.recipes import RECIPES

            for r in RECIPES.values():
                print(f"{r.name:24s} target={r.target:8s} {r.description}")
            return 0
        if args.command == "stage":
            if args.name not in STAGE_NAMES:
                raise VitqError(f"unknown stage {args.name!r}; allowed: {', '.join(STAGE_NAMES)}")
            from tasks.stages import STAGES
            from vitq.config import load_params

            ws = _workspace(args.workdir)
            result = STAGES[args.name](ws, load_params(ws.params_file))
            if isinstance(result, str):  # the report stage's table
                print(result)
            return 0
        if args.command == "run":
            ws = _workspace(args.workdir)
            from vitq.config import load_params

            params = load_params(ws.params_file)  # fail fast, before any server starts
            from tasks.stages import preflight

            preflight(ws, params)
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            from flows.pipeline import run_pipeline

            summary = run_pipeline(ws.root, params, force=args.force)
            from tasks.report import summary_table

            print(summary_table(summary))
            print(f"summary: {ws.summary_file}  report: {ws.report_file}")
            failed = [v["name"] for v in summary["variants"] if not v["passed"]]
            if failed:
                print(f"variants outside the accuracy budget: {', '.join(failed)}", file=sys.stderr)
            return 0
    except VitqError as exc:
        print(f"vitq: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
