import numpy as np

from vitq.tasks.validate import compare_outputs


def test_identical_outputs_are_perfect():
    ref = np.random.default_rng(0).normal(size=(50, 10)).astype(np.float32)
    m = compare_outputs(ref, ref.copy(), labels=ref.argmax(1), ref_top1=1.0)
    assert m.sqnr_db == float("inf") and m.agreement == 1.0 and m.top1 == 1.0 and m.top1_drop == 0.0
    assert abs(m.cosine - 1.0) < 1e-9


def test_sqnr_and_drop_have_the_documented_units():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1000, 10))
    noise = rng.normal(size=ref.shape) * 0.1  # signal power 1, noise power 0.01 -> 20 dB
    labels = ref.argmax(1)
    m = compare_outputs(ref, ref + noise, labels=labels, ref_top1=1.0)
    assert abs(m.sqnr_db - 20.0) < 0.5, m.sqnr_db
    assert m.top1 == m.agreement  # labels are FP32's predictions here
    assert abs(m.top1_drop - 100 * (1 - m.top1)) < 1e-9  # percentage points
    flipped = compare_outputs(ref, -ref, labels=None, ref_top1=None)
    assert flipped.top1 is None and flipped.cosine < -0.99 and flipped.agreement < 0.05
