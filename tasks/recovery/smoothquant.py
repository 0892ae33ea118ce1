"""SmoothQuant (Xiao et al., 2023) for LayerNorm -> Linear pairs, applied to the torch model.

Per input channel j of the Linear: s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha). The LayerNorm's
scale and shift are divided by s (its output channel j shrinks by s_j) and the Linear's input
columns multiplied by s: the product is unchanged in exact arithmetic, but the activation's outlier
channels move into the weight, which is quantized per output channel and absorbs them. The pairs
are every block's norm1 -> attn.qkv and norm2 -> mlp.fc1 (where the norm feeds that Linear only).

alpha is searched per model: each candidate is simulated in W8A8 (min/max ranges of the calibration
images, the torch simulation of the Q/DQ scheme) and the one whose logits are closest to FP32's (highest
SQNR) on the judging images (the held-out ones, where given; else the calibration images) wins. The smoothed model is plain torch (same architecture, new weights), so the ONNX
export and the Core ML converter take it as they take the original.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vitq.tasks._progress import Progress
from vitq.tasks.recovery.simulate import QuantSim, input_amax, quantizable_modules

log = logging.getLogger("vitq.recovery")


@dataclass(frozen=True)
class SmoothQuantResult:
    alpha: float
    pairs: list[tuple[str, str]]  # (LayerNorm, Linear) module names
    sqnr_db_by_alpha: dict[str, float]  # candidate -> W8A8 logits SQNR on the calibration images
    unsmoothed_sqnr_db: float  # the same simulation without smoothing


def smoothing_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(LayerNorm, Linear) module names where the norm's output goes to that Linear only."""
    pairs = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        for norm_attr, owner_attr, lin_attr in (("norm1", "attn", "qkv"), ("norm2", "mlp", "fc1")):
            norm, owner = getattr(m, norm_attr, None), getattr(m, owner_attr, None)
            lin = getattr(owner, lin_attr, None) if owner is not None else None
            if not (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and isinstance(lin, nn.Linear)):
                continue
            if getattr(owner, "gate", None) is not None:  # a gated attention reads the norm's output twice
                continue
            pairs.append((f"{prefix}{norm_attr}", f"{prefix}{owner_attr}.{lin_attr}"))
    return pairs


@torch.no_grad()
def smoothing_scales(model: nn.Module, pairs, act_channel_amax: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Linear name -> s (in_features,): max|X_j|^alpha / max|W_:,j|^(1 - alpha)."""
    modules = dict(model.named_modules())
    scales = {}
    for _, lin_name in pairs:
        lin = modules[lin_name]
        a = act_channel_amax[lin_name].to(lin.weight.dtype).clamp_min(1e-5)
        w = lin.weight.abs().amax(0).clamp_min(1e-5)  # per input channel
        scales[lin_name] = (a.pow(alpha) / w.pow(1 - alpha)).clamp_min(1e-5)
    return scales


@torch.no_grad()
def smooth(model: nn.Module, pairs, act_channel_amax: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Apply SmoothQuant in place. `act_channel_amax`: Linear name -> (in_features,) max|X_j|. Returns the scales."""
    modules = dict(model.named_modules())
    scales = smoothing_scales(model, pairs, act_channel_amax, alpha)
    for norm_name, lin_name in pairs:
        norm, lin, s = modules[norm_name], modules[lin_name], scales[lin_name]
        norm.weight.div_(s)
        if norm.bias is not None:
            norm.bias.div_(s)
        lin.weight.mul_(s)
    return scales


def smoothed_ranges(amax: dict[str, float], act_channel_amax: dict[str, torch.Tensor],
                    scales: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every layer's input |max| after smoothing with `scales`, from the unsmoothed ranges: a paired Linear's
    input channel j is divided by s_j (max_j(max|X_j| / s_j)); every other layer's input is unchanged."""
    return {**amax, **{lin: float((act_channel_amax[lin] / s).max()) for lin, s in scales.items()}}


def _simulated_sqnr(model: nn.Module, act_amax: dict[str, float], x_judge: np.ndarray, ref: np.ndarray, batch_size: int) -> float:
    """W8A8 logits SQNR vs FP32's `ref` on `x_judge`, with the activation ranges `act_amax` (layer -> |max|)."""
    from vitq.tasks.model import predict
    from vitq.tasks.validate import compare_outputs

    sim = QuantSim(model, act_amax).quantize_all()
    try:
        out = predict(model, x_judge, batch_size)
    finally:
        sim.remove()
    return compare_outputs(ref, out, None, None).sqnr_db


def _paired_statistics(model: nn.Module, chan: dict, pairs, owners: dict) -> tuple[dict, list]:
    """Per-channel |max| of each paired Linear's input. A Linear its owner calls functionally (torchvision's Swin:
    `F.linear(x, self.qkv.weight, ...)` inside the attention, so no hook on the Linear fires) takes its owner's
    input's: the same channels (the windows are pads, shifts and reshapes of it). Pairs with neither are dropped
    (logged). Returns (the Linears' statistics, owners' removed; the pairs kept)."""
    modules = dict(model.named_modules())
    kept, dropped = [], []
    for norm, lin in pairs:
        owner = chan.get(owners[lin])
        if lin not in chan and owner is not None and owner.shape == (modules[lin].in_features,):
            chan[lin] = owner
        (kept if lin in chan else dropped).append((norm, lin))
    if dropped:
        log.warning("smoothquant: %d pair(s) left unsmoothed: their Linear's input was never seen (%s)", len(dropped),
                    ", ".join(lin for _, lin in dropped[:3]))
    owner_names = set(owners.values())  # containers of a Linear, never measured for their own sake
    return {n: c for n, c in chan.items() if n not in owner_names}, kept


def search_alpha(model: nn.Module, x: np.ndarray, alphas, batch_size: int = 128,
                 x_judge: np.ndarray | None = None) -> tuple[nn.Module, SmoothQuantResult]:
    """Smooth a copy of `model` with the alpha whose simulated W8A8 logits are closest to FP32 on `x_judge`
    (default: `x`); the per-channel statistics and the activation ranges come from `x` (calibration images)."""
    from vitq.tasks.model import predict

    start = time.perf_counter()
    x_judge = x if x_judge is None else x_judge
    model = copy.deepcopy(model).eval()
    pairs = smoothing_pairs(model)
    if not pairs:
        raise ValueError("SmoothQuant found no LayerNorm -> Linear pair (expects timm blocks: norm1 -> attn.qkv, norm2 -> mlp.fc1)")
    ref = predict(model, x_judge, batch_size)
    # One pass over the calibration images: every layer's input |max| per channel (the last dimension). Smoothing
    # leaves every layer's input as it was except the paired Linears', whose channel j is divided by s_j: their
    # ranges after smoothing are max_j(max|X_j| / s_j), exact without another pass.
    owners = {lin: lin.rpartition(".")[0] for _, lin in pairs}
    chan = input_amax(model, [*quantizable_modules(model), *sorted(set(owners.values()))], x, batch_size, per_channel=True)
    chan, pairs = _paired_statistics(model, chan, pairs, owners)
    if not pairs:
        raise ValueError("SmoothQuant found no LayerNorm -> Linear pair whose Linear's input it could measure")
    amax = {n: float(c.max()) for n, c in chan.items()}
    base = _simulated_sqnr(copy.deepcopy(model), amax, x_judge, ref, batch_size)
    scores = {}
    progress = Progress(log, "smoothquant: alpha", len(alphas), every_s=0.0)
    for alpha in alphas:
        trial = copy.deepcopy(model)
        scales = smooth(trial, pairs, chan, alpha)
        scores[f"{alpha:g}"] = _simulated_sqnr(trial, smoothed_ranges(amax, chan, scales), x_judge, ref, batch_size)
        progress.step(f"{alpha:.2f} -> simulated W8A8 output SQNR {scores[f'{alpha:g}']:.1f} dB")
    best = max(alphas, key=lambda a: (scores[f"{a:g}"] if math.isfinite(scores[f"{a:g}"]) else 1e9, -a))
    smooth(model, pairs, chan, best)
    log.info("smoothquant: alpha %.2f over %d pairs (unsmoothed %.1f dB) (%.1fs)", best, len(pairs), base,
             time.perf_counter() - start)
    return model, SmoothQuantResult(alpha=best, pairs=pairs, sqnr_db_by_alpha=scores, unsmoothed_sqnr_db=base)
