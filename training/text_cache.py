"""The text-embedding cache: a frozen text encoder's output for each caption, computed once.

When the text encoder does not train (``disable_textenc_training``, or every layer frozen), its
output for a caption never changes, so `CachedPromptEncoder` keeps it, keyed by the caption's
token ids, and the step reuses it every epoch (the empty caption of ``cond_dropout`` included).
Each caption is encoded alone (a batch of one), so an embedding does not depend on the batch it
first appeared in: a resumed run, whose cache starts empty, trains exactly as the straight one.
Against a run without the cache, embeddings differ by float rounding at most (a batch of one
against a batch of several). Embeddings are kept on the CPU in the encoder's output dtype, up to
`MAX_CACHED_BYTES`; past that, new captions are encoded without being kept. The cache is off
with ``shuffle_tags`` (the captions change every step, so nothing would be reused).

With ``text_encoder_offload`` the encoder waits in CPU memory while the run trains: a caption the
cache has not seen is encoded there, and samples and validation bring the encoder to the
training device for their pass (`text_encoder_on`) and send it back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from training.conditioning import Conditioning

logger = logging.getLogger(__name__)

# 2 GiB: about 9,000 SD1.x captions (77 x 768 fp32), 7,000 SD2.x or 3,400 SDXL ones.
MAX_CACHED_BYTES = 2 * 2**30


class CachedPromptEncoder(torch.nn.Module):
    """A frozen prompt encoder whose outputs are kept by token ids (see the module)."""

    def __init__(self, encoder: torch.nn.Module, max_bytes: int = MAX_CACHED_BYTES) -> None:
        super().__init__()
        self.encoder = encoder
        self.max_bytes = max_bytes
        self._cache: dict[bytes, Conditioning] = {}
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def forward(self, input_ids: torch.Tensor) -> Conditioning:
        rows = [self._row(ids) for ids in input_ids]
        embeds = torch.stack([row.embeds for row in rows]).to(input_ids.device)
        if rows[0].pooled is None:
            return Conditioning(embeds)
        return Conditioning(embeds, torch.stack([row.pooled for row in rows]).to(embeds.device))

    def _row(self, ids: torch.Tensor) -> Conditioning:
        key = ids.to("cpu").numpy().tobytes()
        found = self._cache.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        where = next(self.encoder.parameters()).device  # the CPU with text_encoder_offload
        with torch.no_grad():
            out = self.encoder(ids[None].to(where))
        row = Conditioning(*(None if t is None else t[0].detach().to("cpu") for t in out))
        size = sum(t.nbytes for t in row if t is not None)
        if self._bytes + size <= self.max_bytes:
            self._cache[key] = row
            self._bytes += size
        return row


def offload_text_encoders(encoders: Sequence[torch.nn.Module]) -> None:
    """``text_encoder_offload``: keep the frozen encoder(s) in CPU memory while training."""
    for text_encoder in encoders:
        _offload(text_encoder)


def _offload(text_encoder: torch.nn.Module) -> None:
    size = sum(p.numel() * p.element_size() for p in text_encoder.parameters())
    device = next(text_encoder.parameters()).device
    text_encoder.to("cpu")
    logger.info(
        "text_encoder_offload: the text encoder (%.2f GiB) waits in CPU memory instead of %s; "
        "samples and validation bring it back for their passes",
        size / 2**30,
        device,
    )


@contextlib.contextmanager
def text_encoders_on(encoders: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """The text encoder(s) on ``device`` for a pass, then back where they were."""
    with contextlib.ExitStack() as stack:
        for text_encoder in encoders:
            stack.enter_context(text_encoder_on(text_encoder, device))
        yield


@contextlib.contextmanager
def text_encoder_on(text_encoder: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """The text encoder on ``device`` for a pass, then back where it was (the CPU when it is
    offloaded; nothing moves otherwise)."""
    home = next(text_encoder.parameters()).device
    if home.type == device.type and (home.type == "cpu" or home.index == device.index):
        yield  # (an FSDP shard on the CPU says cpu:0, the training device cpu)
        return
    text_encoder.to(device)
    try:
        yield
    finally:
        text_encoder.to(home)
