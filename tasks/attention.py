"""Attention in a form quantizers can see: explicit projections and an explicit q @ k^T / softmax / @ v.

`nn.MultiheadAttention` keeps its projections as bare parameters (`in_proj_weight`) and, in eval,
runs a fused kernel (`scaled_dot_product_attention` or `_native_multi_head_attention`): nothing in
it is an `nn.Linear` or a matmul a quantizer can annotate, which is why coremltools' W8A8 leaves
torchvision's ViT attention in FP16. `rewrite_attention` replaces every such module by
`ExplicitMultiheadAttention` (same weights, same outputs) and switches timm's fused attention to its
explicit path, so every projection is a Linear and both attention matmuls are visible.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("vitq.attention")


class ExplicitMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention` (eval semantics) with q/k/v/out as `nn.Linear` and attention as matmuls.

    Same call signature and outputs as the module it replaces: `(query, key, value, key_padding_mask,
    need_weights, attn_mask, average_attn_weights, is_causal)` -> `(output, weights | None)`.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError("add_bias_kv / add_zero_attn")
        e, h = mha.embed_dim, mha.num_heads
        self.embed_dim, self.num_heads, self.head_dim = e, h, e // h
        self.batch_first = mha.batch_first
        has_bias = mha.in_proj_bias is not None
        self.q_proj = nn.Linear(e, e, bias=has_bias)
        self.k_proj = nn.Linear(mha.kdim, e, bias=has_bias)
        self.v_proj = nn.Linear(mha.vdim, e, bias=has_bias)
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for lin, w in ((self.q_proj, wq), (self.k_proj, wk), (self.v_proj, wv)):
                lin.weight.copy_(w)
            if has_bias:
                for lin, b in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_bias.chunk(3)):
                    lin.bias.copy_(b)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.train(mha.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, E) -> (B, H, L, D)
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2  # (L, E): one sequence
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, lq, _ = query.shape
        lk = key.shape[1]
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask.reshape(b, self.num_heads, lq, lk) if attn_mask.dim() == 3 else attn_mask
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(b, 1, 1, lk)
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        weights = F.softmax(scores, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, lq, self.embed_dim)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        w = weights.mean(dim=1) if average_attn_weights else weights
        return out, (w.squeeze(0) if unbatched else w)


def rewrite_attention(model: nn.Module) -> dict[str, list[str]]:
    """Make attention explicit in place; returns the module names rewritten, switched, and left as they were.

    - `nn.MultiheadAttention` -> `ExplicitMultiheadAttention` ("rewritten")
    - timm attention with a `fused_attn` switch -> its explicit matmul path ("unfused")
    - anything it cannot rewrite is listed under "unsupported" with the reason, never skipped silently
    """
    done: dict[str, list[str]] = {"rewritten": [], "unfused": [], "unsupported": []}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            try:
                new = ExplicitMultiheadAttention(module)
            except NotImplementedError as exc:
                done["unsupported"].append(f"{name}: nn.MultiheadAttention with {exc} is kept as is")
                continue
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            done["rewritten"].append(name)
        elif isinstance(getattr(module, "fused_attn", None), bool):
            if module.fused_attn:
                module.fused_attn = False
                done["unfused"].append(name)
    for kind, names in done.items():
        if names:
            log.info("attention: %s %d module(s)%s", kind, len(names), "" if kind != "unsupported" else f": {names}")
    return done
