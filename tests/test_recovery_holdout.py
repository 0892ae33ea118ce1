"""Held-out judging: the data stage carves a seeded slice of the validation images into `holdout`, the
searches judge on it, and validate reports on the rest; the two never overlap."""

import numpy as np
import pytest

from vitq.tasks.data import HOLDOUT_MAX_FRACTION, load_split, prepare_data, split_index
from vitq.config import DataConfig


def _pool(data_dir):
    """Every validation image before the slice, by index, from the two splits written."""
    out = {}
    for name in ("validation", "holdout"):
        split = load_split(data_dir, name)
        for i, img, label in zip(split_index(data_dir, name), split.images, split.labels):
            out[int(i)] = (img.tobytes(), int(label))
    return out


def test_holdout_never_overlaps_the_validation_images_validate_reports_on(tmp_path):
    cfg = DataConfig(validation_size=90, calibration_size=30, holdout_size=20)
    a = prepare_data(cfg, 0, tmp_path / "a")
    held, kept = split_index(tmp_path / "a", "holdout"), split_index(tmp_path / "a", "validation")
    assert a.sizes["holdout"] == len(held) == 20 and a.sizes["validation"] == len(kept) == 70
    assert not set(held) & set(kept), "a held-out image is also reported on"
    assert sorted({*held, *kept}) == list(range(90)), "together: every validation image, once"
    # Deterministic by seed: the same seed, the same slice; another seed, another slice (same pool).
    prepare_data(cfg, 0, tmp_path / "b")
    assert np.array_equal(split_index(tmp_path / "b", "holdout"), held)
    assert np.array_equal(load_split(tmp_path / "b", "holdout").images, load_split(tmp_path / "a", "holdout").images)
    prepare_data(DataConfig(validation_size=90, calibration_size=30, holdout_size=0), 0, tmp_path / "whole")
    pool = _pool(tmp_path / "a")
    whole = load_split(tmp_path / "whole", "validation")
    assert len(load_split(tmp_path / "whole", "holdout").labels) == 0
    assert [pool[i] for i in range(90)] == [(img.tobytes(), int(lab)) for img, lab in zip(whole.images, whole.labels)]
    prepare_data(cfg, 1, tmp_path / "c")
    other = split_index(tmp_path / "c", "holdout")
    assert not np.array_equal(other, held) and not set(other) & set(split_index(tmp_path / "c", "validation"))


def test_holdout_is_at_most_a_third_of_the_validation_images(tmp_path):
    r = prepare_data(DataConfig(validation_size=30, calibration_size=10, holdout_size=450), 0, tmp_path)
    assert r.sizes["holdout"] == int(30 * HOLDOUT_MAX_FRACTION) == 10 and r.sizes["validation"] == 20


@pytest.fixture(scope="module")
def staged(staged_workspace):
    from vitq.tasks.layout import Workspace

    return Workspace(staged_workspace)


def test_searches_judge_on_the_holdout_and_validate_reports_on_the_rest(staged):
    from conftest import tiny_params
    from vitq.tasks.recovery.variants import Inputs, _judged, judging_split
    from vitq.tasks.validate import validation_judge
    from vitq.params import parse_params

    p = parse_params(tiny_params())
    inputs = Inputs(staged.model_dir, staged.data_dir, staged.export_dir, staged.calibration_dir, p)
    assert judging_split(inputs) == "holdout"
    x_held, _ = _judged(inputs, "holdout", p.recovery.search_images)
    x_val, _ = validation_judge(staged.model_dir, staged.data_dir, p.task)  # what reference / validate run on
    assert len(x_held) + len(x_val) == p.data.validation_size
    held = {x.tobytes() for x in x_held}
    assert not held & {x.tobytes() for x in x_val}, "validate reports on an image a search judged on"
