"""`vitq peers`: other tools' INT8 next to vitq's recipes, on the same FP32 ONNX, calibration and validation
images -> reports/peers.json and reports/peers.md.

Each case is `vitq recovery-accuracy`'s (its folders under `artifacts/recovery/<case>/`, rebuilt on every run).
Every peer starts from the case's quantization-ready FP32 graph (`export/model.prep.onnx`, the one vitq's recipes
quantize), calibrates on the calibration split (one image per step), and is judged like vitq's variants: ONNX
Runtime on the validation split against the FP32 outputs (top-1 drop, logits SQNR). INT8 share: the Linear/Conv
MACs whose node reads DequantizeLinear on both inputs (tasks/recovery/variants.py `layer_precision`, the same
function vitq's variants are counted with). Seconds: the quantization call alone (vitq: its quantize stage,
which reads the calibrate stage's tables; a peer calibrates inside its call).

Peers (one registry, `PEERS`):
- ort: `onnxruntime.quantization.quantize_static` with its defaults (QDQ, int8 activations and weights, MinMax).
- nncf: `nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER)`, defaults otherwise.
- nncf-ac: `nncf.quantize_with_accuracy_control(..., max_drop=<recovery budget>)`, model_type TRANSFORMER;
  its validation_fn is top-1 on the held-out images (the data stage's `holdout` split, the one vitq's searches
  judge on; agreement with FP32 without labels), max_drop the case's budget in those units (points / 100).
- modelopt: NVIDIA ModelOpt's `modelopt.onnx.quantization.quantize(quantize_mode="int8")` with its defaults
  (entropy calibration, its own Q/DQ placement) except calibration on the CPU execution provider and the
  unquantized part kept FP32 (vitq/experiments/modelopt_runner.py says why), run by `.venv-modelopt`'s python in
  a process of its own per model (`run_modelopt`): ModelOpt wants onnx 1.21 and onnxruntime-gpu, and it patches
  ONNX Runtime's calibration in place. Its seconds are the quantize call alone, timed inside that process.
NNCF is the optional extra `nncf` (`pip install -e '.[nncf]'`); ModelOpt's venv is `make modelopt` (another
place: VITQ_MODELOPT_VENV); ONNX Runtime's peer needs nothing extra.

Per model (the zoo matrix, vitq/experiments/zoo_cell.py): `quantize_peer(name, prep_onnx, calibration, out_onnx)`
-> `PeerRun` (seconds of the quantization call alone, a one-line error or None, the output path) for "modelopt",
"nncf" and "ort", and `qdq_placement(model)`: where a Q/DQ graph puts its DequantizeLinear nodes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from vitq.tasks._io import atomic_file, write_json
from vitq.tasks.layout import Workspace
from vitq.config import Params
from vitq.errors import VitqError

log = logging.getLogger("vitq.peers")

VITQ_RECIPES = ("onnx-w8a8-minmax", "onnx-w8a8-auto")  # plain INT8 and the recipe that composes the recoveries
DEFAULT_CASES = ("digits", "outliers", "outliers_multi", "outliers_heavy", "outliers_alternating")


@dataclass(frozen=True)
class PeerInputs:
    """What every peer gets: the same graph and images vitq's recipes get."""

    prep_onnx: Path  # the case's quantization-ready FP32 graph
    calibration: np.ndarray  # (N, C, H, W) float32: the calibration split, model inputs
    judging: np.ndarray  # (M, C, H, W) float32: the held-out images vitq's searches judge on
    metric: Callable[[np.ndarray], float]  # outputs on `judging` -> top-1 (fraction), or agreement with FP32
    max_drop: float  # the case's recovery budget in `metric`'s units (absolute)


@dataclass(frozen=True)
class Peer:
    name: str
    call: str  # what is called, as the table names it
    needs: str | None  # the import an optional extra provides (None: installed with vitq, or `missing` says)
    quantize: Callable[[PeerInputs], tuple[onnx.ModelProto, float]]  # the model, seconds of the call alone
    missing: Callable[[], str | None] | None = None  # why the peer cannot run here (not an import), or None


@dataclass(frozen=True)
class PeerRun:
    """One peer's quantization of one model (`quantize_peer`)."""

    name: str
    out_onnx: Path  # the Q/DQ graph (written only when error is None)
    seconds: float | None  # the quantization call alone (None when it failed)
    error: str | None  # one line, or None


PEER_NAMES = ("modelopt", "nncf", "ort")  # quantize_peer's names

# --- ModelOpt: its own venv, one model per process ------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELOPT_VENV = Path(os.environ.get("VITQ_MODELOPT_VENV", REPO_ROOT / ".venv-modelopt"))
MODELOPT_RUNNER = Path(__file__).resolve().with_name("modelopt_runner.py")
MODELOPT_NOT_INSTALLED = "not installed: run `make modelopt`"
MODELOPT_TIMEOUT_S = 3600.0


def modelopt_python(venv: Path | None = None) -> Path | None:
    """The ModelOpt venv's python, or None when `make modelopt` has not built it."""
    python = Path(venv or MODELOPT_VENV) / "bin" / "python"
    return python if python.exists() else None


def _modelopt_missing() -> str | None:
    return None if modelopt_python() else f"ModelOpt {MODELOPT_NOT_INSTALLED} (.venv-modelopt)"


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _copy_model(src: Path, folder: Path) -> Path:
    """`src` and its external data files in `folder`: ModelOpt writes its intermediate graphs beside its input."""
    dst = folder / src.name
    shutil.copy2(src, dst)
    model = onnx.load(str(src), load_external_data=False)
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    for t in tensors:
        for entry in t.external_data:
            if entry.key == "location" and not (folder / entry.value).exists():
                (folder / entry.value).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src.parent / entry.value, folder / entry.value)
    return dst


def run_modelopt(fp32_onnx: Path, calibration: Path | np.ndarray, out_onnx: Path,
                 timeout_s: float = MODELOPT_TIMEOUT_S, venv: Path | None = None,
                 extra_args: tuple[str, ...] = ()) -> tuple[float | None, str | None]:
    """ModelOpt's INT8 PTQ of `fp32_onnx` into `out_onnx`, by the ModelOpt venv's python in a process of its own
    (vitq/experiments/modelopt_runner.py). `calibration`: a .npy file or an array, (N, C, H, W) float32.
    Returns (seconds of the quantize call alone, None), or (None, one-line error): the runner's exception, a
    timeout, or "not installed: run `make modelopt`" when the venv is missing. The subprocess's output is kept
    beside `out_onnx` as `<name>.modelopt.log`."""
    python = modelopt_python(venv)
    if python is None:
        return None, MODELOPT_NOT_INSTALLED
    fp32_onnx, out_onnx = Path(fp32_onnx).resolve(), Path(out_onnx).resolve()
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    log_path = out_onnx.with_name(out_onnx.stem + ".modelopt.log")
    with tempfile.TemporaryDirectory(prefix="vitq-modelopt-") as tmp:
        work = Path(tmp)
        try:
            model = _copy_model(fp32_onnx, work)
        except Exception as exc:  # noqa: BLE001: a missing or unreadable input is the run's one-line error
            detail = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [""])[0]
            return None, _one_line(f"ModelOpt input {fp32_onnx}: {type(exc).__name__}: {detail}")
        if isinstance(calibration, np.ndarray):
            np.save(work / "calibration.npy", np.ascontiguousarray(calibration, dtype=np.float32))
            calibration = work / "calibration.npy"
        cmd = [str(python), str(MODELOPT_RUNNER), str(model), str(Path(calibration).resolve()),
               str(work / "out" / "model.onnx"), *extra_args]
        try:
            proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            log_path.write_text(_text(exc.stdout) + _text(exc.stderr))
            return None, f"ModelOpt timed out after {timeout_s:.0f} s"
        log_path.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            return None, _runner_error(proc)
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return None, f"ModelOpt runner printed no result (exit code 0); see {log_path}"
        produced = work / "out" / "model.onnx"
        if not produced.exists():
            return None, "ModelOpt wrote no model"
        out_onnx.unlink(missing_ok=True)
        shutil.move(str(produced), str(out_onnx))
        for extra in (work / "out").iterdir():  # external data, if ModelOpt wrote any (large models)
            shutil.move(str(extra), str(out_onnx.parent / extra.name))
        return float(result["seconds"]), None


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _runner_error(proc: subprocess.CompletedProcess) -> str:
    from vitq.experiments.modelopt_runner import ERROR_PREFIX

    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(ERROR_PREFIX):
            return _one_line("ModelOpt " + ln[len(ERROR_PREFIX):])
    tail = lines[-1] if lines else f"exit code {proc.returncode}"
    return _one_line(f"ModelOpt runner failed (exit code {proc.returncode}): {tail}")


def _items(x: np.ndarray, input_name: str) -> list[dict[str, np.ndarray]]:
    return [{input_name: x[i : i + 1]} for i in range(len(x))]  # one image per step, (1, C, H, W)


def _input_name(model: onnx.ModelProto) -> str:
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


class _Reader:
    """ONNX Runtime's CalibrationDataReader over `_items`."""

    def __init__(self, items):
        self._items = iter(items)

    def get_next(self):
        return next(self._items, None)


def _ort_file(prep_onnx: Path, calibration: np.ndarray, out: Path) -> float:
    """ONNX Runtime's quantize_static (every argument but the paths and reader: its default) -> seconds."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    reader = type("Reader", (_Reader, CalibrationDataReader), {})(
        _items(calibration, _input_name(onnx.load(str(prep_onnx), load_external_data=False))))
    t = time.perf_counter()
    quantize_static(str(prep_onnx), str(out), reader)
    return time.perf_counter() - t


def _ort(inp: PeerInputs) -> tuple[onnx.ModelProto, float]:
    with tempfile.TemporaryDirectory(prefix="vitq-peer-ort-") as tmp:
        out = Path(tmp) / "model.onnx"
        seconds = _ort_file(inp.prep_onnx, inp.calibration, out)
        return onnx.load(str(out)), seconds


def _nncf_model(prep_onnx: Path, calibration: np.ndarray) -> tuple[onnx.ModelProto, float]:
    import nncf

    model = onnx.load(str(prep_onnx))
    dataset = nncf.Dataset(_items(calibration, _input_name(model)))
    t = time.perf_counter()
    quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER)
    return quantized, time.perf_counter() - t


def _nncf(inp: PeerInputs) -> tuple[onnx.ModelProto, float]:
    return _nncf_model(inp.prep_onnx, inp.calibration)


def _modelopt(inp: PeerInputs) -> tuple[onnx.ModelProto, float]:
    with tempfile.TemporaryDirectory(prefix="vitq-peer-modelopt-") as tmp:
        out = Path(tmp) / "model.onnx"
        seconds, error = run_modelopt(inp.prep_onnx, inp.calibration, out)
        if error:
            raise VitqError(error)
        return onnx.load(str(out)), seconds


def _nncf_ac(inp: PeerInputs) -> onnx.ModelProto:
    import nncf
    import onnxruntime as ort

    model = onnx.load(str(inp.prep_onnx))
    name = _input_name(model)

    def validation_fn(candidate: onnx.ModelProto, data) -> float:
        sess = ort.InferenceSession(candidate.SerializeToString(), providers=["CPUExecutionProvider"])
        return inp.metric(np.concatenate([sess.run(None, item)[0] for item in data]))

    t = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(_items(inp.calibration, name)), nncf.Dataset(_items(inp.judging, name)), validation_fn,
        max_drop=inp.max_drop, model_type=nncf.ModelType.TRANSFORMER)
    return quantized, time.perf_counter() - t


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("ort", "onnxruntime.quantization.quantize_static (defaults)", None, _ort),
    Peer("nncf", "nncf.quantize(model_type=TRANSFORMER)", "nncf", _nncf),
    Peer("nncf-ac", "nncf.quantize_with_accuracy_control(max_drop=budget, model_type=TRANSFORMER)", "nncf", _nncf_ac),
    Peer("modelopt", "modelopt.onnx.quantization.quantize(int8, defaults; CPU calibration, FP32 high precision)",
         None, _modelopt, _modelopt_missing),
)}


def quantize_peer(name: str, prep_onnx: Path, calibration: np.ndarray, out_onnx: Path,
                  timeout_s: float = MODELOPT_TIMEOUT_S) -> PeerRun:
    """Quantize the FP32 graph `prep_onnx` with peer `name` ("modelopt", "nncf" or "ort"; each with the
    settings the registry's peer of that name uses) on `calibration` ((N, C, H, W) float32 model inputs, one image
    per calibration step) into `out_onnx`. Never raises for the tool's own failure: `error` is one line (the
    tool's exception, or that it is not installed) and `seconds` None. `timeout_s` bounds ModelOpt's process."""
    if name not in PEER_NAMES:
        raise VitqError(f"unknown peer {name!r}; quantize_peer takes: {', '.join(PEER_NAMES)}")
    prep_onnx, out_onnx = Path(prep_onnx), Path(out_onnx)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if name == "modelopt":
        seconds, error = run_modelopt(prep_onnx, calibration, out_onnx, timeout_s)
        return PeerRun(name, out_onnx, seconds, error)
    if name == "nncf" and importlib.util.find_spec("nncf") is None:
        return PeerRun(name, out_onnx, None, "not installed: pip install -e '.[nncf]' -c constraints.txt")
    try:
        if name == "ort":
            seconds = _ort_file(prep_onnx, calibration, out_onnx)
        else:
            quantized, seconds = _nncf_model(prep_onnx, calibration)
            onnx.save(quantized, str(out_onnx))
    except Exception as exc:  # noqa: BLE001: the tool's failure is the result, in one line
        first = (str(exc).strip().splitlines() or [""])[0]
        return PeerRun(name, out_onnx, None, _one_line(f"{name}: {type(exc).__name__}: {first}".rstrip(": ")))
    return PeerRun(name, out_onnx, seconds, None)


# Ops a DequantizeLinear passes through unchanged in value kind: a constant in, a constant out.
_CONST_THROUGH = {"DequantizeLinear", "QuantizeLinear", "Transpose", "Reshape", "Cast", "Identity", "Unsqueeze",
                  "Squeeze", "Flatten", "Constant"}
PLACEMENT_OPS = ("MatMul", "Gemm", "Conv", "Add", "Mul", "LayerNormalization", "Softmax", "Gelu", "Concat")


def qdq_placement(model: onnx.ModelProto) -> dict:
    """Where a Q/DQ graph puts DequantizeLinear (JSON-ready).

    - `dq_inputs`: {consumer op type: number of its inputs read from a DequantizeLinear}, every op type that has one.
    - `nodes`: {op type: {"total", "dq_fed" (nodes with any input from a DequantizeLinear), "all_dq" (nodes
      whose every data input is: a MatMul/Gemm/Conv's first two, any other op's all but empty ones)}} for
      PLACEMENT_OPS present in the graph and every other op type in `dq_inputs`.
    - `attention_matmuls`: MatMuls with two activation inputs (neither traces back to a constant through
      Q/DQ, Transpose, Reshape, Cast...): attention's Q@K^T and P@V; `attention_matmuls_int8`: those reading
      DequantizeLinear on both; `attention_quantized`: "all", "some", "none" (or "n/a" without such MatMuls).
    - `weights`: DequantizeLinear of constants feeding MatMul/Gemm/Conv: `int8_initializer` (stored as integers),
      `float_qdq` (a float initializer through QuantizeLinear: stored FP32, quantized at run time).
    - `quantize_linear`, `dequantize_linear`: node counts; `head_float`: the graph's last MatMul/Gemm/Conv does
      not read DequantizeLinear on both inputs (None without one).
    """
    from vitq.tasks.recovery.layers import LINEAR_OPS

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    const_memo: dict[str, bool] = {}

    def is_const(name: str, depth: int = 0) -> bool:
        if name in const_memo:
            return const_memo[name]
        if name in inits:
            out = True
        elif name not in producer or depth > 32:
            out = False
        else:
            n = producer[name]
            data = [i for i in (n.input[:1] if n.op_type in ("DequantizeLinear", "QuantizeLinear", "Reshape")
                                else n.input) if i]
            out = n.op_type in _CONST_THROUGH and all(is_const(i, depth + 1) for i in data)
        const_memo[name] = out
        return out

    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    dq_inputs: dict[str, int] = {}
    nodes: dict[str, dict[str, int]] = {}
    for n in g.node:
        data = [i for i in (n.input[:2] if n.op_type in LINEAR_OPS else n.input) if i]
        fed = sum(i in dq for i in n.input if i)
        if fed:
            dq_inputs[n.op_type] = dq_inputs.get(n.op_type, 0) + fed
        if n.op_type in PLACEMENT_OPS or fed:
            c = nodes.setdefault(n.op_type, {"total": 0, "dq_fed": 0, "all_dq": 0})
            c["total"] += 1
            c["dq_fed"] += bool(fed)
            c["all_dq"] += bool(data) and all(i in dq for i in data)
    for op, c in list(nodes.items()):  # an op type outside PLACEMENT_OPS enters at its first DQ-fed node
        c["total"] = sum(1 for n in g.node if n.op_type == op)

    attention = [n for n in g.node if n.op_type == "MatMul" and not any(is_const(i) for i in n.input[:2])]
    attention_int8 = sum(all(i in dq for i in n.input[:2]) for n in attention)
    weights = {"int8_initializer": 0, "float_qdq": 0}
    linear_inputs = {i for n in g.node if n.op_type in LINEAR_OPS for i in n.input[:2]}
    for out, n in dq.items():
        if out not in linear_inputs or not is_const(n.input[0]):
            continue
        src = n.input[0]
        while src in producer and producer[src].op_type in _CONST_THROUGH - {"QuantizeLinear", "Constant"}:
            src = producer[src].input[0]
        q = producer.get(src)
        weights["float_qdq" if q is not None and q.op_type == "QuantizeLinear" else "int8_initializer"] += 1
    linear = [n for n in g.node if n.op_type in LINEAR_OPS]
    head_float = None if not linear else not all(i in dq for i in linear[-1].input[:2])
    return {
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in g.node),
        "dequantize_linear": len(dq),
        "dq_inputs": dict(sorted(dq_inputs.items())),
        "nodes": dict(sorted(nodes.items())),
        "attention_matmuls": len(attention),
        "attention_matmuls_int8": attention_int8,
        "attention_quantized": ("n/a" if not attention else "all" if attention_int8 == len(attention)
                                else "some" if attention_int8 else "none"),
        "weights": weights,
        "head_float": head_float,
    }


def check_peers(names: list[str]) -> list[Peer]:
    """The named peers; an unknown name or a missing optional extra is a one-line VitqError (before any work)."""
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise VitqError((f"unknown peer {unknown[0]!r}" if unknown else "--peers names no peer")
                        + f"; allowed: {', '.join(PEERS)}")
    peers = [PEERS[n] for n in names]
    missing = sorted({p.needs for p in peers if p.needs and importlib.util.find_spec(p.needs) is None})
    if missing:
        asked = ", ".join(p.name for p in peers if p.needs in missing)
        raise VitqError(f"peer(s) {asked} need {', '.join(missing)}, which is not installed: "
                        f"pip install -e '.[nncf]' -c constraints.txt (or leave them out: --peers ort)")
    for p in peers:
        why = p.missing() if p.missing else None
        if why:
            raise VitqError(f"peer {p.name}: {why} (or leave it out of --peers)")
    return peers


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnxruntime", "onnx", "nncf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    out.update(_modelopt_version())
    return out


def _modelopt_version() -> dict:
    """{"nvidia-modelopt": version} from the ModelOpt venv's own site-packages (it is not installed in vitq's)."""
    from importlib.metadata import distributions

    for site in sorted(MODELOPT_VENV.glob("lib/python*/site-packages")):
        for dist in distributions(path=[str(site)]):
            if (dist.metadata["Name"] or "").lower() == "nvidia-modelopt":
                return {"nvidia-modelopt": dist.version}
    return {}


def eight_bit_dq(model: onnx.ModelProto) -> bool:
    """Every DequantizeLinear that feeds a MatMul/Gemm/Conv's input or weight reads 8-bit integers (its zero
    point's type, else its input initializer's; a bias DequantizeLinear is int32 by design and not looked at)."""
    from vitq.tasks.targets.onnx.backend import EIGHT_BIT
    from vitq.tasks.recovery.layers import LINEAR_OPS

    types = {i.name: i.data_type for i in model.graph.initializer}
    fed = {i for n in model.graph.node if n.op_type in LINEAR_OPS for i in n.input[:2]}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.output[0] in fed:
            t = types.get(n.input[2]) if len(n.input) > 2 and n.input[2] else types.get(n.input[0])
            if t is not None and t not in EIGHT_BIT:
                return False
    return True


def _peer_inputs(dirs, cp: Params) -> tuple[PeerInputs, float]:
    from vitq.tasks.targets.onnx import backend as onnx_backend
    from vitq.tasks.data import load_split, model_inputs
    from vitq.tasks.model import load_model_spec
    from vitq.tasks.recovery.variants import Inputs, judging_split
    from vitq.tasks.validate import validation_judge

    spec = load_model_spec(dirs.model_dir)
    calibration = model_inputs(load_split(dirs.data_dir, "calibration").images, spec.mean, spec.std)
    split = judging_split(Inputs(dirs.model_dir, dirs.data_dir, dirs.export_dir, dirs.calibration_dir, cp))
    judging, judge = validation_judge(dirs.model_dir, dirs.data_dir, cp.task, split)
    ref = onnx_backend.run_batched(onnx_backend.session(dirs.export_dir / "model.onnx"), judging, cp.validate_.batch_size)

    def metric(out: np.ndarray) -> float:
        m = judge.evaluate(ref, out, None)
        return m.top1 if m.top1 is not None else m.agreement

    return PeerInputs(dirs.export_dir / "model.prep.onnx", calibration, judging, metric,
                      cp.recovery.max_top1_drop / 100.0), metric(ref)


def run_peer(dirs, cp: Params, case, peer: Peer, inputs: PeerInputs, layers) -> dict:
    """Quantize with `peer`, save it as the case's variant `peer-<name>`, validate it like vitq's variants."""
    from vitq.tasks import validate
    from vitq.tasks.targets.onnx import backend as onnx_backend
    from vitq.tasks.recovery.variants import layer_precision
    from vitq.experiments.recovery_accuracy import _f, _record, case_budget

    t = time.perf_counter()
    quantized, seconds = peer.quantize(inputs)  # seconds: the quantization call alone, timed by the peer
    name = f"peer-{peer.name}"
    folder = dirs.variants_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(quantized, str(folder / "model.onnx"))
    precision = layer_precision(layers, quantized)
    res = validate.validate_variant(
        name, folder / "model.onnx", dirs.model_dir, dirs.data_dir, cp.validate_, dirs.validation_dir,
        lambda path, x, bs: onnx_backend.run_batched(onnx_backend.session(path), x, bs))
    m = res.metrics
    rec = _record(case, name, m, precision["int8_mac_fraction"], precision["float_layers"], res.passed,
                  case_budget(case), time.perf_counter() - t, {}, quantize_seconds=seconds)
    rec.update(tool=peer.call, float_attention=precision["float_attention"], eight_bit=eight_bit_dq(quantized))
    print(f"  {case.name:16s} {name:24s} top1 {_f(m.top1)} drop {_f(m.top1_drop, 2)} SQNR {m.sqnr_db:5.1f} dB  "
          f"int8 MACs {100 * precision['int8_mac_fraction']:5.1f}%  {'PASS' if res.passed else 'FAIL'} "
          f"({seconds:.0f}s)", flush=True)
    return rec


def run_peers(ws: Workspace, p: Params, cases: list[str], peers: list[Peer], recipes: list[str], out: Path) -> dict:
    """Every case: FP32, vitq's `recipes`, then every peer; writes `out` (JSON) and `out` with .md (the table)."""
    from vitq.tasks.benchmark import machine_info
    from vitq.tasks.recovery.layers import quantizable_layers
    from vitq.experiments import recovery_accuracy as ra
    from vitq.recipes import get_recipe

    unknown = [c for c in cases if c not in ra.CASES]
    if unknown or not cases:
        raise VitqError((f"unknown case {unknown[0]!r}" if unknown else "--cases names no case")
                        + f"; allowed: {', '.join(ra.CASES)}")
    for r in recipes:
        if get_recipe(r).target != "onnx":  # an unknown name is get_recipe's one-line error
            raise VitqError(f"--recipes {r!r} is not an ONNX recipe: peers are compared on ONNX Runtime")
    ra.ensure_pipeline_outputs(ws, p)
    result = {"machine": machine_info(), "versions": _versions(), "peers": {pe.name: pe.call for pe in peers},
              "records": []}
    for name in cases:
        case = ra.CASES[name]
        dirs, cp, fp32 = ra.prepare_case(ws, p, case)
        inputs, fp32_judging_metric = _peer_inputs(dirs, cp)
        fp32["judging_metric"] = fp32_judging_metric
        records = [fp32]
        for r in recipes:
            records.append({**ra.run_variant(dirs, cp, case, r), "tool": "vitq"})
        layers = quantizable_layers(dirs.export_dir / "model.onnx", dirs.export_dir / "model.prep.onnx")
        for peer in peers:
            log.info("peers: [%s] %s ...", name, peer.name)
            records.append(run_peer(dirs, cp, case, peer, inputs, layers))
        result["records"].extend(records)
        write_json(out, result)  # a partial table survives a later failure
    with atomic_file(out.with_suffix(".md")) as tmp:
        Path(tmp).write_text(peers_table(result) + "\n")
    return result


def peers_table(result: dict) -> str:
    """The markdown table: one row per (case, variant or peer)."""
    lines = ["| case | tool | variant | top-1 | top-1 drop (pts) | SQNR dB | INT8 MACs | quantize s | budget |",
             "|" + "---|" * 9]
    for r in result["records"]:
        sq = "inf" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        top1 = "n/a" if r["top1"] is None else f"{r['top1']:.4f}"
        drop = "n/a" if r["top1_drop"] is None else f"{r['top1_drop']:.2f}"
        secs = "-" if r.get("quantize_seconds") is None else f"{r['quantize_seconds']:.1f}"
        tool = "fp32" if r["variant"] == "fp32" else ("vitq" if r.get("tool") == "vitq" else r["tool"].split(".")[0])
        lines.append(f"| {r['case']} | {tool} | {r['variant']} | {top1} | {drop} | {sq} | "
                     f"{100 * r['int8_mac_fraction']:.1f}% | {secs} | {'pass' if r['passed'] else 'FAIL'} |")
    m = result["machine"]
    lines.append("")
    lines.append(f"machine: {m['cpu']} ({m['cores']} cores); versions: "
                 + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    return "\n".join(lines)
