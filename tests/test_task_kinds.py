"""The task axis (tasks/task_kinds.py): classification and dense metrics, budgets per task, user metrics, and
image folders without labels or with ground-truth masks (tasks/data.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitq.tasks import data, task_kinds, validate
from vitq.tasks.task_kinds import Budget, Classification, Dense
from vitq.config import DataConfig, TaskConfig
from vitq.params import parse_params
from vitq.errors import ConfigError, DataError


def _maps(rng, n=6, k=3, h=8, w=8):
    return rng.standard_normal((n, k, h, w)).astype(np.float32)


def test_dense_threshold_masks_against_fp32_and_ground_truth():
    rng = np.random.default_rng(0)
    ref = _maps(rng)
    truth = np.zeros((6, 8, 8), np.uint8)
    for c in range(3):  # ground truth = FP32's own masks where they do not overlap
        truth[ref[:, c] > 0] = c + 1
    m = Dense().compare(ref, ref, truth, None)
    assert m.mask_iou == 1.0 and m.sqnr_db == float("inf") and m.miou_drop == 0.0
    noisy = ref + 0.5 * rng.standard_normal(ref.shape).astype(np.float32)
    q = Dense().compare(ref, noisy, truth, m)
    assert 0.3 < q.mask_iou < 0.95, q.mask_iou
    assert q.miou < m.miou and q.miou_drop == pytest.approx(100 * (m.miou - q.miou), abs=1e-6)
    assert 0 < q.sqnr_db < 20 and q.psnr_db > q.sqnr_db


def test_dense_iou_is_computed_exactly():
    ref = np.full((1, 1, 2, 2), -1.0, np.float32)
    ref[0, 0, 0, :] = 1.0  # FP32 mask: the top row (2 px)
    out = ref.copy()
    out[0, 0, 1, 0] = 1.0  # the variant adds one pixel: IoU 2/3
    truth = np.array([[[1, 0], [255, 0]]], np.uint8)  # ground truth: one pixel, one ignored
    m = Dense().compare(ref, out, truth, None)
    assert m.mask_iou == pytest.approx(2 / 3)
    assert m.miou == pytest.approx(1 / 2)  # variant {(0,0),(0,1)} (ignored pixel dropped) vs truth {(0,0)}


def test_dense_argmax_masks_are_classes():
    ref = np.zeros((1, 3, 1, 3), np.float32)
    ref[0, 0, 0, 0] = ref[0, 1, 0, 1] = ref[0, 2, 0, 2] = 1.0  # classes 0, 1, 2 per pixel
    truth = np.array([[[0, 1, 1]]], np.uint8)
    m = Dense(masks="argmax").compare(ref, ref, truth, None)
    # class 0: IoU 1; class 1: {1} vs {1, 2}: 1/2; class 2: {2} vs {}: 0  -> mean 1/2
    assert m.miou == pytest.approx(0.5)


def test_budget_keys_by_task_and_reasons():
    m = Dense().compare(np.ones((1, 1, 2, 2), np.float32), -np.ones((1, 1, 2, 2), np.float32), None, None)
    assert m.mask_iou == 0.0
    reasons = Dense().reasons(m, Budget("validate", None, None, 0.9, None))
    assert reasons == ["mask IoU vs FP32 0.0000 < validate.min_mask_iou 0.9"]
    assert "needs ground-truth masks" in Dense().reasons(m, Budget("recovery", None, None, None, 1.0))[0]
    logits = np.eye(4, dtype=np.float32)
    c = Classification().compare(logits, logits[::-1], np.arange(4), None)
    assert c.top1 == 0.0 and c.top1_drop == 100.0
    assert Classification().reasons(c, Budget("validate", 1.0)) == ["top-1 drop 100.00 pts > validate.max_top1_drop 1.0"]


def test_params_refuse_the_other_tasks_budget_keys():
    with pytest.raises(ConfigError, match=r"validate.max_top1_drop is a budget of task.kind 'classification'"):
        parse_params({"task": {"kind": "dense"}, "validate": {"max_top1_drop": 2.0}})
    with pytest.raises(ConfigError, match=r"recovery.min_mask_iou is a budget of task.kind 'dense'"):
        parse_params({"recovery": {"min_mask_iou": 0.5}})
    with pytest.raises(ConfigError, match=r"task.mask_threshold applies to task.kind 'dense'"):
        parse_params({"task": {"mask_threshold": 0.5}})
    with pytest.raises(ConfigError, match=r"task.kind: Input should be 'classification' or 'dense'"):
        parse_params({"task": {"kind": "detection"}})
    p = parse_params({"task": {"kind": "dense", "masks": "argmax"}, "validate": {"min_mask_iou": 0.8}})
    assert Budget.of(p.validate_, "validate", "dense") == Budget("validate", None, None, 0.8, None)


def test_task_mismatch_with_outputs_is_one_line():
    with pytest.raises(DataError, match="set task.kind: dense"):
        Classification().compare(np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 4)), None, None)
    with pytest.raises(DataError, match="set task.kind: classification"):
        Dense().compare(np.zeros((2, 10)), np.zeros((2, 10)), None, None)


def test_user_metric_from_a_file(tmp_path):
    (tmp_path / "metrics.py").write_text(
        "import numpy as np\n"
        "def max_err(ref, out, truth):\n    return {'max_abs_err': float(np.abs(ref - out).max())}\n"
        "def bad(ref, out, truth):\n    return 'high'\n"
        "def boom(ref, out, truth):\n    raise ValueError('needs three outputs')\n"
    )
    ref = np.zeros((2, 3), np.float32)
    fn = task_kinds.user_metric("metrics.py:max_err", tmp_path)
    judge = validate.Judge(Classification(), None, fn)
    assert judge.evaluate(ref, ref + 0.25, None).extra == {"max_abs_err": 0.25}
    with pytest.raises(DataError, match="task.metric 'bad' returned 'bad': 'high'"):
        validate.Judge(Classification(), None, task_kinds.user_metric("metrics.py:bad", tmp_path)).evaluate(ref, ref, None)
    with pytest.raises(DataError, match="task.metric 'boom' raised ValueError: needs three outputs"):
        validate.Judge(Classification(), None, task_kinds.user_metric("metrics.py:boom", tmp_path)).evaluate(ref, ref, None)
    with pytest.raises(ConfigError, match="has no 'nope'"):
        task_kinds.user_metric("metrics.py:nope", tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        task_kinds.user_metric("missing.py:fn", tmp_path)


def _image(path: Path, value: int, size=(12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def _mask(path: Path, label: int, size=(12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(size[::-1], np.uint8)
    m[: size[1] // 2] = label
    Image.fromarray(m).save(path)


def _unlabelled_root(root: Path, masks: bool) -> Path:
    for split, n in (("val", 3), ("calibration", 2)):
        for i in range(n):
            _image(root / split / f"{i:03d}.png", 40 * i)
            if masks and split == "val":
                _mask(root / "val_masks" / f"{i:03d}.png", i + 1)
    return root


def test_image_folders_without_labels_and_with_masks(tmp_path):
    root = _unlabelled_root(tmp_path / "scenes", masks=True)
    cfg = DataConfig(source="imagefolder", path=str(root), image_size=8, channels=1, holdout_size=0)
    result = data.prepare_data(cfg, 0, tmp_path / "prepared")
    assert result.classes == [] and not result.labelled and result.masks == ["validation", "holdout"]
    val = data.load_split(tmp_path / "prepared", "validation")
    assert (val.labels == -1).all() and val.masks.shape == (3, 8, 8)
    # Nearest-neighbour resize keeps the labels: top half k, bottom half 0.
    assert val.masks[2, 0, 0] == 3 and val.masks[2, -1, 0] == 0 and set(np.unique(val.masks)) == {0, 1, 2, 3}
    assert data.load_split(tmp_path / "prepared", "calibration").masks is None
    assert Dense().truth(val) is val.masks and Classification().truth(val) is None
    # Held-out images keep their masks: the same label maps, moved with their images.
    held = data.prepare_data(cfg.model_copy(update={"holdout_size": 1}), 0, tmp_path / "prepared-holdout")
    assert held.sizes["validation"] == 2 and held.sizes["holdout"] == 1 and held.masks == ["validation", "holdout"]
    h = data.load_split(tmp_path / "prepared-holdout", "holdout")
    k = int(data.split_index(tmp_path / "prepared-holdout", "holdout")[0])
    assert np.array_equal(h.masks[0], val.masks[k]) and np.array_equal(h.images[0], val.images[k])


def test_mask_folder_that_does_not_match_is_one_line(tmp_path):
    root = _unlabelled_root(tmp_path / "scenes", masks=True)
    (root / "val_masks" / "001.png").unlink()
    cfg = DataConfig(source="imagefolder", path=str(root), image_size=8, channels=1)
    with pytest.raises(DataError, match=r"do not match the images .*1 image\(s\) have no mask"):
        data.prepare_data(cfg, 0, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()
    _mask(root / "val_masks" / "001.png", 2)
    _mask(root / "val_masks" / "extra.png", 2)
    with pytest.raises(DataError, match=r"1 mask\(s\) have no image"):
        data.prepare_data(cfg, 0, tmp_path / "prepared")
    (root / "val_masks" / "extra.png").unlink()
    _mask(root / "val_masks" / "001.png", 2, size=(10, 12))
    with pytest.raises(DataError, match=r"is 10x12 but its image .* is 12x12"):
        data.prepare_data(cfg, 0, tmp_path / "prepared")


def test_mixed_class_folders_and_loose_images_are_refused(tmp_path):
    root = _unlabelled_root(tmp_path / "scenes", masks=False)
    _image(root / "val" / "cat" / "a.png", 10)
    cfg = DataConfig(source="imagefolder", path=str(root), image_size=8, channels=1)
    with pytest.raises(DataError, match="holds both class folders"):
        data.prepare_data(cfg, 0, tmp_path / "prepared")


def test_reference_records_the_task_and_variants_are_judged_by_it(tmp_path):
    (tmp_path / "ref").mkdir()
    result = validate.ValidationResult(
        name=validate.REFERENCE, images=1, metrics=validate.OutputMetrics(None, None, 1.0, 1.0, float("inf")),
        passed=True, reasons=[], details={"task": validate.task_record(TaskConfig(kind="dense", masks="argmax"))},
    )
    from dataclasses import asdict

    from vitq.tasks._io import write_json

    write_json(tmp_path / "ref" / "fp32.json", asdict(result))
    assert validate.load_task(tmp_path / "ref") == TaskConfig(kind="dense", masks="argmax")
