"""The documentation holds together: every relative link of README.md and docs/*.md reaches a
file (and, for ``file.md#anchor``, a heading) in the repository, and nothing cites a document
that is not in the repository."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")
# [text](target): the text may hold one level of brackets; the target has no spaces.
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# The name of the outside specification the code once cited, spelled in two parts so that this
# file does not cite it itself.
OUTSIDE_DOCUMENT = re.compile(r"\b" + "SP" + r"EC\b")
SKIPPED_FOLDERS = {"__pycache__", "logs", "runs", "node_modules"}


def _prose(markdown: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", markdown)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercase, punctuation dropped, each
    space a hyphen (word characters, hyphens and underscores stay)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for match in HEADING.finditer(_prose(markdown)):
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def relative_links(markdown: str) -> list[str]:
    """The targets of the links that point into the repository (no scheme such as https:)."""
    text = CODE_SPAN.sub("", _prose(markdown))
    return [t for t in LINK.findall(text) if not SCHEME.match(t)]


def broken_links(document: Path, root: Path = REPO) -> list[str]:
    """Each relative link of ``document`` that reaches no file under ``root``, or no heading of
    its file."""
    problems = []
    for target in relative_links(document.read_text(encoding="utf-8")):
        path_part, _, anchor = target.partition("#")
        path = (document.parent / path_part).resolve() if path_part else document
        if not path.exists() or not path.is_relative_to(root):
            problems.append(f"{target}: no such file in the repository")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text("utf-8")):
            problems.append(f"{target}: {path.name} has no heading with this anchor")
    return problems


def repository_text_files() -> Iterator[Path]:
    """Every .py and .md file of the repository, outside hidden and generated folders."""
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [
            s for s in subfolders if not s.startswith(".") and s not in SKIPPED_FOLDERS
        ]
        for name in files:
            if name.endswith((".py", ".md")):
                yield Path(folder) / name


def test_the_documents_exist():
    names = {p.name for p in DOCUMENTS}
    assert {"README.md", "reference.md", "configuration.md", "decisions.md"} <= names


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_reaches_a_file_and_heading(document):
    assert broken_links(document) == []


def test_github_anchor_rules():
    assert github_anchor("train.json") == "trainjson"
    assert github_anchor("Multiply, batch ids, loss scale") == "multiply-batch-ids-loss-scale"
    assert github_anchor("optimizer.json: `base` and `x_y`") == "optimizerjson-base-and-x_y"
    assert github_anchor("Ctrl-C and SIGTERM") == "ctrl-c-and-sigterm"
    assert anchors("# A\n\n## A\n\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_the_link_checker_finds_broken_links(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Title\n\n## A section\n", encoding="utf-8")
    page = docs / "b.md"
    page.write_text(
        "[ok](a.md#a-section) [ok](#b) [web](https://example.com) `[code](missing.md)`\n"
        "[gone](missing.md) [bad anchor](a.md#nowhere) [self](#nowhere)\n\n# B\n",
        encoding="utf-8",
    )
    problems = broken_links(page, root=tmp_path)
    assert [p.split(":")[0] for p in problems] == ["missing.md", "a.md#nowhere", "#nowhere"]


def test_the_citation_pattern():
    assert OUTSIDE_DOCUMENT.search("Checkpoints (" + "SP" + "EC §9): a folder")
    assert not OUTSIDE_DOCUMENT.search("MAX_ASPECT = 8.0; ASPECT_SIZE_MULTIPLE; spec")


def test_nothing_cites_a_document_outside_the_repository():
    citing = []
    for path in repository_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE_DOCUMENT.search(line):
                citing.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert citing == [], "cite the docs/ file that describes it instead"
