"""Benchmark stage: size on disk and ONNX Runtime latency of FP32 and every variant, in one run.

All models get the same session options (fixed intra-op threads, full graph optimisation), the
same real input batch, the same warm-up, and are timed in interleaved rounds so that drift in
machine load affects every model alike.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from vitq.tasks._io import read_json, size_mb, write_json
from vitq.tasks._progress import Progress
from vitq.tasks.targets.onnx import backend as onnx_backend
from vitq.tasks.data import load_split, model_inputs
from vitq.tasks.model import load_model_spec
from vitq.config import BenchmarkConfig

log = logging.getLogger("vitq.benchmark")


@dataclass(frozen=True)
class Timing:
    size_mb: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_mean: float
    throughput_ips: float  # images per second at the benchmark batch size
    runs: int
    baseline: str = "fp32"  # the model this one's speedup is measured against (same runtime, same run)
    device: str = "cpu"
    # p50 of each interleaved round (ONNX Runtime timings): rounds of different models are adjacent in time, so
    # their per-round ratios cancel a shared machine's slow spells (see paired_ratio)
    round_p50_ms: list[float] = field(default_factory=list)


def paired_ratio(slow_rounds, fast_rounds) -> float | None:
    """slow / fast latency from rounds timed back to back (`Timing.round_p50_ms` of each): the median over rounds
    of the per-round p50 ratio. On a shared VM whose speed drifts by tens of percent within minutes, this pairs
    samples taken within seconds of each other; a ratio of whole-run p50s mixes spells. None without rounds."""
    a, b = np.asarray(slow_rounds or [], float), np.asarray(fast_rounds or [], float)
    return float(np.median(a / b)) if len(a) and len(a) == len(b) else None


def latency_ratio(slow_p50: float, fast_p50: float, slow_rounds=None, fast_rounds=None) -> float:
    """slow / fast latency: paired per round (paired_ratio) where both have rounds, else the ratio of p50s."""
    paired = paired_ratio(slow_rounds, fast_rounds)
    return slow_p50 / fast_p50 if paired is None else paired


@dataclass(frozen=True)
class BenchmarkResult:
    machine: dict
    settings: dict
    models: dict[str, Timing]  # "fp32" and each variant name
    not_measured: dict[str, str] = field(default_factory=dict)  # variant -> why it was not timed here

    def speedup(self, name: str) -> float | None:
        """Latency of `name`'s baseline over its own (same runtime, same run), paired per interleaved round
        (paired_ratio) where both have rounds, else the ratio of p50s; None if either was not timed."""
        t = self.models.get(name)
        base = self.models.get(t.baseline) if t else None
        if base is None:
            return None
        return latency_ratio(base.latency_ms_p50, t.latency_ms_p50, base.round_p50_ms, t.round_p50_ms)


def machine_info() -> dict:
    import os

    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(), "onnxruntime": ort.__version__}


def timing(ms: np.ndarray, path: Path, batch_size: int, baseline: str, device: str) -> Timing:
    """A Timing from latency samples (ms) of the model at `path`, against `baseline`."""
    return Timing(
        size_mb=size_mb(path),
        latency_ms_p50=float(np.percentile(ms, 50)),
        latency_ms_p95=float(np.percentile(ms, 95)),
        latency_ms_mean=float(ms.mean()),
        throughput_ips=float(batch_size * 1e3 / ms.mean()),
        runs=len(ms),
        baseline=baseline,
        device=device,
    )


def benchmark_models(models: dict[str, Path], model_dir: Path, data_dir: Path, cfg: BenchmarkConfig) -> BenchmarkResult:
    """Time every model (ONNX files) in ONNX Runtime against "fp32", interleaved, on validation images."""
    return benchmark_onnx(models, benchmark_inputs(model_dir, data_dir, cfg), cfg)


def benchmark_onnx(models: dict[str, Path], x: np.ndarray, cfg: BenchmarkConfig) -> BenchmarkResult:
    """Time every model (ONNX files; one of them "fp32") in ONNX Runtime on the batch `x` (N, C, H, W),
    interleaved, with this machine's description."""
    timings = _time_onnx(models, x, cfg)
    settings = {**cfg.model_dump(), "graph_optimization": "all", "input_shape": list(x.shape),
                "fp32_attention": "onnx_backend.fuse_attention applied where it matches, as in the INT8 serving forms"}
    return BenchmarkResult(machine=machine_info(), settings=settings, models=timings)


def benchmark_inputs(model_dir: Path, data_dir: Path, cfg: BenchmarkConfig) -> np.ndarray:
    """One batch of `cfg.batch_size` validation images (repeated when the split is smaller), preprocessed."""
    spec = load_model_spec(model_dir)
    images = load_split(data_dir, "validation").images
    reps = int(np.ceil(cfg.batch_size / len(images)))
    return model_inputs(np.concatenate([images] * reps)[: cfg.batch_size], spec.mean, spec.std)


def _served(name: str, path: Path) -> Path | bytes:
    """What ONNX Runtime runs for model `name`: its file, except the FP32 baseline, which is run with attention
    fused the way the INT8 variants' serving forms have it (onnx_backend.fuse_attention, in memory), so that a
    ratio measures quantization and not that float rewrite."""
    if name != "fp32":
        return path
    import onnx

    fused, blocks = onnx_backend.fuse_attention(onnx.load(str(path)))
    return fused.SerializeToString() if blocks else path


def _time_onnx(models: dict[str, Path], x: np.ndarray, cfg: BenchmarkConfig) -> dict[str, Timing]:
    sessions = {name: onnx_backend.session(_served(name, path), threads=cfg.threads) for name, path in models.items()}
    input_names = {name: s.get_inputs()[0].name for name, s in sessions.items()}
    for name, sess in sessions.items():
        for _ in range(cfg.warmup):
            sess.run(None, {input_names[name]: x})
    samples: dict[str, list[list[float]]] = {name: [] for name in sessions}  # per round
    per_round = max(1, cfg.repeats // cfg.rounds)
    names = list(sessions)
    progress = Progress(log, "benchmark: round", cfg.rounds, every_s=0.0)
    for r in range(cfg.rounds):
        # Each round starts with the next model (a rotation), so that no model always follows the same one.
        for name in names[r % len(names):] + names[:r % len(names)]:
            sess, feed = sessions[name], {input_names[name]: x}
            # One untimed run first: the model before it left the caches cold and its thread pool still
            # spinning (on 2 cores that costs the next model's first run tens of ms at batch 1).
            sess.run(None, feed)
            samples[name].append([])
            for _ in range(per_round):
                t0 = time.perf_counter()
                sess.run(None, feed)
                samples[name][-1].append((time.perf_counter() - t0) * 1e3)
        progress.step()
    timings = {}
    for name, rounds in samples.items():
        timings[name] = replace(timing(np.concatenate(rounds), models[name], cfg.batch_size, "fp32", "cpu"),
                                round_p50_ms=[float(np.median(r)) for r in rounds])
        log.info("benchmark: %s p50 %.3f ms", name, timings[name].latency_ms_p50)
    return timings


# Ops that only move between int8 and float: what a static graph adds (QuantizeLinear, DequantizeLinear) or a
# dynamic one computes per run (DynamicQuantizeLinear), after ORT's fusions.
QUANTIZE_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def profile_onnx(models: dict[str, Path], x: np.ndarray, threads: int, runs: int = 10) -> dict[str, dict]:
    """Where each model's time goes in ONNX Runtime (same session options as the timing: `threads` intra-op
    threads, full graph optimisation), from ORT's profiler over `runs` runs on the batch `x` after one warm-up:
    {name: {"ms_per_run": kernel time summed, "op_types": [{op, ms, share, nodes, provider}] slowest first,
    "quantize_share": the share of QUANTIZE_OPS, "weight_gemm_ms"/"_share"/"_nodes": the kernels that multiply
    by a constant weight (onnx_backend.weight_gemms of the graph ORT ran)}} (op_types: that graph, after its
    fusions)."""
    import json
    import tempfile

    import onnx

    out = {}
    with tempfile.TemporaryDirectory(prefix="vitq-profile-") as scratch:
        for name, path in models.items():
            optimized = Path(scratch) / f"{name}.optimized.onnx"
            sess = onnx_backend.session(_served(name, path), threads=threads, profile_prefix=str(Path(scratch) / name),
                                        optimized_path=optimized)
            feed = {sess.get_inputs()[0].name: x}
            sess.run(None, feed)  # warm-up (profiled too: dropped below by run count)
            for _ in range(runs):
                sess.run(None, feed)
            events = json.loads(Path(sess.end_profiling()).read_text())
            gemms = onnx_backend.weight_gemms(onnx.load(str(optimized), load_external_data=False))
            out[name] = summarize_profile(events, runs + 1, skip_runs=1, weight_gemms=gemms)
    return out


def summarize_profile(events: list[dict], total_runs: int, skip_runs: int = 0,
                      weight_gemms: set[str] = frozenset()) -> dict:
    """Per op type: mean kernel ms per run (runs after the first `skip_runs` of `total_runs`), share, node count;
    the same for the nodes named in `weight_gemms` together."""
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_run = len(kernels) // total_runs if total_runs else 0
    kept = kernels[per_run * skip_runs:] if per_run else []
    runs = max(1, total_runs - skip_runs)
    by_op: dict[str, dict] = {}
    gemm_us, gemm_nodes = 0.0, set()
    for e in kept:
        args = e.get("args", {})
        node = e["name"].removesuffix("_kernel_time")
        op = by_op.setdefault(args.get("op_name", "?"), {"us": 0.0, "nodes": set(), "provider": args.get("provider", "")})
        op["us"] += float(e.get("dur", 0))
        op["nodes"].add(node)
        if node in weight_gemms:
            gemm_us += float(e.get("dur", 0))
            gemm_nodes.add(node)
    total_us = sum(v["us"] for v in by_op.values()) or 1.0
    op_types = sorted(({"op": k, "ms": round(v["us"] / runs / 1e3, 3), "share": round(v["us"] / total_us, 4),
                        "nodes": len(v["nodes"]), "provider": v["provider"]} for k, v in by_op.items()),
                      key=lambda r: -r["ms"])
    return {
        "ms_per_run": round(total_us / runs / 1e3, 3),
        "op_types": op_types,
        "quantize_share": round(sum(v["us"] for k, v in by_op.items() if k in QUANTIZE_OPS) / total_us, 4),
        "weight_gemm_ms": round(gemm_us / runs / 1e3, 3),
        "weight_gemm_share": round(gemm_us / total_us, 4),
        "weight_gemm_nodes": len(gemm_nodes),
    }


def profile_table(profiles: dict[str, dict], top: int = 8) -> str:
    """The slowest op types of each model: ms per run and share; the weight GEMMs against everything else."""
    lines = []
    for name, p in profiles.items():
        lines.append(f"{name}: {p['ms_per_run']:.2f} ms of kernels per run, quantize/dequantize "
                     f"{p['quantize_share']:.1%}; weight GEMMs {p['weight_gemm_ms']:.2f} ms "
                     f"(x{p['weight_gemm_nodes']}), everything else {p['ms_per_run'] - p['weight_gemm_ms']:.2f} ms")
        for r in p["op_types"][:top]:
            lines.append(f"  {r['op']:28s} {r['ms']:9.3f} ms {r['share']:6.1%}  x{r['nodes']}")
    return "\n".join(lines)


def save_benchmark(result: BenchmarkResult, path: Path) -> None:
    write_json(path, asdict(result))


def load_benchmark(path: Path) -> BenchmarkResult:
    d = read_json(path)
    return BenchmarkResult(
        machine=d["machine"], settings=d["settings"], models={k: Timing(**v) for k, v in d["models"].items()},
        not_measured=d.get("not_measured", {}),
    )
