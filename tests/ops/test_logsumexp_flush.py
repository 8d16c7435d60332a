"""logsumexp flushes subnormal terms to exactly 0 whether or not the row needs the flush
(the plain fast path skips it only when no term can be subnormal)."""

from __future__ import annotations

import torch

from kexue.ops import logsumexp


def test_subnormal_terms_get_exactly_zero_gradient() -> None:
    x = torch.tensor([[0.0, -90.0, -1.0], [0.0, -5.0, -1.0]], requires_grad=True)
    logsumexp(x).sum().backward()
    grad = x.grad
    assert grad[0, 1] == 0  # exp(-90) is subnormal in float32: flushed
    expected = torch.softmax(x.detach().double(), -1)
    torch.testing.assert_close(grad[1].double(), expected[1], rtol=1e-6, atol=0)
    assert (grad[1] > 0).all()


def test_the_plain_path_matches_the_flushed_path() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, generator=gen)
    wide = x.clone()
    wide[:, 0] = -200.0  # forces the flush for the whole call
    ours = logsumexp(x)
    torch.testing.assert_close(ours, torch.logsumexp(x, -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logsumexp(wide), torch.logsumexp(wide, -1), rtol=1e-6, atol=1e-6)
