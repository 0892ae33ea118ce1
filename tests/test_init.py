"""`vitq init DIR`: a workspace for one's own model and data; checked before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO, VITQ, run_env
from vitq.params import load_params
from vitq.init_workspace import set_value, template

TINY_ARCH = "{depth: 1, img_size: 32, patch_size: 8, embed_dim: 32, num_heads: 2}"
CLASSES = ("cat", "dog", "owl")


def vitq(*args: str, cwd: Path, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([VITQ, *args], cwd=cwd, env=run_env(tmp), capture_output=True, text=True)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> Path:
    """What a user brings: an image folder (val/<class>/, calibration/<class>/) and a timm checkpoint."""
    import timm
    import torch

    root = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    for split, n in (("val", 8), ("calibration", 6)):
        for c, name in enumerate(CLASSES):
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):  # each class its own brightness, so the images are not all alike
                pixels = np.clip(rng.normal(60 + 70 * c, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **yaml.safe_load(TINY_ARCH), num_classes=len(CLASSES))
    torch.save(model.state_dict(), root / "tiny.pt")
    return root


def _init(ws: Path, user: Path, *extra: str) -> subprocess.CompletedProcess:
    return vitq("init", str(ws), "--model", "timm:vit_tiny_patch16_224", "--checkpoint", str(user / "tiny.pt"),
                "--data", str(user / "images"), "--arch", TINY_ARCH, *extra, cwd=ws.parent, tmp=ws.parent)


def test_templates_are_the_repository_workspace():
    """What init writes is the documented workspace itself: the package's copies equal the root's files."""
    assert template("params.yaml") == (REPO / "params.yaml").read_text()
    assert template("dvc-pipeline.yaml") == (REPO / "dvc.yaml").read_text()
    assert not (REPO / "vitq" / "templates" / "dvc.yaml").exists()  # DVC would read it as a pipeline (test_team_path)


def test_set_value_keeps_comments_and_replaces_continued_values():
    text = template("params.yaml")
    out = set_value(set_value(text, "quantize", "recipes", ["onnx-w8-dynamic"]), "model", "source", "timm")
    parsed = yaml.safe_load(out)
    assert parsed["quantize"]["recipes"] == ["onnx-w8-dynamic"]
    assert parsed["model"]["source"] == "timm"
    assert parsed["quantize"]["carry"] == yaml.safe_load(text)["quantize"]["carry"]  # the next key untouched
    assert out.count("\n#") == text.count("\n#") and out.count("  # ") == text.count("  # ")  # comments kept
    with_comment = set_value(text, "data", "path", "images")
    assert "  path: images                # imagefolder root" in with_comment  # the value's own comment, in its column


def test_set_value_wraps_a_long_list_as_the_template_does():
    recipes = ["onnx-w8-dynamic", "onnx-w8a8-minmax", "onnx-w8a8-percentile", "onnx-w8a8-entropy",
               "onnx-w8a8-auto", "onnx-w8a8-smoothquant", "onnx-w8a8-search", "tensorrt-w8a8-percentile", "coreml-fp16"]
    out = set_value(template("params.yaml"), "quantize", "recipes", recipes)
    assert yaml.safe_load(out)["quantize"]["recipes"] == recipes
    lines = out.split("\n")
    first = "  recipes: [onnx-w8-dynamic, onnx-w8a8-minmax, onnx-w8a8-percentile, onnx-w8a8-entropy, onnx-w8a8-auto,"
    written = lines[lines.index(first):][:2]
    assert written[1] == "            onnx-w8a8-smoothquant, onnx-w8a8-search, tensorrt-w8a8-percentile, coreml-fp16]"
    again = set_value(out, "quantize", "recipes", ["onnx-w8-dynamic"])  # a wrapped value is replaced whole
    assert yaml.safe_load(again)["quantize"]["recipes"] == ["onnx-w8-dynamic"] and "onnx-w8a8-search" not in again


@pytest.mark.parametrize("kind, labelled, masks", [("dense", False, True), ("dense", True, False),
                                                   ("classification", False, False)])
def test_task_text_writes_the_budget_keys_of_the_task(kind, labelled, masks):
    """The template is a classification workspace: --task dense gets the dense keys in validate and recovery (no
    max_top1_drop, which a dense params.yaml refuses), each with its comment; no labels: the comment says
    disagreement."""
    from vitq.config import BUDGET_KEYS
    from vitq.init_workspace import task_text
    from vitq.params import parse_params

    text = task_text(template("params.yaml"), kind, labelled, masks)
    p = parse_params(yaml.safe_load(text))
    assert p.task.kind == kind
    raw = yaml.safe_load(text)
    for section in ("validate", "recovery"):
        written = {k for keys in BUDGET_KEYS.values() for k in keys if k in raw[section]}
        assert written == set(BUDGET_KEYS[kind]), (section, written)
        for key in written:
            line = next(ln for ln in text.split("\n") if ln.startswith(f"  {key}:") and ln in _section(text, section))
            assert "  # " in line, line
    if kind == "dense":
        assert p.validate_.max_miou_drop == p.recovery.max_miou_drop == (1.0 if masks else None)
        assert (raw["task"]["masks"], raw["task"]["mask_threshold"]) == ("threshold", 0.0)
        assert "# dense only:" not in text  # the comment that described them is now the keys
    else:
        assert "disagreement with FP32" in _section(text, "validate")
    assert text.count("\n") - template("params.yaml").count("\n") == (2 if kind == "dense" else 0)


def _section(text: str, name: str) -> str:
    lines = text.split("\n")
    start = lines.index(f"{name}:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith((" ", "#"))),
               len(lines))
    return "\n".join(lines[start:end])


def test_init_writes_a_workspace_from_the_options(tmp_path, user_files):
    ws = tmp_path / "mine"
    res = _init(ws, user_files, "--recipes", "onnx-w8-dynamic,onnx-w8a8-percentile")
    assert res.returncode == 0, res.stderr
    p = load_params(ws / "params.yaml")
    assert (p.model.source, p.model.name, p.model.num_classes) == ("timm", "vit_tiny_patch16_224", 3)
    assert Path(p.model.checkpoint) == user_files / "tiny.pt"
    assert (p.data.source, p.data.image_size, p.data.channels) == ("imagefolder", 32, 3)  # from the model
    assert list(p.quantize.recipes) == ["onnx-w8-dynamic", "onnx-w8a8-percentile"] and not p.quantize.carry
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    assert str(user_files / "images") in stages["data"]["deps"]
    assert str(user_files / "tiny.pt") in stages["model"]["deps"]
    assert (ws / ".git").is_dir() and (ws / ".dvc").is_dir()
    for output in ("models/fp32", "artifacts/export", "data/prepared", "mlflow.db"):  # DVC's and MLflow's, not git's
        assert subprocess.run(["git", "check-ignore", "-q", output], cwd=ws).returncode == 0, output
    assert subprocess.run(["git", "check-ignore", "-q", "reports/summary.json"], cwd=ws).returncode == 1
    assert "next: cd" in res.stdout and "vitq run" in res.stdout


def test_init_refuses_an_existing_workspace(tmp_path, user_files):
    ws = tmp_path / "mine"
    ws.mkdir()
    (ws / "params.yaml").write_text("seed: 1\n")
    res = _init(ws, user_files)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "is a workspace already (params.yaml exist)" in res.stderr
    assert sorted(p.name for p in ws.iterdir()) == ["params.yaml"] and (ws / "params.yaml").read_text() == "seed: 1\n"


@pytest.mark.parametrize("args, message", [
    (["--model", "keras:resnet"], "unknown source 'keras'"),
    (["--model", "timm:vit_tiny_patch16_224"], "--data is required"),
    (["--model", "timm:vit_tinny_patch16_224", "--data", "IMAGES"], "unknown timm model 'vit_tinny_patch16_224'"),
    (["--model", "timm:vit_tiny_patch16_224", "--data", "IMAGES", "--checkpoint", "CKPT", "--arch", TINY_ARCH,
      "--num-classes", "5"], "pass --num-classes 3"),
    (["--model", "timm:vit_tiny_patch16_224", "--data", "IMAGES", "--checkpoint", "CKPT"], "pass --model / --arch"),
    (["--model", "timm:vit_tiny_patch16_224", "--data", "NOWHERE"], "is not a directory"),
    (["--model", "python:model.py:build", "--data", "IMAGES"], "--mean and --std are required"),
    (["--recipes", "onnx-w8a8-fastest"], "unknown onnx-w8a8-fastest"),
    (["--arch", "[1, 2]"], "must be a YAML mapping"),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, user_files, args, message):
    ws = tmp_path / "new"
    swap = {"IMAGES": str(user_files / "images"), "CKPT": str(user_files / "tiny.pt"),
            "NOWHERE": str(tmp_path / "nowhere")}
    res = vitq("init", str(ws), *(swap.get(a, a) for a in args), cwd=tmp_path, tmp=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("vitq: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert message in res.stderr
    assert not ws.exists()


def test_init_inside_a_git_repository_makes_a_dvc_subdir(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    ws = tmp_path / "experiments" / "digits"
    res = vitq("init", str(ws), cwd=tmp_path, tmp=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (ws / ".dvc").is_dir() and not (ws / ".git").exists()
    assert "inside the git repository" in res.stdout
    assert load_params(ws / "params.yaml").model.source == "train"


@pytest.mark.slow
def test_init_then_run_on_a_timm_model_with_a_local_checkpoint_and_an_image_folder(tmp_path, user_files):
    ws = tmp_path / "mine"
    res = _init(ws, user_files, "--recipes", "onnx-w8-dynamic,onnx-w8a8-percentile,onnx-w8a8-auto")
    assert res.returncode == 0, res.stderr
    run = vitq("run", cwd=ws, tmp=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((ws / "reports" / "summary.json").read_text())
    assert summary["model"] == "vit_tiny_patch16_224"
    assert [v["name"] for v in summary["variants"]][:3] == ["onnx-w8-dynamic", "onnx-w8a8-percentile", "onnx-w8a8-auto"]
    spec = json.loads((ws / "models" / "fp32" / "model.json").read_text())
    assert spec["build"]["weights"] == f"checkpoint {user_files / 'tiny.pt'}"
    env = run_env(tmp_path)
    repro = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=ws, env=env, capture_output=True, text=True)
    assert "up to date" in repro.stdout, repro.stdout
    again = vitq("run", cwd=ws, tmp=tmp_path)
    assert again.returncode == 0 and "up to date (dvc.lock)" in again.stdout
    # The user's data is a dependency: a new image makes the data stage (and what follows) stale.
    extra = user_files / "images" / "val" / "cat" / "extra.png"
    extra.write_bytes((user_files / "images" / "val" / "cat" / "0.png").read_bytes())
    try:
        stale = subprocess.run([sys.executable, "-m", "dvc", "status", "data"], cwd=ws, env=env, capture_output=True,
                               text=True)
    finally:
        extra.unlink()
    assert "modified:" in stale.stdout and "images" in stale.stdout, stale.stdout


def test_a_failed_init_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """DVC failing after the files were written: they are removed, the user's .gitignore restored, no .git left."""
    import dvc.repo

    from vitq.init_workspace import InitOptions, init_workspace
    from vitq.errors import VitqError

    ws = tmp_path / "mine"
    ws.mkdir()
    (ws / ".gitignore").write_text("secrets/\n")
    (ws / "notes.txt").write_text("mine\n")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dvc.repo.Repo, "init", staticmethod(broken))
    with pytest.raises(VitqError, match="could not initialise .*OSError: disk full"):
        init_workspace(InitOptions(ws))
    assert sorted(p.name for p in ws.iterdir()) == [".gitignore", "notes.txt"]
    assert (ws / ".gitignore").read_text() == "secrets/\n"
