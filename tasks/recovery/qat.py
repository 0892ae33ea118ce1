"""Quantization-aware fine-tuning, the last resort: a few epochs with the Q/DQ scheme in the loop.

The torch simulation (`simulate.QuantSim`) fake-quantizes every Linear/Conv that the variant will
quantize: weights per output channel from their current values (as ONNX Runtime computes them at
export), inputs per tensor with learnable scales (LSQ, torch's learnable fake-quant op) starting
from the calibration table. Gradients pass straight through the rounding. What comes out is a
plain float model (new weights, same architecture) plus one |max| per layer input: exported and
quantized with exactly those ranges, it is the same Q/DQ ONNX as every other static variant, and
the Core ML target converts the same weights.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from vitq.tasks import parallel
from vitq.tasks.recovery.simulate import QuantSim

log = logging.getLogger("vitq.recovery")


@dataclass(frozen=True)
class QatSettings:
    epochs: int = 2
    lr: float = 1e-4  # peak AdamW learning rate (cosine decay), weights and activation scales
    batch_size: int = 64
    label_smoothing: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 2


@dataclass(frozen=True)
class QatResult:
    epochs: int
    final_loss: float
    act_amax: dict[str, float]  # layer -> learned |max| of its input (scale * 127)
    seconds: float
    kept_epoch: int | None = None  # the epoch whose weights were kept (by `score`; None: the last, no score)
    score_by_epoch: list[float] | None = None  # `score` after each epoch


def finetune(
    model: torch.nn.Module,
    act_amax: dict[str, float],
    x: np.ndarray,
    y: np.ndarray,
    cfg: QatSettings,
    float_layers=(),
    score=None,
) -> tuple[torch.nn.Module, QatResult]:
    """QAT a copy of `model` on (x, y); layers in `float_layers` stay unquantized. `y`: class labels (N,)
    int64 (cross-entropy), or float targets, e.g. the FP32 model's own outputs (MSE: distillation).
    `score(model)`, higher is better, is called after every epoch with the fake quantization on (the model
    in eval mode; e.g. simulated W8A8 SQNR on held-out images): the best epoch's weights and ranges are kept."""
    import torch.nn.functional as F

    start = time.perf_counter()
    if len(y) == 0:
        raise ValueError("QAT needs training images; the training split is empty")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(parallel.session_threads() or cfg.threads)  # beside other variants: this worker's share
    model = copy.deepcopy(model).train()
    sim = QuantSim(model, act_amax, learn_scales=True).quantize_all(except_layers=float_layers)
    params = [p for p in model.parameters() if p.requires_grad] + list(sim.scales.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = cfg.epochs * math.ceil(len(yt) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss = torch.tensor(float("nan"))
    scores: list[float] = []
    best = None  # (score, epoch, weights, scales)
    try:
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(yt), generator=gen)
            for i in range(0, len(yt), cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                if yt.is_floating_point():  # FP32 outputs as targets (dense tasks): distillation
                    loss = F.mse_loss(model(xt[idx]), yt[idx])
                else:
                    loss = F.cross_entropy(model(xt[idx]), yt[idx], label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    for s in sim.scales.values():
                        s.clamp_(min=1e-8)
            log.info("qat: epoch %d/%d loss %.3f (%.0fs)", epoch + 1, cfg.epochs, loss.item(), time.perf_counter() - start)
            if score is not None:
                model.eval()
                with torch.inference_mode():
                    scores.append(float(score(model)))
                model.train()
                log.info("qat: epoch %d score %.2f on the held-out images", epoch + 1, scores[-1])
                if best is None or scores[-1] > best[0]:
                    best = (scores[-1], epoch + 1, copy.deepcopy(model.state_dict()),
                            {k: v.detach().clone() for k, v in sim.scales.items()})
        if best is not None:  # stop where the held-out score peaked
            model.load_state_dict(best[2])
            with torch.no_grad():
                for k, v in best[3].items():
                    sim.scales[k].copy_(v)
        amax = sim.act_amax()
    finally:
        sim.remove()
    model.eval()
    return model, QatResult(epochs=cfg.epochs, final_loss=round(loss.item(), 4), act_amax=amax,
                            seconds=round(time.perf_counter() - start, 1), kept_epoch=best[1] if best else None,
                            score_by_epoch=[round(v, 3) for v in scores] if scores else None)
