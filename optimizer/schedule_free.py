"""Schedule-free optimizers (``adamw_schedulefree``): their evaluation weights, exactly undone.

A schedule-free optimizer trains the weights ``y`` and keeps a second sequence ``z``; the weights
to evaluate, sample and save are ``x``, which its ``eval()`` puts into the parameters (and
``train()`` takes back out). ``train()`` after ``eval()`` gives ``y`` back only to float rounding,
so `evaluation_weights` copies ``y`` before and restores it bit for bit after: a run that samples,
validates or saves trains exactly as one that does not. The copy costs one set of the trained
parameters while it lasts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def has_eval_mode(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is schedule-free (has train and eval modes)."""
    return "train_mode" in optimizer.param_groups[0] and callable(getattr(optimizer, "eval", None))


def parameters_of(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@contextlib.contextmanager
def evaluation_weights(optimizers: Iterable[torch.optim.Optimizer]) -> Iterator[None]:
    """Inside, the parameters of schedule-free optimizers hold their evaluation weights ``x``;
    after, exactly the training weights they held before (other optimizers: nothing happens)."""
    switched = [o for o in optimizers if has_eval_mode(o)]
    saved = [[p.detach().clone() for p in parameters_of(o)] for o in switched]
    for optimizer in switched:
        optimizer.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for optimizer, copies in zip(switched, saved, strict=True):
                for parameter, copy in zip(parameters_of(optimizer), copies, strict=True):
                    parameter.copy_(copy)
                for group in optimizer.param_groups:
                    group["train_mode"] = True
