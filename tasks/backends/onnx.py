"""ONNX backend: ONNX Runtime quantization (dynamic and static Q/DQ), sessions, graph inspection."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from vitq.recipes import OnnxDynamicConfig, OnnxStaticConfig, Recipe

log = logging.getLogger("vitq.onnx")

LINEAR_OP_TYPES = ("MatMul", "Gemm", "Conv")
_WEIGHT_INPUT = 1  # weight is input 1 of MatMul/Gemm/Conv
EIGHT_BIT = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}  # the integer types an INT8 graph quantizes to


def session(path: Path | bytes, threads: int = 0, optimize: bool = True, profile_prefix: str | None = None):
    """A CPU ONNX Runtime session on a file or a serialized model; `threads` fixes intra-op threads (0: ORT's
    default); `profile_prefix`: ORT's profiler on, its trace written at `<prefix>_<time>.json` by `end_profiling()`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def run_batched(sess, x: np.ndarray, batch_size: int) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose inputs are both activations: attention's q @ k^T and attn @ v."""
    consts = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not set(n.input[:2]) & consts]


def _indexed_copy(model: onnx.ModelProto):
    """A copy of `model` to rewrite, with its graph, initializers by name, producer of each tensor, consumers."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    return model, g, {i.name: i for i in g.initializer}, producers, consumers


def _set_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Give the rewritten graph `nodes`, drop initializers nothing reads, declare the com.microsoft opset."""
    g = model.graph
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    if any(n.domain == "com.microsoft" for n in nodes) and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def ort_serving_form(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The same quantized computation in the form ONNX Runtime's CPU kernels run fastest.

    Each `Q(x) -> DQ -> MatMul(., DQ(W)) [-> Add(bias)]` becomes `Q_u8(x) ->
    com.microsoft.MatMulIntegerToFloat(x_q, W_q, scales, zero points, bias)`. ORT's own QDQ
    fusion makes the same kernel but leaves the bias Add outside it (one extra pass over every
    linear output), and this CPU's int8 GEMM wants unsigned activations: s8 with zero point 0 and
    u8 with zero point 128 are the same integers shifted by 128, so results are identical. The
    TensorRT-ready Q/DQ file stays the variant's portable artifact; this copy is what ORT serves.
    Returns the rewritten model (a copy) and the number of MatMuls fused.
    """
    model, g, inits, producers, consumers = _indexed_copy(model)
    graph_outputs = {o.name for o in g.output}
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(MatMul) -> nodes emitted in its place
    dropped: set[int] = set()  # bias Adds folded into the fused kernel
    unsigned: dict[str, tuple[str, str, str]] = {}  # x -> (x_q_u8, scale, zero point)
    for mm in g.node:
        if mm.op_type != "MatMul":
            continue
        dq_a, dq_w = producers.get(mm.input[0]), producers.get(mm.input[1])
        if not (dq_a and dq_w and dq_a.op_type == dq_w.op_type == "DequantizeLinear") or dq_w.input[0] not in inits:
            continue
        q = producers.get(dq_a.input[0])
        if q is None or q.op_type != "QuantizeLinear" or inits.get(q.input[2]) is None:
            continue
        if inits[q.input[2]].data_type != onnx.TensorProto.INT8 or np.any(numpy_helper.to_array(inits[q.input[2]])):
            continue  # only symmetric int8 activations map exactly onto u8 with zero point 128
        emitted = []
        x = q.input[0]
        if x not in unsigned:
            zp = f"{x}_zero_point_u8"
            g.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zp))
            unsigned[x] = (f"{x}_quantized_u8", q.input[1], zp)
            emitted.append(onnx.helper.make_node("QuantizeLinear", [x, q.input[1], zp], [unsigned[x][0]], name=f"{x}_QuantizeLinear_u8"))
        x_q, x_scale, x_zp = unsigned[x]
        out, bias = mm.output[0], []
        users = consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Add" and out not in graph_outputs:
            other = [i for i in users[0].input if i != out]
            if len(other) == 1 and other[0] in inits and len(inits[other[0]].dims) == 1:
                bias, out = other, users[0].output[0]
                dropped.add(id(users[0]))
        emitted.append(onnx.helper.make_node(
            "MatMulIntegerToFloat", [x_q, dq_w.input[0], x_scale, dq_w.input[1], x_zp, dq_w.input[2], *bias], [out],
            name=f"{mm.name}_MatMulIntegerToFloat", domain="com.microsoft",
        ))
        replaced[id(mm)] = emitted
    nodes = []
    for n in g.node:
        if id(n) in dropped:
            continue
        nodes.extend(replaced.get(id(n), [n]))
    while True:  # drop Q/DQ nodes nothing reads any more
        used = {i for n in nodes for i in n.input} | graph_outputs
        dead = [n for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in used]
        if not dead:
            break
        nodes = [n for n in nodes if n not in dead]
    _set_nodes(model, nodes)
    return model, len(replaced)


def _attr(node: onnx.NodeProto, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Attention as ONNX Runtime's `com.microsoft.MultiHeadAttention` kernel: the exported core
    `qkv -> Reshape(B,S,3,N,H) -> 3x Slice/Transpose/Squeeze -> q*c, (k^T)*c -> MatMul -> Softmax -> MatMul(v)
    -> Transpose -> Reshape(B,S,D)` becomes `Split(qkv) -> MultiHeadAttention(q, k, v)`, which reads q, k, v in
    their (B, S, N*H) layout: no transposes, one fused scale/softmax/GEMM pass per head. Float ops only: the
    int8 projections around it are untouched. A block whose graph differs in any step is left as it is.
    Returns the rewritten model (a copy) and the number of attention blocks fused."""
    model, g, inits, producers, consumers = _indexed_copy(model)

    def const(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        p = producers.get(name)
        return numpy_helper.to_array(p.attribute[0].t) if p is not None and p.op_type == "Constant" else None

    def chain(name: str, *ops: str) -> list[onnx.NodeProto] | None:
        """The producers of `name`, walking input 0 upwards, if their op types are `ops` in that order."""
        nodes = []
        for op in ops:
            node = producers.get(name)
            if node is None or node.op_type != op:
                return None
            nodes.append(node)
            name = node.input[0]
        return nodes

    def head(name: str):
        """(qkv tensor, which of q/k/v, heads) of Squeeze(Slice(Transpose[2,0,3,1,4](Reshape(qkv)))), as exported,
        or with the Slice above the Transpose, as ORT's transpose optimizer leaves it (model.prep.onnx)."""
        for ops, slice_axis in ((("Squeeze", "Slice", "Transpose", "Reshape"), 0),
                                (("Squeeze", "Transpose", "Slice", "Reshape"), 2)):
            nodes = chain(name, *ops)
            if nodes is None:
                continue
            transpose, slice_ = (nodes[2], nodes[1]) if slice_axis == 0 else (nodes[1], nodes[2])
            if list(_attr(transpose, "perm") or []) != [2, 0, 3, 1, 4] or len(slice_.input) < 4:
                continue
            start, end, axis = (const(i) for i in slice_.input[1:4])
            shape = const(nodes[3].input[1])
            if start is None or end is None or axis is None or shape is None or len(shape) != 5 or shape[2] != 3:
                continue
            if int(axis[0]) != slice_axis or int(end[0]) - int(start[0]) != 1:
                continue
            return nodes[3].input[0], int(start[0]), int(shape[3])
        return None

    def only_user(name: str, op: str):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    replaced: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    for softmax in g.node:
        if softmax.op_type != "Softmax" or _attr(softmax, "axis") not in (None, -1, 3):
            continue
        scores, probs_v = producers.get(softmax.input[0]), only_user(softmax.output[0], "MatMul")
        if scores is None or scores.op_type != "MatMul" or probs_v is None or probs_v.input[0] != softmax.output[0]:
            continue
        transpose = only_user(probs_v.output[0], "Transpose")
        reshape = transpose and only_user(transpose.output[0], "Reshape")
        if reshape is None or list(_attr(transpose, "perm") or []) != [0, 2, 1, 3]:
            continue
        q_scale, k_scale = chain(scores.input[0], "Mul"), chain(scores.input[1], "Mul", "Reshape", "Transpose", "Reshape")
        if q_scale is None or k_scale is None or list(_attr(k_scale[2], "perm") or []) != [0, 2, 1]:
            continue
        cq, ck = const(q_scale[0].input[1]), const(k_scale[0].input[1])
        if cq is None or ck is None or cq.size != 1 or ck.size != 1:
            continue
        q, k, v = head(q_scale[0].input[0]), head(k_scale[3].input[0]), head(probs_v.input[1])
        if not (q and k and v) or len({q[0], k[0], v[0]}) != 1 or (q[1], k[1], v[1]) != (0, 1, 2):
            continue
        qkv, heads = q[0], q[2]
        parts = [f"{qkv}_{p}" for p in "qkv"]
        replaced[id(reshape)] = [
            onnx.helper.make_node("Split", [qkv], parts, axis=-1, num_outputs=3, name=f"{qkv}_Split_qkv"),
            onnx.helper.make_node(
                "MultiHeadAttention", parts, [reshape.output[0]], domain="com.microsoft", num_heads=heads,
                scale=float(cq.ravel()[0] * ck.ravel()[0]), name=f"{softmax.name}_MultiHeadAttention"),
        ]
        removed |= {id(n) for n in (softmax, scores, probs_v, transpose, q_scale[0], k_scale[0])}
    if not replaced:
        return model, 0
    nodes = []
    for n in g.node:
        if id(n) not in removed:
            nodes.extend(replaced.get(id(n), [n]))
    graph_outputs = {o.name for o in g.output}
    while True:  # drop the head split/transposes nothing reads any more
        used = {i for n in nodes for i in n.input} | graph_outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    _set_nodes(model, nodes)
    return model, len(replaced)


def assert_same_attention(reference: onnx.ModelProto, fused: onnx.ModelProto, batch: int = 2, rtol: float = 1e-4) -> None:
    """Guard for `fuse_attention`: the first fused attention output (same tensor name in both graphs, upstream
    of any rounding the fused kernel's float order can flip) is the same in both models, as ORT runs them."""
    first = next(n.output[0] for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    outs = []
    for model in (reference, fused):
        probe = onnx.ModelProto.FromString(model.SerializeToString())
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(first))
        sess = session(probe.SerializeToString())
        outs.append(sess.run([first], _random_feed(sess, batch))[0])
    err = float(np.max(np.abs(outs[0] - outs[1])))
    if err > rtol * max(float(np.max(np.abs(outs[0]))), 1e-6):
        raise RuntimeError(f"fused attention output {first!r} differs by {err:.3g} (max abs): rewrite is wrong")


def _random_feed(sess, batch: int) -> dict[str, np.ndarray]:
    """The same seeded standard-normal input for any session of one model (dynamic dims set to `batch`)."""
    inp = sess.get_inputs()[0]
    shape = [batch if not isinstance(d, int) else d for d in inp.shape]
    return {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def assert_same_outputs(reference: Path | bytes, candidate: Path | bytes, batch: int = 2, rtol: float = 1e-4) -> None:
    """Guard for graph rewrites: both models (files or serialized) give the same outputs on the same random input,
    as ONNX Runtime runs them (its optimised QDQ path uses the same integer kernels as the rewrite;
    an unoptimised float emulation of Q/DQ rounds differently and is not the reference)."""
    ref, cand = session(reference), session(candidate)
    a = ref.run(None, _random_feed(ref, batch))[0]
    b = cand.run(None, _random_feed(cand, batch))[0]
    err = float(np.max(np.abs(a - b)))
    if err > rtol * max(float(np.max(np.abs(a))), 1e-6):
        raise RuntimeError(f"the served form differs from the Q/DQ graph by {err:.3g} (max abs): rewrite is wrong")


def quantize(recipe: OnnxDynamicConfig | OnnxStaticConfig, prep_onnx: Path, out_path: Path, table: Path | None,
             exclude_nodes=()) -> None:
    """Produce the recipe's quantized ONNX at `out_path` from the quantization-ready FP32 model;
    `exclude_nodes` stay float (mixed precision, the recipe's float_layers)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    # Pass a ModelProto, not the path: ORT writes `<path>-inferred.onnx` beside a path it is
    # given, which collides when several variants are quantized from one file concurrently.
    # No stdout redirection here: variants are quantized in concurrent threads, and
    # contextlib.redirect_stdout swaps the process-wide sys.stdout.
    model = onnx.load(str(prep_onnx))
    if recipe.scheme == "dynamic":
        quantize_dynamic(
            model, str(out_path), weight_type=QuantType.QInt8, per_channel=recipe.per_channel,
            op_types_to_quantize=list(recipe.op_types), nodes_to_exclude=list(exclude_nodes),
        )
        return
    exclude = ([] if recipe.quantize_attention else activation_matmuls(model)) + list(exclude_nodes)
    tensors = load_tensors_data(table)
    _check_ranges(model, recipe.op_types, set(exclude), set(tensors.data), Path(table))
    quantize_static(
        model,
        str(out_path),
        calibration_data_reader=None,
        calibration_cache_path=str(table),  # ranges from the calibration stage; no recalibration
        calibrate_method=tensors.calibration_method,  # must match the table's
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=recipe.per_channel,
        op_types_to_quantize=list(recipe.op_types),
        nodes_to_exclude=exclude,
        extra_options={
            "ActivationSymmetric": True,  # zero point 0: TensorRT's INT8 is symmetric
            "WeightSymmetric": True,
            # Q/DQ only where the placement says (inputs and weights). A Q/DQ on every MatMul/Gemm
            # output forces ONNX Runtime to requantize each result and blocks its DQ -> MatMul ->
            # MatMulIntegerToFloat fusion (vit_base b1, this CPU: 44 ms with vs 37 ms without).
            "OpTypesToExcludeOutputQuantization": list(recipe.op_types),
        },
    )


def _check_ranges(model: onnx.ModelProto, op_types, exclude: set[str], ranged: set[str], table: Path) -> None:
    """Every activation the quantizer will put a Q/DQ on (the inputs of the `op_types` nodes not in `exclude`)
    has a range in the table: ORT's quantize_static leaves a tensor without one in float, with only an info log."""
    from vitq.errors import VitqError

    consts = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:
        if node.op_type in op_types and node.name not in exclude:
            missing = [t for t in node.input[:2] if t and t not in consts and t not in ranged]
            if missing:
                raise VitqError(
                    f"calibration table {table} has no range for {missing[0]!r}, an input of {node.name!r}: it was "
                    "calibrated for another graph or without the attention MatMuls' inputs (calibration measures "
                    "them only when a recipe sets quantize_attention); rerun the calibrate stage")


def linear_weight_elements(model: onnx.ModelProto) -> int:
    """Elements of the float weights feeding MatMul/Gemm/Conv (constant input 1)."""
    inits = {i.name: i for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in LINEAR_OP_TYPES and len(node.input) > _WEIGHT_INPUT and node.input[_WEIGHT_INPUT] in inits:
            total += int(np.prod(inits[node.input[_WEIGHT_INPUT]].dims))
    return total


def int8_weight_elements(model: onnx.ModelProto) -> int:
    """Elements of 8-bit weight tensors (rank >= 2; int32 biases and scalar zero points excluded)."""
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in EIGHT_BIT and len(i.dims) >= 2)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))



def write_serving_form(recipe: Recipe, folder: Path, quantized: onnx.ModelProto) -> str:
    """A quantized variant is served in ONNX Runtime's fused form (`model.ort.onnx`, checked against the Q/DQ
    `model.onnx`): static variants with MatMulIntegerToFloat kernels, and every variant with attention as one
    MultiHeadAttention kernel where the graph's attention is recognised. Returns the served file's name."""
    serving, fused = ort_serving_form(quantized) if recipe.scheme == "static" else (quantized, 0)
    if fused:  # exact: same integer kernels; checked before attention fusion reorders float sums downstream
        assert_same_outputs(folder / "model.onnx", serving.SerializeToString())
    serving, heads = fuse_attention(serving)
    if heads:
        assert_same_attention(quantized, serving)
    if not fused and not heads:
        return "model.onnx"
    onnx.save(serving, str(folder / "model.ort.onnx"))
    log.info("quantize: %s: %d MatMuls in ONNX Runtime's fused form, %d attention blocks as MultiHeadAttention",
             recipe.name, fused, heads)
    return "model.ort.onnx"
