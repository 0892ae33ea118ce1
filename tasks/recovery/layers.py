"""Quantizable layers, named by torch module, found in the ONNX graph, with their MACs.

The dynamo exporter records the torch module scope of every node in `metadata_props`
(`pkg.torch.onnx.name_scopes`: `['', 'blocks', 'blocks.0', 'blocks.0.attn', 'blocks.0.attn.qkv',
'linear']`, the last entry being the op). ONNX Runtime's pre-processing drops that metadata but keeps
the node names, so the scope is read from the exported `model.onnx` and applied, by node name, to
the quantization-ready `model.prep.onnx`.

Layer names: the module's qualified name for MatMul/Gemm/Conv nodes with a constant weight
(`blocks.0.mlp.fc1`, `patch_embed.proj`, `head`), from the weight's parameter name where the
exporter kept it (Conv, Gemm; also through a folded BatchNorm), else from the node's scope; for the activation-activation MatMuls inside an
attention module, `<module>#qk` (q @ k^T, the one feeding Softmax) and `<module>#av` (attn @ v);
`<module>#matmul<i>` for other activation products (e.g. EfficientViT's ReLU linear attention).
A node with no recorded scope keeps its ONNX name as `onnx:<node>` (no torch module to point at).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from vitq.tasks.targets.onnx.backend import LINEAR_OP_TYPES as LINEAR_OPS, constant_names

SCOPE_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class Layer:
    name: str  # torch module qualified name, or <attention module>#qk / #av, or onnx:<node>
    kind: str  # "linear" (MatMul/Gemm with a constant weight), "conv", "attention" (activation matmul)
    nodes: tuple[str, ...]  # ONNX node names in model.prep.onnx
    input: str  # the activation tensor the layer's Q/DQ reads (input 0 of its first node)
    macs: int  # multiply-accumulates per image

    @property
    def weighted(self) -> bool:
        return self.kind != "attention"


def _load(model: onnx.ModelProto | Path | str) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def node_scopes(fp32: onnx.ModelProto) -> dict[str, list[str]]:
    """Node name -> its torch module scope chain (modules only, the op name dropped)."""
    out = {}
    for node in fp32.graph.node:
        for prop in node.metadata_props:
            if prop.key == SCOPE_KEY:
                out[node.name] = [s for s in ast.literal_eval(prop.value)[:-1] if s]
    return out


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _macs(node: onnx.NodeProto, shapes: dict[str, list]) -> int:
    """Multiply-accumulates per image (the leading batch dimension dropped)."""
    out = shapes.get(node.output[0])
    if not out or any(d is None for d in out[1:]):
        return 0
    per_image = int(np.prod(out[1:]))
    a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
    if node.op_type == "Conv":
        return per_image * int(np.prod(b[1:])) if b else 0
    if node.op_type == "Gemm":
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        return per_image * int(a[0 if trans_a else -1]) if a and a[-1] else 0
    return per_image * int(a[-1]) if a and a[-1] else 0  # MatMul: K is A's last dim


def quantizable_layers(fp32_onnx: onnx.ModelProto | Path | str, prep_onnx: onnx.ModelProto | Path | str) -> list[Layer]:
    """Every MatMul/Gemm/Conv of the quantization-ready graph as a named layer, in graph order."""
    fp32, prep = _load(fp32_onnx), _load(prep_onnx)
    scopes = node_scopes(fp32)
    # A Conv/Gemm weight keeps its parameter name (`<module>.weight`), also when the exporter folded a
    # BatchNorm into it (the node's scope is then the norm's): the parameter names the module exactly.
    params = {n.name: n.input[1][: -len(".weight")] for n in fp32.graph.node
              if len(n.input) > 1 and n.input[1].endswith(".weight")}
    consts = constant_names(prep)
    shapes = _shapes(prep)
    layers: dict[str, dict] = {}
    attention_seen: dict[str, list[str]] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in prep.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for node in prep.graph.node:
        if node.op_type not in LINEAR_OPS:
            continue
        scope = scopes.get(node.name)
        weighted = len(node.input) > 1 and node.input[1] in consts
        if weighted and node.name in params:
            name = params[node.name]
        elif not scope:
            name = f"onnx:{node.name}"
        elif weighted:
            name = scope[-1]
        else:
            module = scope[-1]
            roles = attention_seen.setdefault(module, [])
            role = "qk" if _feeds_softmax(node, consumers) else ("av" if roles == ["qk"] else f"matmul{len(roles)}")
            roles.append(role)
            name = f"{module}#{role}"
        kind = "conv" if node.op_type == "Conv" else ("linear" if weighted else "attention")
        entry = layers.setdefault(name, {"kind": kind, "nodes": [], "input": node.input[0], "macs": 0})
        entry["nodes"].append(node.name)
        entry["macs"] += _macs(node, shapes)
    return [Layer(name=k, kind=v["kind"], nodes=tuple(v["nodes"]), input=v["input"], macs=v["macs"]) for k, v in layers.items()]


def _feeds_softmax(node: onnx.NodeProto, consumers) -> bool:
    """q @ k^T: the product reaches a Softmax through elementwise ops (scale, mask)."""
    frontier, seen = [node.output[0]], set()
    while frontier:
        t = frontier.pop()
        for c in consumers.get(t, []):
            if c.op_type == "Softmax":
                return True
            if c.op_type in ("Mul", "Div", "Add", "Where", "Cast") and c.name not in seen:
                seen.add(c.name)
                frontier.extend(c.output)
    return False


def nodes_of(layers: list[Layer], names) -> list[str]:
    """ONNX node names of the named layers (a name that is not a layer is an error naming it)."""
    by_name = {layer.name: layer for layer in layers}
    missing = sorted(set(names) - set(by_name))
    if missing:
        raise KeyError(f"not quantizable layers of this model: {', '.join(missing)}; known: {', '.join(by_name)}")
    return [n for name in names for n in by_name[name].nodes]


def match_layers(patterns, names) -> list[str]:
    """The layer `names` (torch module names) any glob in `patterns` matches (fnmatch), in `names`' order.
    A pattern that matches nothing is a one-line ConfigError naming it and a few of the names."""
    from fnmatch import fnmatchcase

    from vitq.errors import ConfigError

    for pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            raise ConfigError(f"float_layers pattern {pattern!r} matches no quantizable layer of this model; "
                              f"its layers: {shown}")
    return [n for n in names if any(fnmatchcase(n, p) for p in patterns)]


def int8_mac_fraction(layers: list[Layer], float_layers) -> float:
    """Share of Linear/Conv MACs (constant-weight MatMul/Gemm/Conv) that run in INT8."""
    weighted = [layer for layer in layers if layer.weighted]
    total = sum(layer.macs for layer in weighted)
    kept = sum(layer.macs for layer in weighted if layer.name in set(float_layers))
    return 1.0 if total == 0 else round(1.0 - kept / total, 6)


def quantized_layers(layers: list[Layer], qdq_model: onnx.ModelProto) -> set[str]:
    """Layers whose every node reads a DequantizeLinear on input 0 (and on the weight, if weighted)."""
    dq_out = {n.output[0] for n in qdq_model.graph.node if n.op_type == "DequantizeLinear"}
    nodes = {n.name: n for n in qdq_model.graph.node}
    out = set()
    for layer in layers:
        ok = all(
            name in nodes and nodes[name].input[0] in dq_out and nodes[name].input[1] in dq_out
            for name in layer.nodes
        )
        if ok:
            out.add(layer.name)
    return out
