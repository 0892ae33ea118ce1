"""Per-layer quantization sensitivity, measured in the torch simulation of the Q/DQ scheme.

For every Linear/Conv layer, four configurations against FP32 on held-out images:
- quant-only: only this layer in W8A8 (how much damage it does on its own);
- float-only: every other layer in W8A8, this one float (how much leaving it float recovers);
- weight-only / act-only: only this layer's weight, or only its input, quantized (which side hurts).
Ranked most sensitive first: lowest quant-only SQNR of the logits, ties broken by the highest
float-only SQNR. The ranking is deterministic for a fixed seed (it picks the subset).

The attention products (`<attn>#qk`, `<attn>#av`), where a recipe quantizes them, have no module to
simulate: `attention_sensitivity` measures them on the real artifact instead (ONNX Runtime builds:
only this product quantized / only this one float; both inputs are activations, so input-only is
quant-only and weight-only does not apply). `rank` orders both kinds of rows together.

Cheap by construction: the activations entering each transformer block are computed once and
cached, so a configuration whose first quantized layer sits in block i runs only blocks i.. (timm
ViTs; other models run whole); every forward runs in batches.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vitq.tasks.recovery.simulate import QuantSim
from vitq.tasks._progress import Progress
from vitq.tasks.validate import compare_outputs

log = logging.getLogger("vitq.recovery")

CACHE_LIMIT_BYTES = 1 << 30  # block-input cache only below 1 GiB


@dataclass(frozen=True)
class LayerSensitivity:
    rank: int  # 1 = most sensitive
    layer: str  # torch module name
    kind: str  # linear, conv, attention
    macs: int  # per image
    quant_only_sqnr_db: float  # logits SQNR vs FP32, only this layer quantized (W8A8)
    quant_only_top1_drop: float | None  # points
    quant_only_agreement: float
    float_only_sqnr_db: float  # every other layer quantized, this one float
    float_only_top1_drop: float | None
    weight_only_sqnr_db: float  # only this layer's weight quantized (NaN: an attention product has none)
    act_only_sqnr_db: float  # only this layer's input quantized


class _Forward:
    """Batched forward with an optional cache of the inputs of every transformer block."""

    def __init__(self, model: torch.nn.Module, x: np.ndarray, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.batches = [torch.from_numpy(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        self.cache: list[list[torch.Tensor]] | None = None
        blocks = getattr(model, "blocks", None)
        if isinstance(blocks, torch.nn.Sequential) and all(hasattr(model, a) for a in ("forward_head", "norm", "_pos_embed")):
            self.blocks = list(blocks)
            self._fill_cache()

    @torch.inference_mode()
    def _fill_cache(self) -> None:
        m = self.model
        cache, size = [], 0
        for xb in self.batches:
            h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(xb))))
            per_block = [h]
            for blk in self.blocks:
                h = blk(h)
                per_block.append(h)
            size += sum(t.numel() * t.element_size() for t in per_block)
            if size > CACHE_LIMIT_BYTES:
                return
            cache.append(per_block)
        self.cache = cache

    def start_block(self, quantized: set[str]) -> int | None:
        """First block whose input can differ from FP32 (None: run the whole model)."""
        if self.cache is None or not quantized:
            return None if self.cache is None else len(self.blocks)
        first = len(self.blocks)
        for name in quantized:
            parts = name.split(".")
            if parts[0] == "blocks" and parts[1].isdigit():
                first = min(first, int(parts[1]))
            elif parts[0] in ("head", "fc_norm", "head_drop"):
                continue
            else:
                return None
        return first

    @torch.inference_mode()
    def logits(self, quantized: set[str]) -> np.ndarray:
        start = self.start_block(quantized)
        out = []
        for b, xb in enumerate(self.batches):
            if start is None:
                y = self.model(xb)
            else:
                h = self.cache[b][start]
                for blk in self.blocks[start:]:
                    h = blk(h)
                y = self.model.forward_head(self.model.norm(h))
            out.append(y.float().numpy())
        return np.concatenate(out)


def _sqnr(m) -> float:
    return m.sqnr_db if math.isfinite(m.sqnr_db) else 200.0  # identical outputs: cap for sorting/plotting


def layer_sensitivity(
    model: torch.nn.Module,
    act_amax: dict[str, float],
    macs: dict[str, int],
    x: np.ndarray,
    labels: np.ndarray | None,
    batch_size: int = 128,
) -> list[LayerSensitivity]:
    """Rank the layers named in `act_amax` (Linear/Conv module -> calibrated |max| of its input)."""
    start = time.perf_counter()
    model.eval()
    fwd = _Forward(model, x, batch_size)
    ref = fwd.logits(set())
    ref_top1 = float(np.mean(ref.argmax(1) == labels)) if labels is not None else None
    sim = QuantSim(model, act_amax)
    names = list(act_amax)
    try:
        def measure(weights, acts):
            sim.set(weights, acts)
            return compare_outputs(ref, fwd.logits(set(weights) | set(acts)), labels, ref_top1)

        rows = []
        progress = Progress(log, "sensitivity: layer", len(names), every_s=0.0)  # each layer: 4 full forwards
        for i, name in enumerate(names, 1):
            q = measure([name], [name])
            others = [n for n in names if n != name]
            f = measure(others, others)
            w = measure([name], [])
            a = measure([], [name])
            rows.append(dict(
                layer=name, kind="conv" if isinstance(dict(model.named_modules())[name], torch.nn.Conv2d) else "linear",
                macs=int(macs.get(name, 0)),
                quant_only_sqnr_db=_sqnr(q), quant_only_top1_drop=q.top1_drop, quant_only_agreement=q.agreement,
                float_only_sqnr_db=_sqnr(f), float_only_top1_drop=f.top1_drop,
                weight_only_sqnr_db=_sqnr(w), act_only_sqnr_db=_sqnr(a),
            ))
            progress.step(f"{name}: quant-only {rows[-1]['quant_only_sqnr_db']:.1f} dB, "
                          f"float-only {rows[-1]['float_only_sqnr_db']:.1f} dB")
    finally:
        sim.remove()
    log.info("sensitivity: %d layers x 4 configurations on %d images (%.1fs)", len(names), len(x), time.perf_counter() - start)
    return rank([LayerSensitivity(rank=0, **r) for r in rows])


def rank(rows: list[LayerSensitivity]) -> list[LayerSensitivity]:
    """Most sensitive first: lowest quant-only SQNR, ties broken by the highest float-only SQNR; ranks 1..n."""
    ordered = sorted(rows, key=lambda r: (r.quant_only_sqnr_db, -r.float_only_sqnr_db, r.layer))
    return [replace(r, rank=i) for i, r in enumerate(ordered, 1)]


def attention_sensitivity(names: list[str], all_layers: list[str], macs: dict[str, int], evaluate) -> list[LayerSensitivity]:
    """Rows for the attention products `names`. `evaluate(float_layers)` builds the quantized graph with the
    layers `float_layers` (of `all_layers`) left float, runs it and returns its OutputMetrics against FP32."""
    start = time.perf_counter()
    rows = []
    progress = Progress(log, "sensitivity: attention product", len(names), every_s=0.0)
    for name in names:
        q = evaluate(tuple(n for n in all_layers if n != name))  # only this product quantized
        f = evaluate((name,))  # everything else quantized
        rows.append(LayerSensitivity(
            rank=0, layer=name, kind="attention", macs=int(macs.get(name, 0)),
            quant_only_sqnr_db=_sqnr(q), quant_only_top1_drop=q.top1_drop, quant_only_agreement=q.agreement,
            float_only_sqnr_db=_sqnr(f), float_only_top1_drop=f.top1_drop,
            weight_only_sqnr_db=float("nan"), act_only_sqnr_db=_sqnr(q),  # no weight: both inputs are activations
        ))
        progress.step(f"{name}: quant-only {rows[-1].quant_only_sqnr_db:.1f} dB, float-only {rows[-1].float_only_sqnr_db:.1f} dB")
    log.info("sensitivity: %d attention products x 2 builds (%.1fs)", len(names), time.perf_counter() - start)
    return rows


def write_sensitivity(rows: list[LayerSensitivity], csv_path: Path, png_path: Path, title: str) -> None:
    """The ranked table as CSV and a grouped bar plot (logits SQNR per layer: W8A8, weight, input)."""
    from vitq.tasks._io import atomic_file

    fields = list(LayerSensitivity.__dataclass_fields__)
    with atomic_file(csv_path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in asdict(r).items()})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = rows[:30][::-1]
    y = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(shown) + 1.4))
    ax.barh(y + 0.27, [r.quant_only_sqnr_db for r in shown], 0.27, label="layer in W8A8", color="tab:red")
    ax.barh(y, [r.weight_only_sqnr_db for r in shown], 0.27, label="weight only", color="tab:blue")
    ax.barh(y - 0.27, [r.act_only_sqnr_db for r in shown], 0.27, label="input only", color="tab:orange")
    ax.set_yticks(y, [f"{r.rank}. {r.layer}" for r in shown], fontsize=7)
    ax.set_xlabel("logits SQNR vs FP32 with only this layer quantized, dB (lower = more sensitive)")
    ax.set_title(f"{title}: per-layer sensitivity")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
