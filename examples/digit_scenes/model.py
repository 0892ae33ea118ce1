"""A small SAM-style segmenter: a ViT image encoder and SAM's mask decoder, one mask per digit class.

The structure follows Segment Anything (Kirillov et al., 2023; `segment_anything/modeling`): a plain
ViT encoder (timm's patch embedding and transformer blocks: LayerNorm -> Linear, as in SAM's
encoder) with SAM's convolutional neck; a two-way transformer where learned mask tokens attend to
the image embedding and the embedding attends back; two stride-2 transposed convolutions that
upscale the embedding 4x; and a per-token MLP ("hypernetwork") whose output is dotted with every
upscaled pixel. There is no prompt encoder: the 10 mask tokens stand for the 10 digit classes, and
output k holds the logits of the mask of digit k. With 4x4 patches the 4x upscale returns the input
resolution, so the output is (N, 10, H, W) mask logits (a pixel is in mask k where logit k > 0).
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d, Mlp, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn
from torch.nn import functional as F

MEAN, STD = (0.5,), (0.5,)  # input normalisation: (image / 255 - MEAN) / STD, per channel


class Attention(nn.Module):
    """SAM's decoder attention: separate q/k/v projections (queries and keys may differ), an
    internal width of `dim // downsample` for the cheaper cross-attention."""

    def __init__(self, dim: int, num_heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        assert inner % num_heads == 0, "the inner width must split evenly between heads"
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, heads, N, C/heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, heads, Nq, Nk)
        out = attn.softmax(dim=-1) @ v  # (B, heads, Nq, C/heads)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TwoWayBlock(nn.Module):
    """SAM's TwoWayAttentionBlock: token self-attention, tokens -> image, MLP, image -> tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, act_layer=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample=2)
        self.skip_first_pe = skip_first_pe  # the first block's tokens replace (not add to) their attention

    def forward(self, tokens, image, token_pe, image_pe):
        # tokens (B, K, C), image (B, h*w, C); *_pe: positional encodings of the same shapes
        if self.skip_first_pe:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)
        q, k = tokens + token_pe, image + image_pe
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(q, k, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        q, k = tokens + token_pe, image + image_pe
        image = self.norm4(image + self.cross_attn_image_to_token(k, q, tokens))
        return tokens, image


class MaskDecoder(nn.Module):
    """SAM's mask decoder without prompts: `num_masks` learned tokens, each yielding one mask."""

    def __init__(self, dim: int, grid: int, num_masks: int, depth: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.mask_tokens = nn.Embedding(num_masks, dim)
        self.image_pe = nn.Parameter(torch.zeros(1, grid * grid, dim))  # learned (SAM: random Fourier features)
        trunc_normal_(self.image_pe, std=0.02)
        self.layers = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_dim, skip_first_pe=i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample=2)
        self.norm_final = nn.LayerNorm(dim)
        self.output_upscaling = nn.Sequential(  # (B, C, h, w) -> (B, C/8, 4h, 4w)
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        # One 3-layer MLP per mask token (SAM's output_hypernetworks_mlps).
        self.output_hypernetworks_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim // 8))
            for _ in range(num_masks)
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        b, c, h, w = embedding.shape
        token_pe = self.mask_tokens.weight.unsqueeze(0).expand(b, -1, -1)  # (B, K, C)
        tokens = token_pe
        image = embedding.flatten(2).transpose(1, 2)  # (B, h*w, C)
        image_pe = self.image_pe.expand(b, -1, -1)
        for layer in self.layers:
            tokens, image = layer(tokens, image, token_pe, image_pe)
        q, k = tokens + token_pe, image + image_pe
        tokens = self.norm_final(tokens + self.final_attn_token_to_image(q, k, image))
        upscaled = self.output_upscaling(image.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        hyper = torch.stack([mlp(tokens[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        masks = hyper @ upscaled.flatten(2)  # (B, K, C/8) @ (B, C/8, 16hw) -> (B, K, 16hw)
        return masks.reshape(b, -1, 4 * h, 4 * w)


class DigitSAM(nn.Module):
    """ViT encoder + SAM-style mask decoder: images (N, C, S, S) -> mask logits (N, num_masks, S, S)."""

    def __init__(self, img_size: int = 48, in_chans: int = 1, patch_size: int = 4, embed_dim: int = 64,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0, decoder_dim: int = 64,
                 decoder_depth: int = 2, decoder_heads: int = 4, decoder_mlp_dim: int = 128, num_masks: int = 10,
                 conv_stem: bool = True):
        super().__init__()
        if img_size % patch_size or patch_size != 4:
            raise ValueError(f"img_size {img_size} with patch_size {patch_size}: the decoder's 4x upscale needs "
                             "patch_size 4 and an img_size divisible by it")
        grid = img_size // patch_size
        self.grid = grid
        if conv_stem:  # two stride-2 3x3 convs (Xiao et al., 2021: early convolutions help ViTs train)
            self.patch_embed = ConvStem(in_chans, depth=3, channels=(embed_dim // 4, embed_dim // 2, embed_dim), stride=(2, 2, 1))
        else:
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, flatten=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)))
        self.neck = nn.Sequential(  # SAM's neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d
            nn.Conv2d(embed_dim, decoder_dim, 1, bias=False),
            LayerNorm2d(decoder_dim),
            nn.Conv2d(decoder_dim, decoder_dim, 3, padding=1, bias=False),
            LayerNorm2d(decoder_dim),
        )
        self.blocks.apply(self._init)  # timm's ViT init for the encoder; the decoder keeps torch's default, as SAM's
        self.mask_decoder = MaskDecoder(decoder_dim, grid, num_masks, decoder_depth, decoder_heads, decoder_mlp_dim)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        tokens = self.blocks(self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed)  # (B, grid*grid, C)
        embedding = self.neck(tokens.transpose(1, 2).reshape(b, -1, self.grid, self.grid))  # (B, C', grid, grid)
        return self.mask_decoder(embedding)


def build(**kwargs) -> DigitSAM:
    """The factory named in params.yaml (`model.factory: model.py:build`); keyword arguments: `model.arch`."""
    return DigitSAM(**kwargs)


def mask_loss(logits: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """SAM's mask loss: 20 x focal (a BCE that down-weights the many easy background pixels) over every mask +
    dice over the masks present in the image (an absent mask's dice would only push every logit down).
    `logits` (N, K, H, W); `target` (N, K, H, W) in {0, 1}; `ignore` (N, H, W) bool, pixels left out."""
    from torchvision.ops import sigmoid_focal_loss

    keep = torch.ones_like(target) if ignore is None else (~ignore).unsqueeze(1).expand_as(target).float()
    focal = (sigmoid_focal_loss(logits, target, reduction="none") * keep).sum() / keep.sum()
    prob, truth = (logits.sigmoid() * keep).flatten(2), (target * keep).flatten(2)
    dice = 1 - (2 * (prob * truth).sum(-1) + 1) / (prob.sum(-1) + truth.sum(-1) + 1)  # (N, K)
    present = truth.sum(-1) > 0
    return 20 * focal + dice[present].sum() / present.sum().clamp_min(1)
