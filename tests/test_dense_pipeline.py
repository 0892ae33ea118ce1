"""A dense model of the user's own (model.source: python) on image folders without labels but with ground-truth
masks, in a workspace made the user's way (`vitq init --task dense`, then params.yaml edited), through the stages
with task.kind: dense: the reference records the task, every variant is judged by mask IoU against FP32 and mIoU
against the masks, the summary and its table say so, and recovery steers to the dense budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

MODEL_PY = '''
import torch
from torch import nn


class TinySegmenter(nn.Module):
    """Patch embedding, one transformer block (LayerNorm -> Linear), a linear mask head per patch pixel."""

    def __init__(self, dim=16, patch=4, masks=2):
        super().__init__()
        self.patch, self.masks = patch, masks
        self.embed = nn.Conv2d(1, dim, patch, patch)
        self.block = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(dim, masks * patch * patch)

    def forward(self, x):
        n, _, h, w = x.shape
        t = self.embed(x)  # (N, D, h/p, w/p)
        gh, gw = t.shape[2], t.shape[3]
        t = self.block(t.flatten(2).transpose(1, 2))  # (N, h/p * w/p, D)
        y = self.head(t).reshape(n, gh, gw, self.masks, self.patch, self.patch)
        return y.permute(0, 3, 1, 4, 2, 5).reshape(n, self.masks, h, w)  # (N, K, H, W) mask logits


def build(dim=16, masks=2):
    torch.manual_seed(0)
    model = TinySegmenter(dim=dim, masks=masks)
    with torch.no_grad():  # a fixed, non-trivial mask head: bright pixels -> mask 1, dark -> mask 2
        model.head.bias.zero_()
    return model
'''


def _scenes(root: Path, rng: np.random.Generator) -> None:
    """Squares on a dark background; masks: 1 where bright squares are, 2 where dim ones are."""
    for split, n in (("calibration", 16), ("val", 24)):
        (root / split).mkdir(parents=True)
        if split == "val":
            (root / "val_masks").mkdir()
        for i in range(n):
            img = np.zeros((16, 16), np.uint8)
            mask = np.zeros((16, 16), np.uint8)
            for label, value in ((1, 230), (2, 120)):
                y, x = rng.integers(0, 10, 2)
                img[y : y + 6, x : x + 6] = value
                mask[y : y + 6, x : x + 6] = label
            Image.fromarray(img).save(root / split / f"{i:03d}.png")
            if split == "val":
                Image.fromarray(mask).save(root / "val_masks" / f"{i:03d}.png")


# What the user edits in the params.yaml `vitq init` wrote: a looser verdict, a stricter recovery budget, and
# this test's speed (few images, short timings).
EDITS = {
    ("validate", "min_mask_iou"): 0.5, ("validate", "max_miou_drop"): 20.0,
    ("recovery", "min_mask_iou"): 0.98, ("recovery", "sensitivity_images"): 8, ("recovery", "search_images"): 24,
    ("quantize", "carry"): {},  # no Core ML copy of onnx-w8a8-auto here
    ("calibration", "num_bins"): 512, ("benchmark", "warmup"): 2, ("benchmark", "repeats"): 20,
    ("benchmark", "rounds"): 2,
}


@pytest.fixture(scope="module")
def dense_ws(tmp_path_factory):
    """The user's path: their factory file and scenes in a folder, `vitq init --task dense` there, params.yaml
    edited, then the stages."""
    from vitq.cli import main
    from vitq.init_workspace import set_value
    from vitq.params import load_params
    from vitq.tasks import stages
    from vitq.tasks.layout import Workspace

    root = tmp_path_factory.mktemp("dense") / "ws"
    _scenes(root / "scenes", np.random.default_rng(0))
    (root / "segmenter.py").write_text(MODEL_PY)
    code = main(["init", str(root), "--model", f"python:{root / 'segmenter.py'}:build", "--task", "dense",
                 "--data", str(root / "scenes"), "--mean", "0.5", "--std", "0.25", "--image-size", "16",
                 "--channels", "1", "--arch", "{dim: 16, masks: 2}",
                 "--recipes", "onnx-w8-dynamic,onnx-w8a8-minmax,onnx-w8a8-auto"])
    assert code == 0
    text = (root / "params.yaml").read_text()
    assert "  max_top1_drop:" not in text  # init wrote the dense budget keys, nothing to remove by hand
    for (section, key), value in EDITS.items():
        text = set_value(text, section, key, value)
    (root / "params.yaml").write_text(text)
    p = load_params(root / "params.yaml")
    assert (p.model.factory, p.data.path, p.task.kind) == ("segmenter.py:build", "scenes", "dense")
    ws = Workspace(root)
    stages.preflight(ws, p)
    for name in stages.PREPARED:
        stages.STAGES[name](ws, p)
    for name in p.quantize.recipes:
        stages.run_variant(ws, p, name)
    stages.run_benchmark(ws, p)
    table = stages.run_report(ws, p)
    return ws, p, table


def test_reference_is_judged_as_dense_with_ground_truth(dense_ws):
    from vitq.tasks import validate

    ws, _, _ = dense_ws
    ref = validate.load_validation(ws.validation_for(validate.REFERENCE), validate.REFERENCE)
    assert ref.details["task"]["kind"] == "dense"
    assert ref.metrics.mask_iou == 1.0 and ref.metrics.miou is not None and ref.metrics.top1 is None


@pytest.mark.slow
def test_variants_carry_dense_metrics_in_the_summary(dense_ws):
    ws, _, table = dense_ws
    summary = json.loads((ws.root / "reports" / "summary.json").read_text())
    assert summary["task"] == "dense" and summary["baseline"]["miou"] is not None
    assert {v["name"] for v in summary["variants"]} == {"onnx-w8-dynamic", "onnx-w8a8-minmax", "onnx-w8a8-auto"}
    for v in summary["variants"]:
        assert 0.0 <= v["mask_iou"] <= 1.0 and v["miou"] is not None and v["miou_drop"] is not None, v
        assert v["top1"] is None and "top1" not in v["not_measured"]  # dense: top-1 does not apply
        # passed follows the dense budget: mask IoU >= 0.5 and mIoU drop <= 20 points
        assert v["passed"] == (v["mask_iou"] >= 0.5 and v["miou_drop"] <= 20.0), v
    assert "mIoU" in table and "mask IoU" in table


@pytest.mark.slow
def test_auto_steers_to_the_dense_budget(dense_ws):
    ws, _, _ = dense_ws
    rec = json.loads((ws.variants_dir / "onnx-w8a8-auto" / "recovery.json").read_text())
    assert rec["budget"]["task"] == "dense" and rec["budget"]["min_mask_iou"] == 0.98
    assert rec["budget"]["max_top1_drop"] is None
    # Every start in full INT8 (and, where no start met the budget, every fallback candidate) is judged by mask
    # IoU, its verdict by the dense budget.
    judged = [e for e in rec["path"] if "skipped" not in e] + rec.get("evaluations", [])
    assert judged and judged[0]["start"] == "plain", rec["path"]  # cheapest first
    for e in judged:
        assert e["mask_iou"] is not None and e["met"] == (e["mask_iou"] >= 0.98), e
    assert rec["budget_met"] == any(e["met"] for e in judged)
