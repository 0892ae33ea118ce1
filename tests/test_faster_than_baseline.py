"""The speed gate (issue 13, item 6): a variant timed no faster than its target's float baseline in the same
run is flagged in summary.json (`faster_than_baseline: false`), marked in the table and the report's notes,
and never takes the registry alias; one not timed is null and judged as before."""

from __future__ import annotations

import json

from vitq.tasks import report
from vitq.tasks.benchmark import BenchmarkResult, Timing
from vitq.tasks.data import DataResult
from vitq.tasks.model import ModelSpec
from vitq.tasks.variant import VariantArtifact
from vitq.tasks.task_kinds import OutputMetrics
from vitq.tasks.validate import ValidationResult


def _timing(p50: float, baseline: str) -> Timing:
    return Timing(size_mb=1.0, latency_ms_p50=p50, latency_ms_p95=p50, latency_ms_mean=p50, throughput_ips=1e3 / p50,
                  runs=10, baseline=baseline)


def _variant(name: str, target: str) -> tuple[VariantArtifact, ValidationResult]:
    art = VariantArtifact(name=name, recipe={"name": name, "target": target}, artifact="model.onnx",
                          qdq_artifact="model.onnx", size_mb=1.0, int8_weight_fraction=1.0, op_counts={},
                          calibration_table=None, tensorrt_ready=True, tensorrt_note=None)
    m = OutputMetrics(top1=0.9, top1_drop=0.0, agreement=1.0, cosine=1.0, sqnr_db=30.0)
    return art, ValidationResult(name=name, images=10, metrics=m, passed=True, reasons=[])


def _summary() -> dict:
    bench = BenchmarkResult(
        machine={"cpu": "test"}, settings={"batch_size": 1},
        models={"fp32": _timing(10.0, "fp32"), "onnx-fast": _timing(5.0, "fp32"), "onnx-slow": _timing(12.0, "fp32"),
                "onnx-tie": _timing(10.0, "fp32"), "fp16-tensorrt": _timing(1.0, "fp16-tensorrt"),
                "trt-slow": _timing(1.5, "fp16-tensorrt"), "coreml-fp16": _timing(3.0, "coreml-fp16"),
                "coreml-w8a8": _timing(2.0, "coreml-fp16")},
        not_measured={"onnx-untimed": "not benchmarked on this pool"},
    )
    names = {"onnx-fast": "onnx", "onnx-slow": "onnx", "onnx-tie": "onnx", "onnx-untimed": "onnx",
             "trt-slow": "tensorrt", "coreml-fp16": "coreml", "coreml-w8a8": "coreml"}
    spec = ModelSpec(name="m", create_kwargs={}, input_size=[1, 8, 8], mean=[0.0], std=[1.0], num_classes=10,
                     classes=[str(i) for i in range(10)], top1=0.9, source="train")
    data = DataResult(source="digits", classes=spec.classes, sizes={"calibration": 4, "validation": 10},
                      image_size=8, channels=1, digest="abc")
    ref = ValidationResult(name="fp32", images=10, metrics=OutputMetrics(top1=0.9, top1_drop=None, agreement=1.0,
                                                                         cosine=1.0, sqnr_db=float("inf")),
                           passed=True, reasons=[])
    return report.build_summary(spec, data, "md5:abc", 4.0, ref, [_variant(n, t) for n, t in names.items()],
                                bench, {}, "artifacts/variants")


def test_summary_flags_each_variant_against_its_own_baseline():
    flags = {v["name"]: (v["faster_than_baseline"], v["speedup_baseline"]) for v in _summary()["variants"]}
    assert flags == {
        "onnx-fast": (True, "fp32"), "onnx-slow": (False, "fp32"), "onnx-tie": (False, "fp32"),  # a tie is not faster
        "onnx-untimed": (None, None), "trt-slow": (False, "fp16-tensorrt"),
        "coreml-fp16": (False, "coreml-fp16"), "coreml-w8a8": (True, "coreml-fp16"),
    }


def test_table_and_notes_say_which_variants_are_not_faster(tmp_path):
    summary = _summary()
    table = report.write_report(summary, tmp_path / "summary.json", tmp_path / "report.md")
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert "(not faster)" in rows["onnx-slow"] and "(not faster)" in rows["trt-slow"]
    assert "(not faster)" not in rows["onnx-fast"] and "(not faster)" not in rows["onnx-untimed"]
    notes = (tmp_path / "report.md").read_text()
    assert "- onnx-slow: not faster than its baseline fp32 in this run (speedup 0.83): never takes the @onnx " \
           "registry alias" in notes
    assert "- trt-slow: not faster than its baseline fp16-tensorrt" in notes
    assert "- coreml-fp16: is the float baseline the others are timed against" in notes
    assert "onnx-fast: not faster" not in notes and "onnx-untimed: not faster" not in notes
    assert json.loads((tmp_path / "summary.json").read_text())["variants"][1]["faster_than_baseline"] is False


def test_a_variant_not_faster_than_its_baseline_never_takes_the_alias():
    from vitq.flows.registry import best_per_target

    summary = _summary()
    by_name = {v["name"]: v for v in summary["variants"]}
    # Smaller and as accurate as the faster variant: it would win the ranking on size if speed did not gate it.
    by_name["onnx-slow"]["size_mb"] = 0.5
    by_name["onnx-fast"]["size_mb"] = 2.0
    by_name["onnx-untimed"]["size_mb"] = 3.0
    best = best_per_target(summary)
    assert best["onnx"]["name"] == "onnx-fast"
    assert "tensorrt" not in best  # its only variant is slower than the FP16 engine
    assert best["coreml"]["name"] == "coreml-w8a8"
    # Not timed (null) is judged by accuracy and size as before: the untimed one wins once it is the smallest.
    by_name["onnx-untimed"]["size_mb"] = 0.1
    assert best_per_target(summary)["onnx"]["name"] == "onnx-untimed"


def test_speedup_is_paired_per_round_where_the_timings_have_rounds():
    """A slow spell of the machine in the variant's last round makes its whole-run p50 look slower than FP32's;
    paired per round (each round's models run back to back) it is faster in 4 of 5 rounds, and so flagged."""
    from dataclasses import replace

    fp32 = replace(_timing(10.0, "fp32"), round_p50_ms=[10.0, 10.0, 30.0, 30.0, 30.0])
    variant = replace(_timing(12.0, "fp32"), round_p50_ms=[9.0, 9.0, 27.0, 27.0, 40.0])
    bench = BenchmarkResult(machine={"cpu": "test"}, settings={}, models={"fp32": fp32, "onnx-v": variant})
    assert abs(bench.speedup("onnx-v") - 10 / 9) < 1e-9  # the median of 1.11, 1.11, 1.11, 1.11, 0.75
    no_rounds = BenchmarkResult(machine={}, settings={}, models={"fp32": _timing(10.0, "fp32"),
                                                                 "onnx-v": _timing(12.0, "fp32")})
    assert abs(no_rounds.speedup("onnx-v") - 10 / 12) < 1e-9  # without rounds: the ratio of p50s
