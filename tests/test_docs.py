"""The README a user reads in two minutes: under 15 KB, its support grid the one the family table
makes, and every link of the README and docs/ pointing at a file and heading that exist."""
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set:
    """GitHub's anchors of the page's headings (outside code blocks)."""
    found, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            found.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return found


def test_the_readme_is_short_and_its_grid_is_the_family_tables(pack):
    grid = __import__(pack.__name__ + ".core.support_grid", fromlist=["markdown"]).markdown()
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.encode()) < 15 * 1024
    assert grid in readme, "README's support grid differs from the family table: paste `python -m core.support_grid`"
    rows = grid.splitlines()
    assert any(row.startswith("| Wan VACE (`VaceWanModel`) | yes |") for row in rows)
    assert any(row.startswith("| Wan HuMo (`HumoWanModel`) | - | - | - | - | - |") for row in rows)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_points_at_a_file_and_heading_that_exist(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https, mailto
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    assert not broken, f"{page.name} links to what does not exist: {broken}"
