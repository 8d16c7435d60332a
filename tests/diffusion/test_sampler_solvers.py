"""Few-step sampling: trailing trajectories, ``sample(solver=...)`` (DDIM family, DPM-Solver-v3,
diffusers schedulers on kexue's loop) and half-precision models.

References: diffusers' own schedulers and loops (the peer, same process), a float32 copy of the
model, and the DPM-Solver-v3 function called directly.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from kexue.diffusion import NoiseSchedule, UNet, sample
from kexue.diffusion.dpm_solver_v3 import dpm_solver_v3_sample
from kexue.diffusion.schedule import SAMPLING_SPACING
from kexue.diffusion.solver_statistics import SolverStatistics
from kexue.testing.diffusion import gaussian_eps

diffusers = pytest.importorskip("diffusers")

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


class Recorder:
    """An exact Gaussian eps-model that records the steps it is called at."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.eps, self.calls = gaussian_eps(schedule, 0.5), []

    def __call__(self, x, t):
        self.calls.append(int(t[0]))
        return self.eps(x, t)


class ZeroEps(nn.Module):
    """eps_theta = 0, computed in bfloat16."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.bfloat16))

    def forward(self, x, t):
        assert x.dtype == torch.bfloat16
        return x * self.w


# ---------------------------------------------------------------------- trailing spacing
@pytest.mark.parametrize("T_, K", [(1000, 5), (1000, 10), (1000, 20), (1000, 7), (1000, 999),
                                   (1000, 1000), (100, 3), (100, 1), (50, 49)])  # fmt: skip
def test_trailing_matches_diffusers_timesteps(T_, K):
    """diffusers' trailing timesteps (0-based) + 1 are our kept steps, for any T and K."""
    sched = diffusers.DDIMScheduler(num_train_timesteps=T_, timestep_spacing="trailing")
    sched.set_timesteps(K)
    want = sorted(int(k) + 1 for k in sched.timesteps)
    assert NoiseSchedule.su_linear(T_).trajectory(K, "trailing") == want
    assert len(want) == K and want[-1] == T_


def test_trailing_trajectory_numbers_and_errors():
    s = NoiseSchedule.su_linear(1000)
    assert s.trajectory(5, "trailing") == [200, 400, 600, 800, 1000]
    assert s.trajectory(3, "trailing") == [333, 667, 1000]
    assert s.trajectory(1, "trailing") == [1000]
    with pytest.raises(ValueError, match=r"K must be in 1\.\.T=1000"):
        s.trajectory(0, "trailing")
    with pytest.raises(ValueError, match="K must be"):
        s.trajectory(1001, "trailing")
    with pytest.raises(ValueError, match="trailing"):
        s.trajectory(5, "leading")


def test_sampling_defaults_to_trailing_and_per_step_variances_to_even():
    s = NoiseSchedule.su_linear(200)
    assert SAMPLING_SPACING == "trailing"
    rec = Recorder(s)
    sample(rec, s, (2, 1, 2, 2), steps=5, eta=0.0, progress=False)
    assert rec.calls == [200, 160, 120, 80, 40]
    rec.calls.clear()
    sample(rec, s, (2, 1, 2, 2), steps=5, eta=0.0, spacing="even", progress=False)
    assert rec.calls == s.trajectory(5, "even")[::-1]
    # a per-step tensor or callable is laid out on the builders' default (even) trajectory
    rec.calls.clear()
    sample(rec, s, (2, 1, 2, 2), steps=5, variance=torch.zeros(5), progress=False)
    assert rec.calls == s.trajectory(5, "even")[::-1]
    rec.calls.clear()
    sample(rec, s, (2, 1, 2, 2), steps=5, variance=lambda *a: 0.0, progress=False)
    assert rec.calls == s.trajectory(5, "even")[::-1]


# ---------------------------------------------------------------------- diffusers schedulers
@pytest.fixture(scope="module")
def setup():
    schedule = NoiseSchedule.ddpm_linear(T, 1e-4, 0.02)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    return schedule, RandomEps().eval(), x_T


def diffusers_own_loop(scheduler, model, x_T, K, seed=3):
    """diffusers' loop, written as its pipelines do, around a model of diffusers' timesteps."""
    scheduler.set_timesteps(K)
    gen = torch.Generator().manual_seed(seed)
    x = x_T * scheduler.init_noise_sigma
    with torch.no_grad():
        for k in scheduler.timesteps:
            eps = model(scheduler.scale_model_input(x, k), torch.full((len(x),), int(k) + 1))
            kwargs = (
                {"generator": gen}
                if "generator" in inspect.signature(scheduler.step).parameters
                else {}
            )
            x = scheduler.step(eps, k, x, **kwargs).prev_sample
    return x


SCHEDULERS = {
    "ddim-trailing": lambda: diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True,
                                                     timestep_spacing="trailing"),
    "dpm++2m": lambda: diffusers.DPMSolverMultistepScheduler(solver_order=2,
                                                             timestep_spacing="trailing"),
    "dpm++3m": lambda: diffusers.DPMSolverMultistepScheduler(solver_order=3,
                                                             timestep_spacing="trailing"),
    "dpm++2m-sde": lambda: diffusers.DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", timestep_spacing="trailing"),
    "unipc": lambda: diffusers.UniPCMultistepScheduler(solver_order=3,
                                                       timestep_spacing="trailing"),
    "ddpm": lambda: diffusers.DDPMScheduler(clip_sample=False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("K", [5, 12])
def test_diffusers_scheduler_on_our_loop_is_diffusers_loop(setup, name, K):
    """solver=<scheduler> reproduces diffusers' own loop with the schedule given as trained
    betas, to float32 precision; the scheduler passed in keeps its own (other) betas."""
    schedule, model, x_T = setup
    given = SCHEDULERS[name]()  # diffusers' default linear betas, T = 1000: replaced by ours
    ours = sample(model, schedule, SHAPE, steps=K, solver=given, x_T=x_T,
                  generator=torch.Generator().manual_seed(3), progress=False)  # fmt: skip
    peer = type(given).from_config(
        given.config, num_train_timesteps=T, trained_betas=schedule.to_diffusers_betas().tolist()
    )
    theirs = diffusers_own_loop(peer, model, x_T, K)
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert ours.dtype == torch.float32 and err < 1e-5, err
    assert given.config.num_train_timesteps == 1000  # the instance passed in is untouched


def test_diffusers_ddim_trailing_equals_our_ddim(setup):
    """The same update on the same steps: diffusers' DDIM "trailing" is kexue's default DDIM."""
    schedule, model, x_T = setup
    given = SCHEDULERS["ddim-trailing"]()
    theirs = sample(model, schedule, SHAPE, steps=10, solver=given, x_T=x_T, progress=False)
    ours = sample(model, schedule, SHAPE, steps=10, eta=0.0, x_T=x_T, progress=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_diffusers_solver_with_explicit_steps_and_trajectory(setup):
    schedule, model, x_T = setup
    kept = [10, 30, 60, 100]
    out, traj = sample(model, schedule, SHAPE, steps=kept, solver=SCHEDULERS["dpm++2m"](),
                       x_T=x_T, return_trajectory=True, progress=False)  # fmt: skip
    assert len(traj) == 5 and torch.equal(traj[-1], out)
    rec = Recorder(schedule)
    sample(rec, schedule, (2, 1, 2, 2), steps=kept, solver=SCHEDULERS["dpm++2m"](), progress=False)
    assert rec.calls == kept[::-1]
    with pytest.raises(ValueError, match="explicit timesteps"):
        sample(model, schedule, SHAPE, steps=kept, solver=SCHEDULERS["unipc"](), progress=False)


# ---------------------------------------------------------------------- dpm-solver-v3
def test_dpm_solver_v3_through_sample_is_the_solver():
    s = NoiseSchedule.su_linear(200)
    stats = SolverStatistics.constant(s, (1, 2, 2), l=0.9, s=-0.1, b=0.01)
    eps = gaussian_eps(s, 0.5)
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = sample(eps, s, x_T.shape, steps=6, solver="dpm-solver-v3", statistics=stats, x_T=x_T,
                 progress=False)  # fmt: skip
    want = dpm_solver_v3_sample(eps, s, stats, x_T, steps=6, progress=False)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="statistics"):
        sample(eps, s, x_T.shape, steps=6, solver="dpm-solver-v3", x_T=x_T, progress=False)


def test_solver_bad_inputs(setup):
    schedule, model, _ = setup
    stats = SolverStatistics.data_prediction(schedule, SHAPE[1:])
    with pytest.raises(ValueError, match="solver must be one of"):
        sample(model, schedule, SHAPE, steps=5, solver="euler", progress=False)
    with pytest.raises(TypeError, match=r"solver.*DDIMScheduler\(\)"):
        sample(model, schedule, SHAPE, steps=5, solver=diffusers.DDIMScheduler, progress=False)
    with pytest.raises(TypeError, match="solver"):
        sample(model, schedule, SHAPE, steps=5, solver=3, progress=False)
    with pytest.raises(ValueError, match="eta only apply"):
        sample(model, schedule, SHAPE, steps=5, solver="dpm-solver-v3", statistics=stats, eta=0.0,
               progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="variance only apply"):
        sample(model, schedule, SHAPE, steps=5, solver=SCHEDULERS["dpm++2m"](),
               variance="small", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="statistics only apply"):
        sample(model, schedule, SHAPE, steps=5, statistics=stats, progress=False)
    with pytest.raises(ValueError, match="steps"):
        sample(model, schedule, SHAPE, steps=T + 1, solver=SCHEDULERS["dpm++2m"](),
               progress=False)  # fmt: skip


# ---------------------------------------------------------------------- dtypes
@pytest.fixture(scope="module")
def unet_pair():
    torch.manual_seed(0)
    model = UNet(channels=8, channel_mults=(1, 2), blocks=1, T=T).eval()
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():  # random weights everywhere (a fresh UNet's last conv is 0)
        p.data = torch.randn(p.shape, generator=gen) * 0.2
    half = UNet(channels=8, channel_mults=(1, 2), blocks=1, T=T).eval()
    half.load_state_dict(model.state_dict())
    return model, half.to(torch.bfloat16)


@pytest.mark.parametrize("solver", ["ddim", "dpm-solver-v3", "dpm++2m"])
def test_bfloat16_model_samples_like_float32(unet_pair, solver):
    """A bfloat16 model on the CPU: the loop (every schedule coefficient) stays in float32, only
    the model's input is cast; the result is within bfloat16's resolution of the float32 run
    (measured max |difference| 0.003 on outputs up to 5.6 for all three solvers; bfloat16's
    relative resolution is 4e-3; tolerance 0.02)."""
    model, half = unet_pair
    schedule = NoiseSchedule.su_linear(T)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    seen = []
    hook = half.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    kwargs = {"steps": 8, "x_T": x_T, "progress": False}
    if solver == "dpm-solver-v3":
        kwargs |= {
            "solver": solver,
            "statistics": SolverStatistics.data_prediction(schedule, SHAPE[1:]),
        }
    elif solver == "ddim":
        kwargs |= {"eta": 0.0}
    else:
        kwargs |= {"solver": SCHEDULERS[solver]()}
    full = sample(model, schedule, SHAPE, **kwargs)
    low = sample(half, schedule, SHAPE, dtype=torch.float32, **kwargs)
    hook.remove()
    assert low.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    err = float((low - full).abs().max())
    assert 0 < err < 0.02, err
    assert sample(half, schedule, SHAPE, **(kwargs | {"x_T": None})).dtype == torch.bfloat16


def test_bfloat16_loop_keeps_schedule_arithmetic_in_float32():
    """An eps-model that returns 0 in bfloat16: DDIM is then x_0 = x_T / abar_T, which a
    bfloat16 loop would round at every step (relative error ~4e-3); float32 keeps it to 1e-6."""
    s = NoiseSchedule.su_linear(1000)
    x_T = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    out = sample(ZeroEps(), s, x_T.shape, steps=20, eta=0.0, x_T=x_T, dtype=torch.float32,
                 progress=False)  # fmt: skip
    want = x_T.double() / float(s.abar[-1])
    err = float(((out.double() - want) / want).abs().max())
    assert err < 1e-5, err
    # returned in bfloat16 (x_T's dtype), but every state of the loop is float32 and exact
    x_half = x_T.to(torch.bfloat16)
    out, traj = sample(ZeroEps(), s, x_T.shape, steps=20, eta=0.0, x_T=x_half,
                       return_trajectory=True, progress=False)  # fmt: skip
    assert out.dtype == torch.bfloat16 and traj[-2].dtype == torch.float32
    kept = s.trajectory(20, "trailing")
    want = x_half.double() * float(s.abar[kept[0]]) / float(s.abar[-1])
    err = float(((traj[-2].double() - want) / want).abs().max())
    assert err < 1e-5, err
