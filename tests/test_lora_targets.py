"""LoRA targets and injection: kohya's module set, adapters only where training goes."""

from __future__ import annotations

import collections

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lora.adapters import adapted_layers, adapter_parameters
from lora.inject import add_lora_adapters
from lora.report import lora_report, planned_report
from lora.settings import LoraSettings
from lora.targets import text_encoder_targets, unet_targets
from models.builtin import BUILTIN_CONFIGS, build_builtin
from tests.lora_helpers import LOCON, RANK4, base_outputs, models_of, outputs


def leaf_kinds(targets, model) -> collections.Counter:
    """How many targets end in each leaf name (to_q, proj_in, conv1, ...)."""
    kinds = collections.Counter()
    for target in targets:
        leaf = target.name.rsplit(".", 2)
        kinds[leaf[-1] if leaf[-1] != "0" else f"{leaf[-2]}.0"] += 1
    return kinds


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd21"])
def test_unet_targets_are_kohyas_transformer_layers(name):
    unet = build_builtin(name).unet
    targets = unet_targets(unet, RANK4)
    transformers = 4  # tiny UNets: one in each of the two cross-attention blocks, two up, one mid
    per_block = {"proj_in": 1, "proj_out": 1, "to_q": 2, "to_k": 2, "to_v": 2, "to_out.0": 2}
    per_block |= {"proj": 1, "2": 1}  # ff.net.0.proj, ff.net.2
    assert leaf_kinds(targets, unet) == {k: v * transformers for k, v in per_block.items()}
    assert all(".transformer_blocks." in t.name or ".proj_" in t.name for t in targets)
    assert {(t.rank, t.alpha, t.conv3x3) for t in targets} == {(4, 2.0, False)}
    proj_in = unet.get_submodule(targets[0].name)
    linear = name == "tiny-sd21"  # SD2's proj_in/proj_out are Linear, SD1's 1x1 convs
    assert isinstance(proj_in, torch.nn.Linear if linear else torch.nn.Conv2d)


def test_locon_adds_resnet_and_sampler_layers_at_their_ranks():
    unet = build_builtin("tiny-sd15").unet
    targets = unet_targets(unet, LOCON)
    extra = [t for t in targets if ".resnets." in t.name or "samplers." in t.name]
    assert len(targets) - len(extra) == 48
    kinds = leaf_kinds(extra, unet)
    # 8 ResNet blocks (2 down, 2 mid, 4 up); a 1x1 shortcut where the width changes (the
    # second down block and every up block, which takes the skip connection too); one
    # downsampler and one upsampler
    assert kinds == {"conv1": 8, "conv2": 8, "time_emb_proj": 8, "conv_shortcut": 5, "conv": 2}
    for target in extra:
        module = unet.get_submodule(target.name)
        conv3x3 = isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3)
        assert target.conv3x3 == conv3x3
        assert (target.rank, target.alpha) == ((2, 1.0) if conv3x3 else (4, 2.0))
    assert not any(
        "conv_in" in t.name or "conv_out" in t.name or "time_embedding" in t.name for t in targets
    )


@pytest.mark.parametrize(("name", "layers"), [("tiny-sd15", 12), ("tiny-sd21", 23)])
def test_text_encoder_targets_attention_and_mlp_of_trained_layers(name, layers):
    encoder = build_builtin(name).text_encoder
    targets = text_encoder_targets(encoder, RANK4)
    leaves = collections.Counter(t.name.rsplit(".", 1)[1] for t in targets)
    assert leaves == {k: layers for k in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")}
    frozen = text_encoder_targets(encoder, RANK4, frozen_layers={0, 1, layers - 1})
    assert len(frozen) == 6 * (layers - 3)
    assert not any(t.name.startswith(("encoder.layers.0.", "encoder.layers.1.")) for t in frozen)
    assert not any(t.name.startswith(f"encoder.layers.{layers - 1}.") for t in frozen)


def test_after_injection_only_the_adapters_train():
    bundle = build_builtin("tiny-sd15")
    injected = add_lora_adapters(bundle, LOCON, True, True, frozen_text_layers=range(6), seed=0)
    for model, targets in (
        (bundle.unet, injected.unet),
        (bundle.text_encoder, injected.text_encoder),
    ):
        assert set(adapted_layers(model)) == {t.name for t in targets}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(adapter_parameters(model)) and trainable
        assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    layers = {name.split(".")[2] for name in adapted_layers(bundle.text_encoder)}
    assert layers == {str(i) for i in range(6, 12)}  # frozen layers 0-5 got none
    assert all(p.dtype == torch.float32 for p in adapter_parameters(bundle.unet).values())


def test_models_that_do_not_train_get_no_adapter_and_stay_frozen():
    bundle = build_builtin("tiny-sd15")
    injected = add_lora_adapters(bundle, RANK4, train_unet=False, train_text_encoder=True)
    assert not injected.unet and not adapted_layers(bundle.unet)
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    bundle = build_builtin("tiny-sd15")
    injected = add_lora_adapters(bundle, RANK4, True, True, frozen_text_layers=range(12))
    assert not injected.text_encoder
    assert not any(p.requires_grad for p in bundle.text_encoder.parameters())


@pytest.mark.slow
def test_fresh_adapters_change_nothing_and_the_seed_decides_them():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = build_builtin("tiny-sd15")
    add_lora_adapters(first, LOCON, True, True, seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    hidden, sample = outputs(first.unet, first.text_encoder)
    base_hidden, base_sample = base_outputs("tiny-sd15")
    assert torch.equal(hidden, base_hidden) and torch.equal(sample, base_sample)
    again = build_builtin("tiny-sd15")
    add_lora_adapters(again, LOCON, True, True, seed=5)
    other = build_builtin("tiny-sd15")
    add_lora_adapters(other, LOCON, True, True, seed=6)
    a, b, c = (adapter_parameters(m.unet) for m in (first, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if ".lora_A." in k)


def test_dropout_reaches_peft():
    bundle = build_builtin("tiny-sd15")
    add_lora_adapters(bundle, LoraSettings.of(4, dropout=0.25), True, False)
    layer = next(iter(adapted_layers(bundle.unet).values()))
    assert layer.lora_dropout["default"].p == 0.25


def meta_models(name: str) -> dict[str, torch.nn.Module]:
    config = BUILTIN_CONFIGS[name]
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(config["unet"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
        }


def test_sd15_rank16_counts_match_kohyas_networks_lora():
    """kohya's networks.lora on SD1.5 at rank 16 with its default targets: 16 transformer
    blocks x 12 layers + 12 text-encoder layers x 6 = 264 modules, 3 tensors each; parameters
    worked out by hand from the layer widths: UNet 16 * sum(32 C + 1536) over the blocks'
    widths C, text encoder 12 * 16 * 13824."""
    models = meta_models("sd15-random")
    settings = LoraSettings.of(16)
    targets = {
        "unet": unet_targets(models["unet"], settings),
        "text_encoder": text_encoder_targets(models["text_encoder"], settings),
    }
    report = planned_report(models, targets, full_precision=False)
    widths = [320] * 5 + [640] * 5 + [1280] * 6
    assert report["unet"]["adapted_modules"] == 192
    assert report["text_encoder"]["adapted_modules"] == 72
    assert report["unet"]["parameters"] == 16 * sum(32 * c + 1536 for c in widths) == 6_782_976
    assert report["text_encoder"]["parameters"] == 12 * 16 * 13824 == 2_654_208
    kohya = report["kohya_file"]
    assert kohya["tensors"] == 792 and kohya["dtype"] == "float16"
    data = 2 * (6_782_976 + 2_654_208) + 2 * 264  # fp16 weights and alphas
    assert data < kohya["bytes"] < data + 120_000  # plus the header
    assert kohya["bytes"] == 18_986_312


def test_live_report_counts_the_adapters(tmp_path):
    bundle = build_builtin("tiny-sd15")
    add_lora_adapters(bundle, LOCON, True, True)
    report = lora_report(models_of(bundle), full_precision=True)
    assert report["unet"]["adapted_modules"] == 79 and report["text_encoder"]["tensors"] == 144
    params = sum(p.numel() for p in adapter_parameters(bundle.unet).values())
    assert report["unet"]["parameters"] == params and report["unet"]["fp32_bytes"] == 4 * params
    assert report["kohya_file"]["tensors"] == 3 * (79 + 72)
    assert report["kohya_file"]["dtype"] == "float32"
