"""Recovery on the torch side: SmoothQuant and the outlier transform preserve FP32, the sensitivity
ranking is deterministic, the calibration search picks per tensor, mixed precision stops at the
budget. Tiny random-weight models: fast, no workspace."""

import numpy as np
import pytest
import timm
import torch

from vitq.tasks import zoo  # noqa: F401  (registers vit_digits_patch4_32)
from vitq.tasks.recovery.mixed_precision import Budget, search_float_layers
from vitq.tasks.recovery.simulate import QuantSim, input_amax, quantizable_modules
from vitq.tasks.task_kinds import OutputMetrics


def _vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_digits_patch4_32", depth=2, embed_dim=32, num_heads=2, num_classes=10).eval()


def _x(n=48, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 1, 32, 32)).astype(np.float32)


def _logits(model, x):
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def _perturb_norms(model):
    """Random LayerNorm scales/shifts, so the per-channel migration is not a no-op."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 3 + 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))


def test_smoothquant_preserves_fp32_outputs():
    from vitq.tasks.recovery.smoothquant import search_alpha, smoothing_pairs, smooth

    model, x = _vit(), _x()
    _perturb_norms(model)
    ref = _logits(model, x)
    pairs = smoothing_pairs(model)
    assert pairs == [("blocks.0.norm1", "blocks.0.attn.qkv"), ("blocks.0.norm2", "blocks.0.mlp.fc1"),
                     ("blocks.1.norm1", "blocks.1.attn.qkv"), ("blocks.1.norm2", "blocks.1.mlp.fc1")]
    chan = input_amax(model, [lin for _, lin in pairs], x, per_channel=True)
    before = model.blocks[0].attn.qkv.weight.clone()
    smooth(model, pairs, chan, alpha=0.5)
    assert not torch.allclose(before, model.blocks[0].attn.qkv.weight), "weights must actually change"
    err = np.abs(_logits(model, x) - ref).max()
    assert err < 1e-4 * np.abs(ref).max(), f"SmoothQuant changed FP32 logits by {err:.3g}"
    smoothed, result = search_alpha(_vit(), x, (0.25, 0.5, 0.75))
    assert result.alpha in (0.25, 0.5, 0.75) and set(result.sqnr_db_by_alpha) == {"0.25", "0.5", "0.75"}
    assert np.abs(_logits(smoothed, x) - _logits(_vit(), x)).max() < 1e-4 * np.abs(ref).max()


def test_smoothquant_alpha_search_derives_the_smoothed_ranges_exactly():
    """search_alpha scores each alpha without a calibration pass over the smoothed model: the paired Linears'
    input ranges are max_j(max|X_j| / s_j) and every other layer's input is unchanged. Measured ranges agree."""
    from vitq.tasks.recovery.smoothquant import smoothed_ranges, smoothing_pairs, smooth

    model, x = _vit(), _x()
    _perturb_norms(model)
    names = quantizable_modules(model)
    chan = input_amax(model, names, x, per_channel=True)
    amax = {n: float(c.max()) for n, c in chan.items()}
    assert amax == pytest.approx(input_amax(model, names, x), rel=1e-6)  # per-tensor = max of per-channel
    pairs = smoothing_pairs(model)
    scales = smooth(model, pairs, chan, alpha=0.6)
    derived = smoothed_ranges(amax, chan, scales)
    measured = input_amax(model, names, x)
    for n in names:
        assert derived[n] == pytest.approx(measured[n], rel=1e-4), (n, derived[n], measured[n])
    assert any(abs(derived[lin] - amax[lin]) > 0.1 * amax[lin] for _, lin in pairs), "smoothing must move the ranges"


def test_outlier_transform_preserves_fp32_and_creates_outliers():
    from vitq.tasks.recovery.outliers import OutlierSpec, inject_outliers

    model, x = _vit(), _x()
    ref = _logits(model, x)
    spec = inject_outliers(model, x, OutlierSpec(channels=3, ratio=100.0))
    assert np.abs(_logits(model, x) - ref).max() < 1e-4 * np.abs(ref).max()
    chan = input_amax(model, ["blocks.0.attn.qkv"], x, per_channel=True)["blocks.0.attn.qkv"]
    idx = sorted(spec.factors["blocks.0.attn.qkv"])
    rest = torch.ones_like(chan, dtype=torch.bool)
    rest[idx] = False
    ratio = float(chan[idx].min() / chan[rest].max())
    assert ratio == pytest.approx(100.0, rel=1e-3), f"outlier |max| / others {ratio:.2f}"


def test_quant_sim_is_removable_and_quantizes_when_asked():
    model, x = _vit(), _x()
    ref = _logits(model, x)
    names = quantizable_modules(model)
    sim = QuantSim(model, input_amax(model, names, x))
    assert np.array_equal(_logits(model, x), ref), "nothing enabled: float"
    sim.quantize_all()
    noisy = _logits(model, x)
    assert 0 < np.abs(noisy - ref).max() < 0.2 * np.abs(ref).max()
    sim.remove()
    assert np.array_equal(_logits(model, x), ref)
    assert set(model.state_dict()) == set(_vit().state_dict()), "no parametrization left behind"


def test_sensitivity_ranking_is_deterministic():
    from vitq.tasks.recovery.sensitivity import layer_sensitivity

    x = _x(64)
    labels = np.random.default_rng(0).integers(0, 10, 64)

    def run():
        model = _vit()
        names = quantizable_modules(model)
        return layer_sensitivity(model, input_amax(model, names, x), {}, x, labels, batch_size=32)

    a, b = run(), run()
    assert [r.layer for r in a] == [r.layer for r in b]
    assert a == b, "same seed, same numbers"
    assert len(a) == len(quantizable_modules(_vit())) and [r.rank for r in a] == list(range(1, len(a) + 1))
    assert [r.quant_only_sqnr_db for r in a] == sorted(r.quant_only_sqnr_db for r in a)


def test_block_cache_gives_the_same_logits_as_a_full_forward():
    from vitq.tasks.recovery.sensitivity import _Forward

    model, x = _vit(), _x(40)
    names = quantizable_modules(model)
    fwd = _Forward(model, x, 16)
    assert fwd.cache is not None and fwd.start_block({"blocks.1.mlp.fc2"}) == 1
    sim = QuantSim(model, input_amax(model, names, x)).set(["blocks.1.mlp.fc2"], ["blocks.1.mlp.fc2"])
    cached = fwd.logits({"blocks.1.mlp.fc2"})
    np.testing.assert_allclose(cached, _logits(model, x), rtol=0, atol=1e-5)
    sim.remove()


def _metrics(drop):
    return OutputMetrics(top1=0.9, top1_drop=drop, agreement=1 - drop / 100, cosine=1.0, sqnr_db=30.0)


def test_mixed_precision_stops_at_the_budget_with_the_fewest_float_layers():
    ranking = [f"l{i}" for i in range(12)]
    calls = []

    def evaluate(float_layers):  # the budget holds once l1 and l4 are float; each costs 0.4 pts
        calls.append(float_layers)
        missing = {"l1", "l4"} - set(float_layers)
        return _metrics(0.1 + 0.4 * len(missing))

    r = search_float_layers(ranking, evaluate, Budget(max_top1_drop=0.2), {n: 10 for n in ranking})
    assert r.budget_met and r.float_layers == ["l1", "l4"], r.float_layers
    assert len(calls) <= 2 + 4 + 5, f"{len(calls)} builds"  # ends, bisection, pruning
    assert all(not e["met"] for e in r.evaluations if {"l1", "l4"} - set(e["float_layers"]))

    r0 = search_float_layers(ranking, lambda fl: _metrics(0.0), Budget(0.2), {})
    assert r0.float_layers == [] and r0.budget_met and len(r0.evaluations) == 1
    bad = search_float_layers(ranking, lambda fl: _metrics(5.0), Budget(0.2), {})
    assert not bad.budget_met and bad.float_layers == ranking


def test_mixed_precision_prunes_biggest_layers_back_to_int8_first():
    ranking = ["a", "b", "c"]  # the budget holds iff "c" is float; bisection lands on all three
    r = search_float_layers(ranking, lambda fl: _metrics(0.0 if "c" in fl else 1.0), Budget(0.5),
                            {"a": 1, "b": 100, "c": 1})
    assert r.float_layers == ["c"]
    builds = [e["float_layers"] for e in r.evaluations]
    assert builds[-2:] == [["a", "c"], ["c"]], f"the 100-MAC layer goes back to INT8 first: {builds}"


def test_calibration_search_picks_per_tensor_by_output_error():
    from vitq.tasks.recovery.calib_search import mse_threshold, search_calibration

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    true = input_amax(model, ["0", "2"], x)
    ranges = {  # per tensor, one sane candidate and one that wrecks the layer output
        "t0": {"minmax": true["0"], "clip": true["0"] / 50},
        "t2": {"minmax": true["2"] * 200, "percentile-99.9": true["2"]},
    }
    choices = {c.tensor: c for c in search_calibration(model, {"0": "t0", "2": "t2"}, ranges, x, batch_size=16)}
    assert choices["t0"].chosen == "minmax" and choices["t2"].chosen == "percentile-99.9"
    assert choices["t0"].output_mse["clip"] > 10 * choices["t0"].output_mse["minmax"]

    # MSE threshold: a heavy-tailed |x| is clipped well inside its max, a uniform one hardly at all.
    rng = np.random.default_rng(1)
    for values, lo, hi in ((np.abs(rng.laplace(size=100000)), 0.2, 0.8), (rng.uniform(0, 1, 100000), 0.95, 1.0)):
        hist, edges = np.histogram(values, bins=2048)
        t = mse_threshold(hist.astype(float), edges)
        assert lo * values.max() < t <= hi * values.max() + 1e-9, (t, values.max())


def test_dense_outputs_get_sqnr_psnr_and_mask_iou():
    from vitq.tasks.validate import compare_outputs

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 4, 16, 16))  # power 1
    m = compare_outputs(ref, ref + 0.1 * rng.standard_normal(ref.shape), None, None)  # noise power 0.01
    assert m.top1 is None and m.top1_drop is None
    assert m.sqnr_db == pytest.approx(20.0, abs=0.3), m.sqnr_db
    peak = ref.max() - ref.min()
    assert m.psnr_db == pytest.approx(10 * np.log10(peak**2 / 0.01), abs=0.3)
    assert 0.85 < m.mask_iou < 1.0 and 0.5 < m.agreement < 1.0
    same = compare_outputs(ref, ref.copy(), None, None)
    assert same.sqnr_db == float("inf") and same.mask_iou == 1.0 and same.agreement == 1.0
    flipped = compare_outputs(ref, -ref, None, None)
    assert flipped.mask_iou == 0.0


def _m(drop, sqnr):
    return OutputMetrics(top1=0.9, top1_drop=drop, agreement=1 - drop / 100, cosine=1.0, sqnr_db=sqnr)


STARTS = ["plain", "search", "smoothquant", "smoothquant+search"]


def test_auto_composition_stops_at_the_cheap_fix_within_budget_without_float_layers():
    from vitq.tasks.recovery.variants import compose

    judged = []
    full_int8 = {"plain": _m(30.0, 2.0), "search": _m(2.0, 10.0), "smoothquant": _m(0.0, 34.0),
                 "smoothquant+search": _m(0.0, 33.0)}

    def fallback(name):
        raise AssertionError("a start is within budget: no layer may go back to float")

    c = compose(STARTS, lambda n: judged.append(n) or full_int8[n], Budget(max_top1_drop=0.5), fallback,
                lambda n, fl: 1.0 - 0.1 * len(fl), "best_sqnr")
    assert judged == STARTS, "best_sqnr: every cheap fix is judged"
    assert c.start == "smoothquant" and c.float_layers == [] and c.met, c
    assert [e["start"] for e in c.path] == STARTS and [e["met"] for e in c.path] == [False, False, True, True]
    assert c.path[0]["reasons"] and c.path[2]["int8_mac_fraction"] == 1.0 and c.path[2]["sqnr_db"] == 34.0
    assert "smoothquant meets the budget" in c.stopped
    # The default (first): it stops at the first start within budget; smoothquant+search is never judged (built).
    judged.clear()
    full_int8["smoothquant"] = _m(0.0, 30.0)  # within budget, though smoothquant+search's SQNR would be higher
    c = compose(STARTS, lambda n: judged.append(n) or full_int8[n], Budget(max_top1_drop=0.5), fallback,
                lambda n, fl: 1.0 - 0.1 * len(fl))
    assert judged == STARTS[:3] and c.start == "smoothquant" and c.met and c.float_layers == []
    assert c.path[-1] == {"start": "smoothquant+search",
                          "skipped": "not tried: smoothquant meets the budget in full INT8 (recovery.auto_choice: first)"}
    assert "the first of plain, search, smoothquant, smoothquant+search to do" in c.stopped


def test_auto_composition_falls_back_to_float_only_after_every_cheap_fix_from_the_best_one():
    from vitq.tasks.recovery.mixed_precision import MixedPrecisionResult
    from vitq.tasks.recovery.variants import compose

    calls = []
    full_int8 = {"plain": _m(30.0, 2.0), "search": _m(2.0, 12.0), "smoothquant": _m(1.0, 20.0),
                 "smoothquant+search": _m(0.8, 19.0)}

    def fallback(name):
        calls.append(("fallback", name))
        return MixedPrecisionResult(["blocks.0.attn.qkv"], True, _m(0.2, 25.0), [], 0.0)

    c = compose(STARTS, lambda n: calls.append(("int8", n)) or full_int8[n], Budget(max_top1_drop=0.5), fallback,
                lambda n, fl: 1.0 - 0.1 * len(fl))
    assert calls == [("int8", n) for n in STARTS] + [("fallback", "smoothquant")], "fallback last, from the best SQNR"
    assert c.start == "smoothquant" and c.float_layers == ["blocks.0.attn.qkv"] and c.met
    assert c.path[-1] == {"start": "smoothquant", "float_layers": ["blocks.0.attn.qkv"], "int8_mac_fraction": 0.9,
                          "top1": 0.9, "top1_drop": 0.2, "agreement": 0.998, "sqnr_db": 25.0, "met": True, "reasons": []}
    assert "float fallback from smoothquant" in c.stopped and "90.0% INT8 MACs" in c.stopped


def test_attention_sensitivity_rows_quantize_only_or_float_only_that_product():
    from vitq.tasks.recovery.sensitivity import LayerSensitivity, attention_sensitivity, rank

    layers = ["blocks.0.attn.qkv", "blocks.0.attn#qk", "blocks.0.attn#av", "head"]
    seen = []

    def evaluate(float_layers):  # #qk hurts more than #av
        seen.append(tuple(float_layers))
        quantized = set(layers) - set(float_layers)
        return _m(0.0, 40.0 - 20.0 * ("blocks.0.attn#qk" in quantized) - 5.0 * ("blocks.0.attn#av" in quantized))

    rows = attention_sensitivity(["blocks.0.attn#qk", "blocks.0.attn#av"], layers, {"blocks.0.attn#qk": 7}, evaluate)
    assert seen == [("blocks.0.attn.qkv", "blocks.0.attn#av", "head"), ("blocks.0.attn#qk",),
                    ("blocks.0.attn.qkv", "blocks.0.attn#qk", "head"), ("blocks.0.attn#av",)]
    qk, av = rows
    assert (qk.kind, qk.macs, qk.quant_only_sqnr_db, qk.float_only_sqnr_db) == ("attention", 7, 20.0, 35.0)
    assert (av.quant_only_sqnr_db, av.float_only_sqnr_db) == (35.0, 20.0) and np.isnan(av.weight_only_sqnr_db)
    linear = LayerSensitivity(rank=0, layer="head", kind="linear", macs=1, quant_only_sqnr_db=30.0, quant_only_top1_drop=0.0,
                              quant_only_agreement=1.0, float_only_sqnr_db=20.0, float_only_top1_drop=0.0,
                              weight_only_sqnr_db=40.0, act_only_sqnr_db=31.0)
    ranked = rank([linear, *rows])
    assert [(r.rank, r.layer) for r in ranked] == [(1, "blocks.0.attn#qk"), (2, "head"), (3, "blocks.0.attn#av")]


class _FunctionalQkvBlock(torch.nn.Module):
    """torchvision Swin's shape: the attention module owns `qkv` but calls `F.linear(x, self.qkv.weight, ...)`
    on windows of its input, so a hook on `qkv` never fires."""

    class Attn(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

        def forward(self, x):  # (B, H, W, C): padded, then windows, as torchvision does
            x = torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 1)).flatten(1, 2)
            q, k, v = torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, -1)
            o = torch.softmax(q @ k.transpose(1, 2) / 4, -1) @ v
            return torch.nn.functional.linear(o, self.proj.weight, self.proj.bias)[:, :9]

    def __init__(self, dim=16):
        super().__init__()
        self.embed, self.norm1, self.attn = torch.nn.Conv2d(3, dim, 4, 4), torch.nn.LayerNorm(dim), self.Attn(dim)
        self.head = torch.nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).permute(0, 2, 3, 1)  # (B, 3, 3, C)
        return self.head((t.flatten(1, 2) + self.attn(self.norm1(t))).mean(1))


def test_smoothquant_measures_a_functionally_called_linear_through_its_owner():
    """torchvision swin_t's onnx-w8a8-auto and -smoothquant variants crashed with KeyError 'features.1.0.attn.qkv'
    (the default `vitq run`): the pair's statistics now come from its owner's input, and smoothing keeps FP32."""
    from vitq.tasks.recovery.smoothquant import search_alpha, smoothing_pairs

    torch.manual_seed(0)
    model = _FunctionalQkvBlock().eval()
    with torch.no_grad():
        model.norm1.weight.uniform_(0.5, 4.0)
    x = np.random.default_rng(0).standard_normal((8, 3, 12, 12)).astype(np.float32)
    assert smoothing_pairs(model) == [("norm1", "attn.qkv")]
    smoothed, result = search_alpha(model, x, (0.3, 0.6))
    assert result.pairs == [("norm1", "attn.qkv")]
    assert not torch.allclose(smoothed.attn.qkv.weight, model.attn.qkv.weight)
    with torch.no_grad():
        ref, got = model(torch.from_numpy(x)), smoothed(torch.from_numpy(x))
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()
