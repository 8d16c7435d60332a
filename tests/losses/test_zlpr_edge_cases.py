"""ZLPR edge cases: the eps rule on the fast path, +inf scores, zero classes, devices, renamed
arguments. References: ``kexue.testing.zlpr`` (float64, explicit term lists) and limits worked
out by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from kexue.losses import (
    SparseZLPRLoss,
    ZLPRLoss,
    label_smoothing,
    mixup,
    sparse_zlpr_loss,
    zlpr_loss,
)
from kexue.testing.zlpr import zlpr_grad_ref, zlpr_ref

# every test twice: kexue's native kernel, then the eager path (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")

F64 = torch.float64
INF = math.inf


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("side", ["zero", "one"])
def test_soft_targets_within_eps_snap_on_the_fast_path(dtype: torch.dtype, side: str) -> None:
    """Moderate scores (the fast path): t = 1e-9 < eps drops the -s term. Keeping it adds
    ``1e-9 e^{50}`` to the positive sum, a loss of 29.6 instead of 0.44. The mirror case:
    ``1 - t = 2^-24 < eps`` drops the +s term."""
    s = torch.tensor([[-50.0, 2.0, -1.0]], dtype=dtype)
    t = torch.tensor([[1e-9, 1.0, 0.0]], dtype=dtype)
    if side == "one":
        s, t = -s, torch.tensor([[1.0 - 2.0**-24, 0.0, 1.0]], dtype=dtype)
    s.requires_grad_()
    loss = zlpr_loss(s, t, reduction="none")
    ref = zlpr_ref(s, t)
    assert ref.item() == pytest.approx(0.4396, abs=1e-3)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    torch.testing.assert_close(grad.double(), zlpr_grad_ref(s, t), rtol=1e-6, atol=1e-7)


def _inf_case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # row 0: +inf on a negative; row 1: +inf on a positive; row 2: two +inf negatives of
    # weights 1 and 1/4 (soft target 3/4); row 3: finite.
    s = torch.tensor(
        [[INF, 0.5, 1.0], [INF, 0.5, -1.0], [INF, INF, 0.0], [0.3, -0.2, 1.0]], dtype=dtype
    )
    t = torch.tensor(
        [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.75, 1.0], [1.0, 0.0, 0.0]], dtype=dtype
    )
    return s, t


def _expected_grad() -> torch.Tensor:
    """Rows with an infinite negative term: weight 1 on its +inf scores (shared equally), 0 on
    the term's finite scores; the positive term as in the finite reference."""
    s, t = _inf_case(F64)
    g = torch.zeros(s.shape, dtype=F64)
    # row 0: the positive term has class 1 only: d/ds1 log(1 + e^{-s1}) = -sigmoid(-s1)
    g[0] = torch.tensor([1.0, -1.0 / (1.0 + math.exp(0.5)), 0.0])
    # row 1: the +inf positive drops out of both terms (e^{-inf} = 0, weight 1 - t = 0)
    g[1, 1:] = zlpr_grad_ref(s[1:2, 1:], t[1:2, 1:]).squeeze(0)
    # row 2: negatives 0 (w = 1) and 1 (w = 1/4) are +inf and share the weight equally (the
    # convention of lse); class 1's positive term log(1 + 0.75 e^{-inf}) vanishes, class 2's
    # is log(1 + e^{-0}): slope -1/2.
    g[2] = torch.tensor([0.5, 0.5, -0.5])
    g[3] = zlpr_grad_ref(s[3:], t[3:]).squeeze(0)
    return g


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", ["float", "bool", "target_grad", "module"])
def test_positive_infinity_gives_inf_like_bce(dtype: torch.dtype, kind: str) -> None:
    s, t = _inf_case(dtype)
    if kind == "bool":
        s, t = s[:2], t[:2] > 0.5
    target = t.clone().requires_grad_() if kind == "target_grad" else t
    leaf = s.clone().requires_grad_()
    fn = ZLPRLoss(reduction="none") if kind == "module" else None
    loss = fn(leaf, target) if fn is not None else zlpr_loss(leaf, target, reduction="none")
    bce = F.binary_cross_entropy_with_logits(s[0], t[0].to(dtype), reduction="sum")
    assert bce.item() == INF and loss[0].item() == INF
    # +inf on a positive class: that class drops out of both terms (finite loss).
    finite_ref = zlpr_ref(s[1:2, 1:], t[1:2, 1:].to(dtype)).item()
    assert loss[1].item() == pytest.approx(finite_ref, rel=1e-6)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert not torch.isnan(grad).any()
    expected = _expected_grad()[: len(s)]
    torch.testing.assert_close(grad.double(), expected, rtol=1e-6, atol=1e-7)
    if kind == "target_grad":
        (t_grad,) = torch.autograd.grad(
            zlpr_loss(s, target, reduction="none")[0], target, allow_unused=True
        )
        # dL/dt_0 -> -1 / (1 - t_0) = -1: the limit of -e^{s}/(1 + sum (1 - t) e^{s})
        assert t_grad[0, 0].item() == pytest.approx(-1.0)


def test_positive_infinity_in_the_sparse_loss() -> None:
    s = torch.tensor([[INF, 0.5, 1.0], [INF, 0.5, -1.0], [INF, INF, 0.0]], requires_grad=True)
    target = torch.tensor([[1, -1], [0, 1], [1, -1]])  # row 2: +inf on a positive and a negative
    loss = sparse_zlpr_loss(s, target, reduction="none")
    assert loss[0].item() == INF and loss[2].item() == INF
    dense = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert loss[1].item() == pytest.approx(zlpr_loss(s[1:2], dense[1:2]).item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    assert not torch.isnan(grad).any()
    assert grad[0, 0].item() == 1.0 and grad[0, 2].item() == 0.0
    assert grad[2].tolist() == [1.0, 0.0, 0.0]


def test_zero_classes_are_an_error() -> None:
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(ValueError, match=r"scores must hold at least one class"):
            zlpr_loss(torch.zeros(4, 0), torch.zeros(4, 0, dtype=dtype))
    with pytest.raises(ValueError, match=r"scores must hold at least one class"):
        sparse_zlpr_loss(torch.zeros(4, 0), torch.zeros(4, 0, dtype=torch.long))
    # No rows (an empty batch) is not an error: the mean of nothing, like torch's losses.
    assert zlpr_loss(torch.zeros(0, 3), torch.zeros(0, 3), reduction="none").shape == (0,)


@pytest.mark.parametrize(
    "call, names",
    [
        (lambda s, m: zlpr_loss(s, m.zeros(2, 3)), ("target", "scores")),
        (lambda s, m: zlpr_loss(s, torch.zeros(2, 3), mask=m.ones(2, 3).bool()), ("mask",)),
        (lambda s, m: zlpr_loss(s, torch.zeros(2, 3), weight=m.ones(2)), ("weight",)),
        (lambda s, m: zlpr_loss(s, torch.zeros(2, 3), threshold=m.zeros(3)), ("threshold",)),
        (lambda s, m: sparse_zlpr_loss(s, m.zeros(2, 1).long()), ("target", "scores")),
        (lambda s, m: mixup(s, m.zeros(2, 3), 0.5), ("target", "x")),
    ],
)
def test_tensors_on_different_devices_are_named(call, names) -> None:
    class Meta:  # tensors on the meta device, built like torch.zeros/ones
        zeros = staticmethod(lambda *shape: torch.zeros(*shape, device="meta"))
        ones = staticmethod(lambda *shape: torch.ones(*shape, device="meta"))

    with pytest.raises(ValueError, match="meta") as info:
        call(torch.zeros(2, 3), Meta)
    for name in names:
        assert name in str(info.value)


def test_old_argument_names_still_work_with_a_deprecation_warning() -> None:
    s = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    t = torch.rand(3, 5, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([[0, 2], [1, -1], [4, 3]])
    cases = [
        (lambda: zlpr_loss(s, targets=t), lambda: zlpr_loss(s, target=t)),
        (lambda: ZLPRLoss()(s, targets=t), lambda: ZLPRLoss()(s, target=t)),
        (lambda: sparse_zlpr_loss(s, positives=idx), lambda: sparse_zlpr_loss(s, target=idx)),
        (lambda: SparseZLPRLoss()(s, positives=idx), lambda: SparseZLPRLoss()(s, idx)),
        (lambda: label_smoothing(targets=t, alpha=0.1), lambda: label_smoothing(t, 0.1)),
    ]
    for old, new in cases:
        with pytest.warns(DeprecationWarning, match="'target'"):
            got = old()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(got, new())
    gen = torch.Generator()
    with pytest.warns(DeprecationWarning, match="mixup"):
        a = mixup(s, targets=t, alpha=0.5, generator=gen.manual_seed(3))
    b = mixup(s, t, 0.5, generator=gen.manual_seed(3))
    torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="both 'target' and its deprecated name 'targets'"):
        zlpr_loss(s, target=t, targets=t)
