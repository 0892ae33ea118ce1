import pytest
import yaml

from conftest import REPO
from vitq.config import Params, params_hash
from vitq.params import load_params, parse_params
from vitq.errors import ConfigError


def test_shipped_params_are_the_defaults():
    assert load_params(REPO / "params.yaml") == parse_params({})
    assert parse_params({}).model.model_copy(update={"name": None}) == Params().model  # the schema's own defaults


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"modle": {}}, "unknown key 'modle'"),
        ({"model": {"nmae": "x"}}, "unknown key 'model.nmae'"),
        ({"benchmark": {"threads": "two"}}, "benchmark.threads"),
        ({"quantize": {"recipes": ["onnx-w4-magic"]}}, "unknown recipe 'onnx-w4-magic'; allowed: coreml-fp16, coreml-w8"),
        ({"calibration": {"methods": ["minmax", "mse2"]}}, "unknown calibration method 'mse2'; allowed: minmax"),
        ({"data": {"source": "cifar"}}, "data.source"),
        ({"export": {"opset": 13}}, "export.opset"),
        ({"data": {"source": "imagefolder"}}, "data.path is required"),
        ({"model": {"source": "train", "checkpoint": "w.pt"}}, "model.checkpoint does not apply to model.source 'train'"),
        (
            {"calibration": {"methods": ["minmax"]}, "quantize": {"recipes": ["onnx-w8a8-entropy"], "carry": {}}},
            "needs the 'entropy' calibration table",
        ),
        ({"quantize": {"recipes": ["onnx-w8a8-auto", "coreml-w8a8-auto"], "carry": {}}},
         "list it under quantize.carry as 'coreml-w8a8-auto: onnx-w8a8-auto'"),
        ({"quantize": {"recipes": ["onnx-w8a8-minmax"], "carry": {"coreml-w8a8-auto": "onnx-w8a8-auto"}}},
         "add 'onnx-w8a8-auto' to quantize.recipes"),
        ({"quantize": {"recipes": ["onnx-w8a8-minmax"], "carry": {"coreml-w8a8-auto": "onnx-w8a8-minmax"}}},
         "'coreml-w8a8-auto' applies 'onnx-w8a8-auto''s decision, not 'onnx-w8a8-minmax'"),
        ({"quantize": {"recipes": ["onnx-w8a8-minmax"], "carry": {"coreml-w8": "onnx-w8a8-minmax"}}},
         "'coreml-w8' is not a recipe that applies another's decision; allowed: coreml-w8a8-auto"),
    ],
)
def test_bad_params_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as exc:
        parse_params(raw)
    msg = str(exc.value)
    assert needle in msg, msg
    assert "\n" not in msg


def test_load_params_rejects_non_mapping_and_bad_yaml(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(p)
    p.write_text("model: {name: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_params_hash_changes_with_a_recipe_parameter():
    a = parse_params({})
    b = parse_params({"calibration": {"percentile": 99.9}})
    assert params_hash(a) != params_hash(b)
    assert params_hash(a) == params_hash(parse_params(yaml.safe_load((REPO / "params.yaml").read_text())))
