"""Train the SAM-style digit segmenter (model.py) on the scenes (scenes.py) and save its weights.

Deterministic on CPU: fixed seed, fixed thread count, a seeded batch order. Loss: BCE + dice per
mask. At the end it measures mIoU on ROOT/val against the ground-truth masks (per class: pixels in
both the predicted and the true mask over pixels in either, summed over the split; the mean over
the 10 classes) and writes the state dict (torch.save) and a JSON record of the run.

    python train.py ROOT OUT.pt [--epochs 20 --batch-size 32 --lr 0.002 --seed 0 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import MEAN, STD, build, mask_loss  # noqa: E402  (model.py beside this file)

IGNORE = 255  # label value of pixels no mask is scored on (the contract's ignore label)


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and label maps (N, H, W) uint8 of ROOT/<split> and ROOT/<split>_masks."""
    from PIL import Image

    files = sorted((root / split).glob("*.png"))
    if not files:
        raise SystemExit(f"train.py: error: {root / split} holds no .png images; write the scenes with scenes.py")
    images, masks = [], []
    for f in files:
        mask_file = root / f"{split}_masks" / f.name
        if not mask_file.is_file():
            raise SystemExit(f"train.py: error: {f} has no mask {mask_file}")
        images.append(np.asarray(Image.open(f).convert("L")))
        masks.append(np.asarray(Image.open(mask_file)))
    return np.stack(images), np.stack(masks)


def to_inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> normalised float (N, 1, H, W)."""
    x = torch.from_numpy(images).float().div(255.0).unsqueeze(1)
    return (x - MEAN[0]) / STD[0]


def to_targets(masks: np.ndarray, num_masks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label maps (N, H, W) -> per-mask targets (N, K, H, W) float, ignored pixels (N, H, W) bool."""
    m = torch.from_numpy(masks).long()
    target = (m.unsqueeze(1) == torch.arange(1, num_masks + 1).view(1, -1, 1, 1)).float()
    return target, m == IGNORE


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Mask logits (N, K, H, W) in batches."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def miou(logits: torch.Tensor, masks: np.ndarray) -> tuple[float, list[float]]:
    """mIoU of the masks (logit > 0) vs the label maps, per class over the whole split, and each class's IoU."""
    num_masks = logits.shape[1]
    target, ignore = to_targets(masks, num_masks)
    keep = ~ignore.unsqueeze(1)
    pred = (logits > 0) & keep
    truth = target.bool() & keep
    inter = (pred & truth).sum((0, 2, 3)).double()
    union = (pred | truth).sum((0, 2, 3)).double()
    per_class = [float(i / u) if u > 0 else float("nan") for i, u in zip(inter, union)]
    return float(np.nanmean(per_class)), per_class


def train(root: Path, out: Path, epochs: int, batch_size: int, lr: float, seed: int, threads: int) -> dict:
    """Train on ROOT/train, evaluate on ROOT/val, save the state dict to `out`; return the run record."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.perf_counter()
    images, masks = load_split(root, "train")
    val_images, val_masks = load_split(root, "val")
    model = build(img_size=images.shape[1])
    num_masks = model.mask_decoder.mask_tokens.num_embeddings
    x, (target, ignore) = to_inputs(images), to_targets(masks, num_masks)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    loss_last = float("nan")
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            loss = mask_loss(model(x[idx]), target[idx], ignore[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        loss_last = total / len(x)
        print(f"epoch {epoch + 1}/{epochs}: loss {loss_last:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    val_miou, per_class = miou(predict(model, to_inputs(val_images)), val_masks)
    record = {
        "val_miou": round(val_miou, 4),
        "val_iou_per_class": [round(v, 4) for v in per_class],
        "train_loss": round(loss_last, 4),
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads,
        "train_images": len(x), "val_images": len(val_images),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="scenes root written by scenes.py")
    ap.add_argument("out", type=Path, help="state dict file to write (torch.save); a .json record beside it")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.002, help="peak AdamW learning rate, one-cycle schedule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed: training is deterministic)")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        ap.error(f"--epochs {args.epochs} and --batch-size {args.batch_size} must be at least 1")
    record = train(args.root, args.out, args.epochs, args.batch_size, args.lr, args.seed, args.threads)
    print(f"val mIoU {record['val_miou']:.4f} vs ground truth ({record['val_images']} scenes), "
          f"{record['seconds']:.0f} s; weights in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
