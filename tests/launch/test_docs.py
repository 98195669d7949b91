"""The front door and the docs: README.md stays short, and every relative link in README.md,
docs/*.md and bench/RESULTS.md points at a file that exists (mkdocs checks links inside docs/ with
`mkdocs build --strict` in `make test`; the README and bench/RESULTS.md are outside it)."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", REPO / "bench" / "RESULTS.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links of `text` that point into the repository (not URLs, not
    same-page anchors), outside fenced code blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_is_a_front_door():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; keep it <= 200 and move the detail into docs/"


def test_readme_links_every_docs_page():
    links = {Path(t.split("#")[0]).name for t in relative_links((REPO / "README.md").read_text())}
    missing = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.name not in links | {"index.md"}]
    assert not missing, f"README.md does not link docs pages: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = [t for t in relative_links(page.read_text()) if not (page.parent / t.split("#")[0]).exists()]
    assert not broken, f"{page.relative_to(REPO)}: links to missing files: {broken}"


def test_mkdocs_nav_lists_every_page():
    import yaml

    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    listed = {next(iter(entry.values())) for entry in nav}
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    assert listed == pages, f"mkdocs.yml nav {sorted(listed)} != docs/*.md {sorted(pages)}"
