"""docs/reference.md's key tables are what the configuration classes say; the README's commands
are CI's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config.docs import REFERENCE, TABLES, marked_table

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


@pytest.mark.parametrize("name", sorted(TABLES))
def test_reference_key_table_is_generated_from_the_code(name):
    text = REFERENCE.read_text(encoding="utf-8")
    table = marked_table(text, name)
    assert table is not None, f"docs/reference.md has no <!-- table:{name} --> markers"
    assert table == TABLES[name](), (
        "docs/reference.md is out of date: run python -m config.docs --write"
    )


def test_key_tables_live_only_in_the_reference():
    marker = re.compile(r"^<!-- table:", re.MULTILINE)
    documents = [README, *sorted((REPO / "docs").glob("*.md"))]
    holding = [p.name for p in documents if p != REFERENCE and marker.search(p.read_text("utf-8"))]
    assert holding == [], "key tables belong in docs/reference.md only"


def test_readme_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    block = text.split("```")[1].strip().splitlines()
    assert len(block) == 2
    assert "train.py --config train.json" in block[0]
    assert "pytest" in block[1]
