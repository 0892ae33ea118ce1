"""Every `vitq init` path: source (timm, torchvision, python factory, ONNX file, train) x task (classification,
dense) x data (labelled class folders, images without labels, images with ground-truth masks, none) either writes
a workspace that `vitq run` takes (parsed as it parses params.yaml, its preflight passed, the data and model
stages run on it), or is refused at init in one line (exit 2) that says why, with nothing written.

Tiny models throughout: a 1-block timm ViT (32 x 32) and a timm ConvNeXt feature extractor (maps), torchvision's
mobilenet_v3_small and LR-ASPP (a dict of maps), a ViT-like classifier and mask head of the user's own (a factory
file), and both exported to ONNX. The slow tests run `vitq run` end to end on one workspace per source and task.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import VITQ, run_env

CLASSES = ("cat", "dog", "owl")
TIMM_ARCH = "{depth: 1, img_size: 32, patch_size: 8, embed_dim: 32, num_heads: 2}"
TIMM_DENSE_ARCH = "{num_classes: 0, global_pool: ''}"  # a ConvNeXt without its head: feature maps (N, 64, 5, 5)
LRASPP_ARCH = "{weights_backbone: null, num_classes: 2}"
NORM = ["--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--image-size", "16", "--channels", "3"]
NORM_ONNX = ["--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]  # the file's input shape says the rest
DATA = ("labelled", "unlabelled", "masks", "none")

MODELS_PY = '''
import torch
from torch import nn


class Block(nn.Module):
    """A ViT block: LayerNorm -> qkv, attention, proj; LayerNorm -> fc1, GELU, fc2."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """Patch embedding, one block, then a class head on the mean token (N, outputs) or a mask head per patch
    pixel (N, outputs, H, W)."""

    def __init__(self, channels=3, dim=16, patch=4, outputs=3, dense=False):
        super().__init__()
        self.patch, self.outputs, self.dense = patch, outputs, dense
        self.embed = nn.Conv2d(channels, dim, patch, patch)
        self.block = Block(dim)
        self.head = nn.Linear(dim, outputs * patch * patch if dense else outputs)

    def forward(self, x):
        n, _, h, w = x.shape
        t = self.embed(x)
        gh, gw = t.shape[2], t.shape[3]
        t = self.block(t.flatten(2).transpose(1, 2))
        if not self.dense:
            return self.head(t.mean(1))
        y = self.head(t).reshape(n, gh, gw, self.outputs, self.patch, self.patch)
        return y.permute(0, 3, 1, 4, 2, 5).reshape(n, self.outputs, h, w)


def classifier(channels=3, classes=3):
    torch.manual_seed(0)
    return TinyViT(channels, outputs=classes)


def segmenter(channels=3, masks=2):
    torch.manual_seed(0)
    return TinyViT(channels, outputs=masks, dense=True)


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = classifier()

    def forward(self, x):
        logits = self.model(x)
        return logits, logits.softmax(-1)


def two_outputs():
    return TwoOutputs()
'''


def _images(root: Path, rng: np.random.Generator) -> None:
    """The three data folders: labelled (val/, calibration/, train/ in class folders), unlabelled (images directly
    under val/ and calibration/), masks (unlabelled scenes with val_masks/: 1 where the bright square is, 2 the dim)."""
    for split, n in (("val", 6), ("calibration", 4), ("train", 4)):
        for c, name in enumerate(CLASSES):
            folder = root / "labelled" / split / name
            folder.mkdir(parents=True)
            for i in range(n):  # each class its own brightness
                pixels = np.clip(rng.normal(60 + 70 * c, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    for split, n in (("val", 12), ("calibration", 8)):
        (root / "unlabelled" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        if split == "val":
            (root / "masks" / "val_masks").mkdir()
        for i in range(n):
            pixels = np.clip(rng.normal(120, 50, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "unlabelled" / split / f"{i:03d}.png")
            img, mask = np.zeros((24, 24, 3), np.uint8), np.zeros((24, 24), np.uint8)
            for label, value in ((1, 230), (2, 120)):
                y, x = rng.integers(0, 14, 2)
                img[y : y + 10, x : x + 10] = value
                mask[y : y + 10, x : x + 10] = label
            Image.fromarray(img).save(root / "masks" / split / f"{i:03d}.png")
            if split == "val":
                Image.fromarray(mask).save(root / "masks" / "val_masks" / f"{i:03d}.png")


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """What users bring: image folders, checkpoints of timm and torchvision models, a factory file, ONNX files."""
    import sys

    import timm
    import torch
    import torchvision

    root = tmp_path_factory.mktemp("user")
    _images(root / "images", np.random.default_rng(0))
    torch.manual_seed(0)
    saves = {
        "timm_cls.pt": timm.create_model("vit_tiny_patch16_224", **yaml.safe_load(TIMM_ARCH), num_classes=3),
        "timm_dense.pt": timm.create_model("test_convnext", **yaml.safe_load(TIMM_DENSE_ARCH)),
        "tv_cls.pth": torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=3),
        "tv_dense.pth": torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None,
                                                     **yaml.safe_load(LRASPP_ARCH)),
    }
    for name, model in saves.items():
        torch.save(model.state_dict(), root / name)
    (root / "models.py").write_text(MODELS_PY)
    sys.path.insert(0, str(root))
    try:
        import models  # the user's file, as ONNX files of their own
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("models", None)
    for name, model, outputs in (("cls.onnx", models.classifier(), ["y"]), ("seg.onnx", models.segmenter(), ["y"]),
                                 ("two.onnx", models.two_outputs(), ["logits", "probs"])):
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), torch.zeros(1, 3, 16, 16), str(root / name), dynamo=False,
                              opset_version=17, input_names=["x"], output_names=outputs,
                              dynamic_axes={n: {0: "n"} for n in ["x", *outputs]})
    return root


# (source, task) -> the init options of a user who has that kind of model
MODEL_ARGS = {
    ("timm", "classification"): ["--model", "timm:vit_tiny_patch16_224", "--checkpoint", "{u}/timm_cls.pt",
                                 "--arch", TIMM_ARCH],
    ("timm", "dense"): ["--model", "timm:test_convnext", "--checkpoint", "{u}/timm_dense.pt",
                        "--arch", TIMM_DENSE_ARCH],
    ("torchvision", "classification"): ["--model", "torchvision:mobilenet_v3_small", "--checkpoint", "{u}/tv_cls.pth"],
    ("torchvision", "dense"): ["--model", "torchvision:lraspp_mobilenet_v3_large", "--checkpoint", "{u}/tv_dense.pth",
                               "--arch", LRASPP_ARCH],
    ("python", "classification"): ["--model", "python:{u}/models.py:classifier", *NORM],
    ("python", "dense"): ["--model", "python:{u}/models.py:segmenter", *NORM],
    ("onnx", "classification"): ["--model", "onnx:{u}/cls.onnx", *NORM_ONNX],
    ("onnx", "dense"): ["--model", "onnx:{u}/seg.onnx", *NORM_ONNX],
    ("train", "classification"): ["--model", "train"],
    ("train", "dense"): ["--model", "train"],
}
NO_DATA = "--data is required with --model"
NOT_TRAIN_DENSE = "--task dense needs a model of your own whose output is maps"
TRAIN_NEEDS_LABELS = "--model train trains a classifier on labelled images"
# (source, task, data) -> None: init writes a workspace `vitq run` takes; a string: init refuses, in one line with it
OUTCOMES = {
    **{(s, t, "none"): NO_DATA for s in ("timm", "torchvision", "python", "onnx") for t in ("classification", "dense")},
    ("train", "classification", "unlabelled"): TRAIN_NEEDS_LABELS,
    ("train", "classification", "masks"): TRAIN_NEEDS_LABELS,
    **{("train", "dense", d): NOT_TRAIN_DENSE for d in DATA},
}
MATRIX = [(s, t, d) for s in ("timm", "torchvision", "python", "onnx", "train") for t in ("classification", "dense")
          for d in DATA]


def init_args(user: Path, source: str, task: str, data: str) -> list[str]:
    args = [a.replace("{u}", str(user)) for a in MODEL_ARGS[source, task]] + ["--task", task]
    if data != "none":
        args += ["--data", str(user / "images" / data)]
    if data != "labelled" and task == "classification" and source in ("timm", "torchvision"):
        args += ["--num-classes", "3"]  # no class folders to size the head from: the checkpoint's, as init asks
    return args


def vitq_init(ws: Path, *args: str, capsys) -> tuple[int, str, str]:
    """`vitq init` in this process (the CLI's parser, messages and exit codes; no interpreter start per cell)."""
    from vitq.cli import main

    capsys.readouterr()
    code = main(["init", str(ws), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _sections(text: str) -> dict[str, str]:
    """params.yaml's text by top-level section (comments included)."""
    found, name = {}, None
    for line in text.split("\n"):
        if line and not line.startswith((" ", "#")):
            name = line.split(":")[0]
        if name:
            found[name] = found.get(name, "") + line + "\n"
    return found


@pytest.mark.parametrize("source, task, data", MATRIX, ids=["-".join(c) for c in MATRIX])
def test_init_matrix(tmp_path, user, capsys, source, task, data):
    from vitq.params import load_params
    from vitq.tasks import stages
    from vitq.tasks.layout import Workspace

    ws = tmp_path / "ws"
    code, out, err = vitq_init(ws, *init_args(user, source, task, data), capsys=capsys)
    refusal = OUTCOMES.get((source, task, data))
    if refusal is not None:
        assert code == 2, out
        assert err.startswith("vitq: error: ") and err.count("\n") == 1, err
        assert refusal in err, err
        assert not ws.exists()
        return
    assert code == 0, err
    p = load_params(ws / "params.yaml")
    stages.preflight(Workspace(ws), p)  # what `vitq run` checks before any server starts
    text = (ws / "params.yaml").read_text()
    sections = _sections(text)
    assert p.task.kind == task
    # The budget keys of the task, and only those, in both sections, each with its comment.
    keys = ("min_mask_iou", "max_miou_drop") if task == "dense" else ("max_top1_drop",)
    other = ("max_top1_drop",) if task == "dense" else ("min_mask_iou", "max_miou_drop")
    for section in ("validate", "recovery"):
        for key in keys:
            line = next(ln for ln in sections[section].split("\n") if ln.startswith(f"  {key}:"))
            assert "  # " in line and len(line) <= 123, line
        assert not any(ln.startswith(f"  {k}:") for k in other for ln in sections[section].split("\n"))
    if task == "dense":
        assert (p.validate_.max_miou_drop is not None) == (data == "masks")  # judged against ground truth only then
        assert "  masks: threshold" in sections["task"] and "  mask_threshold: 0.0" in sections["task"]
    # The recipes fit the source: an ONNX file has no torch model (no Core ML, no torch-based recovery).
    recipes = [*p.quantize.recipes, *p.quantize.carry]
    if source == "onnx":
        assert recipes and all(r.startswith(("onnx-", "tensorrt-")) for r in recipes), recipes
        assert not {"onnx-w8a8-auto", "onnx-w8a8-smoothquant", "onnx-w8a8-search"} & set(recipes)
    else:
        assert "coreml-w8a8" in recipes and "onnx-w8a8-auto" in recipes
    assert "next: cd" in out and f"task: {task}" in out
    # The stages where init's choices meet the data and the model: image size, channels, mean/std, head, outputs.
    if (source, data) == ("train", "none"):
        return  # the embedded digits ViT: every other test's workspace (conftest.py)
    if source == "train":  # its model stage trains: one epoch is enough to meet them
        train = p.model.train.model_copy(update={"epochs": 1})
        p = p.model_copy(update={"model": p.model.model_copy(update={"train": train})})
    result = stages.STAGES["data"](Workspace(ws), p)
    assert result.labelled == (data == "labelled") and bool(result.masks) == (data == "masks")
    spec = stages.STAGES["model"](Workspace(ws), p)
    assert (p.data.channels, p.data.image_size, p.data.image_size) == tuple(spec.input_size)
    assert len(spec.mean) == p.data.channels


@pytest.mark.parametrize("source, task, extra, message", [
    # A model whose outputs do not fit --task.
    ("timm", "classification", ["--task", "dense", "--num-classes", "3"],
     "--task dense needs output maps (N, K, H, W), but timm:vit_tiny_patch16_224 outputs (N, 3)"),
    ("python", "dense", ["--task", "classification"], "outputs (N, 2, 16, 16): pass --task dense"),
    ("onnx", "dense", ["--task", "classification"], "outputs (N, 2, 16, 16): pass --task dense"),
    # Several outputs: --outputs names the judged one(s), by the model's own names.
    ("python", "classification", ["--model", "python:{u}/models.py:two_outputs"],
     "returns 2 outputs (output_0 (N, 3), output_1 (N, 3)): pass --outputs NAME[,NAME]"),
    ("onnx", "classification", ["--model", "onnx:{u}/two.onnx"], "returns 2 outputs (logits (N, 3), probs (N, 3))"),
    ("python", "classification", ["--model", "python:{u}/models.py:two_outputs", "--outputs", "masks"],
     "has no output 'masks'; its outputs: output_0 (N, 3), output_1 (N, 3)"),
    ("python", "classification", ["--outputs", "logits"], "--outputs applies to a model with several outputs"),
    ("python", "classification", ["--model", "python:{u}/models.py:two_outputs", "--outputs", "output_0",
                                  "--recipes", "onnx-w8a8-auto"], "takes single-output models"),
    # A head too small for val/'s class folders.
    ("python", "classification", ["--arch", "{classes: 2}"], "has 2 outputs but"),
    # Recipes that do not fit the source or the data.
    ("onnx", "classification", ["--recipes", "onnx-w8a8-minmax,coreml-w8"],
     "--recipes: recipe 'coreml-w8' converts the torch model"),
    ("onnx", "classification", ["--recipes", "onnx-w8a8-auto"], "--recipes: recipe 'onnx-w8a8-auto' ranks"),
    ("python", "dense", ["--recipes", "onnx-w8a8-qat", "--data", "{u}/images/masks"],
     "onnx-w8a8-qat fine-tunes on the training images, and there are none"),
    # Options that do not fit the model.
    ("timm", "classification", ["--image-size", "64"], "--image-size 64 does not fit timm:vit_tiny_patch16_224"),
    ("onnx", "classification", ["--channels", "1"], "--channels 1 does not fit onnx:"),
    ("python", "classification", ["--num-classes", "3"], "--num-classes does not apply to --model python:"),
    ("onnx", "classification", ["--arch", "{dim: 8}"], "--arch does not apply to --model onnx:"),
    ("timm", "classification", ["--data", "{u}/images/unlabelled"], "pass --num-classes 3"),
    # A builder that downloads (torchvision's segmentation models fetch a backbone unless told not to).
    ("torchvision", "dense", ["--arch", "{num_classes: 2}"], "nothing downloads here"),
])
def test_init_refuses_what_would_not_run(tmp_path, user, capsys, source, task, extra, message):
    args = [a.replace("{u}", str(user)) for a in MODEL_ARGS[source, task]]
    if "--data" not in extra:
        args += ["--data", str(user / "images" / "labelled")]
    if "--task" not in extra:
        args += ["--task", task]
    code, _, err = vitq_init(tmp_path / "ws", *args, *(a.replace("{u}", str(user)) for a in extra), capsys=capsys)
    assert code == 2 and err.startswith("vitq: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("model, judged", [("python:{u}/models.py:two_outputs", "output_0"),
                                           ("onnx:{u}/two.onnx", "logits")])
def test_init_names_the_judged_output_of_a_model_with_several(tmp_path, user, capsys, model, judged):
    """--outputs: task.outputs marks it judged (the others are checked against FP32); recipes that read one output
    (the recovery searches, TensorRT's engine runner) are left out and named."""
    from vitq.params import load_params
    from vitq.tasks import stages
    from vitq.tasks.layout import Workspace

    ws = tmp_path / "ws"
    args = [a.replace("{u}", str(user)) for a in MODEL_ARGS["python", "classification"]]
    args[1] = model.replace("{u}", str(user))
    code, out, err = vitq_init(ws, *args, "--outputs", judged, "--data", str(user / "images" / "labelled"),
                               capsys=capsys)
    assert code == 0, err
    p = load_params(ws / "params.yaml")
    stages.preflight(Workspace(ws), p)
    assert {n: o.judged for n, o in p.task.outputs.items()} == {judged: True}
    recipes = [*p.quantize.recipes, *p.quantize.carry]
    assert "onnx-w8a8-minmax" in recipes and not [r for r in recipes if r.startswith("tensorrt") or "auto" in r
                                                  or "smoothquant" in r or "search" in r], recipes
    assert f"(judged: {judged})" in out and "they take single-output models" in out, out


def test_train_needs_a_labelled_train_folder(tmp_path, user, capsys):
    import shutil

    data = tmp_path / "no_train"
    shutil.copytree(user / "images" / "labelled", data, ignore=shutil.ignore_patterns("train"))
    code, _, err = vitq_init(tmp_path / "ws", "--data", str(data), capsys=capsys)
    assert code == 2 and "--model train trains on" in err and "train/<class>/<image>, and there is none" in err, err


# --- vitq run, end to end: each source and each task at least once --------------------------------------------

RUNS = [
    ("timm", "classification", "unlabelled", "onnx-w8a8-minmax"),
    ("timm", "dense", "masks", "onnx-w8a8-minmax"),
    ("torchvision", "classification", "labelled", "onnx-w8a8-minmax"),
    ("python", "dense", "masks", "onnx-w8-dynamic,onnx-w8a8-auto"),
    ("onnx", "dense", "unlabelled", "onnx-w8a8-minmax"),
    ("train", "classification", "labelled", "onnx-w8a8-percentile"),
    ("python", "classification", "labelled", "onnx-w8a8-minmax"),  # several outputs (--outputs output_0)
]


@pytest.mark.slow
@pytest.mark.parametrize("source, task, data, recipes", RUNS, ids=["-".join(r[:3]) for r in RUNS])
def test_init_then_vitq_run(tmp_path, user, source, task, data, recipes):
    """The user's path, as they type it: `vitq init`, then `vitq run` in the workspace."""
    ws = tmp_path / "ws"
    env = run_env(tmp_path)
    several = recipes == "onnx-w8a8-minmax" and source == "python"  # a model with two outputs, one judged
    args = init_args(user, source, task, data)
    if several:
        args[1] = args[1].replace(":classifier", ":two_outputs")
        args += ["--outputs", "output_0"]
    res = subprocess.run([VITQ, "init", str(ws), *args, "--recipes", recipes],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    run = subprocess.run([VITQ, "run"], cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((ws / "reports" / "summary.json").read_text())
    assert summary["task"] == task
    names = [v["name"] for v in summary["variants"]]
    assert names[: len(recipes.split(","))] == recipes.split(","), names
    for v in summary["variants"]:
        if several:  # the judged output's numbers are the headline; the other one is checked against FP32
            assert v["outputs"]["output_0"]["judged"] and not v["outputs"]["output_1"]["judged"], v["outputs"]
            assert v["outputs"]["output_1"]["sqnr_db"] is not None, v["outputs"]
        if task == "dense":
            assert v["mask_iou"] is not None and v["top1"] is None, v
            assert (v["miou"] is not None) == (data == "masks"), v
        else:
            assert (v["top1"] is not None) == (data == "labelled"), v
            assert v["agreement"] is not None, v
