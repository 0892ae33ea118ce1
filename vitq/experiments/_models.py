"""The model an experiment command was asked for, by name: one resolver for every experiment.

A name is 'demo' (the workspace's trained model after `vitq run`, else the untrained digits ViT),
a timm name, or, for the commands that accept it, 'torchvision:<name>'. Models other than a trained
demo get random weights: nothing can be downloaded here, and sizes, coverage and latency do not
depend on the weight values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vitq.errors import VitqError

if TYPE_CHECKING:
    import torch

    from vitq.tasks.layout import Workspace

DEMO = "demo"
DEMO_TIMM_NAME = "vit_digits_patch4_32"  # what 'demo' builds when the workspace has no trained model
TORCHVISION = "torchvision:"


@dataclass(frozen=True)
class ExperimentModel:
    """A checked model name and its input shape; `build()` makes the FP32 module."""

    name: str  # as given: 'demo', a timm name, 'torchvision:<name>'
    input_size: tuple[int, int, int]  # (C, H, W)
    weights: str  # where build()'s weights come from, for the record
    timm_name: str | None = None  # timm registry name; None for a torchvision model
    model_dir: Path | None = None  # the workspace's trained model folder ('demo' after `vitq run`)
    mean: tuple[float, ...] | None = None  # per-channel input normalisation (from the model; None: not known)
    std: tuple[float, ...] | None = None

    def inputs(self, images):
        """Model inputs (N, C, H, W) float32 from uint8 images (N, H, W, C), normalised as the model expects."""
        from vitq.tasks.data import model_inputs

        if self.mean is None or self.std is None:
            raise VitqError(f"{self.name}: its input normalisation is not known here; give a timm name or 'demo'")
        return model_inputs(images, self.mean, self.std)

    def build(self) -> torch.nn.Module:
        """A new FP32 module (random weights unless `model_dir`); seed torch first for reproducible weights."""
        if self.model_dir is not None:
            from vitq.tasks.model import load_model

            return load_model(self.model_dir)[0]
        return _random_weights(self.name, self.timm_name)


def _random_weights(name: str, timm_name: str | None) -> torch.nn.Module:
    if timm_name is None:
        import torchvision

        return torchvision.models.get_model(name.removeprefix(TORCHVISION), weights=None)
    import timm

    from vitq.tasks import zoo  # noqa: F401  (registers vitq's models with timm)

    return timm.create_model(timm_name, pretrained=False)


def check_model_name(name: str, *, torchvision: bool = False) -> None:
    """Fail fast (before minutes of work) on a name `resolve_model` cannot build: one line, exit 2.

    torchvision=False: 'demo' or a timm name; a miss names the closest timm names.
    torchvision=True: also 'torchvision:<name>'; a miss lists the three accepted forms.
    """
    if name == DEMO:
        return
    if torchvision and name.startswith(TORCHVISION):
        import torchvision as tv

        tv_name = name.removeprefix(TORCHVISION)
        if tv_name not in tv.models.list_models():
            raise VitqError(f"unknown torchvision model {tv_name!r}; see torchvision.models.list_models()")
        return
    from vitq.tasks import zoo  # noqa: F401  (registers vitq's models with timm)

    if torchvision:
        import timm

        if not timm.is_model(name):
            raise VitqError(f"unknown model {name!r}; allowed: 'demo', a timm name, or 'torchvision:<name>'")
        return
    from vitq.tasks.model import check_model_config
    from vitq.config import ModelConfig

    check_model_config(ModelConfig(source="timm", name=name))


def resolve_model(name: str, workspace: Workspace | None, *, torchvision: bool = False) -> ExperimentModel:
    """Check `name` (see `check_model_name`) and find its input shape: from the trained demo's model.json,
    else from the model itself (timm's data config; torchvision's `image_size`, 224 when it has none)."""
    check_model_name(name, torchvision=torchvision)
    if name == DEMO and workspace is not None and (workspace.model_dir / "model.json").is_file():
        from vitq.tasks.model import load_model_spec

        spec = load_model_spec(workspace.model_dir)
        c, h, w = spec.input_size
        return ExperimentModel(DEMO, (c, h, w), f"trained in this workspace ({workspace.model_dir})", spec.name,
                               workspace.model_dir, tuple(spec.mean), tuple(spec.std))
    if torchvision and name.startswith(TORCHVISION):
        size = int(getattr(_random_weights(name, None), "image_size", 224))
        return ExperimentModel(name, (3, size, size), "random (torchvision, weights=None)")
    from timm.data import resolve_model_data_config

    timm_name = DEMO_TIMM_NAME if name == DEMO else name
    config = resolve_model_data_config(_random_weights(name, timm_name))  # the model's own preprocessing
    c, h, w = config["input_size"]
    return ExperimentModel(name, (c, h, w), "random (timm, pretrained=False)", timm_name,
                           mean=tuple(config["mean"]), std=tuple(config["std"]))
