"""The docs hold together for a reader: every relative link in README.md and docs/**/*.md leads to a file (and a
link's #anchor to a heading of that page), every docs/ page the code, tests, recipes and benchmarks name exists, and
the docs speak to users: no paths of a developer's machine, no issue numbers, no words about sessions or lent
machines.

A results page produced by work that lands separately may be named in EXPECTED_LATER until it does: links to it
are then allowed to miss, and docs/index.md must still list it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
USER_FACING = DOCUMENTS + sorted(ROOT.glob("recipes/**/README.md")) + sorted(ROOT.glob("benchmarks/**/README.md"))
EXPECTED_LATER: set[str] = set()  # results that land separately may be named here until they do
LINK = re.compile(r"(?<!`)\[[^\]\n]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
NAMED_DOC = re.compile(r"(?<![\w/.])(docs/[\w/-]+\.md)")
FORBIDDEN = {
    "a path of a developer's machine": re.compile(r"(?<![\w.])/work/"),
    "an issue number": re.compile(r"\bissues? #?\d+", re.I),
    "words about sessions": re.compile(r"\bsessions?\b", re.I),
    "words about lent machines": re.compile(r"\blent\b|\bnot drawn\b", re.I),
    "a placeholder left for a result": re.compile(r"^[A-Z][A-Z0-9]*_[A-Z0-9_]+$", re.M),
}


def prose(path: Path) -> str:
    """The page without its fenced code blocks (a link inside code is not a link)."""
    return FENCE.sub("", path.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", prose(path), re.M)}


def relative_links(path: Path) -> list[tuple[str, str]]:
    links = []
    for target in LINK.findall(prose(path)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        links.append((file, anchor))
    return links


def repo_path(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


@pytest.mark.parametrize("document", DOCUMENTS, ids=repo_path)
def test_every_relative_link_leads_to_a_file_and_its_anchor_to_a_heading(document):
    broken = []
    for file, anchor in relative_links(document):
        target = (document.parent / file).resolve() if file else document
        if not target.exists():
            if target.is_relative_to(ROOT) and repo_path(target) in EXPECTED_LATER:
                continue
            broken.append(f"{file}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{file}#{anchor}: no such heading in {repo_path(target)}")
    assert not broken, f"{repo_path(document)}: {broken}"


def test_the_link_check_finds_links_and_anchors():
    """The parser sees what a reader clicks: the README links the docs map, an anchor of its own, and the figure."""
    readme = relative_links(ROOT / "README.md")
    assert ("docs/index.md", "") in readme and ("docs/figures/results.png", "") in readme
    assert any(file == "" and anchor for file, anchor in readme)
    heading = "Before a run: `rose-trl plan` and `rose-trl check-pairs`"
    assert slug(heading) == "before-a-run-rose-trl-plan-and-rose-trl-check-pairs"


def test_the_docs_map_lists_every_page():
    index = ROOT / "docs" / "index.md"
    listed = {repo_path(index.parent / file) for file, _ in relative_links(index) if file.endswith(".md")}
    pages = {repo_path(p) for p in DOCUMENTS if p.parent != ROOT and p != index}
    assert pages - listed == set(), "pages missing from docs/index.md"
    assert {p for p in EXPECTED_LATER if p.endswith(".md")} <= listed


def test_every_docs_page_the_repository_names_exists():
    """Help strings, error messages, docstrings, recipes and benchmark READMEs send users to docs/ pages: those
    pages exist (a moved page leaves no stale path behind)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    missing = []
    for name in files:
        if not name.endswith((".py", ".md", ".yaml", ".yml", ".cfg", ".toml")) or name == "CHANGELOG.md":
            continue
        for doc in NAMED_DOC.findall((ROOT / name).read_text(errors="replace")):
            if not (ROOT / doc).exists() and doc not in EXPECTED_LATER:
                missing.append(f"{name}: {doc}")
    assert not missing, missing


@pytest.mark.parametrize("document", USER_FACING, ids=repo_path)
def test_docs_speak_to_users(document):
    text = document.read_text()
    found = [f"{what}: {m.group(0)!r}" for what, rx in FORBIDDEN.items() for m in rx.finditer(text)]
    assert not found, f"{repo_path(document)}: {found}"


def test_the_wording_check_catches_what_it_names():
    sample = "on /work/assets/model (issue 25), as this session's lent machine had no GPU\nPLAN_TINY_EXAMPLE\n"
    assert all(rx.search(sample) for rx in FORBIDDEN.values())
    assert not any(rx.search("outputs/smollm2/model, the issue tracker, a reissued run") for rx in FORBIDDEN.values())
