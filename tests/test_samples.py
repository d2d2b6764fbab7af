"""Sample images: making them with the live model (reading the file: test_sample_prompts.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from models import ModelBundle, load_models
from training.samples import (
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    ImageSink,
    SampleBatch,
    SampleRequest,
    SamplingModel,
    generate_samples,
    make_inference_scheduler,
    scheduler_problem,
)

CPU = torch.device("cpu")
STEPS = 2  # inference steps: enough to exercise a scheduler, fast on the tiny model


def request(prompt: str = "a photo of ted", **kwargs: object) -> SampleRequest:
    settings = {"seed": 1, "width": 64, "height": 64, "num_inference_steps": STEPS, **kwargs}
    return SampleRequest(prompt=prompt, **settings)


def draw(
    bundle: ModelBundle,
    requests: list[SampleRequest],
    clip_skip: int,
    device: torch.device,
    out_dir: Path,
    step: int,
    on_image: ImageSink | None = None,
    noise_scheduler_config: Any = None,
    **batch: Any,
) -> list[Path]:
    """generate_samples with a model and a batch made from these arguments."""
    model = SamplingModel(bundle, device, clip_skip, noise_scheduler_config)
    return generate_samples(model, SampleBatch(requests, out_dir, step, **batch), on_image)


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

    def sink(tag: str, image: np.ndarray, step: int) -> None:
        writer.add_image(tag, image, step, dataformats="HWC")

    paths = draw(bundle, requests, 0, CPU, tmp_path / "samples", 7, sink)
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
    first = draw(bundle, [request()], 0, CPU, tmp_path, 1)
    torch.rand(5)  # training goes on between samples
    second = draw(bundle, [request()], 0, CPU, tmp_path, 2)
    assert np.array_equal(pixels(first[0]), pixels(second[0]))


def test_global_rng_is_untouched(bundle: ModelBundle, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(8)
    torch.manual_seed(123)
    # euler_a draws fresh noise at every step: the global RNG would move if it were used
    draw(bundle, [request()], 0, CPU, tmp_path, 1, scheduler_name="euler_a")
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
        draw(bundle, [request()], 0, CPU, tmp_path, 1)
        assert seen and not any(seen)  # every forward pass ran in eval mode
        assert [[m.training for m in module.modules()] for module in modules] == modes
        assert [[p.requires_grad for p in module.parameters()] for module in modules] == grads
    finally:
        for hook in hooks:
            hook.remove()
        bundle.vae.requires_grad_(True)
        frozen.requires_grad_(True)


def test_clip_skip_changes_the_image(bundle: ModelBundle, tmp_path: Path) -> None:
    last = draw(bundle, [request()], 0, CPU, tmp_path / "0", 1)
    penultimate = draw(bundle, [request()], 2, CPU, tmp_path / "2", 1)
    assert not np.array_equal(pixels(last[0]), pixels(penultimate[0]))
    assert "clip_skip: 2" in penultimate[0].with_suffix(".txt").read_text(encoding="utf-8")


def test_random_caption_and_random_seed(bundle: ModelBundle, tmp_path: Path) -> None:
    requests = [request(caption_index=1, seed=-1), request(caption_index=1, seed=-1)]
    paths = draw(bundle, requests, 0, CPU, tmp_path, 1, captions=["ted", "a dog"])
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
    paths = draw(bundle, [request()], 0, CPU, tmp_path, 1, scheduler_name=name)
    image = pixels(paths[0])
    assert image.shape == (64, 64, 3)
    assert image.std() > 0


def test_the_training_noise_scheduler_config_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caller passes the scheduler that trained (zero terminal SNR): the bundle's own, as
    # loaded, would sample with leading timesteps and no guidance rescale. (Zero terminal SNR
    # needs v-prediction: an epsilon model cannot denoise from pure noise.)
    bundle = load_models("tiny-sd21")
    ztsnr = DDPMScheduler.from_config(bundle.noise_scheduler.config, rescale_betas_zero_snr=True)
    seen: list[str] = []
    original = DDPMScheduler.set_timesteps

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(self.config.timestep_spacing)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DDPMScheduler, "set_timesteps", spy)
    plain = draw(bundle, [request()], 0, CPU, tmp_path / "a", 1, scheduler_name="ddpm")
    rescaled = draw(
        bundle,
        [request()],
        0,
        CPU,
        tmp_path / "b",
        1,
        scheduler_name="ddpm",
        noise_scheduler_config=ztsnr.config,
    )
    assert seen == ["leading", "trailing"]
    assert "guidance_rescale: 0" in plain[0].with_suffix(".txt").read_text(encoding="utf-8")
    described = rescaled[0].with_suffix(".txt").read_text(encoding="utf-8")
    assert "guidance_rescale: 0.7" in described
    assert not np.array_equal(pixels(plain[0]), pixels(rescaled[0]))


def test_no_requests_make_nothing(bundle: ModelBundle, tmp_path: Path) -> None:
    assert draw(bundle, [], 0, CPU, tmp_path / "none", 1) == []
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
    paths = draw(model, [request()], 0, cuda, tmp_path, 1, scheduler_name="euler_a")
    assert torch.equal(torch.rand(8, device=cuda), expected)
    image = pixels(paths[0])
    assert image.shape == (64, 64, 3)
    assert image.std() > 0
