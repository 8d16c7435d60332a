"""``PerturbedArgmax``: the categorical distribution of ``argmax(mu + eps)`` as a torch
``Distribution`` (``docs/guides/distributions.md``)."""

from __future__ import annotations

import math
from typing import ClassVar, TypeAlias

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints
from torch.distributions.utils import lazy_property

from kexue.distributions.noise import NoiseFamily, noise_family
from kexue.distributions.perturbed_argmax import (
    check_mu,
    check_quadrature,
    perturbed_argmax_log_probs,
)
from kexue.validation import check_sample_shape

# what torch.distributions accepts as a shape (its private torch.types._size)
Shape: TypeAlias = "torch.Size | list[int] | tuple[int, ...]"


class PerturbedArgmax(Distribution):
    """Class ``argmax_j (mu_j + eps_j)`` for scores ``mu`` of shape ``(..., n)`` and i.i.d. noise.

    ``probs``/``logits`` are the map ``p_i`` of the guide (``logits`` are the normalised
    log-probabilities, as in ``torch.distributions.Categorical``), computed lazily by
    quadrature with :func:`~kexue.distributions.perturbed_argmax_log_probs`. Sampling needs no
    quadrature: ``argmax(mu + eps)`` is exact (the reparameterization of the guide).

    Args:
        mu: finite scores ``(..., n)``; the batch shape is ``mu.shape[:-1]``.
        noise: a family name or :class:`~kexue.distributions.noise.NoiseFamily`.
        num_nodes, rule, method: quadrature of ``probs``; see ``perturbed_argmax_probs``.
    """

    arg_constraints: ClassVar[dict] = {"mu": constraints.real_vector}
    has_enumerate_support = True

    def __init__(
        self,
        mu: Tensor,
        noise: str | NoiseFamily = "normal",
        *,
        num_nodes: int | None = None,
        rule: str = "auto",
        method: str = "auto",
        validate_args: bool | None = None,
    ) -> None:
        check_mu(mu, -1)
        self.mu = mu
        self.noise = noise_family(noise)
        self.method, self.rule, self.num_nodes = check_quadrature(
            num_nodes, rule, self.noise, method
        )
        self._num_events = mu.shape[-1]
        super().__init__(batch_shape=mu.shape[:-1], validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self._num_events - 1)

    @lazy_property
    def logits(self) -> Tensor:
        """Normalised log-probabilities ``log p_i`` (finite unless ``p_i`` is exactly 0)."""
        return perturbed_argmax_log_probs(
            self.mu, self.noise, num_nodes=self.num_nodes, rule=self.rule, method=self.method
        )

    @lazy_property
    def probs(self) -> Tensor:
        """``p_i = P[argmax_j (mu_j + eps_j) = i]``."""
        return torch.exp(self.logits)

    @property
    def mode(self) -> Tensor:
        """The most probable class, ``argmax mu`` (the map preserves the order of ``mu``)."""
        return self.mu.argmax(-1)

    def _noise(self, sample_shape: Shape, generator: torch.Generator | None) -> Tensor:
        shape = torch.Size(check_sample_shape(sample_shape)) + self.mu.shape
        return self.noise.sample(
            shape, generator=generator, dtype=self.mu.dtype, device=self.mu.device
        )

    def sample(
        self, sample_shape: Shape = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact draws ``argmax(mu + eps)``: long tensor ``sample_shape + batch_shape``."""
        with torch.no_grad():
            return (self.mu + self._noise(sample_shape, generator)).argmax(-1)

    def rsample_relaxed(
        self,
        tau: float,
        sample_shape: Shape = torch.Size(),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Relaxed one-hot sample ``softmax((mu + eps) / tau)``, differentiable in ``mu``.

        The Gumbel-softmax analogue for any noise: as ``tau -> 0`` it tends to the one-hot
        vector of :meth:`sample` with the same noise. Shape ``sample_shape + mu.shape``.
        """
        if isinstance(tau, bool) or not isinstance(tau, int | float):
            raise TypeError(f"tau must be a positive number, got {tau!r}")
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a positive finite number, got {tau!r}")
        return torch.softmax((self.mu + self._noise(sample_shape, generator)) / tau, -1)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p_value`` for class indices ``value`` broadcastable to the batch shape."""
        if self._validate_args:
            self._validate_sample(value)
        value = value.long().unsqueeze(-1)
        value, log_pmf = torch.broadcast_tensors(value, self.logits)
        return log_pmf.gather(-1, value[..., :1]).squeeze(-1)

    def entropy(self) -> Tensor:
        """``-sum_i p_i log p_i`` (zero-probability classes contribute 0)."""
        logits = self.logits.clamp(min=torch.finfo(self.logits.dtype).min)
        return -(self.probs * logits).sum(-1)

    def enumerate_support(self, expand: bool = True) -> Tensor:
        values = torch.arange(self._num_events, dtype=torch.long, device=self.mu.device)
        values = values.view((-1,) + (1,) * len(self.batch_shape))
        return values.expand((-1, *self.batch_shape)) if expand else values

    def expand(self, batch_shape: Shape, _instance=None) -> PerturbedArgmax:
        mu = self.mu.expand((*batch_shape, self._num_events))
        return PerturbedArgmax(
            mu,
            self.noise,
            num_nodes=self.num_nodes,
            rule=self.rule,
            method=self.method,
            validate_args=False,
        )

    def __repr__(self) -> str:
        return (
            f"PerturbedArgmax(mu: {tuple(self.mu.shape)}, noise={self.noise!r}, "
            f"method={self.method!r}, num_nodes={self.num_nodes}, rule={self.rule!r})"
        )
