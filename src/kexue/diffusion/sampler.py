"""The sampling loop: DDPM, DDIM and everything between, on any trajectory, with any model.

For a jump from a kept step ``t`` down to the previous kept step ``s`` (``s = 0`` after the
smallest kept step), with ``x0_hat = (x_t - bbar_t eps_theta(x_t, t)) / abar_t``:

    x_s = abar_s x0_hat + sqrt(bbar_s^2 - sigma^2) eps_theta + std * z,   z ~ N(0, I)

(the DDIM posterior of the reference note, rewritten with ``eps_theta``). ``eta`` fixes the
mean through ``sigma = eta * (bbar_s / bbar_t) * sqrt(1 - abar_t^2 / abar_s^2)``; by default the
added noise has ``std = sigma``. ``eta = 1`` is DDPM (posterior variance), ``eta = 0`` the
deterministic DDIM generator. ``variance`` overrides only ``std**2``, the variance of the
added noise, which is how optimal reverse variances plug in without touching the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kexue.diffusion.schedule import NoiseSchedule
from kexue.progress import progress_bar

EpsModel = Callable[[Tensor, Tensor], Tensor]
# A variance callable gets (x_t, t, s, eps_theta) and returns a variance broadcastable to x_t.
VarianceFn = Callable[[Tensor, int, int, Tensor], Tensor | float]


@dataclass(frozen=True)
class Jump:
    """One step of the loop, from kept step ``t`` to ``s < t``, with its coefficients."""

    t: int
    s: int
    abar_t: float
    bbar_t: float
    abar_s: float
    bbar_s: float
    sigma2: float  # eta-family variance, sets the mean
    noise_var: float | None  # variance of the added noise when fixed per step

    @property
    def direction(self) -> float:
        return math.sqrt(max(self.bbar_s**2 - self.sigma2, 0.0))


def check_eta(eta: float) -> float:
    """``eta`` as a float; ``ValueError`` unless it is a finite number >= 0 (not a bool)."""
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not (0 <= eta < math.inf):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    return float(eta)


def resolve_steps(
    schedule: NoiseSchedule, steps: int | Sequence[int] | None, spacing: str = "even"
) -> list[int]:
    """The kept steps (increasing) for ``steps`` = None (all of 1..T), an int K, or a list."""
    if steps is None:
        return list(range(1, schedule.T + 1))
    if isinstance(steps, int) and not isinstance(steps, bool):
        return schedule.trajectory(steps, spacing)
    if isinstance(steps, Sequence | Tensor):
        values = steps.tolist() if isinstance(steps, Tensor) else list(steps)
        return schedule.check_steps(values)
    raise TypeError(f"steps must be None, an int K or a list of steps, got {type(steps).__name__}")


def jumps(
    schedule: NoiseSchedule,
    steps: Sequence[int],
    eta: float = 1.0,
    variance: str | None = None,
) -> list[Jump]:
    """Coefficients of every jump, in sampling order (from ``T`` down to 0), in float64.

    ``variance``: None (``sigma^2`` of ``eta``), ``"small"`` (DDPM's posterior variance
    ``(bbar_s/bbar_t)^2 (1 - abar_t^2/abar_s^2)``, i.e. eta = 1) or ``"large"`` (DDPM's
    ``1 - abar_t^2/abar_s^2``, the forward variance of the jump). The final jump to clean data
    adds no noise with the built-in choices.
    """
    eta = check_eta(eta)
    if variance not in (None, "small", "large"):
        raise ValueError(f"variance must be None, 'small' or 'large', got {variance!r}")
    abar, bbar = schedule.abar.tolist(), schedule.bbar.tolist()
    out = []
    kept = [0, *steps]
    for t, s in zip(reversed(kept[1:]), reversed(kept[:-1]), strict=True):
        forward_var = 1 - (abar[t] / abar[s]) ** 2  # variance of the jump s -> t
        posterior = (bbar[s] / bbar[t]) ** 2 * forward_var
        sigma2 = eta**2 * posterior
        if variance is None:
            noise_var = sigma2
        elif variance == "small":
            noise_var = posterior
        else:
            noise_var = forward_var if s > 0 else 0.0
        out.append(Jump(t, s, abar[t], bbar[t], abar[s], bbar[s], sigma2, noise_var))
    return out


def _check_variance_tensor(variance: Tensor, count: int, shape: tuple[int, ...]) -> Tensor:
    if variance.ndim == 0 or variance.shape[0] != count:
        raise ValueError(
            f"a per-step variance tensor needs one entry per kept step ({count}) in dim 0, "
            f"got shape {tuple(variance.shape)}"
        )
    try:
        torch.broadcast_shapes(variance.shape[1:], shape)
    except RuntimeError:
        raise ValueError(
            f"per-step variance entries of shape {tuple(variance.shape[1:])} must broadcast "
            f"to the image shape {shape}"
        ) from None
    if not torch.isfinite(variance).all() or (variance < 0).any():
        raise ValueError("variance must be finite and non-negative at every step")
    return variance


def _check_model_output(eps: Tensor, x: Tensor) -> Tensor:
    if not isinstance(eps, Tensor) or eps.shape != x.shape:
        got = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
        raise ValueError(
            f"eps_model must return a tensor of the input's shape {tuple(x.shape)}, got {got}"
        )
    return eps


@torch.no_grad()
def sample(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    steps: int | Sequence[int] | None = None,
    spacing: str = "even",
    eta: float = 1.0,
    variance: str | Tensor | VarianceFn | None = None,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    progress: bool = True,
    return_trajectory: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Generate ``shape = (N, C, H, W)`` images by running the reverse process.

    Args:
        eps_model: any callable ``eps_model(x_t, t) -> eps`` with ``t`` a long tensor of
            shape ``(N,)`` holding steps in ``1..T`` (use :func:`from_diffusers` for a
            diffusers ``UNet2DModel``).
        schedule: the :class:`NoiseSchedule` the model was trained with.
        steps: None (all T steps), an int K (a trajectory of K steps with ``spacing``), or an
            explicit increasing list of kept steps in ``1..T``. After the smallest kept step
            the sampler jumps to clean data (t = 0).
        eta: member of the DDIM family (1 = DDPM, 0 = deterministic DDIM); sets the mean.
        variance: variance of the added noise, overriding ``sigma^2``: ``"small"``,
            ``"large"``, a tensor of shape ``(K, ...)`` (entry ``i`` for the jump from
            ``steps[i]`` to ``steps[i-1]``, or to 0 for ``i = 0``; trailing dims broadcast to
            one image), or a callable ``variance(x_t, t, s, eps_theta)``.
        x_T: the initial noise (default: drawn from ``generator``).
        generator: source of the initial and per-step noise.
        clip_x0: clamp ``x0_hat`` to ``[-clip_x0, clip_x0]`` (and recompute ``eps``).
        progress: show a progress bar.
        return_trajectory: also return ``[x]`` after every jump (on the CPU).

    Returns:
        The images ``x_0``, or ``(x_0, trajectory)``.
    """
    if not callable(eps_model):
        raise TypeError("eps_model must be callable as eps_model(x_t, t)")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    shape = tuple(int(v) for v in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (N, ...) with positive sizes, got {shape}")
    kept = resolve_steps(schedule, steps, spacing)
    fixed = variance if isinstance(variance, str) or variance is None else None
    plan = jumps(schedule, kept, eta, fixed)
    if isinstance(variance, Tensor):
        per_step = _check_variance_tensor(variance, len(kept), shape[1:])
    elif variance is not None and not isinstance(variance, str) and not callable(variance):
        raise TypeError("variance must be None, 'small', 'large', a tensor or a callable")
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be a positive number, got {clip_x0!r}")

    if device is None and isinstance(eps_model, nn.Module):
        first = next(eps_model.parameters(), None)
        device = first.device if first is not None else None
    if x_T is None:
        x = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    else:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        x = x_T.to(dtype=dtype, device=device)
    if isinstance(variance, Tensor):  # moved once, not at every step
        per_step = per_step.to(dtype=x.dtype, device=x.device)
    trajectory = [x.cpu()] if return_trajectory else []
    batch = shape[0]
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"sampling ({len(kept)} steps, eta={eta:g})", total=len(plan))
        for index, jump in enumerate(plan):
            t_batch = torch.full((batch,), jump.t, dtype=torch.long, device=x.device)
            eps = _check_model_output(eps_model(x, t_batch), x)
            x0 = (x - jump.bbar_t * eps) / jump.abar_t
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
                eps = (x - jump.abar_t * x0) / jump.bbar_t
            mean = jump.abar_s * x0 + jump.direction * eps
            if isinstance(variance, Tensor):
                var = per_step[len(plan) - 1 - index]
            elif callable(variance):
                var = torch.as_tensor(variance(x, jump.t, jump.s, eps), dtype=x.dtype)
                if not torch.isfinite(var).all() or (var < 0).any():
                    raise ValueError(
                        f"the variance callable returned a negative or non-finite variance "
                        f"at t={jump.t}"
                    )
                var = var.to(x.device)
            else:
                var = jump.noise_var
            if isinstance(var, Tensor) or var > 0:
                noise = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
                std = var.sqrt() if isinstance(var, Tensor) else math.sqrt(var)
                x = mean + std * noise
            else:
                x = mean
            if return_trajectory:
                trajectory.append(x.cpu())
            bar.advance(task)
    return (x, trajectory) if return_trajectory else x


class DiffusersEpsModel(nn.Module):
    """A diffusers ``UNet2DModel`` as a kexue ``eps_model``: our step ``t`` is its ``t - 1``.

    Models trained with a learned variance output ``2C`` channels; the first ``C`` are eps.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.unet(x, t - 1)
        out = out.sample if hasattr(out, "sample") else out
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out


def from_diffusers(unet: nn.Module) -> DiffusersEpsModel:
    """Adapt a diffusers ``UNet2DModel`` (0-based timesteps) to ``eps_model(x_t, t)``."""
    if not isinstance(unet, nn.Module):
        raise TypeError(
            f"unet must be a torch.nn.Module (a diffusers UNet2DModel), got {type(unet).__name__}"
        )
    return DiffusersEpsModel(unet)
