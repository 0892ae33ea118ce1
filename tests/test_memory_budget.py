"""The memory budget (issue 30): calibration's pass sized to it (or refused in one line when a set batch cannot
fit), recorded in calibration.json; the peak of a real calibration bounded by it, measured by the kernel."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitq.config import CalibrationConfig
from vitq.errors import VitqError
from vitq.tasks.calibrate import calibrate_inputs

WIDTH = 256 * 256  # floats per image per measured tensor: 256 KB


def _matmul_chain(path, depth: int = 6, width: int = WIDTH) -> None:
    """Input (N, 1, 1, width) -> depth x (elementwise Mul, 1x1 MatMul along a trailing unit dim): `depth` MatMul
    inputs of `width` floats an image to calibrate."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, width, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, width, 1])
    inits = [numpy_helper.from_array(np.array([[1.01]], np.float32), "w"),
             numpy_helper.from_array(np.array(0.5, np.float32), "k")]
    nodes, prev = [], "input"
    for i in range(depth):
        out = "y" if i == depth - 1 else f"t{i}"
        nodes += [helper.make_node("Mul", [prev, "k"], [f"m{i}"]), helper.make_node("MatMul", [f"m{i}", "w"], [out])]
        prev = out
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_a_null_batch_fits_the_budget_and_is_recorded(tmp_path):
    _matmul_chain(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((20, 1, WIDTH, 1)).astype(np.float32)
    # an image: 6 MatMul inputs + the output, 256 KB each, x2 for ONNX Runtime's own: ~3.5 MB; 16 MB fits 4
    result = calibrate_inputs(tmp_path / "m.onnx", x, CalibrationConfig(methods=("minmax",)), tmp_path / "c",
                              budget=16 << 20)
    assert result.batch_size == 4, result
    assert json.loads((tmp_path / "c" / "calibration.json").read_text())["batch_size"] == 4
    wide = calibrate_inputs(tmp_path / "m.onnx", x, CalibrationConfig(methods=("minmax",)), tmp_path / "d",
                            budget=1 << 34)
    assert wide.batch_size == 32  # at most 32 (then the 20 images are one pass)


def test_a_set_batch_over_the_budget_is_one_line_naming_the_knobs(tmp_path):
    _matmul_chain(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((20, 1, WIDTH, 1)).astype(np.float32)
    with pytest.raises(VitqError) as err:
        calibrate_inputs(tmp_path / "m.onnx", x, CalibrationConfig(methods=("minmax",), batch_size=16), tmp_path / "c",
                         budget=16 << 20)
    msg = str(err.value)
    assert "\n" not in msg and "calibration.batch_size 16" in msg and "memory_budget_mb" in msg and "to 4 or less" in msg
    assert not (tmp_path / "c").exists(), "nothing half-written"


def test_calibration_peak_stays_within_the_budget(tmp_path):
    """64 images x 7 tensors x 256 KB: a pass of 32 holds ~60 MB of outputs; fitted to 8 MB it holds ~2 images.
    The kernel's peak RSS (VmHWM, reset before the pass) grows by well under a pass of 32."""
    _matmul_chain(tmp_path / "m.onnx")
    script = textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from vitq.config import CalibrationConfig
        from vitq.tasks.calibrate import calibrate_inputs

        def hwm():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
        x = np.random.default_rng(0).standard_normal((64, 1, {WIDTH}, 1)).astype(np.float32)
        calibrate_inputs(Path({str(tmp_path / "m.onnx")!r}), x[:2], CalibrationConfig(methods=("minmax",)),
                         Path({str(tmp_path / "warm")!r}), budget=8 << 20)  # imports and first-use allocations
        open("/proc/self/clear_refs", "w").write("5")
        base = hwm()
        r = calibrate_inputs(Path({str(tmp_path / "m.onnx")!r}), x, CalibrationConfig(methods=("minmax", "percentile")),
                             Path({str(tmp_path / "c")!r}), budget=BUDGET)
        print(r.batch_size, (hwm() - base) // 1024)
    """)
    grown = {}
    for budget in (8 << 20, 1 << 34):
        proc = subprocess.run([sys.executable, "-c", script.replace("BUDGET", str(budget))], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        batch, mb = (int(v) for v in proc.stdout.split()[-2:])
        grown[budget] = (batch, mb)
    (small_batch, small_mb), (big_batch, big_mb) = grown[8 << 20], grown[1 << 34]
    assert small_batch == 2 and big_batch == 32, grown
    assert small_mb < big_mb / 3, grown  # measured, not assumed: the budget is what bounds it


@pytest.mark.slow
def test_a_run_whose_calibration_cannot_fit_says_so_in_one_line(tmp_path):
    """`vitq run` with a calibration batch over the budget: the calibrate stage refuses before its pass, the run
    ends with exit 2 and that one line (naming the knobs), and nothing else on stderr (Prefect's log worker no
    longer prints "--- Error logging to API ---" after a failed run: its queue is delivered while the server is up)."""
    from conftest import VITQ, make_workspace, run_env, tiny_params

    ws = make_workspace(tmp_path / "ws", tiny_params(memory_budget_mb=64, calibration={"batch_size": 100000},
                                                     data={"calibration_size": 1500},  # ~0.1 MB an image
                                                     model={"train": {"epochs": 1}},
                                                     quantize={"recipes": ["onnx-w8-dynamic"], "carry": {}}))
    proc = subprocess.run([VITQ, "run"], cwd=ws, env=run_env(tmp_path), capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "calibration.batch_size 100000" in out and "memory_budget_mb" in out, out[-3000:]
    assert "Error logging to API" not in out and "Traceback" not in out, out[-3000:]
    assert not (ws / "artifacts" / "calibration").exists() or not any((ws / "artifacts" / "calibration").iterdir())
