"""lora_init (reading kohya and diffusers files), the adapters' exact state, and merging."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from config.errors import UserError
from lora.adapters import adapter_parameters, adapter_state_dict, load_adapter_state_dict
from lora.files import write_diffusers_file, write_kohya_file
from lora.inject import add_lora_adapters
from lora.merge import merged_bundle
from lora.reading import apply_lora_init, check_lora_init, read_lora_file
from lora.settings import LoraSettings
from models.builtin import build_builtin
from tests.lora_helpers import LOCON, RANK4, adapted, info_of, models_of, outputs


def write_files(bundle, settings, folder: Path) -> Path:
    write_diffusers_file(folder, models_of(bundle), False)
    return write_kohya_file(
        folder / "run.safetensors", models_of(bundle), settings, info_of(bundle), False
    )


def start_from(file: Path, name: str, settings: LoraSettings, **train):
    """A new run's models: read and check the file, add adapters, load the file into them."""
    bundle = build_builtin(name)
    lora_file = read_lora_file(file, models_of(bundle))
    check_lora_init(lora_file, settings)
    add_lora_adapters(bundle, settings, train.get("unet", True), train.get("text", True), seed=9)
    apply_lora_init(lora_file, models_of(bundle))
    return bundle, lora_file


def same_adapters(a, b) -> bool:
    for model_a, model_b in ((a.unet, b.unet), (a.text_encoder, b.text_encoder)):
        pa, pb = adapter_parameters(model_a), adapter_parameters(model_b)
        if set(pa) != set(pb) or not all(torch.equal(pa[k], pb[k]) for k in pa):
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize(("name", "settings"), [("tiny-sd15", LOCON), ("tiny-sd21", RANK4)])
def test_both_formats_give_back_the_same_adapters(name, settings, tmp_path):
    trained = adapted(name, settings)
    kohya = write_files(trained, settings, tmp_path)
    for source, kind in ((kohya, "kohya"), (tmp_path, "diffusers")):
        bundle, lora_file = start_from(source, name, settings)
        assert lora_file.format == kind
        assert same_adapters(bundle, trained)


def test_a_file_of_other_rank_or_alpha_names_the_keys_to_set(tmp_path):
    kohya = write_files(adapted("tiny-sd15", LOCON), LOCON, tmp_path)
    bundle = build_builtin("tiny-sd15")
    lora_file = read_lora_file(kohya, models_of(bundle))
    message = r"rank 4 and alpha 2, .* set lora_rank: 4 and lora_alpha: 2"
    with pytest.raises(UserError, match=message):
        check_lora_init(lora_file, LoraSettings.of(8, conv_rank=2, conv_alpha=1.0))
    with pytest.raises(UserError, match="set lora_conv_rank: 2 and lora_conv_alpha: 1"):
        check_lora_init(lora_file, LoraSettings.of(4, alpha=2.0))
    check_lora_init(lora_file, LOCON)


def test_adapters_where_this_run_trains_none_are_refused(tmp_path):
    kohya = write_files(adapted("tiny-sd15"), RANK4, tmp_path)
    with pytest.raises(UserError, match="trains no adapter in this run"):
        start_from(kohya, "tiny-sd15", RANK4, text=False)


def test_adapters_the_file_lacks_start_fresh(tmp_path, caplog):
    trained = adapted("tiny-sd15", train_text_encoder=False)
    kohya = write_files(trained, RANK4, tmp_path)
    bundle, _ = start_from(kohya, "tiny-sd15", RANK4)
    unet_a, unet_b = adapter_parameters(bundle.unet), adapter_parameters(trained.unet)
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    text = adapter_parameters(bundle.text_encoder)
    assert all(not p.any() for k, p in text.items() if ".lora_B." in k)
    assert "holds 48 of this run's 120 adapters" in caplog.text


def test_an_sd2_file_does_not_fit_an_sd1_model(tmp_path):
    kohya = write_files(adapted("tiny-sd21"), RANK4, tmp_path)
    with pytest.raises(UserError, match=r"not in this model|a LoRA for another model"):
        start_from(kohya, "tiny-sd15", RANK4)


def test_sdxl_and_foreign_files_are_named(tmp_path):
    bundle = build_builtin("tiny-sd15")
    sdxl = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(
        {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)},
        str(sdxl),
    )
    with pytest.raises(UserError, match="is an SDXL LoRA"):
        read_lora_file(sdxl, models_of(bundle))
    other = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.x": torch.zeros(1)}, str(other))
    with pytest.raises(UserError, match="not a LoRA file of kohya's or diffusers' format"):
        read_lora_file(other, models_of(bundle))
    loha = tmp_path / "loha.safetensors"
    safetensors.torch.save_file(
        {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(1)}, str(loha)
    )
    with pytest.raises(UserError, match="LyCORIS"):
        read_lora_file(loha, models_of(bundle))
    with pytest.raises(UserError, match="does not exist"):
        read_lora_file(tmp_path / "missing.safetensors", models_of(bundle))


def test_a_kohya_file_without_alphas_means_alpha_equals_rank(tmp_path):
    kohya = write_files(adapted("tiny-sd15"), RANK4, tmp_path)
    tensors = safetensors.torch.load_file(str(kohya))
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file(
        {k: v for k, v in tensors.items() if not k.endswith(".alpha")}, str(old)
    )
    lora_file = read_lora_file(old, models_of(build_builtin("tiny-sd15")))
    check_lora_init(lora_file, LoraSettings.of(4))  # alpha 4 = rank


@pytest.mark.slow
def test_the_adapter_state_resumes_exactly(tmp_path):
    trained = adapted("tiny-sd21", LOCON)
    state = adapter_state_dict(trained.unet)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    fresh = build_builtin("tiny-sd21")
    add_lora_adapters(fresh, LOCON, True, True, seed=4)
    load_adapter_state_dict(fresh.unet, state)
    load_adapter_state_dict(fresh.text_encoder, adapter_state_dict(trained.text_encoder))
    assert same_adapters(fresh, trained)
    other = build_builtin("tiny-sd21")
    add_lora_adapters(other, RANK4, True, True)
    with pytest.raises(UserError, match="do not fit"):
        load_adapter_state_dict(other.unet, state)


@pytest.mark.parametrize(("name", "settings"), [("tiny-sd15", LOCON), ("tiny-sd21", RANK4)])
def test_merged_models_compute_what_the_adapted_ones_do(name, settings):
    bundle = adapted(name, settings)
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    merged = merged_bundle(bundle)
    assert merged.vae is bundle.vae
    assert not any("lora" in k for k in merged.unet.state_dict())
    assert set(merged.unet.state_dict()) == set(build_builtin(name).unet.state_dict())
    hidden, sample = outputs(bundle.unet, bundle.text_encoder)
    merged_hidden, merged_sample = outputs(merged.unet, merged.text_encoder)
    torch.testing.assert_close(merged_hidden, hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged_sample, sample, rtol=1e-4, atol=1e-5)
    after = bundle.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the live model unchanged


def test_older_diffusers_key_names_are_converted_and_alpha_is_the_rank(tmp_path):
    """Files of diffusers' older training scripts: ``to_q.lora.down`` and
    ``lora_linear_layer`` names, no metadata (so each alpha is its rank)."""
    trained = adapted("tiny-sd15")
    layers = {
        part: convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        for part, model in models_of(trained).items()
    }
    assert any(".lora.down." in k for k in layers["unet"])
    assert any(".lora_linear_layer." in k for k in layers["text_encoder"])
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"]
    )
    bundle, lora_file = start_from(tmp_path, "tiny-sd15", LoraSettings.of(4))
    assert lora_file.format == "diffusers" and same_adapters(bundle, trained)
