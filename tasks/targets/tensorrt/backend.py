"""TensorRT backend: build an engine from the conformance-checked Q/DQ ONNX, run it, time it.

Written against the documented TensorRT Python API (10.x; 11.x where it differs). TensorRT cannot
be installed on the machines this project is built on: `tensorrt` is imported only inside the
functions that build or run engines (on a `cuda` worker); everywhere else the pipeline records the
TensorRT variants as not run, with the reason, and never fakes their numbers.

Precision: explicit quantization. The Q/DQ nodes fix which tensors are INT8. Outside them:
- TensorRT 10.x (weakly typed network): FP16 and INT8 builder flags on the FP32 Q/DQ graph, with
  LayerNorm (and any layer type in `keep_fp32_layer_types`) pinned to FP32 under OBEY_PRECISION_CONSTRAINTS;
- TensorRT 11.x removed those flags: the network is strongly typed and runs in the ONNX graph's own
  types, so it is built from the variant's FP16 graph (`model.fp16.onnx`, tasks/targets/tensorrt/fp16.py:
  FP16 outside the Q/DQ pairs, LayerNorm, Softmax and reductions FP32), and the FP16 baseline from the same
  conversion of the FP32 graph. An FP32 graph is refused there (it would build an FP32 engine).
The FP16 graph is written into every TensorRT variant's folder whichever TensorRT builds it.
A timing cache file is read before and written after each build, so rebuilds are fast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class EngineBuildConfig:
    workspace_mb: int = 4096  # builder scratch memory
    fp16: bool = True  # layers outside Q/DQ in FP16 (10.x: the builder flag; 11.x: the graph must be FP16)
    int8: bool = True  # honour the graph's Q/DQ (False: the FP16 baseline from the float graph)
    keep_fp32_layer_types: tuple[str, ...] = ("NORMALIZATION",)  # trt.LayerType names kept in FP32
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8


FP16_GRAPH = "model.fp16.onnx"  # in a TensorRT variant's folder: what a strongly typed build reads
FP16_RECORD = "fp16.json"  # beside it: the conversion's record (tensorrt_fp16.Fp16Graph)


@dataclass(frozen=True)
class EngineBuildResult:
    engine: str
    tensorrt: str  # version
    precision_mode: str  # e.g. "int8+fp16 (weakly typed)", "int8+fp16 (strongly typed)"
    fp32_layers: list[str] = field(default_factory=list)  # layers (weakly typed) / graph nodes kept in FP32
    build_seconds: float = 0.0
    graph: str = ""  # the ONNX file the engine was built from


def missing() -> str | None:
    """Why TensorRT cannot run here, or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the Python module 'tensorrt' is not installed (TensorRT engines are built on cuda workers)"
    try:
        import torch

        if not torch.cuda.is_available():
            return "TensorRT is installed but no CUDA device is visible"
    except ImportError:
        return "torch is needed for CUDA buffers"
    return None


def _layer_type_names(trt) -> dict:
    return {name: getattr(trt.LayerType, name) for name in dir(trt.LayerType) if name.isupper()}


def strongly_typed(trt) -> bool:
    """True for a TensorRT without the weak-typing precision flags (11.x): networks take the graph's types."""
    return not (hasattr(trt.BuilderFlag, "INT8") and hasattr(trt.BuilderFlag, "FP16"))


def graph_precision(onnx_path: Path) -> tuple[str, list[str]]:
    """("int8+fp16", "fp16", "int8+fp32" or "fp32": what a strongly typed build of the graph runs in, the nodes
    computing in FP32) of the ONNX file at `onnx_path`."""
    import onnx

    from vitq.tasks.targets.tensorrt import fp16 as tensorrt_fp16

    model = onnx.load(str(onnx_path))
    precisions = tensorrt_fp16.node_precisions(model)
    fp32 = sorted(n for n, t in precisions.items() if t == onnx.TensorProto.FLOAT)
    float_part = "fp16" if onnx.TensorProto.FLOAT16 in precisions.values() else "fp32"
    int8 = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    return f"{'int8+' if int8 else ''}{float_part}", fp32


def build_engine(onnx_path: Path, engine_path: Path, cfg: EngineBuildConfig, timing_cache: Path) -> EngineBuildResult:
    """Engine at `engine_path` from the ONNX file at `onnx_path`: weakly typed with `cfg`'s precision flags
    (TensorRT 10.x), or strongly typed in the graph's own types (11.x; `cfg.fp16` then needs an FP16 graph)."""
    import tensorrt as trt

    weakly_typed = not strongly_typed(trt)
    fp32_layers: list[str] = []
    if not weakly_typed:
        precision, fp32_layers = graph_precision(onnx_path)
        if cfg.fp16 and "fp16" not in precision:
            raise ValueError(f"{onnx_path.name} is an FP32 graph: TensorRT {trt.__version__} builds it strongly typed, "
                             f"in FP32; build from its FP16 graph (vitq.tasks.targets.tensorrt.fp16.write_fp16_graph)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # 11.x: every network is strongly typed (the flag, where it still exists, is accepted and ignored).
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 0 if weakly_typed or typed_flag is None else 1 << int(typed_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
    if weakly_typed:
        if cfg.int8:
            config.set_flag(trt.BuilderFlag.INT8)
        if cfg.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        keep = {_layer_type_names(trt)[t] for t in cfg.keep_fp32_layer_types}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in keep:
                layer.precision = trt.float32
                for o in range(layer.num_outputs):
                    layer.set_output_type(o, trt.float32)
                fp32_layers.append(layer.name)
        if fp32_layers:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    inp = network.get_input(0)
    shape = tuple(inp.shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (cfg.min_batch, *shape), (cfg.opt_batch, *shape), (cfg.max_batch, *shape))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    seconds = time.perf_counter() - start
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return EngineBuildResult(
        engine=engine_path.name,
        tensorrt=trt.__version__,
        precision_mode=(
            f"{'int8+' if cfg.int8 else ''}{'fp16' if cfg.fp16 else 'fp32'} (weakly typed)"
            if weakly_typed else f"{precision} (strongly typed)"
        ),
        fp32_layers=fp32_layers,
        build_seconds=round(seconds, 2),
        graph=Path(onnx_path).name,
    )


class EngineRunner:
    """Runs a serialized engine on CUDA tensors (torch owns the device memory and the stream)."""

    def __init__(self, engine_path: Path):
        import tensorrt as trt
        import torch

        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == mode)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) != mode)
        self.stream = torch.cuda.Stream()

    def _bind(self, x):
        torch = self.torch
        self.context.set_input_shape(self.input, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        return out

    def predict(self, x: np.ndarray, batch_size: int = 8) -> np.ndarray:
        torch = self.torch
        outs = []
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).cuda()
            out = self._bind(xb)
            self.context.execute_async_v3(self.stream.cuda_stream)
            self.stream.synchronize()
            outs.append(out.cpu().numpy())
        return np.concatenate(outs)

    def time_ms(self, x: np.ndarray, warmup: int, repeats: int) -> np.ndarray:
        """Per-run latency in ms, measured with CUDA events on the engine's stream."""
        torch = self.torch
        xb = torch.from_numpy(np.ascontiguousarray(x)).cuda()
        self._bind(xb)
        for _ in range(warmup):
            self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self.context.execute_async_v3(self.stream.cuda_stream)
            end.record(self.stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return np.asarray(times)



def write_variant_fp16_graph(folder: Path):
    """The FP16 graph of the variant's Q/DQ `folder/model.onnx` into `folder/model.fp16.onnx`, checked, with its
    record in `folder/fp16.json` (tensorrt_fp16.Fp16Graph, returned). Pure ONNX: runs without TensorRT."""
    from dataclasses import asdict

    from vitq.tasks._io import write_json
    from vitq.tasks.targets.tensorrt import fp16 as tensorrt_fp16

    record = tensorrt_fp16.write_fp16_graph(folder / "model.onnx", folder / FP16_GRAPH)
    write_json(folder / FP16_RECORD, asdict(record))
    return record


def build_variant_engine(folder: Path, variants_dir: Path) -> str:
    """The engine of a variant from its Q/DQ `folder/model.onnx` (TensorRT 10.x, weakly typed) or from its FP16
    graph `folder/model.fp16.onnx` (11.x, strongly typed; written here for both), with `engine.json`; returns
    the engine's file name."""
    from dataclasses import asdict

    import tensorrt as trt

    from vitq.tasks._io import write_json

    write_variant_fp16_graph(folder)
    source = folder / (FP16_GRAPH if strongly_typed(trt) else "model.onnx")
    built = build_engine(
        source, folder / "model.engine", EngineBuildConfig(),
        # Beside, not inside, the variants folder (a DVC output that is replaced on each run).
        Path(variants_dir).parent / "tensorrt.timing-cache",
    )
    write_json(folder / "engine.json", asdict(built))
    return built.engine


def variant_artifacts(folder: Path) -> dict[str, list[Path]]:
    """What tracking logs of a TensorRT variant: the engine, the Q/DQ graph and its FP16 graph (what the engine
    is built from) under "model"; the build and conversion records under "reports"."""
    return {"model": [folder / "model.engine", folder / "model.onnx", folder / FP16_GRAPH],
            "reports": [folder / "engine.json", folder / FP16_RECORD]}


def baseline_graph(fp32_onnx: Path, out_dir: Path) -> Path:
    """What the FP16 baseline engine is built from: the FP32 graph (TensorRT 10.x, FP16 flag), or its FP16 graph
    written into `out_dir` (11.x: the same conversion as the variants' graphs, without Q/DQ)."""
    import tensorrt as trt

    from vitq.tasks.targets.tensorrt import fp16 as tensorrt_fp16

    if not strongly_typed(trt):
        return fp32_onnx
    path = Path(out_dir) / "fp16.onnx"
    tensorrt_fp16.write_fp16_graph(fp32_onnx, path)
    return path


def time_engines(engines: dict[str, Path], fp32_onnx: Path, x: np.ndarray, cfg) -> dict:
    """Timings (benchmark.Timing) of the engines and of "fp16-tensorrt", built from `fp32_onnx` here."""
    import logging
    import tempfile

    import torch

    from vitq.tasks.benchmark import timing

    log = logging.getLogger("vitq.benchmark")
    device = torch.cuda.get_device_name()
    out = {}
    with tempfile.TemporaryDirectory(prefix="vitq-trt-") as tmp:
        base = Path(tmp) / "fp16.engine"
        build_engine(baseline_graph(fp32_onnx, Path(tmp)), base, EngineBuildConfig(int8=False), Path(tmp) / "timing-cache")
        runs = {"fp16-tensorrt": base, **engines}
        for name, path in runs.items():
            ms = EngineRunner(path).time_ms(x, cfg.warmup, cfg.repeats)
            out[name] = timing(ms, path, cfg.batch_size, "fp16-tensorrt", device)
            log.info("benchmark: %s p50 %.3f ms on %s", name, out[name].latency_ms_p50, device)
    return out
