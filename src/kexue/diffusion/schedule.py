"""Noise schedules in the articles' notation, and how they map to the DDPM paper and diffusers.

Conventions, documented once for all of kexue.diffusion (``docs/guides/diffusion.md``,
"Notation" and "Timesteps"):

- Forward step ``x_t = alpha_t x_{t-1} + beta_t eps`` with ``alpha_t^2 + beta_t^2 = 1``: our
  ``beta_t`` is a **standard deviation**, the square root of the DDPM paper's ``beta_t``.
- ``abar_t = alpha_1 ... alpha_t`` and ``bbar_t = sqrt(1 - abar_t^2)``, so in one jump
  ``x_t = abar_t x_0 + bbar_t eps``. The paper's ``alpha-bar_t`` is our ``abar_t^2``.
- Every tensor is indexed by ``t = 0..T`` with ``t = 0`` the clean data
  (``alpha_0 = abar_0 = 1``, ``beta_0 = bbar_0 = 0``); an ``eps_model(x_t, t)`` receives
  integer steps in ``1..T``.
- diffusers counts steps from 0: its timestep ``k`` (``alphas_cumprod[k]``) is our
  ``t = k + 1``, and its "previous timestep -1" (``final_alpha_cumprod = 1``) is our ``t = 0``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from kexue.validation import check_generator, check_int, check_tensor, describe

SPACINGS = ("even", "quadratic", "trailing")
# Sampling's default spread of K steps: trailing beat even and quadratic at K = 5 and 10 for
# DDIM and DDPM on the shipped model and matched even at K = 20 (docs/benchmarks/few_step.md,
# docs/guides/few-step.md "Where the steps go"); likelihood keeps "even".
SAMPLING_SPACING = "trailing"


class NoisyBatch(NamedTuple):
    """One draw of the forward process for a batch: steps ``t``, noise ``eps`` and ``x_t``."""

    t: Tensor
    eps: Tensor
    x_t: Tensor


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A diffusion noise schedule: ``alpha, beta, abar, bbar`` of shape ``(T + 1,)``, float64.

    Build one with :meth:`su_linear`, :meth:`ddpm_linear`, :meth:`cosine` or
    :meth:`from_betas`; it holds numbers only (no network, no sampler).
    """

    alpha: Tensor
    beta: Tensor
    abar: Tensor
    bbar: Tensor
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def T(self) -> int:
        return len(self.alpha) - 1

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_alphas(cls, alphas: Tensor | Sequence[float], config: dict | None = None):
        """From ``alpha_1..alpha_T`` (each in (0, 1): every step adds some noise)."""
        a = torch.as_tensor(alphas, dtype=torch.float64).flatten()
        if a.numel() < 1 or not torch.isfinite(a).all() or (a <= 0).any() or (a >= 1).any():
            raise ValueError("alphas must be T >= 1 finite values in (0, 1)")
        alpha = torch.cat([torch.ones(1, dtype=torch.float64), a])
        beta = torch.sqrt(torch.clamp(1 - alpha**2, min=0.0))
        abar = torch.cumprod(alpha, 0)
        bbar = torch.sqrt(torch.clamp(1 - abar**2, min=0.0))
        return cls(alpha, beta, abar, bbar, config or {"kind": "alphas", "alphas": a.tolist()})

    @classmethod
    def from_betas(cls, paper_betas: Tensor | Sequence[float]) -> NoiseSchedule:
        """From the DDPM paper's betas ``beta_1..beta_T`` (variances, our ``beta_t^2``)."""
        b = torch.as_tensor(paper_betas, dtype=torch.float64).flatten()
        if b.numel() < 1 or not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
            raise ValueError("paper_betas must be T >= 1 finite values in (0, 1)")
        return cls.from_alphas(torch.sqrt(1 - b), {"kind": "betas", "paper_betas": b.tolist()})

    @classmethod
    def su_linear(cls, T: int = 1000) -> NoiseSchedule:
        """The articles' default: ``alpha_t = sqrt(1 - 0.02 t / T)``; ``abar_T ~ e^{-5}``."""
        _check_T(T)
        t = torch.arange(1, T + 1, dtype=torch.float64)
        schedule = cls.from_alphas(torch.sqrt(1 - 0.02 * t / T))
        return _with_config(schedule, {"kind": "su_linear", "T": T})

    @classmethod
    def ddpm_linear(
        cls,
        T: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> NoiseSchedule:
        """The DDPM paper's linear betas (variances) from ``beta_start`` to ``beta_end``."""
        _check_T(T)
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got {beta_start!r}, {beta_end!r}"
            )
        b = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        schedule = cls.from_betas(b)
        config = {"kind": "ddpm_linear", "T": T, "beta_start": beta_start, "beta_end": beta_end}
        return _with_config(schedule, config)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal's cosine schedule: paper ``alpha-bar(t) = f(t) / f(0)``,
        ``f(t) = cos((t/T + s) / (1 + s) * pi/2)^2``, betas capped at ``max_beta``."""
        _check_T(T)
        t = torch.arange(0, T + 1, dtype=torch.float64)
        f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
        paper_abar = f / f[0]
        b = torch.clamp(1 - paper_abar[1:] / paper_abar[:-1], max=max_beta)
        schedule = cls.from_betas(b)
        return _with_config(schedule, {"kind": "cosine", "T": T, "s": s, "max_beta": max_beta})

    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any) -> NoiseSchedule:
        """The schedule of a diffusers scheduler (or of its config dict), so that a model
        trained with diffusers plugs into kexue's samplers and variance estimators.

        Our ``abar_t^2`` equals diffusers' ``alphas_cumprod[t - 1]``; needs the ``diffusers``
        extra (see ``docs/guides/few-step.md``).
        """
        from kexue.diffusion.schedulers import noise_schedule_from_diffusers

        return noise_schedule_from_diffusers(scheduler_or_config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Rebuild a schedule from :attr:`config` (as saved with a checkpoint)."""
        kind = config.get("kind")
        args = {k: v for k, v in config.items() if k != "kind"}
        if kind == "su_linear":
            return cls.su_linear(**args)
        if kind == "ddpm_linear":
            return cls.ddpm_linear(**args)
        if kind == "cosine":
            return cls.cosine(**args)
        if kind == "betas":
            return cls.from_betas(args["paper_betas"])
        if kind == "alphas":
            return cls.from_alphas(args["alphas"])
        raise ValueError(f"unknown schedule kind {kind!r} in config")

    # ------------------------------------------------------------------ forward process
    def scales(self, t: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(abar_t, bbar_t)`` in ``like``'s dtype and device, shaped to broadcast over it.

        ``t`` is an int (both are 0-d tensors) or a long tensor of steps ``0..T`` of shape
        ``(N,)`` (both get shape ``(N, 1, ..., 1)``, one entry per leading item of ``like``).
        """
        abar = self.abar.to(like.device, like.dtype)[t]
        bbar = self.bbar.to(like.device, like.dtype)[t]
        if abar.ndim == 1:
            view = (-1,) + (1,) * (like.ndim - 1)
            abar, bbar = abar.view(view), bbar.view(view)
        return abar, bbar

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | int) -> Tensor:
        """The forward process in one jump: ``x_t = abar_t x_0 + bbar_t eps``
        (``docs/guides/diffusion.md``, "Forward process").

        ``x0``: clean data ``(N, ...)``, floating; ``eps``: noise of the same shape; ``t``: an
        int or a long tensor of steps in ``0..T`` of shape ``(N,)``, broadcast over the other
        dims. The result has ``x0``'s dtype and device (the schedule is float64; its
        coefficients are cast to ``x0``'s dtype first, as the training loss does).
        """
        x0 = check_tensor(x0, "x0", floating=True, min_ndim=1)
        eps = check_tensor(eps, "eps", floating=True)
        if eps.shape != x0.shape:
            raise ValueError(f"eps must have x0's shape {tuple(x0.shape)}, got {tuple(eps.shape)}")
        t = self._check_t(t, x0)
        abar, bbar = self.scales(t, x0)
        return abar * x0 + bbar * eps.to(x0.device, x0.dtype)

    def sample_timesteps(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``n`` steps drawn uniformly from ``1..T`` (long, shape ``(n,)``).

        Drawn on the CPU from ``generator`` and then moved to ``device``, so a seed gives the
        same steps on every device.
        """
        n = check_int(n, "n", low=0)
        check_generator(generator)
        t = torch.randint(1, self.T + 1, (n,), generator=generator)
        return t if device is None else t.to(device)

    def noise_batch(self, x0: Tensor, *, generator: torch.Generator | None = None) -> NoisyBatch:
        """One Monte Carlo draw of the forward process for a batch of clean data ``x0``:
        ``t ~ Uniform{1..T}`` per item, ``eps ~ N(0, I)`` (both from ``generator``, on the CPU,
        in that order) and ``x_t = abar_t x_0 + bbar_t eps``. What every training loss of
        kexue.diffusion starts from (``docs/guides/diffusion.md``, "Training loss")."""
        x0 = check_tensor(x0, "x0", floating=True, min_ndim=1)
        t = self.sample_timesteps(len(x0), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        t, eps = t.to(x0.device), eps.to(x0.device, x0.dtype)
        return NoisyBatch(t, eps, self.add_noise(x0, eps, t))

    def _check_t(self, t: object, x0: Tensor) -> Tensor | int:
        if isinstance(t, Tensor):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"t must be an int or an integer tensor, got dtype {t.dtype}")
            if t.ndim > 1 or (t.ndim == 1 and len(t) != len(x0)):
                raise ValueError(
                    f"t must be an int or a tensor of shape ({len(x0)},) (one step per item of "
                    f"x0), got shape {tuple(t.shape)}"
                )
            if t.numel() and (int(t.min()) < 0 or int(t.max()) > self.T):
                raise ValueError(f"t must hold steps in 0..T={self.T}, got {describe(t)}")
            return t.to(x0.device).long()
        return check_int(t, "t", low=0, high=self.T)

    def same_as(self, other: NoiseSchedule) -> bool:
        """True when ``other`` has the same ``T`` and the same ``abar`` (to 1e-12)."""
        return (
            isinstance(other, NoiseSchedule)
            and other.T == self.T
            and torch.allclose(other.abar.double(), self.abar.double(), rtol=1e-12, atol=0)
        )

    # ------------------------------------------------------------------ conversions
    def to_diffusers_betas(self) -> Tensor:
        """The DDPM paper's betas ``1 - alpha_t^2`` for ``t = 1..T`` (diffusers' ``betas``)."""
        return 1 - self.alpha[1:] ** 2

    def trajectory(self, K: int, spacing: str = "even") -> list[int]:
        """``K`` kept steps, increasing (``docs/guides/few-step.md``, "Where the steps go").

        ``"even"``: ``round(linspace(1, T, K))``; ``"quadratic"``: ``1 + (T - 1) (i/(K-1))^2``
        (dense at small t, where the image takes shape); both keep ``1`` and ``T``, so the last
        jump (from step 1 to clean data) is the decoder step a likelihood bound needs.
        ``"trailing"``: ``round(T - k T/K)`` for ``k = 0..K-1``, i.e. ``T/K, 2T/K, ..., T``
        (diffusers' trailing spacing): every model call moves the sample ``T/K`` steps and the
        last jump goes from ``T/K`` to clean data; what sampling uses by default
        (:data:`SAMPLING_SPACING`). Rounding collisions are pushed apart so the K steps stay
        distinct.
        """
        T = self.T
        if not isinstance(K, int) or isinstance(K, bool):
            raise TypeError(f"K must be an int, got {type(K).__name__}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        if spacing == "trailing":
            if not 1 <= K <= T:
                raise ValueError(f"K must be in 1..T={T}, got {K}")
            # diffusers: np.round(np.arange(T, 0, -T / K)) - 1 in its 0-based steps
            rounded = np.round(np.arange(T, 0, -T / K))[:K]
            return sorted(int(v) for v in rounded)  # distinct: neighbours differ by T/K >= 1
        if not 2 <= K <= T:
            raise ValueError(f"K must be in 2..T={T} (a trajectory keeps 1 and T), got {K}")
        i = torch.arange(K, dtype=torch.float64) / (K - 1)
        raw = 1 + (T - 1) * (i if spacing == "even" else i**2)
        steps = [int(v) for v in torch.round(raw).tolist()]
        for k in range(1, K):  # strictly increasing from the start ...
            steps[k] = max(steps[k], steps[k - 1] + 1)
        steps[-1] = T
        for k in range(K - 2, -1, -1):  # ... and below T from the end
            steps[k] = min(steps[k], steps[k + 1] - 1)
        return steps

    def check_steps(self, steps: Sequence[int]) -> list[int]:
        """Validate an explicit trajectory: strictly increasing integers in ``1..T``."""
        out = [int(s) for s in steps]
        if not out or any(s != v for s, v in zip(out, steps, strict=True)):
            raise ValueError("steps must be a non-empty increasing list of integers in 1..T")
        if out[0] < 1 or out[-1] > self.T or any(b <= a for a, b in itertools.pairwise(out)):
            raise ValueError(
                f"steps must be strictly increasing integers in 1..T={self.T}, got "
                f"{out[:3]}...{out[-3:]}"
            )
        return out

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.config.get('kind', 'custom')}, T={self.T})"


def check_schedule(schedule: object, eps_model: object = None, name: str = "schedule"):
    """``schedule`` as a :class:`NoiseSchedule` (``TypeError`` otherwise); ``ValueError`` when
    ``eps_model`` carries the schedule it was trained with (``eps_model.schedule``, as models
    loaded with ``from_pretrained`` do) and ``schedule`` differs from it (another ``T`` or
    another ``abar``)."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"{name} must be a NoiseSchedule, got {describe(schedule)}")
    trained = getattr(eps_model, "schedule", None)
    if isinstance(trained, NoiseSchedule) and not trained.same_as(schedule):
        raise ValueError(
            f"{name} {schedule!r} differs from the schedule the model was trained with "
            f"({trained!r}, abar_T = {float(trained.abar[-1]):.4g}); pass the model's own "
            "schedule (model.schedule)"
        )
    return schedule


def _check_T(T: int) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")


def _with_config(schedule: NoiseSchedule, config: dict[str, Any]) -> NoiseSchedule:
    return NoiseSchedule(schedule.alpha, schedule.beta, schedule.abar, schedule.bbar, config)
