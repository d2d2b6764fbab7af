"""The text encoder's weights under the standard ``text_model.`` keys, whatever transformers does.

transformers 4.x keeps ``embeddings``, ``encoder`` and ``final_layer_norm`` of ``CLIPTextModel``
under ``text_model``; transformers 5.x's ``CLIPTextModel`` holds them itself, and a model built
there (not loaded from a file) saves keys without the prefix. Every real Stable Diffusion folder
and single file uses the prefixed keys, and both transformers versions load them, so checkpoints
are written with them. ``CLIPTextModelWithProjection`` (SDXL's second encoder) keeps the
``text_model`` wrapper in both versions: its keys (``text_model.*`` and ``text_projection.*``) are
standard as they are.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from transformers import CLIPTextModel

TEXT_MODEL = "text_model."
WEIGHTS_FILE = "model.safetensors"


def standard_text_encoder_state_dict(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The text encoder's state dict with the transformer's keys under ``text_model.``."""
    state = text_encoder.state_dict()
    if hasattr(text_encoder, TEXT_MODEL.rstrip(".")):  # already wrapped: the keys are standard
        return state
    return {TEXT_MODEL + key: tensor for key, tensor in state.items()}


def standardize_text_encoder_file(text_encoder: CLIPTextModel, folder: Path) -> bool:
    """Rewrite ``folder/model.safetensors`` (what ``save_pretrained`` wrote) with standard keys.

    ``text_encoder`` must be the model that was saved (same dtype). Returns whether the file
    was rewritten (it is left alone when its keys are standard already).
    """
    file = Path(folder) / WEIGHTS_FILE
    assert file.is_file(), f"{file}: expected one weights file (no shards)"
    standard = standard_text_encoder_state_dict(text_encoder)
    with safe_open(str(file), framework="pt") as handle:
        if set(handle.keys()) == set(standard):
            return False
    weights = {key: tensor.detach().to("cpu").contiguous() for key, tensor in standard.items()}
    safetensors.torch.save_file(weights, str(file), metadata={"format": "pt"})
    return True
