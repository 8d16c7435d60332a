"""Independent references for the diffusion ODE solvers (``docs/guides/few-step.md``).

Written from the formulas directly, in float64, without calling the code under test (only the
``abar``/``bbar`` tables of a :class:`~kexue.diffusion.NoiseSchedule` are read):

- :class:`GaussianTestbed`: data ``N(m, Sigma)`` (any covariance) with its exact eps-model, the
  exact probability-flow ODE map between any two steps, and the closed forms of the empirical
  model statistics ``l, s, b`` of DPM-Solver-v3;
- :func:`ddim_reference`: deterministic DDIM from the posterior form
  ``x_s = (bbar_s / bbar_t) x_t + (abar_s - abar_t bbar_s / bbar_t) x0_hat``;
- :func:`dpm_solver_pp_reference`: multistep DPM-Solver++ of order 1 or 2 written in
  ``h = lambda_s - lambda_t`` (the exact integral of the linear extrapolation of ``x0_hat``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kexue.diffusion.schedule import NoiseSchedule

__all__ = ["GaussianTestbed", "ddim_reference", "dpm_solver_pp_reference"]

EpsModel = Callable[[Tensor, Tensor], Tensor]


def _ab(schedule: NoiseSchedule, t: int) -> tuple[float, float]:
    return float(schedule.abar.double()[t]), float(schedule.bbar.double()[t])


class GaussianTestbed:
    """``x_0 ~ N(mean, cov)`` on images of ``mean.shape`` (float64), everything in closed form.

    With ``x_t = a x_0 + b eps`` (``a = abar_t``, ``b = bbar_t``), ``x_t ~ N(a m, V)`` with
    ``V = a^2 Sigma + b^2 I``, the exact eps-model is ``E[eps | x_t] = b V^-1 (x_t - a m)``
    (linear in ``x_t``), and in the eigenbasis ``Sigma = Q diag(k) Q^T`` every coordinate of
    ``x_t - a m`` is scaled by ``sqrt(a^2 k + b^2)`` along the probability-flow ODE.
    """

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.shape = tuple(self.mean.shape)
        self.d = self.mean.numel()
        self.cov = torch.as_tensor(cov, dtype=torch.float64).reshape(self.d, self.d)
        self.kappa, self.Q = torch.linalg.eigh(self.cov)
        if bool((self.kappa <= 0).any()):
            raise ValueError("cov must be symmetric positive definite")
        self.m = self.mean.reshape(self.d)

    @classmethod
    def random(cls, shape: Sequence[int], generator: torch.Generator, correlated: bool = True):
        """A random mean in [-0.5, 0.5] and covariance (variances ~0.05..0.5; off-diagonal
        correlations when ``correlated``)."""
        d = math.prod(shape)
        mean = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
        if correlated:
            A = torch.randn(d, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
            cov = 0.25 * A @ A.T + 0.05 * torch.eye(d, dtype=torch.float64)
        else:
            cov = torch.diag(0.05 + 0.45 * torch.rand(d, generator=generator, dtype=torch.float64))
        return cls(mean, cov)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        x = self.m + z @ torch.linalg.cholesky(self.cov).T
        return x.reshape(n, *self.shape)

    def _V_inv(self, a: float, b: float) -> Tensor:
        return self.Q @ torch.diag(1 / (a**2 * self.kappa + b**2)) @ self.Q.T

    def eps_model(self, schedule: NoiseSchedule) -> EpsModel:
        """The exact ``eps_model(x_t, t)`` (float64 out; ``t`` a long tensor of steps)."""
        abar, bbar = schedule.abar.double(), schedule.bbar.double()

        def eps(x: Tensor, t: Tensor) -> Tensor:
            x = x.double().reshape(len(x), self.d)
            a, b = abar[t.cpu()][:, None], bbar[t.cpu()][:, None]
            y = (x - a * self.m) @ self.Q  # eigen-coordinates of x - a m
            scaled = (b * y / (a**2 * self.kappa + b**2)) @ self.Q.T
            return scaled.reshape(len(x), *self.shape)

        return eps

    def flow(self, schedule: NoiseSchedule, x: Tensor, t_from: int, t_to: int) -> Tensor:
        """The exact probability-flow ODE map of ``x`` (at step ``t_from``) to step ``t_to``
        (``0`` = data)."""
        a0, b0 = _ab(schedule, t_from)
        a1, b1 = _ab(schedule, t_to)
        x = x.double().reshape(len(x), self.d)
        y = (x - a0 * self.m) @ self.Q
        ratio = torch.sqrt((a1**2 * self.kappa + b1**2) / (a0**2 * self.kappa + b0**2))
        out = a1 * self.m + (y * ratio) @ self.Q.T
        return out.reshape(len(x), *self.shape)

    def statistics(
        self,
        schedule: NoiseSchedule,
        steps: Sequence[int],
        l: Tensor | None = None,  # noqa: E741
        l_dot: Tensor | None = None,
    ):
        """Closed forms of ``(l, s, b)`` at ``steps``, each ``(len(steps), *shape)`` float64.

        With ``P = V^-1``, ``M = b^2 P - diag(l)`` and ``y = x_t - a m``:
        ``l = b^2 diag(P)``, ``f = M y / a - l m``, and along the ODE ``y' = b^2 (I - P) y``,
        ``da/dlambda = a b^2``, ``db/dlambda = -a^2 b``, so ``f' = A y - l' m`` with
        ``A = (M' - b^2 M P) / a``; then ``s = diag(A V M^T) a / diag(M V M^T)`` and
        ``b_stat = -l' m + s l m``. Given ``l`` and its slope ``l_dot`` in ``lambda`` (e.g. an
        estimate), ``s`` and ``b`` are the optimal ones for that ``l``.
        """
        out_l, out_s, out_b = [], [], []
        for k, t in enumerate(steps):
            a, b = _ab(schedule, int(t))
            v = a**2 * self.kappa + b**2
            v_dot = 2 * a**2 * b**2 * (self.kappa - 1)
            P = self.Q @ torch.diag(1 / v) @ self.Q.T
            V = self.Q @ torch.diag(v) @ self.Q.T
            bP = b**2 * P
            bP_dot = -2 * a**2 * b**2 * P + b**2 * (self.Q @ torch.diag(-v_dot / v**2) @ self.Q.T)
            lk = torch.diagonal(bP).clone() if l is None else l[k].reshape(self.d).double()
            lk_dot = (
                torch.diagonal(bP_dot).clone() if l_dot is None
                else l_dot[k].reshape(self.d).double()
            )  # fmt: skip
            M = bP - torch.diag(lk)
            M_dot = bP_dot - torch.diag(lk_dot)
            A = (M_dot - b**2 * M @ P) / a
            cov_ff = torch.diagonal(A @ V @ M.T) / a
            var_f = torch.diagonal(M @ V @ M.T) / a**2
            s = cov_ff / var_f
            out_l.append(lk)
            out_s.append(s)
            out_b.append(-lk_dot * self.m + s * lk * self.m)
        stack = lambda rows: torch.stack(rows).reshape(len(steps), *self.shape)  # noqa: E731
        return stack(out_l), stack(out_s), stack(out_b)


def ddim_reference(
    eps_model: EpsModel, schedule: NoiseSchedule, steps: Sequence[int], final: int, x_T: Tensor
) -> Tensor:
    """Deterministic DDIM through ``steps`` (in sampling order, decreasing) and on to ``final``,
    each jump ``x_s = (bbar_s / bbar_t) x_t + (abar_s - abar_t bbar_s / bbar_t) x0_hat``."""
    x = x_T.double()
    path = [*steps, final]
    for t, s in itertools.pairwise(path):
        a_t, b_t = _ab(schedule, t)
        a_s, b_s = _ab(schedule, s)
        eps = eps_model(x, torch.full((len(x),), t, dtype=torch.long)).double()
        x0 = (x - b_t * eps) / a_t
        x = (b_s / b_t) * x + (a_s - a_t * b_s / b_t) * x0
    return x


def dpm_solver_pp_reference(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    steps: Sequence[int],
    final: int,
    x_T: Tensor,
    order: int = 2,
    corrector: bool = False,
    pseudo: bool = False,
) -> Tensor:
    """Multistep DPM-Solver++ (data prediction) of order 1 to 3 through ``steps`` then
    ``final``, written with Newton divided differences of ``x0_hat`` in ``lambda``.

    With ``h = lambda_s - lambda_t`` and ``D0, D1, D2`` estimates of ``x0_hat`` and its first two
    derivatives at ``lambda_t``, the exact integral of the Taylor polynomial is
    ``x_s = (bbar_s / bbar_t) x_t + abar_s [(1 - e^-h) D0 + (h - 1 + e^-h) D1
    + (h^2/2 - h + 1 - e^-h) D2]``. From the divided differences ``d1 = x0[t, t-1]`` and
    ``d2 = x0[t, t-1, t-2]`` (over the last evaluated points): ``D1 = d1 + d2 (lambda_t -
    lambda_{t-1})``, ``D2 = 2 d2`` (the interpolating parabola), or ``D1 = d1``, ``D2 = 2 d2``
    (``pseudo``). The order grows from 1 as points become available.
    ``corrector`` (order 2, from the third evaluation): once ``x0_hat`` is known at the new point
    ``n``, redo the step from the previous point ``c`` with ``D1 = (x0_n - x0_c) / h``, keeping
    ``x0_n``. A final jump to step 0 returns ``D0``.
    """
    x = x_T.double()
    path = [*steps, final]
    hist: list[tuple[Tensor, float, int]] = []  # (x0_hat, lambda, step), newest last
    base = x
    for i, (t, s) in enumerate(itertools.pairwise(path)):
        a_t, b_t = _ab(schedule, t)
        eps = eps_model(x, torch.full((len(x),), t, dtype=torch.long)).double()
        x0 = (x - b_t * eps) / a_t
        lam_t = math.log(a_t / b_t)
        if corrector and order >= 2 and i >= 2:
            x0_c, lam_c, t_c = hist[-1]
            b_c = _ab(schedule, t_c)[1]
            h = lam_t - lam_c
            x = (b_t / b_c) * base + a_t * (-math.expm1(-h)) * x0_c
            x = x + a_t * (h + math.expm1(-h)) * (x0 - x0_c) / h
        base = x
        hist.append((x0, lam_t, t))
        if s == 0:
            return x0
        a_s, b_s = _ab(schedule, s)
        h = math.log(a_s / b_s) - lam_t
        x_new = (b_s / b_t) * x + a_s * (-math.expm1(-h)) * x0
        q = min(order, len(hist)) - 1
        if q >= 1:
            (y0, l0, _), (y1, l1, _) = hist[-1], hist[-2]
            d1 = (y0 - y1) / (l0 - l1)
            D1, D2 = d1, torch.zeros_like(d1)
            if q >= 2:
                y2, l2, _ = hist[-3]
                d2 = (d1 - (y1 - y2) / (l1 - l2)) / (l0 - l2)
                D1, D2 = (d1 if pseudo else d1 + d2 * (l0 - l1)), 2 * d2
            x_new = x_new + a_s * (h + math.expm1(-h)) * D1
            x_new = x_new + a_s * (h**2 / 2 - h - math.expm1(-h)) * D2
        x = x_new
    return x
