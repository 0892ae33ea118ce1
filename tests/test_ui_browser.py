"""The MLflow UI as a user sees it, in a real browser (headless Chromium driven by selenium): `mlflow server`
on the store a tiny `vitq run` produced, then the experiment's runs, each variant's child run with its metrics,
the dataset and model links, and the registered model's aliases. Screenshots are kept in the test's tmp dir
and in the workspace's reports/ui/.

Needs Debian's `chromium` and `chromium-driver` (`apt-get install -y chromium chromium-driver`); skipped with
the reason where they are missing."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_workspace, run_env, tiny_params, vitq

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# One of each kind of variant: ONNX dynamic and static (LoggedModels in the ONNX flavor), a Core ML package (a
# LoggedModel of model type coreml) and TensorRT, recorded as not run here.
RECIPES = ["onnx-w8-dynamic", "onnx-w8a8-minmax", "coreml-w8a8", "tensorrt-w8a8-percentile"]
WAIT_S = 90  # the UI's first load on a busy 2-core machine (bundle parse + API calls)
# MLflow 3.17's UI opens an experiment in the view of its global GenAI / Model training switch (this URL
# parameter, then remembered by the browser), whatever the experiment's mlflow.experimentKind tag says.
VIEW = "workflowType=machine_learning"


def _skip_reason() -> str | None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -e '.[test]')"
    return None


if _skip_reason():
    pytest.skip(_skip_reason(), allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dvc_file_digest(ws: Path, relpath: str) -> str:
    """DVC's md5 of one file of the data stage's output, read from its .dir manifest in DVC's cache."""
    out = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["data"]["outs"][0]
    h = out["md5"]
    manifest = json.loads((ws / ".dvc" / "cache" / "files" / "md5" / h[:2] / h[2:]).read_text())
    return next(e["md5"] for e in manifest if e["relpath"] == relpath)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A workspace after `vitq run`, its summary, and `mlflow server` on its SQLite store (base URL)."""
    ws = make_workspace(tmp_path_factory.mktemp("ui") / "ws",
                        tiny_params(quantize={"recipes": RECIPES, "carry": {}}))
    proc = vitq(["run"], ws)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    port = _free_port()
    log = open(ws.parent / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{ws / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=ws.parent, env=run_env(ws), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None, (ws.parent / "mlflow-server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "mlflow server did not answer /health in 120 s"
        time.sleep(1)
    summary = json.loads((ws / "reports" / "summary.json").read_text())
    yield ws, summary, base
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser(store, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=2400,1400"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    shots = tmp_path_factory.mktemp("ui-screenshots")
    driver.shots = []
    yield driver, shots
    driver.quit()
    ws = store[0]
    (ws / "reports" / "ui").mkdir(parents=True, exist_ok=True)
    for png in shots.glob("*.png"):  # kept beside the workspace's reports too
        shutil.copy2(png, ws / "reports" / "ui" / png.name)


def _client(ws: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")


def _text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _wait_for(browser, shot: str, *expected: str) -> str:
    """Wait until the page shows every `expected` string, screenshot it; the page's text."""
    driver, shots = browser
    deadline = time.monotonic() + WAIT_S
    while True:
        text = _text(driver)
        missing = [e for e in expected if e not in text]
        if not missing:
            break
        if time.monotonic() > deadline:
            driver.save_screenshot(str(shots / f"{shot}-FAILED.png"))
            pytest.fail(f"{driver.current_url} never showed {missing} in {WAIT_S} s (screenshot "
                        f"{shots / f'{shot}-FAILED.png'}); it shows: {text[:1500]!r}")
        time.sleep(1)
    time.sleep(1)  # late cells (datasets, models) render after the names
    driver.save_screenshot(str(shots / f"{shot}.png"))
    return _text(driver)


def _open(browser, url: str, shot: str, *expected: str) -> str:
    """Open `url` and `_wait_for` the `expected` strings."""
    browser[0].get(url)
    return _wait_for(browser, shot, *expected)


def _produced(summary: dict) -> list[dict]:
    return summary["variants"]


def test_experiment_opens_on_its_runs_with_datasets_and_a_child_per_variant(store, browser):
    from selenium.webdriver.common.by import By

    ws, summary, base = store
    driver, shots = browser
    exp = _client(ws).get_experiment_by_name(summary["model"])
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    parent = f"{summary['model']}-pipeline"
    digests = {split: _dvc_file_digest(ws, f"{split}.npz") for split in ("calibration", "validation")}
    datasets = [f"digits-{split}" for split in digests]
    _open(browser, f"{base}/#/experiments/{exp.experiment_id}?{VIEW}", "runs", parent, datasets[0])
    assert "/runs" in driver.current_url, driver.current_url  # the runs table, not the GenAI overview
    # "Expand rows" lists every dataset of a run (else the first, then "+1"); the parent's expander shows its
    # children: one row per configured variant. The table re-renders in place (same URL).
    driver.find_element(By.XPATH, "//button[normalize-space(.)='Expand rows']").click()
    expanders = driver.find_elements(By.CSS_SELECTOR, "button[data-component-id$='runnamecellrenderer.tsx_46']")
    assert expanders, "no expander on the parent run's row"
    expanders[0].click()
    names = [v["name"] for v in _produced(summary)] + [n["name"] for n in summary["not_run"]]
    shown = [f"digits-{split} ({digest})" for split, digest in digests.items()]  # Dataset: name (DVC's md5)
    text = _wait_for(browser, "runs-expanded", *shown, *names)
    # The Models column links each variant's LoggedModel, or the registered version made from it.
    hrefs = {a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a[href*='/models/']")}
    client = _client(ws)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags}
    versions = {mv.source.removeprefix("models:/"): mv.version
                for mv in client.search_model_versions(f"name = '{summary['model']}'")}
    unlinked = []
    for v in _produced(summary):
        outputs = runs[v["name"]].outputs.model_outputs
        assert outputs, f"{v['name']}: its run outputs no LoggedModel"
        model_id = outputs[0].model_id
        links = [f"/models/{model_id}"] + ([f"/models/{summary['model']}/versions/{versions[model_id]}"]
                                            if model_id in versions else [])
        if not any(link in h for h in hrefs for link in links):
            unlinked.append((v["name"], links))
    assert not unlinked, f"the Models column links none of {unlinked}; its links: {sorted(hrefs)}"


def test_each_child_run_shows_its_metrics_datasets_and_model(store, browser):
    ws, summary, base = store
    client = _client(ws)
    exp = client.get_experiment_by_name(summary["model"])
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags}
    for v in _produced(summary):
        run = runs[v["name"]]
        # The key metrics, those measured here (Core ML latency needs macOS: a not_measured.* tag says why).
        keys = [k for k in ("top1_drop", "size_mb", "latency_ms_p50", "sqnr_db", "int8_weight_fraction")
                if v.get(k) is not None or f"not_measured.{k}" not in run.data.tags]
        text = _open(browser, f"{base}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}?{VIEW}",
                     f"run-{v['name']}", v["name"], *keys)
        # Values as the UI prints them (JavaScript's shortest round-trip form, as Python's repr).
        for k in ("size_mb", "sqnr_db"):
            assert repr(float(v[k])) in text, f"{v['name']}: {k} = {v[k]!r} not on the run page"
        assert "digits-calibration" in text and "digits-validation" in text, f"{v['name']}: datasets missing"
        model_id = run.outputs.model_outputs[0].model_id
        text = _open(browser, f"{base}/#/experiments/{exp.experiment_id}/models/{model_id}?{VIEW}",
                     f"model-{v['name']}", v["name"], "size_mb", "digits-validation")
        assert repr(float(v["size_mb"])) in text


def test_registered_model_shows_the_aliases_and_links_each_version_to_its_model(store, browser):
    from selenium.webdriver.common.by import By

    from vitq.flows.registry import best_per_target

    ws, summary, base = store
    driver, _ = browser
    client = _client(ws)
    best = best_per_target(summary)
    assert best, "no variant passed: nothing registered to look at"
    text = _open(browser, f"{base}/#/models/{summary['model']}?{VIEW}", "registered-model",
                 *(f"@ {target}" for target in best))
    for target, v in best.items():
        mv = client.get_model_version_by_alias(summary["model"], target)
        assert mv.tags["variant"] == v["name"] and mv.source.startswith("models:/m-"), (mv.source, mv.tags)
        _open(browser, f"{base}/#/models/{summary['model']}/versions/{mv.version}?{VIEW}",
              f"version-{target}", f"Version {mv.version}", v["name"])
        links = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a[href*='/models/m-']")]
        assert any(mv.source.removeprefix("models:/") in h for h in links), \
            f"version {mv.version} (@{target}) links no logged model {mv.source}: {links}"
