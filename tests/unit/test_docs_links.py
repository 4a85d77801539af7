"""The documentation holds together: every relative link and image of README.md,
CONTRIBUTING.md, CHANGELOG.md and docs/*.md names a file that exists (and, with `#anchor`, a
heading of that file, by GitHub's slugs); the README links every docs page, and some page shows
every picture in docs/; the README stays a front door (200 lines at most) and each docs page
readable (320 at most). Plain file reads: no network, no rendering."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

PROJECT = Path(__file__).resolve().parents[2]
DOCS = PROJECT / "docs"
README = PROJECT / "README.md"
PAGES = sorted([README, PROJECT / "CONTRIBUTING.md", PROJECT / "CHANGELOG.md", *DOCS.glob("*.md")])
README_MAX_LINES = 200
DOCS_PAGE_MAX_LINES = 320

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
# [text](target) and ![alt](target), the target up to a space (a title may follow) or ")".
MD_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as rendered (code, emphasis and links reduced
    to their text), lower case, every character but letters, digits, spaces, `-` and `_`
    dropped, spaces made hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"(\*\*|__|\*)", "", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    found |= set(re.findall(r"<a\s+(?:name|id)=[\"']([^\"']+)[\"']", path.read_text()))
    return found


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, target) of every link and image of the page, outside code."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("", line)
        found = [m for pattern in (MD_LINK, HTML_LINK) for m in pattern.finditer(line)]
        for match in sorted(found, key=lambda m: m.start()):
            yield number, match.group(1)


def broken(page: Path, root: Path = PROJECT) -> list[str]:
    problems = []
    for number, target in links(page):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # a web address: not checked here (no network)
        where = f"{page.relative_to(root)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not resolved.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
            problems.append(f"{where}: no heading with the anchor #{anchor} in {resolved.name}")
    return problems


def test_the_pages_are_found() -> None:
    names = {p.relative_to(PROJECT).as_posix() for p in PAGES}
    assert {"README.md", "CONTRIBUTING.md", "CHANGELOG.md"} <= names
    assert len([n for n in names if n.startswith("docs/")]) >= 5, names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(PROJECT).as_posix())
def test_every_relative_link_and_image_resolves(page: Path) -> None:
    assert broken(page) == []


def test_the_readme_is_a_front_door() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_each_docs_page_stays_readable(page: Path) -> None:
    lines = len(page.read_text(encoding="utf-8").splitlines())
    assert lines <= DOCS_PAGE_MAX_LINES, f"{page.name} has {lines} lines; split it"


def test_the_readme_links_every_docs_page() -> None:
    linked = {
        (README.parent / target.partition("#")[0]).resolve()
        for _, target in links(README)
        if not SCHEME.match(target)
    }
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert unlinked == [], f"README.md does not link {unlinked}"


def test_every_picture_in_docs_is_shown_somewhere() -> None:
    shown = {
        (page.parent / target.partition("#")[0]).resolve()
        for page in PAGES
        for _, target in links(page)
        if not SCHEME.match(target)
    }
    unshown = [p.name for p in sorted(DOCS.glob("*.png")) if p.resolve() not in shown]
    assert unshown == [], f"no page shows {unshown}"


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        (
            "Connect links and the callback (`onboard connect-server`)",
            "connect-links-and-the-callback-onboard-connect-server",
        ),
        ("Exit codes, Ctrl-C", "exit-codes-ctrl-c"),
        ("5. Several workers, one roster", "5-several-workers-one-roster"),
        ("`onboarding/ledger/`", "onboardingledger"),
        ("The ledger's schema, and inputs fuzzed", "the-ledgers-schema-and-inputs-fuzzed"),
        ("Connector profile (YAML)", "connector-profile-yaml"),
    ],
)
def test_slugs_are_githubs(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#a-heading) [gone](missing.md) [bad anchor](there.md#nope)\n"
        '<img src="missing.png"> `[code](not-a-link.md)` [web](https://example.com/x)\n'
        "```\n[fenced](not-a-link-either.md)\n```\n"
    )
    targets = [target for _, target in links(page)]
    assert targets == [
        "there.md#a-heading",
        "missing.md",
        "there.md#nope",
        "missing.png",
        "https://example.com/x",
    ]
    problems = broken(page, tmp_path)
    assert [p.split(": ")[1] for p in problems] == ["missing.md", "there.md#nope", "missing.png"]
