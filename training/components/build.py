"""The components a run is made of, in the order the trainer calls them.

A new behaviour is one new module with a `Component` and one line in `build_components`.
"""

from __future__ import annotations

from collections.abc import Sequence

from optimizer.schedule_free import has_eval_mode
from training.checkpointing.periodic import PeriodicCheckpoints
from training.components.base import Component
from training.components.ema import EMA
from training.components.plan_writer import PlanWriter
from training.components.plugins import PluginHooks
from training.components.progress import ProgressBar
from training.components.reload import SettingsReloader
from training.components.samples import Samples
from training.components.scalars import TrainingScalars
from training.components.schedule_free import TrainingWeights
from training.components.validation import Validation
from training.run import Run


def build_components(run: Run, extra: Sequence[Component] = ()) -> list[Component]:
    """The run's components (building them has no side effects); ``extra`` come last."""
    c = run.train.config
    reload = c.load_settings_every_epoch and run.train.path is not None
    ema = EMA(run.ema, run.lora) if run.ema is not None else None
    schedule_free = any(has_eval_mode(t.optimizer) for t in run.trainings)
    components: list[Component | None] = [
        TrainingWeights() if schedule_free else None,  # first: the weights others start from
        SettingsReloader(run.train) if reload else None,
        ema,  # before samples and checkpoints: they see the EMA of the same step
        Validation(run.validation) if run.validation is not None else None,
        Samples(run.samples, ema) if run.samples is not None else None,
        PluginHooks(run.plugins, ema) if run.plugins else None,
        PlanWriter() if c.write_schedule else None,
        PeriodicCheckpoints(),
        TrainingScalars(),
        ProgressBar(),
        *extra,
    ]
    return [component for component in components if component is not None]
