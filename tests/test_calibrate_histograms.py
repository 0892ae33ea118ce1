"""Calibration tables from tasks/_histograms.py equal ONNX Runtime's HistogramCollector results within one
histogram bin: the same bin edges, min/max exactly, percentile and entropy thresholds within one bin, on
tensors with dense and sparse tails, batches of unequal size, and end to end on a small ONNX model."""

from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np
import pytest
import torch

NUM_BINS, NUM_QUANTIZED_BINS = 512, 128


def _batches(seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    kinds = [
        lambda s: rng.standard_normal(s),
        lambda s: rng.standard_t(3, s),  # sparse tail: the percentile is sensitive to every count
        lambda s: np.maximum(rng.standard_normal(s), 0),  # ReLU-like: exact zeros
        lambda s: rng.exponential(1, s),  # one-sided
        lambda s: rng.uniform(0.9, 1.0, s),  # far from 0: |x| bins much narrower than signed ones
        lambda s: rng.standard_normal(s) * 0.01 + 3,
    ]
    # batch b: b + 1 rows, growing scale: ranges grow, both grids add bins, later |x| fall below the first min
    return [{f"t{i}": (kind((b + 1, 4000)) * (1 + 0.3 * b)).astype(np.float32) for i, kind in enumerate(kinds)}
            for b in range(4)]


def _ort_collectors(batches, percentile):
    from onnxruntime.quantization.calibrate import HistogramCollector

    abs_hist = HistogramCollector("percentile", True, NUM_BINS, NUM_QUANTIZED_BINS, percentile, "same")
    value_hist = HistogramCollector("entropy", True, NUM_BINS, NUM_QUANTIZED_BINS, percentile, "same")
    with contextlib.redirect_stdout(io.StringIO()):
        for batch in batches:
            abs_hist.collect(batch)
            value_hist.collect(batch)
        return abs_hist, value_hist, abs_hist.compute_percentile(), value_hist.compute_entropy()


def _bins_apart(a, b, edges) -> float:
    return abs(float(a) - float(b)) / float(edges[1] - edges[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("percentile", [99.9, 99.99])
def test_tables_equal_onnxruntime_collectors_within_one_bin(seed, percentile):
    from vitq.tasks._histograms import CalibrationHistograms

    batches = _batches(seed)
    abs_ort, value_ort, pct_ort, ent_ort = _ort_collectors(batches, percentile)
    ours = CalibrationHistograms(NUM_BINS, NUM_QUANTIZED_BINS)
    for batch in batches:
        for name, v in batch.items():
            ours.collect(name, torch.from_numpy(v))
    pct = ours.percentile_ranges(percentile)
    for name in batches[0]:
        abs_edges, value_edges = abs_ort.histogram_dict[name][1], value_ort.histogram_dict[name][1]
        np.testing.assert_array_equal(ours.abs[name][1], abs_edges, err_msg=f"{name}: |x| bin edges")
        np.testing.assert_array_equal(ours.value[name][1], value_edges, err_msg=f"{name}: signed bin edges")
        assert ours.minmax_ranges()[name] == tuple(abs_ort.histogram_dict[name][2:4]), name
        apart = _bins_apart(pct[name][1], pct_ort[name][1], abs_edges)
        assert apart <= 1.001, f"{name}: percentile {pct[name][1]} vs ORT {pct_ort[name][1]}: {apart:.2f} bins apart"
        low, high = ours.entropy_range(name)
        for got, want in ((low, ent_ort[name][0]), (high, ent_ort[name][1])):
            apart = _bins_apart(got, want, value_edges)
            assert apart <= 1.001, f"{name}: entropy {(low, high)} vs ORT {ent_ort[name][:2]}: {apart:.2f} bins apart"


def test_vectorised_divergences_equal_onnxruntime_per_candidate():
    """The all-candidates KL equals ORT's per-candidate float32 KL to float32 precision, on every candidate."""
    from vitq.tasks._histograms import _divergence_ort, _divergences

    rng = np.random.default_rng(0)
    for x in (rng.standard_t(3, 100_000), np.maximum(rng.standard_normal(50_000), 0), rng.standard_normal(3000)):
        t = np.abs(x).max()
        hist = np.histogram(x.astype(np.float32), 600, range=(-t, t))[0]
        candidates = np.arange(NUM_QUANTIZED_BINS // 2, 301)
        fast = _divergences(hist, NUM_QUANTIZED_BINS, candidates)
        exact = np.array([_divergence_ort(hist, NUM_QUANTIZED_BINS, int(i), np.float32) for i in candidates])
        np.testing.assert_allclose(fast, exact, rtol=1e-4, atol=1e-5)


def _tiny_onnx(path):
    """input (N, 3, 4, 4) -> Flatten -> MatMul -> Relu -> MatMul: 2 calibrated tensors (the MatMuls' inputs; ORT's
    own selection adds their 2 outputs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((48, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 10)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], name="flatten"),
         helper.make_node("MatMul", ["flat", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2")],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = onnx.shape_inference.infer_shapes(model)
    onnx.save(model, str(path))


def test_calibrate_inputs_tables_equal_onnxruntime_within_one_bin(tmp_path):
    """End to end: calibrate_inputs' tables against ORT's HistogramCalibrater + collectors on the same batches."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater, load_tensors_data

    from vitq.tasks.calibrate import calibrate_inputs
    from vitq.config import CalibrationConfig

    _tiny_onnx(tmp_path / "tiny.onnx")
    x = (np.random.default_rng(1).standard_t(4, (40, 3, 4, 4))).astype(np.float32)
    cfg = CalibrationConfig(num_bins=NUM_BINS, batch_size=16, percentile=99.9)
    calibrate_inputs(tmp_path / "tiny.onnx", x, cfg, tmp_path / "tables")

    calibrater = HistogramCalibrater(str(tmp_path / "tiny.onnx"), op_types_to_calibrate=["MatMul", "Gemm", "Conv"],
                                     augmented_model_path=str(tmp_path / "augmented.onnx"), symmetric=True)
    calibrater.augment_graph()
    calibrater.create_inference_session()
    names = sorted(calibrater.tensors_to_calibrate)
    outputs = [o.name for o in calibrater.infer_session.get_outputs()]
    batches = [{n: v for n, v in zip(outputs, calibrater.infer_session.run(None, {"input": x[lo : lo + 16]})) if n in names}
               for lo in range(0, len(x), 16)]
    abs_ort, value_ort, pct_ort, ent_ort = _ort_collectors(batches, 99.9)
    want = {"minmax": {t: abs_ort.histogram_dict[t][2:4] for t in names}, "percentile": pct_ort, "entropy": ent_ort}
    bin_edges = {"minmax": abs_ort.histogram_dict, "percentile": abs_ort.histogram_dict, "entropy": value_ort.histogram_dict}
    assert names == ["flat", "h", "logits", "r"]  # ORT's selection: the MatMuls' inputs and outputs
    for method in cfg.methods:
        table = load_tensors_data(tmp_path / "tables" / f"{method}.json").data
        assert sorted(table) == ["flat", "r"], "only the MatMuls' activation inputs: the ranges the quantizer reads"
        for t in table:
            got = table[t].range_value
            edges = bin_edges[method][t][1]
            for g, w in zip(got, want[method][t][:2]):
                apart = _bins_apart(g, w, edges)
                assert apart <= (0 if method == "minmax" else 1.001), f"{method} {t}: {got} vs ORT {want[method][t][:2]}"


def test_minmax_alone_counts_no_histogram_and_gives_the_same_table(tmp_path, monkeypatch):
    """A minmax-only calibration (SmoothQuant's smoothed graph) makes no counting pass, and its table is the
    minmax table of a full calibration exactly."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    import vitq.tasks._histograms as histograms
    from vitq.tasks.calibrate import calibrate_inputs
    from vitq.config import CalibrationConfig

    _tiny_onnx(tmp_path / "tiny.onnx")
    x = (np.random.default_rng(2).standard_t(4, (40, 3, 4, 4))).astype(np.float32)
    calibrate_inputs(tmp_path / "tiny.onnx", x, CalibrationConfig(num_bins=NUM_BINS, batch_size=16), tmp_path / "full")
    counted, histc = [], histograms._histc
    monkeypatch.setattr(histograms, "_histc", lambda *a, **k: counted.append(1) or histc(*a, **k))
    calibrate_inputs(tmp_path / "tiny.onnx", x, CalibrationConfig(methods=("minmax",), num_bins=NUM_BINS, batch_size=16),
                     tmp_path / "minmax")
    assert counted == [], "a minmax-only calibration must not count histograms"
    full = load_tensors_data(tmp_path / "full" / "minmax.json").data
    alone = load_tensors_data(tmp_path / "minmax" / "minmax.json").data
    assert sorted(alone) == sorted(full) and len(alone) == 2
    for t in full:
        assert np.array_equal(alone[t].range_value, full[t].range_value), t


def test_the_range_search_reads_the_calibrate_stages_histograms(tmp_path, monkeypatch):
    """The calibrate stage keeps its histograms (histograms.npz, content digest in calibration.json); the range
    search over the same graph and images reads them instead of another pass, with the same candidates."""
    import json

    import vitq.tasks.calibrate as calibrate
    from vitq.tasks.recovery.calib_search import candidate_ranges
    from vitq.config import CalibrationConfig

    _tiny_onnx(tmp_path / "tiny.onnx")
    x = (np.random.default_rng(3).standard_t(4, (40, 3, 4, 4))).astype(np.float32)
    cfg = CalibrationConfig(num_bins=NUM_BINS, batch_size=16)
    calibrate.calibrate_inputs(tmp_path / "tiny.onnx", x, cfg, tmp_path / "a")
    calibrate.calibrate_inputs(tmp_path / "tiny.onnx", x, cfg.model_copy(update={"percentile": 99.9}), tmp_path / "b")
    digests = [json.loads((tmp_path / d / "calibration.json").read_text())["histograms_sha256"] for d in "ab"]
    assert digests[0] is not None and digests[0] == digests[1], "equal histograms, equal digest (the percentile is not in it)"
    counted = candidate_ranges(tmp_path / "tiny.onnx", x, cfg, (99.9, 99.99))

    def no_pass(*args, **kwargs):
        raise AssertionError("the search counted again instead of reading the saved histograms")

    monkeypatch.setattr(calibrate, "collect_histograms", no_pass)
    read = candidate_ranges(tmp_path / "tiny.onnx", x, cfg, (99.9, 99.99), saved=tmp_path / "a" / calibrate.HISTOGRAMS)
    assert read == counted and len(read) == 2 and {"minmax", "mse", "entropy", "percentile-99.9"} <= set(read[next(iter(read))])
    # Other bins than the saved ones: counted again, never a mismatched read.
    with pytest.raises(AssertionError, match="counted again"):
        candidate_ranges(tmp_path / "tiny.onnx", x, cfg.model_copy(update={"num_bins": 256}), (99.9,),
                         saved=tmp_path / "a" / calibrate.HISTOGRAMS)


@pytest.mark.parametrize("attention", [False, True])
def test_ranges_left_out_are_never_read(staged_workspace, tmp_path, attention):
    """Calibration measures only what the quantizer reads (tasks/calibrate.py): the inputs of the linear op
    types, and the attention MatMuls' inputs only for `quantize_attention`. The Q/DQ graph from such a table
    equals the one from that table plus a range for every tensor ORT's own selection adds (nonsense ranges:
    any read of them would change the graph); a table without the attention inputs is refused by a recipe
    that quantizes attention, never quantized with them left silently in float."""
    import onnx
    from onnxruntime.quantization.calibrate import CalibraterBase

    from vitq.tasks.targets.onnx.backend import activation_matmuls, quantize
    from vitq.tasks.calibrate import calibrate_inputs
    from vitq.tasks.layout import Workspace
    from vitq.tasks.recovery.calib_search import read_amax, write_table
    from vitq.config import CalibrationConfig
    from vitq.errors import VitqError
    from vitq.recipes import LINEAR_OP_TYPES, get_recipe

    ws = Workspace(staged_workspace)
    prep = ws.export_dir / "model.prep.onnx"
    model = onnx.load(str(prep))
    shape = [d.dim_value or 4 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    calibrate_inputs(prep, x, CalibrationConfig(methods=("minmax",)), tmp_path / "tables", attention=attention)
    measured = read_amax(tmp_path / "tables" / "minmax.json")
    selector = CalibraterBase.__new__(CalibraterBase)  # ORT's selection rule alone (no session, no augmented file)
    selector.op_types_to_calibrate = list(LINEAR_OP_TYPES)
    ort_selection, _ = selector.select_tensors_to_calibrate(model)
    attention_nodes = set(activation_matmuls(model))
    read = {t for n in model.graph.node if n.op_type in LINEAR_OP_TYPES and (attention or n.name not in attention_nodes)
            for t in n.input}
    assert attention_nodes and set(measured) == ort_selection & read and ort_selection - set(measured)
    write_table(tmp_path / "measured.json", measured)
    write_table(tmp_path / "everything.json", {**measured, **{t: 1e-3 for t in ort_selection - set(measured)}})
    recipe = dataclasses.replace(get_recipe("onnx-w8a8-minmax"), quantize_attention=attention)
    graphs = []
    for name in ("measured", "everything"):
        quantize(recipe, prep, tmp_path / f"{name}.onnx", tmp_path / f"{name}.json")
        graphs.append(onnx.load(str(tmp_path / f"{name}.onnx")).graph.SerializeToString())
    assert graphs[0] == graphs[1]
    if not attention:
        with pytest.raises(VitqError, match="no range for .* an input of .*quantize_attention"):
            quantize(dataclasses.replace(recipe, quantize_attention=True), prep, tmp_path / "refused.onnx",
                     tmp_path / "measured.json")
        assert not (tmp_path / "refused.onnx").exists()
