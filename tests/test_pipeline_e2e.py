"""The whole pipeline for real on a tiny configuration: Prefect's temporary server, MLflow in
SQLite, DVC's cache. Then the no-change rerun, `dvc repro` agreement, and selective reruns."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import make_workspace, run_env, tiny_params, vitq

pytestmark = pytest.mark.slow

from vitq.tasks.stages import PREPARED  # noqa: E402 - the stages before the variants, in order


def dvc_stages(params: dict) -> list[str]:
    """Every stage dvc.yaml makes from these params: two per variant."""
    q = params["quantize"]
    return [*PREPARED, *(f"{s}@{r}" for r in q["recipes"] for s in ("quantize", "validate")),
            *(f"carry-{s}@{r}" for r in q["carry"] for s in ("quantize", "validate")), "benchmark", "report"]


def stages_run(repro_stdout: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@.-]+)'", repro_stdout))


def dvc(args, cwd):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=run_env(cwd),
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("e2e") / "ws", tiny_params())
    proc = vitq(["run"], ws)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return ws, proc


def test_summary_follows_the_contract(ran):
    ws, proc = ran
    s = json.loads((ws / "reports" / "summary.json").read_text())
    assert s["model"] == "vit_digits_patch4_32"
    assert set(s["data"]) == {"calibration", "validation", "digest"} and s["data"]["digest"].startswith("md5:")
    assert s["baseline"]["top1"] > 0.5 and s["baseline"]["size_mb"] > 0 and s["baseline"]["latency_ms_p50"] > 0
    onnx = [v for v in s["variants"] if v["target"] == "onnx"]
    assert [v["name"] for v in onnx] == ["onnx-w8-dynamic", "onnx-w8a8-minmax", "onnx-w8a8-percentile",
                                         "onnx-w8a8-entropy", "onnx-w8a8-auto", "onnx-w8a8-smoothquant", "onnx-w8a8-search"]
    keys = {"name", "target", "recipe", "artifact", "size_mb", "compression", "int8_weight_fraction", "top1",
            "top1_drop", "agreement", "sqnr_db", "latency_ms_p50", "latency_ms_p95", "speedup", "passed", "not_measured"}
    for v in onnx:
        assert keys <= set(v), keys - set(v)
        assert (ws / v["artifact"]).is_file()
        assert v["compression"] > 1.5 and v["latency_ms_p50"] > 0 and v["not_measured"] == {}
        assert isinstance(v["passed"], bool)
    assert [(n["name"], "'tensorrt'" in n["reason"]) for n in s["not_run"]] == [("tensorrt-w8a8-percentile", True)]
    assert (ws / "reports" / "report.md").read_text().count("onnx-w8a8-") >= 3
    assert "onnx-w8a8-entropy" in proc.stdout  # the table printed at the end


def test_each_stage_s_time_and_memory_are_on_the_record(ran):
    """Issue 30 item 2 / issue 32 item 3: wall time and peak RSS per stage and per variant in summary.json (from
    the record beside each stage's outputs), the report's table and critical path, and MLflow's runs."""
    import mlflow

    ws, _ = ran
    s = json.loads((ws / "reports" / "summary.json").read_text())
    by = {r["stage"]: r for r in s["stages"]}
    recipes = [v["name"] for v in s["variants"]]
    expected = {*PREPARED, "benchmark"}
    expected |= {st for r in recipes for st in __import__("vitq.tasks.stages", fromlist=["x"]).variant_stages(r)}
    assert expected <= set(by), expected - set(by)
    for name in (*PREPARED, "benchmark"):  # alone: exact peaks
        assert by[name]["peak"] == "exact" and by[name]["beside"] == [] and by[name]["peak_rss_mb"] > 100, by[name]
    assert by["model"]["seconds"] > 0.5 and by["export"]["ended"] <= by["calibrate"]["started"]
    assert json.loads((ws / "reports" / "stages" / "export.json").read_text()) == by["export"]  # a DVC output
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert "reports/stages/quantize@onnx-w8a8-auto.json" in [o["path"] for o in lock["quantize@onnx-w8a8-auto"]["outs"]]
    for v in s["variants"]:
        assert set(v["seconds"]) == {"quantize", "validate"} and v["peak_rss_mb"] > 100, v["name"]
    # variants ran two at a time (max_workers: 2): some ran beside another, their peaks sampled
    assert any(r["beside"] and r["peak"] == "sampled" for r in s["stages"] if "@" in r["stage"])
    path = [c["stage"] for c in s["critical_path"]]
    assert path[:3] == ["data", "model", "export"] and path[-1] == "benchmark", path  # in time order, nothing twice
    starts = [by[n]["started"] for n in path]
    assert starts == sorted(starts) and len(set(path)) == len(path)
    assert s["critical_path"][1]["waited_on"] == {"stage": "data", "why": "dependency"}
    report = (ws / "reports" / "report.md").read_text()
    assert "## Where the time went" in report and "| quantize@onnx-w8a8-auto " in report
    assert "Critical path of the last run" in report and "data (" in report
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vit_digits_patch4_32").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.metrics["stage.calibrate.seconds"] == by["calibrate"]["seconds"]
    assert parent.data.metrics["stage.quantize.onnx-w8a8-auto.peak_rss_mb"] == by["quantize@onnx-w8a8-auto"]["peak_rss_mb"]
    assert parent.data.tags["critical_path"].startswith("data (")
    auto = next(r for r in runs if r.data.tags.get("mlflow.runName") == "onnx-w8a8-auto")
    assert auto.data.metrics["quantize_seconds"] == by["quantize@onnx-w8a8-auto"]["seconds"]
    assert auto.data.metrics["peak_rss_mb"] > 100


def _log_named(ws, console: str):
    """The file the console's `full log: <path>` line names (relative to the workspace, where vitq ran)."""
    (line,) = [ln for ln in console.splitlines() if ln.startswith("full log: ")]
    path = ws / line.removeprefix("full log: ")
    assert path.is_file() and path.parent == ws / "reports" / "logs", line
    return path


def test_the_console_is_quiet_and_the_log_file_holds_the_rest(ran):
    """vitq's lines on the console (a line per stage and variant with its time, the table, where the log is);
    Prefect's state lines, DVC's lock-file lines, warnings and progress bars in the log file."""
    ws, proc = ran
    console = proc.stdout + proc.stderr
    lines = console.splitlines()
    assert len(lines) <= 60, f"{len(lines)} console lines:\n{console}"
    # (a progress bar's \r reads as a line end in text mode: its "%|" is what shows it here)
    for noise in ("Finished in state", "Updating lock file", "Generating lock file", "Starting temporary server",
                  "Downloading artifacts", "Failed to load", "Warning", "%|", "\r"):
        assert noise not in console, (noise, console)
    for name in (*PREPARED, "benchmark"):  # with its record's peak
        assert re.search(rf"^{name}: done in [\d.]+ s, peak RSS [\d,]+ MB$", console, re.M), name
    assert re.search(r"^report: done in [\d.]+ s$", console, re.M)  # it reads the records: none of its own
    for recipe in tiny_params()["quantize"]["recipes"]:  # a line per variant, with the process's peak while it ran
        line = (rf"^{recipe}: (quantize \+ validate done in [\d.]+ s, peak RSS [\d,]+ MB"
                rf"( \(process, shared with variants beside it\))?|not run here: .+)$")
        assert re.search(line, console, re.M), recipe
    assert proc.stdout.splitlines()[-1].startswith("full log: ")  # the last line
    with open(_log_named(ws, proc.stdout), encoding="utf-8", newline="") as f:  # \r kept
        log = f.read()
    assert "Finished in state Completed()" in log and "Updating lock file 'dvc.lock'" in log  # Prefect's, DVC's
    assert "coremltools" in log and "\r" in log  # a library's warnings and its progress bars
    assert "vitq.flow: calibrate: running" in log  # vitq's other lines
    # the variant phase: workers from the machine (max_workers: null) and each one's share of the cores
    assert re.search(r"variants: \d+ at a time, \d+ thread\(s\) each \(max_workers: null: from the machine", log)
    assert "vitq.validate: validate: onnx-w8a8-minmax" in log
    again = vitq(["run"], ws)  # nothing to do: the table, one line, where the log is
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((again.stdout + again.stderr).splitlines()) <= 20, again.stdout + again.stderr
    assert _log_named(ws, again.stdout) != _log_named(ws, proc.stdout)  # a log file per run


def test_mlflow_has_parent_and_child_runs(ran):
    import mlflow

    ws, _ = ran
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vit_digits_patch4_32")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    tags = parents[0].data.tags
    assert tags["data_digest"].startswith("md5:") and len(tags["params_hash"]) == 16 and "git_commit" in tags
    assert {c.data.tags["mlflow.runName"] for c in children} == set(tiny_params()["quantize"]["recipes"]) | set(tiny_params()["quantize"]["carry"])
    auto = next(c for c in children if c.data.tags["mlflow.runName"] == "onnx-w8a8-auto")
    assert "int8_mac_fraction" in auto.data.metrics and "float_layers" in auto.data.tags
    logged = {f.path for f in client.list_artifacts(auto.info.run_id, "recovery")}
    rec = json.loads((ws / "artifacts" / "variants" / "onnx-w8a8-auto" / "recovery.json").read_text())
    assert "recovery/recovery.json" in logged
    # The sensitivity table and plot exist (and are logged) exactly when auto ranked the layers.
    assert ({"recovery/sensitivity.csv", "recovery/sensitivity.png"} <= logged) == (rec["ranking"] is not None), logged
    not_run = [c for c in children if "not_run" in c.data.tags]
    assert [c.data.tags["mlflow.runName"] for c in not_run] == ["tensorrt-w8a8-percentile"]
    for c in children:
        if c in not_run or c.data.params["recipe.target"] != "onnx":  # Core ML children: tests/test_coreml.py
            continue
        assert {"sqnr_db", "size_mb", "latency_ms_p50", "agreement"} <= set(c.data.metrics)
        (out,) = c.outputs.model_outputs  # the variant is the child's LoggedModel (ONNX flavor)
        assert "model.onnx" in {a.path for a in client.list_logged_model_artifacts(out.model_id)}


def _mlflow_run_ids(ws: Path) -> set[str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    return {r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}


def test_rerun_with_nothing_changed_runs_nothing(ran):
    """DVC says every stage is up to date: the table from summary.json, no server, no stage, no MLflow run."""
    ws, _ = ran
    before = _mlflow_run_ids(ws)
    again = vitq(["run"], ws)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "up to date (dvc.lock): nothing ran, nothing new recorded" in out, out[-2000:]
    assert "onnx-w8a8-entropy" in again.stdout  # the table
    assert "Starting temporary server" not in out and ": running" not in out and " done in " not in out, out[-2000:]
    assert _mlflow_run_ids(ws) == before
    # It stays near-instant: neither torch nor ONNX Runtime nor Prefect is imported on the way (seconds each).
    light = subprocess.run(
        [sys.executable, "-c", "import sys; from vitq.cli import main; rc = main(['run']); "
         "heavy = sorted({'torch', 'onnxruntime', 'prefect', 'mlflow'} & set(sys.modules)); print(rc, heavy)"],
        cwd=ws, env=run_env(ws), capture_output=True, text=True, timeout=300)
    assert light.stdout.strip().splitlines()[-1] == "0 []", light.stdout[-2000:] + light.stderr[-2000:]
    # The flow itself (a scheduled deployment run that finds every stage up to date) records nothing either.
    from vitq.flows import tracking
    from vitq.tasks.layout import Workspace
    from vitq.params import load_params

    summary = json.loads((ws / "reports" / "summary.json").read_text())
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{ws / 'mlflow.db'}"
    try:
        assert tracking.log_pipeline_run(Workspace(ws), load_params(ws / "params.yaml"), summary, {}, ran=[]) is None
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert _mlflow_run_ids(ws) == before
    repro = dvc(["repro"], ws)
    assert repro.returncode == 0, repro.stderr
    assert "Running stage" not in repro.stdout, repro.stdout


def test_changing_a_validation_budget_revalidates_without_requantizing(ran):
    ws, _ = ran
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["validate"]["min_sqnr_db"] = 1000.0  # every variant now fails: validation outputs change
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    repro = dvc(["repro"], ws)
    assert repro.returncode == 0, repro.stderr
    validated = {s for s in dvc_stages(p) if "validate@" in s}
    assert stages_run(repro.stdout) == validated | {"report"}, repro.stdout
    s = json.loads((ws / "reports" / "summary.json").read_text())
    assert not any(v["passed"] for v in s["variants"])
    assert all("validate.min_sqnr_db" in v["fail_reasons"][0] for v in s["variants"])


def test_changing_the_percentile_requantizes_only_the_variants_that_read_it(ran):
    """DVC owns freshness per variant: the percentile table is read by the percentile recipes (and
    onnx-w8a8-auto, calibrated from it, and the Core ML variant carrying auto's decision); every other
    variant is up to date."""
    ws, _ = ran
    assert vitq(["run"], ws).returncode == 0  # MLflow records what earlier tests made with dvc repro
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["calibration"]["percentile"] = 99.9
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    repro = dvc(["repro"], ws)
    assert repro.returncode == 0, repro.stderr
    readers = ["onnx-w8a8-percentile", "onnx-w8a8-auto"]
    # tensorrt-w8a8-percentile reads the table too: requantized, i.e. recorded as not run again (no TensorRT
    # here); that record is unchanged, so DVC finds its validate stage up to date.
    # search reads the calibrate stage's ranges and histograms: rerun, the same result (its readers stay fresh)
    expected = {"calibrate", "search", "plan", *(f"{s}@{r}" for r in readers for s in ("quantize", "validate")),
                "quantize@tensorrt-w8a8-percentile", "carry-quantize@coreml-w8a8-auto", "carry-validate@coreml-w8a8-auto",
                "benchmark", "report"}
    assert stages_run(repro.stdout) == expected, repro.stdout
    assert "Stage 'smoothquant' didn't change, skipping" in repro.stdout
    for r in ("onnx-w8-dynamic", "onnx-w8a8-minmax", "onnx-w8a8-entropy", "onnx-w8a8-smoothquant", "onnx-w8a8-search",
              "coreml-w8a8"):
        assert f"Stage 'quantize@{r}' didn't change, skipping" in repro.stdout, r
    before = _mlflow_run_ids(ws)
    again = vitq(["run"], ws)  # one record: the flow agrees with what dvc repro ran, and records it in MLflow
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.findall(r"^([\w@.-]+): .*\bdone in\b", again.stdout + again.stderr, re.M) == []  # nothing ran
    assert "up to date (dvc.lock), skipped: data, model, export, calibrate" in again.stdout + again.stderr
    # MLflow: one new parent, a child only for each variant that changed; the others are linked to the runs
    # that hold them (made by the first run).
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    new = [client.get_run(r) for r in _mlflow_run_ids(ws) - before]
    parents = [r for r in new if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    # The remade variants whose record changed; coreml-w8a8-auto, remade from the same float layers, may be
    # byte-identical (then linked like the rest).
    changed = {r.data.tags["mlflow.runName"] for r in new if r not in parents}
    # auto reads the percentile table for its "plain" start; when another start wins, its record is unchanged.
    assert {"onnx-w8a8-percentile"} <= changed <= {*readers, "coreml-w8a8-auto"}, changed
    kept = {k.removeprefix("vitq.kept."): v for k, v in parents[0].data.tags.items() if k.startswith("vitq.kept.")}
    configured = set(p["quantize"]["recipes"]) | set(p["quantize"]["carry"])
    assert set(kept) == configured - changed
    assert set(kept.values()) <= before  # runs of the first record
    third = vitq(["run"], ws)  # now recorded: nothing to do at all
    assert "nothing ran, nothing new recorded" in third.stdout + third.stderr
    assert _mlflow_run_ids(ws) == before | {r.info.run_id for r in new}


def test_a_shared_result_is_made_once_and_a_change_to_it_reruns_only_its_readers(ran):
    """Issue 32: the range search and SmoothQuant are stages of their own, read by their recipes (the search recipe's
    table is the search stage's); a change to SmoothQuant's alphas reruns that stage and only the variants that
    read it (onnx-w8a8-smoothquant, onnx-w8a8-auto, whose whole recovery section is an input, and their carries)."""
    ws, _ = ran
    assert (ws / "artifacts" / "variants" / "onnx-w8a8-search" / "calibration.json").read_bytes() == \
        (ws / "artifacts" / "search" / "calibration.json").read_bytes()
    assert json.loads((ws / "artifacts" / "needs" / "smoothquant.json").read_text())["needed"] is True
    plan = json.loads((ws / "artifacts" / "plan" / "onnx-w8a8-smoothquant.json").read_text())
    assert len(plan["reads"]["smoothquant"]) == 64 and "search" not in plan["reads"]
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["recovery"]["smoothquant_alphas"] = [0.4, 0.6]
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    repro = dvc(["repro"], ws)
    assert repro.returncode == 0, repro.stderr
    ran_now = stages_run(repro.stdout)
    readers = {"quantize@onnx-w8a8-smoothquant", "quantize@onnx-w8a8-auto", "carry-quantize@coreml-w8a8-smoothquant",
               "carry-quantize@coreml-w8a8-auto"}
    assert {"smoothquant", "plan"} <= ran_now and "search" not in ran_now and "calibrate" not in ran_now, ran_now
    assert {st for st in ran_now if st.startswith(("quantize@", "carry-quantize@"))} <= readers, ran_now
    assert "quantize@onnx-w8a8-smoothquant" in ran_now
    for r in ("onnx-w8a8-search", "onnx-w8a8-minmax", "onnx-w8a8-percentile"):
        assert f"Stage 'quantize@{r}' didn't change, skipping" in repro.stdout, r
