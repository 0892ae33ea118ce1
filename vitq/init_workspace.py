"""`vitq init DIR`: a workspace for one's own model and data, ready for `vitq run` and `dvc repro`.

It writes params.yaml (the documented template, every key commented, with the model and data set from the
options) and dvc.yaml (the pipeline's stages, with the user's files as dependencies: the image folder of
the data stage, the checkpoint / factory file / ONNX file of the model stage, so that changing one reruns
what reads it), a .gitignore for the pipeline's outputs (DVC tracks them), then `git init` (unless DIR is
inside a git work tree already) and `dvc init` (`--subdir` inside an existing repository), and with --dvc-remote
URL `dvc remote add -d NAME URL`.

What it writes fits the model, the task and the data: `--task dense` gets task.mask_threshold / task.masks and
the dense budget keys (min_mask_iou, and max_miou_drop where the data has ground-truth masks) in validate and
recovery instead of classification's max_top1_drop; data without class folders says its budget is disagreement
with FP32; an ONNX file gets the recipes that need no torch model.

Everything is checked before anything is written: the model is built, its checkpoint loaded strictly and one
batch run (its outputs must be what --task says: logits (N, classes) or maps (N, K, H, W)), the data folder is
listed, params.yaml is parsed as `vitq run` parses it. A problem is one line (exit 2) and DIR is left as it
was. An existing workspace (params.yaml, dvc.yaml or .dvc/ in DIR) is never overwritten.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from vitq.errors import VitqError

SOURCES = ("timm", "torchvision", "python", "onnx", "train")
USAGE = "--model takes timm:NAME, torchvision:NAME, python:FILE.py:FUNCTION (or python:package.module:FUNCTION), " \
        "onnx:FILE.onnx, or train (the embedded digits ViT)"
# What a workspace holds that `vitq init` would write: any of them present means DIR is one already.
WORKSPACE_FILES = ("params.yaml", "dvc.yaml", ".dvc")
COMMENT_COLUMN = 30  # where the template's comments start

GITIGNORE = """\
# vitq workspace: the pipeline's outputs are DVC's (dvc.yaml outs), not git's; DVC adds its own entries too.
/data/prepared
/models/
/artifacts/
/reports/*
# DVC metrics file (cache: false): git tracks it, so `dvc metrics diff` can compare commits
!/reports/summary.json
# MLflow's default local store (`vitq run` records there unless MLFLOW_TRACKING_URI is set)
mlflow.db
mlartifacts/
mlruns/
__pycache__/
"""


@dataclass
class InitOptions:
    directory: Path
    model: str = "train"
    checkpoint: str | None = None
    data: str | None = None
    image_size: int | None = None
    channels: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    num_classes: int | None = None
    arch: dict = field(default_factory=dict)
    task: str = "classification"
    recipes: list[str] | None = None
    name: str | None = None
    outputs: list[str] | None = None  # a model with several outputs: the one(s) --task judges (task.outputs)
    dvc_remote: str | None = None  # a DVC remote URL, made the workspace's default remote (`dvc remote add -d`)
    dvc_remote_name: str | None = None  # its name (default: s3 for an s3:// URL, else storage)


@dataclass
class Plan:
    """What init writes: file name -> text; the user's files each stage depends on; lines for the message."""

    files: dict[str, str]
    deps: dict[str, list[str]]
    summary: list[str]


def parse_model(spec: str) -> tuple[str, dict]:
    """`timm:NAME` -> ("timm", {"name": NAME}); python:FILE:FUNCTION -> ("python", {"factory": "FILE:FUNCTION"})."""
    source, _, rest = spec.partition(":")
    if source not in SOURCES:
        raise VitqError(f"--model {spec!r}: unknown source {source!r}; {USAGE}")
    if source == "train":
        if rest:
            raise VitqError(f"--model {spec!r}: train takes no name (it trains vitq's digits ViT); {USAGE}")
        return source, {}
    if not rest:
        raise VitqError(f"--model {spec!r} names no model; {USAGE}")
    if source in ("timm", "torchvision"):
        return source, {"name": rest}
    if source == "onnx":
        return source, {"path": rest}
    where, _, function = rest.rpartition(":")
    if not where or not function:
        raise VitqError(f"--model {spec!r}: python needs FILE.py:FUNCTION or package.module:FUNCTION; {USAGE}")
    return source, {"factory": rest}


def _path_in(value: str, root: Path) -> str:
    """A user's path as params.yaml / dvc.yaml should hold it: relative to the workspace when inside it, else
    absolute (relative paths in params.yaml start at the workspace, not at the shell's directory)."""
    path = Path(value).expanduser().resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _yaml_value(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def set_value(text: str, section: str | None, key: str, value, comment: str | None = None) -> str:
    """`text` (the template) with `section.key` (or top-level `key`) set to `value`, its comment kept (or
    replaced by `comment`)."""
    lines = text.split("\n")
    start, indent = 0, ""
    if section is not None:
        start = next((i for i, line in enumerate(lines) if line.startswith(f"{section}:")), None)
        if start is None:
            raise AssertionError(f"template has no section {section!r}")
        start, indent = start + 1, "  "
    pattern = re.compile(rf"^{indent}{re.escape(key)}:( *)([^#]*?)( *)(#.*)?$")
    for i in range(start, len(lines)):
        line = lines[i]
        if section is not None and line and not line.startswith(" "):
            break  # the next section
        match = pattern.match(line)
        if match:
            head = _wrapped(f"{indent}{key}: ", value)
            comment = f"# {comment}" if comment is not None else match.group(4)
            value_text, end = match.group(2), i + 1
            while _open_brackets(value_text) > 0 and end < len(lines):  # a flow value continued on the next lines
                value_text += lines[end].split("#", 1)[0]
                end += 1
            lines[i:end] = [head if not comment else f"{head.ljust(COMMENT_COLUMN - 1)} {comment}"]
            return "\n".join(lines)
    raise AssertionError(f"template has no key {section}.{key}" if section else f"template has no key {key}")


def _wrapped(start: str, value, width: int = 118) -> str:
    """`start` + the value in flow style; a list too long for one line continues under its first item, as the
    template writes `quantize.recipes`."""
    text = start + _yaml_value(value)
    if len(text) <= width or not isinstance(value, list) or not value:
        return text
    lines, line = [], start + "["
    items = [_yaml_value(v) for v in value]
    for i, item in enumerate(items):
        piece = item + (", " if i < len(items) - 1 else "]")
        if len(line) + len(piece.rstrip()) > width and line.strip() not in ("", f"{start.strip()} ["):
            lines.append(line.rstrip())
            line = " " * (len(start) + 1)
        line += piece
    return "\n".join([*lines, line])


def _open_brackets(text: str) -> int:
    return text.count("[") + text.count("{") - text.count("]") - text.count("}")


def template(name: str) -> str:
    """The documented workspace file `name` (params.yaml, dvc-pipeline.yaml): the repository root's own, shipped
    in the package (tests/test_init.py keeps them equal). The pipeline's copy is not named dvc.yaml: DVC reads
    every dvc.yaml in a git repository as a pipeline, this package folder included (a clone's `dvc pull` failed
    on its outputs)."""
    return resources.files("vitq").joinpath("templates", name).read_text()


def _add_deps(dvc_text: str, stage: str, deps: list[str]) -> str:
    """dvc.yaml's `stage` with `deps` added to its deps list (created after `cmd:` where it has none)."""
    if not deps:
        return dvc_text
    lines = dvc_text.split("\n")
    head = lines.index(f"  {stage}:")
    end = next(i for i in range(head + 1, len(lines)) if lines[i].startswith("  ") and not lines[i].startswith("    "))
    shown = ", ".join(_yaml_value(d) for d in deps)
    at = next((i for i in range(head + 1, end) if lines[i].startswith("    deps: [")), None)
    if at is None:
        at = head + 2  # after cmd:
        lines.insert(at, f"    deps: [{shown}]")
    else:
        lines[at] = lines[at].rstrip().removesuffix("]") + f", {shown}]"
    lines.insert(at, "    # your files (vitq init): changing one reruns this stage and every stage that reads its outputs")
    return "\n".join(lines)


# The budget keys of a dense task, in place of classification's max_top1_drop (vitq.config.BUDGET_KEYS); the
# template (the repository's own params.yaml) is a classification workspace.
DENSE_TASK = [
    ("kind", "dense", "classification: logits (N, classes) | dense: maps (N, K, H, W), e.g. mask logits"),
    ("mask_threshold", 0.0, "a pixel is in a mask where the output exceeds it (mask logits: 0)"),
    ("masks", "threshold", "threshold: each output channel is one mask (SAM-style) | argmax: channels are classes"),
]
DENSE_BUDGET = {
    "validate": [
        ("min_mask_iou", 0.9, "the least IoU of a variant's masks (task.masks) with FP32's, 0..1"),
        ("max_miou_drop", None, "points of mIoU vs ground-truth masks (val_masks/) a variant may lose; null: none"),
    ],
    "recovery": [
        ("min_mask_iou", 0.9, "the mask IoU with FP32's onnx-w8a8-auto steers to (>= validate.min_mask_iou)"),
        ("max_miou_drop", None, "mIoU points (ground-truth masks) it steers to (<= validate.max_miou_drop)"),
    ],
}
MIOU_BUDGET = 1.0  # points of mIoU, where the data has ground-truth masks (as max_top1_drop's 1.0 for labels)
UNLABELLED_BUDGET_COMMENT = {
    "validate": "no labels in the data: points of disagreement with FP32's top-1 a variant may have",
    "recovery": "points of disagreement with FP32 that onnx-w8a8-auto steers to (<= validate.max_top1_drop)",
}


def _key_line(key: str, value, comment: str) -> str:
    head = f"  {key}: {_yaml_value(value)}"
    return f"{head.ljust(COMMENT_COLUMN - 1)} # {comment}"


def _replace_key(text: str, section: str, key: str, new_lines: list[str], drop_comments: tuple[str, ...] = ()) -> str:
    """`text` with `section.key`'s line replaced by `new_lines`; the comment lines right after it that start with
    one of `drop_comments` go too (what they described is now keys)."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(f"{section}:")), None)
    at = None if start is None else next((i for i in range(start + 1, len(lines)) if lines[i].startswith(f"  {key}:")),
                                         None)
    if at is None:
        raise AssertionError(f"template has no key {section}.{key}")
    end = at + 1
    while end < len(lines) and drop_comments and lines[end].lstrip().startswith(drop_comments):
        end += 1
    lines[at:end] = new_lines
    return "\n".join(lines)


def task_text(text: str, kind: str, labelled: bool, masks: bool) -> str:
    """The template for `kind`: dense gets task.mask_threshold / task.masks and dense budget keys in validate and
    recovery (max_miou_drop set where the data has ground-truth masks), never classification's max_top1_drop,
    which a dense params.yaml refuses; classification without labels says its budget is disagreement with FP32."""
    if kind == "dense":
        text = _replace_key(text, "task", "kind", [_key_line(*k) for k in DENSE_TASK],
                            drop_comments=("# dense only:", "# masks:"))
        for section, keys in DENSE_BUDGET.items():
            text = _replace_key(text, section, "max_top1_drop", [_key_line(*k) for k in keys])
            if masks:
                text = set_value(text, section, "max_miou_drop", MIOU_BUDGET)
        return text
    if not labelled:
        for section, comment in UNLABELLED_BUDGET_COMMENT.items():
            text = set_value(text, section, "max_top1_drop", yaml.safe_load(text)[section]["max_top1_drop"],
                             comment=comment)
    return text


@dataclass(frozen=True)
class DataInfo:
    """What --data holds, listed (no image decoded but the first): the checks the data stage would make."""

    path: str | None  # as params.yaml holds it; None: the embedded digits
    classes: list[str] = field(default_factory=list)  # val/'s class folders; []: no labels
    masks: bool = False  # val_masks/ beside val/ (ground truth for dense tasks)
    train: bool = False  # train/ holds images (what --model train and QAT fine-tune on)
    train_labelled: bool = False  # ... in class folders
    channels: int | None = None  # of the first val/ image: 1 (grayscale) or 3


def _inspect_data(value: str | None, root: Path) -> DataInfo:
    from PIL import Image

    from vitq.config import DataConfig
    from vitq.errors import DataError
    from vitq.tasks import data as data_mod

    if not value:
        return DataInfo(None)
    folder = Path(value).expanduser().resolve()
    try:
        data_mod.check_data_config(DataConfig(source="imagefolder", path=str(folder)))
        val = folder / "val"
        files, classes = data_mod._list_images(val)
        if not files:
            raise DataError(f"{val} holds no images ({', '.join(data_mod.IMAGE_SUFFIXES)}), neither in class "
                            "folders (labelled) nor directly (no labels)")
        masks = data_mod._mask_files(val, [f for f, _ in files]) is not None
        train_files, train_classes = data_mod._list_images(folder / "train") if (folder / "train").is_dir() \
            else ([], [])
        if not (folder / "calibration").is_dir() and not train_files:
            raise DataError(f"{str(folder)!r} has neither calibration/ nor train/ images; one is needed for "
                            "calibration (calibration/<image> or calibration/<class>/<image>)")
        unknown = sorted(set(train_classes) - set(classes))
        if unknown:
            raise DataError(f"{folder / 'train'}: class folders {unknown} are not in val/'s classes {classes}")
    except DataError as exc:
        raise VitqError(f"--data: {str(exc).replace('data.path ', '')}") from None
    try:
        with Image.open(files[0][0]) as img:
            channels = 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    except OSError as exc:
        raise VitqError(f"--data: cannot read image {files[0][0]}: {exc}") from None
    return DataInfo(_path_in(value, root), classes, masks, bool(train_files), bool(train_classes), channels)


def plan(opts: InitOptions) -> Plan:
    """Check everything and render the files; writes nothing."""
    from vitq.params import parse_params

    root = opts.directory
    source, model_keys = parse_model(opts.model)
    _check_options(source, opts)
    info = _inspect_data(opts.data, root)
    _check_data_fits(source, opts, info)

    text = task_text(template("params.yaml"), opts.task, bool(info.classes), info.masks)
    model: dict = {"source": source, **model_keys}
    if source in ("timm", "torchvision", "python"):
        for key in ("name", "factory", "path"):
            model.setdefault(key, None)
        if source == "python":
            model["factory"] = _python_factory(model["factory"], root)
        model["checkpoint"] = _path_in(opts.checkpoint, root) if opts.checkpoint else None
    if source == "onnx":
        model.update(name=None, path=_path_in(model["path"], root))
    if opts.name:
        model["name"] = opts.name
    if opts.mean is not None:
        model.update(mean=list(opts.mean), std=list(opts.std))
    if opts.arch:
        model["arch"] = dict(opts.arch)
    if opts.num_classes is not None:
        model["num_classes"] = opts.num_classes
    elif info.classes and source in ("timm", "torchvision") and opts.task == "classification":
        model["num_classes"] = len(info.classes)  # the head the labels need (the checkpoint must have it)

    # The model itself: built, its checkpoint loaded and one forward run, so that a misfit (input, outputs, task) is
    # refused now, not in the model stage.
    for key, value in model.items():
        text = set_value(text, "model", key, value)
    channels, side, shapes = _load_model(text, root, source, opts, info)
    outputs, judged = _judged_outputs(opts, shapes)
    _check_outputs(opts, source, info, outputs)
    if judged:  # the others are checked against FP32 (task.outputs)
        text = set_value(text, "task", "outputs", {name: {"judged": True} for name in judged})
    if opts.mean is not None and len(opts.mean) != channels:
        raise VitqError(f"--mean / --std have {len(opts.mean)} values but the input has {channels} channel(s): one "
                        "value per channel")
    if source == "train" and channels != 1 and opts.mean is None:  # the digits ViT's (0.5,), for each channel
        for key in ("mean", "std"):
            text = set_value(text, "model", key, [0.5] * channels)
    data: dict = {"source": "imagefolder", "path": info.path} if info.path else {}
    data.update(image_size=side, channels=channels)
    for key, value in data.items():
        text = set_value(text, "data", key, value)
    recipes, carry, left_out = _recipes_for(text, source, opts, info, several_outputs=bool(judged))
    quantize = yaml.safe_load(text)["quantize"]
    if recipes != quantize["recipes"]:
        text = set_value(text, "quantize", "recipes", recipes)
    if carry != quantize["carry"]:
        text = set_value(text, "quantize", "carry", carry)
    parsed = parse_params(yaml.safe_load(text), str(root / "params.yaml"))  # as `vitq run` reads it

    deps: dict[str, list[str]] = {"data": [info.path] if info.path else [], "model": []}
    if parsed.model.checkpoint:
        deps["model"].append(parsed.model.checkpoint)
    if parsed.model.factory and parsed.model.factory.rpartition(":")[0].endswith(".py"):
        deps["model"].append(parsed.model.factory.rpartition(":")[0])
    if parsed.model.path:
        deps["model"].append(parsed.model.path)
    dvc_text = template("dvc-pipeline.yaml")
    for stage, stage_deps in deps.items():
        dvc_text = _add_deps(dvc_text, stage, stage_deps)
    summary = [f"model: {source} {parsed.model.name or ''}".rstrip()
               + (f", checkpoint {parsed.model.checkpoint}" if parsed.model.checkpoint else "")
               + f"; input {channels}x{side}x{side}"
               + (f"; outputs {', '.join(f'{n} {_shape(s)}' for n, s in shapes.items())} (judged: {', '.join(judged)})"
                  if judged else f"; outputs (N, {', '.join(map(str, outputs[1:]))})" if outputs else ""),
               f"data: {info.path or 'digits (embedded)'}" + _data_summary(info, opts.task),
               _task_summary(parsed, info),
               f"recipes: {', '.join(parsed.quantize.recipes)}"
               + (f" (left out, {'they take single-output models' if judged else 'they need a torch model'}: "
                  f"{', '.join(left_out)})" if left_out else "")]
    return Plan({"params.yaml": text, "dvc.yaml": dvc_text, ".gitignore": GITIGNORE}, deps, summary)


def _check_options(source: str, opts: InitOptions) -> None:
    """The options that do not fit --model, refused before anything is read."""
    shown = f"--model {opts.model}"
    if source != "train" and not opts.data:
        what = ("val/<image> (with val_masks/<image>.png for mIoU against ground truth)" if opts.task == "dense"
                else "val/<class>/<image> (or val/<image> without labels)")
        raise VitqError(f"--data is required with {shown}: an image folder of your model's inputs, {what} and "
                        "calibration/ or train/ (vitq's embedded data, 8x8 grayscale digits, fits only --model train)")
    if source == "train" and opts.task == "dense":
        raise VitqError("--task dense needs a model of your own whose output is maps (N, K, H, W): --model train "
                        "trains vitq's digits classifier; pass --model python:FILE.py:FUNCTION (or timm:, "
                        "torchvision:, onnx:)")
    if opts.checkpoint and source in ("onnx", "train"):
        raise VitqError(f"--checkpoint does not apply to {shown} (it is for timm, torchvision, python)")
    if source == "torchvision" and not opts.checkpoint:
        raise VitqError("--checkpoint is required with --model torchvision:NAME (nothing downloads here; torchvision "
                        "models are built without weights)")
    if opts.num_classes is not None and source in ("python", "onnx"):
        raise VitqError(f"--num-classes does not apply to {shown}: its outputs are the model's own "
                        + ("(build the head you want with --arch)" if source == "python" else "(the ONNX graph's)"))
    if opts.arch and source == "onnx":
        raise VitqError(f"--arch does not apply to {shown}: an ONNX file's graph is fixed (export it as you want it)")
    if source in ("python", "onnx") and (opts.mean is None or opts.std is None):
        raise VitqError(f"--mean and --std are required with --model {source}:... (its input normalisation, "
                        "(x / 255 - mean) / std per channel, e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)")
    if (opts.mean is None) != (opts.std is None):
        raise VitqError("--mean and --std go together: give both or neither")
    if opts.mean is not None and len(opts.mean) != len(opts.std):
        raise VitqError(f"--mean has {len(opts.mean)} values but --std {len(opts.std)}: one per channel")


def _check_data_fits(source: str, opts: InitOptions, info: DataInfo) -> None:
    if source == "train" and info.path:
        if not info.classes:
            raise VitqError(f"--model train trains a classifier on labelled images, but {info.path}/val/ has no class "
                            "folders: give val/<class>/<image> and train/<class>/<image>, or bring a model of your own")
        if not info.train_labelled:
            raise VitqError(f"--model train trains on {info.path}/train/<class>/<image>, and there is none: add "
                            "train/ (labelled like val/), or bring a trained model (--model timm:/torchvision:/"
                            "python:/onnx:)")


def _shape(dims) -> str:
    return f"(N, {', '.join(str(d) for d in dims[1:])})"


def _judged_outputs(opts: InitOptions, shapes: dict[str, tuple[int, ...]] | None
                    ) -> tuple[tuple[int, ...] | None, list[str] | None]:
    """(the shape --task judges, the names task.outputs marks judged: None for a single-output model)."""
    several = shapes is not None and len(shapes) > 1
    if opts.outputs and not several:
        raise VitqError(f"--outputs applies to a model with several outputs; {opts.model} returns one: drop --outputs")
    if shapes is None:
        return None, None
    if not several:
        return next(iter(shapes.values())), None
    listed = ", ".join(f"{n} {_shape(s)}" for n, s in shapes.items())
    if not opts.outputs:
        raise VitqError(f"{opts.model} returns {len(shapes)} outputs ({listed}): pass --outputs NAME[,NAME] naming the "
                        f"one(s) --task {opts.task} judges (every other output is checked against FP32)")
    unknown = [n for n in opts.outputs if n not in shapes]
    if unknown:
        raise VitqError(f"--outputs {','.join(opts.outputs)}: {opts.model} has no output {unknown[0]!r}; its outputs: "
                        f"{listed}")
    kinds = {len(shapes[n]) for n in opts.outputs}
    if len(kinds) > 1:
        raise VitqError(f"--outputs {','.join(opts.outputs)}: the judged outputs must all be what --task {opts.task} "
                        f"judges, but they are {', '.join(_shape(shapes[n]) for n in opts.outputs)}")
    return shapes[opts.outputs[0]], list(opts.outputs)


def _check_outputs(opts: InitOptions, source: str, info: DataInfo, outputs: tuple[int, ...] | None) -> None:
    """The model's outputs against --task (and, labelled, against val/'s classes)."""
    if outputs is None:  # --model train: a classifier with a head for the data's classes, built in the model stage
        return
    shown = opts.model
    if opts.task == "dense" and len(outputs) != 4:
        raise VitqError(f"--task dense needs output maps (N, K, H, W), but {shown} outputs {_shape(outputs)}: pass "
                        "--task classification for logits, or a model whose forward returns maps (its dense head)")
    if opts.task == "classification" and len(outputs) != 2:
        hint = "pass --task dense for maps" if len(outputs) == 4 else "classification needs logits (N, classes)"
        raise VitqError(f"--task classification needs logits (N, classes), but {shown} outputs {_shape(outputs)}: "
                        f"{hint}")
    if opts.task == "classification" and info.classes and outputs[1] < len(info.classes):
        raise VitqError(f"{shown} has {outputs[1]} outputs but {info.path}/val/ has {len(info.classes)} class folders "
                        f"({', '.join(info.classes[:3])}, ...): give a model with a head for them, or images without "
                        "class folders (val/<image>: judged by agreement with FP32)")


def _load_model(text: str, root: Path, source: str, opts: InitOptions,
                info: DataInfo) -> tuple[int, int, dict[str, tuple[int, ...]] | None]:
    """(channels, side, each output's shape on a 2-image batch, by name) of the model: built (its checkpoint loaded)
    as the model stage will, and run once. --model train: the data's shape, outputs unknown until it is trained."""
    if source == "train":
        return opts.channels or info.channels or 1, opts.image_size or 32, None
    from vitq.errors import ModelError
    from vitq.params import parse_params
    from vitq.tasks.sources import Inputs, get_source

    fixed: list[int | None] = []
    if source == "onnx":
        fixed = _onnx_dims(yaml.safe_load(text)["model"]["path"], root)[1:]
        for option, given, dim in (("--channels", opts.channels, fixed[0] if len(fixed) == 3 else None),
                                   ("--image-size", opts.image_size, fixed[1] if len(fixed) == 3 else None),
                                   ("--image-size", opts.image_size, fixed[2] if len(fixed) == 3 else None)):
            if given and dim and given != dim:
                raise VitqError(f"{option} {given} does not fit {opts.model}: its input is (N, "
                                f"{', '.join(str(d or '?') for d in fixed)}); drop {option}")
        channels = opts.channels or (fixed[0] if len(fixed) == 3 else None)
        side = opts.image_size or (fixed[1] if len(fixed) == 3 and fixed[1] == fixed[2] else None)
        if not channels or not side:
            dims = ", ".join(str(d or "?") for d in fixed)
            raise VitqError(f"the ONNX file's input has no fixed square shape (N, {dims}"
                            "): pass --image-size and --channels (the input the model takes, e.g. --image-size 224 "
                            "--channels 3)")
    elif source == "python":
        if not (opts.channels and opts.image_size):
            raise VitqError("--image-size and --channels are required with --model python:... (the input the model "
                            "takes, e.g. --image-size 224 --channels 3)")
        channels, side = opts.channels, opts.image_size
    else:
        # probes (timm / torchvision say their own): --mean's length where given, as the schema checks it
        channels, side = opts.channels or (len(opts.mean) if opts.mean else 3), opts.image_size or 32

    raw = yaml.safe_load(text)
    raw["data"].update(source="digits", path=None, image_size=side, channels=channels)
    raw["quantize"].update(recipes=[], carry={})  # judged once the source is known (_recipes_for)
    try:
        cfg = parse_params(raw, "params.yaml").model
    except VitqError as exc:
        raise VitqError(_in_options(str(exc).removeprefix("params.yaml: "))) from None
    src = get_source(cfg.source)
    try:
        src.check(cfg, root)
        loaded = src.load(cfg, Inputs(root, channels, side, len(info.classes) or None, 0))
    except ModelError as exc:  # the stage's advice in params.yaml terms, said in this command's options
        message = _in_options(str(exc))
        if cfg.num_classes is not None and opts.num_classes is None and "--num-classes" in message:
            message += f" (the head was built for the {cfg.num_classes} class folders of --data's val/)"
        raise VitqError(message) from None
    except VitqError:
        raise
    except Exception as exc:  # the model's library or the user's code, e.g. a builder that downloads weights
        why = _first_line(exc)
        hint = (": nothing downloads here (torchvision's segmentation and detection builders fetch a backbone: pass "
                "--arch '{weights_backbone: null}', your weights with --checkpoint)"
                if isinstance(exc, OSError) else "; check --model and --arch")
        raise VitqError(f"could not build {opts.model} ({type(exc).__name__}: {why}){hint}") from None
    c, h, w = loaded.contract.input_size
    if h != w:
        raise VitqError(f"{opts.model} takes {c}x{h}x{w} inputs; vitq's data are square: build it square (--arch)")
    for option, given, own in (("--channels", opts.channels, c), ("--image-size", opts.image_size, h)):
        if source in ("timm", "torchvision") and given and given != own:
            raise VitqError(f"{option} {given} does not fit {opts.model}: it takes {c}x{h}x{w} inputs; drop "
                            f"{option}" + (" (or build it for that size: --arch '{img_size: N}')"
                                           if option == "--image-size" and source == "timm" else ""))
    return c, h, _output_shape(loaded, c, h, opts.model)


def _in_options(message: str) -> str:
    for params_key, option in (("set model.num_classes:", "pass --num-classes"),
                               ("set model.name / model.arch", "pass --model / --arch"),
                               ("set data.channels:", "pass --channels"), ("set data.image_size:", "pass --image-size"),
                               ("set model.mean and model.std", "pass --mean and --std")):
        message = message.replace(params_key, option)
    return message


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _output_shape(loaded, channels: int, side: int, shown: str) -> dict[str, tuple[int, ...]]:
    """Each output's shape on a batch of 2 images (zeros), by the name the pipeline gives it (one output: `logits`;
    a tuple: output_0, ...; a dict: its keys; an ONNX file: its graph's names): the model must run."""
    import numpy as np

    from vitq.errors import ModelError

    x = np.zeros((2, channels, side, side), np.float32)
    if loaded.model is None:
        from vitq.tasks.model import predict_onnx
        from vitq.tasks.targets.onnx import backend as onnx_backend

        try:
            sess = onnx_backend.session(loaded.onnx_file)
            if len(sess.get_outputs()) == 1:
                return {"logits": tuple(predict_onnx(loaded.onnx_file, x, shown).shape)}
            (batch,) = onnx_backend.run_outputs(sess, x, len(x))
        except ModelError as exc:
            raise VitqError(str(exc)) from None
        except Exception as exc:  # ONNX Runtime on the user's graph
            raise VitqError(f"{shown} fails on a batch of {channels}x{side}x{side} images ({type(exc).__name__}: "
                            f"{_first_line(exc)}): pass the --image-size / --channels it takes") from None
        return {name: tuple(out.shape) for name, out in batch.items()}
    import torch

    from vitq.tasks.model import named_outputs

    model = loaded.model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.from_numpy(x))
    except Exception as exc:  # the model's own code
        raise VitqError(f"{shown} fails on a batch of {channels}x{side}x{side} images ({type(exc).__name__}: "
                        f"{_first_line(exc)}): pass the --image-size / --channels (or --arch) it takes") from None
    try:
        return {name: tuple(t.shape) for name, t in named_outputs(out, shown).items()}
    except ModelError as exc:
        raise VitqError(str(exc)) from None


def _recipes_for(text: str, source: str, opts: InitOptions, info: DataInfo,
                 several_outputs: bool = False) -> tuple[list[str], dict, list[str]]:
    """quantize.recipes / carry: --recipes, or the template's list less what the source cannot take (an ONNX file
    has no torch model for Core ML or the torch-based recoveries) and, for a model with several outputs, what reads
    one output only (the recovery recipes, targets whose runtime reads one); and the template's recipes left out."""
    from vitq.recipes import get_recipe
    from vitq.tasks.sources import get_source
    from vitq.tasks.targets.registry import get_target

    src = get_source(source)

    def refused(name: str) -> str | None:
        recipe = get_recipe(name)
        target = get_target(recipe.target)
        if several_outputs and (getattr(recipe, "recovery", None) or not target.several_outputs):
            what = "its recovery search steers on one output" if getattr(recipe, "recovery", None) else \
                f"target {target.name!r} reads one output"
            return f"recipe {name!r} takes single-output models ({what}), and this model has several"
        return src.refuses(recipe, from_torch=target.from_torch)

    quantize = yaml.safe_load(text).get("quantize") or {}
    listed, template_carry = list(quantize.get("recipes") or []), dict(quantize.get("carry") or {})
    if opts.recipes is None:
        recipes = [r for r in listed if not refused(r)]
        left_out = [r for r in listed if r not in recipes]
    else:
        recipes, left_out = list(opts.recipes), []
        for name in recipes:
            why = refused(name)
            if why:
                raise VitqError(f"--recipes: {why}; drop it from --recipes")
    carry = {k: v for k, v in template_carry.items() if v in recipes and not refused(k)}
    for name in [*recipes, *carry]:
        if getattr(get_recipe(name), "recovery", None) == "qat" and not info.train:
            where = f"{info.path}/train/" if info.path else "train/"
            raise VitqError(f"--recipes: {name} fine-tunes on the training images, and there are none ({where}): add "
                            "train/ to --data, or drop it from --recipes")
    return recipes, carry, left_out


def _data_summary(info: DataInfo, task: str) -> str:
    if not info.path:
        return ", 10 classes (labelled)"
    parts = []
    if info.classes:
        parts.append(f"{len(info.classes)} classes" + (" (class folders; the dense task uses no labels)"
                                                        if task == "dense" else ""))
    else:
        parts.append("no labels")
    parts.append("ground-truth masks (val_masks/)" if info.masks else "no masks" if task == "dense" else "")
    return ", " + ", ".join(p for p in parts if p)


def _task_summary(p, info: DataInfo) -> str:
    v = p.validate_
    if p.task.kind == "dense":
        how = f"mask IoU with FP32's masks >= {v.min_mask_iou}"
        how += (f", mIoU drop vs val_masks/ <= {v.max_miou_drop} pts" if v.max_miou_drop is not None
                else " (no ground-truth masks: no mIoU)")
        return f"task: dense (task.masks: {p.task.masks}, mask_threshold {p.task.mask_threshold}); passed: {how}"
    if info.path and not info.classes:
        return f"task: classification, no labels; passed: disagreement with FP32's top-1 <= {v.max_top1_drop} pts"
    return f"task: classification; passed: top-1 drop <= {v.max_top1_drop} pts"


def _python_factory(factory: str, root: Path) -> str:
    where, _, function = factory.rpartition(":")
    return f"{_path_in(where, root)}:{function}" if where.endswith(".py") else factory


def _onnx_dims(path: str, root: Path) -> list[int | None]:
    from vitq.tasks.sources import check_onnx_file, onnx_input_output, resolve_path, static_dims

    model = check_onnx_file(resolve_path(path, root), f"--model onnx:{path}")
    return static_dims(onnx_input_output(model)[0])


def existing_workspace(root: Path) -> str | None:
    found = [name for name in WORKSPACE_FILES if (root / name).exists()]
    return ", ".join(found) if found else None


def _git_toplevel(path: Path) -> Path | None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=probe, capture_output=True, text=True)
    except FileNotFoundError:
        raise VitqError("git is not installed; vitq workspaces are git + DVC repositories (install git)") from None
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def init_workspace(opts: InitOptions) -> list[str]:
    """Write the workspace; returns the lines to print. Nothing is left behind when a step fails."""
    root = opts.directory = Path(opts.directory).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise VitqError(f"{str(root)!r} exists and is not a directory")
    found = existing_workspace(root) if root.is_dir() else None
    if found:
        raise VitqError(f"{str(root)!r} is a workspace already ({found} exist); vitq init never overwrites one: "
                        "edit its params.yaml, or pick a new directory")
    remote = dvc_remote_option(opts)  # (name, url) or None; checked before anything is written
    plan_ = plan(opts)
    toplevel = _git_toplevel(root)
    created_dir = not root.exists()
    had_dvcignore = (root / ".dvcignore").exists()
    gitignore = root / ".gitignore"
    users_gitignore = gitignore.read_text() if gitignore.is_file() else None  # kept, ours appended
    written: list[Path] = []
    git_dir = root / ".git"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for name, text in plan_.files.items():
            if name == ".gitignore" and users_gitignore is not None:
                text = users_gitignore.rstrip("\n") + "\n\n" + text
            (root / name).write_text(text)
            written.append(root / name)
        if toplevel is None:
            subprocess.run(["git", "init", "-q"], cwd=root, check=True, capture_output=True)
        from dvc.repo import Repo

        dvc_log = logging.getLogger("dvc")
        level, dvc_log.level = dvc_log.level, logging.WARNING  # its "Initialized DVC repository." (said below)
        try:
            Repo.init(str(root), subdir=toplevel is not None and toplevel != root).close()
        finally:
            dvc_log.setLevel(level)
        if remote is not None:
            from vitq.flows.preflight import add_remote

            add_remote(root, *remote, default=True)
    except BaseException as exc:
        _undo(root, written, created_dir, git_dir if toplevel is None else None, had_dvcignore, users_gitignore)
        if isinstance(exc, (VitqError, KeyboardInterrupt)):
            raise
        raise VitqError(f"could not initialise {str(root)!r}: {type(exc).__name__}: "
                        f"{(str(exc).strip().splitlines() or [''])[0]}") from None
    where = "a new git repository" if toplevel is None else f"inside the git repository {toplevel} (dvc init --subdir)"
    lines = [f"vitq workspace in {root}: {where}", *(f"  {line}" for line in plan_.summary),
             "  wrote params.yaml (every key commented), dvc.yaml, .gitignore; DVC initialised"]
    for stage, deps in plan_.deps.items():
        if deps:
            lines.append(f"  dvc.yaml: stage {stage} depends on {', '.join(deps)}")
    if remote is not None:
        name, url = remote
        shown = url if "://" in url else str(Path(url).expanduser().resolve())  # a directory: where it is
        lines.append(f"  DVC remote {name!r} (the default remote): {shown}; `vitq orchestrate --dvc-remote {name}` "
                     "pushes there")
    lines.append(f"next: cd {root} && vitq run    (or dvc repro; MLflow: vitq's runs in ./mlflow.db)")
    return lines


def dvc_remote_option(opts: InitOptions) -> tuple[str, str] | None:
    """--dvc-remote URL and --dvc-remote-name NAME as (name, url), checked (nothing contacted); None without them."""
    from urllib.parse import urlparse

    from vitq.flows.preflight import check_remote_url

    if opts.dvc_remote is None:
        if opts.dvc_remote_name is not None:
            raise VitqError(f"--dvc-remote-name {opts.dvc_remote_name!r} names the remote --dvc-remote URL adds; "
                            "pass --dvc-remote too")
        return None
    url = check_remote_url(opts.dvc_remote)
    name = opts.dvc_remote_name
    if name is None:
        name = "s3" if urlparse(url).scheme == "s3" else "storage"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise VitqError(f"--dvc-remote-name {name!r} must be a name of letters, digits, '_', '.' or '-', e.g. s3")
    return name.lower(), url


def _undo(root: Path, written: list[Path], created_dir: bool, git_dir: Path | None, had_dvcignore: bool,
          users_gitignore: str | None) -> None:
    for path in written:
        path.unlink(missing_ok=True)
    if users_gitignore is not None:
        (root / ".gitignore").write_text(users_gitignore)
    leftovers = [root / ".dvc", *([] if had_dvcignore else [root / ".dvcignore"]), *([git_dir] if git_dir else [])]
    for leftover in leftovers:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.exists():
            leftover.unlink()
    if created_dir and root.is_dir() and not any(root.iterdir()):
        root.rmdir()
