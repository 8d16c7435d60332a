"""The sampler against exact optimal eps-models (independent closed forms), and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from kexue.diffusion import NoiseSchedule, UNet, sample
from kexue.diffusion.sampler import jumps, resolve_steps
from kexue.exceptions import NonFiniteError
from kexue.testing.diffusion import gaussian_eps, point_eps, reference_sample


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [None, 10, [3, 50, 100]])
def test_single_point_data_is_recovered_exactly(eta, steps):
    s = NoiseSchedule.su_linear(100)
    point = torch.tensor([[0.25, -0.5], [0.75, 0.1]], dtype=torch.float64).view(1, 1, 2, 2)
    out = sample(
        point_eps(s, point), s, (5, 1, 2, 2), steps=steps, eta=eta, dtype=torch.float64,
        generator=torch.Generator().manual_seed(0), progress=False,
    )  # fmt: skip
    torch.testing.assert_close(out, point.expand(5, 1, 2, 2), rtol=0, atol=1e-9)


@pytest.mark.parametrize("eta, variance", [(1.0, None), (0.0, None), (1.0, "large")])
def test_gaussian_data_variance_is_reproduced(eta, variance):
    """With the exact eps of N(0, s^2), full-T sampling returns variance ~ s^2 (20k samples)."""
    s = NoiseSchedule.su_linear(200 if eta > 0 else 1000)  # DDIM's ODE steps need a finer grid
    std = 0.5
    out = sample(
        gaussian_eps(s, std), s, (5000, 1, 2, 2), eta=eta, variance=variance,
        dtype=torch.float64, generator=torch.Generator().manual_seed(1), progress=False,
    )  # fmt: skip
    var = out.var()
    # Monte Carlo standard error of a variance from 20k normal draws: s^2 sqrt(2/20000) = 0.0025
    tol = 0.01 if variance is None else 0.02  # 'large' is only approximately right at finite T
    assert abs(float(var) - std**2) < tol, float(var)
    assert abs(float(out.mean())) < 0.02


def test_ddim_on_gaussian_data_is_the_exact_linear_map():
    """eta = 0 with the exact eps of N(0, s^2) is x_0 = C x_T; C from a scalar recurrence of
    the DDIM update of docs/guides/diffusion.md, written independently here in float64."""
    s = NoiseSchedule.su_linear(200)
    std, steps = 0.5, [1, 20, 90, 200]
    c = 1.0
    kept = [0, *steps]
    for t, prev in zip(reversed(kept[1:]), reversed(kept[:-1]), strict=True):
        a, b = float(s.abar[t]), float(s.bbar[t])
        a0, b0 = float(s.abar[prev]), float(s.bbar[prev])
        eps_coef = b / (a * a * std * std + b * b)
        c *= a0 * (1 - b * eps_coef) / a + b0 * eps_coef
    x_T = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(gaussian_eps(s, std), s, x_T.shape, steps=steps, eta=0.0, x_T=x_T,
                 dtype=torch.float64, progress=False)  # fmt: skip
    torch.testing.assert_close(out, c * x_T, rtol=1e-12, atol=0)


def test_jump_coefficients_match_the_note():
    s = NoiseSchedule.su_linear(1000)
    steps = [1, 500, 1000]
    plan = jumps(s, steps, eta=0.7)
    assert [(j.t, j.s) for j in plan] == [(1000, 500), (500, 1), (1, 0)]
    for j in plan:
        abar_t, abar_s = float(s.abar[j.t]), float(s.abar[j.s])
        bbar_t, bbar_s = float(s.bbar[j.t]), float(s.bbar[j.s])
        sigma = 0.7 * (bbar_s / bbar_t) * math.sqrt(1 - abar_t**2 / abar_s**2)
        assert j.sigma2 == pytest.approx(sigma**2, rel=1e-12, abs=1e-300)
        assert j.direction == pytest.approx(math.sqrt(bbar_s**2 - sigma**2), rel=1e-12, abs=1e-300)
    assert plan[-1].noise_var == 0.0  # the jump to clean data adds no noise
    large = jumps(s, steps, eta=1.0, variance="large")
    assert large[0].noise_var == pytest.approx(1 - float(s.abar[1000] / s.abar[500]) ** 2)
    assert large[-1].noise_var == 0.0
    small = jumps(s, steps, eta=0.0, variance="small")
    assert small[0].sigma2 == 0.0 and small[0].noise_var > 0


def test_variance_tensor_and_callable_are_used():
    s = NoiseSchedule.su_linear(50)
    point = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    steps = [1, 10, 50]
    # DDIM mean (eta = 0) on single-point data is exact; per-step noise then adds variance
    var = torch.tensor([0.0, 0.0, 0.09], dtype=torch.float64)  # only the first jump (50 -> 10)
    out = sample(
        point_eps(s, point), s, (20000, 1, 2, 2), steps=steps, eta=0.0, variance=var,
        dtype=torch.float64, generator=torch.Generator().manual_seed(0), progress=False,
    )  # fmt: skip
    # the exact model removes any noise added before the final jump: back to the point
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-9)
    calls = []

    def fn(x, t, s_, eps):
        calls.append((t, s_))
        return torch.full_like(x[:1], 0.01)

    sample(point_eps(s, point), s, (2, 1, 2, 2), steps=steps, eta=0.0, variance=fn,
           dtype=torch.float64, progress=False)  # fmt: skip
    assert calls == [(50, 10), (10, 1), (1, 0)]


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_variance_tensor_enters_each_jump_exactly(eta):
    """A per-step, per-pixel variance tensor against the reverse process written from the
    posterior (kexue.testing.diffusion.reference_sample), same noise draws: every entry must
    enter its own jump (entry i for the jump from steps[i]) and broadcast over the batch."""
    s = NoiseSchedule.su_linear(60)
    steps = [1, 7, 25, 60]
    eps = gaussian_eps(s, 0.5)
    gen = torch.Generator().manual_seed(3)
    base = torch.tensor([0.02, 0.15, 0.4, 0.9], dtype=torch.float64)
    pixel = torch.tensor([[1.0, 0.5], [2.0, 0.25]], dtype=torch.float64)
    var = base.view(-1, 1, 1, 1) * pixel.view(1, 1, 2, 2)  # (K, 1, 2, 2): distinct everywhere
    x_T = torch.randn(6, 1, 2, 2, generator=gen, dtype=torch.float64)
    got = sample(eps, s, x_T.shape, steps=steps, eta=eta, variance=var, x_T=x_T,
                 generator=torch.Generator().manual_seed(9), progress=False)  # fmt: skip
    want = reference_sample(eps, s, steps, eta, x_T, list(var),
                            torch.Generator().manual_seed(9))  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the tensor matters: other variances (reversed order, or ignored) give other images
    for other in (var.flip(0), torch.zeros_like(var)):
        moved = sample(eps, s, x_T.shape, steps=steps, eta=eta, variance=other, x_T=x_T,
                       generator=torch.Generator().manual_seed(9), progress=False)  # fmt: skip
        assert (moved - got).abs().max() > 1e-3


@pytest.mark.parametrize("eta, variance", [(1.0, None), (0.3, None), (1.0, "large")])
def test_builtin_variances_match_the_reference_update(eta, variance):
    """The sampler's update against the posterior form of the reference (float64, same
    draws): mean and noise of every jump, with the eta-family or DDPM's large variance."""
    s = NoiseSchedule.cosine(40)
    steps = [1, 3, 11, 26, 40]
    eps = gaussian_eps(s, 0.7)
    x_T = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plan = jumps(s, steps, eta, variance)
    var = [j.noise_var for j in reversed(plan)]  # entry i: the jump from steps[i]
    got = sample(eps, s, x_T.shape, steps=steps, eta=eta, variance=variance, x_T=x_T,
                 generator=torch.Generator().manual_seed(4), progress=False)  # fmt: skip
    # only the last jump is noiseless (the sampler draws nothing there, the reference draws
    # last and multiplies by 0), so both consume the same draws
    ref_var = torch.tensor(var, dtype=torch.float64)
    assert ref_var[0] == 0.0 and (ref_var[1:] > 0).all()
    want = reference_sample(eps, s, steps, eta, x_T, var, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_dtype_follows_x_T_and_float64_models_stay_float64():
    s = NoiseSchedule.su_linear(30)
    seen = []

    def eps(x, t):
        seen.append(x.dtype)
        return gaussian_eps(s, 0.5)(x, t)

    x64 = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample(eps, s, x64.shape, steps=5, x_T=x64, progress=False,
                 generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert out.dtype == torch.float64 and set(seen) == {torch.float64}
    half = sample(lambda x, t: torch.zeros_like(x), s, (2, 1, 2, 2), steps=3, eta=0.0,
                  x_T=torch.zeros(2, 1, 2, 2, dtype=torch.float16), progress=False)  # fmt: skip
    assert half.dtype == torch.float16
    assert sample(eps, s, (2, 1, 2, 2), steps=3, progress=False).dtype == torch.float32
    forced = sample(eps, s, (2, 1, 2, 2), steps=3, x_T=x64[:2], dtype=torch.float32,
                    progress=False)  # fmt: skip
    assert forced.dtype == torch.float32
    model = UNet(channels=8, channel_mults=(1, 2), blocks=1, T=30).double()
    assert sample(model, s, (1, 1, 4, 4), steps=2, progress=False).dtype == torch.float64


def test_model_dtype_mismatch_names_dtype():
    s = NoiseSchedule.su_linear(30)
    model = UNet(channels=8, channel_mults=(1, 2), blocks=1, T=30)  # float32
    with pytest.raises(TypeError, match=r"dtype.*float64|float64.*dtype"):
        sample(model, s, (1, 1, 4, 4), steps=2, x_T=torch.zeros(1, 1, 4, 4, dtype=torch.float64),
               progress=False)  # fmt: skip
    with pytest.raises(TypeError, match=r"dtype=torch\.float16"):
        sample(model, s, (1, 1, 4, 4), steps=2, dtype=torch.float16, progress=False)
    with pytest.raises(TypeError, match="dtype"):
        sample(model, s, (1, 1, 4, 4), steps=2, dtype=torch.int64, progress=False)


@pytest.mark.parametrize("bad", [[[0.0]], "x", 3.0])
def test_x_T_must_be_a_tensor(bad):
    s = NoiseSchedule.su_linear(10)
    with pytest.raises(TypeError, match="x_T"):
        sample(lambda x, t: x, s, (1, 1, 1, 1), x_T=bad, progress=False)
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="x_T"):
        sample(lambda x, t: x, s, (1, 1, 1, 1), x_T=np.zeros((1, 1, 1, 1)), progress=False)
    with pytest.raises(TypeError, match="x_T"):
        sample(lambda x, t: x, s, (1, 1, 1, 1), x_T=torch.zeros(1, 1, 1, 1, dtype=torch.long),
               progress=False)  # fmt: skip


def test_nan_from_the_model_names_the_step():
    s = NoiseSchedule.su_linear(20)

    def broken(x, t):
        return torch.full_like(x, math.nan) if int(t[0]) <= 9 else torch.zeros_like(x)

    with pytest.raises(NonFiniteError, match="t=9"):
        sample(broken, s, (2, 1, 2, 2), steps=[3, 9, 15, 20], progress=False)


def test_a_model_with_its_schedule_refuses_another():
    s = NoiseSchedule.su_linear(30)
    model = UNet(channels=8, channel_mults=(1, 2), blocks=1, T=30, schedule=s)
    sample(model, NoiseSchedule.su_linear(30), (1, 1, 4, 4), steps=2, progress=False)  # same
    with pytest.raises(ValueError, match="schedule"):
        sample(model, NoiseSchedule.cosine(30), (1, 1, 4, 4), steps=2, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        sample(model, NoiseSchedule.su_linear(20), (1, 1, 4, 4), steps=2, progress=False)


def test_trajectory_output():
    s = NoiseSchedule.su_linear(20)
    out, traj = sample(
        lambda x, t: torch.zeros_like(x), s, (2, 1, 4, 4), steps=5, eta=0.0,
        return_trajectory=True, progress=False,
    )  # fmt: skip
    assert len(traj) == 6 and torch.equal(traj[-1], out)


def test_errors():
    s = NoiseSchedule.su_linear(20)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="strictly increasing"):
        sample(zero, s, (1, 1, 4, 4), steps=[5, 3], progress=False)
    with pytest.raises(ValueError, match="K must be"):
        sample(zero, s, (1, 1, 4, 4), steps=21, progress=False)
    with pytest.raises(ValueError, match="eta"):
        sample(zero, s, (1, 1, 4, 4), eta=-1, progress=False)
    with pytest.raises(ValueError, match="input's shape"):
        sample(lambda x, t: x[:, :, :2], s, (1, 1, 4, 4), progress=False)
    with pytest.raises(ValueError, match="one entry per kept step"):
        sample(zero, s, (1, 1, 4, 4), steps=5, variance=torch.ones(4), progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        sample(zero, s, (1, 1, 4, 4), steps=5, variance=-torch.ones(5), progress=False)
    with pytest.raises(ValueError, match="negative or non-finite"):
        sample(zero, s, (1, 1, 4, 4), steps=5, variance=lambda *a: -1.0, progress=False)
    with pytest.raises(ValueError, match="variance must be None"):
        sample(zero, s, (1, 1, 4, 4), variance="huge", progress=False)
    with pytest.raises(ValueError, match="x_T must have shape"):
        sample(zero, s, (1, 1, 4, 4), x_T=torch.zeros(2, 1, 4, 4), progress=False)
    with pytest.raises(ValueError, match="shape"):
        sample(zero, s, (1, 0, 4, 4), progress=False)
    with pytest.raises(ValueError, match="clip_x0"):
        sample(zero, s, (1, 1, 4, 4), clip_x0=-1.0, progress=False)
    with pytest.raises(TypeError, match="generator"):
        sample(zero, s, (1, 1, 4, 4), generator=0, progress=False)
    with pytest.raises(TypeError, match="schedule"):
        sample(zero, "su_linear", (1, 1, 4, 4), progress=False)
    with pytest.raises(TypeError, match="callable"):
        sample(None, s, (1, 1, 4, 4), progress=False)
    assert resolve_steps(s, None) == list(range(1, 21))
