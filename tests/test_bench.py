import json

from conftest import make_workspace, tiny_params, vitq


def test_bench_writes_side_by_side_runs(tmp_path):
    ws = make_workspace(tmp_path / "ws", tiny_params(), dvc=False)
    proc = vitq(["bench", "--models", "demo", "--batches", "1,2", "--repeats", "5"], ws)
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


def test_bench_rejects_bad_arguments(tmp_path):
    for args, needle in ((["--batches", "1,x"], "--batches '1,x'"), (["--models", "vit_nope_9"], "unknown timm model"),
                         (["--static-recipe", "onnx-w8-dynamic"], "is not a static ONNX recipe")):
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
