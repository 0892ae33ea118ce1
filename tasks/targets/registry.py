"""The targets by name: the one registry recipes, params.yaml, the CLI and plugins look targets up in.

Each target lives in its own folder (onnx/, coreml/, tensorrt/) and never imports this module back; a plugin adds
its own with `register_target` (vitq/plugins.py)."""

from __future__ import annotations

from vitq.errors import ConfigError
from vitq.tasks.targets.base import Reference, Target
from vitq.tasks.targets.coreml.target import COREML
from vitq.tasks.targets.onnx.target import ONNX
from vitq.tasks.targets.tensorrt.target import TENSORRT

__all__ = ["TARGETS", "Reference", "Target", "get_target", "register_target", "worker_tags"]

TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add a target to the registry (recipes name it by `target.name`); returns it."""
    TARGETS[target.name] = target
    return target


for _target in (ONNX, COREML, TENSORRT):
    register_target(_target)


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"unknown target {name!r}; allowed: {', '.join(sorted(TARGETS))}") from None


def worker_tags(recipe_name: str) -> list[str]:
    """Tags that route a variant's tasks: the worker kind and target its recipe needs."""
    from vitq.recipes import get_recipe

    target = get_target(get_recipe(recipe_name).target)
    return [f"worker:{target.worker}", f"target:{target.name}"]
