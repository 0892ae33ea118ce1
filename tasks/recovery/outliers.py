"""The hard case: activation outliers put into a trained ViT by a function-preserving transform.

A few output channels of a LayerNorm are scaled up (its scale and shift multiplied by f_j) and the
matching input columns of the Linear it feeds are divided by f_j: the FP32 function is unchanged,
but the Linear's input now has a few channels `ratio` times larger than all the others, as trained
ViTs do. A per-tensor int8 activation scale then spends its range on those channels and rounds
the rest to almost nothing. f_j is chosen from calibration data so that channel j's |max| becomes
`ratio` times the largest |max| of the untouched channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vitq.tasks.recovery.simulate import input_amax


@dataclass(frozen=True)
class OutlierSpec:
    pairs: tuple[tuple[str, str], ...] = (("blocks.0.norm1", "blocks.0.attn.qkv"),)  # (LayerNorm, Linear)
    channels: int = 3  # outlier channels per LayerNorm
    ratio: float = 100.0  # outlier |max| / largest |max| of the other channels
    seed: int = 0  # which channels
    factors: dict = field(default_factory=dict)  # filled by inject_outliers: Linear -> {channel: factor}


@torch.no_grad()
def inject_outliers(model: nn.Module, x: np.ndarray, spec: OutlierSpec = OutlierSpec()) -> OutlierSpec:
    """Apply the transform to `model` in place (statistics from images `x`); return the spec with factors."""
    modules = dict(model.named_modules())
    for norm, lin in spec.pairs:
        if not isinstance(modules.get(norm), nn.LayerNorm) or not isinstance(modules.get(lin), nn.Linear):
            raise ValueError(f"outlier pair ({norm!r}, {lin!r}) must name a LayerNorm and the Linear it feeds")
    chan = input_amax(model, [lin for _, lin in spec.pairs], x, per_channel=True)
    factors = {}
    rng = np.random.default_rng(spec.seed)
    for norm, lin in spec.pairs:
        a = chan[lin]
        idx = torch.as_tensor(np.sort(rng.choice(len(a), spec.channels, replace=False)))
        rest = torch.ones_like(a, dtype=torch.bool)
        rest[idx] = False
        f = spec.ratio * a[rest].max() / a[idx].clamp_min(1e-6)
        modules[norm].weight[idx] *= f
        if modules[norm].bias is not None:
            modules[norm].bias[idx] *= f
        modules[lin].weight[:, idx] /= f
        factors[lin] = {int(i): round(float(v), 3) for i, v in zip(idx, f)}
    return OutlierSpec(pairs=spec.pairs, channels=spec.channels, ratio=spec.ratio, seed=spec.seed, factors=factors)
