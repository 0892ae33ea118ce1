"""ONNX backend: ONNX Runtime quantization (dynamic and static Q/DQ), sessions, graph inspection."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from vitq.tasks import parallel
from vitq.recipes import OnnxDynamicConfig, OnnxStaticConfig, Recipe

log = logging.getLogger("vitq.onnx")

LINEAR_OP_TYPES = ("MatMul", "Gemm", "Conv")
# Where each GEMM-like op (standard, ORT's contrib and fused forms) takes its weight.
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "FusedMatMul": 1, "FusedGemm": 1, "MatMulInteger": 1,
                "MatMulIntegerToFloat": 1, "DynamicQuantizeMatMul": 1, "MatMulNBits": 1, "QGemm": 3,
                "QLinearMatMul": 3, "Conv": 1, "FusedConv": 1, "NhwcFusedConv": 1, "ConvInteger": 1, "QLinearConv": 3}
EIGHT_BIT = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}  # the integer types an INT8 graph quantizes to


def session(path: Path | bytes, threads: int = 0, optimize: bool = True, profile_prefix: str | None = None,
            optimized_path: Path | None = None):
    """A CPU ONNX Runtime session on a file or a serialized model; `threads` fixes intra-op threads (0: the variant
    phase's share of the cores, tasks/parallel.py; outside it ORT's default); `profile_prefix`: ORT's profiler on, its trace written at `<prefix>_<time>.json` by `end_profiling()`;
    `optimized_path`: the graph ORT runs (after its fusions; the profile's node names) saved there."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    opts.intra_op_num_threads = threads or parallel.session_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def run_batched(sess, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The first (for vitq's graphs of one output: the only) output on `x` (N, C, H, W), run in batches."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def run_outputs(sess, x: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every output of the graph by name, one batch of `x` (N, C, H, W) at a time: what one batch of all outputs
    needs is all that is held."""
    name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    for i in range(0, len(x), batch_size):
        yield dict(zip(names, sess.run(names, {name: x[i : i + batch_size]})))


def constant_names(model: onnx.ModelProto) -> set[str]:
    """The tensors whose values the graph fixes: initializers and Constant nodes' outputs."""
    return {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose inputs are both activations: attention's q @ k^T and attn @ v."""
    consts = constant_names(model)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not set(n.input[:2]) & consts]


# Ops whose output depends only on their input's shape, not its values.
_SHAPE_OPS = ("Shape", "Size")
_RANDOM_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")


def input_independent(model: onnx.ModelProto) -> set[str]:
    """The tensors whose values do not depend on the values of the graph's inputs: constants, the shapes of
    tensors (Shape/Size), and what nodes compute from those alone (e.g. ConViT's relative-position table, a
    buffer that `Expand` repeats to the batch size). Nodes with subgraphs and random ops count as dependent."""
    known = constant_names(model)
    for n in model.graph.node:  # topological order (an ONNX graph's)
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute) \
                or n.op_type in _RANDOM_OPS:
            continue
        if n.op_type in _SHAPE_OPS or all(not i or i in known for i in n.input):
            known.update(o for o in n.output if o)
    return known


def constant_input_linears(model: onnx.ModelProto, op_types=LINEAR_OP_TYPES) -> list[str]:
    """The `op_types` nodes (MatMul/Gemm/Conv) whose inputs are all input-independent (`input_independent`): they
    compute the same values for every image, so they stay float. Quantizing them saves nothing an export's constant
    folding would not, and their activation is often a packed table a per-tensor int8 scale cannot hold: timm
    `convit_tiny`'s gated positional attention projects the (dx, dy, dx^2 + dy^2) table, whose one range (338)
    leaves dx and dy (|.| <= 13) five int8 levels, and the local-attention softmax over those scores put the
    gated attention (random weights, seed 0) at 3.5 dB SQNR vs FP32 in the first block (80.8 dB with it float);
    with attention's products float, the model's output went from 23.7 to 31.0 dB with this rule."""
    fixed = input_independent(model)
    return [n.name for n in model.graph.node
            if n.op_type in op_types and all(not i or i in fixed for i in n.input)]


def weight_gemms(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that multiply an activation by a constant weight (the linear layers, the patch
    embedding's convolution or GEMM, the head), in any of WEIGHT_INPUT's forms; not attention's q @ k^T or probs @ v."""
    consts = constant_names(model)
    return {n.name for n in model.graph.node
            if n.op_type in WEIGHT_INPUT and len(n.input) > WEIGHT_INPUT[n.op_type]
            and n.input[WEIGHT_INPUT[n.op_type]] in consts}


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


def _symmetric_int8_input(node: onnx.NodeProto, inits, producers):
    """(the activation's QuantizeLinear, the weight's DequantizeLinear) when `node` reads DQ(Q(x)) with a symmetric
    int8 range (zero point 0) and a constant DQ'd weight; else None."""
    dq_a, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
    if not (dq_a and dq_w and dq_a.op_type == dq_w.op_type == "DequantizeLinear") or dq_w.input[0] not in inits:
        return None
    q = producers.get(dq_a.input[0])
    if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or inits.get(q.input[2]) is None:
        return None
    if inits[q.input[2]].data_type != onnx.TensorProto.INT8 or np.any(numpy_helper.to_array(inits[q.input[2]])):
        return None  # only symmetric int8 activations map exactly onto u8 with zero point 128
    return q, dq_w


def _unsigned(g, unsigned: dict, q: onnx.NodeProto, emitted: list) -> tuple[str, str, str]:
    """(x_u8, scale, zero point 128): the u8 form of symmetric int8 Q(x), the same integers shifted by 128 (what
    this CPU's int8 GEMM reads); its QuantizeLinear is appended to `emitted` the first time x is seen."""
    x = q.input[0]
    if x not in unsigned:
        zp = f"{x}_zero_point_u8"
        g.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zp))
        unsigned[x] = (f"{x}_quantized_u8", q.input[1], zp)
        emitted.append(onnx.helper.make_node("QuantizeLinear", [x, q.input[1], zp], [unsigned[x][0]], name=f"{x}_QuantizeLinear_u8"))
    return unsigned[x]


def _splice(g, replaced: dict[int, list[onnx.NodeProto]], dropped: set[int]) -> list[onnx.NodeProto]:
    """The graph's nodes in order, each `replaced` one (by id) swapped for its new nodes, the `dropped` ones left out."""
    nodes = []
    for n in g.node:
        if id(n) not in dropped:
            nodes.extend(replaced.get(id(n), [n]))
    return nodes


def _drop_dead_qdq(nodes: list[onnx.NodeProto], graph_outputs: set[str]) -> list[onnx.NodeProto]:
    while True:  # drop Q/DQ nodes nothing reads any more
        used = {i for n in nodes for i in n.input} | graph_outputs
        dead = [n for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in used]
        if not dead:
            return nodes
        nodes = [n for n in nodes if n not in dead]


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
        operands = _symmetric_int8_input(mm, inits, producers) if mm.op_type == "MatMul" else None
        if operands is None:
            continue
        emitted: list[onnx.NodeProto] = []
        x_q, x_scale, x_zp = _unsigned(g, unsigned, operands[0], emitted)
        dq_w = operands[1]
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
    _set_nodes(model, _drop_dead_qdq(_splice(g, replaced, dropped), graph_outputs))
    return model, len(replaced)


def int8_patch_embedding(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A quantized patch embedding on the int8 GEMM: `Q(x) -> DQ -> Conv(DQ(W)) -> Reshape(B, D, P) ->
    Transpose(0, 2, 1)` with kernel == stride and no padding, which ORT runs as a float Conv on the dequantized
    values (it has no fusion for a Conv without a quantized output), becomes `Q_u8(x) -> Reshape/Transpose (the
    patches, in int8) -> MatMulIntegerToFloat(W as (C*kh*kw, D), bias)`: the same integer products, accumulated
    exactly; the tokens differ from the float Conv's only in float rounding.
    Returns the rewritten model (a copy) and the token tensors it now computes (for `assert_same_at`)."""
    model, g, inits, producers, consumers = _indexed_copy(model)
    graph_outputs = {o.name for o in g.output}
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    unsigned: dict[str, tuple[str, str, str]] = {}
    outputs = []
    for conv in g.node:
        operands = _symmetric_int8_input(conv, inits, producers) if conv.op_type == "Conv" else None
        patch = operands and _patch_embedding(conv, inits, producers, consumers, shapes, graph_outputs)
        if not patch:
            continue
        emitted: list[onnx.NodeProto] = []
        x_q, x_scale, x_zp = _unsigned(g, unsigned, operands[0], emitted)
        (reshape, transpose, weight, bias, (c, h, kh, w, kw)), dq_w, name = patch, operands[1], conv.name
        g.initializer.extend([
            numpy_helper.from_array(np.array([-1, c, h, kh, w, kw], np.int64), f"{name}_patch_grid"),
            numpy_helper.from_array(np.array([-1, h * w, c * kh * kw], np.int64), f"{name}_patch_rows"),
            numpy_helper.from_array(np.ascontiguousarray(weight.reshape(weight.shape[0], -1).T), f"{name}_weight_columns"),
            numpy_helper.from_array(bias, f"{name}_bias_float"),
        ])
        emitted += [
            onnx.helper.make_node("Reshape", [x_q, f"{name}_patch_grid"], [f"{name}_patch_grid_u8"], name=f"{name}_patch_Reshape"),
            onnx.helper.make_node("Transpose", [f"{name}_patch_grid_u8"], [f"{name}_patches_u8"], perm=[0, 2, 4, 1, 3, 5],
                                  name=f"{name}_patch_Transpose"),
            onnx.helper.make_node("Reshape", [f"{name}_patches_u8", f"{name}_patch_rows"], [f"{name}_patch_rows_u8"],
                                  name=f"{name}_patch_rows_Reshape"),
            onnx.helper.make_node(
                "MatMulIntegerToFloat", [f"{name}_patch_rows_u8", f"{name}_weight_columns", x_scale, dq_w.input[1], x_zp,
                                         dq_w.input[2], f"{name}_bias_float"], [transpose.output[0]],
                name=f"{name}_MatMulIntegerToFloat", domain="com.microsoft"),
        ]
        replaced[id(transpose)] = emitted
        dropped |= {id(conv), id(reshape)}
        outputs.append(transpose.output[0])
    if not outputs:
        return model, []
    _set_nodes(model, _drop_dead_qdq(_splice(g, replaced, dropped), graph_outputs))
    return model, outputs


def _patch_embedding(conv, inits, producers, consumers, shapes, graph_outputs):
    """(Reshape, Transpose, int8 weight (D, C, kh, kw), float bias (D,), (C, H/kh, kh, W/kw, kw)) when `conv`
    patchifies a graph input: kernel == stride, no padding, dilation 1, one group, its output flattened to
    tokens by Reshape(B, D, P) -> Transpose(0, 2, 1) and read by nothing else; else None."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    kernel = list(attrs.get("kernel_shape", []))
    if len(kernel) != 2 or list(attrs.get("strides", [])) != kernel or any(attrs.get("pads", [0] * 4)) \
            or any(d != 1 for d in attrs.get("dilations", [1, 1])) or attrs.get("group", 1) != 1 \
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    dq_x, dq_w = producers.get(conv.input[0]), producers.get(conv.input[1])
    q = dq_x and producers.get(dq_x.input[0])
    shape = shapes.get(q.input[0]) if q else None
    if not shape or len(shape) != 4 or min(shape[1:]) < 1 or shape[2] % kernel[0] or shape[3] % kernel[1]:
        return None
    users = consumers.get(conv.output[0], [])
    reshape = users[0] if len(users) == 1 and users[0].op_type == "Reshape" and conv.output[0] not in graph_outputs else None
    after = consumers.get(reshape.output[0], []) if reshape else []
    transpose = after[0] if len(after) == 1 and after[0].op_type == "Transpose" else None
    target = numpy_helper.to_array(inits[reshape.input[1]]) if reshape and reshape.input[1] in inits else None
    if transpose is None or _attr(transpose, "perm") != [0, 2, 1] or target is None or len(target) != 3:
        return None
    (c, h, w), (kh, kw) = shape[1:], kernel
    if dq_w is None or dq_w.input[0] not in inits:
        return None
    weight = numpy_helper.to_array(inits[dq_w.input[0]])
    if weight.ndim != 4 or weight.shape[1:] != (c, kh, kw) or list(target[1:]) != [weight.shape[0], (h // kh) * (w // kw)]:
        return None
    if len(conv.input) < 3 or not conv.input[2]:
        bias = np.zeros(weight.shape[0], np.float32)
    elif conv.input[2] in inits:
        bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float32)
    else:  # int32 bias behind a DequantizeLinear (the static quantizer's), as the Q/DQ graph computes it
        dq_b = producers.get(conv.input[2])
        if dq_b is None or dq_b.op_type != "DequantizeLinear" or any(i not in inits for i in dq_b.input[:3]):
            return None
        q_b, scale, zp = (numpy_helper.to_array(inits[i]) for i in dq_b.input[:3])
        bias = ((q_b.astype(np.int64) - zp.astype(np.int64)).astype(np.float32) * scale.astype(np.float32)).astype(np.float32)
    if bias.shape != (weight.shape[0],):
        return None
    return reshape, transpose, weight, bias, (c, h // kh, kh, w // kw, kw)


def _attr(node: onnx.NodeProto, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Attention as ONNX Runtime's fastest CPU kernels. The exported core `qkv -> Reshape(B,S,3,N,H) -> 3x
    Slice/Transpose/Squeeze -> q*c, (k^T)*c -> MatMul -> Softmax -> MatMul(v) -> Transpose -> Reshape(B,S,D)`
    becomes, in float, `Split(qkv) -> com.microsoft.MultiHeadAttention(q, k, v)` (q, k, v read in their (B, S, N*H)
    layout: no transposes, one fused scale/softmax/GEMM pass per head).
    Where the graph quantizes attention's products (Q/DQ on q*c, k^T*c, the softmax output and v: a recipe with
    `quantize_attention`), both products run on int8 kernels with those ranges: q, k, v from one int8 GEMM each
    (the exported q/k scale folded into its scales), q@k^T as MatMulIntegerToFloat
    (u8 x s8) into the float Softmax, and probs@v as QLinearMatMul (u8 x s8), which writes the u8 input of the
    output projection directly when the graph quantizes it next (the serving form does), skipping a float pass.
    The same integers as the Q/DQ graph (u8 = s8 + 128; probs saturate where their s8 would).
    A block whose graph differs in any step is left as it is.
    Returns the rewritten model (a copy) and each rewritten block's output (the tensor after its heads merge, in
    graph order; `assert_same_at` compares the first)."""
    model, g, inits, producers, consumers = _indexed_copy(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in g.value_info if v.type.tensor_type.HasField("shape")}

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
        """(qkv tensor, which of q/k/v, heads, head size, S) of Squeeze(Slice(Transpose[2,0,3,1,4](Reshape(qkv)))), as
        exported, or with the Slice above the Transpose, as ORT's transpose optimizer leaves it (model.prep.onnx)."""
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
            if int(axis[0]) != slice_axis or int(end[0]) - int(start[0]) != 1 or min(shape[3:]) < 1:
                continue
            return nodes[3].input[0], int(start[0]), int(shape[3]), int(shape[4]), int(shape[1])
        return None

    def only_user(name: str, op: str):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def symmetric_int8(q: onnx.NodeProto) -> bool:
        """A per-tensor QuantizeLinear to int8 with zero point 0 (what the static recipes write)."""
        scale, zp = const(q.input[1]), const(q.input[2]) if len(q.input) > 2 else None
        return scale is not None and scale.size == 1 and zp is not None and zp.dtype == np.int8 and zp.size == 1 \
            and int(zp.ravel()[0]) == 0

    def dequantized(name: str):
        """(the float tensor, its QuantizeLinear) when `name` is DQ(Q(x)) with one symmetric int8 range, else (name, None)."""
        dq = producers.get(name)
        q = dq and dq.op_type == "DequantizeLinear" and producers.get(dq.input[0])
        if q and q.op_type == "QuantizeLinear" and symmetric_int8(q) and list(dq.input[1:3]) == list(q.input[1:3]):
            return q.input[0], q
        return name, None

    def quantized_user(name: str):
        """(the tensor to read, the QuantizeLinear) when `name`'s only user is Q -> DQ (as `dequantized`), else (name, None)."""
        q = only_user(name, "QuantizeLinear")
        dq = q and only_user(q.output[0], "DequantizeLinear")
        return (dq.output[0], q) if dq and symmetric_int8(q) and list(dq.input[1:3]) == list(q.input[1:3]) else (name, None)

    new_inits: list[onnx.TensorProto] = []

    def init(name: str, value) -> str:
        new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def int8_projections(qkv: str, heads: int, size: int, c: list, quants, zps, prefix: str):
        """When `qkv` comes from an int8 projection (MatMulIntegerToFloat, constant weights and bias) read by nothing
        but the head split: one int8 GEMM per part (`MatMulIntegerToFloat`, the exported q/k scale folded into its
        weight scales and bias), then its QuantizeLinear: no float qkv, split or scale pass. (A `QGemm` writing q
        quantized in its epilogue was slower than GEMM + QuantizeLinear on the AMD build machine, in a one-off
        microbenchmark not kept in the repo.)
        Returns (nodes, the three int8 (B*S, D) outputs, S) or None."""
        mm, users = producers.get(qkv), consumers.get(qkv, [])
        if mm is None or mm.op_type != "MatMulIntegerToFloat" or len(mm.input) < 7 or len(users) != 1:
            return None
        shape = const(users[0].input[1]) if users[0].op_type == "Reshape" else None
        x, w, x_scale, w_scale, x_zp, w_zp, bias = (const(i) for i in mm.input)
        if shape is None or shape.size < 2 or shape[1] < 1 or x is not None or x_zp is None \
                or any(t is None for t in (w, x_scale, w_scale, w_zp, bias)) or w.ndim != 2 or w.shape[1] != 3 * heads * size:
            return None
        width = heads * size
        w_scale, w_zp = np.broadcast_to(w_scale, (3 * width,)), np.broadcast_to(w_zp, (3 * width,))
        rows = init(f"{prefix}_rows", np.array([-1, w.shape[0]], np.int64))
        nodes = [onnx.helper.make_node("Reshape", [mm.input[0], rows], [f"{prefix}_x_rows"], name=f"{prefix}_x_Reshape")]
        outs = []
        for i, part in enumerate("qkv"):
            cols, name = slice(i * width, (i + 1) * width), f"{prefix}_{part}"
            scale = 1.0 if c[i] is None else float(c[i].ravel()[0])
            nodes += [
                onnx.helper.make_node(
                    "MatMulIntegerToFloat",
                    [f"{prefix}_x_rows", init(f"{name}_weight", np.ascontiguousarray(w[:, cols])), mm.input[2],
                     init(f"{name}_weight_scale", (w_scale[cols] * scale).astype(np.float32)), mm.input[4],
                     init(f"{name}_weight_zero_point", np.ascontiguousarray(w_zp[cols])),
                     init(f"{name}_bias", (bias[cols] * scale).astype(np.float32))],
                    [f"{name}_f32"], domain="com.microsoft", name=f"{mm.name}_{part}_MatMulIntegerToFloat"),
                onnx.helper.make_node("QuantizeLinear", [f"{name}_f32", quants[i].input[1], zps[i]], [f"{name}_i8"],
                                      name=f"{name}_QuantizeLinear")]
            outs.append(f"{name}_i8")
        return nodes, outs, int(shape[1])

    replaced: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    outputs: list[str] = []
    for softmax in g.node:
        if softmax.op_type != "Softmax" or _attr(softmax, "axis") not in (None, -1, 3):
            continue
        scores = producers.get(softmax.input[0])
        probs, q_probs = quantized_user(softmax.output[0])
        probs_v = only_user(probs, "MatMul")
        if scores is None or scores.op_type != "MatMul" or probs_v is None or probs_v.input[0] != probs:
            continue
        transpose = only_user(probs_v.output[0], "Transpose")
        reshape = transpose and only_user(transpose.output[0], "Reshape")
        if reshape is None or list(_attr(transpose, "perm") or []) != [0, 2, 1, 3]:
            continue
        (q_in, q_q), (k_in, k_q), (v_in, v_q) = (dequantized(i) for i in (*scores.input[:2], probs_v.input[1]))
        q_scale, k_scale = chain(q_in, "Mul"), chain(k_in, "Mul", "Reshape", "Transpose", "Reshape")
        if q_scale is None or k_scale is None or list(_attr(k_scale[2], "perm") or []) != [0, 2, 1]:
            continue
        cq, ck = const(q_scale[0].input[1]), const(k_scale[0].input[1])
        if cq is None or ck is None or cq.size != 1 or ck.size != 1:
            continue
        q, k, v = head(q_scale[0].input[0]), head(k_scale[3].input[0]), head(v_in)
        if not (q and k and v) or len({q[0], k[0], v[0]}) != 1 or (q[1], k[1], v[1]) != (0, 1, 2):
            continue
        qkv, heads, size, seq = q[0], q[2], q[3], q[4]
        # qkv as (B, S, 3D), or with S spread over more dims (VOLO: (B, H, W, 3D)), which the fused float kernel
        # cannot read and the int8 heads read through S as the graph's Reshape names it
        flat_rows = ranks.get(qkv) in (None, 3)
        if not flat_rows and seq < 1:
            continue
        parts = [f"{qkv}_{p}" for p in "qkv"]
        split = onnx.helper.make_node("Split", [qkv], parts, axis=-1, num_outputs=3, name=f"{qkv}_Split_qkv")
        quantizers = (q_q, k_q, q_probs, v_q)
        if all(n is None for n in quantizers):
            if not flat_rows:
                continue
            replaced[id(reshape)] = [split, onnx.helper.make_node(
                "MultiHeadAttention", parts, [reshape.output[0]], domain="com.microsoft", num_heads=heads,
                scale=float(cq.ravel()[0] * ck.ravel()[0]), name=f"{softmax.name}_MultiHeadAttention")]
            removed |= {id(n) for n in (softmax, scores, probs_v, transpose, q_scale[0], k_scale[0])}
            outputs.append(reshape.output[0])
            continue
        if any(n is None for n in quantizers):
            continue  # partly quantized attention: left as the graph has it
        p = f"{softmax.name}_int8"
        zp_u8, zp_s8 = init(f"{p}_zero_point_u8", np.array(128, np.uint8)), init(f"{p}_zero_point_s8", np.array(0, np.int8))
        scales = (q_scale[0].input[1], k_scale[0].input[1], None)  # the exported q and k scales; v has none
        quants, zps = (q_q, k_q, v_q), (zp_u8, zp_s8, zp_s8)  # q is the u8 side of q @ k^T, k and v the s8 side
        projected = int8_projections(qkv, heads, size, [const(c) if c else None for c in scales], quants, zps, p)
        if projected is not None:  # q, k, v straight from the int8 projection, each already quantized
            nodes, flat, seq = projected
            heads_shape = init(f"{p}_heads_shape", np.array([-1, seq, heads, size], np.int64))
        else:  # from the float projection: split, scale as the Q/DQ graph does (the same roundings), quantize
            nodes, flat = [split], []
            heads_shape = init(f"{p}_heads_shape", np.array([0, 0, heads, size] if flat_rows else [-1, seq, heads, size],
                                                            np.int64))
            for part, c, quant, zp in zip(parts, scales, quants, zps):
                if c is not None:
                    nodes.append(onnx.helper.make_node("Mul", [part, c], [f"{part}_scaled"], name=f"{part}_Mul"))
                nodes.append(onnx.helper.make_node("QuantizeLinear", [f"{part}_scaled" if c else part, quant.input[1], zp],
                                                   [f"{part}_i8"], name=f"{part}_QuantizeLinear"))
                flat.append(f"{part}_i8")
        per_head = {}  # q, k, v: int8 (B, N, S, H); k as (B, N, H, S)
        for part, x, perm in zip(parts, flat, ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3])):
            nodes += [onnx.helper.make_node("Reshape", [x, heads_shape], [f"{part}_i8_heads"], name=f"{part}_Reshape"),
                      onnx.helper.make_node("Transpose", [f"{part}_i8_heads"], [f"{part}_i8_bnsh"], perm=perm, name=f"{part}_Transpose")]
            per_head[part] = f"{part}_i8_bnsh"
        q4, k4, v4 = (per_head[x] for x in parts)
        nodes.append(onnx.helper.make_node(
            "MatMulIntegerToFloat", [q4, k4, q_q.input[1], k_q.input[1], zp_u8, zp_s8], [scores.output[0]],
            domain="com.microsoft", name=f"{scores.name}_MatMulIntegerToFloat"))
        nodes.append(softmax)
        p_scale = q_probs.input[1]
        nodes.append(onnx.helper.make_node("QuantizeLinear", [softmax.output[0], p_scale, init(f"{p}_probs_zero_point", np.array(0, np.uint8))],
                                           [f"{p}_probs_u8"], name=f"{p}_probs_QuantizeLinear"))
        probs_u8 = f"{p}_probs_u8"
        if float(const(p_scale).ravel()[0]) * 127 < 1.0:  # probs above the s8 range saturate there, as in the Q/DQ graph
            nodes.append(onnx.helper.make_node("Clip", [probs_u8, "", init(f"{p}_probs_max", np.array(127, np.uint8))],
                                               [f"{p}_probs_u8_clipped"], name=f"{p}_probs_Clip"))
            probs_u8 = f"{p}_probs_u8_clipped"
        removed |= {id(n) for n in (softmax, scores, probs_v, q_scale[0], k_scale[0], q_probs)}
        out_q = only_user(reshape.output[0], "QuantizeLinear")
        out_zp = const(out_q.input[2]) if out_q is not None and len(out_q.input) > 2 else None
        out_scale = const(out_q.input[1]) if out_q is not None else None
        if out_zp is not None and out_zp.dtype == np.uint8 and out_zp.size == 1 and out_scale is not None and out_scale.size == 1:
            # o = probs @ v written straight as the projection's u8 input: no float output, no separate quantize
            nodes += [
                onnx.helper.make_node("QLinearMatMul", [probs_u8, p_scale, f"{p}_probs_zero_point", v4, v_q.input[1], zp_s8,
                                                        out_q.input[1], out_q.input[2]], [f"{p}_o_u8"], name=f"{probs_v.name}_QLinearMatMul"),
                onnx.helper.make_node("Transpose", [f"{p}_o_u8"], [f"{p}_o_u8_bsnh"], perm=[0, 2, 1, 3], name=f"{p}_o_Transpose"),
                onnx.helper.make_node("Reshape", [f"{p}_o_u8_bsnh", reshape.input[1]], [out_q.output[0]], name=f"{p}_o_Reshape"),
            ]
            removed |= {id(transpose), id(out_q)}
            replaced[id(reshape)] = nodes
            outputs.append(out_q.output[0])
        else:
            nodes.append(onnx.helper.make_node(
                "MatMulIntegerToFloat", [probs_u8, v4, p_scale, v_q.input[1], f"{p}_probs_zero_point", zp_s8],
                [probs_v.output[0]], domain="com.microsoft", name=f"{probs_v.name}_MatMulIntegerToFloat"))
            replaced[id(transpose)] = [*nodes, transpose]
            outputs.append(reshape.output[0])
    if not replaced:
        return model, []
    g.initializer.extend(new_inits)
    nodes = _splice(g, replaced, removed)
    graph_outputs = {o.name for o in g.output}
    while True:  # drop the head split/transposes and Q/DQ nothing reads any more
        used = {i for n in nodes for i in n.input} | graph_outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    _set_nodes(model, nodes)
    return model, outputs


def assert_same_at(reference: onnx.ModelProto, rewritten: onnx.ModelProto, output: str, batch: int = 2,
                   rtol: float = 1e-4) -> None:
    """Guard for a local graph rewrite (attention, patch embedding): the tensor `output`, which both graphs compute
    (the first rewritten block's, upstream of any rounding the rewrite's float order can flip later, which a
    random-weight network amplifies), is the same in both models, as ORT runs them. Float: to `rtol` of its
    largest value. Integer (the projection's u8 input written by the int8 attention): a rounding step at most,
    in at most 1 in 1000 values (the exported q/k scale is folded into the int8 GEMM's scales, where the Q/DQ
    graph scales in float, which can flip a rounding)."""
    outs = []
    for model in (reference, rewritten):
        probe = onnx.ModelProto.FromString(model.SerializeToString())
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
        sess = session(probe.SerializeToString())
        outs.append(sess.run([output], _random_feed(sess, batch))[0])
    ref, got = outs
    if ref.dtype != got.dtype or ref.shape != got.shape:
        raise RuntimeError(f"rewritten {output!r} is {got.dtype}{got.shape}, the reference's {ref.dtype}{ref.shape}: "
                           "rewrite is wrong")
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    if np.issubdtype(ref.dtype, np.integer):
        wrong = diff.max() > 1 or np.mean(diff > 0) > 1e-3
        what = f"{np.mean(diff > 0):.3%} of its values differ, by up to {diff.max():.0f} steps"
    else:
        wrong = diff.max() > rtol * max(float(np.max(np.abs(ref))), 1e-6)
        what = f"it differs by {diff.max():.3g} (max abs)"
    if wrong:
        raise RuntimeError(f"rewritten {output!r}: {what}: rewrite is wrong")


def _random_feed(sess, batch: int) -> dict[str, np.ndarray]:
    """The same seeded standard-normal input for any session of one model (dynamic dims set to `batch`)."""
    inp = sess.get_inputs()[0]
    shape = [batch if not isinstance(d, int) else d for d in inp.shape]
    return {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _subgraph(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """The part of `model` computing `outputs` from the tensors `inputs` (made graph inputs) and constants."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    cut, keep, used_inits, stack = set(inputs), set(), set(), list(outputs)
    while stack:
        t = stack.pop()
        if not t or t in cut:
            continue
        if t in inits:
            used_inits.add(t)
            continue
        node = producers.get(t)
        if node is None:
            raise RuntimeError(f"{t!r} depends on a graph input other than {sorted(cut)}")
        if id(node) not in keep:
            keep.add(id(node))
            stack.extend(node.input)
    graph = onnx.helper.make_graph(
        [n for n in model.graph.node if id(n) in keep], "local",
        [onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in inputs],
        [onnx.helper.make_empty_tensor_value_info(t) for t in outputs],
        [i for i in model.graph.initializer if i.name in used_inits])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _without_activation_rounding(model: onnx.ModelProto) -> onnx.ModelProto:
    """The Q/DQ graph with each activation's Q -> DQ pair made an identity (weights stay int8): the same computation
    without the activations' roundings."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    consts, producers = constant_names(model), {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        q = producers.get(n.input[0]) if n.op_type == "DequantizeLinear" and n.input[0] not in consts else None
        if q is not None and q.op_type == "QuantizeLinear":
            x = q.input[0]
            n.op_type, n.domain = "Identity", ""
            del n.input[:], n.attribute[:]
            n.input.append(x)
    _set_nodes(model, _drop_dead_qdq(list(model.graph.node), {o.name for o in model.graph.output}))
    return model


def _local_pairs(candidate: onnx.ModelProto, reference: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(float inputs, outputs) of the candidate's int8 kernels (MatMulIntegerToFloat) that the reference computes
    too: each output from the float tensor its int8 input quantizes (QuantizeLinear's input, through the
    int8 reshapes/transposes of a patch embedding)."""
    producers = {o: n for n in candidate.graph.node for o in n.output}
    in_reference = {o for n in reference.graph.node for o in n.output}
    inputs, outputs = [], []
    for node in candidate.graph.node:
        if node.op_type != "MatMulIntegerToFloat" or node.output[0] not in in_reference:
            continue
        q = producers.get(node.input[0])
        while q is not None and q.op_type in ("Reshape", "Transpose"):
            q = producers.get(q.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in in_reference:
            continue
        if q.input[0] not in inputs:
            inputs.append(q.input[0])
        outputs.append(node.output[0])
    return inputs, outputs


def _load(model: Path | bytes | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.ModelProto.FromString(model) if isinstance(model, bytes) else onnx.load(str(model))


LOCAL_RTOL = 1e-5  # an int8 kernel vs the Q/DQ ops it replaces, on the same float input: the same integers, float
# rounding only (the bias added inside the kernel or after it: an ulp, 6e-8, of the largest value)


def assert_same_outputs(reference: Path | bytes | onnx.ModelProto, candidate: Path | bytes | onnx.ModelProto,
                        batch: int = 2, noise_fraction: float = 2.0) -> None:
    """Guard for the serving-form rewrite (`ort_serving_form`): both models (files, serialized or protos), run by ONNX
    Runtime on the same random input (its optimised QDQ path is the reference; an unoptimised float emulation of
    Q/DQ rounds differently), must agree in two ways.

    1. Locally, exactly up to float rounding: each int8 kernel of the candidate (MatMulIntegerToFloat) whose output
       the reference computes too, fed the reference's own float input of its QuantizeLinear, gives that output to
       LOCAL_RTOL of its largest value. Both quantize the same floats, so the integers and their products are the
       same; only the float order of scale and bias differs. A wrong scale, zero point, bias, weight or input
       fails here by orders of magnitude (a 3% scale: 3e-2).
    2. End to end, within the Q/DQ graph's own rounding: the float order differs (bias inside the kernel), so a value
       within an ulp of a later QuantizeLinear's rounding boundary can round the other way, one step, and the
       network carries the step to the output (timm levit_128s: 1.1e-06, pvt_v2_b0: 1.8e-3, a rtol 1e-4 check
       failed on both). The RMS difference of the outputs must stay within `noise_fraction` (2) times the RMS effect of all
       of the activations' roundings (the reference vs itself with every activation Q/DQ made an identity): a few
       flipped roundings move the output less than every rounding does (on a 6-layer MLP, batch 2: 0.08-1.2x; the
       factor 2 leaves room for that small sample). This part guards against gross errors outside the int8
       kernels (a node lost or miswired); part 1 is the precise check of the kernels themselves.
    """
    ref_model, cand_model = _load(reference), _load(candidate)
    ref, cand = session(ref_model.SerializeToString()), session(cand_model.SerializeToString())
    feed = _random_feed(ref, batch)
    a = ref.run(None, feed)[0].astype(np.float64)
    b = cand.run(None, _random_feed(cand, batch))[0].astype(np.float64)
    if a.shape != b.shape:
        raise RuntimeError(f"the served form's output is {list(b.shape)}, the Q/DQ graph's {list(a.shape)}: rewrite is wrong")
    inputs, outputs = _local_pairs(cand_model, ref_model)
    if outputs:
        probe = onnx.ModelProto.FromString(ref_model.SerializeToString())
        graph_outputs = {o.name for o in probe.graph.output}
        inner = [t for t in inputs if t not in feed]  # the graph's input itself comes from the feed
        probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in inner if t not in graph_outputs)
        x = {**{t: feed[t] for t in inputs if t in feed}, **dict(zip(inner, session(probe.SerializeToString()).run(inner, feed)))}
        want = session(_subgraph(ref_model, inputs, outputs).SerializeToString()).run(outputs, x)
        got = session(_subgraph(cand_model, inputs, outputs).SerializeToString()).run(outputs, x)
        for name, w, g in zip(outputs, want, got):
            err = float(np.max(np.abs(w.astype(np.float64) - g))) if w.shape == g.shape else np.inf
            if not err <= LOCAL_RTOL * max(float(np.max(np.abs(w))), 1e-30):
                raise RuntimeError(f"the served form's int8 kernel for {name!r} differs from the Q/DQ graph's on the same "
                                   f"input by {err:.3g} (max abs; {float(np.max(np.abs(w))):.3g} its largest value): "
                                   "rewrite is wrong")
    err = float(np.sqrt(np.mean((a - b) ** 2)))
    if err == 0:
        return
    unrounded = session(_without_activation_rounding(ref_model).SerializeToString()).run(None, feed)[0]
    noise = float(np.sqrt(np.mean((a - unrounded) ** 2)))
    if not err <= noise_fraction * noise + 1e-6 * float(np.max(np.abs(a))):
        raise RuntimeError(f"the served form differs from the Q/DQ graph by {err:.3g} (RMS), more than the graph's own "
                           f"activation rounding moves its output ({noise:.3g} RMS): rewrite is wrong")


def quantize(recipe: OnnxDynamicConfig | OnnxStaticConfig, prep_onnx: Path, out_path: Path, table: Path | None,
             exclude_nodes=()) -> None:
    """Produce the recipe's quantized ONNX at `out_path` from the quantization-ready FP32 model;
    `exclude_nodes` stay float (mixed precision, the recipe's float_layers). A recipe with `qdq_placement: tensorrt`
    also gets Q/DQ on the skip input of each residual Add after a quantized weighted op (`residual_skip_inputs`,
    `quantize_residual_inputs`), its range from the same table."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    # Pass a ModelProto, not the path: ORT writes `<path>-inferred.onnx` beside a path it is
    # given, which collides when several variants are quantized from one file concurrently.
    # No stdout redirection here: variants are quantized in concurrent threads, and
    # contextlib.redirect_stdout swaps the process-wide sys.stdout.
    model = onnx.load(str(prep_onnx))
    # Linear ops computing a constant (their inputs independent of the image) stay float: constant_input_linears.
    fixed = [n for n in constant_input_linears(model, tuple(recipe.op_types)) if n not in set(exclude_nodes)]
    if recipe.scheme == "dynamic":
        quantize_dynamic(
            model, str(out_path), weight_type=QuantType.QInt8, per_channel=recipe.per_channel,
            op_types_to_quantize=list(recipe.op_types), nodes_to_exclude=list(exclude_nodes) + fixed,
        )
        return
    exclude = ([] if recipe.quantize_attention else activation_matmuls(model)) + list(exclude_nodes) + fixed
    tensors = load_tensors_data(table)
    _check_ranges(model, recipe.op_types, set(exclude), set(tensors.data), Path(table))
    skips = {}
    if getattr(recipe, "qdq_placement", "weighted") == "tensorrt":
        skips = residual_skip_inputs(model, _quantized_gemms(model, recipe.op_types, set(exclude)))
        _check_residual_ranges(skips, set(tensors.data), Path(table))
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
    if skips:
        quantized = onnx.load(str(out_path))
        onnx.save(quantize_residual_inputs(quantized, skips, tensors.data), str(out_path))


# Ops TensorRT fuses into a GEMM / convolution as its epilogue when their other input is a constant (bias, LayerScale's
# gamma), and ops that only move values: a residual branch is traced back through them to its weighted op.
_EPILOGUE_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
_MOVE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast"})


def _quantized_gemms(model: onnx.ModelProto, op_types, exclude: set[str]) -> set[str]:
    """The weighted nodes (constant weight) of `op_types` that a static recipe quantizes: not excluded, not computing a
    constant (`constant_input_linears`)."""
    fixed = set(constant_input_linears(model, tuple(op_types)))
    by_name = {n.name: n for n in model.graph.node}
    return {name for name in weight_gemms(model)
            if by_name[name].op_type in op_types and name not in exclude and name not in fixed}


def residual_skip_inputs(model: onnx.ModelProto, weighted: set[str]) -> dict[str, list[str]]:
    """The skip connections TensorRT can fuse with the weighted op before them: skip tensor -> the outputs of the
    residual Adds reading it as their skip input (tensor names: unique, where node names may be empty).

    A residual Add adds two activations, `skip` and `branch`, where `skip` is an ancestor of `branch` (the branch is
    computed from it: a skip connection) and `branch` comes from a node in `weighted` (a quantized MatMul/Gemm/Conv)
    through epilogue ops with a constant other input (bias Add, LayerScale Mul) and ops that only move values
    (Reshape, Transpose, ...). In a pre-norm ViT that is each block's `x + proj(attn)` and `x + fc2(mlp)`: `x`, the
    residual stream, is the skip; the first block's skip is the patch embedding (+ position embedding) output."""
    fixed = input_independent(model)
    producers = {o: n for n in model.graph.node for o in n.output}

    def from_weighted(t: str) -> bool:
        for _ in range(32):  # a branch's epilogue is a few ops long
            n = producers.get(t)
            if n is None:
                return False
            if n.name in weighted:
                return True
            data = [i for i in n.input if i and i not in fixed]
            if len(data) != 1 or n.op_type not in _EPILOGUE_OPS | _MOVE_OPS:
                return False
            t = data[0]
        return False

    def is_ancestor(a: str, b: str) -> bool:
        stack, seen = [b], set()
        while stack:
            t = stack.pop()
            if t == a:
                return True
            n = producers.get(t)
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            stack.extend(i for i in n.input if i and i not in fixed)
        return False

    skips: dict[str, list[str]] = {}
    for n in model.graph.node:
        data = [i for i in n.input if i]
        if n.op_type != "Add" or len(data) != 2 or data[0] == data[1] or any(i in fixed for i in data):
            continue
        for skip, branch in ((data[0], data[1]), (data[1], data[0])):
            if from_weighted(branch) and is_ancestor(skip, branch):
                skips.setdefault(skip, []).append(n.output[0])
                break
    return skips


def quantize_residual_inputs(model: onnx.ModelProto, skips: dict[str, list[str]], ranges) -> onnx.ModelProto:
    """`model` (a static Q/DQ graph) with the skip tensors of `skips` (`residual_skip_inputs`) quantized: one symmetric
    int8 Q/DQ pair per tensor, its scale from `ranges` (the calibration table's TensorData, as ORT's quantize_static
    computes it: max |range| / 127, zero point 0), read by the residual Adds and by every LayerNormalization reading
    that tensor. One pair, not one per reader: TensorRT's fused GEMM + residual Add writes the stream in INT8 when its
    skip input is INT8, so the LayerNorm reads those same integers (as ModelOpt's graphs have it). A skip tensor ORT
    already quantized (it also feeds a MatMul) reuses that pair. Other readers keep the float tensor."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    model, g, inits, producers, consumers = _indexed_copy(model)
    qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.INT8, symmetric=True)
    after: dict[int | None, list[onnx.NodeProto]] = {}  # producer (by id; None: a graph input) -> Q/DQ placed after it
    for x, adds in skips.items():
        existing = next((dq for q in consumers.get(x, []) if q.op_type == "QuantizeLinear"
                         for dq in consumers.get(q.output[0], []) if dq.op_type == "DequantizeLinear"), None)
        if existing is not None:
            dq_out = existing.output[0]
        else:
            lo, hi = (np.asarray(v, np.float32) for v in ranges[x].range_value)
            zero, scale = compute_scale_zp(lo, hi, qmin, qmax, symmetric=True)
            scale_name, zp_name = f"{x}_residual_scale", f"{x}_residual_zero_point"
            g.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32).reshape(()), scale_name),
                                  numpy_helper.from_array(np.asarray(zero, np.int8).reshape(()), zp_name)])
            q_out, dq_out = f"{x}_residual_QuantizeLinear_Output", f"{x}_residual_DequantizeLinear_Output"
            after.setdefault(id(producers[x]) if x in producers else None, []).extend([
                onnx.helper.make_node("QuantizeLinear", [x, scale_name, zp_name], [q_out], name=f"{x}_residual_QuantizeLinear"),
                onnx.helper.make_node("DequantizeLinear", [q_out, scale_name, zp_name], [dq_out],
                                      name=f"{x}_residual_DequantizeLinear")])
        for reader in consumers.get(x, []):
            if (reader.op_type == "Add" and reader.output[0] in adds) or reader.op_type == "LayerNormalization":
                reader.input[:] = [dq_out if i == x else i for i in reader.input]
    _set_nodes(model, [*after.get(None, []), *(m for n in g.node for m in (n, *after.get(id(n), [])))])
    return model


def _check_residual_ranges(skips: dict[str, list[str]], ranged: set[str], table: Path) -> None:
    from vitq.errors import VitqError

    missing = sorted(set(skips) - ranged)
    if missing:
        raise VitqError(
            f"calibration table {table} has no range for {missing[0]!r}, the skip input of the residual Add "
            f"making {skips[missing[0]][0]!r} (qdq_placement: tensorrt): the calibrate stage measures the residual inputs only "
            "when a recipe places Q/DQ on them (calibrate(..., residual=True)); rerun the calibrate stage")


def _check_ranges(model: onnx.ModelProto, op_types, exclude: set[str], ranged: set[str], table: Path) -> None:
    """Every activation the quantizer will put a Q/DQ on (the inputs of the `op_types` nodes not in `exclude`)
    has a range in the table: ORT's quantize_static leaves a tensor without one in float, with only an info log."""
    from vitq.errors import VitqError

    consts = constant_names(model)
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
        if node.op_type not in LINEAR_OP_TYPES:
            continue
        w = WEIGHT_INPUT[node.op_type]
        if len(node.input) > w and node.input[w] in inits:
            total += int(np.prod(inits[node.input[w]].dims))
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
    """A quantized variant is served in ONNX Runtime's fused form (`model.ort.onnx`), each rewrite checked against
    the graph before it: static variants with MatMulIntegerToFloat kernels (exactly the Q/DQ `model.onnx`'s
    outputs) and the patch embedding on the int8 GEMM; attention, where recognised, as one MultiHeadAttention
    kernel (float attention) or on int8 kernels (a recipe quantizing attention's products; see
    `fuse_attention`). The file is written only after every check passes. Returns the served file's name."""
    serving, fused, patches = quantized, 0, []
    if recipe.scheme == "static":
        serving, fused = ort_serving_form(quantized)
        if fused:  # exact: same integer kernels; checked before the rewrites below reorder float sums
            assert_same_outputs(folder / "model.onnx", serving.SerializeToString())
        patched, patches = int8_patch_embedding(serving)
        if patches:
            assert_same_at(serving, patched, patches[0])
            serving = patched
    fused_attention, blocks = fuse_attention(serving)
    if blocks:
        assert_same_at(serving, fused_attention, blocks[0])
    if not fused and not patches and not blocks:
        return "model.onnx"
    onnx.save(fused_attention, str(folder / "model.ort.onnx"))
    mha = sum(n.op_type == "MultiHeadAttention" for n in fused_attention.graph.node)
    log.info("quantize: %s: served form: %d MatMuls and %d patch embedding(s) on fused int8 kernels; attention: "
             "%d blocks as MultiHeadAttention, %d with int8 products", recipe.name, fused, len(patches), mha,
             len(blocks) - mha)
    return "model.ort.onnx"
