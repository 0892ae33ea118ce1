"""Model sources (tasks/sources.py): torchvision, a Python factory, an FP32 ONNX file, and their bad inputs."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import REPO, make_workspace, tiny_params, vitq
from vitq.tasks.data import load_split, model_inputs, prepare_data
from vitq.tasks.layout import Workspace
from vitq.tasks.model import load_model, load_model_spec, predict, resolve_model
from vitq.config import DataConfig, ModelConfig
from vitq.params import parse_params
from vitq.errors import ConfigError, ModelError, VitqError

# A user's model file: a tiny conv net for the digits (1 x 32 x 32), and factories that go wrong.
FACTORY = textwrap.dedent('''
    import torch


    class Tiny(torch.nn.Module):
        def __init__(self, width=8, classes=10):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, width, 4, stride=4)  # (N, width, 8, 8)
            self.head = torch.nn.Linear(width * 64, classes)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).flatten(1))


    def build(width=8, classes=10):
        return Tiny(width, classes)


    def broken(**kwargs):
        raise RuntimeError("no such width\\nsecond line of the message")


    def not_a_module(**kwargs):
        return {"weights": 1}


    def nested_outputs(**kwargs):
        class Nested(Tiny):
            def forward(self, x):
                return super().forward(x), [x]
        return Nested()
''')


def _write_factory(root):
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "models" / "tiny.py").write_text(FACTORY)
    return "models/tiny.py"


def _tiny(width=8, seed=0) -> torch.nn.Module:
    namespace: dict = {}
    exec(FACTORY, namespace)
    torch.manual_seed(seed)
    return namespace["build"](width=width).eval()


def _x(data_dir, spec, n=8):
    return model_inputs(load_split(data_dir, "validation").images[:n], spec.mean, spec.std)


# --- python: a factory in the user's own file -----------------------------------------------------------------


def test_python_factory_with_a_checkpoint_rebuilds_in_another_process(staged_workspace, tmp_path):
    ws = Workspace(staged_workspace)
    factory_file = _write_factory(tmp_path)
    weights = _tiny(width=6, seed=3)
    torch.save(weights.state_dict(), tmp_path / "tiny.pth")
    cfg = ModelConfig(source="python", factory=f"{factory_file}:build", arch={"width": 6}, checkpoint="tiny.pth",
                      mean=[0.5], std=[0.25])
    spec = resolve_model(cfg, ws.data_dir, tmp_path / "model", seed=1, root=tmp_path)  # relative to the workspace
    assert spec.source == "python" and spec.name == "build" and spec.input_size == [1, 32, 32]
    assert spec.mean == [0.5] and spec.std == [0.25] and spec.num_classes == 10 and spec.top1 is not None
    assert spec.build["file"] == str((tmp_path / factory_file).resolve()) and spec.create_kwargs == {"width": 6}
    x = _x(ws.data_dir, spec)
    np.save(tmp_path / "x.npy", x)
    # Another process, another working directory: model.json alone says how to rebuild it.
    code = ("import sys, numpy as np; from vitq.tasks.model import load_model, predict; "
            "m, _ = load_model(sys.argv[1]); np.save(sys.argv[2], predict(m, np.load(sys.argv[3])))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "model"), str(tmp_path / "y.npy"), str(tmp_path / "x.npy")],
                   cwd="/", check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), predict(weights, x), atol=1e-6)
    # The factory file changed since the weights were saved: refused, not rebuilt from the new code.
    (tmp_path / factory_file).write_text(FACTORY.replace("stride=4", "stride=2"))
    with pytest.raises(ModelError, match="changed since the model stage"):
        load_model(tmp_path / "model")


def test_python_factory_without_checkpoint_is_seeded_and_a_module_path_works(tmp_path):
    # `package.module:function`: torchvision's VisionTransformer class, made tiny through model.arch (3 x 32 x 32).
    data_dir = tmp_path / "data"
    prepare_data(DataConfig(channels=3, validation_size=24, calibration_size=8), 0, data_dir)
    arch = {"image_size": 32, "patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32,
            "num_classes": 10}
    cfg = ModelConfig(source="python", factory="torchvision.models.vision_transformer:VisionTransformer", arch=arch,
                      mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    a = resolve_model(cfg, data_dir, tmp_path / "a", seed=4, root=tmp_path)
    resolve_model(cfg, data_dir, tmp_path / "b", seed=4, root=tmp_path)
    assert a.name == "VisionTransformer" and a.build["module"] == "torchvision.models.vision_transformer"
    assert "seed 4" in a.build["weights"]
    x = _x(data_dir, a)
    np.testing.assert_array_equal(predict(load_model(tmp_path / "a")[0], x), predict(load_model(tmp_path / "b")[0], x))


def test_tiny_torchvision_vit_from_a_factory_goes_through_core_ml_w8a8_with_every_weight_int8(tmp_path):
    """The fast stand-in for vit_b_16 (the slow test below): torchvision's VisionTransformer, small through
    model.arch, its nn.MultiheadAttention projections among the int8 weights."""
    pytest.importorskip("coremltools")
    import csv

    from vitq.tasks.targets.coreml.variants import quantize_variant
    from vitq.recipes import get_recipe

    data_dir = tmp_path / "data"
    prepare_data(DataConfig(channels=3, validation_size=16, calibration_size=8), 0, data_dir)
    arch = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64,
            "num_classes": 10}
    cfg = ModelConfig(source="python", factory="torchvision.models.vision_transformer:VisionTransformer", arch=arch,
                      mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    resolve_model(cfg, data_dir, tmp_path / "model", seed=0, root=tmp_path)
    art = quantize_variant(get_recipe("coreml-w8a8"), tmp_path / "model", data_dir, tmp_path / "variants")
    with open(tmp_path / "variants" / "coreml-w8a8" / "coverage.csv") as f:
        weighted = [r for r in csv.DictReader(f) if int(r["weight_elements"]) > 0]
    # per block: attention's q / k / v (nn.MultiheadAttention's in_proj, split) and out_proj, mlp.0, mlp.3; plus the
    # patch conv and the head
    assert len(weighted) == 2 * 6 + 2 and all(r["int8_weight"] == "True" for r in weighted), weighted
    assert art.int8_weight_fraction == 1.0


@pytest.mark.parametrize(
    "factory, extra, needle",
    [
        ("models/absent.py:build", {}, "file '{root}/models/absent.py' does not exist"),
        ("models/tiny.py:nowhere", {}, "'models/tiny.py' has no 'nowhere'"),
        ("models/tiny.py:broken", {}, "model.factory 'models/tiny.py:broken' raised RuntimeError: no such width"),
        ("models/tiny.py:not_a_module", {}, "returned a dict, not a torch.nn.Module"),
        ("models/tiny.py:nested_outputs", {}, "returns output 'output_1' that is a list; vitq compares float tensors"),
        ("models/tiny.py:build", {"arch": {"depth": 3}}, "raised TypeError: build() got an unexpected keyword"),
        ("no_such_package.models:build", {}, "no module named 'no_such_package'"),
    ],
)
def test_bad_factory_is_one_error_and_writes_nothing(staged_workspace, tmp_path, factory, extra, needle):
    ws = Workspace(staged_workspace)
    _write_factory(tmp_path)
    cfg = ModelConfig(source="python", factory=factory, mean=[0.5], std=[0.5], **extra)
    with pytest.raises(VitqError) as info:
        resolve_model(cfg, ws.data_dir, tmp_path / "model", seed=0, root=tmp_path)
    message = str(info.value)
    assert needle.format(root=tmp_path) in message and "\n" not in message, message
    assert not (tmp_path / "model").exists()


# --- torchvision: a name, weights from a local file --------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb224(tmp_path_factory):
    """An image folder (2 classes: scikit-learn's digits 0 and 1, saved as RGB PNGs) prepared at 224 x 224 RGB."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("rgb224")
    digits = load_digits()
    for split, n, offset in (("val", 3, 0), ("calibration", 2, 3)):
        for cls in (0, 1):
            (root / "images" / split / str(cls)).mkdir(parents=True)
            for i, img in enumerate(digits.images[digits.target == cls][offset : offset + n]):
                rgb = np.repeat((img * 255 / 16).astype(np.uint8)[..., None], 3, axis=2)
                Image.fromarray(rgb).save(root / "images" / split / str(cls) / f"{i}.png")
    cfg = DataConfig(source="imagefolder", path=str(root / "images"), image_size=224, channels=3, calibration_size=4)
    prepare_data(cfg, 0, root / "data")
    return root / "data"


def test_torchvision_model_takes_its_weights_transforms_and_a_local_checkpoint(rgb224, tmp_path):
    import torchvision

    torch.manual_seed(7)
    saved = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=2).eval()
    torch.save(saved.state_dict(), tmp_path / "mnv3.pth")
    cfg = ModelConfig(source="torchvision", name="mobilenet_v3_small", num_classes=2, checkpoint="mnv3.pth")
    spec = resolve_model(cfg, rgb224, tmp_path / "model", seed=0, root=tmp_path)
    transforms = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.transforms()
    assert spec.mean == list(transforms.mean) and spec.std == list(transforms.std)
    assert spec.input_size == [3, *transforms.crop_size * 2] and "transforms" in spec.input_contract
    assert spec.top1 is not None and spec.num_classes == 2 and spec.build["weights"] == "checkpoint mnv3.pth"
    x = _x(rgb224, spec, 4)
    np.testing.assert_allclose(predict(load_model(tmp_path / "model")[0], x), predict(saved, x), atol=1e-5)


@pytest.mark.parametrize(
    "cfg, needle",
    [
        (dict(name="vit_b_61"), "unknown torchvision model 'vit_b_61' (did you mean vit_b_16"),
        (dict(name="mobilenet_v3_small", checkpoint="absent.pth"), "model.checkpoint 'absent.pth' does not exist"),
        (dict(name="mobilenet_v3_small", num_classes=5), "head of another size"),
    ],
)
def test_bad_torchvision_model_is_one_error(rgb224, tmp_path, cfg, needle):
    import torchvision

    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=2).state_dict(),
               tmp_path / "mnv3.pth")
    cfg = {"checkpoint": "mnv3.pth", **cfg}
    with pytest.raises(ModelError) as info:
        resolve_model(ModelConfig(source="torchvision", **cfg), rgb224, tmp_path / "model", seed=0, root=tmp_path)
    if needle == "head of another size":
        needle = "set model.num_classes: 2"
    assert needle in str(info.value), info.value
    assert not (tmp_path / "model").exists()


def test_torchvision_input_size_must_match_the_data(staged_workspace, tmp_path):
    import torchvision

    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict(), tmp_path / "w.pth")
    cfg = ModelConfig(source="torchvision", name="mobilenet_v3_small", checkpoint="w.pth")
    with pytest.raises(ModelError, match="takes 3-channel input but data.channels is 1; set data.channels: 3"):
        resolve_model(cfg, Workspace(staged_workspace).data_dir, tmp_path / "model", seed=0, root=tmp_path)


# --- onnx: an FP32 ONNX file ---------------------------------------------------------------------------------


def _export_tiny(path, batch_fixed=True, seed=0):
    """The tiny net as an FP32 ONNX file with its own names and a fixed batch of 1, as users' files often are."""
    model = _tiny(seed=seed)
    torch.onnx.export(model, (torch.zeros(1, 1, 32, 32),), str(path), input_names=["pixels"], output_names=["scores"],
                      dynamo=False, opset_version=17, dynamic_axes=None if batch_fixed else {"pixels": {0: "n"}})
    return model


def test_onnx_file_goes_through_export_calibration_and_quantization(staged_workspace, tmp_path):
    import onnx
    import onnxruntime as ort

    from vitq.tasks.calibrate import calibrate
    from vitq.tasks.export import export_onnx
    from vitq.tasks.quantize import quantize_variant
    from vitq.tasks.targets.onnx.target import ONNX
    from vitq.config import CalibrationConfig, ExportConfig

    ws = Workspace(staged_workspace)
    torch_model = _export_tiny(tmp_path / "tiny.onnx")
    cfg = ModelConfig(source="onnx", path="tiny.onnx", mean=[0.5], std=[0.5])
    spec = resolve_model(cfg, ws.data_dir, tmp_path / "model", seed=0, root=tmp_path)
    assert spec.name == "tiny" and spec.num_classes == 10 and spec.top1 is not None and not spec.torch_model
    assert (tmp_path / "model" / "model.onnx").read_bytes() == (tmp_path / "tiny.onnx").read_bytes()
    with pytest.raises(ModelError, match="is an ONNX file .* no torch model to load"):
        load_model(tmp_path / "model")
    result = export_onnx(tmp_path / "model", ws.data_dir, ExportConfig(), tmp_path / "export")
    exported = onnx.load(str(tmp_path / "export" / "model.onnx"))
    assert [i.name for i in exported.graph.input] == ["input"] and [o.name for o in exported.graph.output] == ["logits"]
    assert exported.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert all(n.name for n in exported.graph.node) and result.opset == 17 and result.max_abs_diff < 1e-5
    x = _x(ws.data_dir, spec, 16)
    got = ort.InferenceSession(str(tmp_path / "export" / "model.prep.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, predict(torch_model, x), atol=1e-4)  # a batch of 16 through a batch-1 file
    calibrate(tmp_path / "export" / "model.prep.onnx", tmp_path / "model", ws.data_dir,
              CalibrationConfig(methods=("minmax",)), tmp_path / "calibration")
    art = quantize_variant("onnx-w8a8-minmax", tmp_path / "export" / "model.prep.onnx", tmp_path / "calibration",
                           tmp_path / "variants", ONNX.serve_graph)
    assert art.int8_weight_fraction == 1.0 and art.op_counts.get("QuantizeLinear", 0) > 0, art


def _hand_made(path, dtype="FLOAT", init_dtype="FLOAT", broken=False):
    """A 1-node ONNX model (input (N, 1, 32, 32) -> Conv -> output) with chosen element types."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    t = getattr(TensorProto, dtype)
    w = numpy_helper.from_array(np.ones((2, 1, 4, 4), dtype=helper.tensor_dtype_to_np_dtype(getattr(TensorProto, init_dtype))), "w")
    nodes = [helper.make_node("Conv", ["x", "w" if not broken else "nowhere"], ["y"], strides=[4, 4], name="conv")]
    if init_dtype != dtype:  # weights stored in another type, cast to the compute type (a valid graph)
        nodes.insert(0, helper.make_node("Cast", ["w16"], ["w"], to=t, name="cast"))
        w.name = "w16"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", t, ["n", 1, 32, 32])],
                              [helper.make_tensor_value_info("y", t, ["n", 2, 8, 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("fp16 input", "input 'x' is FLOAT16, not FLOAT"),
        ("fp16 weights", "initializer 'w16' is FLOAT16: not an FP32 model"),
        ("checker", "fails the ONNX checker"),
        ("quantized", "holds DynamicQuantizeLinear nodes"),
        ("not onnx", "is not a readable ONNX file"),
        ("missing", "does not exist; give the path to an FP32 ONNX file"),
    ],
)
def test_onnx_file_that_is_not_fp32_or_fails_the_checker_is_refused(staged_workspace, tmp_path, kind, needle):
    path = tmp_path / "m.onnx"
    if kind == "fp16 input":
        _hand_made(path, dtype="FLOAT16", init_dtype="FLOAT16")
    elif kind == "fp16 weights":
        _hand_made(path, init_dtype="FLOAT16")
    elif kind == "checker":
        _hand_made(path, broken=True)
    elif kind == "quantized":
        from onnxruntime.quantization import quantize_dynamic

        _export_tiny(tmp_path / "fp32.onnx")
        quantize_dynamic(str(tmp_path / "fp32.onnx"), str(path))
    elif kind == "not onnx":
        path.write_text("not a model\n")
    cfg = ModelConfig(source="onnx", path="m.onnx", mean=[0.5], std=[0.5])
    with pytest.raises(ModelError) as info:
        resolve_model(cfg, Workspace(staged_workspace).data_dir, tmp_path / "model", seed=0, root=tmp_path)
    assert needle in str(info.value) and "model.path 'm.onnx'" in str(info.value), info.value
    assert not (tmp_path / "model").exists()


def test_onnx_file_of_another_input_size_names_the_data_key(staged_workspace, tmp_path):
    import onnx

    _hand_made(tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 64  # a 64 x 32 input
    m.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 16  # (N, 2, 16, 8) out
    onnx.save(m, str(tmp_path / "m.onnx"))
    cfg = ModelConfig(source="onnx", path="m.onnx", mean=[0.5], std=[0.5])
    with pytest.raises(ModelError, match=r"takes input \(N, 1, 64, 32\) .* set data.image_size: 64"):
        resolve_model(cfg, Workspace(staged_workspace).data_dir, tmp_path / "model", seed=0, root=tmp_path)


# --- params.yaml: which keys each source takes, and which recipes an ONNX file cannot take ---------------------


@pytest.mark.parametrize(
    "model, quantize, needle",
    [
        ({"source": "hub"}, None, "unknown model source 'hub'; allowed: train, timm, torchvision, python, onnx"),
        ({"source": "python", "factory": "m.py:f"}, None, "model.mean is required when model.source is 'python'"),
        ({"source": "onnx", "path": "m.onnx"}, None, "model.mean is required when model.source is 'onnx'"),
        ({"source": "onnx", "path": "m.onnx", "mean": [0.5], "std": [0.5], "checkpoint": "w.pth"}, None,
         "model.checkpoint does not apply to model.source 'onnx'"),
        ({"source": "torchvision", "name": "vit_b_16"}, None, "model.checkpoint is required when model.source is"),
        ({"source": "python", "factory": "m.py:f", "mean": [0.5, 0.5], "std": [0.5, 0.5]}, None,
         "model.mean has 2 values but data.channels is 1"),
        ({"source": "onnx", "path": "m.onnx", "mean": [0.5], "std": [0.5]},
         {"recipes": ["onnx-w8a8-minmax", "coreml-w8a8"], "carry": {}},
         "recipe 'coreml-w8a8' converts the torch model (target 'coreml'), and model.source 'onnx' has none"),
        ({"source": "onnx", "path": "m.onnx", "mean": [0.5], "std": [0.5]},
         {"recipes": ["onnx-w8a8-smoothquant"], "carry": {}}, "rescales the torch model's weights"),
    ],
)
def test_params_refuse_keys_a_source_does_not_take(model, quantize, needle):
    raw = tiny_params(model=model)
    raw["model"] = {k: v for k, v in raw["model"].items() if k in ("source", "train", *model)}
    if quantize:
        raw["quantize"] = {**raw["quantize"], **quantize}
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert needle in str(info.value), info.value


def test_onnx_source_takes_the_onnx_and_tensorrt_recipes():
    raw = tiny_params(model={"source": "onnx", "path": "m.onnx", "mean": [0.5], "std": [0.5]})
    raw["model"] = {k: raw["model"][k] for k in ("source", "path", "mean", "std")}
    raw["quantize"] = {"define": {}, "carry": {}, "recipes": ["onnx-w8-dynamic", "onnx-w8a8-minmax",
                                                                  "tensorrt-w8a8-percentile"]}
    assert parse_params(raw).model.name == "m"


# --- the CLI: one line, exit 2, nothing written -----------------------------------------------------------------


@pytest.fixture(scope="module")
def data_ws(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("sources-cli") / "ws", tiny_params(), dvc=False)
    assert vitq(["stage", "data"], root).returncode == 0
    _write_factory(root)
    _hand_made(root / "fp16.onnx", init_dtype="FLOAT16")
    return root


@pytest.mark.parametrize(
    "model, recipes, needle",
    [
        ({"source": "hub"}, None, "unknown model source 'hub'"),
        ({"factory": "models/absent.py:build"}, None, "does not exist"),
        ({"factory": "models/tiny.py:nowhere"}, None, "has no 'nowhere'"),
        ({"factory": "models/tiny.py:broken"}, None, "raised RuntimeError: no such width"),
        ({"factory": "models/tiny.py:not_a_module"}, None, "not a torch.nn.Module"),
        ({"source": "python", "factory": "models/tiny.py:build"}, None, "model.mean is required"),
        ({"source": "onnx", "path": "fp16.onnx", "mean": [0.5], "std": [0.5]}, ["onnx-w8a8-minmax"],
         "initializer 'w16' is FLOAT16"),
        ({"source": "onnx", "path": "fp16.onnx", "mean": [0.5], "std": [0.5]}, ["coreml-fp16"],
         "recipe 'coreml-fp16' converts the torch model (target 'coreml')"),
    ],
)
def test_cli_bad_source_is_one_line_exit_2_and_writes_nothing(data_ws, model, recipes, needle):
    import yaml

    params = tiny_params()
    keep = {"train": params["model"]["train"]}
    if "factory" in model and "source" not in model:
        model = {"source": "python", "mean": [0.5], "std": [0.5], **model}
    params["model"] = {**keep, **model}
    params["quantize"] = {"define": {}, "carry": {}, "recipes": recipes or ["onnx-w8a8-minmax"]}
    (data_ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = vitq(["stage", "model"], data_ws)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("vitq: error: ") and needle in lines[0], lines[0]
    assert not Workspace(data_ws).model_dir.exists()


# --- issue 12, item 5: torchvision vit_b_16 through `vitq run` with the Core ML recipes ----------------------


def _vit_b_16_workspace(root):
    """A workspace for torchvision `vit_b_16` (weights: a seeded random init saved to a local file, since
    nothing downloads here; torchvision zero-inits the head, so it is drawn from N(0, 0.02) to make the logits
    differ between images) on 16 validation and 16 calibration images (digits 0 and 1, RGB, 224 x 224)."""
    import torchvision
    import yaml
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split, offset in (("val", 0), ("calibration", 8)):
        for cls in (0, 1):
            (root / "images" / split / str(cls)).mkdir(parents=True)
            for i, img in enumerate(digits.images[digits.target == cls][offset : offset + 8]):
                rgb = np.repeat((img * 255 / 16).astype(np.uint8)[..., None], 3, axis=2)
                Image.fromarray(rgb).save(root / "images" / split / str(cls) / f"{i}.png")
    torch.manual_seed(0)
    model = torchvision.models.get_model("vit_b_16", weights=None)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    torch.save(model.state_dict(), root / "vit_b_16.pth")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="imagefolder", path=str(root / "images"), image_size=224, channels=3,
                          calibration_size=16)
    params["model"] = {"source": "torchvision", "name": "vit_b_16", "checkpoint": "vit_b_16.pth",
                       "train": params["model"]["train"]}
    params["calibration"]["methods"] = ["minmax"]  # Core ML calibrates in torch; the ONNX tables are unused
    params["quantize"] = {"define": {}, "recipes": ["coreml-fp16", "coreml-w8", "coreml-w8a8"], "carry": {}}
    params["validate"]["error_report_images"] = 0
    params["benchmark"].update(warmup=1, repeats=5, rounds=1)
    return make_workspace(root, params)


@pytest.mark.slow
def test_torchvision_vit_b_16_through_vitq_run_core_ml_w8a8_is_half_of_fp16_with_every_weight_int8(tmp_path):
    import csv
    import json

    import mlflow

    pytest.importorskip("coremltools")
    ws = _vit_b_16_workspace(tmp_path / "ws")
    proc = vitq(["run"], ws, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((ws / "reports" / "summary.json").read_text())
    variants = {v["name"]: v for v in summary["variants"]}
    fp16, w8a8 = variants["coreml-fp16"], variants["coreml-w8a8"]
    smaller = 1 - w8a8["size_mb"] / fp16["size_mb"]
    assert smaller >= 0.49, f"coreml-w8a8 {w8a8['size_mb']:.2f} MB is {100 * smaller:.1f}% smaller than fp16 {fp16['size_mb']:.2f} MB"
    assert w8a8["int8_weight_fraction"] == 1.0, w8a8
    with open(ws / "artifacts" / "variants" / "coreml-w8a8" / "coverage.csv") as f:
        rows = list(csv.DictReader(f))
    weighted = [r for r in rows if int(r["weight_elements"]) > 0]
    # 12 blocks x (q, k, v, out_proj of nn.MultiheadAttention, mlp.0, mlp.3) + the patch conv + the head
    assert len(weighted) == 12 * 6 + 2 and all(r["int8_weight"] == "True" for r in weighted), [
        r["layer"] for r in weighted if r["int8_weight"] != "True"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vit_b_16").experiment_id])
    children = {r.data.tags["mlflow.runName"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == {"coreml-fp16", "coreml-w8", "coreml-w8a8"}
    assert children["coreml-w8a8"].data.metrics["size_mb"] == pytest.approx(w8a8["size_mb"])
