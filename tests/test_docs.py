"""The README is a front door (at most 150 lines) and the manual lives in docs/: every relative link between them
resolves to a file (and, into a Markdown file, to one of its headings), and what the README tells a newcomer to run
is what the Makefile defines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks and code spans (a `](x)` there is code, not a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """Each relative link of `path` whose file is missing, or whose #anchor names no heading of a Markdown file
    (paths in the messages relative to `root`)."""
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{path.relative_to(root)}: {target} (no file {file_part})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{path.relative_to(root)}: {target} (no heading #{anchor} in {dest.relative_to(root)})")
    return broken


def test_readme_fits_on_a_few_screens():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "guide.md").write_text("# Guide\n\n## Python API\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](guide.md#python-api) [file](missing.md) [anchor](guide.md#nowhere) `[code](no.md)`\n"
                    "```\n[fenced](no.md)\n```\n[web](https://example.org/x)\n")
    found = broken_links(page, root=tmp_path)
    assert [f.split(": ", 1)[1].split(" ")[0] for f in found] == ["missing.md", "guide.md#nowhere"], found


def test_the_readme_commands_are_makefile_targets():
    readme = (REPO / "README.md").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", readme))
    assert {"demo", "test"} <= named, named
    assert named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


def test_every_preset_is_in_the_recipe_reference():
    from vitq.recipes import presets

    table = (REPO / "docs" / "recipes.md").read_text()
    missing = [name for name in presets() if f"| `{name}` |" not in table]
    assert not missing, f"presets missing from docs/recipes.md's table: {missing}"
