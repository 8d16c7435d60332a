"""Sparse ZLPR (positive class indices) against the dense float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from kexue.losses import SparseZLPRLoss, sparse_zlpr_loss, zlpr_loss
from kexue.testing.zlpr import zlpr_grad_ref, zlpr_ref

F64 = torch.float64


def _dense(positives: torch.Tensor, n: int, ignore_index: int) -> torch.Tensor:
    """Dense bool targets built from index lists with plain Python sets."""
    lead = positives.shape[:-1]
    rows = []
    for idx in positives.reshape(-1, positives.shape[-1]).tolist():
        chosen = {i for i in idx if i != ignore_index}
        rows.append([c in chosen for c in range(n)])
    return torch.tensor(rows, dtype=torch.bool).reshape(*lead, n)


def _random_positives(
    lead: tuple[int, ...], n: int, k: int, ignore_index: int, g: torch.Generator
) -> torch.Tensor:
    """Random positives (duplicates likely) padded with ``ignore_index``, plus special rows."""
    pos = torch.randint(0, n, (*lead, k), generator=g)
    pad = torch.rand((*lead, k), generator=g) < 0.4
    pos = pos.masked_fill(pad, ignore_index)
    flat = pos.view(-1, k)
    flat[0] = ignore_index  # a row with no positives
    if k >= n:
        flat[1, :n] = torch.arange(n)  # a row where every class is positive
        flat[1, n:] = ignore_index
    flat[2, :3] = torch.tensor([1, 1, 1])  # duplicates count once
    return pos


@pytest.mark.parametrize("ignore_index", [-1, -100, 10_000])
@pytest.mark.parametrize("lead", [(8,), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_matches_dense(gen, ignore_index: int, lead, dtype: torch.dtype, scale: float) -> None:
    n, k = 7, 9
    g = gen(abs(ignore_index) + len(lead))
    scores = (torch.randn((*lead, n), generator=g, dtype=F64) * scale).to(dtype)
    positives = _random_positives(lead, n, k, ignore_index, g)
    dense = _dense(positives, n, ignore_index)
    assert not dense.reshape(-1, n)[0].any() and dense.reshape(-1, n)[1].all()
    s = scores.clone().requires_grad_()
    loss = sparse_zlpr_loss(s, positives, ignore_index=ignore_index, reduction="none")
    assert loss.shape == lead
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-11}
    torch.testing.assert_close(loss.double(), zlpr_ref(scores, dense), **tol)
    torch.testing.assert_close(loss, zlpr_loss(scores, dense, reduction="none"), **tol)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    torch.testing.assert_close(grad.double(), zlpr_grad_ref(scores, dense), **tol)
    d = scores.clone().requires_grad_()
    (dense_grad,) = torch.autograd.grad(zlpr_loss(d, dense, reduction="sum"), d)
    torch.testing.assert_close(grad, dense_grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["exact", "padded", "duplicated"])
def test_positives_with_almost_all_the_mass(gen, dtype: torch.dtype, layout: str) -> None:
    # Positive scores 30..80 and negatives ~0: sum_P e^s is almost all of 1 + sum_all e^s,
    # so the subtraction a + log1p(-e^(b - a)) cancels. The loss must stay accurate.
    g = gen(1)
    rows, n, k = 6, 12, 3
    scores = torch.randn(rows, n, generator=g, dtype=F64) * 0.1
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(rows)])
    scores.scatter_(-1, idx, torch.rand(rows, k, generator=g, dtype=F64) * 50 + 30)
    scores = scores.to(dtype)
    positives = {
        "exact": idx,
        "padded": torch.cat([idx, torch.full((rows, 2), -1)], -1),
        "duplicated": torch.cat([idx, idx[:, :1]], -1),
    }[layout]
    dense = _dense(positives, n, -1)
    s = scores.clone().requires_grad_()
    loss = sparse_zlpr_loss(s, positives, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), s)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss >= 0).all()
    torch.testing.assert_close(loss.double(), zlpr_ref(scores, dense), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), zlpr_grad_ref(scores, dense), rtol=1e-5, atol=1e-6)


def test_padding_keeps_class_zero_among_the_negatives() -> None:
    # Minimal case: the positive (class 3) holds > half the mass and the list is padded.
    scores = torch.tensor([[1.0, 0.0, 0.0, 40.0, 0.0]], dtype=F64)
    expected = math.log1p(math.exp(-40.0)) + math.log(1 + math.exp(1.0) + 3)
    for positives in (torch.tensor([[3]]), torch.tensor([[3, -1]]), torch.tensor([[3, 3]])):
        loss = sparse_zlpr_loss(scores, positives)
        assert loss.item() == pytest.approx(expected, rel=1e-12), positives.tolist()


def test_empty_positive_lists(gen) -> None:
    g = gen(2)
    scores = torch.randn(3, 5, generator=g, dtype=F64)
    positives = torch.empty(3, 0, dtype=torch.long)
    loss = sparse_zlpr_loss(scores, positives, reduction="none")
    dense = torch.zeros(3, 5, dtype=torch.bool)
    torch.testing.assert_close(loss, zlpr_ref(scores, dense), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_reductions_threshold_and_weight(gen, reduction: str) -> None:
    g = gen(3)
    scores = torch.randn(2, 3, 6, generator=g, dtype=F64) * 3
    positives = torch.randint(0, 6, (2, 3, 2), generator=g)
    positives[0, 0, 1] = -5
    weight = torch.rand(2, 3, generator=g, dtype=F64)
    module = SparseZLPRLoss(ignore_index=-5, reduction=reduction, threshold=0.4)
    got = module(scores, positives, weight)
    rows = zlpr_ref(scores, _dense(positives, 6, -5), threshold=0.4) * weight
    expected = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    fn = sparse_zlpr_loss(
        scores, positives, ignore_index=-5, reduction=reduction, threshold=0.4, weight=weight
    )
    torch.testing.assert_close(got, fn, rtol=0, atol=0)
    assert "ignore_index=-5" in repr(module)


def test_errors() -> None:
    scores = torch.randn(3, 5)
    with pytest.raises(TypeError, match="target"):
        sparse_zlpr_loss(scores, torch.zeros(3, 2))
    with pytest.raises(TypeError, match="target"):
        sparse_zlpr_loss(scores, torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="target"):
        sparse_zlpr_loss(scores, [[0], [1], [2]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target"):
        sparse_zlpr_loss(scores, torch.tensor([[0], [5], [1]]))
    with pytest.raises(ValueError, match="target"):
        sparse_zlpr_loss(scores, torch.tensor([[0], [-2], [1]]))
    with pytest.raises(ValueError, match="target"):
        sparse_zlpr_loss(scores, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        sparse_zlpr_loss(scores, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="scores"):
        sparse_zlpr_loss(torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        sparse_zlpr_loss(scores, torch.zeros(3, 1, dtype=torch.long), reduction="avg")
