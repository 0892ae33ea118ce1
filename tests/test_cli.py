"""Bad input through the real command line: one line on stderr, exit code 2, nothing half-written."""

import pytest

from conftest import make_workspace, tiny_params, vitq


def _assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vitq: error: "), proc.stderr[-2000:]
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "overrides, stage, needle",
    [
        ({"data": {"sourse": "digits"}}, "data", "unknown key 'data.sourse'"),
        ({"benchmark": {"threads": "2"}}, "data", "benchmark.threads"),
        ({"calibration": {"methods": ["kl"]}}, "data", "unknown calibration method 'kl'"),
        ({"quantize": {"recipes": ["tensorrt-int9"]}}, "data", "unknown recipe 'tensorrt-int9'"),
        ({"data": {"source": "imagefolder", "path": "/nonexistent/images"}}, "data", "is not a directory"),
    ],
)
def test_bad_params_fail_before_any_work(tmp_path, overrides, stage, needle):
    ws = make_workspace(tmp_path / "ws", tiny_params(**overrides), dvc=False)
    _assert_one_line_error(vitq(["stage", stage], ws), needle)
    assert not (ws / "data").exists()


def test_empty_data_directory(tmp_path):
    (tmp_path / "images" / "val" / "cat").mkdir(parents=True)
    ws = make_workspace(tmp_path / "ws", tiny_params(data={"source": "imagefolder", "path": str(tmp_path / "images")}), dvc=False)
    _assert_one_line_error(vitq(["stage", "data"], ws), "holds no images")
    assert not (ws / "data").exists()


def test_unknown_model_and_missing_checkpoint(tmp_path):
    ws = make_workspace(tmp_path / "ws", tiny_params(model={"source": "timm", "name": "vit_nonexistent_xx"}), dvc=False)
    assert vitq(["stage", "data"], ws).returncode == 0
    _assert_one_line_error(vitq(["stage", "model"], ws), "unknown timm model 'vit_nonexistent_xx'")
    assert not (ws / "models").exists()
    ws2 = make_workspace(
        tmp_path / "ws2", tiny_params(model={"source": "timm", "checkpoint": "missing.pth", "arch": {}}), dvc=False
    )
    assert vitq(["stage", "data"], ws2).returncode == 0
    _assert_one_line_error(vitq(["stage", "model"], ws2), "model.checkpoint 'missing.pth' does not exist")


def test_unknown_stage_and_run_outside_a_workspace(tmp_path):
    _assert_one_line_error(vitq(["stage", "quantise"], tmp_path), "unknown stage 'quantise'")
    _assert_one_line_error(vitq(["run"], tmp_path), "does not exist")


def test_run_needs_a_dvc_repository(tmp_path):
    ws = make_workspace(tmp_path / "ws", tiny_params(), dvc=False)
    _assert_one_line_error(vitq(["run"], ws), "is not a DVC repository")


def test_run_rejects_an_unknown_model_before_starting_anything(tmp_path):
    ws = make_workspace(tmp_path / "ws", tiny_params(model={"source": "timm", "name": "deit_smal_patch16_224"}))
    proc = vitq(["run"], ws)
    _assert_one_line_error(proc, "unknown timm model 'deit_smal_patch16_224' (did you mean deit_small_patch16_224")
    assert not (ws / "data").exists() and not (ws / "mlflow.db").exists()


@pytest.mark.parametrize("drop, key", [("seed", "seed"), ("task", "task"), ("validate", "validate.batch_size")])
def test_run_names_a_params_key_dvc_declares_but_the_file_lacks(tmp_path, drop, key):
    """DVC reads params.yaml itself: a declared key left out (vitq would default it) is one line, before any work."""
    params = tiny_params()
    del params[drop]
    ws = make_workspace(tmp_path / "ws", params)
    proc = vitq(["run"], ws)
    _assert_one_line_error(proc, f"{key} must be written out: dvc.yaml's stage")
    assert not (ws / "data").exists() and not (ws / "mlflow.db").exists()
