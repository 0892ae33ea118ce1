"""Deployment targets: which worker pool a target's tasks need and whether its runtime is here.

A recipe names a target; a target names the worker kind (`cpu`, `macos`, `cuda`) that can
produce, validate and time its artifacts, and the Python modules it needs. Tasks for a target
whose runtime is absent are recorded as not run, with the reason, never run somewhere else.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from typing import Literal

Worker = Literal["cpu", "macos", "cuda"]


@dataclass(frozen=True)
class Target:
    name: str
    worker: Worker  # the worker pool whose machines run this target's tasks
    modules: tuple[str, ...]  # Python modules the runtime needs
    platforms: tuple[str, ...] | None = None  # sys.platform values that can produce its artifacts; None: any
    run_platforms: tuple[str, ...] | None = None  # where its runtime predicts / times them; None: as platforms

    def missing_runtime(self) -> str | None:
        """None when this machine can produce the target's artifacts, else the reason it cannot."""
        if self.platforms is not None and sys.platform not in self.platforms:
            return f"target {self.name!r} needs a {self.worker} worker ({'/'.join(self.platforms)}); this is {sys.platform}"
        for mod in self.modules:
            if importlib.util.find_spec(mod) is None:
                return f"target {self.name!r} needs the Python module {mod!r}, which is not installed here"
        return None

    def missing_executor(self) -> str | None:
        """None when this machine can also run (predict, time) the artifacts, else why not."""
        platforms = self.run_platforms or self.platforms
        if platforms is not None and sys.platform not in platforms:
            return f"target {self.name!r} runs its models on a {self.worker} worker ({'/'.join(platforms)}); this is {sys.platform}"
        return self.missing_runtime()


TARGETS: dict[str, Target] = {
    "onnx": Target("onnx", "cpu", ("onnxruntime",)),
    # Core ML programs are converted and inspected anywhere; only macOS predicts and times them.
    "coreml": Target("coreml", "macos", ("coremltools",), run_platforms=("darwin",)),
    "tensorrt": Target("tensorrt", "cuda", ("tensorrt", "torch")),
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        from vitq.errors import ConfigError

        raise ConfigError(f"unknown target {name!r}; allowed: {', '.join(sorted(TARGETS))}") from None


def worker_tags(recipe_name: str) -> list[str]:
    """Tags that route a variant's tasks: the worker kind and target its recipe needs."""
    from vitq.recipes import get_recipe

    target = get_target(get_recipe(recipe_name).target)
    return [f"worker:{target.worker}", f"target:{target.name}"]
