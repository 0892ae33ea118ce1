"""Recipes as typed configs per target, and recipes params.yaml defines as a preset plus overrides
(`quantize.define`): strict validation, the table at the recipe's own percentile, layers kept float by glob,
and a plan record that follows exactly the defined variant's inputs."""

from __future__ import annotations

import json

import onnx
import pytest

from conftest import REPO, tiny_params, vitq, workspace_copy
from vitq.tasks import stages
from vitq.tasks.variant import load_variant
from vitq.tasks.calibrate import table_path
from vitq import recipes
from vitq.params import parse_params
from vitq.errors import ConfigError

# The tiny model (1 block): the glob names both Linear layers of its attention, not the MLP.
DEFINED = {"pct-attn-float": {"preset": "onnx-w8a8-percentile", "percentile": 99.99, "float_layers": ["blocks.0.attn.*"]}}
ATTN_LINEARS = ["blocks.0.attn.qkv", "blocks.0.attn.proj"]


def _params(define=DEFINED, recipes_=("onnx-w8a8-percentile", "pct-attn-float"), **over):
    return tiny_params(quantize={"define": define, "recipes": list(recipes_), "carry": {}}, **over)


@pytest.fixture(autouse=True)
def _registry():
    """Parsing params registers their defined recipes; leave the registry as the presets after each test."""
    yield
    recipes.register_defined({})


def test_every_preset_is_a_typed_config_with_only_its_targets_fields():
    by_type = {n: type(r).__name__ for n, r in recipes.RECIPES.items()}
    assert by_type["onnx-w8-dynamic"] == "OnnxDynamicConfig" and by_type["onnx-w8a8-minmax"] == "OnnxStaticConfig"
    assert by_type["tensorrt-w8a8-percentile"] == "TensorRTStaticConfig" and by_type["coreml-w8a8"] == "CoreMLConfig"
    coreml, static, dynamic = (recipes.RECIPES[n] for n in ("coreml-w8a8", "onnx-w8a8-minmax", "onnx-w8-dynamic"))
    assert not hasattr(coreml, "op_types") and not hasattr(coreml, "per_channel") and not hasattr(coreml, "calibration")
    assert not hasattr(static, "observer") and not hasattr(dynamic, "calibration") and dynamic.recovery is None
    assert static.table() == ("minmax", None) and coreml.table() is None


@pytest.mark.parametrize("define, recipes_, needle", [
    ({"x": {"preset": "onnx-w8a8-nope"}}, ["x"], "quantize.define: x.preset: unknown recipe 'onnx-w8a8-nope'; allowed: coreml-fp16"),
    ({"x": {"preset": "onnx-w8a8-percentile", "observer": "histogram"}}, ["x"],
     "quantize.define: x.observer: not a setting of onnx-w8a8-percentile (OnnxStaticConfig, target onnx); "
     "allowed: calibration, percentile, per_channel"),
    ({"x": {"preset": "coreml-w8a8", "percentile": 99.9}}, ["x"],
     "x.percentile: not a setting of coreml-w8a8 (CoreMLConfig, target coreml); allowed: observer, float_layers"),
    ({"x": {"preset": "onnx-w8a8-percentile", "percentile": 120}}, ["x"], "x: percentile must be a number in (50, 100]"),
    ({"x": {"preset": "onnx-w8a8-minmax", "percentile": 99.9}}, ["x"], "percentile applies to the 'percentile' calibration table"),
    ({"x": {"preset": "onnx-w8a8-percentile", "float_layers": "blocks.*"}}, ["x"], "float_layers must be a list of glob patterns"),
    ({"x": {"preset": "onnx-w8a8-auto", "float_layers": ["head"]}}, ["x"], "float_layers cannot be set on a recovery recipe"),
    ({"onnx-w8a8-minmax": {"preset": "onnx-w8a8-percentile"}}, ["onnx-w8a8-minmax"],
     "quantize.define: onnx-w8a8-minmax: clashes with the preset of that name"),
    ({"x": {"percentile": 99.9}}, ["x"], "x: needs 'preset: <recipe>'"),
    ({"x": {"preset": "onnx-w8a8-percentile"}}, ["y"], "quantize.recipes: unknown recipe 'y'; allowed: "),
])
def test_bad_definitions_are_one_line_errors_naming_the_key(define, recipes_, needle):
    with pytest.raises(ConfigError) as exc:
        parse_params(_params(define, recipes_))
    message = str(exc.value)
    assert needle in message and "\n" not in message, message


def test_defined_recipes_are_registered_when_params_are_parsed_and_replaced_on_the_next_parse():
    p = parse_params(_params())
    r = recipes.get_recipe("pct-attn-float")
    assert r == p.quantize.recipe("pct-attn-float") and type(r) is recipes.OnnxStaticConfig
    assert (r.percentile, r.float_layers, r.calibration, r.per_channel) == (99.99, ("blocks.0.attn.*",), "percentile", True)
    assert p.quantize.extra_percentiles == (99.99,)
    parse_params(tiny_params())  # params without it: gone from the registry
    with pytest.raises(ConfigError, match="unknown recipe 'pct-attn-float'"):
        recipes.get_recipe("pct-attn-float")


@pytest.fixture(scope="module")
def defined_ws(staged_workspace, tmp_path_factory):
    """A workspace copy calibrated with the defined recipe's percentile too, and its variant quantized."""
    ws, p = workspace_copy(staged_workspace, tmp_path_factory, "define"), parse_params(_params())
    stages.run_calibrate(ws, p)
    art = stages.quantize_one(ws, "pct-attn-float", p)
    recipes.register_defined({})
    return ws, art


def test_calibration_writes_the_override_table_from_the_same_histograms(defined_ws):
    ws, _ = defined_ws
    meta = json.loads((ws.calibration_dir / "calibration.json").read_text())
    assert meta["extra_percentiles"] == [99.99] and table_path(ws.calibration_dir, "percentile", 99.99).name == "percentile-99.99.json"
    default, override = (json.loads(table_path(ws.calibration_dir, "percentile", q).read_text())["data"] for q in (None, 99.99))
    assert default.keys() == override.keys()
    hi = lambda t, name: abs(float(t[name]["highest"]["data"]))  # noqa: E731
    # A lower percentile clips at least as much as calibration.percentile (99.999), and somewhere more.
    assert all(hi(override, n) <= hi(default, n) + 1e-6 for n in default)
    assert any(hi(override, n) < hi(default, n) - 1e-6 for n in default)


def test_defined_recipe_keeps_exactly_its_glob_layers_float_and_reads_its_own_table(defined_ws):
    from vitq.tasks.recovery import layers as layer_map

    ws, art = defined_ws
    assert art.calibration_table == "percentile-99.99.json" and art.float_layers == ATTN_LINEARS
    saved = load_variant(ws.variants_dir, "pct-attn-float")  # variant.json
    assert saved.float_layers == ATTN_LINEARS and saved.calibration_table == "percentile-99.99.json"
    assert saved.recipe["percentile"] == 99.99 and saved.recipe["float_layers"] == ["blocks.0.attn.*"]
    model = onnx.load(str(ws.variants_dir / "pct-attn-float" / "model.onnx"))
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    nodes = {n.name: n for n in model.graph.node}
    layers = layer_map.quantizable_layers(ws.export_dir / "model.onnx", ws.export_dir / "model.prep.onnx")
    for layer in (lay for lay in layers if lay.weighted):
        reads_dq = [nodes[n].input[0] in dq_out and nodes[n].input[1] in dq_out for n in layer.nodes]
        assert all(reads_dq) == (layer.name not in ATTN_LINEARS), (layer.name, reads_dq)
    # Its activation scales are the override table's ranges / 127 (symmetric int8), not percentile.json's.
    table = json.loads(table_path(ws.calibration_dir, "percentile", 99.99).read_text())["data"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = 0
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in table):
        t = table[q.input[0]]
        amax = max(abs(float(t["lowest"]["data"])), abs(float(t["highest"]["data"])))
        assert abs(float(inits[q.input[1]]) - amax / 127) <= 1e-5 * amax / 127, q.input[0]
        checked += 1
    assert checked


def test_a_glob_matching_nothing_names_the_pattern_and_writes_no_variant(defined_ws):
    ws, _ = defined_ws
    p = parse_params(_params({"typo": {"preset": "onnx-w8-dynamic", "float_layers": ["block.0.*"]}}, ["typo"]))
    with pytest.raises(ConfigError) as exc:
        stages.quantize_one(ws, "typo", p)
    assert "float_layers pattern 'block.0.*' matches no quantizable layer" in str(exc.value)
    assert "blocks.0.attn.qkv" in str(exc.value) and "\n" not in str(exc.value)
    assert not (ws.variants_dir / "typo").exists()


def test_plan_record_follows_the_defined_variants_override_and_no_other(tmp_path):
    from vitq.tasks.layout import Workspace
    from vitq.tasks.stages import plan_record

    ws = Workspace(tmp_path)
    ws.calibration_dir.mkdir(parents=True)
    for method, pct in (("minmax", None), ("percentile", None), ("entropy", None), ("percentile", 99.99), ("percentile", 99.9)):
        table_path(ws.calibration_dir, method, pct).write_text(json.dumps([method, pct]))
    names = ("onnx-w8-dynamic", "onnx-w8a8-minmax", "onnx-w8a8-percentile", "onnx-w8a8-auto", "coreml-w8a8", "pct-attn-float")
    recs = lambda params: {n: plan_record(ws, params, n) for n in names}  # noqa: E731
    base = recs(parse_params(_params()))
    assert base["pct-attn-float"]["reads"]["calibration_table"]["file"] == "percentile-99.99.json"
    for changed in ({"preset": "onnx-w8a8-percentile", "percentile": 99.9, "float_layers": ["blocks.0.attn.*"]},
                    {"preset": "onnx-w8a8-percentile", "percentile": 99.99, "float_layers": ["blocks.0.mlp.*"]}):
        after = recs(parse_params(_params({"pct-attn-float": changed})))
        assert {n for n in names if after[n] != base[n]} == {"pct-attn-float"}, changed
    # a new table at the override's percentile: only the variant that reads it
    table_path(ws.calibration_dir, "percentile", 99.99).write_text('"new"')
    after = recs(parse_params(_params()))
    assert {n for n in names if after[n] != base[n]} == {"pct-attn-float"}


def test_recipes_command_lists_typed_fields_and_the_workspaces_defined_recipes(tmp_path):
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params()))
    out = vitq(["recipes", "--workdir", str(tmp_path)], REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OnnxDynamicConfig(target='onnx' scheme='dynamic'" in out.stdout
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("pct-attn-float"))
    assert "percentile=99.99" in line and "float_layers=('blocks.0.attn.*',)" in line


def test_coreml_recipe_keeps_its_glob_layers_in_fp16(defined_ws):
    import csv

    ws, _ = defined_ws
    p = parse_params(_params({"coreml-attn-float": {"preset": "coreml-w8a8", "float_layers": ["blocks.0.attn.*"]}},
                             ["coreml-attn-float"]))
    art = stages.quantize_one(ws, "coreml-attn-float", p)
    assert sorted(art.float_layers) == sorted(ATTN_LINEARS)  # Core ML records them sorted
    assert load_variant(ws.variants_dir, "coreml-attn-float").float_layers == art.float_layers
    with open(ws.variants_dir / "coreml-attn-float" / "coverage.csv") as f:
        rows = {r["layer"]: r for r in csv.DictReader(f)}
    for name, row in rows.items():
        if row["op_type"] != "matmul":
            assert (row["int8_weight"] == "True") == (name not in ATTN_LINEARS), (name, row)


@pytest.mark.slow
def test_defined_recipe_through_vitq_run_and_dvc_reruns_only_its_variant(tmp_path):
    """`vitq run` makes the defined variant (DVC's `vitq stage quantize pct-attn-float` finds it: registered
    when params.yaml is parsed); changing its percentile reruns calibrate and that variant, no other."""
    import re
    import subprocess
    import sys

    import yaml

    from conftest import make_workspace, run_env

    ws = make_workspace(tmp_path / "ws", _params())
    proc = vitq(["run"], ws)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((ws / "reports" / "summary.json").read_text())
    assert [v["name"] for v in summary["variants"]] == ["onnx-w8a8-percentile", "pct-attn-float"]
    assert json.loads((ws / "artifacts/variants/pct-attn-float/variant.json").read_text())["float_layers"] == ATTN_LINEARS
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["quantize"]["define"]["pct-attn-float"]["percentile"] = 99.9
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=run_env(ws), capture_output=True,
                           text=True, timeout=900)
    assert repro.returncode == 0, repro.stdout[-2000:] + repro.stderr[-2000:]
    ran = set(re.findall(r"Running stage '([\w@.-]+)'", repro.stdout))
    # needs reads quantize.define (its answer unchanged), search the calibrate stage's output (its result unchanged:
    # no reader requantized)
    assert ran == {"calibrate", "needs", "search", "plan", "quantize@pct-attn-float", "validate@pct-attn-float",
                   "benchmark", "report"}, ran
    assert "Stage 'quantize@onnx-w8a8-percentile' didn't change, skipping" in repro.stdout
    assert (ws / "artifacts/calibration/percentile-99.9.json").is_file()


def test_the_static_presets_quantize_attention_so_calibration_measures_its_inputs(staged_workspace, tmp_path_factory):
    """The plain static presets quantize attention's activation MatMuls, so the calibrate stage measures their
    inputs (about half a ViT's calibrated values); their variants get Q/DQ on both inputs of each attention
    MatMul, and a defined recipe with quantize_attention: false leaves them float."""
    from vitq.tasks.targets.onnx.backend import activation_matmuls

    assert parse_params(tiny_params()).quantize.calibrates_attention
    assert json.loads((staged_workspace / "artifacts" / "calibration" / "calibration.json").read_text())["attention"] is True
    define = {"attn-float": {"preset": "onnx-w8a8-minmax", "quantize_attention": False}}
    ws, p = workspace_copy(staged_workspace, tmp_path_factory, "attn"), parse_params(_params(define, ["attn-float"]))
    prep = onnx.load(str(ws.export_dir / "model.prep.onnx"))
    attention = [n for n in prep.graph.node if n.name in set(activation_matmuls(prep))]
    assert attention
    for recipe, quantized in (("onnx-w8a8-minmax", True), ("attn-float", False)):
        stages.quantize_one(ws, recipe, p)
        q = onnx.load(str(ws.variants_dir / recipe / "model.onnx"))
        producers = {o: n.op_type for n in q.graph.node for o in n.output}
        matmuls = {n.name: n for n in q.graph.node if n.op_type == "MatMul"}
        assert all((producers.get(i) == "DequantizeLinear") == quantized
                   for n in attention for i in matmuls[n.name].input[:2]), recipe