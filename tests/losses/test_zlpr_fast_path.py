"""The fused fast path of ``zlpr_loss`` (float targets): the ``eps`` snapping at its exact
boundaries, the sums' bound that sends subnormal or overflowed ``exp(s)`` to the exact path,
and the batched backward, against the float64 reference of ``kexue.testing.zlpr``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kexue.losses import zlpr_loss
from kexue.testing.zlpr import zlpr_grad_ref, zlpr_ref

# every test twice: kexue's native kernel, then the eager path (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")

F64 = torch.float64


def _check(s: torch.Tensor, t: torch.Tensor, rtol: float = 1e-6) -> None:
    s = s.clone().requires_grad_()
    loss = zlpr_loss(s, t, reduction="none")
    torch.testing.assert_close(loss.double(), zlpr_ref(s, t), rtol=rtol, atol=1e-7)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    torch.testing.assert_close(grad.double(), zlpr_grad_ref(s, t), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_targets_at_the_eps_boundaries(dtype: torch.dtype) -> None:
    """``t`` equal to ``eps`` (rounded to the dtype) is kept, the next value below dropped;
    ``t`` equal to ``1 - eps`` keeps its ``+s`` term. Scores of 50 make each term visible."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    at = float(np_dtype(1e-7))
    below = float(np.nextafter(np_dtype(at), np_dtype(0)))
    top = float(np_dtype(1.0 - 1e-7))
    s = torch.tensor([[-50.0, 2.0], [-50.0, 2.0], [50.0, -2.0]], dtype=dtype)
    t = torch.tensor([[at, 1.0], [below, 1.0], [top, 0.0]], dtype=dtype)
    _check(s, t)
    loss = zlpr_loss(s, t, reduction="none")
    assert loss[0] > 30 and loss[1] < 1 and loss[2] > 30


def test_subnormal_exp_takes_the_exact_path() -> None:
    """float32 ``exp(-100)`` is subnormal (a few significant bits): ``t / exp(s)`` is finite
    but 4% off. The sums' bound must send the row to the max-shifted path."""
    s = torch.tensor([[-100.0, 0.0, 1.0]])
    t = torch.tensor([[1e-6, 0.0, 1.0]])
    _check(s, t)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_mixed_fast_and_exact_rows_with_weights_and_mask(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 9, generator=gen, dtype=F64) * 4).to(dtype)
    s[1, 3] = 95.0 if dtype == torch.float32 else 750.0  # exp overflows: exact path
    s[4, 0] = -120.0 if dtype == torch.float32 else -800.0
    t = torch.rand(6, 9, generator=gen, dtype=F64).to(dtype)
    t[::2] = (t[::2] > 0.7).to(dtype)
    _check(s, t)
    mask = torch.rand(6, 9, generator=gen) > 0.2
    weight = torch.rand(6, generator=gen, dtype=F64).to(dtype)
    leaf = s.clone().requires_grad_()
    loss = zlpr_loss(leaf, t, mask=mask, weight=weight, reduction="sum")
    ref = (zlpr_ref(s, t, mask=mask) * weight.double()).sum()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, leaf)
    ref_grad = zlpr_grad_ref(s, t, mask=mask) * weight.double()[:, None]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_backward_twice_with_retained_graph() -> None:
    """The backward reuses a forward buffer for the gradient; a second backward allocates."""
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(4, 7, generator=gen).requires_grad_()
    t = (torch.rand(4, 7, generator=gen) > 0.5).float()
    loss = zlpr_loss(s, t)
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(g1.double(), zlpr_grad_ref(s, t) / 4, rtol=1e-5, atol=1e-7)
