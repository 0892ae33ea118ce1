import json
from pathlib import Path

from conftest import make_workspace, tiny_params, vitq


def _ops(profile: dict) -> set[str]:
    """The op types ORT ran (after its fusions) in one model's profile."""
    return {r["op"] for r in profile["op_types"]}


def test_bench_writes_side_by_side_runs(tmp_path):
    ws = make_workspace(tmp_path / "ws", tiny_params(), dvc=False)
    proc = vitq(["bench", "--models", "demo", "--batches", "1,2", "--repeats", "5", "--profile"], ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((ws / "reports" / "bench.json").read_text())
    assert result["machine"]["cpu"] and "not_measured" in result["gpu"]
    keys = {(r["model"], r["batch"], r["variant"]) for r in result["runs"]}
    assert keys == {("demo", b, v) for b in (1, 2) for v in ("fp32", "dynamic", "static")}
    for r in result["runs"]:
        assert r["latency_ms_p50"] > 0 and r["latency_ms_p95"] >= r["latency_ms_p50"] and r["size_mb"] > 0
    sizes = {r["variant"]: r["size_mb"] for r in result["runs"] if r["batch"] == 1}
    assert sizes["static"] < sizes["fp32"] / 2
    assert len(result["ratios"]) == 2 and "dyn/static" in proc.stdout
    # ratios paired per interleaved round (10 rounds), the ratio of whole-run p50s beside them
    from vitq.tasks.benchmark import paired_ratio

    by = {(r["batch"], r["variant"]): r for r in result["runs"]}
    for r in result["ratios"]:
        dyn, static = by[(r["batch"], "dynamic")], by[(r["batch"], "static")]
        assert len(dyn["round_p50_ms"]) == len(static["round_p50_ms"]) == 10
        assert r["dynamic_over_static"] == paired_ratio(dyn["round_p50_ms"], static["round_p50_ms"])
        assert r["dynamic_over_static_p50"] == dyn["latency_ms_p50"] / static["latency_ms_p50"]
    # --profile: ORT's profiler on the same three files, per batch: where the time goes, what kernels ran
    assert [(p["model"], p["batch"]) for p in result["profiles"]] == [("demo", 1), ("demo", 2)]
    for p in result["profiles"]:
        fp32, dynamic, static = p["fp32"], p["dynamic"], p["static"]
        for prof in (fp32, dynamic, static):
            assert prof["ms_per_run"] > 0 and abs(sum(r["share"] for r in prof["op_types"]) - 1) < 0.01
        assert fp32["quantize_share"] == 0 and not {"MatMulIntegerToFloat", "DynamicQuantizeLinear"} & _ops(fp32)
        assert {"DynamicQuantizeLinear", "DynamicQuantizeMatMul"} & _ops(dynamic)
        assert "MatMulIntegerToFloat" in _ops(static) and static["quantize_share"] > 0
        assert not {"DynamicQuantizeLinear", "DynamicQuantizeMatMul"} & _ops(static)
        # the weight GEMMs (linear layers, patch embedding, head) against everything else, in each form ORT ran
        for prof in (fp32, dynamic, static):
            assert 0 < prof["weight_gemm_ms"] < prof["ms_per_run"] and 0 < prof["weight_gemm_share"] < 1
        assert fp32["weight_gemm_nodes"] == dynamic["weight_gemm_nodes"] > 0  # MatMul/Conv vs their quantized forms
        assert static["weight_gemm_nodes"] > fp32["weight_gemm_nodes"]  # + q, k, v each its own GEMM
    assert "quantize/dequantize" in proc.stdout and "MatMulIntegerToFloat" in proc.stdout
    assert "weight GEMMs" in proc.stdout and "everything else" in proc.stdout


def test_weight_gemms_are_the_products_with_a_constant_weight():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from vitq.tasks.targets.onnx.backend import weight_gemms

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    wq = numpy_helper.from_array(np.ones((4, 4), np.int8), "wq")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="linear"),
             helper.make_node("MatMul", ["a", "x"], ["b"], name="activations"),  # like q @ k^T
             helper.make_node("Constant", [], ["c"], name="const", value=numpy_helper.from_array(np.eye(4, dtype=np.float32))),
             helper.make_node("Gemm", ["b", "c"], ["d"], name="from_constant_node"),
             helper.make_node("MatMulIntegerToFloat", ["xq", "wq", "s", "s"], ["e"], name="int8", domain="com.microsoft"),
             helper.make_node("MatMulIntegerToFloat", ["xq", "xq", "s", "s"], ["f"], name="int8_activations", domain="com.microsoft"),
             helper.make_node("Add", ["x", "w"], ["g"], name="not_a_gemm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, [4, 4])], [w, wq])
    assert weight_gemms(helper.make_model(graph)) == {"linear", "from_constant_node", "int8"}


def test_bench_rejects_bad_arguments(tmp_path):
    for args, needle in ((["--batches", "1,x"], "--batches '1,x'"), (["--models", "vit_nope_9"], "unknown timm model"),
                         (["--static-recipe", "onnx-w8-dynamic"], "is not a static ONNX recipe"),
                         (["--rounds", "0"], "--rounds 0 must be >= 1")):
        proc = vitq(["bench", *args], tmp_path)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert not (tmp_path / "reports").exists()


def test_old_names_print_their_own_usage_with_the_same_options(tmp_path):
    import re

    for new, old in (("latency", "bench"), ("coreml-coverage", "coreml-bench"), ("recovery-accuracy", "recovery")):
        helps = {name: vitq([name, "--help"], tmp_path) for name in (new, old)}
        for name, proc in helps.items():
            assert proc.returncode == 0 and proc.stdout.startswith(f"usage: vitq {name} "), proc.stdout[:200]
        options = {name: set(re.findall(r"--[a-z-]+", proc.stdout)) for name, proc in helps.items()}
        assert options[new] == options[old] and "--out" in options[new], options


def test_recovery_scale_rejects_bad_arguments_before_any_work(tmp_path):
    for args, needle in ((["--recipes", "onnx-w8a8-nope"], "unknown recipe 'onnx-w8a8-nope'"),
                         (["--model", "vit_nope_9"], "unknown timm model"),
                         (["--validation", "1"], "--validation 1")):
        proc = vitq(["recovery-scale", *args], tmp_path)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / ".recovery-scale").exists() and not (tmp_path / "reports").exists()


def test_recovery_scale_table_and_params():
    from pathlib import Path

    from vitq.params import parse_params
    from vitq.experiments.recovery_scale import scale_params, scale_table

    p = parse_params(scale_params("vit_base_patch16_224", Path("/w/ckpt.pth"), 256, 500, ["onnx-w8a8-auto"], 224))
    assert (p.model.source, p.model.name, p.data.calibration_size, p.data.validation_size) == ("timm", "vit_base_patch16_224", 256, 500)
    assert list(p.quantize.recipes) == ["onnx-w8a8-auto"] and p.data.image_size == 224 and p.data.channels == 3
    table = scale_table({"stages": {"calibrate": 61.2}, "recipes": [
        {"recipe": "onnx-w8a8-auto", "seconds": 300.0, "start": "smoothquant", "budget_met": True},
        {"recipe": "onnx-w8a8-search", "seconds": 100.0, "start": None, "budget_met": None}], "recipes_total_s": 400.0})
    assert "| quantize onnx-w8a8-auto (start smoothquant, budget met) | 300 |" in table
    assert "| the recipes together | 400 |" in table


def test_paired_ratio_cancels_a_machine_slowing_down_between_rounds():
    from vitq.tasks.benchmark import paired_ratio

    # The machine runs at half speed in the last two rounds; in each round the first model takes 1.2x the second.
    fast = [50.0, 50.0, 100.0, 100.0]
    slow = [1.2 * t for t in fast]
    assert paired_ratio(slow, fast) == 1.2
    assert paired_ratio(slow, fast[:3]) is None and paired_ratio([], []) is None


def test_rounds_rotate_which_model_goes_first(tmp_path, monkeypatch):
    """Each round starts with the next model, each model's round opened by one untimed run: no model always
    follows the same one (on this VM the model after another pays for its caches and spinning threads)."""
    import numpy as np

    from vitq.tasks import benchmark
    from vitq.config import BenchmarkConfig

    calls: list[str] = []

    class Session:
        def __init__(self, name):
            self.name = name

        def get_inputs(self):
            return [type("Input", (), {"name": "x"})]

        def run(self, _outputs, _feed):
            calls.append(self.name)

    monkeypatch.setattr(benchmark.onnx_backend, "session", lambda path, threads: Session(Path(path).stem))
    models = {}
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.onnx").write_bytes(b"0")
        models[name] = tmp_path / f"{name}.onnx"
    timings = benchmark._time_onnx(models, np.zeros((1, 3), np.float32),
                                   BenchmarkConfig(warmup=0, repeats=6, rounds=3))
    per_model_round = 1 + 2  # the untimed run, then repeats / rounds timed
    firsts = calls[::per_model_round]
    assert firsts == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t.round_p50_ms) == 3 and t.runs == 6 for t in timings.values())
