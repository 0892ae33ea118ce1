"""Models vitq adds to timm's registry, so every model is created the same way: `timm.create_model(name)`."""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

default_cfgs = generate_default_cfgs(
    {
        # The embedded default: a small ViT for scikit-learn's digits, upsampled to 32x32 grayscale.
        "vit_digits_patch4_32.untrained": {
            "input_size": (1, 32, 32),
            "mean": (0.5,),
            "std": (0.5,),
            "num_classes": 10,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        }
    }
)


@register_model
def vit_digits_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT, 32x32 grayscale input, 4x4 patches (64 tokens), 4 blocks of width 64, mean-pooled tokens."""
    args = dict(
        img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
        class_token=False, global_pool="avg",
    )
    return build_model_with_cfg(
        VisionTransformer, "vit_digits_patch4_32", pretrained,
        pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs),
    )


class FeatureMap(torch.nn.Module):
    """A timm model whose output is its `forward_features` map (N, C, H, W): a dense-output case."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.pretrained_cfg = model.pretrained_cfg  # timm's data config (input size, mean, std) still resolves

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


@register_model
def efficientvit_b0_features(pretrained: bool = False, **kwargs) -> FeatureMap:
    """timm `efficientvit_b0` (MIT EfficientViT-B0) returning `forward_features`: (N, 128, H/32, W/32)."""
    import timm

    return FeatureMap(timm.create_model("efficientvit_b0", pretrained=pretrained, **kwargs))
