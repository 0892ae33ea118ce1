"""The explicit attention rewrite is the same function as nn.MultiheadAttention (eval)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitq.tasks.attention import ExplicitMultiheadAttention, rewrite_attention


def _pair(**kw) -> tuple[nn.MultiheadAttention, ExplicitMultiheadAttention]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(**kw).eval()
    with torch.no_grad():  # non-zero biases, so a misplaced bias would show
        for p in mha.parameters():
            if p.dim() == 1:
                p.normal_()
    return mha, ExplicitMultiheadAttention(mha).eval()


CASES = [
    dict(embed_dim=32, num_heads=4, batch_first=True),
    dict(embed_dim=32, num_heads=4, batch_first=False),
    dict(embed_dim=24, num_heads=3, batch_first=True, bias=False),
    dict(embed_dim=32, num_heads=2, batch_first=True, kdim=16, vdim=8),
    dict(embed_dim=16, num_heads=1, batch_first=False, dropout=0.5),  # dropout is inactive in eval
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("lq,lk,b", [(7, 7, 3), (5, 9, 2), (1, 4, 1)])
@pytest.mark.parametrize("mask", ["none", "bool_attn", "float_attn", "3d_attn", "key_padding", "causal"])
def test_rewrite_matches_multihead_attention(kw, lq, lk, b, mask):
    mha, explicit = _pair(**kw)
    e, h = kw["embed_dim"], kw["num_heads"]
    kd, vd = kw.get("kdim", e), kw.get("vdim", e)
    g = torch.Generator().manual_seed(lq * 100 + lk)
    shape = (lambda L, d: (b, L, d)) if kw["batch_first"] else (lambda L, d: (L, b, d))
    lk = lq if mask == "causal" else lk
    q = torch.randn(*shape(lq, e), generator=g)
    k = torch.randn(*shape(lk, kd), generator=g)
    v = torch.randn(*shape(lk, vd), generator=g)
    if lq == lk and kd == vd == e:
        k = v = q  # self-attention, as in a ViT
    kwargs = {}
    if mask == "bool_attn":
        m = torch.rand(lq, lk, generator=g) > 0.7
        m[:, 0] = False  # no fully masked rows (NaN in both)
        kwargs["attn_mask"] = m
    elif mask == "float_attn":
        kwargs["attn_mask"] = torch.randn(lq, lk, generator=g)
    elif mask == "3d_attn":
        kwargs["attn_mask"] = torch.randn(b * h, lq, lk, generator=g)
    elif mask == "key_padding":
        m = torch.zeros(b, lk, dtype=torch.bool)
        m[:, lk // 2 + 1 :] = True
        kwargs["key_padding_mask"] = m
    elif mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(lq)
        kwargs["is_causal"] = True
    with torch.no_grad():
        for need_weights, average in ((False, True), (True, True), (True, False)):
            ref_out, ref_w = mha(q, k, v, need_weights=need_weights, average_attn_weights=average, **kwargs)
            out, w = explicit(q, k, v, need_weights=need_weights, average_attn_weights=average, **kwargs)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
            if need_weights:
                torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
            else:
                assert w is None and ref_w is None


def test_rewrite_unbatched_input():
    mha, explicit = _pair(embed_dim=16, num_heads=2, batch_first=True)
    x = torch.randn(6, 16)
    with torch.no_grad():
        torch.testing.assert_close(explicit(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-5)


def test_rewrite_whole_torchvision_vit_and_reports_what_it_did():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        done = rewrite_attention(model)
        out = model(x)
    assert done["rewritten"] == ["encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.self_attention"]
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_rewrite_reports_unsupported_and_unfuses_timm():
    import timm

    model = nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    done = rewrite_attention(model)
    assert done["rewritten"] == [] and "add_bias_kv" in done["unsupported"][0]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = vit(x)
        done = rewrite_attention(vit)
        torch.testing.assert_close(vit(x), ref, rtol=1e-5, atol=1e-5)
    assert done["unfused"] == ["blocks.0.attn", "blocks.1.attn"]
