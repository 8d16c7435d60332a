"""DPM-Solver-v3: a multistep predictor-corrector ODE solver built on empirical model statistics.

``docs/guides/few-step.md``, "DPM-Solver-v3". With the statistics ``l, s, b`` of
:mod:`kexue.diffusion.solver_statistics` (linear in ``lambda`` between their grid steps), write
``L, S`` for the integrals of ``l, s`` in ``lambda`` and
``f = (bbar eps_theta - l * x) / abar``. A step from ``lambda_c`` to ``lambda_n`` is exactly

    x_n = (abar_n / abar_c) e^{-(L_n - L_c)} x_c
          - abar_n int_c^n E(lambda) g(lambda) dlambda
          - abar_n int_c^n E(lambda) beta(lambda) dlambda

with the kernel ``E(lambda) = e^{(L(lambda) - L_n) + (S(lambda) - S_c)}``,
``beta(lambda) = int_c^lambda e^{-(S - S_c)} b`` and ``g = e^{-(S - S_c)} f - beta``. The solver
replaces ``g`` by its Taylor polynomial at ``lambda_c``, whose derivatives come from the values
of ``g`` at earlier steps (predictor) or at the new step (corrector, no extra model call).
Every coefficient is a per-pixel map computed once per trajectory (:func:`dpm_solver_v3_plan`),
so a step costs one model call and a few multiply-adds.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kexue.diffusion.sampler import call_model, initial_noise, sampling_device, sampling_dtypes
from kexue.diffusion.schedule import NoiseSchedule
from kexue.diffusion.solver_statistics import (
    SolverStatistics,
    check_model_schedule,
    interpolate_lambda,
    log_snr,
)
from kexue.progress import progress_bar
from kexue.validation import (
    check_bool,
    check_callable,
    check_choice,
    check_generator,
    check_int,
    check_shape,
    check_tensor,
    describe,
)

__all__ = [
    "SPACINGS",
    "V3Options",
    "V3Plan",
    "V3Update",
    "dpm_solver_v3_plan",
    "dpm_solver_v3_sample",
    "v3_trajectory",
]

SPACINGS = ("trailing", "time-uniform", "logsnr-uniform")
MAX_ORDER = 4
_GL_NODES = 6  # Gauss-Legendre nodes per sub-interval of the lambda integrals
_H_MAX = 0.1  # longest sub-interval in lambda


# ---------------------------------------------------------------------- trajectories
def v3_trajectory(
    schedule: NoiseSchedule, steps: int | Sequence[int], spacing: str = "trailing"
) -> tuple[list[int], int]:
    """``(evaluated steps in sampling order, final step)`` for ``steps`` model calls
    (``docs/guides/few-step.md``, "Trajectories").

    ``"trailing"``: the model runs at ``round(T - k T/K)``, ``k = 0..K-1`` (``T, ..., T/K``,
    diffusers' trailing spacing) and the last state is denoised to step 0 without a model call;
    ``"time-uniform"`` / ``"logsnr-uniform"``: ``K + 1`` points from ``T`` down to step 1, evenly
    spaced in ``t`` / in ``lambda``; the model runs at the first ``K`` and the solver stops at
    step 1 (noise ``bbar_1`` left). A list of steps (increasing, in ``1..T``) is used as the
    evaluated steps of a trailing-like trajectory (denoised after the smallest).
    """
    T = schedule.T
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool | np.bool_):
        spacing = check_choice(spacing, "spacing", SPACINGS)
        K = check_int(steps, "steps", low=1, high=T if spacing == "trailing" else T - 1)
        if spacing == "trailing":
            return schedule.trajectory(K, "trailing")[::-1], 0
        raw: list[int]
        if spacing == "time-uniform":
            raw = np.round(np.linspace(T, 1, K + 1)).astype(np.int64).tolist()
        else:
            lam = log_snr(schedule)[1:]
            targets = torch.linspace(float(lam[-1]), float(lam[0]), K + 1, dtype=torch.float64)
            raw = ((lam[None, :] - targets[:, None]).abs().argmin(1) + 1).tolist()
        points = _distinct_decreasing(raw, 1, T)
        return points[:-1], points[-1]
    if isinstance(steps, Tensor | np.ndarray):
        steps = steps.tolist()
    if not isinstance(steps, Sequence) or isinstance(steps, str | bytes):
        raise TypeError(f"steps must be an int K or a list of steps, got {describe(steps)}")
    kept = [check_int(v, "steps entries", low=1, high=T) for v in steps]
    if not kept or any(b <= a for a, b in itertools.pairwise(kept)):
        raise ValueError(f"steps must be a non-empty increasing list of steps in 1..T={T}")
    return kept[::-1], 0


def _distinct_decreasing(raw: list[int], lo: int, hi: int) -> list[int]:
    """``raw`` (decreasing, first = ``hi``) made strictly decreasing within ``[lo, hi]``."""
    out = [min(max(int(v), lo), hi) for v in raw]
    for k in range(len(out) - 2, -1, -1):  # keep the last point, push earlier ones up
        out[k] = max(out[k], out[k + 1] + 1)
    for k in range(1, len(out)):  # keep the first point, push later ones down
        out[k] = min(out[k], out[k - 1] - 1)
    return out


# ---------------------------------------------------------------------- the integrals
@dataclass(frozen=True)
class _Window:
    """Exact-to-quadrature integrals of the piecewise-linear statistics on ``[lo, hi]``
    relative to a base point ``lam_c``: per breakpoint ``dL, dS`` (integrals of ``l, s`` from
    ``lam_c``) and ``beta`` (of ``e^{-dS} b``); per Gauss-Legendre node the same plus ``lam``."""

    points: Tensor  # (M + 1,) breakpoints, increasing
    dL: Tensor  # (M + 1, d)
    dS: Tensor
    beta: Tensor
    node_lam: Tensor  # (M, n)
    node_dL: Tensor  # (M, n, d)
    node_dS: Tensor
    node_beta: Tensor
    weights: Tensor  # (M, n): quadrature weights in lambda

    def index(self, lam: float) -> int:
        return int(torch.argmin((self.points - lam).abs()))


def _gauss_legendre(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Nodes ``u`` and weights ``w`` on ``[0, 1]``, and ``Q[k, j] = int_0^{u_k} ell_j``
    (``ell_j`` the Lagrange basis on the nodes): partial integrals from node values."""
    x, w = np.polynomial.legendre.leggauss(n)
    u, w = (x + 1) / 2, w / 2
    powers = np.arange(n)
    vander = u[:, None] ** powers[None, :]  # V[k, j] = u_k^j
    integ = u[:, None] ** (powers[None, :] + 1) / (powers[None, :] + 1)
    Q = integ @ np.linalg.inv(vander)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).double()  # noqa: E731
    return as_t(u), as_t(w), as_t(Q)


_U, _W, _Q = _gauss_legendre(_GL_NODES)


def _window(curves: tuple[Tensor, Tensor, Tensor, Tensor], points: list[float], lam_c: float):
    nodes, l_, s, b = curves
    lo, hi = min(points), max(points)
    inner = nodes[(nodes > lo) & (nodes < hi)].tolist()
    cuts = sorted(set(points) | set(inner))
    fine = [cuts[0]]
    for right in cuts[1:]:
        pieces = max(1, math.ceil((right - fine[-1]) / _H_MAX))
        left = fine[-1]
        fine.extend(left + (right - left) * k / pieces for k in range(1, pieces))
        fine.append(right)
    P = torch.tensor(fine, dtype=torch.float64)
    h = (P[1:] - P[:-1])[:, None]  # (M, 1)
    la, sa, ba = (interpolate_lambda(nodes, v, P) for v in (l_, s, b))  # (M + 1, d)
    u = _U[None, :, None]  # (1, n, 1)
    cum = lambda v: torch.cat([torch.zeros_like(v[:1]), torch.cumsum(v, 0)])  # noqa: E731
    CL = cum(h * (la[:-1] + la[1:]) / 2)
    CS = cum(h * (sa[:-1] + sa[1:]) / 2)
    hn = h[:, :, None]
    node_L = CL[:-1, None] + hn * (la[:-1, None] * u + (la[1:] - la[:-1])[:, None] * u**2 / 2)
    node_S = CS[:-1, None] + hn * (sa[:-1, None] * u + (sa[1:] - sa[:-1])[:, None] * u**2 / 2)
    node_b = ba[:-1, None] + (ba[1:] - ba[:-1])[:, None] * u
    ic = int(torch.argmin((P - lam_c).abs()))
    node_dS = node_S - CS[ic]
    q = torch.exp(-node_dS) * node_b  # integrand of beta at the nodes
    CB = cum(h * torch.einsum("k,mkd->md", _W, q))
    node_B = CB[:-1, None] + hn * torch.einsum("kj,mjd->mkd", _Q, q)
    return _Window(
        points=P,
        dL=CL - CL[ic],
        dS=CS - CS[ic],
        beta=CB - CB[ic],
        node_lam=P[:-1, None] + h * _U[None, :],
        node_dL=node_L - CL[ic],
        node_dS=node_dS,
        node_beta=node_B - CB[ic],
        weights=h * _W[None, :],
    )


def _derivative_weights(lams: Sequence[float], pseudo: bool) -> np.ndarray:
    """``M`` with ``g^(k)(lam_0) ~ sum_j M[k-1, j-1] (g_j - g_0)`` for ``k, j = 1..q`` from the
    values of ``g`` at ``lams = [lam_0, ..., lam_q]``: the Taylor coefficients of the
    interpolating polynomial, or (``pseudo``) ``k!`` times the divided difference of the first
    ``k + 1`` points only."""
    z = np.asarray(lams, dtype=np.float64)
    q = len(z) - 1
    M = np.zeros((q, q))
    if q == 0:
        return M
    if pseudo:
        for k in range(1, q + 1):
            for j in range(1, k + 1):
                others = [z[j] - z[i] for i in range(k + 1) if i != j]
                M[k - 1, j - 1] = math.factorial(k) / np.prod(others)
        return M
    R = np.array([[(z[j] - z[0]) ** k / math.factorial(k) for k in range(1, q + 1)]
                  for j in range(1, q + 1)])  # fmt: skip
    return np.linalg.inv(R)


@dataclass(frozen=True)
class V3Update:
    """One linear update ``x_new = x_coef * x + sum_j coef_j * f[j] + bias`` (per-pixel maps of
    shape ``(1, *image_shape)``, float64): ``f[j]`` is the rescaled model output at the
    ``j``-th evaluated step, ``x`` the state at the update's base step."""

    step: int  # the step x_new belongs to (0 = clean data)
    order: int
    x_coef: Tensor
    f_coefs: tuple[tuple[int, Tensor], ...]
    bias: Tensor

    def apply(self, x: Tensor, fs: Mapping[int, Tensor]) -> Tensor:
        """``x_new`` from the base state ``x`` and the rescaled model outputs ``fs[j]`` (the
        arithmetic of :func:`dpm_solver_v3_sample`, for step-by-step drivers such as
        :class:`~kexue.diffusion.schedulers.DPMSolverV3Scheduler`)."""
        return _apply(self, x, fs)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> V3Update:
        """This update with its coefficient maps on ``device`` in ``dtype``."""
        moved = _moved(self, torch.device(device), dtype)
        assert moved is not None
        return moved


@dataclass(frozen=True)
class V3Plan:
    """Everything :func:`dpm_solver_v3_sample` needs besides the model, per evaluated step
    ``i`` (in sampling order): ``f[i] = f_eps[i] * eps_theta + f_x[i] * x``, an optional
    corrector of ``x`` (using ``f[i]``, applied before the predictor) and the predictor to the
    next step (the last one to ``final_step``)."""

    steps: list[int]
    final_step: int
    f_eps: list[float]
    f_x: list[Tensor]
    correctors: list[V3Update | None]
    predictors: list[V3Update]


def _update(
    curves, alpha: Tensor, lam_all: Tensor, base: tuple[int, int], target: int,
    others: list[tuple[int, int]], pseudo: bool, shape: tuple[int, ...],
) -> V3Update:  # fmt: skip
    """The update from evaluated point ``base = (index, step)`` to step ``target`` with the
    Taylor polynomial of ``g`` fitted on ``others`` (``(index, step)`` pairs)."""
    (ib, tb), q = base, len(others)
    lam_c, lam_n = float(lam_all[tb]), float(lam_all[target])
    lam_o = [float(lam_all[t]) for _, t in others]
    win = _window(curves, [lam_c, lam_n, *lam_o], lam_c)
    i_n = win.index(lam_n)
    dL_n = win.dL[i_n]
    inside = win.node_lam[:, 0] >= lam_c - 1e-12  # sub-intervals in [lam_c, lam_n]
    kern = torch.exp(win.node_dL[inside] - dL_n + win.node_dS[inside])  # (M', n, d)
    wts = win.weights[inside][:, :, None]
    du = (win.node_lam[inside] - lam_c)[:, :, None]
    c = [(wts * kern * du**k).sum((0, 1)) / math.factorial(k) for k in range(q + 1)]
    d_b = (wts * kern * win.node_beta[inside]).sum((0, 1))
    a_n, a_c = float(alpha[target]), float(alpha[tb])
    x_coef = (a_n / a_c) * torch.exp(-dL_n)
    M = _derivative_weights([lam_c, *lam_o], pseudo)
    m = [sum(c[k + 1] * float(M[k, j]) for k in range(q)) for j in range(q)]
    coefs = [(ib, -a_n * (c[0] - sum(m, torch.zeros_like(c[0]))))]
    bias = -a_n * d_b
    for (io, _), lam_j, m_j in zip(others, lam_o, m, strict=True):
        k = win.index(lam_j)
        coefs.append((io, -a_n * m_j * torch.exp(-win.dS[k])))
        bias = bias + a_n * m_j * win.beta[k]
    coefs = [(j, c.view(shape)) for j, c in coefs]
    return V3Update(target, q + 1, x_coef.view(shape), tuple(coefs), bias.view(shape))


@dataclass(frozen=True)
class V3Options:
    """The solver's options (documented in :func:`dpm_solver_v3_sample`)."""

    order: int = 3
    spacing: str = "trailing"
    pseudo_order: bool | None = None
    corrector: bool = True
    corrector_pseudo: bool = False
    half_corrector: bool = False
    lower_order_final: bool | None = None


def dpm_solver_v3_plan(
    schedule: NoiseSchedule,
    statistics: SolverStatistics,
    steps: int | Sequence[int] = 10,
    options: V3Options | None = None,
) -> V3Plan:
    """The coefficients of every update of :func:`dpm_solver_v3_sample` (float64, CPU) for
    ``steps`` model calls with ``options``; computed once per trajectory."""
    if not isinstance(statistics, SolverStatistics):
        raise TypeError(f"statistics must be a SolverStatistics, got {describe(statistics)}")
    statistics.check(schedule)
    opts = V3Options() if options is None else options
    evals, final = v3_trajectory(schedule, steps, opts.spacing)
    order = check_int(opts.order, "order", low=1, high=MAX_ORDER)
    K = len(evals)
    pseudo_order, lower_order_final = _auto_options(K, opts.pseudo_order, opts.lower_order_final)
    corrector = check_bool(opts.corrector, "corrector")
    corrector_pseudo = check_bool(opts.corrector_pseudo, "corrector_pseudo")
    half_corrector = check_bool(opts.half_corrector, "half_corrector")
    shape = (1, *tuple(statistics.image_shape))
    nodes, l_, s, b = statistics.curves()
    curves = (nodes, l_.flatten(1), s.flatten(1), b.flatten(1))
    lam_all = log_snr(schedule)
    alpha, sigma = schedule.abar.double(), schedule.bbar.double()
    l_eval = statistics.at(evals)[0].reshape(K, *shape)
    f_eps = [float(sigma[t] / alpha[t]) for t in evals]
    f_x = [-l_eval[i] / float(alpha[t]) for i, t in enumerate(evals)]
    predictors, orders = [], []
    for i in range(K):
        if i == K - 1 and final == 0:  # x_0 = x0_hat = ((1 - l) x - N) / abar, N kept
            a = float(alpha[evals[i]])
            predictors.append(V3Update(0, 1, (1 - l_eval[i]) / a,
                                       ((i, -torch.ones(shape, dtype=torch.float64)),),
                                       torch.zeros(shape, dtype=torch.float64)))  # fmt: skip
            orders.append(1)
            continue
        p = min(order, i + 1, K - i) if lower_order_final else min(order, i + 1)
        target = evals[i + 1] if i + 1 < K else final
        others = [(j, evals[j]) for j in range(i - 1, i - p, -1)]
        predictors.append(_update(curves, alpha, lam_all, (i, evals[i]), target, others,
                                  pseudo_order, shape))  # fmt: skip
        orders.append(p)
    correctors: list[V3Update | None] = [None] * K
    for i in range(1, K):
        if not corrector or (half_corrector and evals[i] <= schedule.T / 2):
            continue
        c = orders[i - 1] + (1 if corrector_pseudo else 0)
        if c < 2:
            continue
        others = [(i, evals[i])] + [(j, evals[j]) for j in range(i - 2, i - c, -1)]
        correctors[i] = _update(curves, alpha, lam_all, (i - 1, evals[i - 1]), evals[i],
                                others, corrector_pseudo, shape)  # fmt: skip
    return V3Plan(evals, final, f_eps, f_x, correctors, predictors)


def _auto_options(K: int, pseudo_order: bool | None, lower_order_final: bool | None):
    """Defaults that depend on the number of steps (``docs/guides/few-step.md``, "Options")."""
    if pseudo_order is None:
        pseudo_order = K <= 5
    if lower_order_final is None:
        lower_order_final = K > 5
    return check_bool(pseudo_order, "pseudo_order"), check_bool(
        lower_order_final, "lower_order_final"
    )


# ---------------------------------------------------------------------- sampling
def _apply(update: V3Update, x: Tensor, fs: Mapping[int, Tensor]) -> Tensor:
    out = update.x_coef * x + update.bias
    for j, coef in update.f_coefs:
        out = out + coef * fs[j]
    return out


def _moved(update: V3Update | None, device: torch.device, dtype: torch.dtype):
    if update is None:
        return None
    move = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
    coefs = tuple((j, move(c)) for j, c in update.f_coefs)
    return V3Update(update.step, update.order, move(update.x_coef), coefs, move(update.bias))


@torch.no_grad()
def dpm_solver_v3_sample(
    eps_model: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    statistics: SolverStatistics,
    shape_or_x_T: Sequence[int] | Tensor,
    *,
    steps: int | Sequence[int] = 10,
    order: int = 3,
    spacing: str = "trailing",
    pseudo_order: bool | None = None,
    corrector: bool = True,
    corrector_pseudo: bool = False,
    half_corrector: bool = False,
    lower_order_final: bool | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Generate images with DPM-Solver-v3 in ``steps`` model calls (a deterministic ODE
    solver; ``docs/guides/few-step.md``, "DPM-Solver-v3").

    Args:
        eps_model: any callable ``eps_model(x_t, t) -> eps`` (``t``: long tensor of steps in
            ``1..T``).
        schedule: the model's :class:`NoiseSchedule`.
        statistics: its :class:`~kexue.diffusion.solver_statistics.SolverStatistics` (for this
            schedule and image shape), or ``SolverStatistics.data_prediction(...)`` (then this
            is DPM-Solver++).
        shape_or_x_T: ``(N, C, H, W)`` (the initial noise is drawn from ``generator``) or the
            initial noise ``x_T`` itself.
        steps: the number of model calls ``K``, or an increasing list of steps to evaluate.
        order: predictor order (1..4): the Taylor polynomial of ``g`` uses the last ``order``
            evaluated steps (fewer while they are not available yet).
        spacing: ``"trailing"``, ``"time-uniform"`` or ``"logsnr-uniform"`` (see
            :func:`v3_trajectory`).
        pseudo_order: estimate the ``k``-th derivative from the ``k + 1`` most recent points
            only (divided differences) instead of fitting all of them; default: ``K <= 5``.
        corrector: after each model call, redo the previous step with the new value (no extra
            call).
        corrector_pseudo: the corrector uses one point more (the predictor's points and the new
            one), with divided differences.
        half_corrector: apply the corrector only at steps ``t > T/2``.
        lower_order_final: cap the order at the number of steps left; default: ``K > 5``.
        generator: source of the initial noise (on the sampling device).
        progress: show a progress bar.
        device: where to sample (default: the model's device, else ``x_T``'s, else CPU).
        dtype: dtype of the returned images and of the loop (default: ``x_T``'s, else the
            model's parameters', else float32); float16/bfloat16 run the loop in float32.

    Returns:
        The images (at step 0 for ``"trailing"``, at step 1 for the other spacings).

    Raises:
        NonFiniteError: the model returned NaN or inf (the message names the step).
    """
    check_callable(eps_model, "eps_model", "eps_model(x_t, t)")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {describe(schedule)}")
    check_model_schedule(eps_model, schedule)
    if isinstance(shape_or_x_T, Tensor):
        x_T = check_tensor(shape_or_x_T, "x_T", floating=True, min_ndim=2)
        shape = tuple(x_T.shape)
    else:
        x_T, shape = None, check_shape(shape_or_x_T, "shape", min_len=2)
    if not isinstance(statistics, SolverStatistics):
        raise TypeError(f"statistics must be a SolverStatistics, got {describe(statistics)}")
    statistics.check(schedule, shape)
    generator = check_generator(generator)
    progress = check_bool(progress, "progress")
    options = V3Options(order, spacing, pseudo_order, corrector, corrector_pseudo,
                        half_corrector, lower_order_final)  # fmt: skip
    plan = dpm_solver_v3_plan(schedule, statistics, steps, options)
    state, model_dtype, out_dtype = sampling_dtypes(eps_model, x_T, dtype)
    x = initial_noise(shape, x_T, generator, sampling_device(eps_model, x_T, device), state)
    predictors = [_moved(u, x.device, state) for u in plan.predictors]
    correctors = [_moved(u, x.device, state) for u in plan.correctors]
    f_x = [v.to(device=x.device, dtype=state) for v in plan.f_x]
    fs: dict[int, Tensor] = {}
    x_base = x
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"DPM-Solver-v3 ({len(plan.steps)} steps)", total=len(plan.steps))
        for i, t in enumerate(plan.steps):
            eps = call_model(eps_model, x, t, model_dtype)
            fs[i] = plan.f_eps[i] * eps + f_x[i] * x
            if correctors[i] is not None:
                x = _apply(correctors[i], x_base, fs)
            x_base = x
            x = _apply(predictors[i], x, fs)
            for j in [j for j in fs if j < i - MAX_ORDER]:
                del fs[j]
            bar.advance(task)
    return x.to(out_dtype)
