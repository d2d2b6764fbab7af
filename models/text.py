"""The CLIP text encoder's parts, prompt encoding with EveryDream2's ``clip_skip``, tokenizing.

transformers 5.x ``CLIPTextModel`` holds ``embeddings``, ``encoder.layers`` and
``final_layer_norm`` itself; transformers 4.x keeps them under ``text_model``, and so does
``CLIPTextModelWithProjection`` (SDXL's second encoder) in both. All are handled.

SDXL (`encode_prompts_sdxl`) conditions on both encoders as it was trained: each encoder's
penultimate hidden states without the final layer norm, side by side (768 + 1280 channels), and
the second encoder's projected pooled output (``text_embeds``) as the text embedding.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from config.errors import UserError


def text_encoder_parts(text_encoder: CLIPTextModel) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """``(embeddings, encoder layers, final_layer_norm)`` of a CLIP text encoder (4.x or 5.x).

    Works for ``CLIPTextModelWithProjection`` too: its ``text_projection`` (after the final
    layer norm, used only for SDXL's pooled embedding) is not among the parts.
    """
    # (not getattr with a default: a module raises and catches AttributeError for it, which
    # costs a step several microseconds each time)
    inner = text_encoder._modules.get("text_model", text_encoder)
    return inner.embeddings, inner.encoder.layers, inner.final_layer_norm


def text_encoder_device(text_encoder: CLIPTextModel) -> torch.device:
    """Where the encoder's weights are (its token embedding's): what its input ids must be on.
    (transformers' ``device`` walks the modules for the first parameter each time.)"""
    return text_encoder_parts(text_encoder)[0].token_embedding.weight.device


def text_encoder_num_layers(text_encoder: CLIPTextModel) -> int:
    """How many transformer layers the text encoder has (12 for SD1.x, 23 for SD2.x, 32 for
    SDXL's second encoder)."""
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
    embeddings, layers, final_layer_norm = text_encoder_parts(text_encoder)
    num_layers = len(layers)
    if not 0 <= clip_skip <= num_layers:
        raise UserError(
            f"clip_skip: {clip_skip} is out of range; allowed 0 to {num_layers} for this "
            f"{num_layers}-layer text encoder (0 or 1: last layer, 2: penultimate layer)"
        )
    input_ids = input_ids.to(embeddings.token_embedding.weight.device)
    if clip_skip <= 1:
        return text_encoder(input_ids).last_hidden_state
    outputs = text_encoder(input_ids, output_hidden_states=True)
    return final_layer_norm(outputs.hidden_states[-clip_skip])


# SDXL's clip_skip values that all mean its own choice, the penultimate layer.
SDXL_DEFAULT_CLIP_SKIP = 2


def sdxl_hidden_state_index(clip_skip: int, num_layers: int) -> int:
    """Which of ``hidden_states`` SDXL takes for ``clip_skip``: 0, 1, 2 → -2, n > 2 → -n.

    ``clip_skip`` counts layers from the end as EveryDream2 does (2 is the penultimate layer),
    but SDXL never uses the last layer: 0 and 1 mean the penultimate too. Allowed: 0 to the
    smaller encoder's layer count (`UserError` otherwise).
    """
    if not 0 <= clip_skip <= num_layers:
        raise UserError(
            f"clip_skip: {clip_skip} is out of range; allowed 0 to {num_layers} for SDXL, whose "
            f"first text encoder has {num_layers} layers (0, 1 and 2: the penultimate layer, "
            f"SDXL's own; n > 2: n - 2 layers further back, in both encoders)"
        )
    return -max(clip_skip, SDXL_DEFAULT_CLIP_SKIP)


def sdxl_unused_final_layers(clip_skip: int) -> tuple[int, int]:
    """How many final layers of each SDXL encoder get no gradient: ``(first, second)``.

    The first encoder's layers after the one `sdxl_hidden_state_index` picks are never run for
    anything SDXL uses, nor is its final layer norm (freeze both, or DDP finds unused
    parameters). The second encoder's last layer makes the pooled embedding: all are used.
    """
    return max(clip_skip, SDXL_DEFAULT_CLIP_SKIP) - 1, 0


def encode_prompts_sdxl(
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    input_ids: torch.Tensor,
    input_ids_2: torch.Tensor,
    clip_skip: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: ``(prompt_embeds [B, 77, w1 + w2], pooled [B, projection])``.

    ``input_ids`` / ``input_ids_2`` come from the first / second tokenizer. The hidden states of
    the layer `sdxl_hidden_state_index` picks (no final layer norm) of both encoders are
    concatenated, first encoder first; ``pooled`` is the second encoder's ``text_embeds`` (its
    last layer, final layer norm and projection, at the end-of-text token), whatever
    ``clip_skip`` is. The same as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` with
    its ``clip_skip`` = ours - 2 (None for 0, 1, 2).
    """
    num_layers = min(text_encoder_num_layers(text_encoder), text_encoder_num_layers(text_encoder_2))
    index = sdxl_hidden_state_index(clip_skip, num_layers)
    first = text_encoder(input_ids.to(text_encoder_device(text_encoder)), output_hidden_states=True)
    second = text_encoder_2(
        input_ids_2.to(text_encoder_device(text_encoder_2)), output_hidden_states=True
    )
    prompt_embeds = torch.cat([first.hidden_states[index], second.hidden_states[index]], dim=-1)
    return prompt_embeds, second.text_embeds


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
