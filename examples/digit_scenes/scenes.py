"""Scenes of real handwritten digits with per-pixel masks, written as vitq's image-folder layout.

Each scene places 2-4 of scikit-learn's 8x8 handwritten digits (`load_digits`), upscaled 2x
(bilinear), on a dark canvas; a later digit covers an earlier one where their ink overlaps. Beside
every image a label map: 0 background, k + 1 where digit k's ink is visible (a pixel is ink where
the upscaled digit exceeds `INK_LEVEL`). The digits are split once between train, calibration and
val, so no handwritten digit appears in two splits.

    ROOT/train/0000.png        ROOT/train_masks/0000.png       (uint8 grayscale / uint8 label map)
    ROOT/calibration/...       ROOT/calibration_masks/...
    ROOT/val/...               ROOT/val_masks/...

Deterministic: the same arguments write byte-identical files.

    python scenes.py OUT [--train 1500 --calibration 200 --val 300 --size 32 --seed 0]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "calibration", "val")
DIGIT_SHARE = {"train": 0.6, "calibration": 0.15, "val": 0.25}  # of the 1,797 digits, disjoint
SCALE = 2  # upscale factor: an 8x8 digit becomes 16x16 pixels
INK_LEVEL = 64  # uint8 intensity above which an upscaled digit pixel is ink (in its mask)
NOISE_STD = 6.0  # canvas noise, uint8 intensity units
MAX_OVERLAP = 0.15  # share of a new digit's ink allowed to cover earlier ink
PLACEMENT_TRIES = 50


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (size, size) uint8
    mask: np.ndarray  # (size, size) uint8 label map: 0 background, k + 1 digit k


def load_digit_pools(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Upscaled digits (N, 16, 16) uint8 and their labels (N,), split disjointly by DIGIT_SHARE."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1,797 real 8x8 handwritten digits, values 0..16
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    side = 8 * SCALE
    big = np.stack([np.asarray(Image.fromarray(p).resize((side, side), Image.BILINEAR)) for p in pixels])
    order = np.random.default_rng(seed).permutation(len(pixels))
    pools, start = {}, 0
    for i, split in enumerate(SPLITS):
        end = len(order) if i == len(SPLITS) - 1 else start + round(DIGIT_SHARE[split] * len(order))
        idx = np.sort(order[start:end])
        pools[split] = (big[idx], digits.target[idx].astype(np.int64))
        start = end
    return pools


def compose(digits: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator) -> Scene:
    """One scene: 2-4 digits drawn from the pool (`digits` (N, s, s) uint8, `labels` (N,)) in draw order."""
    side = digits.shape[1]
    canvas = np.zeros((size, size), np.float32)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        j = int(rng.integers(len(digits)))
        digit, ink = digits[j].astype(np.float32), digits[j] > INK_LEVEL
        for _ in range(PLACEMENT_TRIES):  # a spot where it covers little earlier ink
            y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
            covered = (mask[y : y + side, x : x + side] > 0) & ink
            if covered.sum() <= MAX_OVERLAP * ink.sum():
                break
        else:
            continue  # the canvas is too full for this digit: the scene keeps the ones it has
        window = canvas[y : y + side, x : x + side]
        # The new digit is opaque where it has ink; its faint edges blend with what lies below.
        window[:] = np.where(ink, digit, np.maximum(window, digit))
        mask[y : y + side, x : x + side][ink] = labels[j] + 1
    noisy = canvas + rng.normal(0.0, NOISE_STD, canvas.shape)
    return Scene(image=np.clip(noisy, 0, 255).round().astype(np.uint8), mask=mask)


def write_scenes(out: Path, counts: dict[str, int], size: int, seed: int) -> None:
    """Write every split's images and masks under `out` (replaced atomically)."""
    from PIL import Image

    pools = load_digit_pools(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for i, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, i])  # one stream per split: counts of one do not move another
            (tmp / split).mkdir()
            (tmp / f"{split}_masks").mkdir()
            for n in range(counts[split]):
                scene = compose(*pools[split], size, rng)
                Image.fromarray(scene.image, mode="L").save(tmp / split / f"{n:04d}.png")
                Image.fromarray(scene.mask, mode="L").save(tmp / f"{split}_masks" / f"{n:04d}.png")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scenes.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output root (replaced)")
    ap.add_argument("--train", type=_positive, default=1500, help="training scenes")
    ap.add_argument("--calibration", type=_positive, default=200, help="calibration scenes")
    ap.add_argument("--val", type=_positive, default=300, help="validation scenes")
    ap.add_argument("--size", type=int, default=32, help=f"canvas side, pixels (>= {8 * SCALE})")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.size < 8 * SCALE:
        ap.error(f"--size {args.size} is smaller than one digit ({8 * SCALE} pixels)")
    write_scenes(args.out, {"train": args.train, "calibration": args.calibration, "val": args.val},
                 args.size, args.seed)
    print(f"scenes: {args.train} train, {args.calibration} calibration, {args.val} val ({args.size}x{args.size}) "
          f"in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
