"""Optimal reverse variances (Analytic-DPM and its extensions) and the optimal trajectory.

``docs/guides/optimal-variance.md``, "The optimal reverse variance". For a jump from kept step
``t`` down to ``s`` with the eta-family variance ``sigma^2`` (which fixes the mean, as in
:func:`~kexue.diffusion.sample`), approximating ``p(x_0 | x_t)`` by ``N(x0_hat, sbar_t^2 I)``
gives the reverse variance

    sigma^2 + gamma^2 sbar_t^2,   gamma = abar_s - abar_t sqrt(bbar_s^2 - sigma^2) / bbar_t,

non-zero even for DDIM (``sigma = 0``). The variances returned here are per-step tensors in
the sampler's layout: entry ``i`` is the jump from ``steps[i]`` to ``steps[i-1]`` (to 0 for
``i = 0``); use them as ``sample(..., eta=eta, variance=...)`` with the same ``eta``.

Switchable details of the paper's code (all on by default for sampling):

- ``clip``: ``0 <= sbar_t^2 <= min(bbar_t^2 / abar_t^2, ((b - a)/2)^2)`` for pixels in
  ``[a, b]``, i.e. the reverse variance lies between ``sigma^2`` (the forward posterior's)
  and the bound for bounded data (the paper clips ``1 - Gamma_t`` to ``[0, 1]``).
- ``last_step="mean"``: the last jump (to ``t = 0``) outputs the mean, without noise;
  ``"decoder"`` keeps its variance (``sbar_{tau_1}^2``), what the likelihood's decoder needs.
- ``cap_second_last``: the variance of the second-to-last jump is capped at
  ``(2 (2/255) sqrt(pi/2))^2`` (the pixel quantisation scale), for every method compared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kexue.diffusion.moments import KINDS, DiffusionMoments
from kexue.diffusion.sampler import check_eta, resolve_steps
from kexue.diffusion.schedule import NoiseSchedule

SECOND_TO_LAST_CAP = (2 * (2 / 255) * math.sqrt(math.pi / 2)) ** 2
LAST_STEP = ("mean", "decoder")


def jump_coefficients(
    schedule: NoiseSchedule, steps: Sequence[int], eta: float
) -> dict[str, Tensor]:
    """Float64 ``(K,)`` coefficients per jump, entry ``i`` from ``steps[i]`` to ``steps[i-1]``
    (or 0): ``sigma2`` (eta family), ``posterior`` (eta = 1), ``forward`` (the forward variance
    ``1 - abar_t^2/abar_s^2``), ``gamma`` (the weight of ``x_0`` in the posterior mean)."""
    t = torch.tensor(list(steps), dtype=torch.long)
    s = torch.cat([torch.zeros(1, dtype=torch.long), t[:-1]])
    abar, bbar = schedule.abar.double(), schedule.bbar.double()
    return _jump_terms(abar[s], abar[t], bbar[s], bbar[t], eta)


def _jump_terms(a_s: Tensor, a_t: Tensor, b_s: Tensor, b_t: Tensor, eta: float) -> dict:
    """Elementwise terms of a jump s -> t (any broadcastable shapes), also ``direction``
    ``sqrt(bbar_s^2 - sigma^2)``, the weight of ``eps_theta`` in the mean."""
    forward = 1 - (a_t / a_s) ** 2
    posterior = (b_s / b_t) ** 2 * forward
    sigma2 = eta**2 * posterior
    direction = torch.sqrt(torch.clamp(b_s**2 - sigma2, min=0.0))
    gamma = a_s - a_t * direction / b_t
    return {
        "sigma2": sigma2,
        "posterior": posterior,
        "forward": forward,
        "gamma": gamma,
        "direction": direction,
    }


def _finish(var: Tensor, last_step: str, cap_second_last: float | None, decoder: Tensor | None):
    if last_step not in LAST_STEP:
        raise ValueError(f"last_step must be one of {LAST_STEP}, got {last_step!r}")
    if cap_second_last is not None and not (0 <= cap_second_last < math.inf):
        raise ValueError(f"cap_second_last must be None or a number >= 0, got {cap_second_last!r}")
    var = var.clone()
    if last_step == "mean":
        var[0] = 0.0
    elif decoder is not None:
        var[0] = decoder
    if cap_second_last is not None and len(var) > 1:
        var[1] = torch.clamp(var[1], max=cap_second_last)
    return var


def optimal_variance(
    moments: DiffusionMoments,
    schedule: NoiseSchedule,
    steps: int | Sequence[int] | None,
    *,
    kind: str = "analytic",
    eta: float = 0.0,
    clip: bool = True,
    last_step: str = "mean",
    cap_second_last: float | None = SECOND_TO_LAST_CAP,
    spacing: str = "even",
    shape: Sequence[int] | None = None,
) -> Tensor:
    """The per-step optimal reverse variance ``sigma^2 + gamma^2 sbar_t^2`` on a trajectory.

    Args:
        moments: from :func:`~kexue.diffusion.moments.estimate_moments` for this model and
            ``schedule`` (checked: another schedule or image ``shape`` is a ``ValueError``).
        steps: an int K (trajectory with ``spacing``), an increasing list in ``1..T``, or None
            (all ``T`` steps).
        kind: the estimate of ``sbar_t^2`` (all from the same moments, no retraining):

            - ``"analytic"`` (default): perfect-mean Analytic-DPM, per ``t`` the better
              conditioned of the two forms below (the one with the smaller Monte Carlo standard
              error; in practice the Gamma form at small ``t``, the moment form at large ``t``);
            - ``"analytic-gamma"``: the paper's form ``(bbar_t^2/abar_t^2)(1 - Gamma_t)``;
            - ``"analytic-moment"``: estimator 1, ``Var[x_0] - (1/d) E||x0_hat - m||^2``;
            - ``"analytic-mle"``: imperfect mean (maximum likelihood with the learned mean),
              ``(bbar_t^2 / (abar_t^2 d)) E||eps - eps_theta||^2``;
            - ``"analytic-diag"``: per dimension, perfect mean (shape ``(K, C, H, W)``);
            - ``"analytic-mle-diag"``: per dimension, imperfect mean.
        eta: the DDIM-family member used for sampling (fixes the mean and ``sigma^2``).
        clip, last_step, cap_second_last: see the module docstring.
        shape: optional image (or batch) shape to check the moments against.

    Returns:
        float64 ``(K,)`` (or ``(K, C, H, W)``), entry ``i`` for the jump from ``steps[i]``.
    """
    if not isinstance(moments, DiffusionMoments):
        raise TypeError(f"moments must be DiffusionMoments, got {type(moments).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    eta = check_eta(eta)
    moments.check(schedule, shape)
    kept = resolve_steps(schedule, steps, spacing)
    moments.check_steps(kept)
    coef = jump_coefficients(schedule, kept, eta)
    sbar2 = moments.sbar2(kind, clip=clip)[torch.tensor(kept) - 1]
    view = (-1,) + (1,) * (sbar2.ndim - 1)
    var = coef["sigma2"].view(view) + coef["gamma"].view(view) ** 2 * sbar2
    return _finish(var, last_step, cap_second_last, None)


def fixed_variance(
    schedule: NoiseSchedule,
    steps: int | Sequence[int] | None,
    kind: str = "small",
    *,
    last_step: str = "mean",
    cap_second_last: float | None = SECOND_TO_LAST_CAP,
    spacing: str = "even",
) -> Tensor:
    """DDPM's two fixed variances as a per-step tensor, with the same last-step treatment.

    ``"small"``: the posterior variance ``(bbar_s/bbar_t)^2 (1 - abar_t^2/abar_s^2)`` (optimal
    for a single data point); ``"large"``: the forward variance ``1 - abar_t^2/abar_s^2``
    (optimal for ``N(0, I)`` data). With ``last_step="decoder"`` the last jump gets DDPM's
    decoder variance for both: the posterior variance of the jump ``tau_2 -> tau_1`` (DDPM's
    clipped log-variance; ``bbar_{tau_1}^2`` on a one-step trajectory). Use with ``eta = 1``.
    """
    if kind not in ("small", "large"):
        raise ValueError(f"kind must be 'small' or 'large', got {kind!r}")
    kept = resolve_steps(schedule, steps, spacing)
    coef = jump_coefficients(schedule, kept, 1.0)
    var = coef["posterior"] if kind == "small" else coef["forward"]
    decoder = coef["posterior"][1] if len(kept) > 1 else schedule.bbar.double()[kept[0]] ** 2
    return _finish(var, last_step, cap_second_last, decoder)


def jump_costs(
    moments: DiffusionMoments,
    schedule: NoiseSchedule,
    *,
    kind: str = "analytic",
    clip: bool = True,
    error: str = "mle",
) -> Tensor:
    """Expected KL per dimension (nats) of every jump ``t -> s`` (``1 <= s < t``; ``inf``
    elsewhere), shape ``(T + 1, T + 1)``, for the DDPM forward process on a trajectory (eta = 1,
    posterior variance ``lambda^2``) and the reverse variance ``v = lambda^2 + gamma^2 sbar_t^2``
    of ``kind``:

        J[s, t] = (1/2) [log(v / lambda^2) + (lambda^2 + gamma^2 e_t) / v - 1],

    where ``e_t = E||x_0 - x0_hat||^2 / d`` is the error of the model's mean.
    ``error="mle"`` (default) uses the measured error (the MLE form, ``(bbar_t^2/abar_t^2)
    E||eps - eps_theta||^2 / d``), so ``J`` is this model's expected KL even when its mean is
    imperfect; ``error="assumed"`` takes ``e_t = sbar_t^2`` of ``kind`` (the paper's perfect-mean
    assumption), which gives ``J = (1/2) log(1 + gamma^2 sbar_t^2 / lambda^2)``: with
    ``kind="analytic-gamma"`` the DP "on Gamma alone". Diagonal kinds enter through their mean
    over dimensions."""
    if error not in ("mle", "assumed"):
        raise ValueError(f"error must be 'mle' or 'assumed', got {error!r}")
    moments.check(schedule)
    moments.check_steps(range(1, schedule.T + 1))
    T = schedule.T
    abar, bbar = schedule.abar.double(), schedule.bbar.double()
    s = torch.arange(T + 1)[:, None]
    t = torch.arange(T + 1)[None, :]
    valid = (s >= 1) & (s < t)
    terms = _jump_terms(abar[s], abar[t], bbar[s], bbar[t].clamp_min(1e-300), 1.0)
    lam2 = terms["posterior"].where(valid, torch.ones((), dtype=torch.float64))
    gamma = terms["gamma"]  # entries off the valid (s < t) triangle are masked below
    zero = torch.zeros(1, dtype=torch.float64)
    sbar2 = moments.sbar2(kind, clip=clip)
    if sbar2.ndim > 1:
        sbar2 = sbar2.flatten(1).mean(1)
    sbar2 = torch.cat([zero, sbar2])[None, :]
    err = sbar2 if error == "assumed" else torch.cat([zero, moments.raw_sbar2("mle")])[None, :]
    v = lam2 + gamma**2 * sbar2
    cost = 0.5 * (torch.log(v / lam2) + (lam2 + gamma**2 * err) / v - 1)
    return cost.where(valid, torch.full((), math.inf, dtype=torch.float64))


def optimal_trajectory(
    moments: DiffusionMoments,
    schedule: NoiseSchedule,
    K: int,
    *,
    kind: str = "analytic",
    clip: bool = True,
    error: str = "mle",
) -> list[int]:
    """The K kept steps ``1 = tau_1 < ... < tau_K = T`` that minimise the sum of
    :func:`jump_costs` over consecutive jumps (Analytic-DPM's trajectory by dynamic
    programming): the best expected NLL bound with the variance of ``kind``, since the prior
    and decoder terms are fixed by ``tau_K = T`` and ``tau_1 = 1``. ``error="assumed"`` with
    ``kind="analytic-gamma"`` is the paper's DP on ``Gamma`` alone; the default
    ``error="mle"`` charges each jump the model's measured mean error, which keeps the DP from
    trusting a perfect-mean estimate where the model is far from perfect (large ``t``).
    Cost ``O(K T^2)``.
    """
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"K must be an int, got {type(K).__name__}")
    if not 2 <= K <= schedule.T:
        raise ValueError(f"K must be in 2..T={schedule.T} (a trajectory keeps 1 and T), got {K}")
    if not isinstance(moments, DiffusionMoments):
        raise TypeError(f"moments must be DiffusionMoments, got {type(moments).__name__}")
    T = schedule.T
    if K == T:
        moments.check(schedule)
        return list(range(1, T + 1))
    J = jump_costs(moments, schedule, kind=kind, clip=clip, error=error)
    cost = torch.full((T + 1,), math.inf, dtype=torch.float64)
    cost[1] = 0.0
    back = []
    for _ in range(K - 1):
        total = cost[:, None] + J  # (s, t)
        cost, arg = total.min(0)
        back.append(arg)
    path = [T]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    path.reverse()
    if path[0] != 1:  # unreachable with K <= T; kept as a guard against silent garbage
        raise RuntimeError(f"dynamic programming failed to reach t = 1: {path[:3]}")
    return path
