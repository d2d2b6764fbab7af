"""The components' contract: a read-only context, commands, and no writes to the trainer."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from config.errors import UserError
from config.live import LIVE_KEYS, LiveSettings
from config.train_config import TrainConfig
from tests.contexts import make_context, optimizer_step
from training.checkpointing.periodic import PeriodicCheckpoints
from training.components.base import Component, Hooks
from training.context import Commands, Counters
from training.live import LiveUpdates

REPO = Path(__file__).resolve().parent.parent
COMPONENT_MODULES = [
    *sorted((REPO / "training" / "components").glob("*.py")),
    REPO / "training" / "checkpointing" / "periodic.py",
]


def test_a_context_is_built_without_a_trainer_and_reads_the_live_settings():
    config = TrainConfig(resume_ckpt="tiny-sd15", grad_accum=3, loss_type="huber")
    ctx = make_context(config=config, counters=Counters(epoch=2, batch_in_epoch=1))
    assert ctx.progress.epoch == 2 and ctx.settings.grad_accum == 3
    assert ctx.config.loss_type == "huber" and ctx.config.project_name == config.project_name
    assert set(ctx.optimizers) == {"unet", "text_encoder"}
    with pytest.raises(TypeError):
        ctx.optimizers["unet"] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        ctx.progress = Counters()  # type: ignore[misc]


def test_commands_queue_checkpoints_once_and_check_setting_changes():
    commands = Commands()
    ctx = make_context(commands=commands)
    ctx.request_checkpoint("periodic", True)
    ctx.request_checkpoint("periodic", True)
    assert commands.take_checkpoints() == [("periodic", True)]
    assert commands.take_checkpoints() == []
    ctx.change_setting("grad_accum", 4, source="test")
    assert commands.settings["grad_accum"].value == 4
    with pytest.raises(UserError, match="grad_accum: must be >= 1"):
        ctx.change_setting("grad_accum", 0, source="test")
    with pytest.raises(UserError, match="'max_epochs' cannot change during a run"):
        ctx.change_setting("max_epochs", 3, source="test")
    with pytest.raises(UserError, match="did you mean 'loss_type'"):
        ctx.change_setting("loss_typ", "mse", source="test")


def test_the_periodic_component_asks_for_checkpoints_instead_of_saving():
    config = TrainConfig(resume_ckpt="tiny-sd15", save_every_n_epochs=1, save_optimizer=True)
    commands = Commands()
    ctx = make_context(config=config, commands=commands)
    component = PeriodicCheckpoints()
    component.on_training_start(ctx)
    component.on_optimizer_step(ctx, optimizer_step(1))
    assert commands.take_checkpoints() == []
    component.on_epoch_end(ctx, 0)
    assert commands.take_checkpoints() == [("periodic", True)]


def test_live_settings_are_every_key_that_may_change_and_take_the_config_rules():
    config = TrainConfig(resume_ckpt="tiny-sd15")
    settings = LiveSettings.of(config)
    assert set(settings.as_dict()) == set(LIVE_KEYS)
    assert settings.step.loss_type == config.loss_type
    restored = LiveSettings.from_saved({"grad_accum": 5, "log_step": "not a number"}, settings)
    assert restored.grad_accum == 5 and restored.log_step == settings.log_step
    with pytest.raises(UserError, match="timestep_start must be below timestep_end"):
        settings.with_changes({"timestep_start": 900, "timestep_end": 100})


def _assignments_to_outside_objects(path: Path) -> list[str]:
    """``x.attr = ...`` (or ``+=``) where x is not ``self``: a component writing elsewhere."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            root = target
            while isinstance(root, (ast.Attribute, ast.Subscript)):
                root = root.value
            if isinstance(target, ast.Attribute) and not (
                isinstance(root, ast.Name) and root.id == "self"
            ):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(target)}")
    return found


@pytest.mark.parametrize("path", COMPONENT_MODULES, ids=lambda p: p.name)
def test_no_component_writes_to_the_trainer_or_the_context(path: Path):
    source = path.read_text(encoding="utf-8")
    assert "training.loop" not in source and "Trainer" not in source, path.name
    assert _assignments_to_outside_objects(path) == []


# A lower module never imports a higher one: (package or module, what it must not import).
# (config/ is checked in test_help_and_imports.py.)
LAYERS = [
    ("data", ("training", "optimizer", "plugins")),
    ("models", ("training", "data", "optimizer")),
    ("storage", ("training", "data", "models", "optimizer")),
    ("optimizer", ("training", "data")),
    ("training/checkpointing", ("training.loop", "training.session", "training.build")),
    ("training/components", ("training.loop", "training.session", "training.build")),
    ("training/context.py", ("training.loop", "training.components", "training.checkpointing")),
    ("training/live.py", ("training.loop", "training.components")),
]


def _imports(path: Path) -> set[str]:
    """Module-level imports (a function may import a higher module lazily: config/docs.py)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


@pytest.mark.parametrize("where,forbidden", LAYERS, ids=[w for w, _ in LAYERS])
def test_lower_modules_never_import_higher_ones(where: str, forbidden: tuple[str, ...]):
    target = REPO / where
    files = [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))
    bad = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in files
        for name in sorted(_imports(path))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert bad == []


class _Epochs:
    def batches_in_epoch(self, epoch: int) -> int:
        return 5


def test_a_grad_accum_change_changes_the_steps_left_not_the_schedule(caplog):
    caplog.set_level(logging.INFO, "training.live")
    config = TrainConfig(resume_ckpt="tiny-sd15", grad_accum=1, max_epochs=4)
    run = _run_like(config)
    live = LiveUpdates(run, make_context().env)  # type: ignore[arg-type]
    state = live.start()
    assert state.total_optimizer_steps == 20
    state.counters = Counters(epoch=2, global_step=10)
    commands = Commands()
    commands.change_setting("grad_accum", 2, source="test")
    live.apply(state, commands.take_settings())
    assert state.settings.grad_accum == 2
    assert state.total_optimizer_steps == 10 + 3 + 3
    assert "the LR schedule and the EMA keep the length they were sized for (20 steps" in (
        caplog.text
    )


def _run_like(config: TrainConfig):
    from types import SimpleNamespace

    from training.length import RunLength

    data = _Epochs()
    return SimpleNamespace(
        train=SimpleNamespace(config=config),
        dataset=data,
        length=RunLength.plan(data, config.max_epochs, config.grad_accum),
    )


def test_hooks_call_every_component_that_overrides_a_hook_in_order():
    calls: list[tuple[str, str]] = []

    class Steps(Component):
        def on_step_start(self, ctx, batch):
            calls.append(("start", type(self).__name__))

        def on_optimizer_step(self, ctx, step):
            calls.append(("step", type(self).__name__))

    class Inherits(Steps):  # its overrides come from its base class
        pass

    class Ends(Component):
        def on_step_end(self, ctx, batch, loss):
            calls.append(("end", type(self).__name__))

    hooks = Hooks([Ends(), Steps(), Component(), Inherits()])
    ctx = make_context()
    hooks.step_start(ctx, None)  # type: ignore[arg-type]
    hooks.optimizer_step(ctx, optimizer_step(1))
    hooks.step_end(ctx, None, 1.0)  # type: ignore[arg-type]
    hooks.epoch_end(ctx, 0)
    assert calls == [
        ("start", "Steps"),
        ("start", "Inherits"),
        ("step", "Steps"),
        ("step", "Inherits"),
        ("end", "Ends"),
    ]
