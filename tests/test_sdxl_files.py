"""SDXL folders and single files: written, loaded by diffusers, read back as resume_ckpt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open

import models.loading as loading
from config.errors import UserError
from models import ModelBundle, classify_resume_ckpt, load_models
from models.ldm_layout import SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX, ldm_state_dict
from models.loading import SourceKind
from models.pipeline_folder import write_pipeline_folder
from models.single_file import write_single_file
from models.single_file_load import expected_shapes, single_file_layout
from tests.e2e import assert_same_weights

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny() -> ModelBundle:
    return load_models("tiny-sdxl")


def with_prediction(bundle: ModelBundle, **scheduler: object) -> ModelBundle:
    return ModelBundle(
        **{
            **bundle.__dict__,
            "noise_scheduler": DDPMScheduler.from_config(
                bundle.noise_scheduler.config, **scheduler
            ),
        }
    )


# --- folders ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("full_precision", [False, True])
def test_folder_loads_with_diffusers_and_back_as_resume_ckpt(
    tiny: ModelBundle, tmp_path: Path, full_precision: bool
) -> None:
    folder = tmp_path / "ck"
    write_pipeline_folder(folder, tiny, full_precision)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    for name in ("text_encoder", "text_encoder_2"):
        with safe_open(str(folder / name / "model.safetensors"), framework="pt") as handle:
            keys = set(handle.keys())
            dtypes = {handle.get_slice(k).get_dtype() for k in keys}
        assert all(k.startswith(("text_model.", "text_projection.")) for k in keys), name
        assert dtypes == {"F32" if full_precision else "F16"}
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    assert classify_resume_ckpt(str(folder)) is SourceKind.LOCAL
    loaded = load_models(str(folder))
    assert loaded.family == "sdxl" and loaded.source == str(folder)
    for component in COMPONENTS:
        assert_same_weights(
            getattr(tiny, component), getattr(pipeline, component), not full_precision
        )
        assert_same_weights(
            getattr(tiny, component), getattr(loaded, component), not full_precision
        )
        assert next(getattr(loaded, component).parameters()).dtype == torch.float32
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.pad_token == "<|endoftext|>"
    assert loaded.noise_scheduler.config.timestep_spacing == "leading"
    assert next(tiny.unet.parameters()).dtype == torch.float32  # the bundle is left as it was


def test_sd_folders_are_written_as_before(tmp_path: Path) -> None:
    bundle = load_models("tiny-sd21")
    write_pipeline_folder(tmp_path / "ck", bundle, False)
    index = json.loads((tmp_path / "ck" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "text_encoder_2" not in index
    loaded = load_models(str(tmp_path / "ck"))
    assert loaded.family == "sd2" and loaded.text_encoder_2 is None
    assert_same_weights(bundle.text_encoder, loaded.text_encoder, fp16=True)


def test_sdxl_folder_missing_its_second_encoder(tiny: ModelBundle, tmp_path: Path) -> None:
    write_pipeline_folder(tmp_path, tiny, True)
    shutil.rmtree(tmp_path / "tokenizer_2")
    (tmp_path / "text_encoder_2" / "config.json").unlink()
    with pytest.raises(UserError, match=r"missing text_encoder_2/config\.json, tokenizer_2/"):
        load_models(str(tmp_path))
    (tmp_path / "model_index.json").unlink()  # then the text_encoder_2/ folder decides
    with pytest.raises(UserError, match=r"missing text_encoder_2/config\.json, tokenizer_2/"):
        classify_resume_ckpt(str(tmp_path))


def test_hub_repo_is_sdxl_by_its_model_index(
    tiny: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id loads the second encoder when its model_index.json names one."""
    write_pipeline_folder(tmp_path / "repo", tiny, True)
    asked: list[tuple[str, dict[str, bool]]] = []

    def load_config(source: str, **options: bool) -> dict[str, object]:
        asked.append((source, options))
        return json.loads((tmp_path / "repo" / "model_index.json").read_text())

    monkeypatch.setattr(loading.DiffusionPipeline, "load_config", load_config)
    assert loading._is_sdxl_source("owner/sdxl", {"local_files_only": True})
    assert asked == [("owner/sdxl", {"local_files_only": True})]
    index = json.loads((tmp_path / "repo" / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    monkeypatch.setattr(loading.DiffusionPipeline, "load_config", lambda *_a, **_k: index)
    assert not loading._is_sdxl_source("owner/other", {"local_files_only": True})


def test_a_hub_ids_family_is_told_before_loading(
    tiny: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`is_sdxl` (the resolution default): a cached index; else the hub's, once it answers;
    None offline (loading the model then says why)."""
    write_pipeline_folder(tmp_path / "repo", tiny, True)
    index = json.loads((tmp_path / "repo" / "model_index.json").read_text())
    cached: set[str] = set()
    checked: list[str] = []

    def load_config(source: str, local_files_only: bool = False) -> dict[str, object]:
        if local_files_only and source not in cached:
            raise OSError("not in the cache")
        return index

    def check_hub(repo_id: str, not_here: str) -> None:
        checked.append(repo_id)
        if repo_id == "owner/offline":
            raise UserError("no network")

    monkeypatch.setattr(loading.DiffusionPipeline, "load_config", load_config)
    monkeypatch.setattr(loading, "_check_hub", check_hub)
    monkeypatch.setattr(loading.hub_constants, "HF_HUB_OFFLINE", False)
    cached.add("owner/cached")
    assert loading.is_sdxl("owner/cached") is True and checked == []
    assert loading.is_sdxl("owner/online") is True and checked == ["owner/online"]
    assert loading.is_sdxl("owner/offline") is None


# --- the single-file layout ------------------------------------------------------------------

# Keys and shapes of the real SDXL 1.0 base single file (sd_xl_base_1.0.safetensors).
REAL_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
    "model.diffusion_model.input_blocks.2.0.out_layers.3.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.weight": (1280,),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (
        49408,
        768,
    ),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": (768,),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.ln_final.weight": (1280,),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias": (3840,),
    "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.0.ln_2.weight": (1280,),
}


@pytest.mark.slow
def test_full_size_layout_has_the_real_keys_and_shapes() -> None:
    shapes = expected_shapes("sdxl-random")  # meta device: no memory
    for key, shape in REAL_KEYS.items():
        assert shapes.get(key) == shape, key
    counts = tuple(
        sum(k.startswith(p) for k in shapes)
        for p in ("model.diffusion_model.", "first_stage_model.", SDXL_CLIP_PREFIX)
    )
    assert counts == (1680, 248, 196)
    # 12 per OpenCLIP layer and 5 more (the real file's logit_scale, unused, is ignored).
    assert sum(k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in shapes) == 32 * 12 + 5
    assert not any(k.startswith("cond_stage_model.") for k in shapes)
    # diffusers recognises the layout as SDXL base from the keys alone.
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    assert infer_diffusers_model_type(meta) == "xl_base"


def test_diffusers_converters_undo_the_mapping(tiny: ModelBundle) -> None:
    ldm = ldm_state_dict(tiny.unet, tiny.vae, tiny.text_encoder, text_encoder_2=tiny.text_encoder_2)
    projection = ldm[SDXL_OPEN_CLIP_PREFIX + "text_projection"]
    assert projection.shape == (64, 40)  # OpenCLIP's width × projection: transformers' transpose
    converted = {
        "unet": convert_ldm_unet_checkpoint(ldm, dict(tiny.unet.config)),
        "vae": convert_ldm_vae_checkpoint(ldm, dict(tiny.vae.config)),
        "text_encoder": {
            k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()
        },
        "text_encoder_2": convert_open_clip_checkpoint(
            tiny.text_encoder_2, ldm, prefix=SDXL_OPEN_CLIP_PREFIX
        ),
    }
    for component, weights in converted.items():
        own = getattr(tiny, component).state_dict()
        assert set(weights) == set(own), component
        assert all(torch.equal(weights[k], own[k]) for k in own), component


# --- single files ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("full_precision", [False, True])
def test_diffusers_loads_the_single_file_with_the_folders_weights(
    tiny: ModelBundle, tmp_path: Path, full_precision: bool
) -> None:
    folder = tmp_path / "ck"
    write_pipeline_folder(folder, tiny, full_precision)
    file = write_single_file(tmp_path / "ck.safetensors", tiny, full_precision)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "ck.safetensors"]  # no .yaml
    from_file = StableDiffusionXLPipeline.from_single_file(
        str(file), config=str(folder), local_files_only=True
    )
    from_folder = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    for component in COMPONENTS:
        assert_same_weights(getattr(from_folder, component), getattr(from_file, component))
    assert single_file_layout(file) == "tiny-sdxl"
    loaded = load_models(str(file))
    assert loaded.family == "sdxl" and loaded.prediction_type == "epsilon"
    for component in COMPONENTS:
        assert_same_weights(
            getattr(tiny, component), getattr(loaded, component), not full_precision
        )
    assert loaded.tokenizer_2.pad_token == "!"
    assert loaded.tokenizer("a photo").input_ids == tiny.tokenizer("a photo").input_ids


@pytest.mark.slow
def test_v_prediction_and_zero_terminal_snr_are_marked_in_the_file(
    tiny: ModelBundle, tmp_path: Path
) -> None:
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: v\n")  # stale
    v_model = with_prediction(tiny, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    file = write_single_file(tmp_path / "m.safetensors", v_model, True)
    assert not (tmp_path / "m.yaml").exists()  # SDXL files carry no .yaml
    with safe_open(str(file), framework="pt") as handle:
        assert {"v_pred", "ztsnr"} <= set(handle.keys())
    loaded = load_models(str(file))
    assert loaded.prediction_type == "v_prediction"
    assert loaded.noise_scheduler.config.rescale_betas_zero_snr is True
    assert load_models(str(file), "epsilon").prediction_type == "epsilon"
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert load_models(str(file)).prediction_type == "epsilon"  # a .yaml beside it decides
    plain = write_single_file(tmp_path / "e.safetensors", tiny, True)
    with safe_open(str(plain), framework="pt") as handle:
        assert not {"v_pred", "ztsnr"} & set(handle.keys())
    assert load_models(str(plain)).noise_scheduler.config.rescale_betas_zero_snr is False


def test_extra_keys_of_real_sdxl_files_are_accepted(tiny: ModelBundle, tmp_path: Path) -> None:
    tensors = ldm_state_dict(
        tiny.unet, tiny.vae, tiny.text_encoder, text_encoder_2=tiny.text_encoder_2
    )
    extras = {
        SDXL_OPEN_CLIP_PREFIX + "logit_scale": torch.tensor(4.6052),
        SDXL_CLIP_PREFIX + "text_model.embeddings.position_ids": torch.arange(77)[None],
    }
    path = tmp_path / "real.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()} | extras, str(path))
    loaded = load_models(str(path))
    for component in COMPONENTS:
        assert_same_weights(getattr(tiny, component), getattr(loaded, component))


def test_a_broken_sdxl_file_says_how_it_differs(tiny: ModelBundle, tmp_path: Path) -> None:
    tensors = ldm_state_dict(
        tiny.unet, tiny.vae, tiny.text_encoder, text_encoder_2=tiny.text_encoder_2
    )
    del tensors["model.diffusion_model.label_emb.0.0.weight"]
    path = tmp_path / "broken.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    with pytest.raises(UserError) as error:
        load_models(str(path))
    message = str(error.value)
    assert "SDXL CLIP text encoder (12 layers, width 32, 1152 tokens)" in message
    assert "SDXL OpenCLIP text encoder (32 layers, width 64, 1152 tokens)" in message
    assert "Closest known layout: tiny-sdxl (1 missing (model.diffusion_model.label_emb" in message
