"""Probability maps from perturbed argmax, evaluated by quadrature in log space.

Theory: ``docs/guides/distributions.md``. For scores ``mu`` and i.i.d. noise with density
``phi`` and CDF ``Phi``, ``p_i = P[argmax_j (mu_j + eps_j) = i]`` has two integral forms:

- over the value of the maximum (``method="maximum"``, :mod:`.maximum`, ``O(M n)`` per row):
  ``p_i = integral h(y - mu_i) prod_j Phi(y - mu_j) dy`` with ``h = phi / Phi``;
- over the noise of the winner (``method="pairwise"``, :mod:`.pairwise`, ``O(K n^2)``):
  ``p_i = integral_0^1 prod_{j != i} Phi(mu_i - mu_j + Phi^{-1}(u)) du``.

Both are summed in log space and renormalised: ``log p_i = log m_i - logsumexp_l log m_l``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kexue.distributions.maximum import MAXIMUM_RULES, maximum_cross_entropy, maximum_log_mass
from kexue.distributions.noise import NoiseFamily, noise_family
from kexue.distributions.pairwise import pairwise_log_mass
from kexue.distributions.quadrature import RULES
from kexue.ops import check_reduction, compute_dtype, reduce_loss
from kexue.validation import (
    check_bool,
    check_dim,
    check_float_tensor,
    check_same_device,
    check_tensor,
)

METHODS = ("auto", "maximum", "pairwise")
PAIRWISE_NODES = 32


def check_mu(mu: object, dim: int = -1) -> Tensor:
    """Scores ``mu``: a finite floating tensor with at least one class along ``dim``."""
    mu = check_float_tensor(mu, "mu")
    if mu.ndim < 1:
        raise ValueError("mu must have at least one dimension (the classes)")
    dim = check_dim(dim, mu.ndim)
    if mu.shape[dim] < 1:
        raise ValueError("mu must hold at least one class along dim")
    if not bool(torch.isfinite(mu.detach()).all()):
        bad = "a NaN" if bool(torch.isnan(mu.detach()).any()) else "an infinite"
        raise ValueError(f"mu must be finite, got {bad} score")
    return mu


def check_quadrature(
    num_nodes: object, rule: object, family: NoiseFamily, method: object = "auto"
) -> tuple[str, str, int | None]:
    """``(method, rule, num_nodes)`` that the arguments stand for.

    ``method="auto"`` takes ``family.default_method``: the form over the maximum, except for
    bounded noise (uniform, whose exact zeros the pairwise form keeps) and custom families;
    a rule of the pairwise form (``"tanh-sinh"``, ``"gauss-legendre"``, ``"midpoint"``)
    selects the pairwise form. ``num_nodes=None`` stays ``None`` for the form over the maximum
    (the family's default for the dtype, ``family.grid_nodes``, chosen at evaluation) and is 32
    for the pairwise form.
    """
    bad_nodes = isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 2
    if num_nodes is not None and bad_nodes:
        raise ValueError(f"num_nodes must be an integer >= 2 (or None), got {num_nodes!r}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rules = (*MAXIMUM_RULES, *RULES)
    if rule != "auto" and (not isinstance(rule, str) or rule not in rules):
        raise ValueError(f"rule must be 'auto' or one of {rules}, got {rule!r}")
    bounded = family.support_lower > -math.inf
    if method == "auto":
        if rule in RULES or (rule == "auto" and (bounded or family.default_method != "maximum")):
            method = "pairwise"
        else:
            method = "maximum"
    if method == "maximum":
        if bounded:
            raise ValueError(
                f"method='maximum' needs noise with unbounded support, got {family!r}; use "
                "method='pairwise' (or 'auto')"
            )
        if rule == "auto":
            rule = "split-gauss-legendre" if family.grid_kinks else "trapezoid"
        elif rule not in MAXIMUM_RULES:
            raise ValueError(f"rule must be one of {MAXIMUM_RULES} with method='maximum'")
        return method, str(rule), num_nodes  # type: ignore[return-value]
    if rule == "auto":
        rule = family.default_rule
    elif rule not in RULES:
        raise ValueError(f"rule must be one of {RULES} with method='pairwise'")
    return method, str(rule), int(num_nodes or PAIRWISE_NODES)  # type: ignore[call-overload]


def perturbed_argmax_log_probs(
    mu: Tensor,
    noise: str | NoiseFamily = "normal",
    *,
    num_nodes: int | None = None,
    rule: str = "auto",
    method: str = "auto",
    dim: int = -1,
    closed_form: bool = True,
) -> Tensor:
    """``log p_i`` of the perturbed-argmax map (see :func:`perturbed_argmax_probs`).

    Finite even where ``p_i`` underflows, so it serves as the log-likelihood of a
    classification head; ``-inf`` only where bounded-support noise makes ``p_i`` exactly 0.
    Where ``p_i`` is below the window's tail mass (about ``1e-26`` in float64, ``1e-17`` in
    float32) the value is a finite under-estimate: the nodes do not reach the far tail where
    such a class's integrand lives.
    """
    log_p = _log_probs(mu, noise, num_nodes, rule, method, dim, closed_form)
    return log_p.to(mu.dtype).movedim(-1, dim)


def _log_probs(
    mu: Tensor,
    noise: str | NoiseFamily,
    num_nodes: int | None,
    rule: str,
    method: str,
    dim: int,
    closed_form: bool,
    checked: bool = False,
) -> Tensor:
    """``log p`` with the classes last, in the compute dtype (float32 for half inputs);
    ``checked``: ``mu`` has passed :func:`check_mu` already."""
    if not checked:
        check_mu(mu, dim)
    family = noise_family(noise)
    method, rule, num_nodes = check_quadrature(num_nodes, rule, family, method)
    check_bool(closed_form, "closed_form")

    work = mu.movedim(dim, -1).to(compute_dtype(mu.dtype))
    exact = family.closed_form_log_probs(work) if closed_form else None
    if exact is not None:
        return exact
    lead, n = work.shape[:-1], work.shape[-1]
    flat = work.reshape(-1, n)
    centred = flat - flat.detach().amax(-1, keepdim=True)  # only differences matter
    # num_nodes: int | None for the maximum form, an int for the pairwise one (check_quadrature)
    mass: Callable[[Tensor, NoiseFamily, Any, str], Tensor] = (
        maximum_log_mass if method == "maximum" else pairwise_log_mass
    )
    log_m = mass(centred, family, num_nodes, rule)
    log_p = torch.log_softmax(log_m, -1)  # log m_i - logsumexp_l log m_l
    return log_p.reshape(*lead, n)


def perturbed_argmax_probs(
    mu: Tensor,
    noise: str | NoiseFamily = "normal",
    *,
    num_nodes: int | None = None,
    rule: str = "auto",
    method: str = "auto",
    dim: int = -1,
    closed_form: bool = True,
) -> Tensor:
    """Probabilities ``p_i = P[argmax_j (mu_j + eps_j) = i]`` along ``dim``, by quadrature.

    ``docs/guides/distributions.md``. By default (``method="maximum"``) the integral over the
    value of the maximum, ``p_i = integral h(y - mu_i) prod_j Phi(y - mu_j) dy`` with
    ``h = phi / Phi``, on one grid of ``num_nodes`` nodes shared by all classes: ``O(M n)``
    time and memory per row. ``method="pairwise"`` evaluates
    ``p_i = integral_0^1 prod_{j != i} Phi(mu_i - mu_j + Phi^{-1}(u)) du`` instead: ``O(K
    n^2)`` time, ``O(K n)`` memory per row; it is the default for bounded (uniform) noise and
    custom families, and serves as a cross-check. Both are summed in log space (no underflow
    for large n), renormalised to sum to 1, and differentiable in ``mu`` (first order,
    explicit backward).

    Args:
        mu: scores, floating tensor of any shape; float16/bfloat16 are computed in float32.
            Must be finite.
        noise: ``"gumbel"``, ``"normal"``, ``"logistic"``, ``"laplace"``, ``"uniform"``
            (width 1) or a :class:`~kexue.distributions.noise.NoiseFamily` (``uniform(w)``,
            ``custom_noise(...)``).
        num_nodes: nodes of the rule; ``None``: the family's default for the form over the
            maximum, float64 / float32 (normal 32 / 24, logistic 64 / 40, Laplace 96 / 64 plus
            as many again at its kinks, Gumbel 16, custom 64 / 48), 32 for the pairwise form.
        rule: ``"auto"``; for the form over the maximum ``"trapezoid"`` (smooth densities) or
            ``"split-gauss-legendre"`` (4-point cells split at the kinks of the density:
            Laplace); for the pairwise form ``"tanh-sinh"``, ``"gauss-legendre"`` or
            ``"midpoint"`` (the article's rule ``u_k = k / (K + 1)``). A pairwise rule selects
            the pairwise form under ``method="auto"``.
        method: ``"auto"``, ``"maximum"`` or ``"pairwise"`` (see above).
        dim: the class dimension.
        closed_form: use a family's closed form when it has one (Gumbel: ``softmax``);
            ``False`` forces quadrature (which gives softmax too, to rounding).

    Returns:
        ``p`` with the shape and dtype of ``mu``: non-negative, summing to 1 along ``dim``,
        ordered like ``mu``, unchanged by ``mu + c``. With uniform noise of width ``w``,
        ``p_i = 0`` exactly wherever ``mu_i < max(mu) - w``.

    Raises:
        TypeError: ``mu`` is not a floating tensor, ``noise`` is neither a name nor a family.
        ValueError: ``mu`` holds NaN or inf or has no class, unknown ``noise``, ``rule`` or
            ``method``, ``num_nodes < 2``, ``dim`` out of range, ``method="maximum"`` with
            bounded noise.

    Accuracy (float64, max |p - p_ref| against scipy, docs/benchmarks/distributions.md):
    at the default nodes about 2e-7 or better for normal, logistic and Laplace noise with n
    from 10 to 10,000. Float32 inputs are limited to about 1e-6 by rounding.
    """
    log_p = _log_probs(mu, noise, num_nodes, rule, method, dim, closed_form)
    return torch.exp(log_p).to(mu.dtype).movedim(-1, dim)  # exp before rounding to half


def perturbed_argmax_cross_entropy(
    mu: Tensor,
    target: Tensor,
    noise: str | NoiseFamily = "normal",
    *,
    num_nodes: int | None = None,
    rule: str = "auto",
    method: str = "auto",
    reduction: str = "mean",
    dim: int = -1,
) -> Tensor:
    """Cross-entropy ``-log p_target`` of the perturbed-argmax map (the head's loss).

    Args:
        mu: scores ``(..., n)`` (classes along ``dim``).
        target: integer class indices in ``[0, n)`` with the shape of ``mu`` without ``dim``.
        noise, num_nodes, rule, method: as in :func:`perturbed_argmax_probs`.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns:
        The loss, reduced or with ``target``'s shape. It is ``+inf`` only where a
        bounded-support family (uniform) gives the target exactly zero probability.

    For normal noise on CPU the loss and its gradient come from a native kernel, built on
    first use (:mod:`kexue.native`; ``KEXUE_NATIVE=0`` keeps the eager path).
    """
    check_reduction(reduction)
    check_mu(mu, dim)
    check_tensor(target, "target")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    check_same_device(("mu", mu), ("target", target))
    rows = mu.movedim(dim, -1).shape[:-1]
    if target.shape != rows:
        raise ValueError(
            f"target must have shape {tuple(rows)} (mu without dim), got {tuple(target.shape)}"
        )
    n = mu.shape[dim]
    if target.numel():
        low, high = (int(v) for v in target.aminmax())
        if low < 0 or high >= n:
            raise ValueError(f"target must hold class indices in [0, {n})")
    family = noise_family(noise)
    method, rule, num_nodes = check_quadrature(num_nodes, rule, family, method)
    # no view or copy where none is needed: each is an autograd node, a cost per call
    work = mu if dim in (-1, mu.ndim - 1) else mu.movedim(dim, -1)
    work = work.to(compute_dtype(mu.dtype))
    log_p = family.closed_form_log_probs(work)
    if log_p is None and method == "maximum" and target.numel():
        rows_t = target if target.ndim == 1 else target.reshape(-1)
        flat = maximum_cross_entropy(
            work if work.ndim == 2 else work.reshape(-1, n),
            rows_t if rows_t.dtype == torch.long else rows_t.long(),
            family, num_nodes, rule, reduction,
        )  # fmt: skip
        return (flat.reshape(target.shape) if reduction == "none" else flat).to(mu.dtype)
    if log_p is None:
        log_p = _log_probs(
            mu, family, num_nodes, rule, method, dim, closed_form=False, checked=True
        )
    loss = -log_p.gather(-1, target.long()[..., None]).squeeze(-1).to(mu.dtype)
    return reduce_loss(loss, reduction)


class PerturbedArgmaxCrossEntropy(nn.Module):
    """``nn.Module`` form of :func:`perturbed_argmax_cross_entropy`; ``forward(mu, target)``."""

    def __init__(
        self,
        noise: str | NoiseFamily = "normal",
        *,
        num_nodes: int | None = None,
        rule: str = "auto",
        method: str = "auto",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        self.noise = noise_family(noise)
        self.method, self.rule, self.num_nodes = check_quadrature(
            num_nodes, rule, self.noise, method
        )
        self.reduction = reduction

    def forward(self, mu: Tensor, target: Tensor) -> Tensor:
        return perturbed_argmax_cross_entropy(
            mu,
            target,
            self.noise,
            num_nodes=self.num_nodes,
            rule=self.rule,
            method=self.method,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"noise={self.noise!r}, method={self.method!r}, num_nodes={self.num_nodes}, "
            f"rule={self.rule!r}"
        )
