"""Edge cases of ``kexue.ops``: +inf entries, the implicit zero's shift, empty reductions, devices.

Expected values come from ``kexue.testing.logsumexp`` (float64 ``math.fsum``) or are limits
worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from kexue.ops import logsumexp, logsumexp_bounds, logsumexp_lower_bound, renyi_entropy
from kexue.testing.logsumexp import lse_rows, lse_terms

F64 = torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_implicit_zero_enters_the_max_shift(dtype: torch.dtype) -> None:
    """``log(1 + e^-100 + e^-120) = 0`` (to float precision): shifting by the row max alone
    (-100) would compute ``log(e^100 + ...)``, which overflows to inf in float32."""
    rows = [[-100.0, -120.0], [-800.0, -900.0], [-50.0, 3.0]]
    x = torch.tensor(rows, dtype=dtype)
    got = logsumexp(x, implicit_zero=True)
    ref = torch.tensor([lse_terms([0.0, *r]) for r in rows], dtype=F64)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_positive_infinity_gives_inf_with_the_limit_gradient(dtype: torch.dtype) -> None:
    """A row holding +inf: lse = +inf; the gradient is the limit of softmax, shared equally by
    the +inf entries (torch.logsumexp gives nan there)."""
    inf = math.inf
    x = torch.tensor(
        [[inf, 1.0, 100.0], [inf, inf, -2.0], [1.0, 2.0, 3.0], [-inf, inf, -inf]],
        dtype=dtype,
        requires_grad=True,
    )
    out = logsumexp(x)
    assert out[:2].tolist() == [inf, inf] and out[3].item() == inf
    assert out[2].item() == pytest.approx(lse_terms([1.0, 2.0, 3.0]), rel=1e-6)
    (grad,) = torch.autograd.grad(out, x, torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=dtype))
    soft = torch.softmax(torch.tensor([1.0, 2.0, 3.0], dtype=F64), 0)
    expected = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], soft.tolist(), [0.0, 1.0, 0.0]], dtype=F64
    )
    torch.testing.assert_close(grad.double(), expected, rtol=1e-6, atol=1e-7)


def test_positive_infinity_with_implicit_zero_and_mask() -> None:
    x = torch.tensor([[math.inf, 5.0], [math.inf, 5.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [False, True]])
    out = logsumexp(x, mask=mask, implicit_zero=True)
    assert out[0].item() == math.inf
    assert out[1].item() == pytest.approx(lse_rows(x.detach()[1:], mask[1:], implicit_zero=True)[0])
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad[0].tolist() == [1.0, 0.0]
    assert grad[1, 0].item() == 0.0 and grad[1, 1].item() == pytest.approx(1 / (1 + math.exp(-5)))


def test_bounds_need_at_least_one_entry() -> None:
    with pytest.raises(ValueError, match=r"x must hold at least one entry along dim"):
        logsumexp_bounds(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="x must hold at least one entry"):
        logsumexp_bounds(torch.zeros(0, 4), dim=0)
    lower, upper = logsumexp_bounds(torch.zeros(0, 4))  # no rows: empty bounds, not an error
    assert lower.shape == upper.shape == (0,)


def test_tensors_on_different_devices_are_named() -> None:
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"mask is on meta but x is on cpu"):
        logsumexp(x, mask=torch.ones(3, 4, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"p is on meta but x is on cpu"):
        logsumexp_lower_bound(x, torch.full((3, 4), 0.25, device="meta"))


def test_renyi_entropy_validates_its_arguments() -> None:
    p = torch.tensor([0.5, 0.25, 0.25], dtype=F64)
    assert renyi_entropy(p, 2.0).item() == pytest.approx(-math.log(0.375))
    with pytest.raises(TypeError, match="p must be a floating-point tensor"):
        renyi_entropy(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="order"):
        renyi_entropy(p, -1.0)
    with pytest.raises(TypeError, match="order"):
        renyi_entropy(p, "2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order"):
        logsumexp_lower_bound(torch.zeros(3, dtype=F64), p, order=0.5)
