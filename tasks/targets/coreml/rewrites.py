"""Graph rewrites that let coremltools convert what torch.export captures from the timm zoo, each exact in float.

- `DECOMPOSITIONS` (for `ExportedProgram.run_decompositions`): bicubic upsampling (`aten.upsample_bicubic2d`,
  which coremltools' torch frontend does not convert: "Unsupported fx node upsample_bicubic2d"; CrossViT scales
  its input image with it) as, per spatial axis, four `index_select`s of the input with fixed indices times fixed
  per-output weights, read from torch's own kernel (Keys' cubic, A = -0.75, border indices clamped) for the
  static sizes at export time, so any batch size runs.
- `DECOMPOSITIONS` also writes fold (`aten.col2im`, which coremltools converts only with stride >= kernel; VOLO's
  outlook attention folds 3x3 windows at a smaller stride) as pads and adds of each kernel offset's columns.
- `reduce_rank`: Core ML tensors have rank <= 5, but window partitioning (Twins, Hiera) views a tensor as 6-D or
  7-D, permutes it and views it back. Each such chain is rebuilt from reshapes and permutes of rank <= 5: size-1
  dims are dropped, input dims that stay adjacent through the permute are merged, and a permute still above
  rank 5 is done as a few rank-4 block swaps. The consumers of a high-rank tensor that it rewrites: views,
  permutes, `select` / `unbind`, and one-dim reductions (`amax`, `amin`, `sum`, `mean`). Anything else keeps its
  high-rank tensor (coremltools then names it). A Linear or an elementwise op (quantize / dequantize included) on
  a high-rank tensor runs on its rank <= 5 data; a broadcasting one (MViTv2 adds its relative positions to a 6-D
  view of attention) with adjacent dims merged where every argument has both or neither.
- `batch_norms_as_affine`: an inference BatchNorm that prepare_pt2e did not fold into a conv (LeViT's and
  EfficientViT-M's Linear + BatchNorm1d) becomes a per-channel multiply and add by constants. Left as a batch norm,
  it makes convert_pt2e trace its QAT conv-BN patterns (96 small exports) that never match a PTQ graph:
  EfficientViT-M0's `vitq zoo` Core ML cell took 69 s before, 47 s after (one run each, AMD EPYC).
"""

from __future__ import annotations

import functools
import logging
import math
import operator

import numpy as np
import torch

log = logging.getLogger("vitq.coreml")

aten = torch.ops.aten
MAX_RANK = 5


# --- bicubic upsampling ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _torch_bicubic_matrix(in_size: int, out_size: int, align_corners: bool, scale: float | None) -> np.ndarray:
    """torch's own bicubic weights along one axis as an (out, in) float32 matrix: its kernel run on a one-hot basis
    (the other axis kept at size 1, where its weights are exactly (0, 1, 0, 0)), outside any tracing mode."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch._subclasses.functional_tensor import disable_functional_mode
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with unset_fake_temporarily(), disable_functional_mode(), disable_proxy_modes_tracing(), torch.no_grad():
        basis = torch.eye(in_size, dtype=torch.float32).reshape(1, in_size, in_size, 1)
        out = torch.ops.aten.upsample_bicubic2d.default(basis, [out_size, 1], align_corners, scale, None)
        return out[0, :, :, 0].T.contiguous().numpy().copy()


def bicubic_taps(in_size: int, out_size: int, align_corners: bool, scale: float | None = None):
    """(indices (4, out) int64, weights (4, out) float32) of torch's bicubic interpolation along one axis:
    output j = sum_k weights[k, j] * input[indices[k, j]]. Read from torch's kernel (its float32 source positions
    and weights, to the bit), not recomputed: at most 4 input positions per output (Keys' cubic, borders clamped)."""
    a = _torch_bicubic_matrix(int(in_size), int(out_size), bool(align_corners), None if scale is None else float(scale))
    idx = np.zeros((4, out_size), dtype=np.int64)
    wts = np.zeros((4, out_size), dtype=np.float32)
    for j in range(out_size):
        cols = np.flatnonzero(a[j])
        if len(cols) > 4:
            raise ValueError(f"bicubic {in_size}->{out_size}: output {j} reads {len(cols)} inputs, not <= 4")
        idx[: len(cols), j], wts[: len(cols), j] = cols, a[j, cols]
    return torch.from_numpy(idx), torch.from_numpy(wts)


def _resample_axis(x: torch.Tensor, dim: int, out_size: int, align_corners: bool, scale: float | None) -> torch.Tensor:
    in_size = int(x.shape[dim])
    if in_size == out_size and not align_corners and scale is None:
        return x  # torch copies the input through unchanged at the same size
    idx, wts = bicubic_taps(in_size, out_size, align_corners, scale)
    shape = [1] * x.dim()
    shape[dim] = out_size
    out = None
    for k in range(4):
        term = x.index_select(dim, idx[k]) * wts[k].to(x.dtype).reshape(shape)
        out = term if out is None else out + term
    return out


def upsample_bicubic2d(x, output_size, align_corners, scales_h=None, scales_w=None):
    """`aten.upsample_bicubic2d.default` as index_select / mul / add (width first, as torch's kernel)."""
    h, w = (int(v) for v in output_size)
    return _resample_axis(_resample_axis(x, 3, w, align_corners, scales_w), 2, h, align_corners, scales_h)


def upsample_bicubic2d_vec(x, output_size, align_corners, scale_factors):
    if output_size is None:
        output_size = [math.floor(int(x.shape[2 + i]) * scale_factors[i]) for i in range(2)]
    sh, sw = scale_factors if scale_factors is not None else (None, None)
    return upsample_bicubic2d(x, output_size, align_corners, sh, sw)


# --- fold (col2im) -------------------------------------------------------------------------------------

def col2im(x, output_size, kernel_size, dilation, padding, stride):
    """`F.fold` from pads and adds: each kernel offset's column block, spread by the stride (zeros between) and
    shifted to its offset on a canvas, summed; the canvas cropped by the padding. coremltools converts fold only
    with stride >= kernel ("Only supports stride >= kernel_size for col2im"; VOLO's outlook attention folds 3x3
    at stride 1 or 2). Same sums as torch's, to float rounding of their order."""
    import torch.nn.functional as F

    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0)
    (h, w), (kh, kw), (dh, dw), (ph, pw), (sh, sw) = (tuple(int(v) for v in a) for a in
                                                        (output_size, kernel_size, dilation, padding, stride))
    lh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    lw = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    b, c = x.shape[0], x.shape[1] // (kh * kw)
    blocks = x.reshape(b, c, kh * kw, lh, lw)
    canvas_h, canvas_w = max((lh - 1) * sh + dh * (kh - 1) + 1, ph + h), max((lw - 1) * sw + dw * (kw - 1) + 1, pw + w)
    total = None
    for k in range(kh * kw):
        i, j = divmod(k, kw)
        t = blocks[:, :, k]  # (B, C, lh, lw)
        if sw > 1:  # zeros between columns, then between rows
            t = F.pad(t.unsqueeze(-1), (0, sw - 1)).reshape(b, c, lh, lw * sw)
        if sh > 1:
            t = F.pad(t.unsqueeze(3), (0, 0, 0, sh - 1)).reshape(b, c, lh * sh, t.shape[-1])
        t = t[:, :, :(lh - 1) * sh + 1, :(lw - 1) * sw + 1]
        top, left = i * dh, j * dw
        t = F.pad(t, (left, canvas_w - left - t.shape[-1], top, canvas_h - top - t.shape[-2]))
        total = t if total is None else total + t
    out = total[:, :, ph:ph + h, pw:pw + w]
    return out.squeeze(0) if unbatched else out


DECOMPOSITIONS = {
    aten.upsample_bicubic2d.default: upsample_bicubic2d,
    aten.upsample_bicubic2d.vec: upsample_bicubic2d_vec,
    aten.col2im.default: col2im,
}


# --- batch norms left after prepare_pt2e ----------------------------------------------------------------

def batch_norms_as_affine(gm: torch.fx.GraphModule) -> int:
    """Every `_native_batch_norm_legit_no_training` in `gm` -> x * scale + shift (per channel, dim 1), in
    place; returns how many. Same arithmetic as the batch norm's, to float rounding."""
    bn = aten._native_batch_norm_legit_no_training.default
    graph, count = gm.graph, 0

    def value(node):
        return None if node is None else functools.reduce(getattr, node.target.split("."), gm).detach()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != bn:
            continue
        x, weight, bias, mean, var = (node.args[i] for i in range(5))
        eps = node.args[6]
        if not all(a is None or (isinstance(a, torch.fx.Node) and a.op == "get_attr") for a in (weight, bias)):
            continue
        if not all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in (mean, var)):
            continue
        users = list(node.users)
        if not all(u.target is operator.getitem for u in users) or any(u.args[1] != 0 and u.users for u in users):
            continue
        rank = len(x.meta["val"].shape) if isinstance(x.meta.get("val"), torch.Tensor) else None
        if rank is None or rank < 2:
            continue
        scale = torch.rsqrt(value(var) + eps)
        if weight is not None:
            scale = scale * value(weight)
        shift = -value(mean) * scale
        if bias is not None:
            shift = shift + value(bias)
        view = (-1,) + (1,) * (rank - 2)
        names = []
        for kind, t in (("scale", scale), ("shift", shift)):
            attr = f"_vitq_bn{count}_{kind}"
            gm.register_buffer(attr, t.reshape(view).contiguous())
            names.append(attr)
        with graph.inserting_before(node):
            sc, sh = graph.get_attr(names[0]), graph.get_attr(names[1])
            out = graph.call_function(aten.add.Tensor, (graph.call_function(aten.mul.Tensor, (x, sc)), sh))
        out.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        for u in users:
            if u.args[1] == 0:
                u.replace_all_uses_with(out)
            graph.erase_node(u)
        graph.erase_node(node)
        count += 1
    if count:
        graph.eliminate_dead_code()
        gm.recompile()
        log.info("coreml: %d batch norm(s) not after a conv run as a per-channel scale and shift", count)
    return count


# --- rank <= 5 ---------------------------------------------------------------------------------------------

VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
            aten.alias.default, aten.squeeze.dims, aten.squeeze.dim, aten.squeeze.default, aten.unsqueeze.default}
PERMUTE_OPS = {aten.permute.default, aten.transpose.int}
REDUCTIONS = {aten.amax.default, aten.amin.default, aten.sum.dim_IntList, aten.mean.dim}


def _elementwise_ops() -> set:
    """Shape-preserving elementwise ops that may meet a high-rank tensor (Twins applies its qkv Linear to a 6-D
    window tensor; in the W8A8 program, with a quantize / dequantize pair before it)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)

    qd = torch.ops.quantized_decomposed
    ops = {qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default, qd.quantize_per_tensor.tensor,
           qd.dequantize_per_tensor.tensor, aten.gelu.default, aten.relu.default, aten.hardswish.default,
           aten.silu.default, aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.div.Tensor,
           aten.sub.Tensor}
    return ops


def _shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
        return None  # symbolic sizes: the dynamic-batch program, which only torch runs
    return tuple(int(d) for d in val.shape)


def _rank(node) -> int:
    s = _shape(node)
    return -1 if s is None else len(s)


def _perm(node, rank: int) -> list[int]:
    if node.target == aten.transpose.int:
        a, b = (d % rank for d in node.args[1:3])
        p = list(range(rank))
        p[a], p[b] = p[b], p[a]
        return p
    return [d % rank for d in node.args[1]]


def reduced_permute(shape, perm) -> tuple[list[int], list[int]]:
    """(shape, perm) with size-1 dims dropped and input dims that stay adjacent through `perm` merged: the
    smallest permute moving the same data."""
    keep = [i for i, s in enumerate(shape) if s != 1]
    rank_of = {d: r for r, d in enumerate(keep)}
    s1 = [shape[i] for i in keep]
    p1 = [rank_of[d] for d in perm if d in rank_of]
    groups: list[list[int]] = []
    for d in p1:
        if groups and groups[-1][-1] + 1 == d:
            groups[-1].append(d)
        else:
            groups.append([d])
    by_start = sorted(range(len(groups)), key=lambda g: groups[g][0])
    merged = [math.prod(s1[d] for d in groups[g]) for g in by_start]
    position = {g: i for i, g in enumerate(by_start)}
    return merged, [position[g] for g in range(len(groups))]


def permute_steps(shape, perm) -> list[tuple[list[int], list[int]]]:
    """[(view shape, permute)] of rank <= 5 whose composition is `permute(reshape(x, shape), perm)` (logically;
    reshape the result to the permuted shape). One step where the reduced permute fits, else rank-4 block swaps."""
    s, p = reduced_permute(shape, perm)
    if len(s) <= MAX_RANK:
        return [(s, p)] if p != sorted(p) else []
    steps, cur = [], list(range(len(s)))  # cur: the reduced dims in memory order
    for pos, want in enumerate(p):
        j = cur.index(want)
        if j == pos:
            continue
        view = [math.prod(s[d] for d in cur[:pos]), math.prod(s[d] for d in cur[pos:j]), s[want],
                math.prod(s[d] for d in cur[j + 1:])]
        steps.append((view, [0, 2, 1, 3]))
        cur = cur[:pos] + [want] + cur[pos:j] + cur[j + 1:]
    return steps


class _Emitter:
    def __init__(self, graph, before):
        from torch._guards import detect_fake_mode

        self.graph, self.before = graph, before
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])

    def __call__(self, target, *args, **kwargs):
        with self.graph.inserting_before(self.before):
            node = self.graph.call_function(target, args, kwargs)
        vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*vals, **kwargs)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.before.meta:
                node.meta[key] = self.before.meta[key]
        return node

    def reshape(self, x, shape):
        if _shape(x) == tuple(int(d) for d in shape):
            return x
        return self(aten.reshape.default, x, [int(d) for d in shape])


def _broadcast_at_rank_5(node, rep, shape) -> list | None:
    """[(data, shape to view it as)] per argument of elementwise `node` (of high-rank `shape`), where merging pairs
    of adjacent dims, full in every tensor argument or 1 in it, brings them all to rank <= 5; None if no merge does.
    Arguments that are not tensors pass as (arg, None)."""
    tensors = []
    for a in node.args:
        if isinstance(a, torch.fx.Node):
            data, s = rep[a] if a in rep else (a, _shape(a))
            if s is None or len(s) > len(shape):
                return None
            tensors.append((data, [1] * (len(shape) - len(s)) + list(s)))
    out = list(shape)
    while len(out) > MAX_RANK:
        pair = next((i for i in range(len(out) - 1)
                     if all(s[i:i + 2] == out[i:i + 2] or s[i:i + 2] == [1, 1] for _, s in tensors)), None)
        if pair is None:
            return None
        out = out[:pair] + [out[pair] * out[pair + 1]] + out[pair + 2:]
        tensors = [(d, s[:pair] + [s[pair] * s[pair + 1]] + s[pair + 2:]) for d, s in tensors]
    found = iter(tensors)
    return [next(found) if isinstance(a, torch.fx.Node) else (a, None) for a in node.args]


def reduce_rank(graph) -> dict[str, int]:
    """Rewrite every chain of view / permute ops through tensors of rank > 5 (static sizes) into ops of rank <= 5,
    in place. Returns {"rewritten": high-rank nodes made dead, "left": high-rank nodes still used}."""
    rep: dict[torch.fx.Node, tuple[torch.fx.Node, tuple[int, ...]]] = {}  # high-rank node -> (rank<=5 data, shape)
    elementwise = _elementwise_ops()

    def scalar_like(a) -> bool:
        return not isinstance(a, torch.fx.Node) or (_shape(a) is not None and math.prod(_shape(a)) == 1)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        shape = _shape(node)
        if shape is not None and len(shape) > MAX_RANK:
            if node.target in VIEW_OPS and src is not None:
                if src in rep:
                    rep[node] = (rep[src][0], shape)
                elif 0 <= _rank(src) <= MAX_RANK:
                    rep[node] = (src, shape)
            elif node.target in PERMUTE_OPS and src in rep:
                data, s = rep[src]
                emit = _Emitter(graph, node)
                for view, perm in permute_steps(s, _perm(node, len(s))):
                    data = emit(aten.permute.default, emit.reshape(data, view), perm)
                rep[node] = (data, shape)
            elif node.target == aten.linear.default and src in rep:  # along the last dim: on (rows, features)
                data, s = rep[src]
                emit = _Emitter(graph, node)
                rep[node] = (emit(aten.linear.default, emit.reshape(data, (math.prod(s[:-1]), s[-1])), *node.args[1:]),
                             shape)
            elif (node.target in elementwise and src in rep and rep[src][1] == shape
                  and all(scalar_like(a) for a in node.all_input_nodes if a is not src)):
                # as (rows, last dim): a dequantize so placed feeds a following Linear directly (an int8 linear)
                emit = _Emitter(graph, node)
                rows = emit.reshape(rep[src][0], (math.prod(shape[:-1]), shape[-1]))
                rep[node] = (emit(node.target, rows, *node.args[1:], **node.kwargs), shape)
            elif node.target in elementwise and src in rep:  # broadcasting (MViTv2's rel-pos: attn + rel_h[..., None])
                operands = _broadcast_at_rank_5(node, rep, shape)
                if operands is not None:
                    emit = _Emitter(graph, node)
                    args = [emit.reshape(data, merged) if merged is not None else data for data, merged in operands]
                    rep[node] = (emit(node.target, *args, **node.kwargs), shape)
            continue
        if src not in rep:
            continue
        data, s = rep[src]
        emit = _Emitter(graph, node)
        new = None
        if node.target in VIEW_OPS and shape is not None:
            new = emit.reshape(data, shape)
        elif node.target == aten.select.int and shape is not None:
            d = node.args[1] % len(s)
            three = emit.reshape(data, (math.prod(s[:d]), s[d], math.prod(s[d + 1:])))
            new = emit.reshape(emit(aten.select.int, three, 1, node.args[2]), shape)
        elif node.target in REDUCTIONS and shape is not None and len(node.args) >= 2 and len(node.args[1]) == 1:
            d = node.args[1][0] % len(s)
            three = emit.reshape(data, (math.prod(s[:d]), s[d], math.prod(s[d + 1:])))
            new = emit.reshape(emit(node.target, three, [1], True), shape)
        elif node.target == aten.unbind.int:
            d = (node.args[1] if len(node.args) > 1 else 0) % len(s)
            three = emit.reshape(data, (math.prod(s[:d]), s[d], math.prod(s[d + 1:])))
            for user in list(node.users):
                if user.target is not operator.getitem or _shape(user) is None:
                    break
                piece = _Emitter(graph, user)
                user.replace_all_uses_with(piece.reshape(piece(aten.select.int, three, 1, user.args[1]), _shape(user)))
            continue
        if new is not None:
            node.replace_all_uses_with(new)
    graph.eliminate_dead_code()
    left = sum(1 for n in graph.nodes if n.op == "call_function" and _rank(n) > MAX_RANK)
    rewritten = len(rep)
    if rewritten:
        log.info("coreml: rank > %d: %d tensor(s) rebuilt at rank <= %d, %d left", MAX_RANK, rewritten, MAX_RANK, left)
    return {"rewritten": rewritten, "left": left}
