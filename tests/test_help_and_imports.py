"""First contact: ``train.py --help`` loads nothing heavy, groups flags and lists allowed values;
the config package never imports the optimizer (or any other) package."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from config.cli import build_parser
from config.train_config import GROUPS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "optimizer")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )


def test_help_imports_no_heavy_module() -> None:
    code = (
        "import json, sys, contextlib, io\n"
        "import train\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        train.main(['--help'])\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "sys.stdout.write(json.dumps({'loaded': loaded, 'help': out.getvalue()}))\n"
    )
    result = json.loads(run_python(code).stdout)
    assert result["loaded"] == []
    assert "usage: train.py --config train.json" in result["help"]


def test_a_mistyped_flag_is_answered_before_anything_heavy_loads() -> None:
    code = (
        "import sys, train\n"
        "status = train.main(['--max_epoch', '3'])\n"
        f"print(status, [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = run_python(code)
    assert result.stdout.strip() == "2 []"
    assert "did you mean '--max_epochs'" in result.stderr


def test_help_groups_flags_and_lists_allowed_values() -> None:
    text = build_parser().format_help()
    positions = [text.index(f"\n{title}:\n") for title in GROUPS.values()]
    assert positions == sorted(positions)
    titles = (
        "model and precision",
        "training data",
        "optimizer",
        "checkpoints",
        "sample images",
        "run folder and logging",
        "run length and LR schedule",
    )
    for title in titles:
        assert any(t.startswith(title) for t in GROUPS.values()), title
    flat = " ".join(text.split())
    assert "Allowed: linear, cosine, cosine_with_restarts, polynomial, constant," in flat
    assert 'Allowed: mse, huber, mse_huber, huber_mse. Default: "mse_huber"' in flat
    assert "Allowed: >= 1; <= 1024. Default: 2." in flat


@pytest.mark.parametrize("group", ["samples", "checkpoints", "everydream2"])
def test_flags_are_in_their_group(group: str) -> None:
    parser = build_parser()
    (section,) = [g for g in parser._action_groups if g.title == GROUPS[group]]
    flags = {a.dest for a in section._group_actions}
    expected = {
        "samples": "sample_prompts",
        "checkpoints": "save_every_n_epochs",
        "everydream2": "ed1_mode",
    }[group]
    assert expected in flags


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:  # module level only: a function may import lazily
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.py")), ids=lambda p: p.name)
def test_config_imports_no_other_package_of_the_trainer(path: Path) -> None:
    assert not _top_level_imports(path) & {"optimizer", "training", "models", "data"}


def test_importing_the_config_package_loads_no_optimizer() -> None:
    modules = sorted(p.stem for p in (ROOT / "config").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module('config.' + name)\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    assert run_python(code).stdout.strip() == "[]"


# The trainer's packages: every top-level folder with an __init__.py (tests and bench have none).
PACKAGES = sorted(path.parent.name for path in ROOT.glob("*/__init__.py"))


def _module_imports(path: Path) -> set[str]:
    """The modules ``path`` imports at module level, in full (``from a.b import c``: a.b, a.b.c)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _trainer_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def test_no_package_init_imports_a_module_that_imports_the_package_back() -> None:
    """Such a module could not be imported first: importing it runs the package's
    ``__init__``, which imports the module half-way through its own first lines."""
    modules = _trainer_modules()
    imports = {name: _module_imports(path) & modules.keys() for name, path in modules.items()}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for name in imports[todo.pop()] - seen:
                seen.add(name)
                todo.append(name)
        return seen

    circles = [
        f"{package} imports {outside}, which imports {package} back"
        for package, path in modules.items()
        if path.name == "__init__.py"
        for outside in imports[package]
        if not outside.startswith(package + ".")
        and any(name == package or name.startswith(package + ".") for name in reaches(outside))
    ]
    assert circles == []
