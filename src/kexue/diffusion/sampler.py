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

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from kexue.diffusion.schedule import SAMPLING_SPACING, NoiseSchedule, check_schedule
from kexue.progress import progress_bar
from kexue.validation import (
    check_callable,
    check_dtype,
    check_generator,
    check_int,
    check_model_output,
    check_real,
    check_shape,
    check_tensor,
    describe,
)

SOLVERS = ("ddim", "dpm-solver-v3")
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


HALF_DTYPES = (torch.float16, torch.bfloat16)


def sampling_dtypes(
    eps_model: object, x_T: Tensor | None, dtype: torch.dtype | None
) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """``(state, model input, returned)`` dtypes of a sampling loop.

    Returned: ``dtype=`` if given, else ``x_T``'s dtype, else the model's parameters', else
    float32. The state (and every schedule coefficient applied to it) is never half
    precision: float16/bfloat16 run the loop in float32 and cast only the model's input. The
    model input is a module's parameter dtype (a plain callable gets the returned dtype). A
    module in float32 or float64 must match the returned dtype (``TypeError`` naming
    ``dtype``); a half-precision module may be sampled in any floating dtype.
    """
    param = model_parameter(eps_model)
    if dtype is not None:
        out, source = check_dtype(dtype, "dtype"), f"dtype={dtype}"
    elif x_T is not None:
        out, source = x_T.dtype, f"x_T's dtype {x_T.dtype} (dtype=None keeps it)"
    else:
        out = param.dtype if param is not None else torch.float32
        source = ""
    if param is not None and param.dtype != out and param.dtype not in HALF_DTYPES:
        raise TypeError(
            f"eps_model's parameters are {param.dtype} but sampling was asked in {out} "
            f"({source}); pass dtype={param.dtype} (and x_T in it) or convert the model with "
            f"eps_model.to({out})"
        )
    state = torch.float32 if out in HALF_DTYPES else out
    return state, (param.dtype if param is not None else out), out


def sampling_device(
    eps_model: object, x_T: Tensor | None, device: torch.device | str | None
) -> torch.device:
    """``device=`` if given, else the model's (an ``nn.Module``), else ``x_T``'s, else CPU."""
    if device is not None:
        return torch.device(device)
    param = model_parameter(eps_model)
    if param is not None:
        return param.device
    return x_T.device if x_T is not None else torch.device("cpu")


def initial_noise(
    shape: tuple[int, ...],
    x_T: Tensor | None,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """``x_T`` moved to ``device``/``dtype``, or a standard normal draw from ``generator``
    (which must live on ``device``'s type: ``ValueError`` naming ``generator`` otherwise)."""
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but sampling runs on {device}: pass a "
            "generator of that device (torch.Generator(device).manual_seed(...))"
        )
    if x_T is None:
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    return x_T.to(dtype=dtype, device=device)


def call_model(eps_model: EpsModel, x: Tensor, t: int, model_dtype: torch.dtype) -> Tensor:
    """``eps_model(x, t)`` for the whole batch at step ``t``, the input cast to
    ``model_dtype`` and the output checked (shape, finite) and returned in ``x``'s dtype."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    xm = x.to(model_dtype)
    return check_model_output(eps_model(xm, t_batch), xm, step=t).to(x.dtype)


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
    solver: Any = "ddim",
    statistics: Any = None,
    spacing: str | None = None,
    eta: float | None = None,
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
    (``docs/guides/diffusion.md``, "Sampling: the DDIM family"; ``docs/guides/few-step.md``
    for the solvers and spacings).

    Args:
        eps_model: any callable ``eps_model(x_t, t) -> eps`` with ``t`` a long tensor of
            shape ``(N,)`` holding steps in ``1..T`` (use :func:`from_diffusers` for a
            diffusers ``UNet2DModel``).
        schedule: the :class:`NoiseSchedule` the model was trained with (a model loaded with
            ``from_pretrained`` carries it as ``model.schedule``; another one is an error).
        steps: None (all T steps), an int K (K model calls on a trajectory with ``spacing``),
            or an explicit increasing list of kept steps in ``1..T``. After the smallest kept
            step the sampler jumps to clean data (t = 0).
        solver: ``"ddim"`` (default): the DDIM family below (``eta``, ``variance``);
            ``"dpm-solver-v3"``: the deterministic multistep ODE solver built on the model's
            empirical statistics (:func:`~kexue.diffusion.dpm_solver_v3.dpm_solver_v3_sample`,
            trailing steps; ``steps=None`` means 10 calls); or a diffusers scheduler
            instance (``DDIMScheduler``, ``DPMSolverMultistepScheduler``,
            ``UniPCMultistepScheduler``, ...), run on this
            loop with its noise schedule replaced by ``schedule``'s
            (``trained_betas = schedule.to_diffusers_betas()``, its other settings kept) and
            the model called at diffusers' timestep + 1; ``steps`` is then its
            ``num_inference_steps``.
        statistics: for ``"dpm-solver-v3"``: the model's
            :class:`~kexue.diffusion.solver_statistics.SolverStatistics`; None looks for
            statistics shipped for this very model (the shipped ``"mnist5k"``).
        spacing: how an int K is spread (``"trailing"``, ``"even"`` or ``"quadratic"``, see
            :meth:`NoiseSchedule.trajectory`). Default: ``"trailing"``, which measured best at
            K <= 20 on the shipped model; but ``"even"`` when ``variance`` is a per-step tensor
            or a callable, because ``optimal_variance``, ``fixed_variance`` and
            ``VarianceHead.reverse_variance`` build theirs on even trajectories by default and
            a tensor does not record its trajectory.
        eta: member of the DDIM family (default 1 = DDPM, 0 = deterministic DDIM); sets the
            mean. Only for ``solver="ddim"``.
        variance: variance of the added noise, overriding ``sigma^2``: ``"small"``,
            ``"large"``, a tensor of shape ``(K, ...)`` (entry ``i`` for the jump from
            ``steps[i]`` to ``steps[i-1]``, or to 0 for ``i = 0``; trailing dims broadcast to
            one image), or a callable ``variance(x_t, t, s, eps_theta)``. A variance that
            records the ``eta`` or trajectory it was built for (``VarianceHead.
            reverse_variance``) must match this call's. Only for ``solver="ddim"``.
        x_T: the initial noise, a floating tensor of ``shape`` (default: drawn from
            ``generator``).
        generator: source of the initial and per-step noise (on the sampling device).
        clip_x0: clamp ``x0_hat`` to ``[-clip_x0, clip_x0]`` (and recompute ``eps``); only for
            ``solver="ddim"`` (a diffusers scheduler has its own ``clip_sample``).
        progress: show a progress bar.
        return_trajectory: also return ``[x]`` after every jump (on the CPU); not for
            ``"dpm-solver-v3"``.
        device: where to sample; default: the model's device (an ``nn.Module``), else
            ``x_T``'s, else the CPU.
        dtype: the dtype of the returned images; default: ``x_T``'s dtype when ``x_T`` is
            given, else the model's parameter dtype, else float32. The loop runs in it, except
            that float16/bfloat16 run the loop (every schedule coefficient) in float32 and
            cast only the model's input. A float32/float64 module whose parameters have
            another dtype is a ``TypeError``: convert one or the other.

    Returns:
        The images ``x_0`` (``dtype``), or ``(x_0, trajectory)``.

    Raises:
        NonFiniteError: the model returned NaN or inf (the message names the step).
    """
    check_callable(eps_model, "eps_model", "eps_model(x_t, t)")
    check_schedule(schedule, eps_model)
    shape = check_shape(shape, "shape", min_len=2)
    kind = check_solver(solver)
    if kind != "ddim":
        given = {"eta": eta, "variance": variance, "clip_x0": clip_x0, "spacing": spacing}
        if kind == "dpm-solver-v3":
            given["return_trajectory"] = return_trajectory or None
        extra = sorted(k for k, v in given.items() if v is not None)
        if extra:
            raise ValueError(
                f"{', '.join(extra)} only apply to solver='ddim', not to solver={kind!r}"
            )
    if kind != "dpm-solver-v3" and statistics is not None:
        raise ValueError("statistics only apply to solver='dpm-solver-v3'")
    if x_T is not None:
        x_T = check_tensor(x_T, "x_T", floating=True)
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    generator = check_generator(generator)
    if kind == "dpm-solver-v3":
        from kexue.diffusion.dpm_solver_v3 import dpm_solver_v3_sample
        from kexue.diffusion.solver_statistics import default_statistics

        if statistics is None:
            statistics = default_statistics(eps_model, schedule)
        return dpm_solver_v3_sample(
            eps_model, schedule, statistics, shape if x_T is None else x_T,
            steps=10 if steps is None else steps, generator=generator, progress=progress,
            device=device, dtype=dtype,
        )  # fmt: skip
    state, model_dtype, out_dtype = sampling_dtypes(eps_model, x_T, dtype)
    x = initial_noise(shape, x_T, generator, sampling_device(eps_model, x_T, device), state)
    if kind == "diffusers":
        x, trajectory = diffusers_loop(
            eps_model, schedule, solver, x, steps, generator, model_dtype, progress,
            return_trajectory,
        )  # fmt: skip
        x = x.to(out_dtype)
        return (x, trajectory) if return_trajectory else x
    if spacing is None:
        stepwise = isinstance(variance, Tensor) or callable(variance)
        spacing = "even" if stepwise else SAMPLING_SPACING
    kept = resolve_steps(schedule, steps, spacing)
    eta = 1.0 if eta is None else eta
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
    if isinstance(variance, Tensor):  # moved once, not at every step
        per_step = per_step.to(dtype=x.dtype, device=x.device)
    trajectory = [x.cpu()] if return_trajectory else []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"sampling ({len(kept)} steps, eta={eta:g})", total=len(plan))
        for index, jump in enumerate(plan):
            eps = call_model(eps_model, x, jump.t, model_dtype)
            x0 = (x - jump.bbar_t * eps) / jump.abar_t
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
                eps = (x - jump.abar_t * x0) / jump.bbar_t
            mean = jump.abar_s * x0 + jump.direction * eps
            var: Tensor | float
            if isinstance(variance, Tensor):
                var = per_step[len(plan) - 1 - index]
            elif callable(variance):
                var = check_variance_fn_value(variance(x, jump.t, jump.s, eps), jump.t, x)
            else:
                var = cast(float, jump.noise_var)  # jumps() sets it for None/'small'/'large'
            if isinstance(var, Tensor) or var > 0:
                noise = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
                std = var.sqrt() if isinstance(var, Tensor) else math.sqrt(var)
                x = mean + std * noise
            else:
                x = mean
            if return_trajectory:
                trajectory.append(x.cpu())
            bar.advance(task)
    x = x.to(out_dtype)
    if return_trajectory and out_dtype != state:
        trajectory[-1] = x.cpu()
    return (x, trajectory) if return_trajectory else x


def check_solver(solver: object) -> str:
    """``"ddim"``, ``"dpm-solver-v3"`` or ``"diffusers"`` (a diffusers scheduler instance:
    an object with ``set_timesteps``, ``step`` and ``config``); ``TypeError``/``ValueError``
    naming ``solver`` otherwise."""
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(
                f"solver must be one of {SOLVERS} or a diffusers scheduler instance, got {solver!r}"
            )
        return solver
    if isinstance(solver, type):
        raise TypeError(
            f"solver must be a diffusers scheduler instance, got the class {solver.__name__}: "
            f"pass {solver.__name__}() (kexue replaces its noise schedule)"
        )
    if all(hasattr(solver, a) for a in ("set_timesteps", "step", "config")):
        return "diffusers"
    raise TypeError(
        f"solver must be one of {SOLVERS} or a diffusers scheduler instance, got {describe(solver)}"
    )


def diffusers_scheduler(scheduler: Any, schedule: NoiseSchedule) -> Any:
    """A new scheduler of ``scheduler``'s class and settings whose noise schedule is
    ``schedule``'s: ``num_train_timesteps = T`` and ``trained_betas`` = the DDPM paper's betas
    ``1 - alpha_t^2`` (``docs/guides/diffusion.md``, "Timesteps")."""
    cls = type(scheduler)
    if "trained_betas" not in inspect.signature(cls.__init__).parameters:
        raise ValueError(
            f"solver {cls.__name__} takes no trained_betas: kexue cannot give it the model's "
            "noise schedule"
        )
    betas = schedule.to_diffusers_betas().tolist()
    return cls.from_config(dict(scheduler.config), num_train_timesteps=schedule.T,
                           trained_betas=betas)  # fmt: skip


def diffusers_loop(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    scheduler: Any,
    x: Tensor,
    steps: int | Sequence[int] | None,
    generator: torch.Generator | None,
    model_dtype: torch.dtype,
    progress: bool = False,
    return_trajectory: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """Run a diffusers scheduler on kexue's loop from ``x`` (``x_T``): diffusers' timestep
    ``k`` is our step ``k + 1`` (``docs/guides/diffusion.md``, "Timesteps"). ``steps``: None
    (``T``), an int (``num_inference_steps``) or increasing kept steps in ``1..T`` (for
    schedulers whose ``set_timesteps`` takes ``timesteps``). Returns ``(x_0, trajectory)``."""
    sched = diffusers_scheduler(scheduler, schedule)
    if steps is None or (isinstance(steps, numbers.Integral) and not isinstance(steps, bool)):
        K = schedule.T if steps is None else check_int(steps, "steps", low=1, high=schedule.T)
        sched.set_timesteps(K, device=x.device)
    else:
        kept = resolve_steps(schedule, steps)
        if "timesteps" not in inspect.signature(sched.set_timesteps).parameters:
            raise ValueError(
                f"{type(sched).__name__}.set_timesteps takes no explicit timesteps: pass "
                "steps as an int"
            )
        sched.set_timesteps(timesteps=[t - 1 for t in reversed(kept)], device=x.device)
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    x = x * sched.init_noise_sigma
    trajectory = [x.cpu()] if return_trajectory else []
    with progress_bar(disable=not progress) as bar:
        timesteps = [int(k) for k in sched.timesteps]
        task = bar.add_task(f"sampling ({type(sched).__name__}, {len(timesteps)} steps)",
                            total=len(timesteps))  # fmt: skip
        for k in sched.timesteps:
            eps = call_model(eps_model, sched.scale_model_input(x, k), int(k) + 1, model_dtype)
            kwargs = {"generator": generator} if takes_generator else {}
            x = sched.step(eps, k, x, **kwargs).prev_sample
            if return_trajectory:
                trajectory.append(x.cpu())
            bar.advance(task)
    return x, trajectory


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
