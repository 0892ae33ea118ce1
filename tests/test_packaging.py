"""pyproject.toml ships every package of the source tree, so a non-editable install (`pip install .`)
has the subpackages too (tasks.backends, tasks.recovery, vitq.experiments, ...)."""

import tomllib
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


def test_every_package_of_the_tree_is_installed():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "packages" not in config or "find" in config["packages"], "an explicit package list misses subpackages"
    shipped = set(find_packages(str(REPO), **config["packages"]["find"]))
    in_tree = {".".join(init.parent.relative_to(REPO).parts) for top in ("vitq", "tasks", "flows")
               for init in (REPO / top).rglob("__init__.py")}
    assert {"tasks.backends", "tasks.recovery", "vitq.experiments"} <= in_tree
    assert in_tree <= shipped, sorted(in_tree - shipped)
    assert not {p for p in shipped if p.split(".")[0] == "tests"}
