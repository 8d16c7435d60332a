"""kexue's sampler against diffusers' DDPMScheduler / DDIMScheduler (the peer, same process).

Same betas, same eps-model (a fixed random network), same initial noise and the same per-step
noise stream (both draw ``torch.randn(shape, generator=g)`` once per noisy step, in order).

Index conventions: diffusers' timestep ``k`` is our ``t = k + 1``. diffusers' DDIM steps from
``k`` to ``k - T // K`` whatever its spacing, so it is compared on "trailing" (our steps
``T/K, 2T/K, ..., T``) and "leading" (our ``1, 1 + T/K, ...``) spacings, where that rule is
consistent with an explicit kept-step list; its DDPM "leading" strided schedule likewise.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from kexue.diffusion import NoiseSchedule, sample  # noqa: E402

T = 100
SHAPE = (3, 1, 8, 8)


class RandomEps(nn.Module):
    """A fixed random convolutional 'eps model' that also depends on t."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 1, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3

    def forward(self, x, t):
        scale = 1 + torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / T
        return self.c2(torch.tanh(self.c1(x))) * scale


@pytest.fixture(scope="module")
def setup():
    schedule = NoiseSchedule.ddpm_linear(T, 1e-4, 0.02)
    betas = schedule.to_diffusers_betas().float()
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    return schedule, betas, RandomEps().eval(), x_T


def run_diffusers(scheduler, model, x_T, eta=None, seed=3, **step_kwargs):
    gen = torch.Generator().manual_seed(seed)
    x = x_T.clone()
    with torch.no_grad():
        for k in scheduler.timesteps:
            eps = model(x, torch.full((len(x),), int(k) + 1))
            kwargs = {"generator": gen, **step_kwargs}
            if eta is not None:
                kwargs["eta"] = eta
            x = scheduler.step(eps, int(k), x, **kwargs).prev_sample
    return x, [int(k) + 1 for k in scheduler.timesteps]


def assert_close(ours, theirs, tol=1e-5):
    err = (ours - theirs).abs().max() / theirs.abs().max()
    assert err < tol, f"relative error {err:.2e}"


def test_ddpm_full_trajectory(setup):
    schedule, betas, model, x_T = setup
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=betas, clip_sample=False)
    sched.set_timesteps(T)
    theirs, steps = run_diffusers(sched, model, x_T)
    assert steps == list(range(T, 0, -1))
    ours = sample(
        model, schedule, SHAPE, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(3),
        progress=False,
    )  # fmt: skip
    # T noisy float32 steps: rounding (~1e-7 per step) is amplified by the reverse chain's
    # 1/abar_T (about 160 at T = 200), so the agreement is ~3e-5, not 1e-5.
    assert_close(ours, theirs, tol=1e-4)


@pytest.mark.parametrize("K", [10, 40])
def test_ddpm_strided_leading(setup, K):
    schedule, betas, model, x_T = setup
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, trained_betas=betas, clip_sample=False)
    sched.set_timesteps(K)
    theirs, steps = run_diffusers(sched, model, x_T)
    kept = sorted(steps)
    assert kept == [1 + j * (T // K) for j in range(K)]
    ours = sample(
        model, schedule, SHAPE, steps=kept, eta=1.0, x_T=x_T,
        generator=torch.Generator().manual_seed(3), progress=False,
    )  # fmt: skip
    assert_close(ours, theirs, tol=5e-5)  # noisy steps: see test_ddpm_full_trajectory


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("K", [10, 50])
def test_ddim_strided(setup, eta, spacing, K):
    schedule, betas, model, x_T = setup
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=T, trained_betas=betas, clip_sample=False, set_alpha_to_one=True,
        timestep_spacing=spacing,
    )  # fmt: skip
    sched.set_timesteps(K)
    theirs, steps = run_diffusers(sched, model, x_T, eta=eta)
    kept = sorted(steps)
    ours = sample(
        model, schedule, SHAPE, steps=kept, eta=eta, x_T=x_T,
        generator=torch.Generator().manual_seed(3), progress=False,
    )  # fmt: skip
    assert_close(ours, theirs)


def test_ddim_full_trajectory_deterministic(setup):
    schedule, betas, model, x_T = setup
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=T, trained_betas=betas, clip_sample=False, set_alpha_to_one=True
    )
    sched.set_timesteps(T)
    theirs, _ = run_diffusers(sched, model, x_T, eta=0.0)
    ours = sample(model, schedule, SHAPE, eta=0.0, x_T=x_T, progress=False)
    assert_close(ours, theirs)


def test_clip_x0_matches_diffusers_clip_sample(setup):
    schedule, betas, model, x_T = setup
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=T, trained_betas=betas, clip_sample=True, clip_sample_range=1.0,
        set_alpha_to_one=True, timestep_spacing="trailing",
    )  # fmt: skip
    sched.set_timesteps(20)
    # kexue re-derives eps from the clipped x0 (as DDPM's posterior mean does)
    theirs, steps = run_diffusers(sched, model, 3 * x_T, eta=0.0, use_clipped_model_output=True)
    ours = sample(
        model, schedule, SHAPE, steps=sorted(steps), eta=0.0, x_T=3 * x_T, clip_x0=1.0,
        progress=False,
    )  # fmt: skip
    assert_close(ours, theirs)


def test_schedule_matches_diffusers_alphas_cumprod():
    for schedule, kwargs in (
        (NoiseSchedule.ddpm_linear(1000), {"beta_schedule": "linear"}),
        (NoiseSchedule.cosine(1000), {"beta_schedule": "squaredcos_cap_v2"}),
    ):
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, **kwargs)
        ours = schedule.abar[1:] ** 2
        theirs = sched.alphas_cumprod.double()
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_from_diffusers_unet_runs_and_shifts_timesteps():
    from kexue.diffusion import from_diffusers

    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    seen = []
    unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1][0])))
    model = from_diffusers(unet).eval()
    schedule = NoiseSchedule.su_linear(50)
    out = sample(model, schedule, (2, 1, 8, 8), steps=[1, 25, 50], eta=0.0, progress=False)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    assert seen == [49, 24, 0]  # our t = 50, 25, 1 are its 0-based 49, 24, 0
    with torch.no_grad():
        x = torch.randn(2, 1, 8, 8)
        direct = unet(x, torch.tensor([9, 9])).sample
        assert torch.equal(model(x, torch.tensor([10, 10])), direct)
