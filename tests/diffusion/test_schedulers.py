"""kexue.diffusion.schedulers: Analytic-DPM as a diffusers scheduler, diffusers schedules in kexue.

The one-step check reproduces kexue's sampler jump by jump: ``sample`` draws one
``torch.randn(shape, generator=g)`` per jump in order (with a per-step variance tensor, also at
the last jump), so the same noise passed as ``variance_noise`` must give the same ``x_s``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from kexue.diffusion import (  # noqa: E402
    DiffusionMoments,
    NoiseSchedule,
    estimate_moments,
    from_diffusers,
    optimal_variance,
    sample,
)
from kexue.diffusion.schedulers import (  # noqa: E402
    AnalyticDPMScheduler,
    noise_schedule_from_diffusers,
)
from kexue.testing.diffusion import tiny_diffusers_unet  # noqa: E402

T = 40
SHAPE = (3, 1, 8, 8)


@pytest.fixture(scope="module")
def setup():
    unet = tiny_diffusers_unet()
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.05)
    schedule = noise_schedule_from_diffusers(ddpm)
    data = torch.rand((12, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * 2 - 1
    gen = torch.Generator().manual_seed(2)
    moments = estimate_moments(
        from_diffusers(unet), schedule, data, num_images=12, generator=gen, progress=False
    )
    return unet, ddpm, schedule, moments


def test_schedule_from_diffusers_matches_alphas_cumprod(setup) -> None:
    _, ddpm, schedule, _ = setup
    # diffusers' timestep k is our t = k + 1: abar_{k+1}^2 = alphas_cumprod[k]
    torch.testing.assert_close(schedule.abar[1:] ** 2, ddpm.alphas_cumprod.double(), rtol=1e-6,
                               atol=0)  # fmt: skip
    from_config = noise_schedule_from_diffusers(dict(ddpm.config))
    assert torch.equal(from_config.abar, schedule.abar)
    assert torch.equal(NoiseSchedule.from_diffusers(ddpm).abar, schedule.abar)  # the classmethod
    cosine = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(noise_schedule_from_diffusers(cosine).abar[1:] ** 2,
                               cosine.alphas_cumprod.double(), rtol=1e-6, atol=0)  # fmt: skip
    # the paper's linear betas in float64 (kexue) vs float32 (diffusers): same to float32
    ours = NoiseSchedule.ddpm_linear(T, 1e-3, 0.05)
    torch.testing.assert_close(schedule.abar, ours.abar, rtol=1e-6, atol=0)


def test_schedule_from_diffusers_refuses_what_kexue_cannot_run() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        noise_schedule_from_diffusers(
            {"num_train_timesteps": 10, "prediction_type": "v_prediction"}
        )
    with pytest.raises(ValueError, match="num_train_timesteps"):
        noise_schedule_from_diffusers({"beta_start": 0.1})
    with pytest.raises(TypeError, match="scheduler_or_config"):
        noise_schedule_from_diffusers("ddpm")
    zero_snr = diffusers.DDPMScheduler(num_train_timesteps=10, rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="betas outside"):
        noise_schedule_from_diffusers(zero_snr)


@pytest.mark.parametrize("eta", [1.0, 0.0])
@pytest.mark.parametrize("kind", ["analytic", "analytic-diag"])
def test_each_step_equals_the_sampler_jump(setup, eta: float, kind: str) -> None:
    unet, _, schedule, moments = setup
    eps_model = from_diffusers(unet)
    K = 6
    kept = schedule.trajectory(K)
    variance = optimal_variance(moments, schedule, kept, kind=kind, eta=eta)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    _, path = sample(eps_model, schedule, SHAPE, steps=kept, eta=eta, variance=variance, x_T=x_T,
                     generator=torch.Generator().manual_seed(6), return_trajectory=True,
                     progress=False)  # fmt: skip
    gen = torch.Generator().manual_seed(6)
    noises = [torch.randn(SHAPE, generator=gen) for _ in range(K)]  # the sampler's order
    scheduler = AnalyticDPMScheduler.from_moments(moments, eta=eta, kind=kind)
    scheduler.set_timesteps(K)
    assert scheduler.timesteps.tolist() == [t - 1 for t in reversed(kept)]
    with torch.no_grad():
        for j, k in enumerate(scheduler.timesteps):
            x = path[j]
            out = scheduler.step(unet(x, k).sample, k, x, variance_noise=noises[j])
            torch.testing.assert_close(out.prev_sample, path[j + 1], rtol=1e-5, atol=1e-5)
            t = int(k) + 1
            a, b = float(schedule.abar[t]), float(schedule.bbar[t])
            x0 = (x.double() - b * unet(x, k).sample.double()) / a
            torch.testing.assert_close(out.pred_original_sample.double(), x0, rtol=1e-5,
                                       atol=1e-5)  # fmt: skip


def test_one_step_against_the_formula_in_float64(setup) -> None:
    """Independent of the sampler: the jump written from the guide's formula in float64."""
    unet, _, schedule, moments = setup
    scheduler = AnalyticDPMScheduler.from_moments(moments, eta=0.5, kind="analytic-gamma")
    scheduler.set_timesteps(5)
    i = 3  # the jump from steps[3] to steps[2]
    t, s = scheduler.steps[i], scheduler.steps[i - 1]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eps = unet(x, t - 1).sample
    out = scheduler.step(eps, t - 1, x, variance_noise=z).prev_sample
    alpha2 = schedule.abar.double() ** 2  # paper's alpha-bar
    at, as_ = alpha2[t], alpha2[s]
    x64, e64 = x.double(), eps.double()
    x0 = (x64 - (1 - at).sqrt() * e64) / at.sqrt()
    sigma2 = 0.25 * (1 - as_) / (1 - at) * (1 - at / as_)
    c = (1 - as_ - sigma2).sqrt()
    gamma = as_.sqrt() - at.sqrt() * c / (1 - at).sqrt()
    G = float(moments.Gamma[t - 1])
    sbar2 = min(max((1 - at) / at * (1 - G), 0.0), 1.0)  # clipped to [0, min(ratio, 1)]
    sbar2 = min(sbar2, float((1 - at) / at))
    var = sigma2 + gamma**2 * sbar2
    expected = as_.sqrt() * x0 + c * e64 + var.sqrt() * z.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_ddpm_pipeline_runs_and_equals_kexue_sample(setup) -> None:
    unet, _, schedule, moments = setup
    scheduler = AnalyticDPMScheduler.from_moments(moments, eta=1.0)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(3),
               output_type="np").images  # fmt: skip
    assert out.shape == (2, 8, 8, 1) and ((out >= 0) & (out <= 1)).all()
    variance = optimal_variance(moments, schedule, 8, eta=1.0)
    gen = torch.Generator().manual_seed(3)
    ours = sample(from_diffusers(unet), schedule, (2, 1, 8, 8), steps=8, eta=1.0,
                  variance=variance, generator=gen, progress=False)  # fmt: skip
    expected = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(out - expected).max() < 1e-5
    pil = pipe(batch_size=1, num_inference_steps=3).images
    assert pil[0].size == (8, 8)


def test_hand_written_loop_with_generator(setup) -> None:
    unet, _, _, moments = setup
    scheduler = AnalyticDPMScheduler.from_moments(moments, eta=0.0)
    scheduler.set_timesteps(5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen) * scheduler.init_noise_sigma
    with torch.no_grad():
        for k in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, k)
            x = scheduler.step(unet(x_in, k).sample, k, x, generator=gen).prev_sample
    assert torch.isfinite(x).all()
    ks = scheduler.timesteps.tolist()
    assert [scheduler.previous_timestep(k) for k in ks] == [*ks[1:], -1]
    # DDIMPipeline turns any scheduler into a DDIMScheduler (from its config): not a drop-in
    ddim = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    assert not isinstance(ddim.scheduler, AnalyticDPMScheduler)
    k = int(scheduler.timesteps[0])
    with pytest.raises(ValueError, match="eta"):
        scheduler.step(x, k, x, eta=1.0)


def test_add_noise_uses_zero_based_timesteps(setup) -> None:
    _, ddpm, _, moments = setup
    scheduler = AnalyticDPMScheduler.from_moments(moments)
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    k = torch.tensor([0, 17, T - 1])
    torch.testing.assert_close(scheduler.add_noise(x0, noise, k), ddpm.add_noise(x0, noise, k),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert len(scheduler) == T and scheduler.order == 1


def test_save_and_load_round_trip(setup, tmp_path: Path) -> None:
    unet, _, _, moments = setup
    scheduler = AnalyticDPMScheduler.from_moments(moments, eta=0.3, kind="analytic-mle",
                                                  spacing="quadratic")  # fmt: skip
    scheduler.save_pretrained(tmp_path / "s")
    assert (tmp_path / "s" / "scheduler_config.json").is_file()
    assert (tmp_path / "s" / "moments" / "moments.safetensors").is_file()
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path / "s")
    assert dict(loaded.config) == dict(scheduler.config)
    for name in ("Gamma", "moment", "err_diag", "abar"):
        assert torch.equal(getattr(loaded.moments, name), getattr(moments, name))
    scheduler.set_timesteps(7)
    loaded.set_timesteps(7)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)
    assert torch.equal(loaded.variances, scheduler.variances)
    # a pipeline saves and reloads it as its scheduler folder
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "pipe")
    again = AnalyticDPMScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    assert dict(again.config) == dict(scheduler.config)
    with pytest.raises(ValueError, match="moments"):
        AnalyticDPMScheduler.from_pretrained(tmp_path / "pipe" / "unet")


def test_bad_arguments_are_named(setup) -> None:
    unet, _, _, moments = setup
    with pytest.raises(TypeError, match="moments"):
        AnalyticDPMScheduler.from_moments({"Gamma": 1})
    with pytest.raises(ValueError, match="kind"):
        AnalyticDPMScheduler.from_moments(moments, kind="optimal")
    with pytest.raises(ValueError, match="schedule"):
        AnalyticDPMScheduler.from_moments(moments, NoiseSchedule.su_linear(T))
    scheduler = AnalyticDPMScheduler.from_moments(moments)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 10, x)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep 5 is not"):
        scheduler.step(x, 5, x)
    k = int(scheduler.timesteps[0])
    with pytest.raises(ValueError, match="variance_noise"):
        scheduler.step(x, k, x, variance_noise=torch.zeros(2))
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.zeros(1, 1, 4, 4), k, x)
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps()
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(T + 1)
    schedule = moments_schedule(moments)
    partial = estimate_moments(from_diffusers(unet), schedule, torch.zeros(4, 1, 8, 8),
                               num_images=2, timesteps=[5, T], progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="lack"):
        AnalyticDPMScheduler.from_moments(partial).set_timesteps(6)
    assert math.isfinite(float(scheduler.variances.sum()))


def moments_schedule(moments: DiffusionMoments) -> NoiseSchedule:
    return NoiseSchedule.from_config(moments.schedule_config)


def test_bfloat16_unet_against_float32(setup) -> None:
    """A bfloat16 U-Net: the scheduler computes the jump in float32 (float64 coefficients) and
    returns bfloat16. Stated tolerance: 5e-2 absolute on x_0 after 6 jumps (bfloat16 keeps
    ~2-3 significant digits of every x_t and eps_theta)."""
    import copy

    unet, _, _, moments = setup
    half = copy.deepcopy(unet).to(torch.bfloat16)
    scheduler = AnalyticDPMScheduler.from_moments(moments, eta=1.0)
    scheduler.set_timesteps(6)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(SHAPE, generator=gen)
    noises = [torch.randn(SHAPE, generator=gen) for _ in range(6)]
    finals = []
    with torch.no_grad():
        for model, dtype in ((unet, torch.float32), (half, torch.bfloat16)):
            x = x_T.to(dtype)
            for k, z in zip(scheduler.timesteps, noises, strict=True):
                out = scheduler.step(model(x, k).sample, k, x, variance_noise=z)
                assert out.prev_sample.dtype == dtype
                x = out.prev_sample
            finals.append(x.float())
    assert float(finals[0].abs().mean()) > 0.1
    torch.testing.assert_close(finals[1], finals[0], rtol=0, atol=5e-2)
