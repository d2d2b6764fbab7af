"""The CLIP text encoder's parts, prompt encoding with EveryDream2's ``clip_skip``, tokenizing.

transformers 5.x ``CLIPTextModel`` holds ``embeddings``, ``encoder.layers`` and
``final_layer_norm`` itself; transformers 4.x keeps them under ``text_model``. Both are handled.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from config.errors import UserError


def text_encoder_parts(text_encoder: CLIPTextModel) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """``(embeddings, encoder layers, final_layer_norm)`` of a CLIP text encoder (4.x or 5.x)."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.embeddings, inner.encoder.layers, inner.final_layer_norm


def text_encoder_num_layers(text_encoder: CLIPTextModel) -> int:
    """How many transformer layers the text encoder has (12 for SD1.x, 23 for SD2.x)."""
    return len(text_encoder_parts(text_encoder)[1])


def encode_prompts(
    text_encoder: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int
) -> torch.Tensor:
    """The text embeddings the UNet is conditioned on, with EveryDream2's ``clip_skip``.

    ``clip_skip`` 0 or 1: the last layer's output after the final layer norm
    (``last_hidden_state``); ``n >= 2``: the output of the n-th layer from the end (2: the
    penultimate) through the final layer norm. Computed from ``output_hidden_states``
    (diffusers' own ``clip_skip`` does not work with transformers 5).
    """
    num_layers = text_encoder_num_layers(text_encoder)
    if not 0 <= clip_skip <= num_layers:
        raise UserError(
            f"clip_skip: {clip_skip} is out of range; allowed 0 to {num_layers} for this "
            f"{num_layers}-layer text encoder (0 or 1: last layer, 2: penultimate layer)"
        )
    input_ids = input_ids.to(text_encoder.device)
    if clip_skip <= 1:
        return text_encoder(input_ids).last_hidden_state
    outputs = text_encoder(input_ids, output_hidden_states=True)
    final_layer_norm = text_encoder_parts(text_encoder)[2]
    return final_layer_norm(outputs.hidden_states[-clip_skip])


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids of ``captions``, padded and truncated to ``tokenizer.model_max_length`` (77)."""
    encoded = tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    )
    return encoded.input_ids
