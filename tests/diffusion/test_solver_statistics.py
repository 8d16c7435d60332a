"""estimate_solver_statistics on the exact Gaussian testbed (closed forms of l, s, b), Stein's
identity on a nonlinear model, split invariance of the pair loop, save/load and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kexue.diffusion import NoiseSchedule
from kexue.diffusion.solver_statistics import (
    SolverStatistics,
    accumulate_solver_sums,
    estimate_solver_statistics,
    log_snr,
    pair_generator,
    statistics_grid,
)
from kexue.exceptions import CheckpointError, NonFiniteError
from kexue.testing.ode import GaussianTestbed

SHAPE = (1, 2, 2)
UNBOUNDED = (-math.inf, math.inf)
CENTRES = [30, 150, 400, 700]


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.su_linear(1000)


@pytest.fixture(scope="module")
def testbed() -> GaussianTestbed:
    return GaussianTestbed.random(SHAPE, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def estimated(schedule, testbed):
    """Sums of the exact model's JVP terms over 1,000 images at uneven triples of
    neighbouring steps (so the slope of l in lambda is resolved at each centre)."""
    data = testbed.sample(1000, torch.Generator().manual_seed(1))
    grid = sorted({c + k for c in CENTRES for k in (-1, 0, 2)})  # uneven in lambda on purpose
    pairs = [(i, t) for t in grid for i in range(len(data))]
    sums = accumulate_solver_sums(testbed.eps_model(schedule), schedule, data, pairs, seed=2,
                                  grid=grid, batch_size=1000, progress=False)  # fmt: skip
    return sums, data, grid


def test_statistics_match_their_closed_form(schedule, testbed, estimated):
    """l within 4.5 Monte Carlo standard errors of its closed form; s and b within 4.5 standard
    errors of the closed forms of the optimal s, b *for the estimated l* (what the solver
    uses: f is built with the same l)."""
    sums, _, grid = estimated
    stats = sums.statistics(schedule, ridge=0.0)
    se = sums.standard_errors(schedule)
    rows = [grid.index(c) for c in CENTRES]
    l_, _, _ = testbed.statistics(schedule, CENTRES)
    assert bool(((stats.l[rows] - l_).abs() < 4.5 * se["l"][rows]).all())
    # the slope of the estimated l in lambda: three-point second-order differences
    lam = log_snr(schedule)
    slopes = []
    for r in rows:
        hm = float(lam[grid[r - 1]] - lam[grid[r]])
        hp = float(lam[grid[r]] - lam[grid[r + 1]])
        lm, l0, lp = stats.l[r - 1], stats.l[r], stats.l[r + 1]  # lm at the larger lambda
        slopes.append((hp**2 * (lm - l0) + hm**2 * (l0 - lp)) / (hm * hp * (hm + hp)))
    l_dot = torch.stack(slopes)
    _, s, b = testbed.statistics(schedule, CENTRES, l=stats.l[rows], l_dot=l_dot)
    assert bool(((stats.s[rows] - s).abs() < 4.5 * se["s"][rows]).all())
    # b = E f' - s E f: its error is that of s times |E f| plus that of E f'
    e_f = -l_ * testbed.mean
    assert bool(((stats.b[rows] - b).abs() < 4.5 * se["s"][rows] * e_f.abs() + 0.01).all())
    assert float(se["s"][rows].max()) < 0.3 and float(se["l"][rows].max()) < 0.01


def test_estimate_runs_the_pair_loop(schedule, testbed):
    """estimate_solver_statistics = the sums over its pairs (seed from the generator)."""
    data = testbed.sample(30, torch.Generator().manual_seed(3))
    eps = testbed.eps_model(schedule)
    stats = estimate_solver_statistics(eps, schedule, data, num_images=None, grid=[10, 500],
                                       data_range=UNBOUNDED, progress=False,
                                       generator=torch.Generator().manual_seed(4))  # fmt: skip
    pairs = [(i, t) for t in (10, 500) for i in range(30)]
    sums = accumulate_solver_sums(eps, schedule, data, pairs, seed=stats.info["seed"],
                                  grid=[10, 500], progress=False)  # fmt: skip
    again = sums.statistics(schedule, ridge=stats.info["ridge"])
    assert torch.equal(again.l, stats.l) and torch.allclose(again.s, stats.s, rtol=1e-12)
    assert stats.num_images == 30 and stats.info["method"] == "jvp"


def test_finite_differences_agree_with_jvp(schedule, testbed, estimated):
    """The autodiff-free route: central differences for J v and along the ODE, same noise."""
    _, data, grid = estimated
    eps = testbed.eps_model(schedule)
    pairs = [(i, t) for t in grid for i in range(300)]
    run = lambda method: accumulate_solver_sums(  # noqa: E731
        eps, schedule, data, pairs, seed=5, grid=grid, method=method, batch_size=3600,
        progress=False,
    ).statistics(schedule, ridge=0.0)  # fmt: skip
    jvp, fd = run("jvp"), run("finite-difference")
    assert torch.allclose(fd.l, jvp.l, atol=1e-6)
    assert torch.allclose(fd.s, jvp.s, atol=1e-2, rtol=1e-2)
    assert torch.allclose(fd.b, jvp.b, atol=1e-3, rtol=1e-2)


class Nonlinear(torch.nn.Module):
    """A small nonlinear eps-model (tanh of a mixing, scaled by the step)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.W = torch.nn.Parameter(torch.randn(4, 4, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = (t.double() / 100).view(-1, 1)
        h = torch.tanh(x.reshape(len(x), 4) @ self.W * scale)
        return (h @ self.W.T + 0.3 * x.reshape(len(x), 4)).reshape(x.shape)


def test_l_matches_steins_identity_on_a_nonlinear_model(schedule):
    """bbar E[diag J] = E[eps * eps_theta(x_t)] for x_t = abar x_0 + bbar eps (Gaussian
    integration by parts): an estimate of l that uses no derivative at all."""
    model = Nonlinear()
    data = (
        torch.rand((4000, *SHAPE), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        * 2
        - 1
    )
    steps = [50, 300]
    stats = estimate_solver_statistics(model, schedule, data, num_images=None, grid=steps,
                                       generator=torch.Generator().manual_seed(5),
                                       progress=False, batch_size=4000)  # fmt: skip
    g = torch.Generator().manual_seed(6)
    for row, t in enumerate(steps):
        eps = torch.randn(data.shape, generator=g, dtype=torch.float64)
        a, b = float(schedule.abar[t]), float(schedule.bbar[t])
        with torch.no_grad():
            v = eps * model(a * data + b * eps, torch.full((len(data),), t))
        se = v.std(0) / math.sqrt(len(data))
        assert bool(((stats.l[row] - v.mean(0)).abs() < 5 * se).all())


def test_pairs_split_across_processes_add_up(schedule, testbed):
    """Noise keyed by (seed, image, step): any split of the pairs, in any order and batch
    size, sums to the same statistics (what many processes will do)."""
    data = testbed.sample(40, torch.Generator().manual_seed(7))
    eps = testbed.eps_model(schedule)
    grid = [1, 10, 500, 1000]
    pairs = [(i, t) for t in grid for i in range(40)]
    whole = accumulate_solver_sums(eps, schedule, data, pairs, seed=11, grid=grid, progress=False)
    first = accumulate_solver_sums(eps, schedule, data, pairs[1::2], seed=11, grid=grid,
                                   batch_size=7, progress=False)  # fmt: skip
    second = accumulate_solver_sums(eps, schedule, data, pairs[::2][::-1], seed=11, grid=grid,
                                    batch_size=13, progress=False)  # fmt: skip
    merged = first.merge(second)
    assert torch.allclose(merged.sums, whole.sums, rtol=1e-12, atol=0)
    assert torch.equal(merged.counts, whole.counts)
    a, b = merged.statistics(schedule), whole.statistics(schedule)
    assert torch.allclose(a.l, b.l, rtol=1e-12, atol=0)
    # s = Cov / Var amplifies rounding where Var f is tiny (40 images at t = 1)
    assert torch.allclose(a.s, b.s, rtol=1e-5) and torch.allclose(a.b, b.b, rtol=1e-5)
    # the key really is (seed, image, step)
    draw = lambda *key: torch.randn(3, generator=pair_generator(*key))  # noqa: E731
    assert torch.equal(draw(1, 2, 3), draw(1, 2, 3))
    assert not torch.equal(draw(1, 2, 3), draw(1, 3, 2)) and not torch.equal(
        draw(1, 2, 3), draw(2, 2, 3)
    )


def test_estimate_is_reproducible_and_uses_a_subset(schedule, testbed):
    data = testbed.sample(50, torch.Generator().manual_seed(8))
    run = lambda seed: estimate_solver_statistics(  # noqa: E731
        testbed.eps_model(schedule), schedule, data, num_images=20, grid=5,
        data_range=UNBOUNDED, generator=torch.Generator().manual_seed(seed), progress=False,
    )  # fmt: skip
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.l, b.l) and torch.equal(a.s, b.s) and not torch.equal(a.l, c.l)
    assert a.num_images == 20 and len(a.steps) <= 5 and a.steps[0] == 1 and a.steps[-1] == 1000


def test_grid_is_even_in_lambda(schedule):
    steps = statistics_grid(schedule, 30)
    lam = log_snr(schedule)[steps]
    assert steps[0] == 1 and steps[-1] == schedule.T and len(steps) <= 30
    gaps = (lam[:-1] - lam[1:]).abs()
    assert float(gaps.max()) < 2.5 * float(lam[1] - lam[-1]) / 29 + 0.36  # step 1 -> 2 is 0.35
    assert statistics_grid(schedule, [3, 7]) == [3, 7]


def test_interpolation_is_linear_in_lambda(schedule):
    zeros = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    stats = SolverStatistics(
        steps=torch.tensor([10, 100]), l=torch.tensor([[[[1.0]]], [[[3.0]]]], dtype=torch.float64),
        s=zeros, b=zeros, abar=schedule.abar.clone(), image_shape=(1, 1, 1),
    )  # fmt: skip
    lam = log_snr(schedule)
    l_, _, _ = stats.at([5, 10, 40, 100, 900])
    w = (lam[40] - lam[10]) / (lam[100] - lam[10])
    expected = torch.tensor([1.0, 1.0, 1 + 2 * float(w), 3.0, 3.0], dtype=torch.float64)
    assert torch.allclose(l_.flatten(), expected)


def test_save_load_round_trip_is_bit_identical(tmp_path, schedule, estimated):
    stats = estimated[0].statistics(schedule)
    folder = stats.save_pretrained(tmp_path / "stats")
    back = SolverStatistics.from_pretrained(folder)
    for name in ("steps", "l", "s", "b", "abar"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
    assert back.image_shape == stats.image_shape and back.num_images == stats.num_images
    assert back.info == stats.info and back.schedule_config == stats.schedule_config
    config = json.loads((folder / "config.json").read_text())
    assert config["_kexue_class"] == "kexue.diffusion.SolverStatistics"
    (folder / "statistics.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="SHA-256"):
        SolverStatistics.from_pretrained(folder)


def test_refuses_another_schedule_or_shape(schedule):
    stats = SolverStatistics.data_prediction(schedule, SHAPE)
    stats.check(schedule, (7, *SHAPE))
    with pytest.raises(ValueError, match="schedule"):
        stats.check(NoiseSchedule.cosine(1000))
    with pytest.raises(ValueError, match="image"):
        stats.check(schedule, (1, 3, 3))
    with pytest.raises(TypeError, match="schedule"):
        stats.check("su_linear")


def test_bad_inputs(schedule, testbed):
    data = testbed.sample(10, torch.Generator().manual_seed(9)).clamp(-1, 1)
    eps = testbed.eps_model(schedule)

    def run(**kw):
        args = dict(eps_model=eps, schedule=schedule, data=data)
        args.update({k: kw.pop(k) for k in list(kw) if k in args})
        kw.setdefault("grid", 3)
        return estimate_solver_statistics(args["eps_model"], args["schedule"], args["data"],
                                          progress=False, **kw)  # fmt: skip

    cases = [
        (dict(eps_model="model"), TypeError, "eps_model"),
        (dict(schedule=None), TypeError, "schedule"),
        (dict(data=[1, 2]), TypeError, "data"),
        (dict(data=torch.zeros(4, 1, 2, 2, dtype=torch.long)), TypeError, "data"),
        (dict(data=data * math.nan), ValueError, "data"),
        (dict(data=data * 100), ValueError, "data_range"),
        (dict(num_images=1), ValueError, "num_images"),
        (dict(method="adjoint"), ValueError, "method"),
        (dict(grid=1), ValueError, "grid"),
        (dict(grid=[5, 2]), ValueError, "grid"),
        (dict(grid=[0, 5]), ValueError, "grid"),
        (dict(grid="all"), TypeError, "grid"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(generator=1), TypeError, "generator"),
        (dict(ridge=-1.0), ValueError, "ridge"),
        (dict(data_range=(1, -1)), ValueError, "data_range"),
    ]
    for kwargs, error_type, word in cases:
        with pytest.raises(error_type, match=word):
            run(**kwargs)
    with pytest.raises(NonFiniteError, match="eps_model"):
        run(eps_model=lambda x, t: x * math.inf)
    model = Nonlinear()
    model.schedule = NoiseSchedule.cosine(1000)
    with pytest.raises(ValueError, match="schedule"):
        run(eps_model=model)
    with pytest.raises(ValueError, match="shape"):
        SolverStatistics(steps=torch.tensor([1, 5]), l=torch.zeros(3, *SHAPE),
                         s=torch.zeros(2, *SHAPE), b=torch.zeros(2, *SHAPE), abar=schedule.abar,
                         image_shape=SHAPE)  # fmt: skip
