"""``fused_backward_pass``: each parameter is stepped as soon as its gradient is complete.

`FusedBackward` gives every trainable parameter its own optimizer of the configured kind and
registers a post-accumulate-grad hook that steps it and frees its gradient, so the full set of
gradients never exists at once (kohya does this for SDXL with Adafactor). It is an optimizer
itself, with one parameter group whose ``lr`` the LR scheduler sets as usual; ``step`` does
nothing (the parameters were stepped during backward), and its state dict holds every inner
optimizer's, so checkpoints and exact resume work as for any optimizer.

The hooks step only while `FusedBackward.armed` (the trainer arms them for the backward of an
accumulation window's last batch), so gradient accumulation works: earlier batches only add to
the gradients. What it cannot do (docs/configuration.md): clip gradients (they never exist
together), the fp16 grad scaler (its inf check needs every gradient), several processes (DDP
all-reduces after the hooks would have stepped), and optimizers whose step reads all parameters
at once (D-Adaptation, Prodigy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from optimizer.registry import keeping_implementation

# Optimizers whose step treats each parameter on its own: per-parameter instances do the same.
FUSABLE = ("adamw", "adamw8bit", "lion", "lion8bit", "adafactor", "came")


class FusedBackward(torch.optim.Optimizer):
    """Per-parameter optimizers stepped in backward (see the module's docstring)."""

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
        lr: float,
    ) -> None:
        params = list(parameters)
        super().__init__(params, {"lr": lr})
        self.inner = [make([p]) for p in params]
        self._armed = False
        self._handles = [
            p.register_post_accumulate_grad_hook(self._stepper(optimizer))
            for p, optimizer in zip(params, self.inner, strict=True)
        ]

    def _stepper(self, optimizer: torch.optim.Optimizer) -> Callable[[torch.nn.Parameter], None]:
        def step(parameter: torch.nn.Parameter) -> None:
            if not self._armed:
                return
            for group in optimizer.param_groups:
                group["lr"] = self.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Inside, a parameter is stepped as soon as its gradient is complete."""
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """Nothing: the parameters were stepped during backward."""
        return None

    def state_dict(self) -> dict[str, Any]:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"groups": groups, "inner": [o.state_dict() for o in self.inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict["inner"]
        if len(inner) != len(self.inner):
            raise ValueError(f"{len(inner)} saved parameter optimizers, {len(self.inner)} here")
        for optimizer, saved in zip(self.inner, inner, strict=True):
            with keeping_implementation(optimizer):
                optimizer.load_state_dict(saved)
        for group, saved in zip(self.param_groups, state_dict["groups"], strict=True):
            group.update(saved)
