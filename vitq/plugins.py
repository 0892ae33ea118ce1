"""Plugins: modules that add targets and recipes from outside vitq (`vitq.tasks.targets.registry.register_target`,
`vitq.recipes.register_recipe`), with no file of vitq edited.

Loaded once per process, before params.yaml is validated (`vitq.params.parse_params`), so every vitq
process sees the same registry (the flow, `vitq stage` under `dvc repro`, the benchmark subprocess,
workers):
- installed packages that declare an entry point in the group `vitq.plugins` (the module is imported);
- modules named in the environment variable `VITQ_PLUGINS` (comma-separated, importable from
  sys.path / PYTHONPATH).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os

ENV = "VITQ_PLUGINS"
GROUP = "vitq.plugins"
_loaded: list[str] | None = None


def plugin_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]


def load_plugins() -> list[str]:
    """Import every plugin once; returns their names. A plugin that cannot be imported is a one-line ConfigError."""
    global _loaded
    from vitq.errors import ConfigError

    if _loaded is not None:
        return _loaded
    loaded: list[str] = []
    for ep in importlib.metadata.entry_points(group=GROUP):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin is the user's input: one line
            raise ConfigError(f"plugin {ep.value!r} (entry point {GROUP}) failed to load: {exc}") from None
        loaded.append(ep.value)
    for name in plugin_modules():
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{ENV}: plugin module {name!r} failed to import: {type(exc).__name__}: {exc}; "
                              "it must be importable (on PYTHONPATH)") from None
        loaded.append(name)
    _loaded = loaded
    return loaded
