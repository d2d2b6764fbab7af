"""Sample images: reading sample_prompts (.txt / EveryDream2 .json) and making images."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from config.errors import ConfigError, UserError
from models import ModelBundle, load_models
from training.samples import (
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    SampleRequest,
    generate_samples,
    load_sample_prompts,
    load_sample_settings,
    make_inference_scheduler,
    scheduler_problem,
    size_for_aspect_ratio,
)

CPU = torch.device("cpu")
STEPS = 2  # inference steps: enough to exercise a scheduler, fast on the tiny model


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_json(tmp_path: Path, data: object) -> Path:
    return write(tmp_path, "sample_prompts.json", json.dumps(data, indent=2))


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_sample_settings(path, 512, 555)
    return info.value.problems


def request(prompt: str = "a photo of ted", **kwargs: object) -> SampleRequest:
    settings = {"seed": 1, "width": 64, "height": 64, "num_inference_steps": STEPS, **kwargs}
    return SampleRequest(prompt=prompt, **settings)


# --- .txt ----------------------------------------------------------------------------------


def test_txt_one_prompt_a_line_skipping_blanks_and_comments(tmp_path: Path) -> None:
    path = write(
        tmp_path, "prompts.txt", "\ufeff# my prompts\n a photo of ted \n\n#x\nted, smiling\n"
    )
    requests = load_sample_prompts(path, 512, 42)
    assert requests == [
        SampleRequest("a photo of ted", seed=42, width=512, height=512),
        SampleRequest("ted, smiling", seed=42, width=512, height=512),
    ]


def test_txt_without_prompts_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "prompts.txt", "# only a comment\n\n   \n")
    with pytest.raises(UserError, match="no prompts") as info:
        load_sample_prompts(path, 512, 555)
    assert str(path) in str(info.value)


def test_txt_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a photo of ted\nted \xff\xfe smiling\n")
    with pytest.raises(UserError, match=r"line 2: not UTF-8"):
        load_sample_prompts(path, 512, 555)


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="file not found"):
        load_sample_prompts(tmp_path / "nope.txt", 512, 555)
    with pytest.raises(UserError, match="not found"):
        load_sample_prompts(tmp_path / "nope.json", 512, 555)
    path = write(tmp_path, "prompts.yaml", "a photo of ted\n")
    with pytest.raises(UserError, match=r"unknown file type '\.yaml'.*\.txt.*\.json"):
        load_sample_prompts(path, 512, 555)


# --- .json ---------------------------------------------------------------------------------

EVERYDREAM2_EXAMPLE = {
    "batch_size": 3,
    "seed": 555,
    "cfgs": [7, 4],
    "scheduler": "dpm++",
    "num_inference_steps": 15,
    "show_progress_bars": True,
    "generate_samples_every_n_steps": 200,
    "generate_pretrain_samples": True,
    "samples": [
        {"prompt": "ted on a sofa", "negative_prompt": "distorted, deformed"},
        {"prompt": "ted riding a bicycle", "seed": -1, "aspect_ratio": 1.77778},
        {"random_caption": True, "size": [640, 384], "cfg": 3.5},
    ],
}


def test_json_everydream2_format(tmp_path: Path) -> None:
    settings = load_sample_settings(write_json(tmp_path, EVERYDREAM2_EXAMPLE), 512, 1)
    assert settings.scheduler == "dpm++"
    assert settings.every_n_steps == 200
    assert settings.every_n_epochs is None
    assert settings.pretrain is True
    assert settings.show_progress_bars is True
    common = {"num_inference_steps": 15}
    assert settings.requests == (
        SampleRequest("ted on a sofa", "distorted, deformed", 555, 512, 512, 7.0, **common),
        SampleRequest("ted on a sofa", "distorted, deformed", 555, 512, 512, 4.0, **common),
        SampleRequest("ted riding a bicycle", "", -1, 704, 384, 7.0, **common),
        SampleRequest("ted riding a bicycle", "", -1, 704, 384, 4.0, **common),
        SampleRequest("", "", 555, 640, 384, 3.5, caption_index=0, **common),
    )


def test_json_defaults_come_from_the_run_and_sample_request(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"samples": [{"prompt": "ted"}]})
    settings = load_sample_settings(path, 256, 9)
    assert settings.scheduler == DEFAULT_SCHEDULER
    assert settings.every_n_steps is None
    assert settings.pretrain is False
    assert settings.requests == (SampleRequest("ted", seed=9, width=256, height=256),)
    path = write_json(tmp_path, {"resolution": 320, "samples": [{"prompt": "ted"}]})
    assert load_sample_prompts(path, 256, 9)[0].width == 320


def test_json_unknown_keys_suggest_the_closest(tmp_path: Path) -> None:
    data = {"sheduler": "ddim", "samples": [{"prompt": "ted", "negativ_prompt": "blurry"}]}
    problems = problems_of(write_json(tmp_path, data))
    assert len(problems) == 2
    assert "sheduler: unknown key (did you mean 'scheduler'?)" in problems[0]
    assert "samples[0].negativ_prompt" in problems[1]
    assert "did you mean 'negative_prompt'?" in problems[1]
    assert all(str(tmp_path / "sample_prompts.json") in p for p in problems)


def test_json_size_must_be_multiples_of_8(tmp_path: Path) -> None:
    data = {"samples": [{"prompt": "ted", "size": [512, 500]}, {"prompt": "x", "size": [64]}]}
    problems = problems_of(write_json(tmp_path, data))
    assert len(problems) == 2
    assert "samples[0].size[1]: expected a multiple of 8 (pixels), got 500" in problems[0]
    assert "samples[1].size: expected [width, height]" in problems[1]
    path = write_json(tmp_path, {"resolution": 100, "samples": [{"prompt": "ted"}]})
    assert "resolution: expected a multiple of 8" in problems_of(path)[0]


def test_json_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "s.json", '{\n  "seed": 555,\t# a comment\n  "samples": []\n}\n')
    with pytest.raises(UserError, match=r"s\.json: invalid JSON at line 2, column 16"):
        load_sample_prompts(path, 512, 555)


@pytest.mark.parametrize("data", [{}, {"samples": []}, {"seed": 5}])
def test_json_without_samples_is_an_error(tmp_path: Path, data: dict) -> None:
    problems = problems_of(write_json(tmp_path, data))
    assert len(problems) == 1
    assert "samples: no prompts" in problems[0]


def test_json_bad_values_are_all_reported(tmp_path: Path) -> None:
    data = {
        "seed": "x",
        "cfgs": [],
        "num_inference_steps": 0,
        "show_progress_bars": "yes",
        "generate_samples_every_n_steps": 1.5,
        "samples": [
            {"prompt": "a", "size": [64, 64], "aspect_ratio": 1.5},
            {"prompt": "b", "random_caption": True},
            {"negative_prompt": "c"},
            {"prompt": "d", "cfg": 7, "cfgs": [7]},
            {"prompt": "e", "seed": -2, "aspect_ratio": 9, "cfgs": [7, -1]},
            "f",
        ],
    }
    problems = problems_of(write_json(tmp_path, data))
    expected = [
        "seed: expected a whole number",
        "cfgs: expected a non-empty list",
        "num_inference_steps: must be at least 1",
        "show_progress_bars: expected true or false",
        "generate_samples_every_n_steps: expected a whole number",
        "samples[0]: give either 'size' or 'aspect_ratio', not both",
        "samples[1]: give either 'prompt' or 'random_caption': true, not both",
        "samples[2]: missing 'prompt' (or 'random_caption': true)",
        "samples[3]: give either 'cfg' or 'cfgs', not both",
        "samples[4].seed: expected a whole number from 0 to 2^63-1, or -1",
        "samples[4].aspect_ratio: expected width/height",
        "samples[4].cfgs: each guidance scale must be a number >= 0",
        "samples[5]: expected an object",
    ]
    assert len(problems) == len(expected)
    for text in expected:
        assert sum(f"sample_prompts.json: {text}" in problem for problem in problems) == 1, text


def test_json_scheduler_names(tmp_path: Path) -> None:
    problems = problems_of(
        write_json(tmp_path, {"scheduler": "eulr_a", "samples": [{"prompt": "a"}]})
    )
    assert "scheduler: unknown scheduler 'eulr_a' (did you mean 'euler_a'?)" in problems[0]
    for name in ("ddim", "euler_a", "dpm++_2m_k", "unipc"):
        path = write_json(tmp_path, {"scheduler": name, "samples": [{"prompt": "a"}]})
        assert load_sample_settings(path, 512, 555).scheduler == name


@pytest.mark.skipif(importlib.util.find_spec("scipy") is not None, reason="scipy is installed")
def test_scheduler_needing_a_missing_package_says_which(tmp_path: Path) -> None:
    problems = problems_of(write_json(tmp_path, {"scheduler": "lms", "samples": [{"prompt": "a"}]}))
    assert "scheduler 'lms' needs the Python package 'scipy'" in problems[0]


def test_json_everydream2_keys_without_meaning_here_are_accepted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = {"batch_size": 8, "external_gen_enabled": False, "samples": [{"prompt": "ted"}]}
    with caplog.at_level(logging.INFO, logger="training.samples"):
        requests = load_sample_prompts(write_json(tmp_path, data), 512, 555)
    assert [r.prompt for r in requests] == ["ted"]
    assert "'batch_size' is ignored" in caplog.text
    assert "'external_gen_enabled' is ignored" in caplog.text


def test_size_for_aspect_ratio_matches_everydream2() -> None:
    assert size_for_aspect_ratio(1.0, 512) == (512, 512)
    assert size_for_aspect_ratio(1.77778, 512) == (704, 384)
    assert size_for_aspect_ratio(0.5, 512) == (384, 704)
    assert size_for_aspect_ratio(4.0, 64) == (128, 64)


def test_reading_sample_prompts_loads_no_model_library(tmp_path: Path) -> None:
    path = write_json(tmp_path, EVERYDREAM2_EXAMPLE)
    code = (
        "import sys; from pathlib import Path; from training.samples import load_sample_prompts;"
        f"assert len(load_sample_prompts(Path({str(path)!r}), 512, 1)) == 5;"
        "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_zero_terminal_snr_samples_with_trailing_timesteps() -> None:
    noise_scheduler = load_models("tiny-sd15").noise_scheduler
    scheduler = make_inference_scheduler("ddim", noise_scheduler.config)
    assert scheduler.config.timestep_spacing == "leading"
    ztsnr = DDPMScheduler.from_config(noise_scheduler.config, rescale_betas_zero_snr=True)
    scheduler = make_inference_scheduler("euler", ztsnr.config)
    assert scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.rescale_betas_zero_snr is True


# --- making images -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return load_models("tiny-sd15")


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_generate_writes_pngs_prompts_and_tensorboard_images(
    bundle: ModelBundle, tmp_path: Path
) -> None:
    requests = [
        request(),
        request(),  # the same request again: the same image
        request(seed=2),
        request("ted, smiling", width=128, height=64, negative_prompt="blurry"),
    ]
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    paths = generate_samples(bundle, requests, 0, CPU, tmp_path / "samples", 7, writer)
    writer.close()

    assert [p.name for p in paths] == [f"step-000007-0{i}.png" for i in range(4)]
    assert [Image.open(p).size for p in paths] == [(64, 64)] * 3 + [(128, 64)]
    images = [pixels(p) for p in paths]
    assert np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])
    assert images[0].std() > 0
    description = paths[3].with_suffix(".txt").read_text(encoding="utf-8").splitlines()
    assert description[0] == "ted, smiling"
    assert "negative_prompt: blurry" in description
    assert "seed: 1" in description
    assert "size: 128x64" in description
    assert f"scheduler: {DEFAULT_SCHEDULER}" in description

    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == [f"samples/{i}" for i in range(4)]
    image = events.Images("samples/3")[0]
    assert (image.step, image.width, image.height) == (7, 128, 64)


def test_same_seed_gives_the_same_image_at_every_call(bundle: ModelBundle, tmp_path: Path) -> None:
    first = generate_samples(bundle, [request()], 0, CPU, tmp_path, 1)
    torch.rand(5)  # training goes on between samples
    second = generate_samples(bundle, [request()], 0, CPU, tmp_path, 2)
    assert np.array_equal(pixels(first[0]), pixels(second[0]))


def test_global_rng_is_untouched(bundle: ModelBundle, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(8)
    torch.manual_seed(123)
    # euler_a draws fresh noise at every step: the global RNG would move if it were used
    generate_samples(bundle, [request()], 0, CPU, tmp_path, 1, scheduler_name="euler_a")
    assert torch.equal(torch.rand(8), expected)


def test_modes_and_requires_grad_are_restored(bundle: ModelBundle, tmp_path: Path) -> None:
    modules = [bundle.unet, bundle.text_encoder, bundle.vae]
    bundle.unet.train()
    bundle.text_encoder.train()
    bundle.text_encoder.get_input_embeddings().eval()  # a mix of modes inside one model
    bundle.vae.eval()
    bundle.vae.requires_grad_(False)
    frozen = next(bundle.text_encoder.parameters())
    frozen.requires_grad_(False)
    modes = [[m.training for m in module.modules()] for module in modules]
    grads = [[p.requires_grad for p in module.parameters()] for module in modules]
    seen: list[bool] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(mod.training)) for m in modules]
    try:
        generate_samples(bundle, [request()], 0, CPU, tmp_path, 1)
        assert seen and not any(seen)  # every forward pass ran in eval mode
        assert [[m.training for m in module.modules()] for module in modules] == modes
        assert [[p.requires_grad for p in module.parameters()] for module in modules] == grads
    finally:
        for hook in hooks:
            hook.remove()
        bundle.vae.requires_grad_(True)
        frozen.requires_grad_(True)


def test_clip_skip_changes_the_image(bundle: ModelBundle, tmp_path: Path) -> None:
    last = generate_samples(bundle, [request()], 0, CPU, tmp_path / "0", 1)
    penultimate = generate_samples(bundle, [request()], 2, CPU, tmp_path / "2", 1)
    assert not np.array_equal(pixels(last[0]), pixels(penultimate[0]))
    assert "clip_skip: 2" in penultimate[0].with_suffix(".txt").read_text(encoding="utf-8")


def test_random_caption_and_random_seed(bundle: ModelBundle, tmp_path: Path) -> None:
    requests = [request(caption_index=1, seed=-1), request(caption_index=1, seed=-1)]
    paths = generate_samples(bundle, requests, 0, CPU, tmp_path, 1, captions=["ted", "a dog"])
    texts = [p.with_suffix(".txt").read_text(encoding="utf-8").splitlines() for p in paths]
    assert [t[0] for t in texts] == ["a dog", "a dog"]
    seeds = [t[2] for t in texts]
    assert all(s.startswith("seed: ") and s != "seed: -1" for s in seeds)
    assert seeds[0] != seeds[1]


USABLE_SCHEDULERS = [name for name in SCHEDULERS if scheduler_problem(name) is None]


@pytest.mark.parametrize("name", USABLE_SCHEDULERS)
def test_every_usable_scheduler_makes_an_image(
    bundle: ModelBundle, tmp_path: Path, name: str
) -> None:
    paths = generate_samples(bundle, [request()], 0, CPU, tmp_path, 1, scheduler_name=name)
    image = pixels(paths[0])
    assert image.shape == (64, 64, 3)
    assert image.std() > 0


def test_no_requests_make_nothing(bundle: ModelBundle, tmp_path: Path) -> None:
    assert generate_samples(bundle, [], 0, CPU, tmp_path / "none", 1) == []
    assert not (tmp_path / "none").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_samples_under_autocast_leave_the_cuda_rng_alone(tmp_path: Path) -> None:
    cuda = torch.device("cuda")
    model = load_models("tiny-sd15")
    for module in (model.unet, model.text_encoder, model.vae):
        module.to(cuda)
    torch.cuda.manual_seed(7)
    expected = torch.rand(8, device=cuda)
    torch.cuda.manual_seed(7)
    paths = generate_samples(model, [request()], 0, cuda, tmp_path, 1, scheduler_name="euler_a")
    assert torch.equal(torch.rand(8, device=cuda), expected)
    image = pixels(paths[0])
    assert image.shape == (64, 64, 3)
    assert image.std() > 0
