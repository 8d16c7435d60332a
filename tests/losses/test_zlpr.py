"""Dense ZLPR loss against an independent float64 reference (``kexue.testing.zlpr``)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from kexue.losses import ZLPRLoss, zlpr_loss, zlpr_predict, zlpr_probabilities
from kexue.testing.zlpr import zlpr_grad_ref, zlpr_ref, zlpr_target_grad_ref

# every test twice: kexue's native kernel, then the eager path (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")

F64 = torch.float64
ROWS, N = 6, 20


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    )


def _targets(kind: str, shape: tuple[int, ...], g: torch.Generator, dtype: torch.dtype):
    hard = torch.rand(shape, generator=g) < 0.3
    hard[..., 0, :] = False  # a row with no positives
    hard[..., 1, :] = True  # a row with no negatives
    if kind == "bool":
        return hard
    if kind == "hard":
        return hard.to(dtype)
    soft = torch.rand(shape, generator=g, dtype=F64)
    soft[..., 2, :3] = torch.tensor([0.0, 1.0, 0.5], dtype=F64)  # exact 0 and 1 mixed in
    return soft.to(dtype)


def _mask(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    mask = torch.rand(shape, generator=g) < 0.75
    mask[..., 3, :] = False  # an all-masked row: loss 0
    return mask


# Value and gradient against the reference -----------------------------------------------------


@pytest.mark.parametrize("threshold", ["zero", "float", "tensor"])
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0, 1000.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", ["hard", "bool", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(
    gen, dtype, kind: str, masked: bool, scale: float, threshold: str
) -> None:
    g = gen(zlib.crc32(repr((kind, masked, scale, threshold)).encode()))
    scores = (torch.randn(ROWS, N, generator=g, dtype=F64) * scale).to(dtype)
    targets = _targets(kind, (ROWS, N), g, dtype)
    mask = _mask((ROWS, N), g) if masked else None
    thr = {"zero": 0.0, "float": 0.7, "tensor": torch.randn(N, generator=g).to(dtype)}[threshold]
    scores.requires_grad_()
    loss = zlpr_loss(scores, targets, mask=mask, threshold=thr, reduction="none")
    assert loss.shape == (ROWS,)
    ref = zlpr_ref(scores, targets, mask, thr)
    torch.testing.assert_close(loss.double(), ref, **_tol(dtype))
    (grad,) = torch.autograd.grad(loss.sum(), scores)
    assert grad.dtype == dtype
    grad_tol = _tol(dtype)
    if dtype == torch.float32 and threshold != "zero":
        # s - s0 is rounded in float32 (error ~ eps |s|); the gradient moves by at most that.
        grad_tol["atol"] += 2 * torch.finfo(dtype).eps * scores.detach().abs().max().item()
    torch.testing.assert_close(grad.double(), zlpr_grad_ref(scores, targets, mask, thr), **grad_tol)
    if masked:
        assert loss[3].item() == 0.0
        assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_leading_dims_reductions_and_weight(gen, reduction: str, weighted: bool) -> None:
    g = gen(1)
    scores = torch.randn(2, 5, 7, generator=g, dtype=F64) * 4
    targets = torch.rand(2, 5, 7, generator=g, dtype=F64)
    mask = torch.rand(2, 5, 7, generator=g) < 0.8
    weight = torch.rand(5, generator=g, dtype=F64) if weighted else None  # broadcasts to (2, 5)
    loss = zlpr_loss(scores, targets, mask=mask, reduction=reduction, weight=weight)
    rows = zlpr_ref(scores, targets, mask)
    assert rows.shape == (2, 5)
    if weighted:
        rows = rows * weight
    expected = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_per_row_weight_shape_of_rows(gen) -> None:
    g = gen(2)
    scores = torch.randn(4, 9, generator=g)
    targets = torch.rand(4, 9, generator=g) < 0.4
    weight = torch.tensor([0.0, 1.0, 2.0, 0.5])
    loss = zlpr_loss(scores, targets, weight=weight, reduction="sum")
    expected = (zlpr_ref(scores, targets) * weight.double()).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="weight"):
        zlpr_loss(scores, targets, weight=torch.ones(3))


def test_one_dimensional_input(gen) -> None:
    g = gen(3)
    scores = torch.randn(11, generator=g, dtype=F64) * 3
    targets = torch.rand(11, generator=g, dtype=F64)
    for reduction in ("mean", "sum", "none"):
        loss = zlpr_loss(scores, targets, reduction=reduction)
        assert loss.shape == ()
        assert loss.item() == pytest.approx(zlpr_ref(scores, targets).item(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_bool_and_float_hard_targets_agree(gen, dtype: torch.dtype, scale: float) -> None:
    g = gen(4)
    base = torch.randn(5, 12, generator=g, dtype=F64) * scale
    hard = torch.rand(5, 12, generator=g) < 0.3
    mask = torch.rand(5, 12, generator=g) < 0.8
    results = []
    for targets in (hard, hard.to(dtype)):
        s = base.to(dtype).requires_grad_()
        loss = zlpr_loss(s, targets, mask=mask, reduction="sum")
        (grad,) = torch.autograd.grad(loss, s)
        results.append((loss, grad))
    torch.testing.assert_close(results[0][0], results[1][0], **_tol(dtype))
    torch.testing.assert_close(results[0][1], results[1][1], **_tol(dtype))


# Gradcheck --------------------------------------------------------------------------------------


def _gradcheck_batch(g: torch.Generator):
    scores = torch.randn(6, 8, generator=g, dtype=F64) * 2
    scores[1] = torch.linspace(-150, 150, 8, dtype=F64)  # beyond +-100, float64 fast path
    scores[2] = torch.linspace(-1000, 800, 8, dtype=F64)  # beyond +-700: exact path
    scores[3, 2] = -math.inf  # a -inf score: exact path, class dropped
    targets = torch.rand(6, 8, generator=g, dtype=F64) * 0.9 + 0.05
    targets[0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=F64)
    mask = torch.rand(6, 8, generator=g) < 0.7
    mask[0] = True
    mask[5] = False
    return scores, targets, mask


def test_gradcheck_scores(gen) -> None:
    scores, targets, mask = _gradcheck_batch(gen(5))
    scores.requires_grad_()
    hard = targets > 0.5
    for t in (targets, hard):
        for m in (None, mask):
            assert gradcheck(
                lambda s, t=t, m=m: zlpr_loss(s, t, mask=m, reduction="none"), (scores,)
            )


def test_gradcheck_targets(gen) -> None:
    scores, targets, mask = _gradcheck_batch(gen(6))
    targets[0, :4] = 0.5  # gradcheck perturbs targets: stay inside (0, 1)
    scores[3, 2] = 1.0
    scores.requires_grad_()
    targets.requires_grad_()
    for m in (None, mask):
        assert gradcheck(
            lambda s, t, m=m: zlpr_loss(s, t, mask=m, reduction="none"), (scores, targets)
        )


def test_target_gradient_matches_reference(gen) -> None:
    g = gen(7)
    scores = torch.randn(4, 10, generator=g, dtype=F64) * 5
    targets = (torch.rand(4, 10, generator=g, dtype=F64) * 0.9 + 0.05).requires_grad_()
    mask = torch.rand(4, 10, generator=g) < 0.7
    s = scores.clone().requires_grad_()
    loss = zlpr_loss(s, targets, mask=mask, reduction="sum")
    assert loss.item() == pytest.approx(zlpr_ref(scores, targets, mask).sum().item(), rel=1e-12)
    g_s, g_t = torch.autograd.grad(loss, (s, targets))
    torch.testing.assert_close(
        g_t, zlpr_target_grad_ref(scores, targets, mask), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(g_s, zlpr_grad_ref(scores, targets, mask), rtol=1e-12, atol=1e-14)
    assert (g_t[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("targets_need_grad", [False, True])
def test_masked_classes_get_exactly_zero_gradient(gen, dtype, targets_need_grad: bool) -> None:
    g = gen(8)
    scores = torch.randn(5, 9, generator=g).to(dtype)
    mask = torch.rand(5, 9, generator=g) < 0.5
    scores[~mask] = torch.tensor([30.0, -1e7, 1e7], dtype=dtype).repeat(45)[: int((~mask).sum())]
    scores.requires_grad_()
    targets = torch.rand(5, 9, generator=g).to(dtype).requires_grad_(targets_need_grad)
    loss = zlpr_loss(scores, targets, mask=mask, reduction="sum")
    (grad,) = torch.autograd.grad(loss, scores)
    assert (grad[~mask] == 0).all()
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), zlpr_ref(scores, targets, mask).sum(), **_tol(dtype))


# Targets at 0 / 1 and the eps rule ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("targets_need_grad", [False, True])
def test_eps_rule_beats_clipping(dtype, targets_need_grad: bool) -> None:
    # Span-extraction style: invalid positions masked by huge scores, targets 1e-9 / 1 - 1e-9.
    scores = torch.tensor(
        [[2.0, -1.0, -1e7, -1e7, 0.5, 1e7], [-1e7, 0.3, -0.2, 1e7, -1e7, 1.5]], dtype=F64
    ).to(dtype)
    near = torch.tensor(
        [[1.0, 0.0, 1e-9, 1e-9, 1.0, 1 - 1e-9], [1e-9, 1.0, 0.0, 1 - 1e-9, 1e-9, 0.0]], dtype=F64
    )
    targets = near.to(dtype).requires_grad_(targets_need_grad)
    s = scores.clone().requires_grad_()
    loss = zlpr_loss(s, targets, reduction="none")
    assert torch.isfinite(loss).all()
    assert loss.max().item() < 10
    ref = zlpr_ref(scores, targets)
    torch.testing.assert_close(loss.double(), ref, **_tol(dtype))
    # Exactly like 0 / 1: the same as the hard labels.
    hard = zlpr_loss(scores, near > 0.5, reduction="none")
    torch.testing.assert_close(loss, hard, **_tol(dtype))
    (grad,) = torch.autograd.grad(loss.sum(), s)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), zlpr_grad_ref(scores, targets), **_tol(dtype))
    # What clipping t to [eps, 1 - eps] would give: log(eps) + 1e7, a loss of ~1e7.
    eps = 1e-7
    clipped = near.clamp(eps, 1 - eps)
    s64 = scores.double()
    clipped_loss = torch.logsumexp(
        torch.cat([torch.zeros(2, 1, dtype=F64), clipped.log() - s64], -1), -1
    ) + torch.logsumexp(torch.cat([torch.zeros(2, 1, dtype=F64), (-clipped).log1p() + s64], -1), -1)
    assert clipped_loss.min().item() > 1e6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neg_inf_score_is_masked(gen, dtype: torch.dtype) -> None:
    g = gen(9)
    scores = torch.randn(4, 7, generator=g).to(dtype)
    targets = torch.rand(4, 7, generator=g).to(dtype)
    gone = torch.zeros(4, 7, dtype=torch.bool)
    gone[0, 1] = gone[1, [0, 3]] = gone[3] = True
    targets[gone] = 1.0  # a positive with score -inf would otherwise give an infinite loss
    s = scores.masked_fill(gone, -math.inf).requires_grad_()
    loss = zlpr_loss(s, targets, reduction="none")
    masked = zlpr_loss(scores, targets, mask=~gone, reduction="none")
    torch.testing.assert_close(loss, masked, rtol=0, atol=0)
    torch.testing.assert_close(loss.double(), zlpr_ref(s, targets), **_tol(dtype))
    assert loss[3].item() == 0.0
    (grad,) = torch.autograd.grad(loss.sum(), s)
    assert torch.isfinite(grad).all()
    assert (grad[gone] == 0).all()


def test_extreme_scores_float32_and_float16(gen) -> None:
    g = gen(10)
    for dtype, big in ((torch.float32, 1e4), (torch.float16, 60000.0)):
        scores = (torch.randn(8, 16, generator=g) * big / 3).clamp(-big, big)
        scores[0, :4] = torch.tensor([big, -big, big, -big])
        scores = scores.to(dtype).requires_grad_()
        targets = torch.rand(8, 16, generator=g)
        targets[1] = (targets[1] > 0.5).float()
        mask = torch.rand(8, 16, generator=g) < 0.8
        for m in (None, mask):
            loss = zlpr_loss(scores, targets, mask=m, reduction="none")
            (grad,) = torch.autograd.grad(loss.sum(), scores)
            assert torch.isfinite(loss).all()
            assert torch.isfinite(grad).all()
            torch.testing.assert_close(
                loss.double(), zlpr_ref(scores, targets, m), rtol=1e-6, atol=1e-6
            )
            ref_grad = zlpr_grad_ref(scores, targets, m)
            tol = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(torch.float16).eps
            torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)


def test_large_label_space_near_fast_path_limit() -> None:
    # 8000 negatives with score 79.9 (a finite, moderate float32 score): the loss is
    # log(1 + 8000 e^79.9) ~ 88.9, representable in float32.
    n, v = 8000, 79.9
    scores = torch.full((1, n), v, requires_grad=True)
    targets = torch.zeros(1, n, dtype=torch.bool)
    loss = zlpr_loss(scores, targets)
    v = scores[0, 0].item()  # 79.9 rounded to float32
    ref = math.log(n) + v + math.log1p(math.exp(-v) / n)
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, scores)
    torch.testing.assert_close(grad, torch.full_like(grad, 1.0 / n), rtol=1e-5, atol=0)


# Optimum of the soft loss ---------------------------------------------------------------------


def test_soft_loss_minimiser_is_sigmoid_2s(gen) -> None:
    g = gen(11)
    targets = torch.rand(3, 10, generator=g, dtype=F64) * 0.96 + 0.02
    s = torch.zeros(3, 10, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [s],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = zlpr_loss(s, targets, reduction="sum")
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    recovered = torch.sigmoid(2 * s.detach())
    assert (recovered - targets).abs().max().item() < 1e-4
    torch.testing.assert_close(zlpr_probabilities(s.detach()), recovered, rtol=0, atol=0)
    # sigmoid(s) is not the calibrated probability
    assert (torch.sigmoid(s.detach()) - targets).abs().max().item() > 1e-2


def test_probabilities_and_predict() -> None:
    s = torch.tensor([-3.0, -1e-3, 0.0, 1e-3, 2.0, 50.0], dtype=F64)
    expected = torch.tensor([1 / (1 + math.exp(-2 * v)) for v in s.tolist()], dtype=F64)
    torch.testing.assert_close(zlpr_probabilities(s), expected, rtol=1e-15, atol=0)
    assert zlpr_predict(s).tolist() == [False, False, False, True, True, True]
    assert zlpr_predict(s, threshold=1.0).tolist() == [False, False, False, False, True, True]


# Relation to BCE ------------------------------------------------------------------------------


def _bce_sum(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(s, t, reduction="none").sum(-1)


def test_equals_bce_with_one_positive_and_one_negative(gen) -> None:
    g = gen(12)
    s = torch.randn(50, 2, generator=g, dtype=F64) * 4
    t = torch.tensor([[1.0, 0.0]], dtype=F64).expand(50, 2)
    torch.testing.assert_close(
        zlpr_loss(s, t, reduction="none"), _bce_sum(s, t), rtol=1e-12, atol=1e-12
    )


def test_bce_minus_zlpr_is_the_cross_term(gen) -> None:
    g = gen(13)
    s = torch.randn(50, 3, generator=g, dtype=F64) * 3  # class 0 positive, 1 and 2 negative
    t = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64).expand(50, 3)
    diff = _bce_sum(s, t) - zlpr_loss(s, t, reduction="none")
    # log((1+e^a)(1+e^b)) - log(1+e^a+e^b) = log(1 + e^(a+b) / (1 + e^a + e^b))
    a, b = s[:, 1], s[:, 2]
    cross = torch.log1p(torch.exp(a + b) / (1 + a.exp() + b.exp()))
    torch.testing.assert_close(diff, cross, rtol=1e-10, atol=1e-12)
    assert (diff > 0).all()


def test_zlpr_never_exceeds_bce(gen) -> None:
    g = gen(14)
    s = torch.randn(400, 12, generator=g, dtype=F64) * 3
    t = (torch.rand(400, 12, generator=g) < torch.rand(400, 1, generator=g)).to(F64)
    zlpr = zlpr_loss(s, t, reduction="none")
    bce = _bce_sum(s, t)
    assert (zlpr <= bce + 1e-12).all()
    # Strictly below whenever a side has 2+ classes (a higher-order term is dropped).
    several = (t.sum(-1) >= 2) | ((1 - t).sum(-1) >= 2)
    assert (zlpr[several] < bce[several]).all()


# Module and errors ------------------------------------------------------------------------------


def test_module_equals_functional(gen) -> None:
    g = gen(15)
    scores = torch.randn(2, 3, 6, generator=g)
    targets = torch.rand(2, 3, 6, generator=g)
    mask = torch.rand(2, 3, 6, generator=g) < 0.8
    weight = torch.rand(2, 3, generator=g)
    for reduction in ("mean", "sum", "none"):
        module = ZLPRLoss(threshold=0.3, reduction=reduction, eps=1e-5)
        got = module(scores, targets, mask, weight)
        ref = zlpr_ref(scores, targets, mask, 0.3, eps=1e-5) * weight.double()
        expected = {"mean": ref.mean(), "sum": ref.sum(), "none": ref}[reduction]
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
        fn = zlpr_loss(
            scores, targets, mask=mask, threshold=0.3, reduction=reduction, eps=1e-5, weight=weight
        )
        torch.testing.assert_close(got, fn, rtol=0, atol=0)
    assert "threshold=0.3" in repr(ZLPRLoss(threshold=0.3))
    with pytest.raises(ValueError, match="reduction"):
        ZLPRLoss(reduction="avg")


def test_errors() -> None:
    s = torch.randn(3, 4)
    t = torch.rand(3, 4)
    with pytest.raises(ValueError, match="target"):
        zlpr_loss(s, t + 1.0)
    with pytest.raises(ValueError, match="target"):
        zlpr_loss(s, t - 1.0)
    with pytest.raises(ValueError, match="target"):
        zlpr_loss(s, t.masked_fill(t > 0.5, math.nan))
    with pytest.raises(ValueError, match="target"):
        zlpr_loss(s, torch.rand(3, 5))
    with pytest.raises(ValueError, match="target"):
        zlpr_loss(s, torch.rand(4))  # broadcastable, but not the same shape
    with pytest.raises(TypeError, match="target"):
        zlpr_loss(s, (t > 0.5).long())
    with pytest.raises(TypeError, match="scores"):
        zlpr_loss(torch.randint(0, 3, (3, 4)), t)
    with pytest.raises(TypeError, match="scores"):
        zlpr_loss(s.tolist(), t)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction"):
        zlpr_loss(s, t, reduction="avg")
    with pytest.raises(TypeError, match="mask"):
        zlpr_loss(s, t, mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match="mask"):
        zlpr_loss(s, t, mask=torch.ones(3, 5, dtype=torch.bool))
