"""The native probit kernel (kexue.native) against the eager path and against independent
references: loss and gradient in float32 and float64, far targets, many threads."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import kexue.distributions.maximum as mx
import kexue.native as native
from kexue.distributions import noise_family, perturbed_argmax_cross_entropy
from kexue.testing.perturbed_argmax import reference_probs

F64 = torch.float64


def _loss_and_grad(mu, target, enabled: bool, **kwargs):
    leaf = mu.clone().requires_grad_()
    with native.native_kernels(enabled):
        loss = perturbed_argmax_cross_entropy(leaf, target, "normal", reduction="none", **kwargs)
    (loss * torch.linspace(0.5, 1.5, len(loss), dtype=loss.dtype)).sum().backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n", [1, 2, 7, 16, 100, 1000])
def test_native_matches_the_eager_path(kernel, dtype: torch.dtype, n: int) -> None:
    """Same formulas, other arithmetic: equal to rounding. Widths 1..1000 cover the vector
    loops' full and partial lanes; one target sits 25 below the top (its h underflows)."""
    gen = torch.Generator().manual_seed(n)
    mu = (torch.randn(9, n, generator=gen, dtype=F64) * 3.0).to(dtype)
    target = torch.randint(n, (9,), generator=gen)
    if n > 1:
        mu[0, 0] = mu[0].amax() - 25.0
        target[0] = 0
    native_loss, native_grad = _loss_and_grad(mu, target, True)
    eager_loss, eager_grad = _loss_and_grad(mu, target, False)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 2e-5, "atol": 2e-5}
    torch.testing.assert_close(native_loss, eager_loss, **tol)
    torch.testing.assert_close(native_grad, eager_grad, **tol)
    assert torch.isfinite(native_loss).all() and (n == 1 or native_loss[0] > 100)


def test_native_matches_scipy_and_finite_differences(kernel, random_mu) -> None:
    """Float64 loss against -log p from scipy's adaptive quadrature; the gradient (the kernel
    makes it in the forward) against finite differences of the loss."""
    mu = random_mu((4, 12), 1.5, seed=31)
    target = torch.tensor([0, 11, 5, 5])
    with native.native_kernels(True):
        loss = perturbed_argmax_cross_entropy(mu, target, num_nodes=64, reduction="none")
        ref = [-math.log(reference_probs(mu[i].numpy(), "normal")[int(t)]) for i, t in
               enumerate(target)]  # fmt: skip
        torch.testing.assert_close(loss, torch.tensor(ref, dtype=F64), rtol=1e-7, atol=0)
        leaf = mu.clone().requires_grad_()
        assert gradcheck(
            lambda m: perturbed_argmax_cross_entropy(m, target, num_nodes=64, reduction="sum"),
            (leaf,),
        )


def test_native_gradient_sums_to_zero_and_threads_agree(kernel, on_threads) -> None:
    gen = torch.Generator().manual_seed(3)
    mu = torch.randn(64, 300, generator=gen)
    target = torch.randint(300, (64,), generator=gen)
    one, two = on_threads(lambda: _loss_and_grad(mu, target, True))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])  # rows are independent
    assert one[1].sum(-1).abs().max() < 300 * 1e-7  # float32 rounding of 300 terms


def test_native_without_gradient_gives_the_same_loss(kernel, random_mu) -> None:
    mu = random_mu((5, 40), 2.0, seed=8)
    target = torch.tensor([1, 2, 3, 4, 39])
    with native.native_kernels(True):
        with torch.no_grad():
            plain = perturbed_argmax_cross_entropy(mu, target, reduction="none")
        graded = perturbed_argmax_cross_entropy(mu.clone().requires_grad_(), target, "normal",
                                                reduction="none")  # fmt: skip
    torch.testing.assert_close(plain, graded.detach(), rtol=0, atol=0)


def test_only_normal_float_cpu_rows_in_range_take_the_kernel(kernel, random_mu) -> None:
    mu = random_mu((2, 5), seed=2)
    mu = mu - mu.amax(-1, keepdim=True)
    y = torch.linspace(-6.0, 3.0, 24, dtype=F64).expand(2, 24)
    normal = noise_family("normal")
    with native.native_kernels(True):
        assert mx._native_kernel(mu, normal, y) is kernel
        assert mx._native_kernel(mu.float(), normal, y.float()) is kernel
        assert mx._native_kernel(mu, noise_family("logistic"), y) is None
        assert mx._native_kernel(mu, normal, y - 40.0) is None  # erfc would underflow
    with native.native_kernels(False):
        assert mx._native_kernel(mu, normal, y) is None


def test_native_takes_classes_along_any_dim(kernel, random_mu) -> None:
    """Classes along dim 0 (a non-contiguous view inside): the same losses and gradient."""
    mu = random_mu((6, 20), 2.0, seed=9)
    target = torch.tensor([0, 19, 4, 4, 7, 1])
    rows = _loss_and_grad(mu, target, True)
    leaf = mu.T.contiguous().requires_grad_()
    with native.native_kernels(True):
        loss = perturbed_argmax_cross_entropy(leaf, target, dim=0, reduction="none")
    (loss * torch.linspace(0.5, 1.5, 6, dtype=loss.dtype)).sum().backward()
    torch.testing.assert_close(loss.detach(), rows[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(leaf.grad.T, rows[1], rtol=1e-12, atol=1e-13)
