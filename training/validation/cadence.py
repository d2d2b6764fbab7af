"""When validation runs: a pure function of (epoch, optimizer steps in the epoch), so a resumed
run validates exactly where the straight run would have."""

from __future__ import annotations


def validates_after_epoch(every_n_epochs: float, epoch: int) -> bool:
    """A whole ``every_n_epochs`` n: after every n-th epoch (``epoch`` is 0-based)."""
    return every_n_epochs >= 1 and (epoch + 1) % round(every_n_epochs) == 0


def validation_step_indices(every_n_epochs: float, steps_in_epoch: int) -> list[int]:
    """A fraction below 1: the 0-based optimizer steps of an epoch after which to validate.

    EveryDream2's rule: ``round(1 / every_n_epochs)`` passes (at most one per step), spread
    evenly so that the last is the epoch's last step: with 100 steps and 0.5, after steps 49
    and 99. Computed in whole numbers (EveryDream2's float product could land one past the
    end).
    """
    assert 0 < every_n_epochs < 1 and steps_in_epoch >= 1
    divisions = max(1, min(steps_in_epoch, round(1 / every_n_epochs)))
    return [-(-(i + 1) * steps_in_epoch // divisions) - 1 for i in range(divisions)]
