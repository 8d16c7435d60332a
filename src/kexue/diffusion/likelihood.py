"""Negative ELBO in bits/dim on 8-bit data, for any trajectory and any reverse variance.

``docs/guides/optimal-variance.md``, "The NLL bound in bits/dim". For kept steps
``tau_1 < ... < tau_K`` and the eta-family forward posterior
``q(x_s | x_t, x_0) = N(abar_s x_0 + c eps, sigma^2 I)`` (``c = sqrt(bbar_s^2 - sigma^2)``,
``eps = (x_t - abar_t x_0)/bbar_t``; ``eta = 1``: DDPM's
forward process restricted to the trajectory), the bound on ``-log p(x_0)`` is

    KL(q(x_{tau_K} | x_0) || N(0, I))                                  prior
    + sum_{k >= 2} E_q KL(q(x_{tau_{k-1}} | x_{tau_k}, x_0) || p(x_{tau_{k-1}} | x_{tau_k}))
    + E_q[-log P(x_0 | x_{tau_1})]                                     decoder

with the reverse step ``p(x_s | x_t) = N(abar_s x0_hat + c eps_theta, v)`` (the sampler's mean,
``v`` the variance under test) and a discretised Gaussian decoder ``P`` that integrates
``N(x0_hat, v_0)`` over each of the 256 bins of a pixel (the outer bins reach to +-inf). Each
KL is estimated with one draw of ``x_t ~ q(x_t | x_0)`` per image and step; the prior exactly.
Divided by ``d log 2``: bits per dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from kexue.diffusion.moments import check_data_range, check_images, model_placement, pair_noise
from kexue.diffusion.sampler import check_step_variance, resolve_steps
from kexue.diffusion.schedule import NoiseSchedule, check_schedule
from kexue.diffusion.variance import fixed_variance, jump_coefficients
from kexue.distributed import all_reduce_sum, shard, shared_seed
from kexue.progress import progress_bar
from kexue.validation import (
    check_callable,
    check_generator,
    check_int,
    check_model_output,
    check_real,
)

VarianceSpec = str | Tensor | Callable[[Tensor, int, int, Tensor], Tensor | float]


@dataclass
class NLLResult:
    """Mean negative ELBO in bits/dim and its parts (all means over images, bits/dim).

    ``per_step[0]`` is the decoder term, ``per_step[i]`` the KL of the jump from
    ``steps[i]`` to ``steps[i-1]``; ``bpd = prior + per_step.sum()``.
    """

    bpd: float
    standard_error: float  # over images
    prior: float
    per_step: Tensor
    bpd_per_image: Tensor
    steps: list[int]

    def __float__(self) -> float:
        return self.bpd


def discretized_gaussian_log_likelihood(
    x: Tensor,
    mean: Tensor,
    var: Tensor | float,
    *,
    bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> Tensor:
    """Elementwise ``log P(x)`` of the bin of ``x`` under ``N(mean, var)``, float64.

    ``x`` lies on the grid ``a + k (b - a)/(bins - 1)``; the bin of ``x`` is
    ``x +- (b - a)/(2 (bins - 1))``, except that the lowest bin extends to ``-inf`` and the
    highest to ``+inf`` (so the probabilities of a pixel's bins sum to one). Computed as
    ``log(Phi(u) - Phi(l))`` through ``log_ndtr`` on the side of the bin away from the mean,
    so it stays finite far in the tails.
    """
    a, b = data_range
    half = (b - a) / (2 * (bins - 1))
    x, mean = x.double(), mean.double()
    std = torch.as_tensor(var, dtype=torch.float64).sqrt()
    upper = torch.where(x >= b - half / 2, math.inf, (x + half - mean) / std)
    lower = torch.where(x <= a + half / 2, -math.inf, (x - half - mean) / std)
    flip = lower > 0  # the whole bin above the mean: use the mirrored tail
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def _check_data(data: Tensor, bins: int, data_range: tuple[float, float]) -> Tensor:
    a, b = data_range
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"data_range must be finite for 8-bit data, got {data_range!r}")
    x = data.double()
    if x.min() < a - 1e-6 or x.max() > b + 1e-6:
        raise ValueError(f"data must be finite and lie in {data_range}")
    levels = (x - a) / (b - a) * (bins - 1)
    if (levels - levels.round()).abs().max() > 1e-3:
        raise ValueError(
            f"data must be {bins}-level (8-bit) images scaled to {data_range}: quantise first, "
            f"e.g. x = (round((x + 1) * 127.5) / 127.5) - 1"
        )
    return a + levels.round() * (b - a) / (bins - 1)


def _variance_table(
    spec: VarianceSpec, schedule: NoiseSchedule, kept: list[int], shape: tuple[int, ...]
) -> Tensor | Callable:
    if isinstance(spec, str):
        if spec not in ("small", "large"):
            raise ValueError(f"a variance name must be 'small' or 'large', got {spec!r}")
        return fixed_variance(schedule, kept, spec, last_step="decoder", cap_second_last=None)
    if isinstance(spec, Tensor):
        var = check_step_variance(spec, len(kept), tuple(shape)).double()
        if (var[0] <= 0).any():
            raise ValueError(
                "variance[0], the decoder's variance for the last jump, must be positive; build "
                "it with last_step='decoder' (optimal_variance / fixed_variance)"
            )
        return var
    if callable(spec):
        return spec
    raise TypeError("variance must be 'small', 'large', a per-step tensor or a callable")


def _variance_at(table, index: int, x_t: Tensor, t: int, s: int, eps_theta: Tensor) -> Tensor:
    """The variance of jump ``index`` as float64 on the CPU; a callable sees the model's input
    and output exactly as the sampler passes them."""
    if isinstance(table, Tensor):
        return table[index]
    value = torch.as_tensor(table(x_t, t, s, eps_theta)).detach().to("cpu", torch.float64)
    if not torch.isfinite(value).all() or (value < 0).any():
        raise ValueError(
            f"the variance callable returned a negative or non-finite variance at t={t}"
        )
    if s == 0 and (value <= 0).any():
        raise ValueError(f"the variance callable returned 0 for the decoder (t={t} -> 0)")
    return value


@torch.no_grad()
def nll_bpd(
    eps_model: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    data: Tensor,
    *,
    steps: int | Sequence[int] | None = None,
    variance: VarianceSpec | Mapping[str, VarianceSpec] = "large",
    eta: float = 1.0,
    spacing: str = "even",
    batch_size: int = 250,
    bins: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    generator: torch.Generator | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> NLLResult | dict[str, NLLResult]:
    """Negative ELBO of ``data`` in bits/dim (see the module docstring for the formula).

    Args:
        eps_model: any callable ``eps_model(x_t, t)``.
        schedule: the model's schedule.
        data: 8-bit images ``(N, C, H, W)`` scaled to ``data_range`` (an ``ImageData``: its
            held-out split).
        steps: None (all ``T``), an int K (``spacing``), or an increasing list in ``1..T``.
        variance: ``"small"``/``"large"`` (DDPM's, decoder variance as in
            :func:`~kexue.diffusion.variance.fixed_variance`), a per-step tensor ``(K, ...)``
            in the sampler's layout whose entry 0 is the decoder's variance
            (``optimal_variance(..., last_step="decoder", cap_second_last=None)``), a callable
            ``variance(x_t, t, s, eps_theta)``, or a dict ``name -> any of these``: all are
            then scored on the same draws of ``x_t`` (paired) and a dict of results returned.
        eta: the forward process's eta in ``(0, 1]`` (1 = DDPM). ``eta = 0`` (DDIM) has a
            deterministic posterior, for which the bound is infinite.
        spacing: ``"even"`` or ``"quadratic"`` when ``steps`` is an int.
        batch_size: images per model call.
        bins: pixel levels (>= 2; 256 for 8-bit data), spread evenly over ``data_range``.
        data_range: ``(a, b)``, the finite range the images are scaled to.
        generator: draws one seed (on the main process, sent to the others); the float64
            noise ``eps`` of image ``j`` at step ``t`` comes from
            :func:`~kexue.distributed.keyed_generator` ``(seed, j, t)``
            (:func:`~kexue.diffusion.moments.pair_noise`), whatever the batch or process.
        progress: show a progress bar.
        device: where to run the model (default: its parameters' device).

    Many processes: under ``accelerate launch`` (any initialised ``torch.distributed`` group)
    the images are split over the processes; every process returns the same result as one
    process would (the per-image terms are exact copies, their means agree to float64
    rounding).

    Returns:
        :class:`NLLResult` (or a dict of them). Cost: ``N * K`` model evaluations, shared by
        the processes.

    Raises:
        NonFiniteError: the model returned NaN or inf (the message names the step).
    """
    check_callable(eps_model, "eps_model", "eps_model(x_t, t)")
    check_schedule(schedule, eps_model)
    eta = check_real(eta, "eta")
    if not 0 < eta <= 1:
        raise ValueError(
            f"eta must be in (0, 1], got {eta!r} (eta = 0 makes q(x_s | x_t, x_0) a point mass "
            "and the bound infinite)"
        )
    batch_size = check_int(batch_size, "batch_size", low=1)
    bins = check_int(bins, "bins", low=2)
    data_range = check_data_range(data_range)
    generator = check_generator(generator)
    data = check_images(data, split="heldout")
    x0_all = _check_data(data, bins, data_range)
    shape = tuple(x0_all.shape[1:])
    kept = resolve_steps(schedule, steps, spacing)
    single = not isinstance(variance, Mapping)
    specs: dict[str, VarianceSpec] = (
        {"variance": cast("VarianceSpec", variance)}
        if single
        else dict(cast("Mapping[str, VarianceSpec]", variance))
    )
    if not specs:
        raise ValueError("variance must name at least one choice")
    tables = {name: _variance_table(v, schedule, kept, shape) for name, v in specs.items()}
    device, model_dtype = model_placement(eps_model, torch.float32, device)
    if not isinstance(eps_model, torch.nn.Module) and data.dtype == torch.float64:
        model_dtype = torch.float64
    coef = jump_coefficients(schedule, kept, float(eta))
    abar, bbar = schedule.abar.double(), schedule.bbar.double()
    K, n, d = len(kept), len(x0_all), x0_all[0].numel()
    per_step = {name: torch.zeros(K, n, dtype=torch.float64) for name in tables}
    a_top, b_top = abar[kept[-1]], bbar[kept[-1]]
    prior = 0.5 * (a_top**2 * x0_all**2 + b_top**2 - 1 - torch.log(b_top**2))
    prior = prior.flatten(1).sum(1)
    seed = shared_seed(generator)
    # whole batches split over processes: each model call sees the batch one process would give
    # it, so float32 outputs (which depend on the batch) and the result do not depend on N
    batches = [torch.arange(b, min(b + batch_size, n)) for b in shard(range(0, n, batch_size))]
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"NLL ({n} images, {K} steps)", total=sum(map(len, batches)) * K)
        for rows in batches:
            x0 = x0_all[rows]
            for i in range(K - 1, -1, -1):
                t = kept[i]
                s = kept[i - 1] if i > 0 else 0
                eps = pair_noise(seed, rows, torch.full_like(rows, t), shape)
                x_t = schedule.add_noise(x0, eps, t)
                t_batch = torch.full((len(x0),), t, dtype=torch.long, device=device)
                x_in = x_t.to(device=device, dtype=model_dtype)
                out = check_model_output(eps_model(x_in, t_batch), x_in, step=t)
                eps_theta = out.detach().to("cpu", torch.float64)
                x0_hat = (x_t - bbar[t] * eps_theta) / abar[t]
                if i > 0:
                    c = coef["direction"][i]
                    diff2 = (abar[s] * (x0 - x0_hat) + c * (eps - eps_theta)) ** 2
                    sig2 = coef["sigma2"][i]
                for name, table in tables.items():
                    v = _variance_at(table, i, x_in, t, s, out)
                    if i > 0:
                        if (v <= 0).any():
                            raise ValueError(
                                f"variance {name!r} is 0 at the jump {t} -> {s}: the bound "
                                "needs positive variances on every jump"
                            )
                        kl = 0.5 * (torch.log(v / sig2) + (sig2 + diff2) / v - 1)
                        term = kl.expand(x0.shape).flatten(1).sum(1)
                    else:
                        logp = discretized_gaussian_log_likelihood(
                            x0, x0_hat, v, bins=bins, data_range=data_range
                        )
                        term = -logp.expand(x0.shape).flatten(1).sum(1)
                    per_step[name][i, rows] = term
                bar.advance(task, len(x0))
    # each image was scored by one process: the float64 sum over processes assembles them
    per_step = {name: all_reduce_sum(terms) for name, terms in per_step.items()}
    scale = 1.0 / (d * math.log(2))
    results = {}
    for name, terms in per_step.items():
        per_image = (prior + terms.sum(0)) * scale
        results[name] = NLLResult(
            bpd=float(per_image.mean()),
            standard_error=float(per_image.std() / math.sqrt(n)) if n > 1 else math.nan,
            prior=float(prior.mean() * scale),
            per_step=terms.mean(1) * scale,
            bpd_per_image=per_image,
            steps=kept,
        )
    return results["variance"] if single else results
