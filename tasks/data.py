"""Data stage: materialise the training, calibration and validation splits as arrays on disk.

Images are stored as uint8 (N, H, W, C) at the configured size; the model's own normalisation
(mean/std from its timm data config) is applied when they are fed to a model (`model_inputs`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tasks._io import atomic_dir, read_json, write_json
from vitq.config import DataConfig
from vitq.errors import DataError

log = logging.getLogger("vitq.data")

SPLITS = ("train", "calibration", "validation")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64; -1 where unknown


@dataclass(frozen=True)
class DataResult:
    source: str
    classes: list[str]
    sizes: dict[str, int]
    image_size: int
    channels: int
    digest: str  # sha256 over the materialised arrays, in split order


def prepare_data(cfg: DataConfig, seed: int, out_dir: Path) -> DataResult:
    """Materialise the three splits into `out_dir` (atomically)."""
    if cfg.source == "digits":
        splits, classes = _digits(cfg, seed)
    else:
        splits, classes = _imagefolder(cfg, seed)
    for name, split in splits.items():
        if name != "train" and len(split.labels) == 0:
            raise DataError(f"the {name} split is empty; it needs at least one image")
    digest = hashlib.sha256()
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            split = splits[name]
            np.savez_compressed(tmp / f"{name}.npz", images=split.images, labels=split.labels)
            digest.update(split.images.tobytes())
            digest.update(split.labels.tobytes())
        result = DataResult(
            source=cfg.source,
            classes=classes,
            sizes={n: int(len(splits[n].labels)) for n in SPLITS},
            image_size=cfg.image_size,
            channels=cfg.channels,
            digest=digest.hexdigest(),
        )
        write_json(tmp / "meta.json", asdict(result))
    log.info("data: %s", ", ".join(f"{n}={s}" for n, s in result.sizes.items()))
    return result


def load_data_result(data_dir: Path) -> DataResult:
    return DataResult(**read_json(Path(data_dir) / "meta.json"))


def load_split(data_dir: Path, name: str) -> Split:
    path = Path(data_dir) / f"{name}.npz"
    if not path.is_file():
        raise DataError(f"{path} is missing; run the data stage first (vitq stage data)")
    with np.load(path) as z:
        return Split(images=z["images"], labels=z["labels"])


def model_inputs(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W), normalised with the model's mean/std."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _resize(img, size: int, channels: int) -> np.ndarray:
    """PIL image -> (size, size, C) uint8: shorter side to `size`, then center crop."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return arr.reshape(size, size, channels)


def _digits(cfg: DataConfig, seed: int) -> tuple[dict[str, Split], list[str]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1,797 real 8x8 handwritten digits, values 0..16
    n = len(digits.target)
    if cfg.validation_size + cfg.calibration_size >= n:
        raise DataError(
            f"data.validation_size + data.calibration_size = {cfg.validation_size + cfg.calibration_size} "
            f"leaves no training images; digits has {n} images"
        )
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = np.stack([_resize(Image.fromarray(p), cfg.image_size, cfg.channels) for p in pixels])
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(n)
    val = order[: cfg.validation_size]
    cal = order[cfg.validation_size : cfg.validation_size + cfg.calibration_size]
    train = order[cfg.validation_size + cfg.calibration_size :]
    splits = {
        "train": Split(images[train], labels[train]),
        "calibration": Split(images[cal], labels[cal]),
        "validation": Split(images[val], labels[val]),
    }
    return splits, [str(c) for c in digits.target_names]


def _list_images(folder: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files = [
        (f, c)
        for c in classes
        for f in sorted((folder / c).rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    return files, classes


def _load_folder(folder: Path, classes: list[str], cfg: DataConfig) -> Split:
    from PIL import Image, UnidentifiedImageError

    files, found = _list_images(folder)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{folder}: class folders {unknown} are not in the validation classes {classes}")
    images, labels = [], []
    for path, cls in files:
        try:
            with Image.open(path) as img:
                images.append(_resize(img, cfg.image_size, cfg.channels))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        labels.append(classes.index(cls))
    if not images:
        return Split(np.zeros((0, cfg.image_size, cfg.image_size, cfg.channels), np.uint8), np.zeros(0, np.int64))
    return Split(np.stack(images), np.asarray(labels, np.int64))


def check_data_config(cfg: DataConfig) -> None:
    """Fail fast on a missing data directory (no image is read)."""
    if cfg.source != "imagefolder":
        return
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path {str(root)!r} is not a directory; expected <root>/val/<class>/<image>")
    if not (root / "val").is_dir():
        raise DataError(f"data.path {str(root)!r} has no val/ folder; expected <root>/val/<class>/<image>")


def _imagefolder(cfg: DataConfig, seed: int) -> tuple[dict[str, Split], list[str]]:
    check_data_config(cfg)
    root = Path(cfg.path)
    val_dir = root / "val"
    files, classes = _list_images(val_dir)
    if not files:
        raise DataError(f"{val_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class folders")
    validation = _load_folder(val_dir, classes, cfg)
    train_dir, cal_dir = root / "train", root / "calibration"
    train = _load_folder(train_dir, classes, cfg) if train_dir.is_dir() else _load_folder(val_dir, [], cfg)
    if cal_dir.is_dir():
        calibration = _load_folder(cal_dir, classes, cfg)
    elif len(train.labels):
        # Calibration images are drawn from train/ (never from val/), then removed from train.
        order = np.random.default_rng(seed).permutation(len(train.labels))
        cal, rest = order[: cfg.calibration_size], order[cfg.calibration_size :]
        calibration, train = Split(train.images[cal], train.labels[cal]), Split(train.images[rest], train.labels[rest])
    else:
        raise DataError(f"data.path {str(root)!r} has neither calibration/ nor train/; one is needed for calibration")
    if len(calibration.labels) == 0:
        raise DataError(f"the calibration split under {str(root)!r} is empty; it needs at least one image")
    return {"train": train, "calibration": calibration, "validation": validation}, classes
