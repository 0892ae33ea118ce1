"""Report stage: `reports/summary.json` (the contract in DESIGN.md), a table, and `reports/report.md`."""

from __future__ import annotations

import logging
from pathlib import Path

from typing import TYPE_CHECKING

from vitq.tasks._io import atomic_file, write_json

if TYPE_CHECKING:  # annotations only: `vitq run` with nothing to do prints the table without torch or ONNX
    from vitq.tasks.benchmark import BenchmarkResult
    from vitq.tasks.data import DataResult
    from vitq.tasks.model import ModelSpec
    from vitq.tasks.variant import VariantArtifact
    from vitq.tasks.validate import ValidationResult

log = logging.getLogger("vitq.report")


def build_summary(
    spec: ModelSpec,
    data: DataResult,
    data_digest: str,
    fp32_size_mb: float,
    reference: ValidationResult,
    variants: list[tuple[VariantArtifact, ValidationResult]],
    bench: BenchmarkResult | None,
    not_run: dict[str, str],
    artifact_root: str,
    records: dict[str, dict] | None = None,
    critical: list[dict] | None = None,
) -> dict:
    """Assemble summary.json. `not_run` maps variant name -> why it could not run on this machine. `records`:
    each DVC stage's wall time and peak RSS (tasks/resources.py), `critical`: the run's critical path."""
    records = records or {}
    base_t = bench.models.get("fp32") if bench else None
    out = []
    for art, val in variants:
        m = val.metrics
        t = bench.models.get(art.name) if bench else None
        not_measured = {}
        if m.mask_iou is not None:  # dense outputs
            if m.miou is None:
                not_measured["miou"] = "the validation data has no ground-truth masks (<split>_masks/)"
        elif m.top1 is None:
            not_measured["top1"] = ("the validation data has no labels" if not data.labelled
                                    else "the model's classes are not the validation data's classes")
        not_measured.update(val.not_measured)
        if t is None:
            why = bench.not_measured.get(art.name) if bench else None
            not_measured["latency_ms_p50"] = why or "not benchmarked in this run"
        speedup = bench.speedup(art.name) if bench else None
        own = [r for r in records.values() if r["stage"].split("@", 1)[-1] == art.name and "@" in r["stage"]]
        out.append(
            {
                "name": art.name,
                "target": art.recipe["target"],
                "recipe": art.recipe["name"],
                "artifact": f"{artifact_root}/{art.name}/{art.artifact}",
                "size_mb": art.size_mb,
                "compression": fp32_size_mb / art.size_mb,
                "int8_weight_fraction": art.int8_weight_fraction,
                "top1": m.top1,
                "top1_drop": m.top1_drop,
                "agreement": m.agreement,
                "cosine": m.cosine,
                "sqnr_db": m.sqnr_db,
                **({"psnr_db": m.psnr_db, "mask_iou": m.mask_iou, "miou": m.miou, "miou_drop": m.miou_drop}
                   if m.mask_iou is not None else {}),
                **({"metrics": m.extra} if m.extra else {}),
                # several outputs: each one's checks against FP32 (judged: the task's metrics too) and verdict
                **({"outputs": val.outputs} if val.outputs else {}),
                "latency_ms_p50": t.latency_ms_p50 if t else None,
                "latency_ms_p95": t.latency_ms_p95 if t else None,
                "throughput_ips": t.throughput_ips if t else None,
                "speedup": speedup,
                # Latency against the target's float baseline timed in the same run (`speedup_baseline`: fp32 in
                # ONNX Runtime, fp16-tensorrt, coreml-fp16): false keeps the variant from the registry alias.
                "speedup_baseline": t.baseline if t else None,
                "faster_than_baseline": None if speedup is None else speedup > 1.0,
                # what making it cost: each of its stages' wall seconds, the process's peak RSS while they ran
                "seconds": {r["stage"].split("@")[0].removeprefix("carry-"): r["seconds"] for r in own} or None,
                "peak_rss_mb": max((r["peak_rss_mb"] for r in own if r.get("peak_rss_mb")), default=None),
                "passed": val.passed,
                "fail_reasons": val.reasons,
                "not_measured": not_measured,
            }
        )
    dense = reference.metrics.mask_iou is not None
    return {
        "model": spec.name,
        "task": "dense" if dense else "classification",
        "data": {
            "calibration": f"{data.source}:calibration ({data.sizes['calibration']} images)",
            "validation": f"{data.source}:validation ({data.sizes['validation']} images)",
            "digest": data_digest,
        },
        "baseline": {
            "top1": reference.metrics.top1,
            **({"miou": reference.metrics.miou} if dense else {}),
            **({"metrics": reference.metrics.extra} if reference.metrics.extra else {}),
            **({"outputs": reference.outputs} if reference.outputs else {}),
            "size_mb": fp32_size_mb,
            "latency_ms_p50": base_t.latency_ms_p50 if base_t else None,
            "latency_ms_p95": base_t.latency_ms_p95 if base_t else None,
        },
        "variants": out,
        "not_run": [{"name": n, "reason": r} for n, r in sorted(not_run.items())],
        "machine": bench.machine if bench else None,
        "benchmark_settings": bench.settings if bench else None,
        # each DVC stage's last run: wall seconds, peak RSS MB, when, on which host, beside which stages
        "stages": [{k: v for k, v in r.items()} for r in records.values()],
        "critical_path": critical or [],
    }


def _speedup_cell(v: dict) -> str:
    """The speedup, marked where the variant is not faster than its baseline (kept from the registry alias)."""
    cell = _fmt(v["speedup"], ".2f")
    return f"{cell} (not faster)" if v.get("faster_than_baseline") is False else cell


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def summary_table(summary: dict) -> str:
    b = summary["baseline"]
    dense = summary.get("task") == "dense"
    if dense:  # the metrics of output maps: mIoU against ground truth, masks and SQNR against FP32
        head = ("variant", "size MB", "x smaller", "int8 w", "mIoU", "drop pts", "mask IoU", "SQNR dB", "p50 ms",
                "p95 ms", "speedup", "pass")
        fp32 = (_fmt(b.get("miou"), ".4f"), "-", "1.0000", "-")
        quality = lambda v: (_fmt(v.get("miou"), ".4f"), _fmt(v.get("miou_drop"), ".2f"),  # noqa: E731
                             _fmt(v.get("mask_iou"), ".4f"), _fmt(v["sqnr_db"], ".1f"))
    else:
        head = ("variant", "size MB", "x smaller", "int8 w", "top-1", "drop pts", "agree", "SQNR dB", "p50 ms",
                "p95 ms", "speedup", "pass")
        fp32 = (_fmt(b["top1"], ".4f"), "-", "-", "-")
        quality = lambda v: (_fmt(v["top1"], ".4f"), _fmt(v["top1_drop"], ".2f"), _fmt(v["agreement"], ".4f"),  # noqa: E731
                             _fmt(v["sqnr_db"], ".1f"))
    rows = [head, ("fp32", _fmt(b["size_mb"], ".2f"), "1.00", "0%", *fp32,
                   _fmt(b["latency_ms_p50"], ".3f"), _fmt(b["latency_ms_p95"], ".3f"), "1.00", "-")]
    for v in summary["variants"]:
        rows.append((
            v["name"], _fmt(v["size_mb"], ".2f"), _fmt(v["compression"], ".2f"), f"{100 * v['int8_weight_fraction']:.0f}%",
            *quality(v), _fmt(v["latency_ms_p50"], ".3f"), _fmt(v["latency_ms_p95"], ".3f"), _speedup_cell(v),
            "yes" if v["passed"] else "NO",
        ))
    for nr in summary["not_run"]:
        rows.append((nr["name"], *(["-"] * 10), "not run"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(summary: dict, summary_path: Path, report_path: Path) -> str:
    """Write summary.json and report.md; return the table for the terminal."""
    table = summary_table(summary)
    write_json(summary_path, summary)
    m = summary["machine"] or {}
    s = summary["benchmark_settings"] or {}
    lines = [
        f"# vitq report: {summary['model']}",
        "",
        f"Data: {summary['data']['validation']}; calibration: {summary['data']['calibration']}; "
        f"digest `{summary['data']['digest']}`.",
        "",
        "```",
        table,
        "```",
        "",
        *(["- mIoU: mean IoU of the variant's masks against the ground-truth masks; `drop pts`: FP32 mIoU minus the",
           "  variant's, in percentage points; `mask IoU`: IoU of the variant's masks with FP32's; SQNR compares the",
           "  output maps with FP32's."] if summary.get("task") == "dense" else
          ["- top-1 is a fraction of the validation split; `drop pts` is FP32 top-1 minus variant top-1 in percentage points;",
           "  `agree` is the share of images whose prediction matches FP32; SQNR compares the logits with FP32's."]),
        f"- Latency: ONNX Runtime CPU, batch {s.get('batch_size')}, {s.get('threads')} threads, "
        f"{s.get('warmup')} warm-up runs, {s.get('repeats')} timed runs per model in {s.get('rounds')} interleaved rounds, "
        f"input {s.get('input_shape')}.",
        f"- Machine: {m.get('cpu')} ({m.get('cores')} cores), {m.get('system')}, onnxruntime {m.get('onnxruntime')}.",
    ]
    for v in summary["variants"]:
        if v["fail_reasons"]:
            lines.append(f"- {v['name']} failed: {'; '.join(v['fail_reasons'])}")
        if v.get("faster_than_baseline") is False:
            against = ("is the float baseline the others are timed against" if v["speedup_baseline"] == v["name"] else
                       f"not faster than its baseline {v['speedup_baseline']} in this run (speedup {v['speedup']:.2f})")
            lines.append(f"- {v['name']}: {against}: never takes the @{v['target']} registry alias")
        for metric, why in v["not_measured"].items():
            lines.append(f"- {v['name']}: {metric} not measured: {why}")
        if v.get("outputs"):
            lines.append(f"- {v['name']} outputs vs FP32: " + "; ".join(
                f"{name}{' (judged)' if o['judged'] else ''} SQNR {_fmt(o['sqnr_db'], '.1f')} dB, cosine "
                f"{_fmt(o['cosine'], '.4f')}{'' if o['passed'] else ', FAIL'}" for name, o in v["outputs"].items()))
    for nr in summary["not_run"]:
        lines.append(f"- {nr['name']} not run: {nr['reason']}")
    lines += time_section(summary)
    with atomic_file(report_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return table


def time_section(summary: dict) -> list[str]:
    """report.md's "Where the time went": each stage's wall time and peak RSS, and the critical path."""
    records = summary.get("stages") or []
    if not records:
        return []
    rows = [("stage", "seconds", "peak RSS MB", "peak", "made", "ran beside")]
    newest = max(r["ended"] for r in records)
    first_of_run = min((r["started"] for r in records if r["stage"] in
                        {c["stage"] for c in summary.get("critical_path") or []}), default=newest)
    for r in records:
        made = "this run" if r["ended"] >= first_of_run else "earlier (reused)"
        rows.append((r["stage"], f"{r['seconds']:.1f}", _fmt(r.get("peak_rss_mb"), ",.0f"), r.get("peak", "-"), made,
                     ", ".join(r.get("beside") or []) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    table.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    path = summary.get("critical_path") or []
    chain = "".join(("" if not c.get("waited_on") else " -> " if c["waited_on"]["why"] == "dependency" else " ~> ")
                    + f"{c['stage']} ({c['seconds']:.0f} s)" for c in path)
    out = ["", "## Where the time went", "",
           "Each stage's wall time and its process's peak RSS when it last ran (`exact`: the stage ran alone, the",
           "kernel's high-water mark; `sampled`: variants side by side share one process, sampled every 0.1 s).", "",
           *table, ""]
    if path:
        total = sum(c["seconds"] for c in path)
        by = {r["stage"]: r for r in records}
        span = by[path[-1]["stage"]]["ended"] - by[path[0]["stage"]]["started"]
        out += [f"Critical path of the last run ({total:.0f} s of stage time; `->`: started when the stage whose output "
                "it reads ended; `~>`: started when a stage it does not read ended: its turn, one stage at a time "
                f"before the variants, then `max_workers` variants at a time): {chain}.", "",
                f"From its first stage's start to its last's end: {span:.0f} s, of which {span - total:.0f} s between "
                "stages on this path (DVC's checks and commits, the runner).", ""]
    return out
