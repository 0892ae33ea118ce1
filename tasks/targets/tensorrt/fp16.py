"""FP16 graphs for TensorRT's strongly typed networks (TensorRT 11 removed the FP16/INT8 builder flags).

A strongly typed network runs every layer in the precision its ONNX tensors have. So the float part of a
graph is written in FP16 here, with the ops NVIDIA keeps in FP32 for transformers left in FP32 (the same
op block list ModelOpt's AutoCast applies): LayerNormalization, Softmax, the reductions, and every op of
a LayerNorm written out as ReduceMean/Sub/Pow/Sqrt/Div. Q/DQ nodes keep their INT8 side; their scales
take the type of the float side they touch (FP16 next to an FP16 op), as QuantizeLinear/DequantizeLinear
(opset >= 19) need. The FP16 baseline engine is the same conversion of the FP32 graph (no Q/DQ).

The conversion is onnxconverter-common's (`float16.convert_float_to_float16` with an op and a node block
list); what is done here is only what it does not: the decomposed-LayerNorm match, INT32 bias
dequantizations folded to constants (their scales, activation scale x weight scale ~1e-5, are FP16
subnormals), float constants shared across the FP32/FP16 boundary split, and the check of the result.
Pure ONNX: runs on every machine, with or without TensorRT.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger("vitq.tensorrt")

# Op types kept in FP32: normalisation, softmax and reductions (their sums of squares and exponentials
# overflow or lose the small terms in FP16).
FP32_OP_TYPES = frozenset(
    {"LayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2",
     "ReduceMax", "ReduceLogSumExp", "Pow", "Sqrt"}
)
FP16_MAX = 65504.0  # largest finite float16
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
MIN_QDQ_FP16_OPSET = 19  # QuantizeLinear / DequantizeLinear take float16 scales from opset 19
MIXED = -1  # node_precisions: a node whose float tensors are of different types


@dataclass(frozen=True)
class Fp16Graph:
    """What `write_fp16_graph` wrote (recorded beside the graph, in the variant folder)."""

    graph: str  # file name
    source: str  # the graph it was converted from
    fp32_nodes: list[str] = field(default_factory=list)  # nodes left in FP32 (names)
    fp16_nodes: int = 0  # float nodes in FP16
    folded_bias_dequantize: int = 0  # INT32 bias DequantizeLinear nodes folded into float constants
    opset: int = 0


def _step(node: onnx.NodeProto, t: str) -> str:
    """The op `node` applies to its input `t`: Div(c, t) is a reciprocal up to the factor c."""
    if node.op_type == "Div" and list(node.input[1:]) == [t] and node.input[0] != t:
        return "Reciprocal"
    return node.op_type


def decomposed_layernorm_nodes(model: onnx.ModelProto) -> list[list[str]]:
    """Node names of each LayerNorm written out as ops, one list per LayerNorm:
    `d = Sub(x, ReduceMean(x)); y = Div(d, Sqrt(Add(ReduceMean(Pow(d, 2) | Mul(d, d)), eps)))`, the Add/Sqrt in
    either order and `Div(d, s)` also as `Mul(d, Reciprocal(s))`."""
    g = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = []
    for mean in (n for n in g.node if n.op_type == "ReduceMean"):
        x = mean.input[0]
        for sub in consumers.get(mean.output[0], []):
            if sub.op_type != "Sub" or list(sub.input) != [x, mean.output[0]]:
                continue
            d = sub.output[0]
            for sq in consumers.get(d, []):
                if not ((sq.op_type == "Pow" and sq.input[0] == d) or (sq.op_type == "Mul" and list(sq.input) == [d, d])):
                    continue
                for var in consumers.get(sq.output[0], []):
                    if var.op_type != "ReduceMean":
                        continue
                    # Add(eps), Sqrt and a reciprocal (Reciprocal, or Div(1, .)) in some order, then Div(d, .) or
                    # Mul(d, reciprocal)
                    paths = [([], [], var.output[0])]  # (nodes, the op each applies, tensor reached)
                    while paths:
                        chain, ops, t = paths.pop()
                        for c in consumers.get(t, []):
                            if "Sqrt" in ops and ((c.op_type == "Div" and "Reciprocal" not in ops and list(c.input) == [d, t])
                                                  or (c.op_type == "Mul" and ops[-1] == "Reciprocal" and set(c.input) == {d, t})):
                                found.append([n.name for n in (mean, sub, sq, var, *chain, c)])
                                continue
                            step = _step(c, t)
                            if step in ("Add", "Sqrt", "Reciprocal") and step not in ops:
                                paths.append(([*chain, c], [*ops, step], c.output[0]))
    return found


def fp32_node_names(model: onnx.ModelProto) -> set[str]:
    """Nodes the FP16 graph keeps in FP32: FP32_OP_TYPES, decomposed LayerNorms, and nodes reading a float
    constant beyond FP16's range (as AutoCast's init_max)."""
    inits = {i.name: i for i in model.graph.initializer}
    names = {n.name for n in model.graph.node if n.op_type in FP32_OP_TYPES}
    names.update(name for group in decomposed_layernorm_nodes(model) for name in group)
    for n in model.graph.node:
        for i in n.input:
            t = inits.get(i)
            if t is not None and t.data_type == TensorProto.FLOAT:
                a = numpy_helper.to_array(t)
                if float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0)) > FP16_MAX:
                    names.add(n.name)
    return names


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (the block list and the check name nodes)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        name, k = n.name or f"{n.op_type}_{i}", 0
        while name in seen:
            k += 1
            name = f"{n.name or n.op_type}_{i}_{k}"
        n.name = name
        seen.add(name)


def _fold_bias_dequantize(model: onnx.ModelProto) -> int:
    """Replace each DequantizeLinear of a constant INT32 tensor (a quantized bias) by the float constant it
    computes (in FP32); returns how many were folded."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    folded, keep = 0, []
    for n in g.node:
        src = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if src is None or src.data_type != TensorProto.INT32 or not all(i in inits for i in n.input[1:]):
            keep.append(n)
            continue
        q = numpy_helper.to_array(src).astype(np.int64)
        scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        zero = numpy_helper.to_array(inits[n.input[2]]).astype(np.int64) if len(n.input) > 2 and n.input[2] else 0
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and q.ndim > 1:  # per-axis: broadcast the scale along `axis`
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
        g.initializer.append(numpy_helper.from_array(((q - zero) * scale).astype(np.float32), n.output[0]))
        folded += 1
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    kept = [i for i in g.initializer if i.name in used or i.name in {o.name for o in g.output}]
    del g.initializer[:]
    g.initializer.extend(kept)
    return folded


def _split_shared_constants(model: onnx.ModelProto, fp32_names: set[str]) -> None:
    """A float constant read by FP32 and by FP16 nodes gets an FP32 copy for the FP32 ones (the converter
    leaves a constant any blocked node reads in FP32, which the FP16 readers could not take)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer if i.data_type == TensorProto.FLOAT}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            if i in inits:
                readers.setdefault(i, []).append(n)
    for name, nodes in readers.items():
        blocked = [n for n in nodes if n.name in fp32_names]
        if blocked and len(blocked) < len(nodes):
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = f"{name}_fp32"
            g.initializer.append(copy)
            for n in blocked:
                for k, i in enumerate(n.input):
                    if i == name:
                        n.input[k] = copy.name


def _restore_fp32_outputs(model: onnx.ModelProto) -> None:
    """Graph outputs an FP32 node produces: the converter casts them to FP16 (it types a blocked node's
    output as FP16 before it looks at the graph outputs); drop that Cast and keep the output FP32."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    for out in g.output:
        cast = producers.get(out.name)
        if out.type.tensor_type.elem_type != TensorProto.FLOAT16 or cast is None or cast.op_type != "Cast":
            continue
        src = producers.get(cast.input[0])
        if src is None or sum(cast.input[0] in n.input for n in g.node) != 1:
            continue
        src.output[list(src.output).index(cast.input[0])] = out.name
        g.node.remove(cast)
        out.type.tensor_type.elem_type = TensorProto.FLOAT


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def to_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str], int]:
    """(FP16 graph, names of the nodes kept in FP32, INT32 bias DQs folded) of an FP32 graph, Q/DQ or not;
    inputs and outputs stay FP32. Raises RuntimeError naming the node when the result fails the check."""
    from onnxconverter_common import float16

    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    model = model_copy
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    if has_qdq and _opset(model) < MIN_QDQ_FP16_OPSET:
        from onnx import version_converter

        model = version_converter.convert_version(model, MIN_QDQ_FP16_OPSET)
    _name_nodes(model)
    folded = _fold_bias_dequantize(model)
    fp32_names = fp32_node_names(model)
    _split_shared_constants(model, fp32_names)
    with warnings.catch_warnings():
        # It warns of each constant clamped to FP16's range; those past it are read by FP32 nodes only.
        warnings.simplefilter("ignore", UserWarning)
        out = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=sorted(FP32_OP_TYPES), node_block_list=sorted(fp32_names),
            max_finite_val=FP16_MAX,
        )
    _restore_fp32_outputs(out)
    _retarget_float_casts(out, fp32_names)
    _float_resize_scales(out)
    problems = placement_violations(out, fp32_names)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RuntimeError(f"the FP16 graph is not typed as intended: {problems[0]}{more}")
    return out, fp32_names, folded


def _retarget_float_casts(model: onnx.ModelProto, fp32_names: set[str]) -> None:
    """A Cast to FLOAT whose output the converter typed FLOAT16 (a shape turned into a number: the TorchScript
    exporter's attention scale, `Shape -> Gather -> Cast(to=FLOAT) -> Sqrt`) casts to FLOAT16 instead, and a
    ConstantOfShape so typed (torchvision Swin's attention mask: no fill given, a FLOAT 0) fills with a FLOAT16 value; the
    converter keeps their attributes and the graph fails its type check otherwise. Changes `model` in place."""
    typed = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for n in model.graph.node:
        if n.name in fp32_names or typed.get(n.output[0] if n.output else "") != TensorProto.FLOAT16:
            continue
        to = next((a for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
        if to is not None and to.i == TensorProto.FLOAT:
            to.i = TensorProto.FLOAT16
        if n.op_type == "ConstantOfShape":  # its fill value sets its output type; none is a FLOAT 0
            value = next((a for a in n.attribute if a.name == "value"), None)
            if value is None:
                n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
            elif value.t.data_type == TensorProto.FLOAT:
                value.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(value.t).astype(np.float16)))


def _float_resize_scales(model: onnx.ModelProto) -> None:
    """Resize's `roi` and `scales` are FLOAT whatever the data's type (the ONNX spec); the converter turned constant
    ones into FLOAT16 (EfficientFormerV2's upsampling failed the type check): back to FLOAT. In place."""
    inits = {i.name: i for i in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for n in model.graph.node:
        if n.op_type != "Resize":
            continue
        for name in n.input[1:3]:
            t = inits.get(name) if name else None
            if t is None and name in constants:
                t = next((a.t for a in constants[name].attribute if a.name == "value"), None)
            if t is not None and t.data_type == TensorProto.FLOAT16:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
                for v in model.graph.value_info:  # the converter typed it FLOAT16 there too
                    if v.name == name:
                        v.type.tensor_type.elem_type = TensorProto.FLOAT


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of `model` (ONNX type inference, strict: a type clash raises)."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:  # Constant nodes' outputs
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def node_precisions(model: onnx.ModelProto) -> dict[str, int | None]:
    """Node name -> the float type it computes in: TensorProto.FLOAT / FLOAT16 when all its float inputs and
    outputs have it, MIXED when they differ, None without float tensors; Casts (the boundaries) are skipped."""
    types = tensor_types(model)
    # Resize's roi and scales are FLOAT by the spec whatever the data's type: parameters, not what it computes in.
    params = {t for n in model.graph.node if n.op_type == "Resize" for t in n.input[1:3] if t}
    out: dict[str, int | None] = {}
    for n in model.graph.node:
        if n.op_type == "Cast":
            continue
        ins = [t for i, t in enumerate(n.input) if not (n.op_type == "Resize" and i in (1, 2))]
        outs = [t for t in n.output if t not in params]  # a Constant making them computes nothing
        floats = {types.get(t) for t in (*ins, *outs) if t and types.get(t) in FLOAT_TYPES}
        out[n.name] = floats.pop() if len(floats) == 1 else (MIXED if floats else None)
    return out


def placement_violations(model: onnx.ModelProto, fp32_names: set[str]) -> list[str]:
    """Where the FP16 graph is not as intended: a node in `fp32_names` not computing in FP32, any other float
    node not in FP16, mixed float inputs, a Q/DQ scale of another type than the float side it touches,
    graph inputs/outputs not FP32. Empty when it is right."""
    try:
        types = tensor_types(model)
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return [f"ONNX type check failed: {str(exc).splitlines()[0]}"]
    problems = []
    for v in (*model.graph.input, *model.graph.output):
        if v.type.tensor_type.elem_type in FLOAT_TYPES and v.type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append(f"graph input/output {v.name!r} is not FP32")
    for name, t in node_precisions(model).items():
        if t is None:
            continue
        want = TensorProto.FLOAT if name in fp32_names else TensorProto.FLOAT16
        if t != want:
            got = "mixed float types" if t == MIXED else TensorProto.DataType.Name(t)
            problems.append(f"node {name!r} computes in {got}, wanted {TensorProto.DataType.Name(want)}")
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and types.get(n.input[1]) != types.get(n.input[0]):
            problems.append(f"QuantizeLinear {n.name!r}: scale type differs from its input's")
        if n.op_type == "DequantizeLinear" and types.get(n.input[1]) != types.get(n.output[0]):
            problems.append(f"DequantizeLinear {n.name!r}: scale type differs from its output's")
    return problems


def fp16_emulation(model: onnx.ModelProto) -> onnx.ModelProto:
    """The FP16 graph `model` rewritten for checking its numerics in ONNX Runtime on a CPU: FP32 arithmetic with
    FP16 storage, every tensor the graph holds in FP16 rounded to FP16 (Cast to FLOAT16 and back) where it is
    made. ONNX Runtime's CPU provider runs most FP16 ops by casting to FP32 and drops the casts around them, so
    the FP16 graph run there directly skips FP16's rounding and overflow. One rounding per op is what an FP16
    kernel gives (add, mul, div, sqrt are exact to FP16 that way; matmuls accumulate in FP32 as TensorRT's do)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    types = tensor_types(m)
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes = []
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        to = next((a for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
        if to is not None and to.i == TensorProto.FLOAT and types.get(n.input[0]) == TensorProto.FLOAT16:
            nodes.append(onnx.helper.make_node("Identity", list(n.input), list(n.output), name=n.name))
            continue
        if to is not None and to.i == TensorProto.FLOAT16:
            to.i = TensorProto.FLOAT  # rounded below, as every FP16 output
        rounded = [o for o in n.output if types.get(o) == TensorProto.FLOAT16]
        for k, o in enumerate(n.output):
            if o in rounded:
                n.output[k] = f"{o}__fp32"
        nodes.append(n)
        for o in rounded:
            nodes.append(onnx.helper.make_node("Cast", [f"{o}__fp32"], [f"{o}__fp16"], to=TensorProto.FLOAT16,
                                               name=f"{o}__round"))
            nodes.append(onnx.helper.make_node("Cast", [f"{o}__fp16"], [o], to=TensorProto.FLOAT, name=f"{o}__widen"))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # retyped: ONNX Runtime infers them again
    return m


def write_fp16_graph(src: Path, dst: Path) -> Fp16Graph:
    """Convert the graph at `src` (FP32, Q/DQ or not) to the FP16 graph at `dst` (to_fp16) and return its record."""
    model = onnx.load(str(src))
    out, fp32_names, folded = to_fp16(model)
    onnx.save(out, str(dst))
    precisions = node_precisions(out)
    record = Fp16Graph(
        graph=Path(dst).name,
        source=Path(src).name,
        fp32_nodes=sorted(fp32_names),
        fp16_nodes=sum(1 for t in precisions.values() if t == TensorProto.FLOAT16),
        folded_bias_dequantize=folded,
        opset=_opset(out),
    )
    log.info("tensorrt: %s -> %s: %d float node(s) in FP16, %d in FP32, %d INT32 bias DQ folded",
             record.source, record.graph, record.fp16_nodes, len(record.fp32_nodes), folded)
    return record
