from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vitq.tasks.data import load_data_result, load_split, model_inputs, prepare_data
from vitq.config import DataConfig
from vitq.errors import DataError


def test_digits_splits_are_disjoint_deterministic_and_labelled(tmp_path):
    cfg = DataConfig(validation_size=300, calibration_size=100, holdout_size=0)  # holdout: test_recovery_holdout.py
    a = prepare_data(cfg, seed=0, out_dir=tmp_path / "a")
    b = prepare_data(cfg, seed=0, out_dir=tmp_path / "b")
    c = prepare_data(cfg, seed=1, out_dir=tmp_path / "c")
    assert a.digest == b.digest != c.digest
    assert a.sizes == {"train": 1797 - 400, "calibration": 100, "validation": 300, "holdout": 0}
    assert load_data_result(tmp_path / "a") == a
    splits = {n: load_split(tmp_path / "a", n) for n in ("train", "calibration", "validation")}
    assert splits["validation"].images.shape == (300, 32, 32, 1)
    assert set(np.unique(splits["validation"].labels)) == set(range(10))
    # No source image is in two splits. The splits keep no indices, so identify images by content:
    # every digits image is distinct (checked below), so equal content means the same source image.
    source = _digits_source(cfg)
    seen = {n: [(bytes(img), int(y)) for img, y in zip(sp.images, sp.labels)] for n, sp in splits.items()}
    for a, b in (("train", "validation"), ("calibration", "validation"), ("train", "calibration")):
        shared = set(seen[a]) & set(seen[b])
        assert not shared, f"{len(shared)} {a} images are also in {b}"
    # Together the splits are the whole dataset, each image once: calibration (like train) comes from
    # the images validation left, never from validation's.
    together = Counter(seen["train"] + seen["calibration"] + seen["validation"])
    assert together == source


def _digits_source(cfg: DataConfig) -> Counter:
    """(image bytes, label) of every digits image, through the data stage's own resize."""
    from sklearn.datasets import load_digits

    from vitq.tasks.data import _resize

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = [_resize(Image.fromarray(p), cfg.image_size, cfg.channels) for p in pixels]
    source = Counter(zip(map(bytes, images), digits.target.tolist()))
    assert len(source) == len(digits.target) == 1797, "digits images are no longer distinct: compare by index"
    return source


def test_model_inputs_normalise_to_nchw():
    x = model_inputs(np.full((2, 4, 4, 1), 255, np.uint8), mean=(0.5,), std=(0.5,))
    assert x.shape == (2, 1, 4, 4) and x.dtype == np.float32 and np.allclose(x, 1.0)


def _write_images(folder, n, color):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 30), color).save(folder / f"{i}.png")


def test_imagefolder_reads_classes_and_draws_calibration_from_train(tmp_path):
    for split, n in (("val", 3), ("train", 5)):
        _write_images(tmp_path / "root" / split / "cat", n, (200, 10, 10))
        _write_images(tmp_path / "root" / split / "dog", n, (10, 10, 200))
    cfg = DataConfig(source="imagefolder", path=str(tmp_path / "root"), image_size=16, channels=3, calibration_size=4,
                     holdout_size=0)
    res = prepare_data(cfg, seed=0, out_dir=tmp_path / "out")
    assert res.classes == ["cat", "dog"]
    assert res.sizes == {"train": 6, "calibration": 4, "validation": 6, "holdout": 0}
    val = load_split(tmp_path / "out", "validation")
    assert val.images.shape == (6, 16, 16, 3)
    assert val.images[0, 8, 8, 0] > 150 and val.labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda r: None, "is not a directory"),
        (lambda r: r.mkdir(), "has no val/ folder"),
        (lambda r: (r / "val" / "cat").mkdir(parents=True), "holds no images"),
        (lambda r: ((r / "val" / "cat").mkdir(parents=True), (r / "val" / "cat" / "x.png").write_bytes(b"not a png")),
         "cannot read image"),
    ],
)
def test_bad_imagefolder_is_one_clear_error_and_writes_nothing(tmp_path, setup, needle):
    root = tmp_path / "root"
    setup(root)
    cfg = DataConfig(source="imagefolder", path=str(root), channels=3)
    with pytest.raises(DataError, match=needle):
        prepare_data(cfg, seed=0, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
