"""The README stays short, its links and the docs' links resolve, and docs/config.md is what
config.py's docstrings generate."""

import re
from pathlib import Path

import pytest

from qlora_lab.configdoc import GENERATOR_COMMAND, render_config_reference, undocumented_fields

ROOT = Path(__file__).resolve().parents[1]
README_MAX_CHARS = 15_000

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(path: Path) -> list[str]:
    """Link targets in a Markdown file that point into the repository (no URL, no #anchor)."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, re.IGNORECASE)]


def test_config_reference_is_generated_from_config_py():
    committed = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == render_config_reference(), (
        f"docs/config.md is out of date with src/qlora_lab/config.py — run: {GENERATOR_COMMAND}")


def test_every_config_field_has_a_doc_line():
    missing = undocumented_fields()
    assert not missing, (f"config fields without a `name: text` line in their class docstring "
                         f"in src/qlora_lab/config.py: {', '.join(missing)}")


def test_readme_is_at_most_15000_characters():
    size = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert size <= README_MAX_CHARS, (
        f"README.md is {size} characters (at most {README_MAX_CHARS}) — move reference "
        "material into docs/")


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(path):
    broken = [t for t in relative_links(path)
              if not (path.parent / t.split("#", 1)[0]).exists()]
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def test_link_finder_sees_relative_links_only():
    sample = ROOT / "README.md"
    assert all(not t.startswith(("http", "#")) for t in relative_links(sample))
    assert LINK.findall("[a](docs/x.md#part) ![b](img.png) [c](https://e.org)") == [
        "docs/x.md#part", "img.png", "https://e.org"]
