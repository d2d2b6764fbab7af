"""The maths of a training step: noise schedule, timesteps, noise, targets, SNR, losses."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import DDPMScheduler

from config.live import StepSettings
from models.builtin import BUILTIN_CONFIGS
from training.loss import (
    LOSS_TYPES,
    debiased_weights,
    mean_loss,
    min_snr_weights,
    per_sample_loss,
    perturb_embeddings,
    snr,
)
from training.noise import (
    PYRAMID_MAX_LEVELS,
    make_noise_scheduler,
    pyramid_noise,
    sample_noise,
    sample_timesteps,
    timestep_range,
    training_target,
)
from training.step import LatentDistribution, Shard, noise_latents


def _scheduler(model: str = "tiny-sd15", **overrides: object) -> DDPMScheduler:
    return DDPMScheduler(**{**BUILTIN_CONFIGS[model]["scheduler"], **overrides})


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def eps() -> DDPMScheduler:
    return _scheduler("tiny-sd15")


@pytest.fixture
def vpred() -> DDPMScheduler:
    return _scheduler("tiny-sd21")


# --- the noise scheduler ------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sd21"])
def test_zero_terminal_snr_scheduler(model: str) -> None:
    original = _scheduler(model)
    plain = make_noise_scheduler(original, enable_zero_terminal_snr=False)
    ztsnr = make_noise_scheduler(original, enable_zero_terminal_snr=True)
    assert plain is not original and ztsnr is not original
    assert ztsnr.alphas_cumprod[-1].item() == 0.0
    assert plain.alphas_cumprod[-1].item() > 1e-3
    assert torch.equal(plain.alphas_cumprod, original.alphas_cumprod)
    assert not original.config.rescale_betas_zero_snr  # the model's scheduler is left alone
    expected = BUILTIN_CONFIGS[model]["scheduler"]["prediction_type"]
    assert ztsnr.config.prediction_type == plain.config.prediction_type == expected
    # Lin et al.: the rescaled schedule keeps the first timestep's SNR (sqrt(alphas_cumprod[0])).
    torch.testing.assert_close(ztsnr.alphas_cumprod[0], original.alphas_cumprod[0])


def test_model_that_already_has_zero_terminal_snr_keeps_it() -> None:
    model_sched = _scheduler("tiny-sd21", rescale_betas_zero_snr=True)
    assert make_noise_scheduler(model_sched, False).alphas_cumprod[-1].item() == 0.0


def test_unsupported_prediction_type_is_refused() -> None:
    with pytest.raises(ValueError, match="sample"):
        make_noise_scheduler(_scheduler(prediction_type="sample"), False)


# --- timesteps ----------------------------------------------------------------------------------


def test_timesteps_reproducible_and_in_range() -> None:
    a = sample_timesteps(4096, 200, 300, _gen(1), "cpu")
    b = sample_timesteps(4096, 200, 300, _gen(1), "cpu")
    c = sample_timesteps(4096, 200, 300, _gen(2), "cpu")
    assert a.dtype == torch.long and a.shape == (4096,)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min().item() == 200 and a.max().item() == 299  # both ends reached, end excluded


def test_timesteps_clipped_to_schedule() -> None:
    t = sample_timesteps(4096, -5, 5000, _gen(), "cpu", num_train_timesteps=1000)
    assert t.min().item() == 0 and t.max().item() == 999
    assert timestep_range(990, 5000, 1000) == (990, 1000)
    assert timestep_range(3, 7) == (3, 7)
    with pytest.raises(ValueError, match="empty timestep range"):
        timestep_range(1000, 1200, 1000)
    with pytest.raises(ValueError, match="empty timestep range"):
        timestep_range(5, 5)


def test_timesteps_do_not_use_global_rng() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    sample_timesteps(8, 0, 1000, _gen(), "cpu")
    sample_noise(torch.zeros(2, 4, 8, 8), _gen(), 0.1, 0.8)
    perturb_embeddings(torch.zeros(2, 3, 8), 0.5, _gen())
    assert torch.equal(before, torch.get_rng_state())


# --- noise --------------------------------------------------------------------------------------


def test_plain_noise_matches_generator_and_is_reproducible() -> None:
    latents = torch.zeros(2, 4, 8, 8)
    noise = sample_noise(latents, _gen(3), 0.0, None)
    assert torch.equal(noise, torch.randn(2, 4, 8, 8, generator=_gen(3)))
    assert torch.equal(noise, sample_noise(latents, _gen(3), 0.0, 0.0))  # discount 0 = plain
    assert not torch.equal(noise, sample_noise(latents, _gen(4), 0.0, None))


def test_offset_noise_formula() -> None:
    latents = torch.zeros(3, 4, 8, 8)
    ratio = 0.25
    noise = sample_noise(latents, _gen(5), ratio, None)
    g = _gen(5)
    base = torch.randn(3, 4, 8, 8, generator=g)
    offset = torch.randn(3, 4, 1, 1, generator=g)
    torch.testing.assert_close(noise, base + ratio * offset)


def test_offset_noise_raises_the_spread_of_channel_means() -> None:
    latents = torch.zeros(256, 4, 16, 16)
    plain = sample_noise(latents, _gen(6), 0.0, None).mean(dim=(2, 3))
    offset = sample_noise(latents, _gen(6), 0.5, None).mean(dim=(2, 3))
    # per-(image, channel) means: std 1/16 without offset, about sqrt(1/256 + 0.25) with it
    assert plain.std().item() < 0.08
    assert 0.4 < offset.std().item() < 0.6


def test_noise_follows_latents_dtype_and_shape() -> None:
    latents = torch.zeros(2, 4, 8, 12, dtype=torch.bfloat16)
    noise = sample_noise(latents, _gen(), 0.1, 0.8)
    assert noise.shape == latents.shape and noise.dtype == torch.bfloat16


def test_pyramid_noise_shape_scale_and_reproducibility() -> None:
    shape = (4, 4, 32, 48)
    a = pyramid_noise(shape, 0.8, _gen(7))
    assert a.shape == shape and a.dtype == torch.float32
    per_sample_std = a.std(dim=(1, 2, 3))
    torch.testing.assert_close(per_sample_std, torch.ones(4))
    assert torch.equal(a, pyramid_noise(shape, 0.8, _gen(7)))
    assert not torch.equal(a, pyramid_noise(shape, 0.8, _gen(8)))
    assert torch.equal(a, sample_noise(torch.zeros(shape), _gen(7), 0.0, 0.8))


def test_pyramid_noise_is_low_frequency_heavy() -> None:
    shape = (64, 4, 32, 32)
    plain = torch.randn(shape, generator=_gen(9))
    pyramid = pyramid_noise(shape, 0.9, _gen(9))

    def neighbour_correlation(x: torch.Tensor) -> float:
        return F.cosine_similarity(x[..., :, 1:].flatten(), x[..., :, :-1].flatten(), dim=0).item()

    assert abs(neighbour_correlation(plain)) < 0.02
    assert neighbour_correlation(pyramid) > 0.2
    # and the per-channel means (the lowest frequency) vary far more than plain noise's 1/32
    assert pyramid.mean(dim=(2, 3)).std().item() > 0.15


def test_pyramid_noise_formula_by_hand() -> None:
    """Rebuild the documented formula step by step from the same generator."""
    b, c, h, w = 2, 3, 16, 16
    discount = 0.5
    g = _gen(11)
    expected = torch.randn(b, c, h, w, generator=g)
    rs = 2.0 + 2.0 * torch.rand(PYRAMID_MAX_LEVELS - 1, generator=g)
    expected += torch.randn(b, c, h, w, generator=g)  # level 0: a second full-resolution draw
    for level in range(1, PYRAMID_MAX_LEVELS):
        r = float(rs[level - 1])
        hi, wi = max(1, int(h / r**level)), max(1, int(w / r**level))
        coarse = torch.randn(b, c, hi, wi, generator=g)
        expected += F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**level
        if hi == 1 or wi == 1:
            break
    expected /= expected.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(pyramid_noise((b, c, h, w), discount, _gen(11)), expected)


def test_bad_noise_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="zero_frequency_noise_ratio"):
        sample_noise(torch.zeros(1, 4, 8, 8), _gen(), -0.1, None)
    with pytest.raises(ValueError, match="pyramid_noise_discount"):
        sample_noise(torch.zeros(1, 4, 8, 8), _gen(), 0.0, -0.5)


# --- targets ------------------------------------------------------------------------------------


def test_training_target(eps: DDPMScheduler, vpred: DDPMScheduler) -> None:
    latents = torch.randn(3, 4, 8, 8, generator=_gen(12))
    noise = torch.randn(3, 4, 8, 8, generator=_gen(13))
    t = torch.tensor([0, 500, 999])
    assert training_target(eps, latents, noise, t) is noise
    v = training_target(vpred, latents, noise, t)
    assert torch.equal(v, vpred.get_velocity(latents, noise, t))
    ac = vpred.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, ac.sqrt() * noise - (1 - ac).sqrt() * latents)
    assert not torch.allclose(v, noise)
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(_scheduler(prediction_type="sample"), latents, noise, t)


# --- SNR and Min-SNR ----------------------------------------------------------------------------


def test_snr_by_hand(eps: DDPMScheduler) -> None:
    t = torch.tensor([0, 10, 500, 999])
    ac = eps.alphas_cumprod[t]
    s = snr(eps, t)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, ac / (1 - ac))
    assert bool((s[:-1] > s[1:]).all())  # SNR falls as t rises


def test_min_snr_weights_epsilon_vs_v() -> None:
    gamma = 5.0
    t = torch.tensor([0, 100, 400, 700, 999])
    eps = _scheduler("tiny-sd15")
    vpred = _scheduler("tiny-sd21")
    s = snr(eps, t)
    assert s[0] > gamma > s[-1]  # the chosen timesteps hit both sides of gamma
    w_eps = min_snr_weights(eps, t, gamma)
    w_v = min_snr_weights(vpred, t, gamma)
    torch.testing.assert_close(w_eps, torch.minimum(s, torch.tensor(gamma)) / s)
    torch.testing.assert_close(w_v, torch.minimum(s, torch.tensor(gamma)) / (s + 1))
    # by hand at t=0 (snr above gamma) and t=999 (below)
    s0, s999 = s[0].item(), s[-1].item()
    assert w_eps[0].item() == pytest.approx(gamma / s0)
    assert w_eps[-1].item() == pytest.approx(1.0)
    assert w_v[0].item() == pytest.approx(gamma / (s0 + 1))
    assert w_v[-1].item() == pytest.approx(s999 / (s999 + 1))
    # EveryDream2 used the epsilon formula for v-prediction: it must not here
    assert not torch.allclose(w_v, w_eps)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sd21"])
def test_min_snr_weights_finite_at_zero_terminal_snr(model: str) -> None:
    sched = make_noise_scheduler(_scheduler(model), enable_zero_terminal_snr=True)
    t = torch.tensor([0, 500, 998, 999])
    assert snr(sched, t)[-1].item() == 0.0
    w = min_snr_weights(sched, t, 5.0)
    assert bool(torch.isfinite(w).all())
    expected_last = 1.0 if sched.config.prediction_type == "epsilon" else 0.0
    assert w[-1].item() == expected_last
    assert w[-2].item() > 0.0


def test_min_snr_gamma_must_be_positive(eps: DDPMScheduler) -> None:
    with pytest.raises(ValueError, match="min_snr_gamma"):
        min_snr_weights(eps, torch.tensor([1]), 0.0)


# --- loss ---------------------------------------------------------------------------------------


def _pair(scale: float, seed: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(4, 4, 8, 8, generator=g) * scale, torch.randn(4, 4, 8, 8, generator=g)


def test_mse_loss_by_hand(eps: DDPMScheduler) -> None:
    pred, target = _pair(1.0)
    t = torch.tensor([1, 200, 600, 999])
    loss = mean_loss(pred, target, t, eps, "mse", None)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())


def test_huber_is_half_mse_for_small_residuals(eps: DDPMScheduler) -> None:
    target = torch.randn(4, 4, 8, 8, generator=_gen(15))
    pred = target + 0.1 * torch.randn(4, 4, 8, 8, generator=_gen(16)).clamp(-5, 5)  # |r| <= 0.5
    t = torch.tensor([1, 200, 600, 999])
    mse = mean_loss(pred, target, t, eps, "mse", None)
    huber = mean_loss(pred, target, t, eps, "huber", None)
    torch.testing.assert_close(huber, mse / 2)


def test_huber_is_linear_for_large_residuals(eps: DDPMScheduler) -> None:
    target = torch.zeros(2, 4, 8, 8)
    pred = torch.full((2, 4, 8, 8), 10.0)
    t = torch.tensor([1, 2])
    assert mean_loss(pred, target, t, eps, "huber", None).item() == pytest.approx(9.5)
    assert mean_loss(pred, target, t, eps, "huber", None, huber_delta=2.0).item() == (
        pytest.approx(2.0 * (10.0 - 1.0))
    )
    assert mean_loss(pred, target, t, eps, "mse", None).item() == pytest.approx(100.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_mean_loss_is_the_mean_of_the_per_sample_losses(eps: DDPMScheduler, loss_type: str) -> None:
    """One reduction when every sample weighs the same; the per-sample path otherwise."""
    pred, target = _pair(3.0)
    t = torch.tensor([0, 250, 500, 999])
    args = (pred, target, t, eps, loss_type)
    plain = per_sample_loss(*args, None)
    torch.testing.assert_close(mean_loss(*args, None), plain.mean())
    torch.testing.assert_close(mean_loss(*args, None, sample_scales=(1.0,) * 4), plain.mean())
    scales = (1.0, 2.0, 0.5, 1.0)
    torch.testing.assert_close(
        mean_loss(*args, None, sample_scales=scales), (plain * torch.tensor(scales)).mean()
    )
    for kwargs in ({"debiased": True}, {"weights": torch.rand(4, 1, 8, 8, generator=_gen(3))}):
        torch.testing.assert_close(
            mean_loss(*args, None, **kwargs), per_sample_loss(*args, None, **kwargs).mean()
        )
        assert not torch.allclose(mean_loss(*args, None, **kwargs), plain.mean())
    snr_weighted = per_sample_loss(*args, 5.0)
    torch.testing.assert_close(mean_loss(*args, 5.0), snr_weighted.mean())
    assert not torch.allclose(snr_weighted.mean(), plain.mean())


def test_mse_huber_blend(eps: DDPMScheduler) -> None:
    pred, target = _pair(3.0)  # residuals on both sides of delta
    t = torch.tensor([0, 250, 500, 999])
    args = (pred, target, t, eps)
    mse = per_sample_loss(*args, "mse", None)
    huber = per_sample_loss(*args, "huber", None)
    blend = per_sample_loss(*args, "mse_huber", None)
    f = t.float() / 1000
    torch.testing.assert_close(blend, f * mse + (1 - f) * huber)
    torch.testing.assert_close(blend[0], huber[0])  # t = 0: all Huber
    assert blend[-1].item() == pytest.approx(0.999 * mse[-1].item() + 0.001 * huber[-1].item())
    assert not torch.allclose(mse, huber)
    torch.testing.assert_close(mean_loss(*args, "mse_huber", None), blend.mean())


def test_huber_mse_is_everydream2s_reverse_blend(eps: DDPMScheduler) -> None:
    pred, target = _pair(3.0)
    t = torch.tensor([0, 250, 500, 999])
    args = (pred, target, t, eps)
    mse = per_sample_loss(*args, "mse", None)
    huber = per_sample_loss(*args, "huber", None)
    blend = per_sample_loss(*args, "huber_mse", None)
    f = t.float() / 1000
    torch.testing.assert_close(blend, f * huber + (1 - f) * mse)
    torch.testing.assert_close(blend[0], mse[0])  # t = 0: all MSE
    # EveryDream2: (huber * f).mean() + (mse * (1 - f)).mean() over the batch
    everydream2 = (huber * f).mean() + (mse * (1 - f)).mean()
    torch.testing.assert_close(mean_loss(*args, "huber_mse", None), everydream2)


def test_min_snr_weighting_in_loss(eps: DDPMScheduler, vpred: DDPMScheduler) -> None:
    pred, target = _pair(1.0)
    t = torch.tensor([0, 100, 500, 999])
    for sched in (eps, vpred):
        plain = per_sample_loss(pred, target, t, sched, "mse", None)
        weighted = mean_loss(pred, target, t, sched, "mse", 5.0)
        torch.testing.assert_close(weighted, (plain * min_snr_weights(sched, t, 5.0)).mean())
        assert not torch.allclose(weighted, plain.mean())


def test_loss_is_float32_for_bf16_inputs(eps: DDPMScheduler) -> None:
    pred, target = _pair(1.0)
    t = torch.tensor([10, 300, 600, 900])
    for loss_type in LOSS_TYPES:
        loss = mean_loss(pred.bfloat16(), target.bfloat16(), t, eps, loss_type, 5.0)
        assert loss.dtype == torch.float32
        exact = mean_loss(
            pred.bfloat16().float(), target.bfloat16().float(), t, eps, loss_type, 5.0
        )
        assert loss.item() == exact.item()  # the arithmetic itself was float32


def test_loss_gradient_flows(eps: DDPMScheduler) -> None:
    pred, target = _pair(1.0)
    pred.requires_grad_(True)
    mean_loss(pred, target, torch.tensor([1, 2, 3, 4]), eps, "mse_huber", 5.0).backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0


def test_unknown_loss_type(eps: DDPMScheduler) -> None:
    pred, target = _pair(1.0)
    with pytest.raises(ValueError, match="mse_huber"):
        mean_loss(pred, target, torch.tensor([1, 2, 3, 4]), eps, "l1", None)


# --- embedding perturbation ---------------------------------------------------------------------


def test_perturb_embeddings_formula_and_reproducibility() -> None:
    emb = torch.randn(2, 77, 768, generator=_gen(20))
    out = perturb_embeddings(emb, 0.5, _gen(21))
    expected = emb + torch.randn(2, 77, 768, generator=_gen(21)) * 0.5 / math.sqrt(768)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out, perturb_embeddings(emb, 0.5, _gen(21)))
    assert not torch.equal(out, perturb_embeddings(emb, 0.5, _gen(22)))
    # the perturbation of one token vector has a norm of about `strength`
    norms = (out - emb).norm(dim=-1)
    assert norms.mean().item() == pytest.approx(0.5, rel=0.05)


def test_perturb_embeddings_zero_strength_is_identity() -> None:
    emb = torch.randn(1, 4, 8)
    g = _gen(23)
    state = g.get_state()
    assert perturb_embeddings(emb, 0.0, g) is emb
    assert torch.equal(g.get_state(), state)  # nothing drawn
    with pytest.raises(ValueError, match="embedding_perturbation"):
        perturb_embeddings(emb, -1.0, g)


def test_perturb_embeddings_keeps_dtype_and_gradient() -> None:
    emb = torch.randn(1, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    out = perturb_embeddings(emb, 1.0, _gen())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert emb.grad is not None and torch.equal(emb.grad, torch.ones_like(emb.grad))


# --- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_draws_on_the_gpu(vpred: DDPMScheduler) -> None:
    device = torch.device("cuda")
    latents = torch.randn(2, 4, 16, 16, device=device, dtype=torch.bfloat16)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    noise = sample_noise(latents, gen, 0.1, 0.8)
    t = sample_timesteps(2, 0, 1000, gen, device, num_train_timesteps=1000)
    emb = perturb_embeddings(torch.zeros(2, 77, 1024, device=device), 0.5, gen)
    gen.manual_seed(0)
    assert torch.equal(noise, sample_noise(latents, gen, 0.1, 0.8))
    assert noise.device.type == t.device.type == emb.device.type == "cuda"
    loss = mean_loss(noise, latents, t, vpred, "mse_huber", 5.0)
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))


def test_caption_tokenizer_cache_matches_the_tokenizer_and_stays_bounded():
    from models import load_models, tokenize
    from training.step import CaptionTokenizer

    tokenizer = load_models("tiny-sd15").tokenizer
    tokens = CaptionTokenizer(tokenizer, capacity=3)
    captions = ["a red circle", "", "a blue square, stripes", "a red circle"]
    assert torch.equal(tokens(captions), tokenize(tokenizer, captions))
    assert torch.equal(
        tokens(["x", "y", "z", "a red circle"]),
        tokenize(tokenizer, ["x", "y", "z", "a red circle"]),
    )
    assert len(tokens._ids) == 3


# --- debiased estimation and input perturbation --------------------------------------------


def test_debiased_weights_by_hand(eps: DDPMScheduler, vpred: DDPMScheduler) -> None:
    """kohya's weights: 1/sqrt(snr) (epsilon), 1/(snr+1) (v-prediction), snr capped at 1000."""
    t = torch.tensor([0, 10, 500, 999])
    for sched in (eps, vpred):
        ac = sched.alphas_cumprod[t].double()
        s = (ac / (1 - ac)).clamp(max=1000.0)
        expected = 1 / (s + 1) if sched is vpred else 1 / s.sqrt()
        torch.testing.assert_close(debiased_weights(sched, t).double(), expected, rtol=1e-5, atol=0)
    # at t=999 SNR is ~0.005: epsilon's weight is ~14, v-prediction's ~1
    assert debiased_weights(eps, t)[-1].item() > 10
    assert debiased_weights(vpred, t)[-1].item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sd21"])
def test_debiased_weights_finite_at_zero_terminal_snr(model: str) -> None:
    sched = make_noise_scheduler(_scheduler(model), enable_zero_terminal_snr=True)
    t = torch.tensor([0, 998, 999])
    w = debiased_weights(sched, t)
    assert bool(torch.isfinite(w).all())
    if sched.config.prediction_type == "epsilon":  # the smallest positive SNR stands in for 0
        assert w[-1].item() == pytest.approx(w[-2].item())
    else:
        assert w[-1].item() == 1.0


def test_debiased_estimation_weights_each_samples_loss(eps: DDPMScheduler) -> None:
    pred, target = torch.randn(3, 4, 8, 8, generator=_gen(1)), torch.zeros(3, 4, 8, 8)
    t = torch.tensor([5, 300, 900])
    plain = per_sample_loss(pred, target, t, eps, "mse", None)
    weighted = per_sample_loss(pred, target, t, eps, "mse", None, debiased=True)
    torch.testing.assert_close(weighted, plain * debiased_weights(eps, t))


def test_input_perturbation_noises_the_input_and_keeps_the_target(eps: DDPMScheduler) -> None:
    """With p > 0 the latents are noised with noise + p * extra (extra: the next draw of the
    step's generator), and the target is the plain noise's."""
    mean = torch.randn(2, 4, 8, 8, generator=_gen(3))
    dist = LatentDistribution(mean, torch.full_like(mean, 0.1))
    base = StepSettings(
        zero_frequency_noise_ratio=0.0,
        pyramid_noise_discount=None,
        timestep_start=0,
        timestep_end=1000,
        loss_type="mse",
        min_snr_gamma=None,
        debiased_estimation=False,
        input_perturbation=0.0,
        unmasked_weight=0.0,
        normalize_masked_area_loss=False,
        embedding_perturbation=0.0,
    )
    perturbed = dataclasses.replace(base, input_perturbation=0.1)
    g0, g1 = _gen(7), _gen(7)
    plain = noise_latents(eps, dist, base, g0, Shard())
    extra = torch.randn(mean.shape, generator=g0)  # what the perturbed step draws next
    noised = noise_latents(eps, dist, perturbed, g1, Shard())
    assert torch.equal(noised.timesteps, plain.timesteps)
    assert torch.equal(noised.target, plain.target)
    sigma = (1 - eps.alphas_cumprod[plain.timesteps]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(noised.latents, plain.latents + sigma * 0.1 * extra)
