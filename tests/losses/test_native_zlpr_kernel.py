"""The native ZLPR kernel (kexue.native) against the eager path and the float64 reference of
kexue.testing.zlpr: widths across the vector lanes, hard, soft and bool targets, targets at
the eps boundaries, rows that need the exact path, many threads, no gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kexue.losses.zlpr as zl
import kexue.native as native
from kexue.losses import zlpr_loss
from kexue.testing.zlpr import zlpr_grad_ref, zlpr_ref

F64 = torch.float64


def _targets(kind: str, shape: tuple[int, ...], gen: torch.Generator, dtype) -> torch.Tensor:
    hard = torch.rand(shape, generator=gen) < 0.2
    if kind == "bool":
        return hard
    if kind == "hard":
        return hard.to(dtype)
    soft = torch.rand(shape, generator=gen, dtype=F64).to(dtype)
    return torch.where(torch.rand(shape, generator=gen) < 0.5, hard.to(dtype), soft)


def _loss_and_grad(s: torch.Tensor, t: torch.Tensor, enabled: bool, **kwargs):
    leaf = s.clone().requires_grad_()
    with native.native_kernels(enabled):
        loss = zlpr_loss(leaf, t, reduction="none", **kwargs)
    (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)).sum(
    ).backward()  # fmt: skip
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", ["bool", "hard", "soft"])
@pytest.mark.parametrize("n", [1, 5, 16, 17, 1000])
def test_native_matches_eager_and_the_reference(kernel, dtype, kind: str, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    s = (torch.randn(13, n, generator=gen, dtype=F64) * 4.0).to(dtype)
    t = _targets(kind, (13, n), gen, dtype)
    native_loss, native_grad = _loss_and_grad(s, t, True)
    eager_loss, eager_grad = _loss_and_grad(s, t, False)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == F64 else {"rtol": 2e-6, "atol": 1e-7}
    torch.testing.assert_close(native_loss, eager_loss, **tol)
    torch.testing.assert_close(native_grad, eager_grad, **tol)
    # and against the independent float64 reference
    t64 = t.double()
    torch.testing.assert_close(native_loss.double(), zlpr_ref(s.double(), t64), rtol=1e-5, atol=0)
    weights = torch.linspace(0.5, 1.5, 13, dtype=F64)[:, None]
    ref_grad = zlpr_grad_ref(s.double(), t64) * weights
    torch.testing.assert_close(native_grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_rows_that_need_the_exact_path_take_the_eager_code(kernel) -> None:
    """A score of 120 (exp overflows in float32) makes the kernel report the call not fast:
    the result is the eager one, exact on that row."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(4, 30, generator=gen)
    s[2, 3] = 120.0
    t = _targets("soft", (4, 30), gen, torch.float32)
    lo, hi = zl._snap_thresholds(1e-7, torch.float32)
    bound = zl._max_sum(1e-7, torch.float32)
    _, _, fast = kernel.zlpr(s, t, lo, hi, bound, zl._fast_range(torch.float32, 30), True)
    assert not bool(fast)
    native_loss, native_grad = _loss_and_grad(s, t, True)
    eager_loss, eager_grad = _loss_and_grad(s, t, False)
    assert torch.equal(native_loss, eager_loss) and torch.equal(native_grad, eager_grad)
    torch.testing.assert_close(native_loss.double(), zlpr_ref(s.double(), t.double()))
    fine = s.clone()
    fine[2, 3] = 1.0
    assert bool(kernel.zlpr(fine, t, lo, hi, bound, 60.0, True)[2])


def test_bool_targets_check_the_score_range(kernel) -> None:
    """Bool targets have no eps bound: a score beyond the fast range sends the call to the
    exact path, as on the eager path."""
    s = torch.tensor([[0.5, 85.0, -1.0]])
    t = torch.tensor([[True, False, False]])
    native_loss, native_grad = _loss_and_grad(s, t, True)
    eager_loss, eager_grad = _loss_and_grad(s, t, False)
    assert torch.equal(native_loss, eager_loss) and torch.equal(native_grad, eager_grad)
    assert torch.isfinite(native_loss).all()


def test_native_zlpr_threads_agree_and_no_grad_gives_the_same_loss(kernel, on_threads) -> None:
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(256, 1000, generator=gen)
    t = _targets("soft", (256, 1000), gen, torch.float32)
    one, two = on_threads(lambda: _loss_and_grad(s, t, True))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])  # rows are independent
    with native.native_kernels(True), torch.no_grad():
        assert torch.equal(zlpr_loss(s, t, reduction="none"), one[0])


def test_masks_and_other_layouts_take_the_eager_path(kernel) -> None:
    s = torch.randn(3, 8)
    t = torch.rand(3, 8)
    with native.native_kernels(True):
        assert zl._native_kernel(s, t, None) is kernel
        assert zl._native_kernel(s, t, torch.ones(3, 8, dtype=torch.bool)) is None
        assert zl._native_kernel(s.T, t.T, None) is None  # not contiguous
        assert zl._native_kernel(s.half(), t.half(), None) is None
        assert zl._native_kernel(s, t > 0.5, None) is kernel  # bool labels, read as 0/1
        assert zl._native_kernel(s, t.double(), None) is None
    with native.native_kernels(False):
        assert zl._native_kernel(s, t, None) is None


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_eps_boundaries_in_vector_lanes_and_in_the_tail(kernel, dtype) -> None:
    """The snapping thresholds at their exact boundaries, in a row of 40 (two full vectors of
    float32 lanes and a tail): t = eps kept, the value below dropped; 1 - t at the boundary
    on the other side. Against the independent float64 reference."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    at = float(np_dtype(1e-7))
    below = float(np.nextafter(np_dtype(at), np_dtype(0)))
    top = float(np_dtype(1.0 - 1e-7))
    above = float(np.nextafter(np_dtype(top), np_dtype(1)))
    for cols in ((3, 5, 7, 9), (33, 35, 37, 39)):  # in the first vector, in the tail
        s = torch.zeros(1, 40, dtype=dtype)
        t = torch.zeros(1, 40, dtype=dtype)
        for col, value, score in zip(cols, (at, below, top, above), (-50.0, -50.0, 50.0, 50.0),
                                     strict=True):  # fmt: skip
            s[0, col], t[0, col] = score, value
        leaf = s.clone().requires_grad_()
        with native.native_kernels(True):
            loss = zlpr_loss(leaf, t, reduction="none")
        torch.testing.assert_close(loss.double(), zlpr_ref(s.double(), t.double()), rtol=1e-6,
                                   atol=1e-7)  # fmt: skip
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        torch.testing.assert_close(grad.double(), zlpr_grad_ref(s.double(), t.double()),
                                   rtol=1e-6, atol=1e-7)  # fmt: skip
