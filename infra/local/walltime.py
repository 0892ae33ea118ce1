"""Wall time of the orchestrated run (Prefect server + process workers on two pools, MLflow server,
S3) vs the embedded `vitq run`, on the same params, cold and with nothing changed.

    python infra/local/walltime.py --tiny            # the test suite's tiny configuration
    python infra/local/walltime.py --params params.yaml

Both start from empty workspaces; the stack's own start-up is reported apart. Results are printed
and written to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
import stack as local_stack  # noqa: E402

VITQ = str(Path(sys.executable).with_name("vitq"))


def _workspace(root: Path, params: dict) -> Path:
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    return root


def _timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--tiny", action="store_true", help="tests/conftest.py's tiny configuration")
    ap.add_argument("--recipes", default="onnx-w8-dynamic,onnx-w8a8-minmax,onnx-w8a8-percentile",
                    help="recipes for both runs (no worker serves macos/cuda here)")
    ap.add_argument("--out", default=str(REPO / "reports" / "walltime.json"))
    args = ap.parse_args()
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import tiny_params

        params = tiny_params()
    else:
        params = yaml.safe_load(Path(args.params).read_text())
    params["quantize"]["recipes"] = args.recipes.split(",")
    params["quantize"]["carry"] = {}  # the recipes given, nothing carried

    tmp = Path(tempfile.mkdtemp(prefix="vitq-walltime-"))
    base_env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                    "recipes": params["quantize"]["recipes"], "tiny": args.tiny}

    # Embedded: Prefect's temporary server, SQLite MLflow, no workers.
    emb_env = {k: v for k, v in base_env.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    emb_env["PREFECT_HOME"] = str(tmp / "prefect-embedded")
    ws = _workspace(tmp / "embedded", params)
    result["embedded_cold_s"] = _timed([VITQ, "run"], ws, emb_env)
    result["embedded_rerun_s"] = _timed([VITQ, "run"], ws, emb_env)

    # Orchestrated: real servers, workers on `cpu` (orchestrator, preparation) and `ort` (ONNX target).
    st = local_stack.Stack(tmp / "stack")
    try:
        start = time.perf_counter()
        st.start_s3()
        st.start_mlflow()
        st.start_prefect()
        env = {**base_env, **st.env}
        subprocess.run([VITQ, "deploy", "--pool", "onnx=ort", "--paused"], env=env, check=True, capture_output=True)
        st.start_worker("cpu", "cpu-1")
        st.start_worker("ort", "ort-1", limit=2)
        result["stack_start_s"] = time.perf_counter() - start
        ws = _workspace(tmp / "orchestrated", params)
        cmd = [VITQ, "orchestrate", "--pool", "onnx=ort", "--submit"]
        result["orchestrated_cold_s"] = _timed(cmd, ws, env)
        result["orchestrated_rerun_s"] = _timed(cmd, ws, env)
    finally:
        st.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'run':28s} {'cold s':>8s} {'no change s':>12s}")
    print(f"{'embedded (vitq run)':28s} {result['embedded_cold_s']:8.1f} {result['embedded_rerun_s']:12.1f}")
    print(f"{'orchestrated (2 pools)':28s} {result['orchestrated_cold_s']:8.1f} {result['orchestrated_rerun_s']:12.1f}")
    print(f"stack start-up (not included): {result['stack_start_s']:.1f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
