"""`vitq init DIR`: a workspace for one's own model and data, ready for `vitq run` and `dvc repro`.

It writes params.yaml (the documented template, every key commented, with the model and data set from the
options) and dvc.yaml (the pipeline's stages, with the user's files as dependencies: the image folder of
the data stage, the checkpoint / factory file / ONNX file of the model stage, so that changing one reruns
what reads it), a .gitignore for the pipeline's outputs (DVC tracks them), then `git init` (unless DIR is
inside a git work tree already) and `dvc init` (`--subdir` inside an existing repository).

Everything is checked before anything is written: the model is built and its checkpoint loaded strictly,
the data folder is listed, params.yaml is parsed as `vitq run` parses it. A problem is one line (exit 2) and
DIR is left as it was. An existing workspace (params.yaml, dvc.yaml or .dvc/ in DIR) is never overwritten.
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


def set_value(text: str, section: str | None, key: str, value) -> str:
    """`text` (the template) with `section.key` (or top-level `key`) set to `value`, its comment kept."""
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
            head = f"{indent}{key}: {_yaml_value(value)}"
            comment = match.group(4)
            value_text, end = match.group(2), i + 1
            while _open_brackets(value_text) > 0 and end < len(lines):  # a flow value continued on the next lines
                value_text += lines[end].split("#", 1)[0]
                end += 1
            lines[i:end] = [head if not comment else f"{head.ljust(COMMENT_COLUMN - 1)} {comment}"]
            return "\n".join(lines)
    raise AssertionError(f"template has no key {section}.{key}" if section else f"template has no key {key}")


def _open_brackets(text: str) -> int:
    return text.count("[") + text.count("{") - text.count("]") - text.count("}")


def template(name: str) -> str:
    """The documented workspace file `name` (params.yaml, dvc.yaml): the repository root's own, shipped in the
    package (tests/test_init.py keeps the two equal)."""
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


def _data_classes(data_root: Path) -> list[str]:
    from vitq.tasks.data import _list_images

    return _list_images(data_root / "val")[1]


def plan(opts: InitOptions) -> Plan:
    """Check everything and render the files; writes nothing."""
    from vitq.tasks import data as data_mod
    from vitq.config import DataConfig
    from vitq.params import parse_params

    root = opts.directory
    source, model_keys = parse_model(opts.model)
    if source != "train" and not opts.data:
        raise VitqError(f"--data is required with --model {opts.model!r}: an image folder with val/<class>/<image> "
                        "and calibration/ or train/ (the embedded digits data fits only --model train)")
    if opts.checkpoint and source in ("onnx", "train"):
        raise VitqError(f"--checkpoint does not apply to --model {opts.model!r} (it is for timm, torchvision, python)")
    if source == "torchvision" and not opts.checkpoint:
        raise VitqError("--checkpoint is required with --model torchvision:NAME (nothing downloads here; torchvision "
                        "models are built without weights)")
    if source in ("python", "onnx") and (opts.mean is None or opts.std is None):
        raise VitqError(f"--mean and --std are required with --model {source}:... (its input normalisation, "
                        "(x / 255 - mean) / std per channel, e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)")
    if (opts.mean is None) != (opts.std is None):
        raise VitqError("--mean and --std go together: give both or neither")

    text = template("params.yaml")
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
    data: dict = {}
    classes: list[str] = []
    if opts.data:
        data_path = _path_in(opts.data, root)
        data = {"source": "imagefolder", "path": data_path}
        probe = DataConfig(source="imagefolder", path=str(Path(opts.data).expanduser().resolve()))
        data_mod.check_data_config(probe)
        classes = _data_classes(Path(probe.path))
    if opts.num_classes is not None:
        model["num_classes"] = opts.num_classes
    elif classes and source in ("timm", "torchvision"):
        model["num_classes"] = len(classes)  # the head the labels need (the checkpoint must have it)
    if opts.task != "classification":
        text = set_value(text, "task", "kind", opts.task)

    # The model itself: built and its checkpoint loaded, so that a misfit is refused now, not in the model stage.
    for key, value in model.items():
        text = set_value(text, "model", key, value)
    contract = _load_contract(text, root, source, opts)
    channels, side = opts.channels or contract[0], opts.image_size or contract[1]
    data.update(image_size=side, channels=channels)
    for key, value in data.items():
        text = set_value(text, "data", key, value)
    if opts.recipes is not None:
        text = set_value(text, "quantize", "recipes", list(opts.recipes))
        text = set_value(text, "quantize", "carry", _carry_for(text, opts.recipes))
    parsed = parse_params(yaml.safe_load(text), str(root / "params.yaml"))  # as `vitq run` reads it

    deps: dict[str, list[str]] = {"data": [data["path"]] if opts.data else [], "model": []}
    if parsed.model.checkpoint:
        deps["model"].append(parsed.model.checkpoint)
    if parsed.model.factory and parsed.model.factory.rpartition(":")[0].endswith(".py"):
        deps["model"].append(parsed.model.factory.rpartition(":")[0])
    if parsed.model.path:
        deps["model"].append(parsed.model.path)
    dvc_text = template("dvc.yaml")
    for stage, stage_deps in deps.items():
        dvc_text = _add_deps(dvc_text, stage, stage_deps)
    summary = [f"model: {source} {parsed.model.name or ''}".rstrip()
               + (f", checkpoint {parsed.model.checkpoint}" if parsed.model.checkpoint else "")
               + f"; input {channels}x{side}x{side}",
               f"data: {data.get('path', 'digits (embedded)')}"
               + (f", {len(classes)} classes" if classes else (", no labels" if opts.data else "")),
               f"recipes: {', '.join(parsed.quantize.recipes)}"]
    return Plan({"params.yaml": text, "dvc.yaml": dvc_text, ".gitignore": GITIGNORE}, deps, summary)


def _python_factory(factory: str, root: Path) -> str:
    where, _, function = factory.rpartition(":")
    return f"{_path_in(where, root)}:{function}" if where.endswith(".py") else factory


def _carry_for(text: str, recipes: list[str]) -> dict:
    """The template's carry entries whose source recipe is among `recipes` (the others would name a variant
    that is not made)."""
    carry = (yaml.safe_load(text).get("quantize") or {}).get("carry") or {}
    return {k: v for k, v in carry.items() if v in recipes}


def _load_contract(text: str, root: Path, source: str, opts: InitOptions) -> tuple[int, int]:
    """(channels, side) the model takes: built (and its checkpoint loaded) as the model stage will."""
    if source == "train":
        return opts.channels or 1, opts.image_size or 32
    if source == "onnx":
        fixed = _onnx_dims(yaml.safe_load(text)["model"]["path"], root)[1:]
        channels = opts.channels or (fixed[0] if len(fixed) == 3 else None)
        side = opts.image_size or (fixed[1] if len(fixed) == 3 and fixed[1] == fixed[2] else None)
        if not channels or not side:
            raise VitqError(f"the ONNX file's input has no fixed square shape ({fixed}): pass --image-size and "
                            "--channels (the input the model takes, e.g. --image-size 224 --channels 3)")
        return channels, side
    if source == "python" and not (opts.channels and opts.image_size):
        raise VitqError("--image-size and --channels are required with --model python:... (the input the model "
                        "takes, e.g. --image-size 224 --channels 3)")
    from vitq.tasks.sources import Inputs, get_source
    from vitq.params import parse_params
    from vitq.errors import ModelError

    raw = yaml.safe_load(text)
    raw["data"].update(source="digits", path=None, image_size=opts.image_size or 32, channels=opts.channels or 3)
    cfg = parse_params(raw, "params.yaml").model
    try:
        get_source(cfg.source).check(cfg, root)
        loaded = get_source(cfg.source).load(cfg, Inputs(root, opts.channels or 3, opts.image_size or 32, None, 0))
    except ModelError as exc:  # the stage's advice in params.yaml terms, said in this command's options
        message = str(exc).replace("set model.num_classes:", "pass --num-classes").replace(
            "set model.name / model.arch", "pass --model / --arch")
        if cfg.num_classes is not None and opts.num_classes is None and "--num-classes" in message:
            message += f" (the head was built for the {cfg.num_classes} class folders of --data's val/)"
        raise VitqError(message) from None
    c, h, w = loaded.contract.input_size
    if h != w and not opts.image_size:
        raise VitqError(f"the model takes {c}x{h}x{w} inputs; vitq's data are square: pass --image-size")
    return c, h


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
    lines.append(f"next: cd {root} && vitq run    (or dvc repro; MLflow: vitq's runs in ./mlflow.db)")
    return lines


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
