"""DPM-Solver-v3 against independent references: the exact probability-flow ODE of Gaussian
data, DDIM and DPM-Solver++ written from their own formulas, and diffusers' DPM-Solver++."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kexue.diffusion import NoiseSchedule
from kexue.diffusion.dpm_solver_v3 import (
    V3Options,
    dpm_solver_v3_plan,
    dpm_solver_v3_sample,
    v3_trajectory,
)
from kexue.diffusion.solver_statistics import SolverStatistics
from kexue.exceptions import NonFiniteError
from kexue.testing.ode import GaussianTestbed, ddim_reference, dpm_solver_pp_reference

SHAPE = (1, 2, 2)


def lambda_uniform_schedule(T: int = 1000) -> NoiseSchedule:
    """``lambda_t`` evenly spaced from 4 (t = 1) to -5 (t = T): the integer steps are fine in
    ``lambda`` everywhere, so a solver's error can shrink with K down to small values (the
    su_linear schedule has ``lambda_1 - lambda_2 = 0.35``, which caps the accuracy of any
    trajectory that ends at step 1)."""
    lam = torch.linspace(4.0, -5.0, T, dtype=torch.float64)
    abar = torch.sqrt(torch.sigmoid(2 * lam))
    return NoiseSchedule.from_alphas(
        abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    )


@pytest.fixture(scope="module")
def testbed() -> GaussianTestbed:
    return GaussianTestbed.random(SHAPE, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def x_T() -> torch.Tensor:
    return torch.randn(
        (16, *SHAPE), generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )


def error(testbed, schedule, stats, x_T, K, **options) -> float:
    """RMS distance to the exact ODE solution from ``x_T`` at the trajectory's last step."""
    spacing = options.setdefault("spacing", "time-uniform")
    out = dpm_solver_v3_sample(testbed.eps_model(schedule), schedule, stats, x_T, steps=K,
                               progress=False, **options)  # fmt: skip
    final = v3_trajectory(schedule, K, spacing)[1]
    exact = testbed.flow(schedule, x_T, schedule.T, final)
    return float((out - exact).pow(2).mean().sqrt())


def test_reference_flow_solves_the_ode(testbed, x_T):
    """The closed-form map follows dx/dlambda = bbar^2 x - bbar eps (central differences)."""
    schedule = lambda_uniform_schedule()
    eps = testbed.eps_model(schedule)
    lam = torch.log(schedule.abar / schedule.bbar)
    for t in (100, 500, 900):
        x_t = testbed.flow(schedule, x_T, schedule.T, t)
        up, down = (
            testbed.flow(schedule, x_T, schedule.T, t - 1),
            testbed.flow(schedule, x_T, schedule.T, t + 1),
        )
        slope = (up - down) / float(lam[t - 1] - lam[t + 1])
        b = float(schedule.bbar[t])
        drift = b**2 * x_t - b * eps(x_t, torch.full((len(x_t),), t))
        assert torch.allclose(slope, drift, atol=1e-4, rtol=1e-4)
    # t = 0 is the data: the flow of x_T to 0 has the data's mean and covariance
    big = torch.randn(
        (20000, *SHAPE), generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    x0 = testbed.flow(schedule, big, schedule.T, 0).reshape(len(big), -1)
    assert torch.allclose(x0.mean(0), testbed.m, atol=0.03)
    assert torch.allclose(torch.cov(x0.T), testbed.cov, atol=0.03)


@pytest.mark.parametrize("spacing", ["trailing", "time-uniform", "logsnr-uniform"])
@pytest.mark.parametrize("kind", ["data_prediction", "noise_prediction"])
def test_first_order_is_ddim(testbed, x_T, spacing, kind):
    """l = 1, s = b = 0 (DPM-Solver++) and l = 0, s = -1, b = 0 (DPM-Solver): the first-order
    update is DDIM's deterministic step, at every spacing (a wrong lambda mapping, kernel sign
    or coefficient breaks the equality)."""
    schedule = NoiseSchedule.su_linear(1000)
    stats = getattr(SolverStatistics, kind)(schedule, SHAPE)
    eps = testbed.eps_model(schedule)
    out = dpm_solver_v3_sample(eps, schedule, stats, x_T, steps=6, order=1, spacing=spacing,
                               progress=False)  # fmt: skip
    steps, final = v3_trajectory(schedule, 6, spacing)
    assert torch.allclose(out, ddim_reference(eps, schedule, steps, final, x_T), atol=1e-12)


@pytest.mark.parametrize(
    ("order", "corrector", "pseudo"),
    [(2, False, False), (2, True, False), (3, False, False), (3, False, True)],
)
@pytest.mark.parametrize("spacing", ["trailing", "time-uniform"])
def test_multistep_is_dpm_solver_pp(testbed, x_T, spacing, order, corrector, pseudo):
    """With data-prediction statistics, order 2 and 3 are multistep DPM-Solver++ (the exact
    integral of the Taylor polynomial of x0_hat, with derivatives from the interpolating
    polynomial or, pseudo order, from divided differences), and the order-2 corrector is the
    linear interpolation with the new point."""
    schedule = NoiseSchedule.su_linear(1000)
    stats = SolverStatistics.data_prediction(schedule, SHAPE)
    eps = testbed.eps_model(schedule)
    out = dpm_solver_v3_sample(
        eps, schedule, stats, x_T, steps=7, order=order, spacing=spacing, corrector=corrector,
        pseudo_order=pseudo, lower_order_final=False, progress=False,
    )  # fmt: skip
    steps, final = v3_trajectory(schedule, 7, spacing)
    ref = dpm_solver_pp_reference(eps, schedule, steps, final, x_T, order=order,
                                  corrector=corrector, pseudo=pseudo)  # fmt: skip
    assert torch.allclose(out, ref, atol=1e-11)


def test_matches_diffusers_dpm_solver_pp(testbed, x_T):
    """Peer check: diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, heun, trailing),
    its timestep k being our step k + 1."""
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule.su_linear(1000)
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=(1 - schedule.alpha[1:] ** 2).numpy(),
        solver_order=2, solver_type="heun", algorithm_type="dpmsolver++",
        timestep_spacing="trailing", lower_order_final=False,
    )  # fmt: skip
    sched.set_timesteps(8)
    eps = testbed.eps_model(schedule)
    x = x_T.clone()
    for k in sched.timesteps:
        x = sched.step(eps(x, torch.full((len(x),), int(k) + 1)), k, x).prev_sample
    ours = dpm_solver_v3_sample(eps, schedule, SolverStatistics.data_prediction(schedule, SHAPE),
                                x_T, steps=8, order=2, corrector=False, lower_order_final=False,
                                progress=False)  # fmt: skip
    assert [int(k) + 1 for k in sched.timesteps] == v3_trajectory(schedule, 8)[0]
    assert torch.allclose(ours, x.double(), atol=1e-5)


def slope(errors: list[float], Ks: list[int]) -> float:
    return float(-np.polyfit(np.log(Ks), np.log(errors), 1)[0])


@pytest.mark.parametrize(
    ("kind", "order"),
    [("data", 1), ("data", 2), ("data", 3), ("s-and-b", 3), ("noise", 3)],
)
def test_error_shrinks_with_the_order(testbed, x_T, kind, order):
    """Log-log slope of the error against K (10, 20, 40) at least the order claimed (minus
    0.3), for DPM-Solver++ / DPM-Solver statistics and constant non-zero s and b."""
    schedule = lambda_uniform_schedule()
    stats = {
        "data": SolverStatistics.data_prediction(schedule, SHAPE),
        "noise": SolverStatistics.noise_prediction(schedule, SHAPE),
        "s-and-b": SolverStatistics.constant(schedule, SHAPE, l=1.0, s=0.3, b=0.1),
    }[kind]
    Ks = [10, 20, 40]
    errors = [error(testbed, schedule, stats, x_T, K, order=order, corrector=False,
                    pseudo_order=False, lower_order_final=False) for K in Ks]  # fmt: skip
    assert slope(errors, Ks) > order - 0.3, errors
    assert errors[-1] < (0.05, 0.01, 0.002)[order - 1]


def test_pseudo_order_is_second_order_and_corrector_raises_the_order(testbed, x_T):
    """Pseudo order 3 estimates the k-th derivative from k + 1 points: formally second order;
    the order-2 corrector (interpolation with the new point) is third order."""
    schedule = lambda_uniform_schedule()
    stats = SolverStatistics.data_prediction(schedule, SHAPE)
    Ks = [10, 20, 40]
    pseudo = [error(testbed, schedule, stats, x_T, K, order=3, pseudo_order=True, corrector=False,
                    lower_order_final=False) for K in Ks]  # fmt: skip
    assert 1.7 < slope(pseudo, Ks) < 2.5, pseudo
    corrected = [error(testbed, schedule, stats, x_T, K, order=2, corrector=True,
                       lower_order_final=False) for K in Ks]  # fmt: skip
    assert slope(corrected, Ks) > 2.7, corrected


def test_model_statistics_beat_data_prediction(testbed, x_T):
    """The point of the method: with the statistics of the model (closed form on Gaussian data)
    the few-step error is several times smaller than DPM-Solver++'s at the same order."""
    schedule = lambda_uniform_schedule()
    steps = sorted({*range(1, schedule.T + 1, 3), schedule.T})
    l_, s, b = testbed.statistics(schedule, steps)
    ems = SolverStatistics(steps=torch.tensor(steps), l=l_, s=s, b=b,
                           abar=schedule.abar.clone(), image_shape=SHAPE)  # fmt: skip
    plain = SolverStatistics.data_prediction(schedule, SHAPE)
    for K, order in ((5, 1), (5, 2), (5, 3), (10, 2), (10, 3)):
        opts = dict(order=order, corrector=False, pseudo_order=False, lower_order_final=False)
        assert error(testbed, schedule, ems, x_T, K, **opts) < 0.3 * error(
            testbed, schedule, plain, x_T, K, **opts
        )


def test_diagonal_gaussian_is_solved_in_one_step():
    """Independent pixels: l removes every dependence of f on x, and s, b its dependence on
    lambda, so one first-order step is exact (up to the statistics' interpolation)."""
    schedule = lambda_uniform_schedule()
    bed = GaussianTestbed.random(SHAPE, torch.Generator().manual_seed(5), correlated=False)
    steps = list(range(1, schedule.T + 1))
    l_, _, _ = bed.statistics(schedule, steps)
    lam = torch.log(schedule.abar / schedule.bbar)[1:]
    l_dot = torch.gradient(l_, spacing=(lam,), dim=0)[0]
    # Var f = 0: any s works with b = f' - s f = -l' m; take s = 0
    stats = SolverStatistics(
        steps=torch.tensor(steps),
        l=l_,
        s=torch.zeros_like(l_),
        b=-l_dot * bed.mean,
        abar=schedule.abar.clone(),
        image_shape=SHAPE,
    )
    x_T = torch.randn((8, *SHAPE), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = dpm_solver_v3_sample(bed.eps_model(schedule), schedule, stats, x_T, steps=1, order=1,
                               spacing="time-uniform", progress=False)  # fmt: skip
    exact = bed.flow(schedule, x_T, schedule.T, 1)
    plain = dpm_solver_v3_sample(bed.eps_model(schedule), schedule,
                                 SolverStatistics.data_prediction(schedule, SHAPE), x_T, steps=1,
                                 order=1, spacing="time-uniform", progress=False)  # fmt: skip
    assert float((out - exact).abs().max()) < 1e-3
    assert float((plain - exact).abs().max()) > 0.1


@pytest.mark.parametrize("spacing", ["trailing", "time-uniform", "logsnr-uniform"])
def test_one_model_call_per_step(spacing):
    schedule = NoiseSchedule.su_linear(100)
    calls = []

    def eps(x, t):
        calls.append(int(t[0]))
        return 0.5 * x

    stats = SolverStatistics.constant(schedule, SHAPE, l=0.9, s=0.1, b=0.01)
    out = dpm_solver_v3_sample(eps, schedule, stats, (3, *SHAPE), steps=7, order=3,
                               corrector=True, generator=torch.Generator().manual_seed(0),
                               spacing=spacing, progress=False)  # fmt: skip
    assert calls == v3_trajectory(schedule, 7, spacing)[0] and len(calls) == 7
    assert out.shape == (3, *SHAPE) and out.dtype == torch.float32
    assert calls[0] == 100


def test_trajectories():
    schedule = NoiseSchedule.su_linear(1000)
    assert v3_trajectory(schedule, 5) == ([1000, 800, 600, 400, 200], 0)
    assert v3_trajectory(schedule, 3, "time-uniform") == ([1000, 667, 334], 1)
    steps, final = v3_trajectory(schedule, 6, "logsnr-uniform")
    lam = torch.log(schedule.abar / schedule.bbar)[[*steps, final]]
    gaps = lam[1:] - lam[:-1]
    assert final == 1 and bool((gaps > 0).all()) and float(gaps.max() / gaps.min()) < 1.2
    assert v3_trajectory(schedule, [5, 50, 500]) == ([500, 50, 5], 0)
    tiny = NoiseSchedule.su_linear(10)
    assert v3_trajectory(tiny, 10) == (list(range(10, 0, -1)), 0)
    assert v3_trajectory(tiny, 9, "time-uniform") == (list(range(10, 1, -1)), 1)


def test_half_corrector_and_defaults():
    schedule = NoiseSchedule.su_linear(1000)
    stats = SolverStatistics.data_prediction(schedule, SHAPE)
    plan = dpm_solver_v3_plan(schedule, stats, 10, V3Options(order=3, half_corrector=True))
    used = [t for t, c in zip(plan.steps, plan.correctors, strict=True) if c is not None]
    assert used and all(t > 500 for t in used)
    full = dpm_solver_v3_plan(schedule, stats, 10)
    assert [c is not None for c in full.correctors] == [False, False] + [True] * 8
    # lower_order_final (default for K > 5): the order drops to the steps left
    assert [p.order for p in full.predictors] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    few = dpm_solver_v3_plan(schedule, stats, 5)
    assert [p.order for p in few.predictors] == [1, 2, 3, 3, 1]


def test_dtypes_and_devices(testbed):
    schedule = NoiseSchedule.su_linear(200)
    stats = SolverStatistics.data_prediction(schedule, SHAPE)
    eps = testbed.eps_model(schedule)
    x64 = torch.randn((2, *SHAPE), dtype=torch.float64)
    assert (
        dpm_solver_v3_sample(eps, schedule, stats, x64, steps=3, progress=False).dtype
        == torch.float64
    )
    model = torch.nn.Conv2d(1, 1, 1).to(torch.bfloat16)
    out = dpm_solver_v3_sample(lambda x, t: model(x), schedule, stats, x64.float(), steps=3,
                               dtype=torch.bfloat16, progress=False)  # fmt: skip
    assert out.dtype == torch.bfloat16


def test_bad_inputs():
    schedule = NoiseSchedule.su_linear(100)
    stats = SolverStatistics.data_prediction(schedule, SHAPE)
    eps = lambda x, t: x  # noqa: E731
    run = lambda **kw: dpm_solver_v3_sample(  # noqa: E731
        kw.pop("eps_model", eps), kw.pop("schedule", schedule), kw.pop("statistics", stats),
        kw.pop("shape", (2, *SHAPE)), progress=False, **kw,
    )  # fmt: skip
    cases = [
        (dict(eps_model=3), TypeError, "eps_model"),
        (dict(schedule="linear"), TypeError, "schedule"),
        (dict(statistics=None), TypeError, "statistics"),
        (dict(schedule=NoiseSchedule.su_linear(50)), ValueError, "schedule"),
        (dict(shape=(2, 1, 3, 3)), ValueError, "image"),
        (dict(shape=torch.zeros(2, *SHAPE, dtype=torch.long)), TypeError, "x_T"),
        (dict(shape="big"), TypeError, "shape"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=101), ValueError, "steps"),
        (dict(steps=[5, 3]), ValueError, "steps"),
        (dict(steps=2.5), TypeError, "steps"),
        (dict(order=0), ValueError, "order"),
        (dict(order=5), ValueError, "order"),
        (dict(spacing="even"), ValueError, "spacing"),
        (dict(corrector=1), TypeError, "corrector"),
        (dict(pseudo_order="yes"), TypeError, "pseudo_order"),
        (dict(generator=0), TypeError, "generator"),
        (dict(dtype=torch.int64), TypeError, "dtype"),
    ]
    for kwargs, error_type, word in cases:
        with pytest.raises(error_type, match=word):
            run(**kwargs)
    with pytest.raises(NonFiniteError, match="t=100"):
        run(eps_model=lambda x, t: x * math.nan)
    with pytest.raises(ValueError, match="eps_model"):
        run(eps_model=lambda x, t: x[:1])
