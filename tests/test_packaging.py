"""One installed namespace: the wheel holds `vitq` alone at its top level (tasks/ and flows/ install as vitq.tasks
and vitq.flows), every package of the source tree is in it, and our modules import each other without a circle."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Where each source folder installs (pyproject.toml: [tool.setuptools] package-dir).
INSTALLED_AS = {"vitq": "vitq", "tasks": "vitq.tasks", "flows": "vitq.flows"}


def _modules() -> dict[str, Path]:
    """Every module of the three source folders by its installed name."""
    mods = {}
    for folder, package in INSTALLED_AS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            mods[".".join((package, *parts))] = path
    return mods


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # Built from a copy of what the build reads: setuptools builds in the source tree (build/, *.egg-info).
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", *INSTALLED_AS):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob("vitq-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_vitq_alone_at_the_top_level(wheel):
    top = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"vitq"}, sorted(top)


def test_the_wheel_holds_every_module_of_the_tree(wheel):
    in_wheel = {name.removesuffix(".py").replace("/", ".") for name in wheel.namelist() if name.endswith(".py")}
    in_wheel |= {name.removesuffix(".__init__") for name in in_wheel}
    missing = sorted(set(_modules()) - in_wheel)
    assert not missing, f"modules of the tree not in the wheel (add their package to pyproject.toml): {missing}"
    assert {"vitq/templates/params.yaml", "vitq/templates/dvc-pipeline.yaml"} <= set(wheel.namelist())


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Our modules that `path` imports, anywhere in it (functions and TYPE_CHECKING blocks included)."""

    def ours(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {ours(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {ours(f"{node.module}.{a.name}") for a in node.names}
    return found - {None}


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of our modules in the import graph (Tarjan), largest first."""
    mods = _modules()
    edges = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(mods)))
    for v in mods:
        if v not in index:
            visit(v)
    return sorted(groups, key=len, reverse=True)


def test_no_import_circle_among_our_modules():
    assert import_cycles() == []


def test_the_cycle_check_finds_a_circle(tmp_path, monkeypatch):
    """The check above can fail: a config that imports a stage back is found."""
    monkeypatch.setattr(sys.modules[__name__], "_modules", lambda: {
        "vitq.config": _write(tmp_path / "config.py", "from vitq.tasks.sources import get_source\n"),
        "vitq.tasks.sources": _write(tmp_path / "sources.py", "def f():\n    from vitq.config import ModelConfig\n"),
        "vitq.tasks.data": _write(tmp_path / "data.py", "from vitq.config import DataConfig\n"),
    })
    assert import_cycles() == [["vitq.config", "vitq.tasks.sources"]]


def test_configuration_and_targets_import_nothing_above_them():
    """vitq/config.py is a leaf (the errors and recipes aside); a target never imports the stages or the
    registry back."""
    mods = _modules()
    assert _imports(mods["vitq.config"], mods) <= {"vitq.errors", "vitq.recipes"}
    upper = {"vitq.tasks.stages", "vitq.tasks.targets.registry", "vitq.tasks.report", "vitq.flows", "vitq.cli",
             "vitq.api", "vitq.params"}
    for name, path in mods.items():
        if name.startswith("vitq.tasks.targets.") and name != "vitq.tasks.targets.registry":
            assert not {m for m in _imports(path, mods) if any(m == u or m.startswith(u + ".") for u in upper)}, name


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
