"""The front door stays short and true: README.md lists every subcommand in at most 200 lines, with no
paragraph of prose over 5 lines; docs/README.md indexes every page; docs/cli.md's stage table is the
registry's."""
import re
from pathlib import Path

from incubate import cli
from incubate.stage_registry import ALL

ROOT = Path(__file__).resolve().parents[2]


def prose_paragraphs(text: str) -> list[list[str]]:
    """Runs of lines outside code blocks, tables and headings, split at blank lines."""
    paragraphs, current, code = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            code = not code
            line = ""
        if code or not line.strip() or line.startswith(("|", "#")):
            paragraphs, current = paragraphs + ([current] if current else []), []
            continue
        current.append(line)
    return paragraphs + ([current] if current else [])


def test_readme_is_short_and_lists_every_subcommand():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert max(len(p) for p in prose_paragraphs(text)) <= 5
    subcommands = cli.parser()._subparsers._group_actions[0].choices
    assert [c for c in subcommands if not re.search(rf"^incubate {c} ", text, re.M)] == []


def test_docs_index_links_every_page():
    index = (ROOT / "docs/README.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md")
    assert [p for p in pages if f"]({p})" not in index] == []


def test_the_cli_page_shows_the_registry_of_stages():
    rows = [line for line in (ROOT / "docs/cli.md").read_text().splitlines() if line.startswith("| ")]
    for stage in ALL:
        row = next(r for r in rows if r.startswith(f"| {stage.name} |"))
        assert f"`incubate {stage.command}" in row and stage.produces in row
        folder = stage.folder.replace("{module}", "I") + "/" if stage.folder else "none"
        assert folder in row, (stage.name, row)


def test_the_layout_names_every_folder_and_top_module_and_the_layout_page_every_module():
    """README's Layout shows the folders (and the modules on top); docs/layout.md names every module."""
    readme = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    page = (ROOT / "docs/layout.md").read_text()
    pkg = ROOT / "incubate"
    folders = [p.name for p in pkg.iterdir() if (p / "__init__.py").exists()]
    tops = [p.name for p in pkg.glob("*.py") if p.name != "__init__.py"]
    assert [f for f in folders if f"{f}/" not in readme] == []
    assert [m for m in tops if m not in readme] == []
    inner = [p for p in pkg.rglob("*.py") if p.name != "__init__.py" and p.parent != pkg]
    assert [str(p.relative_to(pkg)) for p in inner if p.name not in page and p.stem not in page] == []
