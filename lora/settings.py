"""`LoraSettings`: the adapters a run trains, from the ``lora_*`` keys of train.json."""

from __future__ import annotations

from dataclasses import dataclass

from config.lora import lora_enabled
from config.train_config import TrainConfig


@dataclass(frozen=True)
class LoraSettings:
    """Rank, alpha and dropout of the adapters; ``conv_rank`` 0 is no 3x3 convolution adapter.

    The alphas are resolved: an alpha not given is the rank (scale alpha / rank = 1).
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    conv_rank: int = 0
    conv_alpha: float = 0.0

    def __post_init__(self) -> None:
        assert self.rank > 0, "LoRA settings need a rank above 0"
        assert self.alpha > 0 and 0 <= self.dropout < 1 and self.conv_rank >= 0
        assert self.conv_rank == 0 or self.conv_alpha > 0

    @property
    def locon(self) -> bool:
        """Whether the UNet's 3x3 convolutions get adapters too (LoCon)."""
        return self.conv_rank > 0

    @classmethod
    def of(
        cls,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        conv_rank: int = 0,
        conv_alpha: float | None = None,
    ) -> LoraSettings:
        """Settings with unset alphas resolved to their ranks."""
        return cls(
            rank=rank,
            alpha=float(rank if alpha is None else alpha),
            dropout=float(dropout),
            conv_rank=conv_rank,
            conv_alpha=float(conv_rank if conv_alpha is None else conv_alpha) if conv_rank else 0.0,
        )


def lora_settings(config: TrainConfig) -> LoraSettings | None:
    """The run's adapters, or None for a full fine-tune (``lora_rank`` 0)."""
    if not lora_enabled(config):
        return None
    return LoraSettings.of(
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        conv_rank=config.lora_conv_rank,
        conv_alpha=config.lora_conv_alpha,
    )
