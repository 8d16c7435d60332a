"""The sampling loop: DDPM, DDIM and everything between, on any trajectory, with any model.

For a jump from a kept step ``t`` down to the previous kept step ``s`` (``s = 0`` after the
smallest kept step), with ``x0_hat = (x_t - bbar_t eps_theta(x_t, t)) / abar_t``:

    x_s = abar_s x0_hat + sqrt(bbar_s^2 - sigma^2) eps_theta + std * z,   z ~ N(0, I)

(the DDIM posterior rewritten with ``eps_theta``; ``docs/guides/diffusion.md``, "Sampling: the
DDIM family"). ``eta`` fixes the mean through
``sigma = eta * (bbar_s / bbar_t) * sqrt(1 - abar_t^2 / abar_s^2)``; by default the added noise
has ``std = sigma``. ``eta = 1`` is DDPM (posterior variance), ``eta = 0`` the deterministic
DDIM generator. ``variance`` overrides only ``std**2``, the variance of the added noise, which
is how optimal reverse variances plug in without touching the loop.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from kexue.diffusion.schedule import NoiseSchedule, check_schedule
from kexue.progress import progress_bar
from kexue.validation import (
    check_callable,
    check_dtype,
    check_generator,
    check_model_output,
    check_real,
    check_shape,
    check_tensor,
)

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
    """``eta`` as a float: a finite number >= 0 (``TypeError`` for a non-number or a bool,
    ``ValueError`` for a negative or non-finite one)."""
    return check_real(eta, "eta", low=0.0)


def resolve_steps(
    schedule: NoiseSchedule, steps: int | Sequence[int] | None, spacing: str = "even"
) -> list[int]:
    """The kept steps (increasing) for ``steps`` = None (all of 1..T), an int K, or a list."""
    if steps is None:
        return list(range(1, schedule.T + 1))
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool | np.bool_):
        return schedule.trajectory(int(steps), spacing)
    if isinstance(steps, Sequence | Tensor | np.ndarray) and not isinstance(steps, str | bytes):
        values = steps.tolist() if isinstance(steps, Tensor | np.ndarray) else list(steps)
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


def check_step_variance(variance: object, count: int, shape: tuple[int, ...]) -> Tensor:
    """A per-step variance tensor in the sampler's layout: ``(count, ...)`` with one entry per
    kept step in dim 0, trailing dims broadcasting to one image of ``shape``, finite and
    non-negative; ``TypeError``/``ValueError`` naming ``variance`` otherwise."""
    variance = check_tensor(variance, "variance")
    if variance.dtype == torch.bool or variance.is_complex():
        raise TypeError(f"variance must be a real tensor, got dtype {variance.dtype}")
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


def check_variance_fn_value(value: object, t: int, like: Tensor) -> Tensor:
    """The value a variance callable returned at the jump from ``t``, as a tensor of ``like``'s
    dtype and device; ``ValueError`` if it is negative or not finite."""
    var = torch.as_tensor(value, dtype=like.dtype)
    if not torch.isfinite(var).all() or (var < 0).any():
        raise ValueError(
            f"the variance callable returned a negative or non-finite variance at t={t}"
        )
    return var.to(like.device)


def model_parameter(eps_model: object) -> Tensor | None:
    """The first floating-point parameter of ``eps_model`` when it is an ``nn.Module`` (what
    decides its device and dtype), else None."""
    if isinstance(eps_model, nn.Module):
        for p in eps_model.parameters():
            if p.is_floating_point():
                return p
    return None


def _placement(
    eps_model: object,
    x_T: Tensor | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> tuple[torch.dtype, torch.device | str | None]:
    """Sampling dtype and device: ``dtype=`` if given, else ``x_T``'s dtype, else the model's
    parameters', else float32; ``device=`` if given, else the model's, else ``x_T``'s. A
    module whose parameters have another dtype is a ``TypeError`` naming ``dtype``."""
    param = model_parameter(eps_model)
    if dtype is not None:
        dtype, source = check_dtype(dtype, "dtype"), f"dtype={dtype}"
    elif x_T is not None:
        dtype, source = x_T.dtype, f"x_T's dtype {x_T.dtype} (dtype=None keeps it)"
    else:
        dtype = param.dtype if param is not None else torch.float32
        source = ""
    if param is not None and param.dtype != dtype:
        raise TypeError(
            f"eps_model's parameters are {param.dtype} but sampling was asked in {dtype} "
            f"({source}); pass dtype={param.dtype} (and x_T in it) or convert the model with "
            f"eps_model.to({dtype})"
        )
    if device is None:
        device = param.device if param is not None else (x_T.device if x_T is not None else None)
    return dtype, device


def _check_variance_spec(variance: object, eta: float, kept: list[int]) -> None:
    """Refuse a variance built for another ``eta`` or trajectory (objects that record theirs,
    such as :meth:`~kexue.diffusion.VarianceHead.reverse_variance`)."""
    if isinstance(variance, Tensor) or variance is None or isinstance(variance, str):
        return
    built_eta = getattr(variance, "eta", None)
    if built_eta is not None and float(built_eta) != eta:
        raise ValueError(
            f"variance was built for eta={float(built_eta):g} but sample runs with eta={eta:g} "
            "(sample's default is eta=1, DDPM); pass the same eta to both"
        )
    built_steps = getattr(variance, "steps", None)
    if built_steps is not None and list(built_steps) != kept:
        raise ValueError(
            f"variance was built for the trajectory {list(built_steps)[:3]}...; sample runs "
            f"{kept[:3]}...: pass the same steps (and spacing) to both"
        )


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
    dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Generate ``shape = (N, C, H, W)`` images by running the reverse process
    (``docs/guides/diffusion.md``, "Sampling: the DDIM family").

    Args:
        eps_model: any callable ``eps_model(x_t, t) -> eps`` with ``t`` a long tensor of
            shape ``(N,)`` holding steps in ``1..T`` (use :func:`from_diffusers` for a
            diffusers ``UNet2DModel``).
        schedule: the :class:`NoiseSchedule` the model was trained with (a model loaded with
            ``from_pretrained`` carries it as ``model.schedule``; another one is an error).
        steps: None (all T steps), an int K (a trajectory of K steps with ``spacing``), or an
            explicit increasing list of kept steps in ``1..T``. After the smallest kept step
            the sampler jumps to clean data (t = 0).
        eta: member of the DDIM family (1 = DDPM, 0 = deterministic DDIM); sets the mean.
        variance: variance of the added noise, overriding ``sigma^2``: ``"small"``,
            ``"large"``, a tensor of shape ``(K, ...)`` (entry ``i`` for the jump from
            ``steps[i]`` to ``steps[i-1]``, or to 0 for ``i = 0``; trailing dims broadcast to
            one image), or a callable ``variance(x_t, t, s, eps_theta)``. A variance that
            records the ``eta`` or trajectory it was built for (``VarianceHead.
            reverse_variance``) must match this call's.
        x_T: the initial noise, a floating tensor of ``shape`` (default: drawn from
            ``generator``).
        generator: source of the initial and per-step noise (on the sampling device).
        clip_x0: clamp ``x0_hat`` to ``[-clip_x0, clip_x0]`` (and recompute ``eps``).
        progress: show a progress bar.
        return_trajectory: also return ``[x]`` after every jump (on the CPU).
        device: where to sample; default: the model's device (an ``nn.Module``), else
            ``x_T``'s, else the CPU.
        dtype: the dtype of every tensor of the loop; default: ``x_T``'s dtype when ``x_T`` is
            given, else the model's parameter dtype, else float32. A module whose parameters
            have another dtype is a ``TypeError``: convert one or the other.

    Returns:
        The images ``x_0`` (``dtype``), or ``(x_0, trajectory)``.

    Raises:
        NonFiniteError: the model returned NaN or inf (the message names the step).
    """
    check_callable(eps_model, "eps_model", "eps_model(x_t, t)")
    check_schedule(schedule, eps_model)
    shape = check_shape(shape, "shape", min_len=2)
    kept = resolve_steps(schedule, steps, spacing)
    fixed = variance if isinstance(variance, str) or variance is None else None
    plan = jumps(schedule, kept, eta, fixed)
    eta = check_eta(eta)
    if isinstance(variance, Tensor):
        per_step = check_step_variance(variance, len(kept), shape[1:])
    elif variance is not None and not isinstance(variance, str) and not callable(variance):
        raise TypeError("variance must be None, 'small', 'large', a tensor or a callable")
    _check_variance_spec(variance, eta, kept)
    if clip_x0 is not None:
        clip_x0 = check_real(clip_x0, "clip_x0", low=0.0, low_open=True)
    if x_T is not None:
        x_T = check_tensor(x_T, "x_T", floating=True)
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    generator = check_generator(generator)
    dtype, device = _placement(eps_model, x_T, dtype, device)
    if x_T is None:
        _check_generator_device(generator, device)
        x = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    else:
        x = x_T.to(dtype=dtype, device=device)
    _check_generator_device(generator, x.device)
    if isinstance(variance, Tensor):  # moved once, not at every step
        per_step = per_step.to(dtype=x.dtype, device=x.device)
    trajectory = [x.cpu()] if return_trajectory else []
    batch = shape[0]
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"sampling ({len(kept)} steps, eta={eta:g})", total=len(plan))
        for index, jump in enumerate(plan):
            t_batch = torch.full((batch,), jump.t, dtype=torch.long, device=x.device)
            eps = check_model_output(eps_model(x, t_batch), x, step=jump.t)
            x0 = (x - jump.bbar_t * eps) / jump.abar_t
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
                eps = (x - jump.abar_t * x0) / jump.bbar_t
            mean = jump.abar_s * x0 + jump.direction * eps
            if isinstance(variance, Tensor):
                var = per_step[len(plan) - 1 - index]
            elif callable(variance):
                var = check_variance_fn_value(variance(x, jump.t, jump.s, eps), jump.t, x)
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


def _check_generator_device(
    generator: torch.Generator | None, device: torch.device | str | None
) -> None:
    if generator is None or device is None:
        return
    if generator.device.type != torch.device(device).type:
        raise ValueError(
            f"generator is on {generator.device} but sampling runs on {torch.device(device)}: "
            "pass a generator of that device (torch.Generator(device).manual_seed(...))"
        )


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
