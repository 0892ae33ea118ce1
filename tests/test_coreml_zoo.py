"""Core ML W8A8 for timm's zoo: the rewrites that let coremltools convert what torch.export captures (bicubic
upsampling, rank-6 window partitions), each exact in float; the real models through quantize + validate (slow)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitq.tasks.targets.coreml import backend, rewrites

aten = torch.ops.aten


# --- bicubic ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,out,align", [((240, 240), (224, 224), False), ((10, 12), (7, 19), False),
                                            ((10, 12), (23, 5), True), ((14, 14), (24, 24), False)])
def test_bicubic_decomposition_matches_torch(size, out, align):
    x = torch.randn(2, 3, *size)
    want = F.interpolate(x, size=out, mode="bicubic", align_corners=align)
    got = rewrites.upsample_bicubic2d(x, out, align)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bicubic_decomposition_by_scale_factor_matches_torch():
    x = torch.randn(1, 2, 9, 11)
    want = F.interpolate(x, scale_factor=1.7, mode="bicubic", align_corners=False)
    got = rewrites.upsample_bicubic2d_vec(x, None, False, [1.7, 1.7])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _ScaledImage(nn.Module):  # CrossViT's second branch: the image resized before its patch embedding
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)

    def forward(self, x):
        return self.conv(F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False)).flatten(1)


def test_exported_programs_hold_no_bicubic_and_match_torch():
    model, x = _ScaledImage().eval(), torch.randn(3, 3, 20, 20)
    for dynamic in (False, True):
        program = backend.export_program(model, x, dynamic_batch=dynamic)
        targets = {n.target for n in program.graph.nodes}
        assert not targets & set(rewrites.DECOMPOSITIONS), targets
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_bicubic_model_converts_to_an_ml_program():
    pytest.importorskip("coremltools")
    model, x = _ScaledImage().eval(), torch.randn(1, 3, 20, 20)
    ml = backend.convert(backend.export_program(model, x))
    assert len(ml.get_spec().description.output) == 1


# --- fold ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,kernel,dilation,padding,stride", [((14, 14), 3, 1, 1, 1), ((13, 11), 3, 1, 1, 2),
                                                                  ((8, 9), 2, 1, 0, 2), ((10, 10), 3, 2, 2, 1)])
def test_fold_decomposition_matches_torch(size, kernel, dilation, padding, stride):
    (h, w), k, d, p, s = size, kernel, dilation, padding, stride
    blocks = ((h + 2 * p - d * (k - 1) - 1) // s + 1) * ((w + 2 * p - d * (k - 1) - 1) // s + 1)
    x = torch.randn(2, 4 * k * k, blocks)
    want = F.fold(x, size, k, dilation=d, padding=p, stride=s)
    torch.testing.assert_close(rewrites.col2im(x, size, (k, k), (d, d), (p, p), (s, s)), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(rewrites.col2im(x[0], size, (k, k), (d, d), (p, p), (s, s)), want[0], rtol=0, atol=1e-6)


class _Outlook(nn.Module):
    """VOLO's outlook attention, shortened: unfold 3x3 windows at stride 2, weight them, fold them back."""

    def forward(self, x):
        cols = F.unfold(x, 3, padding=1, stride=2)
        return F.fold(cols * cols.sigmoid(), x.shape[-2:], 3, padding=1, stride=2)


def test_fold_below_its_kernel_stride_converts_and_matches():
    pytest.importorskip("coremltools")
    x = torch.randn(1, 4, 14, 14)
    program = backend.export_program(_Outlook().eval(), x)
    assert not any(n.target == torch.ops.aten.col2im.default for n in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), _Outlook()(x), rtol=0, atol=1e-5)
    backend.convert(program)


class _PatchThenPosition(nn.Module):
    """VOLO's stem: a conv patch embedding, permuted to (B, H, W, C), plus a position embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 4, 4, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head((self.embed(x).permute(0, 2, 3, 1) + self.pos).flatten(1, 2)).mean(1)


def test_w8a8_conv_then_transpose_then_add_converts(tmp_path):
    """coremltools' fuse_conv_bias crashed on an int8 conv -> transpose -> add (VOLO-D1's Core ML cell)."""
    pytest.importorskip("coremltools")
    model = _PatchThenPosition().eval()
    x = torch.randn(4, 3, 16, 16)
    converted, report = backend.quantize_pt2e(model, [x], activations=True)
    assert "embed" in report.quantized
    import tempfile
    from pathlib import Path

    before = set(Path(tempfile.gettempdir()).glob("tmp*.mlpackage"))
    backend.convert(backend.export_program(converted, x[:1]), save_to=tmp_path / "m.mlpackage")
    assert (tmp_path / "m.mlpackage").is_dir()
    assert set(Path(tempfile.gettempdir()).glob("tmp*.mlpackage")) <= before, "coremltools' temporary packages left"


# --- rank <= 5 ----------------------------------------------------------------------------------------------

class _WindowPartition(nn.Module):
    """Twins / Swin-style: (B, H, W, C) -> windows via a 6-D view and permute, attention-like qkv split through
    a 6-D permute and unbind, a 6-D view reduced by amax (Hiera's max-pool), and back."""

    def __init__(self, ws: int = 2, heads: int = 2, c: int = 8):
        super().__init__()
        self.ws, self.heads = ws, heads
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, x):  # (B, H, W, C)
        b, h, w, c = x.shape
        ws = self.ws
        win = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(2, 3)  # B, h', w', ws, ws, C
        qkv = self.qkv(win)  # Twins: a Linear on the 6-D window tensor
        qkv = qkv.reshape(b, -1, ws * ws, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)  # each (B, nW, heads, ws*ws, d): rank 5
        y = (q.softmax(-1) * k + v)
        pooled = y.reshape(b, y.shape[1], self.heads, 2, -1, c // self.heads).amax(dim=3)
        back = y.permute(0, 1, 3, 2, 4).reshape(b, h // ws, w // ws, ws, ws, c)
        back = back.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        # Hiera's Unroll: a permute of rank 6 with no two dims that stay adjacent
        un = back.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 2, 4, 1, 3, 5).reshape(b * 4, h // 2, w // 2, c)
        return un.flatten(1) + 0, pooled.flatten(1)


def _max_rank(program) -> int:
    return max((len(n.meta["val"].shape) for n in program.graph.nodes
                if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)), default=0)


def test_window_partition_is_rebuilt_at_rank_5_and_exact():
    model = _WindowPartition().eval()
    for b in (1, 2):
        x = torch.randn(b, 4, 8, 8)
        before = torch.export.export(model, (x,)).run_decompositions({})
        assert _max_rank(before) == 6
        program = backend.export_program(model, x)
        assert _max_rank(program) <= 5
        for got, want in zip(program.module()(x), model(x)):
            assert torch.equal(got, want)  # reshapes and permutes only: bit-exact


def test_window_partition_converts_to_an_ml_program():
    pytest.importorskip("coremltools")
    model = _WindowPartition().eval()
    ml = backend.convert(backend.export_program(model, torch.randn(2, 4, 8, 8)), output_names=("a", "b"))
    assert [o.name for o in ml.get_spec().description.output] == ["a", "b"]


def test_w8a8_window_partition_keeps_its_int8_linear_at_rank_5(tmp_path):
    pytest.importorskip("coremltools")
    model = _WindowPartition().eval()
    x = torch.randn(4, 4, 8, 8)
    converted, report = backend.quantize_pt2e(model, [x], activations=True)
    assert "qkv" in report.quantized
    program = backend.export_program(converted, x[:1])
    assert _max_rank(program) <= 5
    for got, want in zip(program.module()(x[:1]), converted(x[:1])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    backend.convert(program, output_names=("a", "b")).save(str(tmp_path / "m.mlpackage"))
    rows = backend.coverage(backend.load_program(tmp_path / "m.mlpackage"), backend.program_layer_names(program))
    linear = [r for r in rows if r.op_type == "linear"]
    assert [r.layer for r in linear] == ["qkv"] and linear[0].activation_quantized and linear[0].int8_weight


class _LinearBN(nn.Module):
    """LeViT's LinearNorm: a Linear then a BatchNorm1d over its features (no conv for prepare_pt2e to fold into)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 2, 2)
        self.bn0 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, c)
        self.bn = nn.BatchNorm1d(c)
        for bn in (self.bn0, self.bn):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
            bn.bias.data.uniform_(-1, 1)

    def forward(self, x):
        t = self.bn0(self.conv(x)).flatten(2).transpose(1, 2)  # (B, N, C)
        return self.bn(self.fc(t).flatten(0, 1)).reshape(t.shape)


def test_batch_norms_not_after_a_conv_become_scale_and_shift():
    bn = torch.ops.aten._native_batch_norm_legit_no_training.default
    model = _LinearBN().eval()
    x = torch.randn(4, 3, 8, 8)
    program = torch.export.export(model, (x,)).run_decompositions({}).module()
    want = program(x)
    assert rewrites.batch_norms_as_affine(program) == 2
    assert not any(n.target == bn for n in program.graph.nodes)
    torch.testing.assert_close(program(x), want, rtol=1e-5, atol=1e-5)
    converted, report = backend.quantize_pt2e(model, [x], activations=True)
    assert not any(n.target == bn for n in converted.graph.nodes) and "fc" in report.quantized


class _RelPos(nn.Module):
    """MViTv2's decomposed relative positions: attention viewed 6-D, plus per-row and per-column terms broadcast
    along the last two dims, viewed back."""

    def forward(self, attn, rel_h, rel_w):  # (B, heads, qh*qw, kh*kw), (B, heads, qh, qw, kh), (.., kw)
        b, h, qh, qw, kh = rel_h.shape
        kw = rel_w.shape[-1]
        a = attn.view(b, h, qh, qw, kh, kw) + rel_h[:, :, :, :, :, None] + rel_w[:, :, :, :, None, :]
        return a.view(b, h, qh * qw, kh * kw).softmax(-1)


def test_broadcast_adds_on_a_6d_view_run_at_rank_5_and_exact():
    pytest.importorskip("coremltools")
    args = (torch.randn(2, 3, 4 * 5, 2 * 3), torch.randn(2, 3, 4, 5, 2), torch.randn(2, 3, 4, 5, 3))

    class Wrap(nn.Module):  # export_program takes one input
        def forward(self, x):
            return _RelPos()(x[..., :6].reshape(2, 3, 20, 6), x[..., 6:8].reshape(2, 3, 4, 5, 2),
                             x[..., 8:].reshape(2, 3, 4, 5, 3))

    x = torch.cat([a.reshape(2, 3, 20, -1) for a in args], -1)
    program = backend.export_program(Wrap().eval(), x)
    assert _max_rank(program) <= 5
    assert torch.equal(program.module()(x), _RelPos()(*args))
    backend.convert(program)


class _DepthToSpace(nn.Module):
    """A dense head's last op: per-patch pixels back to an image through a rank-6 view and permute, returned as
    is (the rewritten node is the program's output)."""

    def __init__(self, c: int = 8, outputs: int = 3, patch: int = 2):
        super().__init__()
        self.outputs, self.patch = outputs, patch
        self.head = nn.Linear(c, outputs * patch * patch)

    def forward(self, x):  # (B, gh, gw, C)
        n, gh, gw, _ = x.shape
        y = self.head(x).reshape(n, gh, gw, self.outputs, self.patch, self.patch)
        return y.permute(0, 3, 1, 4, 2, 5).reshape(n, self.outputs, gh * self.patch, gw * self.patch)


def test_a_rewritten_output_keeps_its_name_and_converts(tmp_path):
    pytest.importorskip("coremltools")
    model = _DepthToSpace().eval()
    x = torch.randn(1, 4, 4, 8)
    program = backend.export_program(model, x)
    assert _max_rank(program) <= 5
    returned = program.graph_module.graph.output_node().args[0]
    assert [s.arg.name for s in program.graph_signature.output_specs] == [n.name for n in returned]
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-6)
    ml = backend.convert(program, output_name="masks")
    assert [o.name for o in ml.get_spec().description.output] == ["masks"]


@pytest.mark.parametrize("shape,perm", [((2, 3, 4, 5, 6, 7), (0, 2, 4, 1, 3, 5)), ((2, 3, 4, 5, 6, 7), (5, 4, 3, 2, 1, 0)),
                                        ((2, 3, 1, 5, 2, 7, 3), (3, 0, 4, 2, 1, 5, 6)), ((2, 3, 4, 5, 6, 7), (3, 0, 1, 4, 2, 5))])
def test_permute_steps_compose_to_the_permute(shape, perm):
    x = torch.arange(math.prod(shape)).reshape(shape)
    want = x.permute(perm)
    data = x.reshape(-1)
    steps = rewrites.permute_steps(shape, perm)
    for view, p in steps:
        assert len(view) <= 5
        data = data.reshape(view).permute(p)
    assert torch.equal(data.reshape(want.shape), want)


# --- the quantizer ---------------------------------------------------------------------------------------------

class _PositionalScores(nn.Module):
    """ConViT's GPSA in miniature: a Linear on a fixed relative-position table (|x| up to ~100, expanded to the
    batch), softmaxed into attention weights; and a branch whose activations are ~1e-4 (untrained BatchNorm)."""

    def __init__(self, n: int = 16):
        super().__init__()
        side = int(n ** 0.5)
        ij = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(n, 2).float()
        d = ij[None, :, :] - ij[:, None, :]
        self.register_buffer("rel", torch.cat([d, (d ** 2).sum(-1, keepdim=True)], -1) * 4)  # (n, n, 3)
        self.pos_proj = nn.Linear(3, 2)
        self.tiny = nn.Linear(8, 8)
        with torch.no_grad():
            self.pos_proj.weight.copy_(torch.tensor([[0.5, 0.5, -1.0], [-0.5, 0.2, -0.8]]))

    def forward(self, x):  # (B, n, 8)
        pos = self.pos_proj(self.rel.expand(x.shape[0], -1, -1, -1)).permute(0, 3, 1, 2).softmax(-1)  # B, 2, n, n
        y = (pos @ x[:, None].expand(-1, 2, -1, -1)).sum(1)
        return y + self.tiny(y * 1e-4)


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()))


def test_ops_on_constants_stay_float():
    torch.manual_seed(0)
    model = _PositionalScores().eval()
    x = torch.randn(8, 16, 8)
    converted, report = backend.quantize_pt2e(model, [x], activations=True)
    assert report.constant == ["pos_proj"] and "pos_proj" not in report.quantized
    assert "tiny" in report.quantized
    # int8 pos_proj: logits up to ~100 off by ~0.5 after softmax: under 15 dB
    assert _sqnr(model(x), converted(x)) > 30, _sqnr(model(x), converted(x))


def test_coverage_names_survive_ops_folded_into_constants(tmp_path):
    pytest.importorskip("coremltools")
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8)
    converted, _ = backend.quantize_pt2e(_PositionalScores().eval(), [x], activations=True)
    program = backend.export_program(converted, x[:1])
    backend.convert(program).save(str(tmp_path / "m.mlpackage"))
    rows = backend.coverage(backend.load_program(tmp_path / "m.mlpackage"), backend.program_layer_names(program))
    assert [r.layer for r in rows if r.op_type == "linear"] == ["tiny"]  # pos_proj folded: not a MIL op name


def test_tiny_activations_keep_their_int8_levels():
    """Inputs with |x| ~ 3e-4 (untrained BatchNorm statistics): the former 2**-14 scale floor gave them ~6 levels."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8).eval()
    y = torch.randn(64, 8) * 1e-4
    q, _ = backend.quantize_pt2e(nn.Sequential(lin).eval(), [y], activations=True)
    assert _sqnr(lin(y) - lin.bias, q(y) - lin.bias) > 30


# --- the zoo (slow) -------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["crossvit_tiny_240"])  # bicubic; the scale floor: the zoo's CI slice (LeViT, EfficientViT-M)
def test_zoo_model_through_coreml_w8a8(name, tmp_path):
    timm = pytest.importorskip("timm")
    pytest.importorskip("coremltools")
    import vitq

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    rng = np.random.default_rng(0)
    x, x_val = (rng.standard_normal((n, c, h, w)).astype(np.float32) for n in (16, 32))
    variant = vitq.quantize(model, "coreml-w8a8", calibration=x, workdir=tmp_path)
    assert variant.artifact.int8_weight_fraction > 0.9
    result = variant.validate(x_val)
    assert result.metrics.sqnr_db > 15, result.metrics
