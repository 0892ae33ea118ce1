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
NNCF is the optional extra `nncf` (`pip install -e '.[nncf]'`); ONNX Runtime's peer needs nothing extra.
"""

from __future__ import annotations

import importlib.util
import logging
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
    needs: str | None  # the import an optional extra provides (None: installed with vitq)
    quantize: Callable[[PeerInputs], onnx.ModelProto]


def _items(x: np.ndarray, input_name: str) -> list[dict[str, np.ndarray]]:
    return [{input_name: x[i : i + 1]} for i in range(len(x))]  # one image per step, (1, C, H, W)


def _input_name(model: onnx.ModelProto) -> str:
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def _ort(inp: PeerInputs) -> onnx.ModelProto:
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, items):
            self._items = iter(items)

        def get_next(self):
            return next(self._items, None)

    items = _items(inp.calibration, _input_name(onnx.load(str(inp.prep_onnx))))
    with tempfile.TemporaryDirectory(prefix="vitq-peer-ort-") as tmp:
        out = Path(tmp) / "model.onnx"
        quantize_static(str(inp.prep_onnx), str(out), Reader(items))  # every other argument: ORT's default
        return onnx.load(str(out))


def _nncf(inp: PeerInputs) -> onnx.ModelProto:
    import nncf

    model = onnx.load(str(inp.prep_onnx))
    dataset = nncf.Dataset(_items(inp.calibration, _input_name(model)))
    return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER)


def _nncf_ac(inp: PeerInputs) -> onnx.ModelProto:
    import nncf
    import onnxruntime as ort

    model = onnx.load(str(inp.prep_onnx))
    name = _input_name(model)

    def validation_fn(candidate: onnx.ModelProto, data) -> float:
        sess = ort.InferenceSession(candidate.SerializeToString(), providers=["CPUExecutionProvider"])
        return inp.metric(np.concatenate([sess.run(None, item)[0] for item in data]))

    return nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(_items(inp.calibration, name)), nncf.Dataset(_items(inp.judging, name)), validation_fn,
        max_drop=inp.max_drop, model_type=nncf.ModelType.TRANSFORMER)


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("ort", "onnxruntime.quantization.quantize_static (defaults)", None, _ort),
    Peer("nncf", "nncf.quantize(model_type=TRANSFORMER)", "nncf", _nncf),
    Peer("nncf-ac", "nncf.quantize_with_accuracy_control(max_drop=budget, model_type=TRANSFORMER)", "nncf", _nncf_ac),
)}


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
    return peers


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnxruntime", "onnx", "nncf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


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
    quantized = peer.quantize(inputs)
    seconds = time.perf_counter() - t
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
