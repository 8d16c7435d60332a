"""The statistics shipped for the shipped model: loadable in one call, tied to its exact
weights, used by ``sample(solver="dpm-solver-v3")``; ``max_standard_error`` zeroes exactly the
unresolved ``s, b``."""

from __future__ import annotations

import math

import pytest
import torch

from kexue.diffusion import NoiseSchedule, UNet, sample
from kexue.diffusion.dpm_solver_v3 import dpm_solver_v3_sample
from kexue.diffusion.solver_statistics import (
    SolverStatistics,
    accumulate_solver_sums,
    model_fingerprint,
)
from kexue.testing.ode import GaussianTestbed


@pytest.fixture(scope="module")
def shipped():
    return UNet.from_pretrained("mnist5k"), SolverStatistics.from_pretrained("mnist5k")


def test_shipped_statistics_belong_to_the_shipped_model(shipped):
    model, stats = shipped
    stats.check(model.schedule, (1, 28, 28))
    assert stats.info["model_fingerprint"] == model_fingerprint(model)
    assert stats.num_images == 128 and len(stats.steps) == 16
    # s, b were zeroed exactly at the recorded unresolved steps, l kept everywhere
    zeroed = set(stats.info["s_b_zeroed_at"])
    for g, t in enumerate(stats.steps.tolist()):
        assert (t in zeroed) == bool((stats.s[g] == 0).all() and (stats.b[g] == 0).all())
    assert bool(((stats.l > 0) & (stats.l < 1.5)).all())


def test_sample_uses_the_shipped_statistics_by_default(shipped):
    model, stats = shipped
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    got = sample(model, model.schedule, x_T.shape, steps=3, solver="dpm-solver-v3", x_T=x_T,
                 progress=False)  # fmt: skip
    want = dpm_solver_v3_sample(model, model.schedule, stats, x_T, steps=3, progress=False)
    assert torch.equal(got, want)
    other = UNet.from_pretrained("mnist5k")
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # another model: no statistics shipped for it
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(ValueError, match="statistics"):
        sample(other, model.schedule, x_T.shape, steps=3, solver="dpm-solver-v3", x_T=x_T,
               progress=False)  # fmt: skip


def test_fingerprint_depends_on_every_tensor_and_name():
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.bias[1] += 1e-7
    assert model_fingerprint(a) != model_fingerprint(b)
    with pytest.raises(TypeError, match="model"):
        model_fingerprint(lambda x: x)


def test_max_standard_error_zeroes_only_unresolved_steps():
    """Few pairs at high noise, many at low noise: with a limit between the two steps'
    standard errors of s, the noisy step gets s = b = 0 and the other keeps its estimates
    (l untouched everywhere); no limit or a huge one changes nothing."""
    schedule = NoiseSchedule.su_linear(1000)
    bed = GaussianTestbed.random((1, 2, 2), torch.Generator().manual_seed(0))
    data = bed.sample(400, torch.Generator().manual_seed(1))
    grid = [40, 900]
    pairs = [(i, 40) for i in range(400)] + [(i, 900) for i in range(12)]
    sums = accumulate_solver_sums(bed.eps_model(schedule), schedule, data, pairs, seed=3,
                                  grid=grid, progress=False)  # fmt: skip
    se = sums.standard_errors(schedule)["s"].flatten(1).median(1).values
    assert se[0] < se[1]
    limit = math.sqrt(float(se[0]) * float(se[1]))
    full = sums.statistics(schedule)
    cut = sums.statistics(schedule, max_standard_error=limit)
    assert torch.equal(cut.l, full.l)
    assert torch.equal(cut.s[0], full.s[0]) and torch.equal(cut.b[0], full.b[0])
    assert bool((cut.s[1] == 0).all() and (cut.b[1] == 0).all()) and bool((full.s[1] != 0).any())
    assert cut.info["s_b_zeroed_at"] == [900]
    same = sums.statistics(schedule, max_standard_error=1e9)
    assert torch.equal(same.s, full.s) and torch.equal(same.b, full.b)
    with pytest.raises(ValueError, match="max_standard_error"):
        sums.statistics(schedule, max_standard_error=0.0)
