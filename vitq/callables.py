"""User code named in params.yaml: `path/to/file.py:function` or `package.module:function`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from vitq.errors import ConfigError


def load_callable(spec: str, what: str, root: str | Path | None = None) -> Callable:
    """Import the function `spec` names; a file path is relative to `root` (the workspace; default: cwd).
    Every fault (no ':', missing file or module, missing or non-callable attribute, an import that raises)
    is one `ConfigError` naming `what` and the value."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"{what} {spec!r} must be 'path/to/file.py:function' or 'package.module:function'")
    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise ConfigError(f"{what} {spec!r} must be 'path/to/file.py:function' or 'package.module:function'")
    try:
        if where.endswith(".py"):
            path = Path(where) if Path(where).is_absolute() else Path(root or ".") / where
            if not path.is_file():
                raise ConfigError(f"{what} {spec!r}: file {str(path)!r} does not exist")
            name = f"vitq_user_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module  # dataclasses and pickling look modules up by name
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{what} {spec!r}: no module named {exc.name!r}") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{what} {spec!r}: importing {where!r} raised {type(exc).__name__}: {first}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"{what} {spec!r}: {where!r} has no {attr!r}")
    if not callable(fn):
        raise ConfigError(f"{what} {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn
