"""Reading params.yaml: the schema (vitq.config, a leaf that knows no source, target or stage), then what only
the registries know: the model section against its source (keys it reads, keys it needs, its default name) and
each recipe against the source (an ONNX file has no torch model for Core ML or the torch-based recoveries).

Every problem is one `ConfigError` line naming the key, as the schema's own are.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from vitq.config import Params, _format_error
from vitq.errors import ConfigError
from vitq.plugins import load_plugins
from vitq.recipes import register_defined
from vitq.tasks.sources import check_model_section, get_source
from vitq.tasks.targets.registry import get_target

__all__ = ["load_params", "parse_params"]


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    """Validate a params mapping (`source`: where it came from, for the messages)."""
    load_plugins()  # targets and recipes from outside vitq, before recipe names are checked
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None
    try:
        model = check_model_section(params.model)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    model_source = get_source(model.source)
    for name in params.quantize.variants:
        recipe = params.quantize.recipe(name)
        why = model_source.refuses(recipe, from_torch=get_target(recipe.target).from_torch)
        if why:
            where = "carry" if name in params.quantize.carry else "recipes"
            raise ConfigError(f"{source}: {why}; remove it from quantize.{where}")
    if model is not params.model:
        params = params.model_copy(update={"model": model})
    # Like plugins: the recipes params.yaml defines join the registry in every process that parses it (the
    # flow, `vitq stage quantize <name>` under `dvc repro`, the benchmark subprocess), so get_recipe(name) works.
    register_defined(params.quantize.defined_recipes())
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; every problem becomes a one-line `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} does not exist; run from a vitq workspace or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return parse_params(raw, str(path))
