"""The README's key tables are what the configuration classes say, and its commands are CI's."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.docs import README, TABLES, readme_table

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(TABLES))
def test_readme_key_table_is_generated_from_the_code(name):
    text = README.read_text(encoding="utf-8")
    assert readme_table(text, name) == TABLES[name](), (
        "README.md is out of date: run python -m config.docs --write"
    )


def test_readme_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    block = text.split("```")[1].strip().splitlines()
    assert len(block) == 2
    assert "train.py --config train.json" in block[0]
    assert "pytest" in block[1]
