"""The distributed pipeline's pieces that need no server: pool routing, deployments vs prefect.yaml,
registry ranking against a real (SQLite) MLflow, benchmark merging, trade-off plots, CLI bad input."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, VITQ, run_env


def test_pool_map_defaults_follow_the_targets_and_reject_unknown_keys():
    from vitq.flows.routing import DEFAULT_POOLS, parse_pool_overrides, pool_map
    from vitq.tasks.targets.registry import TARGETS
    from vitq.errors import VitqError

    assert DEFAULT_POOLS == {"prepare": "cpu", "onnx": "cpu", "coreml": "macos", "tensorrt": "cuda"}
    assert {t.name: t.worker for t in TARGETS.values()}.items() <= DEFAULT_POOLS.items()
    assert pool_map({"tensorrt": "h100"})["tensorrt"] == "h100"
    assert parse_pool_overrides(["onnx=ort", "prepare = cpu-big"]) == {"onnx": "ort", "prepare": "cpu-big"}
    with pytest.raises(VitqError, match="unknown pool key 'gpu'; allowed: coreml, onnx, prepare, tensorrt"):
        parse_pool_overrides(["gpu=x"])
    with pytest.raises(VitqError, match="must be KEY=POOL"):
        parse_pool_overrides(["onnx"])


def _yaml_deployments() -> dict[str, dict]:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    flow_names = {"orchestrate_flow": "vitq-orchestrate", "prepare_flow": "vitq-prepare", "variant_flow": "vitq-variant",
                  "benchmark_flow": "vitq-benchmark", "nightly_flow": "vitq-nightly", "watch_data_flow": "vitq-watch-data"}
    out = {}
    for d in doc["deployments"]:
        out[f"{flow_names[d['entrypoint'].rsplit('.', 1)[1]]}/{d['name']}"] = d
    return out


def test_prefect_yaml_declares_the_same_deployments_as_vitq_deploy():
    from vitq.flows.deployments import JOB_VARIABLES, NIGHTLY_CRON, WATCH_INTERVAL_S, deployment_specs

    specs = {s.full_name: s for s in deployment_specs()}
    declared = _yaml_deployments()
    assert set(declared) == set(specs)
    for name, spec in specs.items():
        d = declared[name]
        assert d["entrypoint"] == spec.entrypoint and d["work_pool"]["name"] == spec.pool, name
        assert d["work_pool"]["job_variables"] == JOB_VARIABLES, name
        assert d.get("parameters", {}) == spec.parameters, name
        assert tuple(d.get("tags", ())) == spec.tags, name
        assert d.get("concurrency_limit") == spec.concurrency_limit, name
        schedules = d.get("schedules", [])
        assert [s.get("cron") for s in schedules if "cron" in s] == ([spec.cron] if spec.cron else []), name
        assert [s["interval"] for s in schedules if "interval" in s] == ([spec.interval_s] if spec.interval_s else [])
        assert bool(d.get("triggers")) == spec.data_trigger, name
    assert specs["vitq-nightly/cpu"].cron == NIGHTLY_CRON and specs["vitq-watch-data/cpu"].interval_s == WATCH_INTERVAL_S
    trigger = declared["vitq-orchestrate/cpu"]["triggers"][0]
    assert trigger["expect"] == ["vitq.calibration-data.changed"]
    assert trigger["parameters"] == {"workspace": "{{ event.payload.workspace }}"}


def test_every_target_pool_gets_variant_and_benchmark_deployments():
    from vitq.flows.deployments import deployment_specs

    names = {s.full_name for s in deployment_specs({"onnx": "ort", "tensorrt": "h100"})}
    for pool in ("ort", "h100", "macos"):
        assert {f"vitq-variant/{pool}", f"vitq-benchmark/{pool}"} <= names
    assert "vitq-variant/cpu" not in names  # the cpu pool only prepares and orchestrates here


def _summary(variants):
    return {"model": "m", "data": {"digest": "md5:abc"}, "variants": variants}


def _v(name, drop, size, lat=0.1, passed=True, target="onnx"):
    return {"name": name, "target": target, "recipe": name, "top1_drop": drop, "size_mb": size, "latency_ms_p50": lat,
            "agreement": 1.0, "sqnr_db": 30.0, "int8_weight_fraction": 1.0, "passed": passed}


def test_best_variant_is_the_smallest_drop_then_size_among_those_passing():
    from vitq.flows.registry import best_per_target, rank

    s = _summary([_v("a", 0.5, 1.0), _v("b", 0.2, 2.0), _v("c", 0.2, 1.5), _v("d", 0.0, 0.1, passed=False),
                  _v("t", 1.0, 1.0, target="tensorrt")])
    best = best_per_target(s)
    assert best["onnx"]["name"] == "c" and best["tensorrt"]["name"] == "t"
    assert rank({"top1_drop": None, "agreement": 0.99, "size_mb": 1.0}) == pytest.approx((1.0, 1.0, float("inf")))


def test_a_worse_run_never_steals_the_alias(tmp_path):
    """Real MLflow (SQLite store): register, then a worse run keeps the holder, a better one takes it."""
    import mlflow
    from mlflow import MlflowClient

    from vitq.flows.registry import register_best

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("m", artifact_location=(tmp_path / "art").as_uri())

    def run_with(name):
        run = client.create_run(exp, run_name=name)
        client.log_text(run.info.run_id, "onnx", "model/model.onnx")
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    first = run_with("b")
    d = register_best(client, "m", _summary([_v("b", 0.2, 2.0)]), {"b": first}, {"workspace": "/w"})
    assert d["onnx"].startswith("@onnx -> v1")
    holder = client.get_model_version_by_alias("m", "onnx")
    assert holder.run_id == first and holder.tags["data_digest"] == "md5:abc" and holder.tags["recipe"] == "b"
    assert float(holder.tags["top1_drop"]) == 0.2 and holder.tags["workspace"] == "/w"

    worse = run_with("b")
    d = register_best(client, "m", _summary([_v("b", 0.4, 1.0)]), {"b": worse}, {})
    assert d["onnx"].startswith("@onnx kept v1"), d
    assert client.get_model_version_by_alias("m", "onnx").run_id == first
    assert len(client.search_model_versions("name = 'm'")) == 1  # a loser is not even registered

    again = register_best(client, "m", _summary([_v("b", 0.2, 2.0)]), {"b": first}, {})
    assert "already is v1" in again["onnx"]

    better = run_with("c")
    d = register_best(client, "m", _summary([_v("c", 0.2, 1.0)]), {"c": better}, {})
    assert d["onnx"].startswith("@onnx -> v2") and "was v1" in d["onnx"]
    assert client.get_model_version_by_alias("m", "onnx").run_id == better
    mlflow.set_tracking_uri(None)


def test_merged_benchmark_keeps_each_pools_baseline():
    from vitq.flows.distributed import merge_benchmarks
    from vitq.tasks.benchmark import BenchmarkResult, Timing

    def t(p50, baseline="fp32", device="cpu"):
        return Timing(1.0, p50, p50, p50, 1000 / p50, 10, baseline, device)

    cpu = BenchmarkResult({"cpu": "x"}, {"batch_size": 1}, {"fp32": t(1.0), "a": t(0.5)})
    gpu = BenchmarkResult({"cpu": "y"}, {"batch_size": 1}, {"fp32": t(0.9), "fp16": t(0.2, device="cuda"),
                                                           "trt": t(0.1, "fp16", "cuda"), "b": t(0.3)},
                          not_measured={"c": "no engine"})
    m = merge_benchmarks({"cpu": cpu, "cuda": gpu}, "cpu")
    assert m.models["fp32"].latency_ms_p50 == 1.0 and m.models["fp32@cuda"].latency_ms_p50 == 0.9
    assert m.models["b"].baseline == "fp32@cuda" and m.models["trt"].baseline == "fp16"
    assert m.machine["pools"] == {"cpu": {"cpu": "x"}, "cuda": {"cpu": "y"}} and m.not_measured == {"c": "no engine"}
    assert merge_benchmarks({"cpu": cpu}, "cpu").models == cpu.models


def test_tradeoff_plots_per_target_and_one_report_section(tmp_path):
    from vitq.tasks.tradeoff import SECTION, append_plot_section, write_tradeoff_plots

    s = {"model": "m", "baseline": {"size_mb": 4.0},
         "variants": [_v("a", 0.5, 1.0), _v("b", None, 1.2, lat=None), _v("t", 1.0, 1.0, target="tensorrt", passed=False)]}
    plots = write_tradeoff_plots(s, tmp_path / "plots")
    assert [p.name for p in plots] == ["tradeoff-onnx.png", "tradeoff-tensorrt.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in plots)
    report = tmp_path / "report.md"
    report.write_text("# r\n\ntable\n")
    append_plot_section(report, plots)
    append_plot_section(report, plots)  # the stage reruns: still one section
    text = report.read_text()
    assert text.count(SECTION) == 1 and "![tradeoff-onnx](plots/tradeoff-onnx.png)" in text


def test_plan_record_changes_exactly_where_a_variant_reads(tmp_path):
    """The per-variant plan file is all a quantize@<recipe> stage declares about params and tables: it
    must change when (and only when) something that variant reads changes."""
    from vitq.tasks.calibrate import table_path
    from vitq.tasks.layout import Workspace
    from vitq.tasks.stages import plan_record
    from vitq.params import parse_params
    from conftest import tiny_params

    ws = Workspace(tmp_path)
    ws.calibration_dir.mkdir(parents=True)
    for method in ("minmax", "percentile", "entropy"):
        table_path(ws.calibration_dir, method).write_text(f'{{"{method}": 1}}')
    p = parse_params(tiny_params())

    def rec(params, name):
        return plan_record(ws, params, name)

    base = {n: rec(p, n) for n in ("onnx-w8-dynamic", "onnx-w8a8-minmax", "onnx-w8a8-percentile", "onnx-w8a8-auto",
                                   "onnx-w8a8-smoothquant", "coreml-w8a8")}
    assert base["onnx-w8a8-minmax"] != base["onnx-w8a8-percentile"]
    more = parse_params(tiny_params(quantize={"recipes": ["onnx-w8a8-minmax", "onnx-w8a8-entropy"], "carry": {}}))
    assert rec(more, "onnx-w8a8-minmax") == base["onnx-w8a8-minmax"]  # adding a recipe keeps the others' records
    for unrelated in (dict(benchmark={"repeats": 7}), dict(validate={"max_top1_drop": 0.5}), dict(max_workers=1)):
        changed = parse_params(tiny_params(**unrelated))
        assert all(rec(changed, n) == r for n, r in base.items()), unrelated  # declared by validate@/benchmark
    # a new percentile table: only the variants calibrated from it
    table_path(ws.calibration_dir, "percentile").write_text('{"percentile": 2}')
    after = {n: rec(p, n) for n in base}
    assert {n for n in base if after[n] != base[n]} == {"onnx-w8a8-percentile", "onnx-w8a8-auto"}
    # recovery settings: only the recovery recipes that read them (smoothquant reads the shared stage's result and
    # recovery.search_images)
    rp = parse_params(tiny_params(recovery={"sensitivity_images": 7}))
    assert {n for n in base if rec(rp, n) != after[n]} == {"onnx-w8a8-auto"}
    rp = parse_params(tiny_params(recovery={"search_images": 7}))
    assert {n for n in base if rec(rp, n) != after[n]} == {"onnx-w8a8-auto", "onnx-w8a8-smoothquant"}
    # the shared SmoothQuant result: its digest reaches exactly its readers
    ws.smoothquant_dir.mkdir(parents=True)
    (ws.smoothquant_dir / "smoothquant.json").write_text('{"needed": true, "alpha": 0.5}')
    assert {n for n in base if rec(p, n) != after[n]} == {"onnx-w8a8-auto", "onnx-w8a8-smoothquant"}
    (ws.smoothquant_dir / "smoothquant.json").unlink()
    ws.smoothquant_dir.rmdir()
    # the seed: what trains, calibrates in torch or converts (recovery, Core ML), not plain ONNX PTQ
    sp = parse_params(tiny_params(seed=3))
    assert {n for n in base if rec(sp, n) != after[n]} == {"onnx-w8a8-auto", "onnx-w8a8-smoothquant", "coreml-w8a8"}
    # the calibrate stage's histograms (the range search's candidates): their content digest reaches only the
    # recovery recipes, which rerun when it changes
    import json

    (ws.calibration_dir / "calibration.json").write_text(json.dumps(
        {"methods": ["minmax"], "images": 1, "tensors": 1, "op_types": [], "percentile": 99.9, "histograms_sha256": "a"}))
    with_a = {n: rec(p, n) for n in base}
    assert with_a["onnx-w8a8-auto"]["reads"]["calibration_histograms"] == "a"
    (ws.calibration_dir / "calibration.json").write_text(json.dumps(
        {"methods": ["minmax"], "images": 1, "tensors": 1, "op_types": [], "percentile": 99.9, "histograms_sha256": "b"}))
    assert {n for n in base if rec(p, n) != with_a[n]} == {"onnx-w8a8-auto"}


def _vitq(args, cwd: Path, **env):
    e = run_env(cwd)
    e.update(env)
    return subprocess.run([VITQ, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["orchestrate"], "PREFECT_API_URL is not set"),
    (["orchestrate", "--pool", "gpu=h100"], "unknown pool key 'gpu'"),
    (["orchestrate", "--start-timeout", "0"], "--start-timeout 0.0 must be > 0"),
    (["deploy", "--pool", "onnx"], "--pool 'onnx' must be KEY=POOL"),
    (["deploy"], "PREFECT_API_URL is not set"),
    (["compare"], "no MLflow records at sqlite:///"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    from conftest import make_workspace, tiny_params

    ws = make_workspace(tmp_path / "ws", tiny_params())
    proc = _vitq(args, ws)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitq: error: ") and message in lines[0], proc.stderr


def test_compare_rejects_bad_run_count_and_unknown_experiment(tmp_path):
    from mlflow import MlflowClient

    from vitq.flows.compare import compare_table
    from vitq.errors import VitqError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("present", artifact_location=(tmp_path / "a").as_uri())
    with pytest.raises(VitqError, match="--runs 0 must be >= 1"):
        compare_table(uri, "present", 0)
    with pytest.raises(VitqError, match="no MLflow experiment 'absent'.*experiments there: present"):
        compare_table(uri, "absent", 3)
    with pytest.raises(VitqError, match="has no finished pipeline run yet"):
        compare_table(uri, "present", 3)
