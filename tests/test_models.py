"""The built-in models, loading ``resume_ckpt``, the tokenizer and CLIP text encoding."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import accelerate
import huggingface_hub
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

import models.loading as loading
from config.errors import UserError
from models import (
    BUILTIN_MODELS,
    ModelBundle,
    builtin_text_encoder_layers,
    classify_resume_ckpt,
    encode_prompts,
    is_builtin,
    load_models,
    text_encoder_num_layers,
    text_encoder_parts,
    tokenize,
)
from models.builtin import (
    BUILTIN_CONFIGS,
    CLIP_TOKENIZER_DIR,
    CLIP_VOCAB_SIZE,
    TINY_VOCAB_SIZE,
    TOKENIZER_DIR,
    TOKENIZER_TOKEN_IDS,
    builtin_tokenizer,
    load_builtin_tokenizer,
    load_clip_tokenizer,
)
from models.clip_tokenizer.make_clip_tokenizer import write_tokenizer as write_clip_tokenizer
from models.loading import SourceKind
from models.tokenizer.make_tokenizer import write_tokenizer
from tests.e2e import assert_same_weights

TINY = ("tiny-sd15", "tiny-sd21")
EXPECTED = {  # name -> (text-encoder layers, prediction type)
    "tiny-sd15": (12, "epsilon"),
    "tiny-sd21": (23, "v_prediction"),
    "sd15-random": (12, "epsilon"),
    "sd21-random": (23, "v_prediction"),
    "tiny-sdxl": (12, "epsilon"),
    "sdxl-random": (12, "epsilon"),
}
CAPTION = "a photo of ted, smiling"


@pytest.fixture(scope="module")
def tiny() -> dict[str, ModelBundle]:
    return {name: load_models(name) for name in TINY}


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def save_pipeline(bundle: ModelBundle, folder: Path, scheduler=None) -> None:
    StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        scheduler=bundle.noise_scheduler if scheduler is None else scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder, safe_serialization=True)


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_matches_the_constants_the_configs_use() -> None:
    tokenizer = load_builtin_tokenizer()
    assert len(tokenizer) == TINY_VOCAB_SIZE
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token_id == TOKENIZER_TOKEN_IDS["bos_token_id"]
    assert tokenizer.eos_token_id == TOKENIZER_TOKEN_IDS["eos_token_id"]
    assert tokenizer.pad_token_id == TOKENIZER_TOKEN_IDS["pad_token_id"]
    assert tokenizer.model_max_length == 77
    for name in BUILTIN_MODELS:
        text = BUILTIN_CONFIGS[name]["text_encoder"]
        assert text["vocab_size"] >= len(tokenizer)
        assert text["max_position_embeddings"] == 77


def test_tokenizer_round_trips_a_caption() -> None:
    tokenizer = load_builtin_tokenizer()
    ids = tokenizer(CAPTION).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # Common words are whole tokens: <bos> a photo of ted , smiling <eos>.
    assert len(ids) == 8
    text = tokenizer.decode(ids, skip_special_tokens=True)
    # CLIP's decoding puts a space before punctuation; encoding it again gives the same tokens.
    assert text == "a photo of ted , smiling"
    assert tokenizer(text).input_ids == ids


def test_tokenizer_handles_any_text_without_unknown_tokens() -> None:
    tokenizer = load_builtin_tokenizer()
    text = "Zebra café naïve 日本 😀 x_y 1234"
    ids = tokenizer(text).input_ids
    assert tokenizer.eos_token_id not in ids[1:-1]  # eos is also the unknown token
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(
        " ", ""
    )


def test_committed_tokenizer_files_are_what_the_script_writes(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name
    assert sum(f.stat().st_size for f in TOKENIZER_DIR.iterdir()) < 1_000_000


def test_tokenize_pads_and_truncates_to_77() -> None:
    tokenizer = load_builtin_tokenizer()
    ids = tokenize(tokenizer, [CAPTION, "word " * 200])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, 8:].eq(tokenizer.pad_token_id).all()
    assert ids[1, 0] == tokenizer.bos_token_id and ids[1, -1] == tokenizer.eos_token_id


def test_clip_tokenizer_gives_clips_token_ids() -> None:
    tokenizer = load_clip_tokenizer(open_clip=False)
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.convert_tokens_to_ids(["photo</w>", "cat</w>", "!"]) == [1125, 2368, 0]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    assert tokenizer.pad_token_id == 49407 and tokenizer.model_max_length == 77


def test_sd2_tokenizer_pads_with_exclamation_mark() -> None:
    tokenizer = load_clip_tokenizer(open_clip=True)
    ids = tokenize(tokenizer, ["a photo of a cat"])[0].tolist()
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and set(ids[7:]) == {0}


def test_clip_tokenizer_files_derive_from_the_bpe_merges() -> None:
    """vocab.json is exactly: bytes, bytes + </w>, one token per merge in order, specials."""
    vocab = json.loads((CLIP_TOKENIZER_DIR / "vocab.json").read_text("utf-8"))
    lines = (CLIP_TOKENIZER_DIR / "merges.txt").read_text("utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) - 1 == 49152 - 256 - 2
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert list(vocab.values()) == list(range(CLIP_VOCAB_SIZE))
    assert [t + "</w>" for t in tokens[:256]] == tokens[256:512]
    assert tokens[512:-2] == [line.replace(" ", "") for line in lines[1:]]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]


def test_clip_tokenizer_script_writes_the_committed_files(tmp_path: Path) -> None:
    """The script run on a BPE file of OpenAI's format (rebuilt here from merges.txt)."""
    merges = (CLIP_TOKENIZER_DIR / "merges.txt").read_text("utf-8").splitlines()[1:]
    # OpenAI's file: a header line, the merges CLIP uses, then more merges CLIP leaves out.
    bpe = "\n".join(['"bpe_simple_vocab_16e6.txt#version: 0.2', *merges, "x y", "z w"])
    bpe_file = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    bpe_file.write_bytes(gzip.compress(bpe.encode("utf-8")))
    assert write_clip_tokenizer(bpe_file, tmp_path / "out") == CLIP_VOCAB_SIZE
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "out" / name).read_bytes() == (CLIP_TOKENIZER_DIR / name).read_bytes()


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_each_builtin_has_the_tokenizer_its_config_expects(name: str) -> None:
    text = BUILTIN_CONFIGS[name]["text_encoder"]
    tokenizer = builtin_tokenizer(name)
    assert len(tokenizer) == text["vocab_size"]
    assert tokenizer.bos_token_id == text["bos_token_id"]
    assert tokenizer.eos_token_id == text["eos_token_id"]
    assert tokenizer.pad_token_id == text["pad_token_id"]


# --- built-in models -------------------------------------------------------------------------


def test_builtin_names() -> None:
    assert BUILTIN_MODELS == (
        "tiny-sd15",
        "tiny-sd21",
        "sd15-random",
        "sd21-random",
        "tiny-sdxl",
        "sdxl-random",
    )
    assert all(is_builtin(name) for name in BUILTIN_MODELS)
    assert not is_builtin("tiny-sd1.5")


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_builtin_text_encoder_layers_without_building(name: str) -> None:
    assert builtin_text_encoder_layers(name) == EXPECTED[name][0]


def test_builtin_text_encoder_layers_of_an_unknown_name() -> None:
    with pytest.raises(UserError, match="did you mean 'tiny-sd21'"):
        builtin_text_encoder_layers("tiny-sd2.1")


@pytest.mark.parametrize("name", TINY)
def test_tiny_builtin_shape(tiny: dict[str, ModelBundle], name: str) -> None:
    bundle = tiny[name]
    layers, prediction_type = EXPECTED[name]
    assert bundle.source == name
    assert text_encoder_num_layers(bundle.text_encoder) == layers
    assert bundle.prediction_type == prediction_type
    assert isinstance(bundle.noise_scheduler, DDPMScheduler)
    assert bundle.noise_scheduler.config.num_train_timesteps == 1000
    assert bundle.noise_scheduler.config.beta_schedule == "scaled_linear"
    hidden = bundle.text_encoder.config.hidden_size
    assert bundle.unet.config.cross_attention_dim == hidden == 32
    assert bundle.unet.config.use_linear_projection == (name == "tiny-sd21")
    assert bundle.vae.config.scaling_factor == 0.18215
    assert bundle.text_encoder.config.vocab_size == len(bundle.tokenizer)


@pytest.mark.parametrize("name", TINY)
def test_tiny_builtin_is_deterministic_and_keeps_the_callers_rng(
    tiny: dict[str, ModelBundle], name: str
) -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    again = load_models(name)
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG was not touched
    for part in ("unet", "text_encoder", "vae"):
        assert_same_weights(getattr(tiny[name], part), getattr(again, part))


def test_tiny_builtins_differ_from_each_other(tiny: dict[str, ModelBundle]) -> None:
    a = tiny["tiny-sd15"].unet.state_dict()
    b = tiny["tiny-sd21"].unet.state_dict()
    assert a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("name", "unet", "vae", "text"),
    [
        # Parameter counts of the real SD1.5 and SD2.1 components.
        ("sd15-random", 859_520_964, 83_653_863, 123_060_480),
        ("sd21-random", 865_910_724, 83_653_863, 340_387_840),
    ],
)
def test_full_size_configs_have_the_real_architectures(
    name: str, unet: int, vae: int, text: int
) -> None:
    config = BUILTIN_CONFIGS[name]
    with accelerate.init_empty_weights():  # meta device: no memory, no init
        models = {
            "unet": UNet2DConditionModel.from_config(config["unet"]),
            "vae": AutoencoderKL.from_config(config["vae"]),
            "text": CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
        }
    counts = {key: sum(p.numel() for p in m.parameters()) for key, m in models.items()}
    assert counts == {"unet": unet, "vae": vae, "text": text}
    assert text_encoder_num_layers(models["text"]) == EXPECTED[name][0]
    assert (
        DDPMScheduler.from_config(config["scheduler"]).config.prediction_type == (EXPECTED[name][1])
    )


# --- text encoder ----------------------------------------------------------------------------


def test_text_encoder_parts_transformers_5(tiny: dict[str, ModelBundle]) -> None:
    encoder = tiny["tiny-sd21"].text_encoder
    embeddings, layers, final_layer_norm = text_encoder_parts(encoder)
    assert embeddings is encoder.embeddings
    assert layers is encoder.encoder.layers and len(layers) == 23
    assert final_layer_norm is encoder.final_layer_norm
    assert isinstance(final_layer_norm, nn.LayerNorm)


def test_text_encoder_parts_transformers_4_layout(tiny: dict[str, ModelBundle]) -> None:
    class Wrapper(nn.Module):  # transformers 4.x: CLIPTextModel.text_model holds the parts
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.text_model = inner

    inner = tiny["tiny-sd15"].text_encoder
    embeddings, layers, final_layer_norm = text_encoder_parts(Wrapper(inner))
    assert embeddings is inner.embeddings
    assert layers is inner.encoder.layers
    assert final_layer_norm is inner.final_layer_norm
    assert text_encoder_num_layers(Wrapper(inner)) == 12


@pytest.mark.parametrize("name", TINY)
def test_encode_prompts_clip_skip(tiny: dict[str, ModelBundle], name: str) -> None:
    bundle = tiny[name]
    encoder = bundle.text_encoder
    ids = tokenize(bundle.tokenizer, [CAPTION, "a dog"])
    _, layers, final_layer_norm = text_encoder_parts(encoder)
    captured: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(_module, _inputs, output):
            captured[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layer.register_forward_hook(capture(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        last = encoder(ids).last_hidden_state
        skip0 = encode_prompts(encoder, ids, 0)
        skip1 = encode_prompts(encoder, ids, 1)
        skip2 = encode_prompts(encoder, ids, 2)
        skip3 = encode_prompts(encoder, ids, 3)
        penultimate = final_layer_norm(captured[len(layers) - 2])
        third_last = final_layer_norm(captured[len(layers) - 3])
        all_hidden = encoder(ids, output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    assert skip0.shape == (2, 77, 32)
    assert torch.equal(skip0, last)
    assert torch.equal(skip1, last)
    assert torch.allclose(skip2, penultimate)
    assert torch.allclose(skip2, final_layer_norm(all_hidden[-2]))
    assert torch.allclose(skip3, third_last)
    assert not torch.allclose(skip2, skip0)
    assert not torch.allclose(skip3, skip2)


def test_encode_prompts_rejects_clip_skip_out_of_range(tiny: dict[str, ModelBundle]) -> None:
    bundle = tiny["tiny-sd15"]
    ids = tokenize(bundle.tokenizer, [CAPTION])
    with torch.no_grad():
        encode_prompts(bundle.text_encoder, ids, 12)
        with pytest.raises(UserError, match=r"clip_skip: 13 .* 0 to 12"):
            encode_prompts(bundle.text_encoder, ids, 13)
        with pytest.raises(UserError, match="clip_skip: -1"):
            encode_prompts(bundle.text_encoder, ids, -1)


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_train_at_64px_batch_2(name: str) -> None:
    bundle = load_models(name)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = bundle.vae.encode(images).latent_dist.sample() * bundle.vae.config.scaling_factor
    assert latents.shape == (2, 4, 8, 8)
    bundle.unet.train()
    bundle.text_encoder.train()
    scheduler = bundle.noise_scheduler
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2,))
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if bundle.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    ids = tokenize(bundle.tokenizer, [CAPTION, "a dog on the beach"])
    hidden = encode_prompts(bundle.text_encoder, ids, 0)
    prediction = bundle.unet(noisy, timesteps, hidden).sample
    loss = torch.nn.functional.mse_loss(prediction, target)
    loss.backward()
    assert torch.isfinite(loss)
    for model in (bundle.unet, bundle.text_encoder):
        for param_name, param in model.named_parameters():
            assert param.grad is not None, param_name
            assert torch.isfinite(param.grad).all(), param_name


# --- loading resume_ckpt ---------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_saved_pipeline_loads_back_identically(
    tiny: dict[str, ModelBundle], name: str, tmp_path: Path
) -> None:
    save_pipeline(tiny[name], tmp_path)
    assert classify_resume_ckpt(str(tmp_path)) is SourceKind.LOCAL
    loaded = load_models(str(tmp_path))
    assert loaded.source == str(tmp_path)
    assert loaded.prediction_type == EXPECTED[name][1]
    assert text_encoder_num_layers(loaded.text_encoder) == EXPECTED[name][0]
    for part in ("unet", "text_encoder", "vae"):
        assert_same_weights(getattr(tiny[name], part), getattr(loaded, part))
        assert next(getattr(loaded, part).parameters()).dtype == torch.float32
    assert loaded.tokenizer(CAPTION).input_ids == tiny[name].tokenizer(CAPTION).input_ids
    assert loaded.tokenizer.model_max_length == 77
    assert torch.equal(loaded.noise_scheduler.betas, tiny[name].noise_scheduler.betas)


def test_folder_with_another_scheduler_gives_a_ddpm_noise_scheduler(
    tiny: dict[str, ModelBundle], tmp_path: Path
) -> None:
    bundle = tiny["tiny-sd21"]
    save_pipeline(
        bundle, tmp_path, scheduler=PNDMScheduler.from_config(bundle.noise_scheduler.config)
    )
    loaded = load_models(str(tmp_path))
    assert isinstance(loaded.noise_scheduler, DDPMScheduler)
    assert loaded.prediction_type == "v_prediction"
    assert torch.equal(loaded.noise_scheduler.alphas_cumprod, bundle.noise_scheduler.alphas_cumprod)


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as error:
        load_models(str(missing))
    message = str(error.value)
    assert str(missing) in message and "no such folder" in message
    assert "tiny-sd15, tiny-sd21, sd15-random, sd21-random" in message


def test_missing_home_relative_folder() -> None:
    with pytest.raises(UserError, match="no such folder"):
        load_models("~/surely-not-a-model-folder-7f3a/")


def test_folder_without_unet(tiny: dict[str, ModelBundle], tmp_path: Path) -> None:
    save_pipeline(tiny["tiny-sd15"], tmp_path)
    shutil.rmtree(tmp_path / "unet")
    (tmp_path / "vae" / "config.json").unlink()
    with pytest.raises(UserError) as error:
        load_models(str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and "not a diffusers Stable Diffusion folder" in message
    assert "missing unet/, vae/config.json" in message


def test_empty_folder_lists_everything_missing(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match="missing unet/, text_encoder/, tokenizer/, vae/, scheduler/"
    ):
        classify_resume_ckpt(str(tmp_path))


def test_folder_without_weights(tiny: dict[str, ModelBundle], tmp_path: Path) -> None:
    save_pipeline(tiny["tiny-sd15"], tmp_path)
    for weights in (tmp_path / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(UserError, match=f"could not load '{tmp_path}'"):
        load_models(str(tmp_path))


@pytest.mark.parametrize(
    ("typo", "meant"), [("tiny-sd1.5", "tiny-sd15"), ("sd21_random", "sd21-random")]
)
def test_misspelled_builtin_name(
    typo: str, meant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        UserError, match=f"'{typo}' is not a built-in model.*did you mean '{meant}'"
    ):
        load_models(typo)


def test_hub_id_is_recognised_without_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert classify_resume_ckpt("stabilityai/stable-diffusion-2-1") is SourceKind.HUB
    assert classify_resume_ckpt("runwayml/stable-diffusion-v1-5") is SourceKind.HUB
    for not_hub in ("a/b/c", "./a/b", "../x/y", "/abs/x"):
        with pytest.raises(UserError, match="no such folder"):
            classify_resume_ckpt(not_hub)


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A hub endpoint that refuses connections at once; records the repos looked up."""
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    looked_up: list[str] = []
    real_model_info = huggingface_hub.HfApi.model_info

    def model_info(self: huggingface_hub.HfApi, repo_id: str, **kwargs: object) -> object:
        looked_up.append(repo_id)
        return real_model_info(self, repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    return looked_up


def test_hub_id_without_network_fails_at_once_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unreachable_hub: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as error:
        load_models("someone/not-cached-model")
    message = str(error.value)
    assert "\n" not in message
    assert "'someone/not-cached-model' is not a folder here" in message
    assert "nor in the local Hugging Face cache" in message
    assert "the Hugging Face hub (http://127.0.0.1:9) cannot be reached (ConnectError" in message
    assert "tiny-sd15, tiny-sd21" in message
    assert unreachable_hub == ["someone/not-cached-model"]  # one request, no retries


def test_hub_id_with_hf_hub_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"local Hugging Face cache .*, and HF_HUB_OFFLINE is set"):
        load_models("someone/not-cached-model")


def test_hub_id_found_in_the_local_cache_needs_no_network(
    tiny: dict[str, ModelBundle], monkeypatch: pytest.MonkeyPatch, unreachable_hub: list[str]
) -> None:
    sources: list[tuple[str, bool]] = []

    def cached(source: str, local_files_only: bool) -> ModelBundle:
        sources.append((source, local_files_only))
        return tiny["tiny-sd15"]

    monkeypatch.setattr(loading, "_load_components", cached)
    assert load_models("someone/cached-model") is tiny["tiny-sd15"]
    assert sources == [("someone/cached-model", True)] and unreachable_hub == []


def test_hub_answering_that_the_repo_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

    # huggingface_hub 2's HTTP client, imported here: an older hub (a GPU image's) then fails
    # this test alone, not the collection of the whole module.
    import httpx2

    def missing(self: huggingface_hub.HfApi, repo_id: str, **kwargs: object) -> None:
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        response = httpx2.Response(404, request=request)
        raise HfHubHTTPError("404 Client Error: Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    with pytest.raises(UserError, match="the Hugging Face hub says: 404 Client Error"):
        load_models("someone/no-such-model")
