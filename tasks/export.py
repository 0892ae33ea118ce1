"""Export stage: FP32 ONNX (single file, dynamic batch), verified by the ONNX checker and by
ONNX Runtime against torch on real validation images; plus the quantization-ready copy
(`model.prep.onnx`: ONNX Runtime's shape inference + graph optimisation) that calibration and
quantization read.

For an ONNX source (`model.source: onnx`) the file is checked again (FP32, ONNX checker) and normalised to
what the later stages expect: input `input`, output `logits`, a dynamic batch axis, every node named
(layers are found by node name); the result is verified against the file as given.

A model with several outputs keeps their names (`vitq.tasks.model.named_outputs`: a tuple's `output_0`, ...,
a dict's keys, an ONNX file's graph outputs); each is verified, and `export.json` lists them in order.

Two exporters, in turn (`export.json`: `exporter`, and `fallback_reason` when the first was given up):
1. the dynamo exporter (`torch.onnx.export(dynamo=True)`, opset `export.opset`);
2. the TorchScript exporter (`dynamo=False`, opset `export.opset` capped at what it supports, 20 in torch 2.14,
   `dynamic_axes` on the batch of the input and every output) when the dynamo exporter raises, or its graph
   fails the ONNX checker, does not load in ONNX Runtime, or crashes there on the verification images. A graph
   that runs but differs from torch beyond `export.max_abs_diff` is an ExportMismatch from either exporter,
   with no fallback: a wrong graph is a fault to report, not a reason to try another tracer. The TorchScript
   graph is written as the dynamo exporter writes it where the later stages care: the module scopes
   (`pkg.torch.onnx.name_scopes`, from its scoped node names: layers are named by torch module), one
   initializer per parameter (it merges equal ones) and no all-zero Conv / Gemm bias.
   Memory: the dynamo attempt's program (and a failed attempt's traceback frames) is released and collected
   before ONNX Runtime loads the file or the TorchScript exporter traces.
When both fail: one ModelError naming the model class, each exporter's first cause (the op or module it
rejects) and what to do. What the exporters print (banners, TorchScript IR dumps, warnings) never reaches the
console: fd 1 and 2 and Python's warnings are captured around each export and logged at DEBUG to
`vitq.export` (the command's log file keeps them).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitq.tasks._io import atomic_dir, read_json, write_json
from vitq.tasks.data import load_split, model_inputs
from vitq.tasks.model import ONNX_FILE, load_model, load_model_spec, output_names, predict_outputs
from vitq.tasks.tracing import TRACE_LOCK
from vitq.config import ExportConfig

log = logging.getLogger("vitq.export")

INPUT_NAME = "input"
OUTPUT_NAME = "logits"  # a model's one output; several keep their own names
VERIFY_IMAGES = 64  # validation images compared between torch and ONNX Runtime


class ExportMismatch(RuntimeError):
    """ONNX Runtime disagrees with torch beyond the tolerance: the exported graph is wrong."""


@dataclass(frozen=True)
class ExportResult:
    onnx_path: str  # relative to the export dir
    prep_path: str
    opset: int
    max_abs_diff: float  # ONNX Runtime vs torch, FP32 logits, on `verified_images` validation images
    verified_images: int
    size_mb: float
    versions: dict
    outputs: list[str] = field(default_factory=lambda: [OUTPUT_NAME])  # the graph's outputs, in order
    # What produced model.onnx: "dynamo" / "torchscript" (torch.onnx.export), "onnx" (an ONNX source, normalised).
    # Default: export.json files written before the field existed came from the dynamo exporter.
    exporter: str = "dynamo"
    fallback_reason: str | None = None  # why the dynamo exporter was given up (its first cause), if it was


def export_onnx(model_dir: Path, data_dir: Path, cfg: ExportConfig, out_dir: Path) -> ExportResult:
    """The export stage: the workspace's FP32 model, verified on its first validation images."""
    spec = load_model_spec(model_dir)
    images = load_split(data_dir, "validation").images[:VERIFY_IMAGES]
    x = model_inputs(images, spec.mean, spec.std)
    if not spec.torch_model:
        return export_onnx_file(Path(model_dir) / ONNX_FILE, x, cfg, out_dir)
    model, spec = load_model(model_dir)
    return export_model(model, x, cfg, out_dir)


def export_model(model: torch.nn.Module, x: np.ndarray, cfg: ExportConfig, out_dir: Path) -> ExportResult:
    """Export `model` (eval mode) to `out_dir/model.onnx` + `model.prep.onnx` (+ `export.json`), verified
    by ONNX Runtime against torch on `x` (N, C, H, W), N >= 2, preprocessed as the model expects.
    The dynamo exporter first, the TorchScript exporter if that fails (module docstring); both failing is a
    ModelError, a graph that runs but disagrees with torch an ExportMismatch."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from vitq.errors import ModelError

    example = np.concatenate([x[:2]] * (3 - min(len(x), 2)))[:2]  # 2 rows: a batch of 1 would be specialised
    names = _graph_names(output_names(model, example))
    causes: dict[str, str] = {}  # exporter -> why its graph was not used
    with atomic_dir(out_dir) as tmp:
        onnx_path = tmp / "model.onnx"
        for exporter in EXPORTERS:
            try:
                opset = _EXPORT[exporter](model, example, names, cfg.opset, onnx_path)
                gc.collect()  # the exporter's program / traced graph: gone before ONNX Runtime loads the file
                got = _run_graph(onnx_path, names, x)
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any exporter fault: the next exporter, or the ModelError
                causes[exporter] = str(exc) if isinstance(exc, _GraphFault) else _first_cause(exc)
                _debug("export: the %s exporter failed: %s", exporter, _plain("".join(
                    traceback.format_exception(type(exc), exc, exc.__traceback__))))
                _clear_frames(exc)
                del exc
                for leftover in tmp.iterdir():  # a partial graph (and any external data) of this attempt
                    leftover.unlink()
                gc.collect()  # the failed attempt's program, graph and tensors, before the next one traces
                continue
            break
        else:
            raise ModelError(_both_failed(model, causes))
        fallback_reason = causes.get("dynamo")
        expected = dict(zip(names, predict_outputs(model, x).values()))
        diff, worst = _max_abs_diff(got, expected)
        del got, expected
        if not diff <= cfg.max_abs_diff:
            by = "" if fallback_reason is None else \
                f" (TorchScript exporter, used because the dynamo exporter failed: {fallback_reason})"
            raise ExportMismatch(
                f"ONNX Runtime differs from torch by {diff:.3g} (max abs, {worst}) > export.max_abs_diff "
                f"{cfg.max_abs_diff}; the exported graph{by} is not faithful"
            )
        quant_pre_process(str(onnx_path), str(tmp / "model.prep.onnx"), skip_symbolic_shape=True)
        onnx.checker.check_model(str(tmp / "model.prep.onnx"))
        result = ExportResult(
            onnx_path="model.onnx",
            prep_path="model.prep.onnx",
            opset=opset,
            max_abs_diff=diff,
            verified_images=len(x),
            size_mb=onnx_path.stat().st_size / 2**20,
            versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
            outputs=list(names),
            exporter=exporter,
            fallback_reason=fallback_reason,
        )
        write_json(tmp / "export.json", asdict(result))
    log.info("export: %s exporter%s, opset %d, %.2f MB, max |ORT - torch| = %.2e on %d images", exporter,
             "" if fallback_reason is None else f" (the dynamo exporter failed: {fallback_reason})",
             opset, result.size_mb, diff, len(x))
    return result


# -- the two exporters --------------------------------------------------------------------------------------------

EXPORTERS = ("dynamo", "torchscript")  # tried in this order


def _torchscript_max_opset() -> int:
    """The highest opset the TorchScript exporter writes (20 in torch 2.14; 17 if torch does not say)."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except Exception:  # noqa: BLE001 - a private constant; 17 exports the zoo (ENVIRONMENT.md)
        return 17


def _export_dynamo(model: torch.nn.Module, example: np.ndarray, names: tuple[str, ...], opset: int,
                   onnx_path: Path) -> int:
    """model.onnx by the dynamo exporter (single file, dynamic batch); returns its opset."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    with TRACE_LOCK, _captured("dynamo"):  # graph capture is not thread-safe; variants may export concurrently
        program = torch.onnx.export(
            model,
            (torch.from_numpy(example),),
            input_names=[INPUT_NAME],
            output_names=list(names),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: batch},),  # by position: any name of forward's argument
            optimize=True,
            verbose=False,
        )
        try:
            program.save(str(onnx_path), external_data=False)
        finally:
            del program  # the ExportedProgram and the ONNX IR model: the file is what the later steps read
    return opset


def _export_torchscript(model: torch.nn.Module, example: np.ndarray, names: tuple[str, ...], opset: int,
                        onnx_path: Path) -> int:
    """model.onnx by the TorchScript exporter (single file, the batch axis of the input and every output
    dynamic, the dynamo exporter's module scopes recorded); returns its opset."""
    import onnx

    opset = min(opset, _torchscript_max_opset())
    with TRACE_LOCK, _captured("torchscript"), torch.no_grad():
        torch.onnx.export(
            model,
            (torch.from_numpy(example),),
            str(onnx_path),
            input_names=[INPUT_NAME],
            output_names=list(names),
            opset_version=opset,
            dynamo=False,
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *names)},
            do_constant_folding=True,
        )
    extra = sorted(p.name for p in onnx_path.parent.iterdir() if p != onnx_path)
    if extra:  # over 2 GB: the exporter wrote the weights beside the graph
        raise _GraphFault(f"the graph is over 2 GB: the TorchScript exporter wrote external data ({extra[0]}, ...), "
                           "and the export is one file")
    graph = onnx.load(str(onnx_path))
    _record_scopes(graph, [name for name, _ in model.named_modules()])
    _unshare_initializers(graph)
    onnx.save(graph, str(onnx_path))
    return opset


_EXPORT = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _record_scopes(graph, module_names: list[str]) -> None:
    """Give a TorchScript graph's nodes the module scopes the dynamo exporter records (`pkg.torch.onnx.name_scopes`:
    `['', 'blocks', 'blocks.0', 'blocks.0.attn', 'blocks.0.attn.qkv', '<op>']`), read from its scoped node
    names (`/blocks/blocks.0/attn/qkv/MatMul`: each part the module's name in its parent, a ModuleList's items
    as `<list>.<i>`); `vitq.tasks.recovery.layers` names layers by them. Changes `graph` in place."""
    from vitq.tasks.recovery.layers import SCOPE_KEY

    known = set(module_names)
    for node in graph.graph.node:
        parts = [p for p in node.name.split("/") if p]
        if not node.name.startswith("/") or len(parts) < 2 or any(p.key == SCOPE_KEY for p in node.metadata_props):
            continue
        chain: list[str] = []
        for part in parts[:-1]:
            here = chain[-1] if chain else ""
            parent = chain[-2] if len(chain) > 1 else ""
            found = next((c for c in (f"{here}.{part}" if here else part,  # a child
                                      f"{parent}.{part}" if parent else part,  # a ModuleList item: `blocks.0`
                                      part)  # a name from the root
                          if c in known), None)
            if found is None:
                break
            chain.append(found)
        prop = node.metadata_props.add()
        prop.key = SCOPE_KEY
        prop.value = repr(["", *chain, parts[-1]])


class _GraphFault(RuntimeError):
    """An exported graph that cannot be used (its message says why, in one line): the next exporter is tried."""


def _unshare_initializers(graph) -> None:
    """Parameters as the dynamo exporter writes them. (1) The TorchScript exporter merges equal initializers (eval
    mode: every zero bias of one size, in a model with fresh weights, is one tensor, each other parameter an
    Identity of it): each such Identity becomes the parameter's own initializer, under its name, so a Conv / Gemm
    weight names its own module. (2) An all-zero Conv / Gemm bias is dropped (the dynamo exporter's optimizer
    drops it too): ONNX Runtime's pre-processing would share it between the Conv and the Adds of equal size
    (one DequantizeLinear for both after quantization: not a valid Q/DQ graph for TensorRT). Changes `graph` in
    place."""
    from onnx import numpy_helper

    g = graph.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    identities = [n for n in g.node if n.op_type == "Identity" and len(n.input) == 1 and n.input[0] in inits
                  and n.output[0] not in outputs and n.output[0] not in inits]
    for node in identities:
        copy = g.initializer.add()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        inits[copy.name] = copy
    for node in identities:
        g.node.remove(node)
    zero: dict[str, bool] = {}
    for node in g.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) == 3 and node.input[2] in inits:
            name = node.input[2]
            if name not in zero:
                zero[name] = not np.any(numpy_helper.to_array(inits[name]))
            if zero[name]:
                del node.input[2]
    used = {i for n in g.node for i in n.input}
    for name in [n for n, is_zero in zero.items() if is_zero and n not in used]:
        g.initializer.remove(inits[name])


def _run_graph(onnx_path: Path, names: tuple[str, ...], x: np.ndarray) -> dict[str, np.ndarray]:
    """The graph checked (ONNX checker) and run in ONNX Runtime on `x`: its outputs by name. A fault is a
    _GraphFault saying which step failed and why (a mismatch is the caller's to judge)."""
    import onnx
    import onnxruntime as ort

    step = "the ONNX checker rejects its graph"
    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
        step = "ONNX Runtime cannot load its graph"
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        step = f"its graph fails in ONNX Runtime at batch {len(x)}"
        return dict(zip(names, sess.run(list(names), {INPUT_NAME: x})))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnx's ValidationError, ORT's Fail / InvalidGraph / RuntimeException
        raise _GraphFault(f"{step}: {_first_cause(exc)}") from exc


# -- what the user sees when both fail -----------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes (the dynamo exporter's banner has them)
_CAUSE_CHARS = 300


def _plain(text: str) -> str:
    return _ANSI.sub("", text)


def _first_line(text: str) -> str:
    return next((line.strip() for line in _plain(text).splitlines() if line.strip()), "")


def _one_line(text: str, limit: int = _CAUSE_CHARS) -> str:
    text = " ".join(_plain(text).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes, outermost first (`__cause__`, else an unsuppressed `__context__`)."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain) and len(chain) < 64:
        chain.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
    return chain


def _first_cause(exc: BaseException) -> str:
    """One line: the op or module an exporter rejects, from its exception chain (the dynamo exporter wraps the
    cause in banners of its own). In order: the old exporter's `Unsupported FX nodes: {...}`; an
    UnsupportedOperatorError (`aten::xyz` to opset N); the innermost exception with a message, prefixed by the
    FX node target being translated (`aten.scaled_dot_product_attention`) where a message names one."""
    chain = _chain(exc)
    texts = [_plain(str(e)) for e in chain]
    for text in texts:
        found = re.search(r"Unsupported FX nodes: \{.*?\}", text, re.S)
        if found:
            return _one_line(found.group(0))
    for e, text in zip(chain, texts):
        if type(e).__name__ == "UnsupportedOperatorError" and _first_line(text):
            return _one_line(re.sub(r"\.\s*Please .*$", "", _first_line(text)))
    op = None
    for text in texts:
        found = re.search(r"target=(?:torch\.ops\.)?([\w.]+?)(?:\.default)?\]", text)
        if found:
            op = found.group(1)
            break
    inner = next(((e, t) for e, t in zip(reversed(chain), reversed(texts)) if _first_line(t)), None)
    line = f"{type(chain[-1]).__name__}" if inner is None else f"{type(inner[0]).__name__}: {_first_line(inner[1])}"
    if op and op not in line:
        line = f"{op}: {line}"
    return _one_line(line)


def _both_failed(model: torch.nn.Module, causes: dict[str, str]) -> str:
    cls = type(model)
    shown = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    return _one_line(
        f"the model ({shown}) does not export to ONNX: the dynamo exporter fails ({causes.get('dynamo', '?')}) "
        f"and so does the TorchScript exporter ({causes.get('torchscript', '?')}); export it to ONNX another way and "
        "give the file (model.source: onnx), or replace the module that uses the unsupported op",
        limit=2000,
    )


def _clear_frames(exc: BaseException) -> None:
    """Drop the locals of the frames an exception chain holds (a failed export's program and graph)."""
    for e in _chain(exc):
        with contextlib.suppress(Exception):
            traceback.clear_frames(e.__traceback__)


# -- keeping the exporters off the console -------------------------------------------------------------------------

_CAPTURE_LOCK = threading.Lock()
_CAPTURE_BYTES = 1 << 20  # of an exporter's output logged (a TorchScript IR dump of a big model runs to megabytes)


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # C stdio (C++ iostreams sync with it): the TorchScript IR dumps
        import ctypes

        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def _captured(exporter: str) -> Iterator[None]:
    """Inside: whatever is written to fd 1 and 2 (Python, C++, torch's own log handlers) and Python's warnings go
    to a temporary file, logged at DEBUG to `vitq.export` afterwards. fd 1 and 2 are process-wide: another
    thread's raw writes meanwhile land in that record too (nothing is lost), and an interruption puts them back
    before its line is printed (`vitq.interrupt.on_interrupt`)."""
    from vitq import interrupt

    with _CAPTURE_LOCK, tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # once per place; never an error (a filter set to raise) inside an export
        _flush_all()
        saved: dict[int, int] = {}
        with contextlib.suppress(OSError):
            for fd in (1, 2):
                saved[fd] = os.dup(fd)
        done = threading.Lock()

        def restore() -> None:
            if not done.acquire(blocking=False):
                return
            _flush_all()
            for fd, copy in saved.items():
                with contextlib.suppress(OSError):
                    os.dup2(copy, fd)
                    os.close(copy)

        unregister = interrupt.on_interrupt(restore)
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            restore()
            unregister()
            sink.seek(0)
            text = _plain(sink.read(_CAPTURE_BYTES).decode("utf-8", "replace")).strip()
            if sink.read(1):
                text += f"\n... (cut at {_CAPTURE_BYTES} bytes)"
            if text:
                _debug("export: what the %s exporter printed:\n%s", exporter, text)
            for w in caught:
                _debug("export: %s exporter warning: %s: %s (%s:%s)", exporter, w.category.__name__,
                       _plain(str(w.message)), w.filename, w.lineno)


def _debug(msg: str, *args) -> None:
    """A DEBUG record of `vitq.export`: where DEBUG is off (vitq's loggers are at INFO), still handed to the
    handlers while a command's log file is open, so the file keeps it (its console handler shows only vitq's
    CONSOLE lines and errors, or everything with -v)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug(msg, *args)
        return
    from vitq import logs

    if logs.current() is not None:
        log.handle(log.makeRecord(log.name, logging.DEBUG, __file__, 0, msg, args, None))


def _graph_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """The ONNX names of a model's outputs: one is `logits`; several keep theirs, none may be the input's."""
    from vitq.errors import ModelError

    if len(names) > 1 and INPUT_NAME in names:
        raise ModelError(f"the model has an output named {INPUT_NAME!r} (outputs: {', '.join(names)}), the name of "
                         "its input in the exported graph; rename that output")
    return (OUTPUT_NAME,) if len(names) == 1 else names


def _max_abs_diff(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> tuple[float, str]:
    """The largest |got - expected| over every output, and which output it is in."""
    diffs = {k: float(np.max(np.abs(got[k] - expected[k]))) if got[k].size else 0.0 for k in expected}
    worst = max(diffs, key=lambda k: diffs[k] if diffs[k] == diffs[k] else float("inf"))  # NaN: the worst
    return diffs[worst], worst


def normalize_onnx(model, batch_dim: str = "batch"):
    """The graph the later stages read: its one input renamed `input`, its one output `logits` (several outputs
    keep their names), the batch axis of each symbolic (`batch_dim`), every node named (`<op>_<i>` where unnamed),
    stale value_info dropped (shape inference redoes it). Changes `model` (an onnx.ModelProto) in place and
    returns it."""
    from vitq.tasks.sources import onnx_input_output, onnx_output_names

    g = model.graph
    inp, out = onnx_input_output(model)
    _graph_names(onnx_output_names(model))  # several outputs: none may be called `input`
    used = {n for node in g.node for n in (*node.input, *node.output)} | {i.name for i in g.initializer}
    renames = {inp.name: INPUT_NAME, **({out.name: OUTPUT_NAME} if len(g.output) == 1 else {})}
    for old, new in list(renames.items()):  # a tensor already called `input` / `logits` makes room first
        if new in used and new not in renames:
            renames[new] = next(f"{new}_{i}" for i in range(1, len(used) + 2) if f"{new}_{i}" not in used)
    renames = {k: v for k, v in renames.items() if k != v}

    def rename(names) -> None:
        for i, n in enumerate(names):
            if n in renames:
                names[i] = renames[n]

    for node in g.node:
        rename(node.input)
        rename(node.output)
    for vi in (*g.input, *g.output):
        vi.name = renames.get(vi.name, vi.name)
    del g.value_info[:]
    for vi in (inp, *g.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = batch_dim
    taken = {n.name for n in g.node if n.name}
    for i, node in enumerate(g.node):
        if not node.name:
            node.name = next(f"{node.op_type}_{j}" for j in range(i, i + len(g.node) + 1) if f"{node.op_type}_{j}" not in taken)
            taken.add(node.name)
    return model


def export_onnx_file(path: Path, x: np.ndarray, cfg: ExportConfig, out_dir: Path) -> ExportResult:
    """An ONNX source's export: `path` (an FP32 ONNX file) checked (`vitq.tasks.sources.check_onnx_file`), normalised
    (`normalize_onnx`) into `out_dir/model.onnx` + `model.prep.onnx` (+ `export.json`), and verified by ONNX
    Runtime against the file as given on `x` (N, C, H, W)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from vitq.tasks.model import predict_onnx_outputs
    from vitq.tasks.sources import check_onnx_file, onnx_output_names
    from vitq.errors import ModelError

    shown = f"the model's ONNX file {str(path)!r}"
    model = check_onnx_file(Path(path), shown)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    names = onnx_output_names(model)
    with atomic_dir(out_dir) as tmp:
        onnx_path = tmp / "model.onnx"
        onnx.save(normalize_onnx(model), str(onnx_path))
        onnx.checker.check_model(str(onnx_path), full_check=True)
        expected = predict_onnx_outputs(Path(path), x, shown)
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        try:
            got = dict(zip(names, sess.run(list(names), {INPUT_NAME: x})))
        except Exception as exc:  # a batch size fixed inside the graph (a Reshape to [1, ...])
            raise ModelError(f"{shown} does not run at batch {len(x)} once its batch axis is dynamic "
                             f"({str(exc).strip().splitlines()[0]}); export it with a dynamic batch axis") from None
        diff, worst = _max_abs_diff(got, expected)
        if not diff <= cfg.max_abs_diff:
            raise ModelError(f"{shown} gives other outputs at batch {len(x)} than at its own batch size (max abs diff "
                             f"{diff:.3g} in {worst!r} > export.max_abs_diff {cfg.max_abs_diff}); export it with a "
                             "dynamic batch axis")
        quant_pre_process(str(onnx_path), str(tmp / "model.prep.onnx"), skip_symbolic_shape=True)
        onnx.checker.check_model(str(tmp / "model.prep.onnx"))
        result = ExportResult(
            onnx_path="model.onnx",
            prep_path="model.prep.onnx",
            opset=opset,
            max_abs_diff=diff,
            verified_images=len(x),
            size_mb=onnx_path.stat().st_size / 2**20,
            versions={"onnx": onnx.__version__, "onnxruntime": ort.__version__},
            outputs=list(names),
            exporter="onnx",
        )
        write_json(tmp / "export.json", asdict(result))
    log.info("export: ONNX file %s, opset %d, %.2f MB, max |normalised - given| = %.2e on %d images",
             path, opset, result.size_mb, diff, len(x))
    return result


def load_export_result(export_dir: Path) -> ExportResult:
    return ExportResult(**read_json(Path(export_dir) / "export.json"))
