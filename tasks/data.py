"""Data stage: materialise the training, calibration, validation and holdout splits as arrays on disk.

Images are stored as uint8 (N, H, W, C) at the configured size; the model's own normalisation
(mean/std from its timm data config) is applied when they are fed to a model (`model_inputs`).

`holdout` is a seeded slice of the validation images (`data.holdout_size`, at most a third of them):
the recovery recipes that search (tasks/recovery) judge their budget on it, and `validate` reports on
the rest, so a search is never scored on the images its verdict is read from. Both splits keep
`index`, each image's position among the validation images before the slice.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vitq.tasks._io import atomic_dir, read_json, write_json
from vitq.config import DataConfig
from vitq.errors import DataError

log = logging.getLogger("vitq.data")

SPLITS = ("train", "calibration", "validation", "holdout")
HOLDOUT_MAX_FRACTION = 1 / 3  # of the validation images: validate keeps reporting on at least two thirds
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64; -1 where unknown
    masks: np.ndarray | None = None  # (N, H, W) uint8 label maps (0 background, k the k-th mask, 255 ignored)

    def subset(self, index: np.ndarray) -> Split:
        """The rows `index` of this split."""
        return Split(self.images[index], self.labels[index], None if self.masks is None else self.masks[index])


@dataclass(frozen=True)
class DataResult:
    source: str
    classes: list[str]
    sizes: dict[str, int]
    image_size: int
    channels: int
    digest: str  # sha256 over the materialised arrays, in split order
    labelled: bool = True  # the validation split has class labels
    masks: list[str] = field(default_factory=list)  # splits with ground-truth masks


def prepare_data(cfg: DataConfig, seed: int, out_dir: Path, root: Path | None = None) -> DataResult:
    """Materialise the three splits into `out_dir` (atomically)."""
    if cfg.source == "digits":
        splits, classes = _digits(cfg, seed)
    else:
        splits, classes = _imagefolder(cfg, seed, root)
    for name, split in splits.items():
        if name != "train" and len(split.labels) == 0:
            raise DataError(f"the {name} split is empty; it needs at least one image")
    splits, index = hold_out(splits, cfg.holdout_size, seed)
    with atomic_dir(out_dir) as tmp:
        digest = write_splits(tmp, {n: splits[n] for n in SPLITS}, index)
        result = DataResult(
            source=cfg.source,
            classes=classes,
            sizes={n: int(len(splits[n].labels)) for n in SPLITS},
            image_size=cfg.image_size,
            channels=cfg.channels,
            digest=digest,
            labelled=bool(len(splits["validation"].labels)) and bool((splits["validation"].labels >= 0).all()),
            masks=[n for n in SPLITS if splits[n].masks is not None],
        )
        write_json(tmp / "meta.json", asdict(result))
    log.info("data: %s", ", ".join(f"{n}={s}" for n, s in result.sizes.items()))
    return result


def write_splits(folder: Path, splits: dict[str, Split], index: dict[str, np.ndarray]) -> str:
    """Write every split as `<name>.npz` (images, labels, masks if any, `index` where `hold_out` gave one) into
    `folder`; returns the sha256 of the arrays written (the data digest)."""
    digest = hashlib.sha256()
    for name, split in splits.items():
        arrays = {"images": split.images, "labels": split.labels}
        if split.masks is not None:
            arrays["masks"] = split.masks
        if name in index:
            arrays["index"] = index[name]
        np.savez_compressed(Path(folder) / f"{name}.npz", **arrays)
        for array in arrays.values():
            digest.update(array.tobytes())
    return digest.hexdigest()


def hold_out(splits: dict[str, Split], size: int, seed: int) -> tuple[dict[str, Split], dict[str, np.ndarray]]:
    """Move a seeded `size` of the validation images (at most HOLDOUT_MAX_FRACTION of them) to a `holdout`
    split. Returns the splits and, for validation and holdout, each image's index among the validation
    images before the move (disjoint by construction; both sorted)."""
    val = splits["validation"]
    n = len(val.labels)
    k = min(size, int(n * HOLDOUT_MAX_FRACTION))
    if k < size:
        log.info("data: holding out %d of %d validation images (data.holdout_size %d; at most a third)", k, n, size)
    held = np.sort(np.random.default_rng([seed, 1]).permutation(n)[:k])  # its own stream: the seed's other draws stay
    kept = np.setdiff1d(np.arange(n), held)
    out = {**splits, "validation": val.subset(kept), "holdout": val.subset(held)}
    return out, {"validation": kept.astype(np.int64), "holdout": held.astype(np.int64)}


def split_index(data_dir: Path, name: str) -> np.ndarray | None:
    """The `index` a split was written with (validation, holdout: positions among the validation images), or None."""
    path = Path(data_dir) / f"{name}.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        return z["index"] if "index" in z.files else None


def load_data_result(data_dir: Path) -> DataResult:
    return DataResult(**read_json(Path(data_dir) / "meta.json"))


def load_split(data_dir: Path, name: str) -> Split:
    path = Path(data_dir) / f"{name}.npz"
    if not path.is_file():
        raise DataError(f"{path} is missing; run the data stage first (vitq stage data)")
    with np.load(path) as z:
        return Split(images=z["images"], labels=z["labels"], masks=z["masks"] if "masks" in z.files else None)


def model_inputs(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W), normalised with the model's mean/std."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _resize(img, size: int, channels: int, mask: bool = False) -> np.ndarray:
    """PIL image -> (size, size, C) uint8: shorter side to `size`, then center crop. A mask (a label map)
    is resized with nearest neighbours, so labels stay labels."""
    from PIL import Image

    if mask and img.mode == "P":  # a palette label map (as VOC's): its indices are the labels, not its colours
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    img = img.convert("L" if channels == 1 or mask else "RGB")
    w, h = img.size
    scale = size / min(w, h)
    resample = Image.NEAREST if mask else Image.BILINEAR
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return arr.reshape(size, size) if mask else arr.reshape(size, size, channels)


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


def _list_images(folder: Path) -> tuple[list[tuple[Path, str | None]], list[str]]:
    """The images of a split folder and its classes: `<folder>/<class>/<image>` (labelled) or
    `<folder>/<image>` (no labels: class None, classes [])."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    loose = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if classes and loose:
        raise DataError(
            f"{folder} holds both class folders ({', '.join(classes[:3])}) and images ({loose[0].name}); put every "
            "image in a class folder (labelled) or none (no labels)"
        )
    if loose:
        return [(f, None) for f in loose], []
    files = [
        (f, c)
        for c in classes
        for f in sorted((folder / c).rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    return files, classes


def _mask_files(folder: Path, files: list[Path]) -> list[Path] | None:
    """The ground-truth mask of each image in `folder`, from `<folder>_masks/` (same relative path, same stem,
    .png); None when there is no mask folder. Images without masks and masks without images are errors."""
    mask_dir = folder.with_name(folder.name + "_masks")
    if not mask_dir.is_dir():
        return None
    by_key = {f.relative_to(mask_dir).with_suffix(""): f for f in mask_dir.rglob("*")
              if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES}
    keys = [f.relative_to(folder).with_suffix("") for f in files]
    missing = [k for k in keys if k not in by_key]
    extra = sorted(set(by_key) - set(keys))
    if missing or extra:
        what = (f"{len(missing)} image(s) have no mask (first: {folder / missing[0]}.*)" if missing
                else f"{len(extra)} mask(s) have no image (first: {by_key[extra[0]]})")
        raise DataError(f"the masks in {mask_dir} do not match the images in {folder}: {what}; each image needs "
                        f"{mask_dir.name}/<same path and name>.png")
    return [by_key[k] for k in keys]


def _load_folder(folder: Path, classes: list[str], cfg: DataConfig) -> Split:
    from PIL import Image, UnidentifiedImageError

    files, found = _list_images(folder)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{folder}: class folders {unknown} are not in the validation classes {classes}")
    masks = _mask_files(folder, [f for f, _ in files])
    images, labels, mask_arrays = [], [], []
    for i, (path, cls) in enumerate(files):
        try:
            with Image.open(path) as img:
                images.append(_resize(img, cfg.image_size, cfg.channels))
                size = img.size
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        labels.append(classes.index(cls) if cls is not None else -1)
        if masks is not None:
            try:
                with Image.open(masks[i]) as m:
                    if m.size != size:
                        raise DataError(f"mask {masks[i]} is {m.size[0]}x{m.size[1]} but its image {path} is "
                                        f"{size[0]}x{size[1]}; a mask is a label map at its image's size")
                    mask_arrays.append(_resize(m, cfg.image_size, 1, mask=True))
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"cannot read mask {masks[i]}: {exc}") from None
    if not images:
        return Split(np.zeros((0, cfg.image_size, cfg.image_size, cfg.channels), np.uint8), np.zeros(0, np.int64))
    return Split(np.stack(images), np.asarray(labels, np.int64), np.stack(mask_arrays) if masks is not None else None)


def _empty(cfg: DataConfig) -> Split:
    return Split(np.zeros((0, cfg.image_size, cfg.image_size, cfg.channels), np.uint8), np.zeros(0, np.int64))


def data_root(cfg: DataConfig, root: Path | None = None) -> Path:
    """data.path: absolute, or relative to the workspace `root` (default: the current directory)."""
    path = Path(cfg.path).expanduser()
    return path if path.is_absolute() or root is None else Path(root) / path


def check_data_config(cfg: DataConfig, root: Path | None = None) -> None:
    """Fail fast on a missing data directory (no image is read). `root`: the workspace relative paths start at."""
    if cfg.source != "imagefolder":
        return
    root = data_root(cfg, root)
    if not root.is_dir():
        raise DataError(f"data.path {str(root)!r} is not a directory; expected <root>/val/<class>/<image> "
                        "(or <root>/val/<image> without labels)")
    if not (root / "val").is_dir():
        raise DataError(f"data.path {str(root)!r} has no val/ folder; expected <root>/val/<class>/<image> "
                        "(or <root>/val/<image> without labels)")


def _imagefolder(cfg: DataConfig, seed: int, workspace: Path | None) -> tuple[dict[str, Split], list[str]]:
    check_data_config(cfg, workspace)
    root = data_root(cfg, workspace)
    val_dir = root / "val"
    files, classes = _list_images(val_dir)
    if not files:
        raise DataError(f"{val_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}), neither in class folders "
                        "(labelled) nor directly (no labels)")
    validation = _load_folder(val_dir, classes, cfg)
    train_dir, cal_dir = root / "train", root / "calibration"
    train = _load_folder(train_dir, classes, cfg) if train_dir.is_dir() else _empty(cfg)
    if cal_dir.is_dir():
        calibration = _load_folder(cal_dir, classes, cfg)
    elif len(train.labels):
        # Calibration images are drawn from train/ (never from val/), then removed from train.
        order = np.random.default_rng(seed).permutation(len(train.labels))
        cal, rest = order[: cfg.calibration_size], order[cfg.calibration_size :]
        calibration, train = train.subset(cal), train.subset(rest)
    else:
        raise DataError(f"data.path {str(root)!r} has neither calibration/ nor train/; one is needed for calibration")
    if len(calibration.labels) == 0:
        raise DataError(f"the calibration split under {str(root)!r} is empty; it needs at least one image")
    return {"train": train, "calibration": calibration, "validation": validation}, classes
