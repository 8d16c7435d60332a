"""Noise families for perturbed argmax: CDF ``Phi``, ``log Phi``, quantile ``Phi^{-1}``, sampling.

Notation of ``docs/guides/distributions.md``: ``eps_1..eps_n`` are i.i.d. with CDF ``Phi``;
the class of ``argmax_j (mu_j + eps_j)`` has the probabilities ``p_i`` of the guide.

Built-in families (standard parameters; scale the scores ``mu`` for a temperature):

- gumbel: ``Phi(x) = exp(-exp(-x))``; the map is softmax, exactly.
- normal: ``Phi(x) = (1 + erf(x / sqrt 2)) / 2``; the multinomial probit.
- logistic: ``Phi(x) = 1 / (1 + exp(-x))``; heavier tails than the probit.
- laplace: ``Phi(x) = exp(x) / 2`` for ``x < 0``, ``1 - exp(-x) / 2`` otherwise.
- uniform(w): ``Phi(x) = clip(x / w, 0, 1)``; sparse, exact zeros below ``max(mu) - w``.

Besides the public ``cdf``/``log_cdf``/``icdf``/``isf``/``sample``, each family has kernel
methods used by the quadratures: ``kernel_log_cdf_`` and ``kernel_dlog_cdf_`` (the pairwise
form), ``kernel_maximum_terms_`` and ``kernel_dlog_density_`` (the form over the maximum:
``log Phi`` and the reverse hazard ``h = phi / Phi`` as ``log h = c - u``, in as few passes
over the nodes as the family allows, and ``(log phi)'`` where ``log_density_slope`` does not
give it). They may overwrite their argument, may round ``log Phi`` to 0 where it is within
``1e-16`` (float64) or ``1e-7`` (float32) of 0, and return finite derivatives everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor
from torch.nn import functional as F

from kexue.validation import (
    check_callable,
    check_dtype,
    check_float_tensor,
    check_real,
    check_sample_shape,
)

Shape = int | Sequence[int] | torch.Size
TensorFn = Callable[[Tensor], Tensor]

# |x| beyond which exp(-|x|) is denormal (slow on CPUs) and negligible next to 1.
_EXP_LIMIT = {torch.float32: 87.0, torch.float64: 700.0}
_LN2 = math.log(2.0)


def _exp_limit(dtype: torch.dtype) -> float:
    return _EXP_LIMIT.get(dtype, 87.0)


class NoiseFamily:
    """A continuous noise distribution: CDF ``Phi``, ``log Phi`` and quantile ``Phi^{-1}``.

    Subclasses implement ``_cdf`` and ``_icdf`` (and, where a stable or faster form exists,
    ``_log_cdf``, ``_isf``, ``sample`` and the kernel methods); the public methods validate
    their argument and call them. ``default_rule`` is the quadrature rule that ``rule="auto"``
    picks; ``support_lower`` the lower end of the support (``-inf`` if unbounded).
    """

    name: str = "noise"
    default_rule: str = "tanh-sinh"
    support_lower: float = -math.inf
    # method="auto" picks this form; for the form over the maximum, the default numbers of
    # nodes (float64, float32: the measured error of float32 stays at its rounding, ~1e-7,
    # with fewer) and whether the density has a kink (then cells are split at large scores).
    default_method: str = "maximum"
    grid_nodes: tuple[int, int] = (64, 48)
    grid_kinks: bool = False
    # (a, b, c) with (log phi)'(x) = a x + b h(x) + c, where the family has that form: the
    # backward of the form over the maximum then needs no pass of its own for (log phi)'.
    log_density_slope: tuple[float, float, float] | None = None

    def cdf(self, x: Tensor) -> Tensor:
        """``Phi(x)``, elementwise, for a floating tensor ``x``."""
        return self._cdf(check_float_tensor(x, "x"))

    def log_cdf(self, x: Tensor) -> Tensor:
        """``log Phi(x)``, elementwise, accurate in the far lower tail (``-inf`` where
        ``Phi(x) = 0``)."""
        return self._log_cdf(check_float_tensor(x, "x"))

    def icdf(self, u: Tensor) -> Tensor:
        """Quantile ``Phi^{-1}(u)`` for ``u`` in (0, 1)."""
        return self._icdf(check_float_tensor(u, "u"))

    def isf(self, v: Tensor) -> Tensor:
        """Upper-tail quantile ``Phi^{-1}(1 - v)``, accurate for small ``v``."""
        return self._isf(check_float_tensor(v, "v"))

    def sample(
        self,
        shape: Shape,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """I.i.d. draws of shape ``shape`` (by inversion ``Phi^{-1}(U)``, ``U ~ U(0, 1)``,
        unless a family has a direct sampler)."""
        check_dtype(dtype)
        return self._sample(check_sample_shape(shape, "shape"), generator, dtype, device)

    def _sample(self, shape, generator, dtype, device) -> Tensor:
        u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
        return self._icdf(u.clamp_min_(torch.finfo(dtype).tiny))

    def _cdf(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_cdf(self, x: Tensor) -> Tensor:
        return torch.log(self._cdf(x))

    def _icdf(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _isf(self, v: Tensor) -> Tensor:
        below_one = 1.0 - torch.finfo(v.dtype).eps / 2  # keeps Phi^{-1} finite
        return self._icdf((1.0 - v).clamp_(max=below_one))

    def kernel_log_cdf_(self, x: Tensor) -> Tensor:
        """``log Phi(x)`` for the quadrature kernel; may overwrite ``x``. At or below
        ``support_lower`` it may return any finite value: the quadrature gives the nodes where
        that happens weight 0 itself."""
        return self._log_cdf(x)

    def kernel_dlog_cdf_(self, x: Tensor) -> Tensor:
        """``d log Phi / dx = phi / Phi``, finite everywhere (any finite value at or below
        ``support_lower``); may overwrite ``x``. The default differentiates ``_log_cdf`` with
        autograd and puts 0 where that is not finite."""
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            value = self._log_cdf(leaf)
            (grad,) = torch.autograd.grad(value.sum(), leaf)
        return torch.where(torch.isfinite(value) & torch.isfinite(grad), grad, 0.0)

    def kernel_maximum_terms_(
        self, x: Tensor, scratch: Tensor, x_min: float
    ) -> tuple[Tensor, Tensor, float]:
        """``(log_cdf, u, c)`` with ``log_cdf = log Phi(x)`` and ``log h(x) = c - u`` for the
        reverse hazard ``h = phi / Phi``, given ``x_min <= x.min()``; ``scratch`` (shaped like
        ``x``) may hold ``log_cdf`` and ``u`` may overwrite ``x``. The split into ``c - u``
        lets a family skip the passes that only add a constant or flip a sign. The default
        differentiates ``_cdf`` with autograd for the density."""
        log_cdf = self.kernel_log_cdf_(scratch.copy_(x))
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (density,) = torch.autograd.grad(self._cdf(leaf).sum(), leaf)
        # outside the support log phi - log Phi is -inf - (-inf): no mass there, h = 0
        log_h = density.log().sub_(log_cdf).nan_to_num_(nan=-math.inf)
        return log_cdf, torch.neg(log_h, out=x), 0.0

    def kernel_dlog_density_(self, x: Tensor) -> Tensor:
        """``(log phi)'(x)``, finite where ``phi > 0``; may overwrite ``x``. Used by the form
        over the maximum where ``log_density_slope`` is ``None``; the default uses autograd
        (twice) on ``_cdf``."""
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (density,) = torch.autograd.grad(self._cdf(leaf).sum(), leaf, create_graph=True)
            (slope,) = torch.autograd.grad(density.sum(), leaf)
        out = slope.div_(density.detach())
        return torch.where(torch.isfinite(out), out, 0.0)

    def closed_form_log_probs(self, mu: Tensor) -> Tensor | None:
        """``log p`` over the last dim in closed form, or ``None`` when there is none."""
        return None

    def quantile_nodes(self, u: Tensor, v: Tensor) -> Tensor:
        """``Phi^{-1}(u)``, using the upper-tail form ``isf(v)`` (``v = 1 - u``) where
        ``u > 1/2``."""
        low = u <= 0.5
        return torch.where(low, self._icdf(u.where(low, 0.5)), self._isf(v.where(~low, 0.5)))

    def __repr__(self) -> str:
        return f"{self.name}()"

    # Families with the same type and parameters are equal (``normal() == normal()``), so that
    # per-family constants can be cached.
    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        try:
            return hash((type(self), tuple(sorted(vars(self).items()))))
        except TypeError:  # an unhashable parameter
            return id(self)


class GumbelNoise(NoiseFamily):
    """Standard Gumbel: ``Phi(x) = exp(-exp(-x))``; the map is softmax (Gumbel-max trick)."""

    name = "gumbel"
    log_density_slope = (0.0, 1.0, -1.0)  # (log phi)' = e^{-x} - 1 = h - 1
    grid_nodes = (16, 16)  # the form over the maximum gives softmax exactly at any nodes

    def _cdf(self, x: Tensor) -> Tensor:
        return torch.exp(-torch.exp(-x))

    def _log_cdf(self, x: Tensor) -> Tensor:
        return -torch.exp(-x)

    def _icdf(self, u: Tensor) -> Tensor:
        return -torch.log(-torch.log(u))

    def _isf(self, v: Tensor) -> Tensor:
        return -torch.log(-torch.log1p(-v))

    def closed_form_log_probs(self, mu: Tensor) -> Tensor:
        return torch.log_softmax(mu, -1)

    def kernel_log_cdf_(self, x: Tensor) -> Tensor:
        limit = _exp_limit(x.dtype)
        return x.clamp_(-limit, limit).neg_().exp_().neg_()

    def kernel_dlog_cdf_(self, x: Tensor) -> Tensor:
        limit = _exp_limit(x.dtype)
        return x.clamp_(-limit, limit).neg_().exp_()

    # log phi = -x - e^{-x} = -x + log Phi: the hazard is e^{-x}, so u = x.
    def kernel_maximum_terms_(
        self, x: Tensor, scratch: Tensor, x_min: float
    ) -> tuple[Tensor, Tensor, float]:
        return self.kernel_log_cdf_(scratch.copy_(x)), x, 0.0


# Inside [lo, hi], log Phi = log(erfc(-x / sqrt 2) / 2) needs no special function beyond erfc
# (vectorised, ~4x cheaper than log_ndtr): erfc stays a normal float down to lo, and above hi
# Phi rounds to 1. Below lo the exact log_ndtr takes over.
ERFC_RANGE = {torch.float32: (-12.0, 5.5), torch.float64: (-37.0, 8.5)}
_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class NormalNoise(NoiseFamily):
    """Standard normal: ``Phi(x) = (1 + erf(x / sqrt 2)) / 2``; the map is the multinomial
    probit (for ``n = 2``, ``p_1 = Phi((mu_1 - mu_2) / sqrt 2)``)."""

    name = "normal"
    log_density_slope = (-1.0, 0.0, 0.0)  # (log phi)' = -x
    grid_nodes = (32, 24)

    def _cdf(self, x: Tensor) -> Tensor:
        # erfc form: (1 + erf(x / sqrt 2)) / 2 (torch.special.ndtr) cancels to 0 below x ~ -8
        return 0.5 * torch.erfc(x * -_SQRT_HALF)

    def _log_cdf(self, x: Tensor) -> Tensor:
        return torch.special.log_ndtr(x)

    def _icdf(self, u: Tensor) -> Tensor:
        return torch.special.ndtri(u)

    def _isf(self, v: Tensor) -> Tensor:
        return -torch.special.ndtri(v)

    def _sample(self, shape, generator, dtype, device) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def kernel_log_cdf_(self, x: Tensor) -> Tensor:
        lo, hi = ERFC_RANGE.get(x.dtype, ERFC_RANGE[torch.float32])
        far = x < lo if bool(x.amin() < lo) else None
        exact = torch.special.log_ndtr(x[far]) if far is not None else None
        out = x.clamp_(lo, hi).mul_(-_SQRT_HALF).erfc_().log_().sub_(_LN2)
        if far is not None:
            out[far] = cast(Tensor, exact)  # computed when far is not None
        return out

    def kernel_dlog_cdf_(self, x: Tensor) -> Tensor:
        # phi / Phi = sqrt(2 / pi) exp(-z^2) / erfc(z) with z = -x / sqrt 2; = sqrt(2/pi) /
        # erfcx(z) in the far lower tail, where exp(-z^2) would underflow.
        lo, hi = ERFC_RANGE.get(x.dtype, ERFC_RANGE[torch.float32])
        far = x < lo if bool(x.amin() < lo) else None
        exact = None
        if far is not None:
            exact = _SQRT_2_OVER_PI / torch.special.erfcx(x[far] * -_SQRT_HALF)
        z = x.clamp_(lo, hi).mul_(-_SQRT_HALF)
        out = torch.erfc(z)
        z.square_().neg_().exp_().mul_(_SQRT_2_OVER_PI).div_(out)
        if far is not None:
            z[far] = cast(Tensor, exact)  # computed when far is not None
        return z

    # log phi = -x^2 / 2 - log sqrt(2 pi): u = log Phi + x^2 / 2 (one fused pass); log Phi
    # costs four passes when x_min shows no far tail (no scan of x for it).
    def kernel_maximum_terms_(
        self, x: Tensor, scratch: Tensor, x_min: float
    ) -> tuple[Tensor, Tensor, float]:
        lo = ERFC_RANGE.get(x.dtype, ERFC_RANGE[torch.float32])[0]
        if x_min >= lo:  # erfc stays normal; above hi it rounds to 2 and log Phi to 0 anyway
            log_cdf = torch.mul(x, -_SQRT_HALF, out=scratch).erfc_().log_().sub_(_LN2)
        else:
            log_cdf = self.kernel_log_cdf_(scratch.copy_(x))
        return log_cdf, torch.addcmul(log_cdf, x, x, value=0.5, out=x), -_LOG_SQRT_2PI


class LogisticNoise(NoiseFamily):
    """Standard logistic: ``Phi(x) = 1 / (1 + exp(-x))``."""

    name = "logistic"
    log_density_slope = (0.0, 2.0, -1.0)  # (log phi)' = 1 - 2 Phi = 2 h - 1
    grid_nodes = (64, 40)  # exponential tails: a wider window than the normal's

    def _cdf(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    def _log_cdf(self, x: Tensor) -> Tensor:
        return F.logsigmoid(x)

    def _icdf(self, u: Tensor) -> Tensor:
        return torch.logit(u)

    def _isf(self, v: Tensor) -> Tensor:
        return -torch.logit(v)

    def kernel_log_cdf_(self, x: Tensor) -> Tensor:
        # min(x, 0) - log1p(exp(-|x|)), with |x| capped so exp never overflows or goes denormal
        # (both take a slow path on CPUs); the cap changes the result by < 1e-300.
        tail = x.abs().clamp_(max=_exp_limit(x.dtype)).neg_().exp_().add_(1.0).log_()
        return x.clamp_(max=0.0).sub_(tail)

    def kernel_dlog_cdf_(self, x: Tensor) -> Tensor:
        limit = _exp_limit(x.dtype)
        return x.clamp_(-limit, limit).neg_().sigmoid_()

    # phi = Phi (1 - Phi): the hazard is 1 - Phi(x) = Phi(-x), log h = log Phi(x) - x.
    def kernel_maximum_terms_(
        self, x: Tensor, scratch: Tensor, x_min: float
    ) -> tuple[Tensor, Tensor, float]:
        log_cdf = self.kernel_log_cdf_(scratch.copy_(x))
        return log_cdf, x.sub_(log_cdf), 0.0


class LaplaceNoise(NoiseFamily):
    """Standard Laplace: ``Phi(x) = exp(x) / 2`` for ``x < 0``, ``1 - exp(-x) / 2`` otherwise."""

    name = "laplace"
    grid_kinks = True
    grid_nodes = (96, 64)

    def _cdf(self, x: Tensor) -> Tensor:
        return torch.where(
            x < 0, 0.5 * torch.exp(x.clamp(max=0)), 1.0 - 0.5 * torch.exp(-x.clamp(min=0))
        )

    def _log_cdf(self, x: Tensor) -> Tensor:
        upper = torch.log1p(-0.5 * torch.exp(-x.clamp(0, _exp_limit(x.dtype))))
        return torch.where(x < 0, x - _LN2, upper)

    def _icdf(self, u: Tensor) -> Tensor:
        return torch.where(u < 0.5, torch.log(2.0 * u), -torch.log(2.0 - 2.0 * u))

    def _isf(self, v: Tensor) -> Tensor:
        return -self._icdf(v)

    # Branch-free forms (boolean masks are slow on CPUs), with a = clip(x, 0, limit):
    # log Phi = min(x, 0) - log 2 + log(2 - exp(-a)) and (log Phi)' = 1 / (2 exp(a) - 1).
    def kernel_log_cdf_(self, x: Tensor) -> Tensor:
        upper = x.clamp(0.0, _exp_limit(x.dtype)).neg_().exp_().neg_().add_(2.0).log_()
        return x.clamp_(max=0.0).sub_(_LN2).add_(upper)

    def kernel_dlog_cdf_(self, x: Tensor) -> Tensor:
        return x.clamp_(0.0, _exp_limit(x.dtype)).exp_().mul_(2.0).sub_(1.0).reciprocal_()

    # log phi = -|x| - log 2 (a kink at 0): u = |x| + log Phi, c = -log 2.
    def kernel_maximum_terms_(
        self, x: Tensor, scratch: Tensor, x_min: float
    ) -> tuple[Tensor, Tensor, float]:
        log_cdf = self.kernel_log_cdf_(scratch.copy_(x))
        return log_cdf, x.abs_().add_(log_cdf), -_LN2

    def kernel_dlog_density_(self, x: Tensor) -> Tensor:
        return x.sign_().neg_()


class UniformNoise(NoiseFamily):
    """Uniform on ``[0, width]``: ``Phi(x) = clip(x / width, 0, 1)``. Bounded support makes the
    map sparse: a class with ``mu_i < max(mu) - width`` never wins, so ``p_i = 0`` exactly."""

    name = "uniform"
    default_rule = "gauss-legendre"  # the integrand has kinks; tanh-sinh gains nothing here
    default_method = "pairwise"  # its exact zeros come from the pairwise products
    support_lower = 0.0

    def __init__(self, width: float = 1.0) -> None:
        self.width = check_real(width, "width", low=0.0, low_open=True)

    def _cdf(self, x: Tensor) -> Tensor:
        return (x / self.width).clamp(0.0, 1.0)

    def _log_cdf(self, x: Tensor) -> Tensor:
        return torch.log((x / self.width).clamp(0.0, 1.0))

    def _icdf(self, u: Tensor) -> Tensor:
        return u * self.width

    def _isf(self, v: Tensor) -> Tensor:
        return (1.0 - v) * self.width

    # log(0), 1/0 and boolean masks are slow on CPUs. At x <= 0 (Phi = 0) the kernels return
    # finite values: the quadrature zeroes those nodes using support_lower = 0.
    def kernel_log_cdf_(self, x: Tensor) -> Tensor:
        return x.mul_(1.0 / self.width).clamp_(torch.finfo(x.dtype).tiny, 1.0).log_()

    def kernel_dlog_cdf_(self, x: Tensor) -> Tensor:
        width = torch.tensor(self.width, dtype=x.dtype)
        x.clamp_(torch.finfo(x.dtype).tiny, self.width).reciprocal_()
        # 1/x below the width, else 0 (torch's stubs lack F.threshold_, which exists at run time)
        return F.threshold_(x, float(width.reciprocal()), 0.0)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"uniform(width={self.width:g})"


class CustomNoise(NoiseFamily):
    """A family from user callables; see :func:`custom_noise`. Its support and smoothness are
    unknown, so ``method="auto"`` takes the pairwise form; ``method="maximum"`` suits smooth
    densities with unbounded support."""

    default_method = "pairwise"

    def __init__(
        self,
        cdf: TensorFn,
        icdf: TensorFn,
        *,
        log_cdf: TensorFn | None = None,
        name: str = "custom",
    ) -> None:
        self._user_cdf, self._user_icdf, self._user_log_cdf = cdf, icdf, log_cdf
        self.name = name

    def _cdf(self, x: Tensor) -> Tensor:
        return self._user_cdf(x)

    def _log_cdf(self, x: Tensor) -> Tensor:
        return self._user_log_cdf(x) if self._user_log_cdf is not None else torch.log(self._cdf(x))

    def _icdf(self, u: Tensor) -> Tensor:
        return self._user_icdf(u)

    def __repr__(self) -> str:
        return f"custom_noise(name={self.name!r})"


def gumbel() -> GumbelNoise:
    """Standard Gumbel noise (its map is softmax)."""
    return GumbelNoise()


def normal() -> NormalNoise:
    """Standard normal noise (its map is the multinomial probit)."""
    return NormalNoise()


def logistic() -> LogisticNoise:
    """Standard logistic noise."""
    return LogisticNoise()


def laplace() -> LaplaceNoise:
    """Standard Laplace noise (scale 1)."""
    return LaplaceNoise()


def uniform(width: float = 1.0) -> UniformNoise:
    """Uniform noise on ``[0, width]``: a sparse map, zeros below ``max(mu) - width``."""
    return UniformNoise(width)


_GRID_X = torch.linspace(-30.0, 30.0, 601, dtype=torch.float64)
_GRID_U = torch.linspace(1e-6, 1.0 - 1e-6, 401, dtype=torch.float64)


def custom_noise(
    cdf: TensorFn,
    icdf: TensorFn,
    *,
    log_cdf: TensorFn | None = None,
    name: str = "custom",
    atol: float = 1e-6,
) -> CustomNoise:
    """A noise family from callables ``cdf(x)``, ``icdf(u)`` and optionally ``log_cdf(x)``.

    The callables take and return float tensors (elementwise, torch operations, so the map
    stays differentiable). They are checked on a float64 grid (``x`` in [-30, 30] and the
    quantiles of ``u`` in [1e-6, 1 - 1e-6]): ``cdf`` must be non-decreasing with values in
    [0, 1], ``icdf`` must invert it (``|cdf(icdf(u)) - u| <= atol``) and ``log_cdf``, if given,
    must agree with ``log(cdf)`` where ``cdf > 1e-300``.

    Raises:
        TypeError: a callable is not callable or returns something other than a tensor of
            the input's shape.
        ValueError: a check fails; the message names the first offending point.
    """
    for arg, fn in (("cdf", cdf), ("icdf", icdf), ("log_cdf", log_cdf)):
        if fn is not None:
            check_callable(fn, arg, f"{arg}(x: Tensor) -> Tensor")
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    family = CustomNoise(cdf, icdf, log_cdf=log_cdf, name=name)
    q = _checked_call(icdf, _GRID_U, "icdf")
    if not torch.isfinite(q).all():
        raise ValueError("icdf must return finite values for u in (0, 1)")
    x, _ = torch.sort(torch.cat([_GRID_X, q]))
    values = _checked_call(cdf, x, "cdf")
    bad = torch.nonzero((values < 0) | (values > 1) | torch.isnan(values))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"cdf must lie in [0, 1]: cdf({x[i].item():.6g}) = {values[i].item():.6g}")
    drop = torch.nonzero(values[1:] < values[:-1] - 1e-12)
    if len(drop):
        i = int(drop[0])
        raise ValueError(
            f"cdf must be non-decreasing, but cdf({x[i].item():.6g}) = {values[i].item():.6g} "
            f"> cdf({x[i + 1].item():.6g}) = {values[i + 1].item():.6g}"
        )
    roundtrip = (_checked_call(cdf, q, "cdf") - _GRID_U).abs()
    if roundtrip.max() > atol:
        i = int(roundtrip.argmax())
        raise ValueError(
            f"icdf must invert cdf: cdf(icdf({_GRID_U[i].item():.6g})) = "
            f"{(roundtrip[i] + _GRID_U[i]).item():.6g} (tolerance atol={atol:g})"
        )
    if log_cdf is not None:
        logs = _checked_call(log_cdf, x, "log_cdf")
        ok = values > 1e-300
        gap = (logs[ok] - values[ok].log()).abs()
        if len(gap) and gap.max() > max(atol, 1e-9):
            i = int(torch.nonzero(ok)[int(gap.argmax())])
            raise ValueError(
                f"log_cdf must equal log(cdf): log_cdf({x[i].item():.6g}) = "
                f"{logs[i].item():.6g}, log(cdf) = {values[i].log().item():.6g}"
            )
    return family


def _checked_call(fn: TensorFn, x: Tensor, name: str) -> Tensor:
    out = fn(x)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"{name} must map a tensor to a tensor of the same shape, got {got}")
    return out.to(torch.float64)


_BY_NAME: dict[str, Callable[[], NoiseFamily]] = {
    "gumbel": gumbel,
    "normal": normal,
    "logistic": logistic,
    "laplace": laplace,
    "uniform": uniform,
}
NOISE_NAMES = tuple(_BY_NAME)


def noise_family(noise: str | NoiseFamily) -> NoiseFamily:
    """The family named ``noise`` (``"uniform"`` has width 1), or ``noise`` itself."""
    if isinstance(noise, NoiseFamily):
        return noise
    if isinstance(noise, str):
        if noise not in _BY_NAME:
            raise ValueError(f"noise must be one of {NOISE_NAMES} or a NoiseFamily, got {noise!r}")
        return _BY_NAME[noise]()
    raise TypeError(f"noise must be a name or a NoiseFamily, got {type(noise).__name__}")


__all__ = [
    "NOISE_NAMES",
    "CustomNoise",
    "GumbelNoise",
    "LaplaceNoise",
    "LogisticNoise",
    "NoiseFamily",
    "NormalNoise",
    "UniformNoise",
    "custom_noise",
    "gumbel",
    "laplace",
    "logistic",
    "noise_family",
    "normal",
    "uniform",
]
