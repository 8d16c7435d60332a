"""Numerics of ``kexue.ops.logsumexp``: accuracy, masks, ``-inf``, gradients, low precision.

References are float64 ``torch.logsumexp`` / ``math`` over explicitly built term lists.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from kexue.ops import logsumexp, smooth_max
from kexue.testing.logsumexp import lse_rows, lse_terms

F64 = torch.float64


# Agreement with torch.logsumexp ----------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, -1, (0, 2), (2, 1), (0, 1, 2)])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_torch_logsumexp(gen, dim, keepdim: bool, dtype: torch.dtype) -> None:
    x = (torch.randn(3, 4, 5, generator=gen(0), dtype=F64) * 10).to(dtype)
    got = logsumexp(x, dim, keepdim=keepdim)
    ref = torch.logsumexp(x.double(), dim, keepdim=keepdim)
    assert got.dtype == dtype
    assert got.shape == ref.shape
    rtol = 1e-14 if dtype == F64 else 1e-6
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=rtol)


def test_zero_dim_input() -> None:
    x = torch.tensor(2.5, dtype=F64)
    assert logsumexp(x).item() == 2.5
    assert logsumexp(x, implicit_zero=True).item() == pytest.approx(math.log1p(math.exp(2.5)))


@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_large_rows_match_reference(gen, scale: float) -> None:
    x = torch.randn(16, 300, generator=gen(1), dtype=F64) * scale
    ref = torch.tensor([lse_terms(r) for r in x.tolist()], dtype=F64)
    torch.testing.assert_close(logsumexp(x), ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(logsumexp(x.float()).double(), ref, rtol=1e-6, atol=1e-6)


# Masks, -inf entries, empty and all-masked rows --------------------------------------------------


@pytest.mark.parametrize("implicit_zero", [False, True])
@pytest.mark.parametrize("mask_shape", [(6, 9), (1, 9), (6, 1)])
def test_mask_drops_entries(gen, implicit_zero: bool, mask_shape: tuple[int, int]) -> None:
    g = gen(2)
    x = torch.randn(6, 9, generator=g, dtype=F64) * 5
    mask = torch.rand(mask_shape, generator=g) < 0.6
    mask.view(-1)[0] = False  # at least one masked entry whatever the draw
    # Garbage at masked positions (huge, +inf, nan) must not leak in.
    garbage = torch.tensor([1e30, math.inf, math.nan], dtype=F64).repeat(18).reshape(6, 9)
    x = torch.where(mask, x, garbage)
    got = logsumexp(x, mask=mask, implicit_zero=implicit_zero)
    ref = lse_rows(x, mask.expand_as(x), implicit_zero=implicit_zero)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), rtol=1e-14, atol=1e-14)


def test_mask_along_first_dim(gen) -> None:
    g = gen(3)
    x = torch.randn(7, 4, generator=g, dtype=F64)
    mask = torch.rand(7, 4, generator=g) < 0.5
    got = logsumexp(x, dim=0, mask=mask)
    ref = lse_rows(x.T, mask.T)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), rtol=1e-14, atol=1e-14)


def test_mask_with_dim_tuple_and_keepdim(gen) -> None:
    g = gen(4)
    x = torch.randn(3, 4, 5, generator=g, dtype=F64)
    mask = torch.rand(3, 4, 5, generator=g) < 0.5
    got = logsumexp(x, dim=(0, 2), mask=mask, keepdim=True)
    assert got.shape == (1, 4, 1)
    for j in range(4):
        terms = [x[i, j, k].item() for i in range(3) for k in range(5) if mask[i, j, k]]
        assert got[0, j, 0].item() == pytest.approx(lse_terms(terms), rel=1e-14, abs=1e-14)


def test_neg_inf_entries_contribute_nothing() -> None:
    x = torch.tensor(
        [[0.5, -math.inf, 2.0, -math.inf], [-math.inf] * 4, [-math.inf, 3.0, -math.inf, 1.0]],
        dtype=F64,
        requires_grad=True,
    )
    out = logsumexp(x)
    ref = [lse_terms(r) for r in x.tolist()]
    assert out[0].item() == pytest.approx(ref[0], rel=1e-15)
    assert out[1].item() == -math.inf
    assert out[2].item() == pytest.approx(ref[2], rel=1e-15)
    out[[0, 2]].sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[torch.isneginf(x)] == 0).all()
    # Kept entries get the softmax of their row.
    assert x.grad[0, 2].item() == pytest.approx(math.exp(2.0 - ref[0]), rel=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_all_masked_rows(gen, dtype: torch.dtype) -> None:
    x = torch.randn(3, 5, generator=gen(5)).to(dtype).requires_grad_()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    plain = logsumexp(x, mask=mask)
    assert plain[1].item() == -math.inf
    assert torch.isfinite(plain[[0, 2]]).all()
    (grad,) = torch.autograd.grad(plain.sum(), x)
    assert torch.isfinite(grad).all()
    assert (grad[1] == 0).all()
    with_zero = logsumexp(x, mask=mask, implicit_zero=True)
    assert with_zero[1].item() == 0.0
    (grad,) = torch.autograd.grad(with_zero.sum(), x)
    assert torch.isfinite(grad).all()
    assert (grad[1] == 0).all()


def test_all_neg_inf_row_gradient_is_zero() -> None:
    x = torch.full((2, 4), -math.inf, dtype=F64, requires_grad=True)
    for implicit_zero in (False, True):
        out = logsumexp(x, implicit_zero=implicit_zero)
        assert out.tolist() == ([0.0, 0.0] if implicit_zero else [-math.inf, -math.inf])
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert (grad == 0).all()


@pytest.mark.parametrize("scale", [1.0, 50.0, 1000.0])
def test_implicit_zero_equals_concatenated_zero(gen, scale: float) -> None:
    x = torch.randn(8, 11, generator=gen(6), dtype=F64) * scale
    got = logsumexp(x, implicit_zero=True)
    ref = torch.logsumexp(torch.cat([torch.zeros(8, 1, dtype=F64), x], dim=-1), dim=-1)
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=1e-14)
    # and along another dim
    got0 = logsumexp(x, dim=0, implicit_zero=True)
    ref0 = torch.logsumexp(torch.cat([torch.zeros(1, 11, dtype=F64), x], dim=0), dim=0)
    torch.testing.assert_close(got0, ref0, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("implicit_zero", [False, True])
def test_empty_reduced_dim(implicit_zero: bool) -> None:
    x = torch.empty(3, 0, dtype=F64, requires_grad=True)
    out = logsumexp(x, implicit_zero=implicit_zero)
    assert out.shape == (3,)
    assert out.tolist() == [0.0 if implicit_zero else -math.inf] * 3
    assert logsumexp(x, implicit_zero=implicit_zero, keepdim=True).shape == (3, 1)
    assert logsumexp(torch.empty(2, 0, 4), dim=(1, 2)).shape == (2,)
    (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=False)
    assert grad.shape == (3, 0)


# Gradients ------------------------------------------------------------------------------------


def test_gradcheck_plain(gen) -> None:
    x = torch.randn(4, 6, generator=gen(7), dtype=F64, requires_grad=True)
    assert gradcheck(lambda t: logsumexp(t), (x,))


def test_gradcheck_masked_and_neg_inf(gen) -> None:
    g = gen(8)
    x = torch.randn(4, 6, generator=g, dtype=F64)
    x[0, 1] = -math.inf
    x.requires_grad_()
    mask = torch.rand(4, 6, generator=g) < 0.6
    mask[3] = False  # one all-masked row (its output is -inf: feed only finite rows onwards)
    assert gradcheck(lambda t: logsumexp(t, mask=mask)[:3], (x,))


def test_gradcheck_implicit_zero(gen) -> None:
    g = gen(9)
    x = (torch.randn(4, 6, generator=g, dtype=F64) * 3).requires_grad_()
    mask = torch.rand(4, 6, generator=g) < 0.6
    mask[2] = False
    assert gradcheck(lambda t: logsumexp(t, implicit_zero=True), (x,))
    assert gradcheck(lambda t: logsumexp(t, mask=mask, implicit_zero=True), (x,))


def test_gradcheck_multi_dim(gen) -> None:
    x = torch.randn(3, 4, 5, generator=gen(10), dtype=F64, requires_grad=True)
    assert gradcheck(lambda t: logsumexp(t, dim=(0, 2)), (x,))
    assert gradcheck(lambda t: logsumexp(t, dim=(2, 1), keepdim=True), (x,))


def test_gradient_matches_softmax_reference(gen) -> None:
    g = gen(11)
    x = (torch.randn(5, 7, generator=g, dtype=F64) * 20).requires_grad_()
    mask = torch.rand(5, 7, generator=g) < 0.7
    (grad,) = torch.autograd.grad(logsumexp(x, mask=mask).sum(), x)
    ref = torch.softmax(x.detach().masked_fill(~mask, -math.inf), dim=-1)
    torch.testing.assert_close(grad, ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_masked_entries_have_exactly_zero_gradient(gen, dtype: torch.dtype) -> None:
    g = gen(12)
    x = (torch.randn(4, 8, generator=g) * 3).to(dtype)
    mask = torch.rand(4, 8, generator=g) < 0.5
    x[~mask] = 1000.0 if dtype != torch.float16 else 60000.0  # would dominate if not masked
    x.requires_grad_()
    for implicit_zero in (False, True):
        out = logsumexp(x, mask=mask, implicit_zero=implicit_zero)
        (grad,) = torch.autograd.grad(out[torch.isfinite(out)].sum(), x)
        assert (grad[~mask] == 0).all()
        assert torch.isfinite(grad).all()


# Low precision ---------------------------------------------------------------------------------


def _ulp_tolerance(dtype: torch.dtype) -> float:
    return 2 * torch.finfo(dtype).eps  # two ulps relative: the result is rounded once


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("implicit_zero", [False, True])
def test_low_precision_with_mask_matches_float64(
    gen, dtype: torch.dtype, implicit_zero: bool
) -> None:
    g = gen(13)
    x = (torch.randn(32, 50, generator=g, dtype=F64) * 30).to(dtype)
    mask = torch.rand(32, 50, generator=g) < 0.3
    mask[0] = False
    out = logsumexp(x, mask=mask, implicit_zero=implicit_zero)
    assert out.dtype == dtype
    ref = torch.tensor(lse_rows(x, mask, implicit_zero=implicit_zero), dtype=F64)
    torch.testing.assert_close(out.double(), ref, rtol=_ulp_tolerance(dtype), atol=1e-3)


def test_float16_extreme_values_where_sentinels_overflow() -> None:
    x = torch.tensor(
        [[60000.0, -60000.0, 59990.0, 65504.0], [-60000.0, -59000.0, 1.0, 60000.0]],
        dtype=torch.float16,
    )
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    ref = torch.tensor(lse_rows(x, mask), dtype=F64)
    # The sentinel approach in float16: 1e12 is inf there, and kept entries get 0 * inf = nan.
    big = torch.tensor(1e12, dtype=torch.float16)
    assert torch.isinf(big)
    sentinel = x + (mask.to(torch.float16) - 1) * big
    assert torch.isnan(torch.logsumexp(sentinel, dim=-1)).all()
    # The largest finite float16 sentinel is too small: masked 60000 still beats kept -59000.
    finite_sentinel = x + (mask.to(torch.float16) - 1) * torch.finfo(torch.float16).max
    wrong = torch.logsumexp(finite_sentinel.double(), dim=-1)
    assert (wrong - ref).abs().max().item() > 1000.0
    out = logsumexp(x, mask=mask)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=_ulp_tolerance(torch.float16), atol=0.0)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(logsumexp(xg, mask=mask).sum(), xg)
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()


def test_autocast_bfloat16_linear_then_masked_logsumexp(gen) -> None:
    g = gen(14)
    lin = torch.nn.Linear(16, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10, 16, generator=g) * 2)
        lin.bias.copy_(torch.randn(10, generator=g))
    inp = torch.randn(8, 16, generator=g)
    mask = torch.rand(8, 10, generator=g) < 0.6
    mask[5] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = lin(inp)
        out = logsumexp(scores, mask=mask)
    assert scores.dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16
    assert out[5].item() == -math.inf
    # Exactly what it reduced (the bfloat16 scores), in float64: the result is rounded once.
    ref_bf16 = torch.tensor(lse_rows(scores.detach(), mask), dtype=F64)
    torch.testing.assert_close(
        out.double(), ref_bf16, rtol=_ulp_tolerance(torch.bfloat16), atol=0.0
    )
    # The whole computation redone in float64: within bfloat16's error on the scores.
    scores64 = inp.double() @ lin.weight.double().T + lin.bias.double()
    ref64 = torch.tensor(lse_rows(scores64, mask), dtype=F64)
    keep = torch.isfinite(ref64)
    assert torch.equal(keep, torch.isfinite(out))
    scale = scores64.abs().max().item()
    assert (out.double()[keep] - ref64[keep]).abs().max().item() <= 2e-2 * scale
    out[keep].float().sum().backward()
    assert torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spread_out_values(dtype: torch.dtype) -> None:
    rows = [
        [0.0, -1000.0, -2000.0, -5000.0, 3.0],
        [-1000.0, -1000.5, -3000.0, -1e6, -1e30],
        [1e4, 1e4 - 1.0, -1e4, 1e4 - 1500.0, 0.0],
        [-2000.0, -1500.0, -1000.0, -1000.0, -1001.0],
    ]
    x = torch.tensor(rows, dtype=dtype, requires_grad=True)
    out = logsumexp(x)
    ref = torch.tensor([lse_terms([float(v) for v in r]) for r in x.tolist()], dtype=F64)
    rtol = 1e-14 if dtype == F64 else 1e-6
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=0.0)
    (grad,) = torch.autograd.grad(out.sum(), x)
    ref_grad = torch.softmax(x.detach().double(), dim=-1)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=1e-30)


def test_smooth_max_float16_does_not_overflow() -> None:
    # x / tau is 1e5 here: beyond float16, but the reduction is documented to run in float32.
    x = torch.tensor([1000.0, 999.0], dtype=torch.float16)
    out = smooth_max(x, tau=0.01)
    ref = 0.01 * lse_terms([100000.0, 99900.0])
    assert torch.isfinite(out).all()
    assert out.double().item() == pytest.approx(ref, rel=_ulp_tolerance(torch.float16))


# Errors ----------------------------------------------------------------------------------------


def test_errors() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="x"):
        logsumexp([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="x"):
        logsumexp(torch.arange(4))
    with pytest.raises(TypeError, match="mask"):
        logsumexp(x, mask=torch.ones(3, 4))
    with pytest.raises(TypeError, match="mask"):
        logsumexp(x, mask=torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask"):
        logsumexp(x, mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        logsumexp(x, mask=torch.ones(2, 3, 4, dtype=torch.bool))  # broadcasts, but grows x
    for bad_dim in (2, -3, (0, 0), (0, 5)):
        with pytest.raises(ValueError, match="dim"):
            logsumexp(x, dim=bad_dim)
    for bad_dim in ((), 1.5, "a"):
        with pytest.raises((TypeError, ValueError)):
            logsumexp(x, dim=bad_dim)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tau"):
        smooth_max(x, tau=1.0, max_error=0.1)
    for bad_tau in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="tau"):
            smooth_max(x, tau=bad_tau)
    for bad_err in (0.0, -0.1, math.inf):
        with pytest.raises(ValueError, match="max_error"):
            smooth_max(x, max_error=bad_err)
    with pytest.raises(TypeError, match="x"):
        smooth_max(torch.arange(3))
