"""SDXL's built-in models, prompt encoding with two encoders, clip_skip and the time ids."""

from __future__ import annotations

import accelerate
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from config.errors import UserError
from models import (
    ModelBundle,
    add_time_ids,
    added_cond_kwargs,
    encode_prompts_sdxl,
    load_models,
    text_encoder_num_layers,
    text_encoder_parts,
    tokenize,
)
from models.builtin import (
    BUILTIN_CONFIGS,
    builtin_text_encoder_2_layers,
    builtin_text_encoder_layers,
    builtin_tokenizer_2,
)
from models.bundle import SD1, SD2, SDXL
from models.pipeline_folder import pipeline_of
from models.text import sdxl_hidden_state_index, sdxl_unused_final_layers

CAPTIONS = ["a photo of ted, smiling", "a dog on the beach"]


@pytest.fixture(scope="module")
def tiny() -> ModelBundle:
    return load_models("tiny-sdxl")


def pipeline(bundle: ModelBundle) -> StableDiffusionXLPipeline:
    assert bundle.text_encoder_2 is not None
    made = pipeline_of(bundle, bundle.noise_scheduler)
    assert isinstance(made, StableDiffusionXLPipeline)
    return made


def encode(bundle: ModelBundle, captions: list[str], clip_skip: int):
    assert bundle.text_encoder_2 is not None and bundle.tokenizer_2 is not None
    return encode_prompts_sdxl(
        bundle.text_encoder,
        bundle.text_encoder_2,
        tokenize(bundle.tokenizer, captions),
        tokenize(bundle.tokenizer_2, captions),
        clip_skip,
    )


# --- built-in models -------------------------------------------------------------------------


def test_tiny_sdxl_shape(tiny: ModelBundle) -> None:
    assert tiny.family == SDXL and tiny.source == "tiny-sdxl"
    assert isinstance(tiny.text_encoder, CLIPTextModel)
    assert isinstance(tiny.text_encoder_2, CLIPTextModelWithProjection)
    assert tiny.text_encoders == (tiny.text_encoder, tiny.text_encoder_2)
    assert text_encoder_num_layers(tiny.text_encoder) == builtin_text_encoder_layers("tiny-sdxl")
    assert text_encoder_num_layers(tiny.text_encoder_2) == 32
    assert builtin_text_encoder_2_layers("tiny-sdxl") == 32
    unet = tiny.unet.config
    widths = tiny.text_encoder.config.hidden_size, tiny.text_encoder_2.config.hidden_size
    assert widths == (32, 64) and unet.cross_attention_dim == 96
    assert unet.addition_embed_type == "text_time"
    projection = tiny.text_encoder_2.config.projection_dim
    assert projection == 40  # unlike both widths: a transposed projection cannot pass
    assert unet.projection_class_embeddings_input_dim == projection + 6 * 8
    assert tuple(unet.transformer_layers_per_block) == (1, 2)
    assert tiny.vae.config.scaling_factor == 0.13025
    assert tiny.prediction_type == "epsilon"
    assert isinstance(tiny.noise_scheduler, DDPMScheduler)


def test_sd_bundles_have_no_second_encoder() -> None:
    for name, family in (("tiny-sd15", SD1), ("tiny-sd21", SD2)):
        bundle = load_models(name)
        assert bundle.family == family
        assert bundle.text_encoder_2 is None and bundle.tokenizer_2 is None
        assert bundle.text_encoders == (bundle.text_encoder,)
        assert builtin_text_encoder_2_layers(name) is None
        assert builtin_tokenizer_2(name) is None


def test_bundle_refuses_an_sdxl_unet_without_a_second_encoder(tiny: ModelBundle) -> None:
    with pytest.raises(AssertionError, match="needs a second text encoder"):
        ModelBundle(
            unet=tiny.unet,
            text_encoder=tiny.text_encoder,
            tokenizer=tiny.tokenizer,
            vae=tiny.vae,
            noise_scheduler=tiny.noise_scheduler,
            source="x",
        )


def test_tiny_sdxl_is_deterministic_and_keeps_the_callers_rng(tiny: ModelBundle) -> None:
    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    again = load_models("tiny-sdxl")
    assert torch.equal(torch.rand(3), expected_next)
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(tiny, part).state_dict(), getattr(again, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_tokenizers_pad_like_sdxls(tiny: ModelBundle) -> None:
    first = tokenize(tiny.tokenizer, ["a photo"])[0].tolist()
    second = tokenize(tiny.tokenizer_2, ["a photo"])[0].tolist()
    assert first[:4] == second[:4]  # same vocabulary: <bos> a photo <eos>
    eos = tiny.tokenizer.eos_token_id
    assert set(first[4:]) == {eos}  # CLIP ViT-L pads with <eos>
    assert set(second[4:]) == {0} and tiny.tokenizer_2.pad_token == "!"  # OpenCLIP with "!"
    assert tiny.text_encoder_2.config.pad_token_id == 0
    real = builtin_tokenizer_2("sdxl-random")
    assert real is not None and len(real) == 49408
    assert tokenize(real, ["a photo of a cat"])[0].tolist()[7:] == [0] * 70


# Parameter counts of the SDXL 1.0 base components (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_COUNTS = {
    "unet": 2_567_463_684,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "vae": 83_653_863,
}


def test_sdxl_random_has_the_real_architecture() -> None:
    config = BUILTIN_CONFIGS["sdxl-random"]
    with accelerate.init_empty_weights():  # meta device: no memory
        models = {
            "unet": UNet2DConditionModel.from_config(config["unet"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig(**config["text_encoder_2"])
            ),
            "vae": AutoencoderKL.from_config(config["vae"]),
        }
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert counts == SDXL_COUNTS
    assert text_encoder_num_layers(models["text_encoder_2"]) == 32
    unet = models["unet"].config
    assert unet.cross_attention_dim == 2048 and unet.sample_size == 128
    assert unet.projection_class_embeddings_input_dim == 2816
    assert tuple(unet.transformer_layers_per_block) == (1, 2, 10)
    assert models["vae"].config.scaling_factor == 0.13025
    scheduler = DDPMScheduler.from_config(config["scheduler"]).config
    assert (scheduler.beta_start, scheduler.beta_end) == (0.00085, 0.012)
    assert scheduler.beta_schedule == "scaled_linear" and scheduler.prediction_type == "epsilon"
    assert scheduler.num_train_timesteps == 1000 and scheduler.steps_offset == 1
    assert scheduler.timestep_spacing == "leading"


# --- prompt encoding -------------------------------------------------------------------------


@pytest.mark.parametrize(("clip_skip", "diffusers_clip_skip"), [(0, None), (2, None), (3, 1)])
def test_encoding_equals_diffusers_encode_prompt(
    tiny: ModelBundle, clip_skip: int, diffusers_clip_skip: int | None
) -> None:
    with torch.no_grad():
        embeds, pooled = encode(tiny, CAPTIONS, clip_skip)
        expected, _, expected_pooled, _ = pipeline(tiny).encode_prompt(
            CAPTIONS, device="cpu", do_classifier_free_guidance=False, clip_skip=diffusers_clip_skip
        )
    assert embeds.shape == (2, 77, 32 + 64) and pooled.shape == (2, 40)
    assert torch.equal(embeds, expected)
    assert torch.equal(pooled, expected_pooled)


def test_encoding_is_penultimate_hidden_states_and_projected_pooled(tiny: ModelBundle) -> None:
    ids = tokenize(tiny.tokenizer, CAPTIONS)
    ids_2 = tokenize(tiny.tokenizer_2, CAPTIONS)
    with torch.no_grad():
        embeds, pooled = encode(tiny, CAPTIONS, 1)
        first = tiny.text_encoder(ids, output_hidden_states=True)
        second = tiny.text_encoder_2(ids_2, output_hidden_states=True)
        # No final layer norm on the hidden states; the pooled output has it, and the projection.
        _, _, final_norm_2 = text_encoder_parts(tiny.text_encoder_2)
        eos = (ids_2 == tiny.tokenizer_2.eos_token_id).int().argmax(dim=-1)
        last = second.hidden_states[-1][torch.arange(2), eos]
        projected = tiny.text_encoder_2.text_projection(final_norm_2(last))
    assert torch.equal(embeds[..., :32], first.hidden_states[-2])
    assert torch.equal(embeds[..., 32:], second.hidden_states[-2])
    assert torch.allclose(pooled, projected, atol=1e-6)
    deeper, pooled_deeper = encode(tiny, CAPTIONS, 5)
    assert torch.equal(deeper[..., 32:], second.hidden_states[-5])
    assert torch.equal(pooled_deeper, pooled)  # clip_skip never changes the pooled embedding


def test_clip_skip_meaning_and_range() -> None:
    assert [sdxl_hidden_state_index(n, 12) for n in (0, 1, 2, 3, 12)] == [-2, -2, -2, -3, -12]
    with pytest.raises(UserError, match=r"clip_skip: 13 .* 0 to 12 for SDXL"):
        sdxl_hidden_state_index(13, 12)
    with pytest.raises(UserError, match="clip_skip: -1"):
        sdxl_hidden_state_index(-1, 12)
    assert [sdxl_unused_final_layers(n) for n in (0, 1, 2, 4)] == [(1, 0), (1, 0), (1, 0), (3, 0)]


def test_empty_caption_encodes_for_both_encoders(tiny: ModelBundle) -> None:
    """cond_dropout's empty caption: real embeddings of "" from both encoders, never zeros."""
    with torch.no_grad():
        embeds, pooled = encode(tiny, ["", CAPTIONS[0]], 0)
    assert embeds[0].abs().sum() > 0 and pooled[0].abs().sum() > 0
    assert not torch.equal(embeds[0], embeds[1])


# --- time ids --------------------------------------------------------------------------------


def test_time_ids_are_ordered_as_diffusers_orders_them(tiny: ModelBundle) -> None:
    ids = add_time_ids([(1080, 720), (512, 512)], [(12, 0), (0, 30)], [(768, 512), (64, 64)])
    assert ids.shape == (2, 6) and ids.dtype == torch.float32
    assert ids.tolist() == [[1080, 720, 12, 0, 768, 512], [512, 512, 0, 30, 64, 64]]
    expected = pipeline(tiny)._get_add_time_ids(
        (1080, 720), (12, 0), (768, 512), torch.float32, text_encoder_projection_dim=40
    )
    assert torch.equal(ids[:1], expected)
    with pytest.raises(ValueError, match="2 original sizes, 1 crops and 2 target sizes"):
        add_time_ids([(1, 1), (2, 2)], [(0, 0)], [(1, 1), (2, 2)])
    with pytest.raises(ValueError, match="pair of numbers"):
        add_time_ids([(1, 1, 1)], [(0, 0)], [(1, 1)])  # type: ignore[list-item]


def test_time_ids_change_the_prediction(tiny: ModelBundle) -> None:
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds, pooled = encode(tiny, CAPTIONS[:1], 0)

        def predict(original: tuple[int, int]) -> torch.Tensor:
            time_ids = add_time_ids([original], [(0, 0)], [(64, 64)])
            conditions = added_cond_kwargs(pooled, time_ids)
            return tiny.unet(latents, torch.tensor([500]), embeds, added_cond_kwargs=conditions)

        assert not torch.equal(predict((64, 64)).sample, predict((1024, 1024)).sample)


# --- training --------------------------------------------------------------------------------


def test_a_training_step_reaches_every_used_weight() -> None:
    """All of the UNet and the second encoder get gradients; of the first encoder, everything
    but its last layer and final layer norm, which SDXL never uses (they must be frozen)."""
    bundle = load_models("tiny-sdxl")
    for model in (bundle.unet, bundle.text_encoder, bundle.text_encoder_2):
        model.train()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 900])
    noisy = bundle.noise_scheduler.add_noise(latents, noise, timesteps)
    embeds, pooled = encode(bundle, CAPTIONS, 0)
    time_ids = add_time_ids([(64, 64)] * 2, [(0, 0)] * 2, [(64, 64)] * 2)
    conditions = added_cond_kwargs(pooled, time_ids)
    prediction = bundle.unet(noisy, timesteps, embeds, added_cond_kwargs=conditions).sample
    torch.nn.functional.mse_loss(prediction, noise).backward()
    unused_layers, unused_layers_2 = sdxl_unused_final_layers(0)
    unused = (f"encoder.layers.{12 - unused_layers}.", "final_layer_norm.")
    for name, model in (("unet", bundle.unet), ("text_encoder_2", bundle.text_encoder_2)):
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, (name, missing[:3])
    assert unused_layers_2 == 0
    for param_name, param in bundle.text_encoder.named_parameters():
        assert (param.grad is None) == param_name.startswith(unused), param_name


def test_text_encoder_parts_of_the_second_encoder(tiny: ModelBundle) -> None:
    encoder = tiny.text_encoder_2
    embeddings, layers, final_layer_norm = text_encoder_parts(encoder)
    assert embeddings is encoder.text_model.embeddings
    assert layers is encoder.text_model.encoder.layers and len(layers) == 32
    assert final_layer_norm is encoder.text_model.final_layer_norm
    inside = {id(p) for m in (embeddings, layers, final_layer_norm) for p in m.parameters()}
    outside = [n for n, p in encoder.named_parameters() if id(p) not in inside]
    assert outside == ["text_projection.weight"]
