"""A bfloat16 model in estimate_moments and nll_bpd: the model runs in bfloat16 on its device,
the schedule arithmetic (x_t, x0_hat, the sums, the KL terms) stays in float64.

Tolerances (stated): the same model in float32 is the reference; bfloat16 keeps 8 bits of
mantissa (relative rounding 2^-9 ~ 2e-3 per weight), so eps_theta differs by ~1e-3 relative
and the moments by ~3e-3 relative (max over steps); the NLL bound agrees to 1e-3 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kexue.diffusion import estimate_moments, nll_bpd
from kexue.testing.diffusion import distributed_problem


@pytest.fixture(scope="module")
def models():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    problem = distributed_problem()
    model = problem["model"]
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():  # the fresh U-Net's zero output layer would make every moment 0
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    yield problem, model, copy.deepcopy(model).to(torch.bfloat16)
    torch.set_num_threads(before)


def run(problem, model):
    S = problem["schedule"]
    moments = estimate_moments(model, S, problem["train"], num_images=10, progress=False,
                               generator=torch.Generator().manual_seed(2))  # fmt: skip
    nll = nll_bpd(model, S, problem["heldout"], steps=4, variance="large", progress=False,
                  generator=torch.Generator().manual_seed(3))  # fmt: skip
    return moments, nll


def test_bfloat16_model_against_float32(models) -> None:
    problem, f32, bf16 = models
    (m32, n32), (m16, n16) = run(problem, f32), run(problem, bf16)
    assert m16.Gamma.dtype == torch.float64 and n16.bpd_per_image.dtype == torch.float64
    assert float(m32.Gamma.mean()) > 0.01  # a model with non-trivial output
    torch.testing.assert_close(m16.Gamma, m32.Gamma, rtol=1e-2, atol=0)
    torch.testing.assert_close(m16.err, m32.err, rtol=1e-2, atol=0)
    torch.testing.assert_close(m16.moment, m32.moment, rtol=0, atol=1e-3)
    torch.testing.assert_close(m16.sbar2(), m32.sbar2(), rtol=1e-2, atol=1e-5)
    assert n16.bpd == pytest.approx(n32.bpd, rel=1e-3)
    # the noise is the same (keyed, float64): only the model's rounding differs
    assert not torch.equal(m16.Gamma, m32.Gamma)
