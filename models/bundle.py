"""`ModelBundle`: the components of one Stable Diffusion model, as the trainer uses them."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# The model families, as `ModelBundle.family` names them.
SD1 = "sd1"
SD2 = "sd2"
SDXL = "sdxl"
FAMILIES = (SD1, SD2, SDXL)
# The UNet's extra conditioning of SDXL: pooled text embedding plus the six time ids.
TEXT_TIME = "text_time"


# OpenCLIP's text encoders use GELU, OpenAI's CLIP quick GELU: how SD2.x is told from SD1.x.
OPEN_CLIP_ACT = "gelu"


def uses_open_clip(text_encoder: CLIPTextModel) -> bool:
    """Whether the text encoder is OpenCLIP's (SD2.x, SDXL's second) or OpenAI's CLIP."""
    return str(text_encoder.config.hidden_act) == OPEN_CLIP_ACT


def model_family(hidden_act: str, has_text_encoder_2: bool) -> str:
    """``"sdxl"`` with a second text encoder, else ``"sd2"`` for an OpenCLIP (first) text
    encoder (``hidden_act`` GELU), else ``"sd1"``."""
    if has_text_encoder_2:
        return SDXL
    return SD2 if hidden_act == OPEN_CLIP_ACT else SD1


class TextEncoders(nn.Module):
    """SDXL's two text encoders as one module: what the role "text_encoder" covers for SDXL
    (one optimizer, one EMA, one fp32 copy), its parameters named ``text_encoder.…`` and
    ``text_encoder_2.…``."""

    def __init__(self, text_encoder: nn.Module, text_encoder_2: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2


# The roles a checkpoint and the trainer name: the UNet, the text encoder(s), the VAE.
COMPONENTS = ("unet", "text_encoder", "vae")


@dataclass
class ModelBundle:
    """UNet, CLIP text encoder(s) and tokenizer(s), VAE and the training noise scheduler.

    ``source`` is where it came from: a built-in name, a local folder or a hub id, as given.
    ``text_encoder_2`` and ``tokenizer_2`` are SDXL's second encoder (OpenCLIP ViT-bigG/14 with
    its projection) and its tokenizer; both are None for SD1.x/2.x.
    """

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    source: str
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    def __post_init__(self) -> None:
        assert (self.text_encoder_2 is None) == (self.tokenizer_2 is None), (
            "text_encoder_2 and tokenizer_2 come together"
        )
        text_time = self.unet.config.get("addition_embed_type") == TEXT_TIME
        assert text_time == (self.text_encoder_2 is not None), (
            "an SDXL UNet (addition_embed_type text_time) needs a second text encoder, and only it"
        )

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: ``"epsilon"`` (SD1.x, SD2.x base) or ``"v_prediction"``."""
        return str(self.noise_scheduler.config.prediction_type)

    @property
    def family(self) -> str:
        """``"sdxl"`` with a second text encoder, else ``"sd2"`` (OpenCLIP) or ``"sd1"`` (CLIP)."""
        hidden_act = str(self.text_encoder.config.hidden_act)
        return model_family(hidden_act, self.text_encoder_2 is not None)

    @property
    def text_encoders(self) -> tuple[CLIPTextModel, ...]:
        """The text encoders in order: one for SD1.x/2.x, two for SDXL."""
        if self.text_encoder_2 is None:
            return (self.text_encoder,)
        return (self.text_encoder, self.text_encoder_2)

    def component(self, name: str) -> nn.Module:
        """The module of a role of `COMPONENTS`: the UNet, the VAE, or the text encoder, which
        for SDXL is both encoders as one module (`TextEncoders`): its optimizer, EMA, fp32 copy
        and parameter counts cover both."""
        assert name in COMPONENTS, f"{name} is not one of {COMPONENTS}"
        if name == "text_encoder" and self.text_encoder_2 is not None:
            return TextEncoders(self.text_encoder, self.text_encoder_2)
        return getattr(self, name)

    def named_models(self) -> dict[str, nn.Module]:
        """The UNet and each text encoder by the names checkpoints and LoRA files use
        (``unet``, ``text_encoder``, and SDXL's ``text_encoder_2``)."""
        models: dict[str, nn.Module] = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            models["text_encoder_2"] = self.text_encoder_2
        return models
