"""kexue's samplers as diffusers schedulers, and diffusers' schedules as kexue's.

``docs/guides/optimal-variance.md``, "In a diffusers pipeline". :class:`AnalyticDPMScheduler`
runs the jump of :func:`~kexue.diffusion.sample` (from kept step ``t`` down to ``s``)

    x_s = abar_s x0_hat + sqrt(bbar_s^2 - sigma^2) eps_theta + sqrt(v) z,
    x0_hat = (x_t - bbar_t eps_theta) / abar_t,

with ``v`` the optimal reverse variance ``sigma^2 + gamma^2 sbar_t^2`` of
:func:`~kexue.diffusion.optimal_variance`, computed once per :meth:`set_timesteps` from kexue's
:class:`~kexue.diffusion.DiffusionMoments`. It is a diffusers ``SchedulerMixin`` +
``ConfigMixin``: a drop-in for ``DDPMPipeline(unet, scheduler)`` or a hand-written loop over
``scheduler.timesteps`` (not for ``DDIMPipeline``, which converts any scheduler it is given to
a ``DDIMScheduler``; build this one with ``eta=0`` for Analytic-DDIM).

``docs/guides/few-step.md``, "DPM-Solver-v3 in a diffusers pipeline".
:class:`DPMSolverV3Scheduler` runs :func:`~kexue.diffusion.dpm_solver_v3.dpm_solver_v3_sample`
one model call at a time: the plan of
:func:`~kexue.diffusion.dpm_solver_v3.dpm_solver_v3_plan` (every coefficient, per pixel, from
kexue's :class:`~kexue.diffusion.solver_statistics.SolverStatistics`) is computed once per
:meth:`~DPMSolverV3Scheduler.set_timesteps`; each ``step`` applies the corrector of the previous
step with the new model output (no extra call, as diffusers' UniPC does) and then the predictor.

diffusers counts steps from 0: its timestep ``k`` is kexue's ``t = k + 1`` (its
``alphas_cumprod[k]`` is our ``abar_{k+1}^2``); :func:`noise_schedule_from_diffusers` converts a
diffusers scheduler (or its config) to a :class:`~kexue.diffusion.NoiseSchedule`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import torch
from torch import Tensor

from kexue.diffusion.dpm_solver_v3 import (
    MAX_ORDER,
    SPACINGS,
    V3Options,
    V3Plan,
    V3Update,
    dpm_solver_v3_plan,
)
from kexue.diffusion.moments import KINDS, DiffusionMoments
from kexue.diffusion.schedule import NoiseSchedule
from kexue.diffusion.solver_statistics import SolverStatistics
from kexue.diffusion.variance import LAST_STEP, SECOND_TO_LAST_CAP, optimal_variance
from kexue.extras import require
from kexue.validation import (
    check_bool,
    check_choice,
    check_generator,
    check_int,
    check_real,
    check_tensor,
    describe,
)

_diffusers = require("diffusers", "diffusion", "the diffusers schedulers")
if TYPE_CHECKING:  # diffusers' config is a dict with attribute access: untyped base classes
    ConfigMixin: TypeAlias = Any
    SchedulerMixin: TypeAlias = Any
    BaseOutput: TypeAlias = Any
else:
    ConfigMixin = _diffusers.ConfigMixin
    SchedulerMixin = _diffusers.SchedulerMixin
    BaseOutput = _diffusers.utils.BaseOutput
register_to_config = _diffusers.configuration_utils.register_to_config

__all__ = [
    "AnalyticDPMScheduler",
    "AnalyticDPMSchedulerOutput",
    "DPMSolverV3Scheduler",
    "DPMSolverV3SchedulerOutput",
    "noise_schedule_from_diffusers",
]

MOMENTS_FOLDER = "moments"  # beside scheduler_config.json: the moments, kexue's save format
STATISTICS_FOLDER = "statistics"  # the same for DPMSolverV3Scheduler's solver statistics


def noise_schedule_from_diffusers(scheduler_or_config: Any) -> NoiseSchedule:
    """The :class:`NoiseSchedule` of a diffusers scheduler (or of its config dict).

    The betas are the ones diffusers itself uses (its ``betas`` tensor, built by diffusers'
    ``DDPMScheduler`` from a config): our ``alpha_t = sqrt(1 - betas[t - 1])``, so our
    ``abar_t^2`` equals diffusers' ``alphas_cumprod[t - 1]``. Only eps-prediction schedules of
    a finite signal-to-noise ratio are kexue's (``ValueError`` otherwise).
    """
    if isinstance(scheduler_or_config, Mapping):
        config = dict(scheduler_or_config)
        if "num_train_timesteps" not in config:
            raise ValueError(
                "scheduler_or_config must be a diffusers scheduler config with "
                f"num_train_timesteps, got keys {sorted(config)[:8]}"
            )
        allowed = _diffusers.DDPMScheduler._get_init_keys(_diffusers.DDPMScheduler)
        known = {k: v for k, v in config.items() if k in allowed}
        betas = _diffusers.DDPMScheduler.from_config(known).betas
    elif hasattr(scheduler_or_config, "config") and isinstance(
        getattr(scheduler_or_config, "betas", None), Tensor
    ):
        config = dict(scheduler_or_config.config)
        betas = scheduler_or_config.betas
    else:
        raise TypeError(
            "scheduler_or_config must be a diffusers scheduler (with betas) or its config dict, "
            f"got {type(scheduler_or_config).__name__}"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"scheduler_or_config predicts {prediction!r}; kexue's samplers take eps-models "
            "(prediction_type='epsilon')"
        )
    betas = betas.detach().to("cpu", torch.float64)
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(
            "scheduler_or_config has betas outside (0, 1) (e.g. rescale_betas_zero_snr: abar_T = "
            "0): kexue's schedules need every step to keep some signal"
        )
    return NoiseSchedule.from_betas(betas)


@dataclass
class _KexueScheduler(SchedulerMixin, ConfigMixin):
    """What kexue's diffusers schedulers share: a kexue :class:`~kexue.diffusion.NoiseSchedule`
    from the config, diffusers' 0-based timesteps (``k = t - 1``), the identity model input, the
    forward process, and the kexue object each is built from (``_SAVED``: the attribute and the
    folder beside ``scheduler_config.json``; ``_BUILDER``: the constructor that attaches it)."""

    config_name = "scheduler_config.json"
    order = 1  # one model call per step
    _SAVED: ClassVar[str]
    _BUILDER: ClassVar[str]

    def _init_schedule(self, num_train_timesteps: int, schedule: dict[str, Any] | None) -> None:
        self.noise_schedule = (
            NoiseSchedule.from_config(schedule)
            if schedule is not None
            else NoiseSchedule.su_linear(check_int(num_train_timesteps, "num_train_timesteps"))
        )
        if self.noise_schedule.T != num_train_timesteps:
            raise ValueError(
                f"num_train_timesteps={num_train_timesteps} but the schedule has "
                f"T={self.noise_schedule.T}"
            )
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    @classmethod
    def _load_saved(cls, folder: Path) -> Any:
        raise NotImplementedError

    def _attach(self, saved: Any) -> None:
        raise NotImplementedError

    def _model_steps(self) -> list[int] | None:
        """kexue's steps of the model calls (``None`` before :meth:`set_timesteps`)."""
        raise NotImplementedError

    def save_pretrained(
        self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any
    ) -> None:
        """``scheduler_config.json`` (diffusers) and the kexue object it is built from, in its
        own safetensors folder beside it."""
        saved = getattr(self, self._SAVED)
        if saved is None:
            raise ValueError(
                f"this scheduler has no {self._SAVED} to save (build it with {self._BUILDER})"
            )
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        saved.save_pretrained(Path(save_directory) / self._SAVED)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load a folder written by :meth:`save_pretrained` (a local folder: the kexue object
        is read with kexue's checks)."""
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        if not (folder / cls._SAVED).is_dir():
            raise ValueError(f"{folder} holds no {cls._SAVED}/ folder: not a saved "
                             f"{cls.__name__}")  # fmt: skip
        saved = cls._load_saved(folder / cls._SAVED)
        scheduler = super().from_pretrained(folder, **kwargs)
        scheduler._attach(saved)
        return scheduler

    def scale_model_input(self, sample: Tensor, timestep: int | Tensor | None = None) -> Tensor:
        """The identity (the model takes ``x_t`` as it is)."""
        return sample

    def _index(self, timestep: int | Tensor) -> int:
        steps = self._model_steps()
        if steps is None:
            raise ValueError("call set_timesteps before step")
        k = int(timestep.flatten()[0]) if isinstance(timestep, Tensor) else int(timestep)
        try:
            return steps.index(k + 1)
        except ValueError:
            raise ValueError(
                f"timestep {k} is not one of this scheduler's timesteps "
                f"{self.timesteps.tolist()[:4]}...: loop over scheduler.timesteps"
            ) from None

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The forward process at diffusers' ``timesteps`` (0-based, long ``(N,)``):
        ``abar_{k+1} x_0 + bbar_{k+1} noise``."""
        timesteps = torch.as_tensor(timesteps)
        return self.noise_schedule.add_noise(original_samples, noise, timesteps.long() + 1)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)


class AnalyticDPMSchedulerOutput(BaseOutput):
    """``prev_sample``: ``x_s``, the next model input; ``pred_original_sample``: ``x0_hat``."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class AnalyticDPMScheduler(_KexueScheduler):
    """Analytic-DPM (the optimal reverse variance) as a diffusers scheduler.

    Build it with :meth:`from_moments` from the moments of the model it will run with; its
    config holds the schedule (kexue's config dict), ``eta`` and the variance options of
    :func:`~kexue.diffusion.optimal_variance`; ``save_pretrained(folder)`` writes
    ``scheduler_config.json`` plus the moments (``moments/``, safetensors, SHA-256 checked) and
    ``AnalyticDPMScheduler.from_pretrained(folder)`` reads both back.

    Noise is drawn at every step, even where the variance is 0 (the last jump), as
    :func:`~kexue.diffusion.sample` does with a per-step variance: the same generator then gives
    the same images as kexue's sampler.
    """

    ignore_for_config: ClassVar[list[str]] = ["moments"]
    _SAVED = MOMENTS_FOLDER
    _BUILDER = "from_moments"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: dict[str, Any] | None = None,
        eta: float = 1.0,
        kind: str = "analytic",
        clip: bool = True,
        last_step: str = "mean",
        cap_second_last: float | None = SECOND_TO_LAST_CAP,
        spacing: str = "even",
        image_shape: list[int] | None = None,
        moments: DiffusionMoments | None = None,
    ) -> None:
        self._init_schedule(num_train_timesteps, schedule)
        check_real(eta, "eta", low=0.0)
        check_choice(kind, "kind", KINDS)
        check_choice(last_step, "last_step", LAST_STEP)
        check_choice(spacing, "spacing", ("even", "quadratic"))
        self.moments: DiffusionMoments | None = None
        if moments is not None:
            self.attach_moments(moments)
        self.steps: list[int] = []  # kexue's kept steps (increasing), after set_timesteps
        self.variances: Tensor | None = None  # (K, ...) float64, entry i: jump from steps[i]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_moments(
        cls,
        moments: DiffusionMoments,
        schedule: NoiseSchedule | None = None,
        *,
        eta: float = 1.0,
        kind: str = "analytic",
        clip: bool = True,
        last_step: str = "mean",
        cap_second_last: float | None = SECOND_TO_LAST_CAP,
        spacing: str = "even",
    ) -> AnalyticDPMScheduler:
        """The scheduler of the model whose ``moments`` (:func:`~kexue.diffusion.
        estimate_moments`) are given; ``schedule`` defaults to the one they record and is
        checked against them. The other arguments are :func:`~kexue.diffusion.
        optimal_variance`'s (``eta = 1``: Analytic-DDPM, ``eta = 0``: Analytic-DDIM)."""
        if not isinstance(moments, DiffusionMoments):
            raise TypeError(f"moments must be DiffusionMoments, got {type(moments).__name__}")
        if schedule is None:
            if not moments.schedule_config:
                raise ValueError("these moments record no schedule: pass schedule=")
            schedule = NoiseSchedule.from_config(moments.schedule_config)
        moments.check(schedule)
        if not schedule.config:
            raise ValueError("schedule must carry its config (build it with NoiseSchedule's "
                             "constructors) so the scheduler can save it")  # fmt: skip
        return cls(
            num_train_timesteps=schedule.T, schedule=dict(schedule.config), eta=float(eta),
            kind=kind, clip=clip, last_step=last_step, cap_second_last=cap_second_last,
            spacing=spacing, image_shape=list(moments.image_shape),
            moments=moments,
        )  # fmt: skip

    def attach_moments(self, moments: DiffusionMoments) -> None:
        """Use ``moments`` (checked against the schedule and the configured image shape)."""
        if not isinstance(moments, DiffusionMoments):
            raise TypeError(f"moments must be DiffusionMoments, got {type(moments).__name__}")
        moments.check(self.noise_schedule, self.config.image_shape)
        self.moments = moments

    @classmethod
    def _load_saved(cls, folder: Path) -> DiffusionMoments:
        return DiffusionMoments.from_pretrained(folder)

    def _attach(self, saved: DiffusionMoments) -> None:
        self.attach_moments(saved)

    def _model_steps(self) -> list[int] | None:
        return None if self.variances is None else self.steps

    # ------------------------------------------------------------------ diffusers API
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Keep ``num_inference_steps`` steps (kexue's trajectory with ``spacing``;
        all steps when it equals ``num_train_timesteps``) or the given diffusers ``timesteps``
        (0-based, any order), and compute the optimal variance of every jump."""
        if self.moments is None:
            raise ValueError("this scheduler has no moments: build it with from_moments")
        schedule = self.noise_schedule
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None:
            kept = schedule.check_steps(sorted(int(k) + 1 for k in timesteps))
        else:
            K = check_int(num_inference_steps, "num_inference_steps", low=1, high=schedule.T)
            if K == schedule.T:
                kept = list(range(1, schedule.T + 1))
            elif K == 1:
                kept = [schedule.T]
            else:
                kept = schedule.trajectory(K, self.config.spacing)
        cfg = self.config
        self.variances = optimal_variance(
            self.moments, schedule, kept, kind=cfg.kind, eta=cfg.eta, clip=cfg.clip,
            last_step=cfg.last_step, cap_second_last=cfg.cap_second_last,
        )  # fmt: skip
        self.steps = kept
        self.num_inference_steps = len(kept)
        self.timesteps = torch.tensor(kept[::-1], dtype=torch.long, device=device) - 1

    def previous_timestep(self, timestep: int | Tensor) -> int:
        """The diffusers timestep the jump from ``timestep`` lands on (-1: clean data)."""
        i = self._index(timestep)
        return self.steps[i - 1] - 1 if i > 0 else -1

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        eta: float | None = None,
        use_clipped_model_output: bool | None = None,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> AnalyticDPMSchedulerOutput | tuple[Tensor]:
        """One jump of kexue's sampler from ``timestep`` (diffusers' 0-based) to the previous
        kept one, with the optimal variance (see the module docstring).

        ``model_output``: the model's eps (a learned-variance model's ``2C`` channels: the
        first ``C``); ``variance_noise``: the ``z`` of the jump, else drawn from ``generator``
        in ``sample``'s shape (float32 draws for half-precision samples). ``eta`` (as DDIM's
        ``step`` takes it) must be the scheduler's own; ``use_clipped_model_output`` is not
        supported. Coefficients are float64, the arithmetic at least float32; the result has
        ``sample``'s dtype.
        """
        sample = check_tensor(sample, "sample", floating=True)
        model_output = check_tensor(model_output, "model_output", floating=True)
        if model_output.shape[1] == 2 * sample.shape[1]:
            model_output = model_output[:, : sample.shape[1]]
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output must have sample's shape {tuple(sample.shape)}, got "
                f"{tuple(model_output.shape)}"
            )
        if eta is not None and not math.isclose(float(eta), float(self.config.eta)):
            raise ValueError(
                f"this scheduler's variances were computed for eta={self.config.eta:g}, not "
                f"eta={float(eta):g}: build it with from_moments(..., eta={float(eta):g})"
            )
        if use_clipped_model_output:
            raise ValueError("use_clipped_model_output is not supported by AnalyticDPMScheduler")
        check_generator(generator)
        i = self._index(timestep)
        assert self.variances is not None
        sch = self.noise_schedule
        t, s = self.steps[i], (self.steps[i - 1] if i > 0 else 0)
        abar_t, bbar_t = float(sch.abar[t]), float(sch.bbar[t])
        abar_s, bbar_s = float(sch.abar[s]), float(sch.bbar[s])
        sigma2 = self.config.eta**2 * (bbar_s / bbar_t) ** 2 * (1 - (abar_t / abar_s) ** 2)
        direction = math.sqrt(max(bbar_s**2 - sigma2, 0.0))
        work = torch.promote_types(sample.dtype, torch.float32)
        x, eps = sample.to(work), model_output.to(work)
        x0 = (x - bbar_t * eps) / abar_t
        mean = abar_s * x0 + direction * eps
        if variance_noise is None:
            variance_noise = _randn(sample.shape, generator, work, sample.device)
        else:
            variance_noise = check_tensor(variance_noise, "variance_noise", floating=True)
            if variance_noise.shape != sample.shape:
                raise ValueError(
                    f"variance_noise must have sample's shape {tuple(sample.shape)}, got "
                    f"{tuple(variance_noise.shape)}"
                )
        std = self.variances[i].to(device=sample.device, dtype=work).sqrt()
        prev = mean + std * variance_noise.to(device=sample.device, dtype=work)
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return AnalyticDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


@dataclass
class DPMSolverV3SchedulerOutput(BaseOutput):
    """``prev_sample``: the state at the next timestep (the next model input; after the last
    step, the images); ``pred_original_sample``: ``x0_hat = (x_t - bbar_t eps_theta) / abar_t``
    at this step."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class DPMSolverV3Scheduler(_KexueScheduler):
    """DPM-Solver-v3 (``docs/guides/few-step.md``, "DPM-Solver-v3") as a diffusers scheduler.

    Build it with :meth:`from_statistics` from the
    :class:`~kexue.diffusion.solver_statistics.SolverStatistics` of the model it will run with
    (:func:`~kexue.diffusion.estimate_solver_statistics`); its config holds the schedule
    (kexue's config dict), the image shape and the options of
    :func:`~kexue.diffusion.dpm_solver_v3.dpm_solver_v3_sample` (``solver_order`` is its
    ``order``); ``save_pretrained(folder)`` writes ``scheduler_config.json`` plus the statistics
    (``statistics/``, safetensors, SHA-256 checked) and ``from_pretrained(folder)`` reads both.

    A multistep solver: ``step`` keeps the rescaled model outputs of the last steps and the
    corrected state between calls, so the steps of one trajectory must come in the order of
    :attr:`timesteps` (the first timestep starts a new trajectory). It is deterministic (an ODE
    solver): ``generator`` is accepted, as pipelines pass it, and unused. Over a loop on
    ``scheduler.timesteps`` it gives :func:`~kexue.diffusion.dpm_solver_v3.dpm_solver_v3_sample`'s
    images from the same ``x_T`` (the same arithmetic, in float32 for half-precision samples).
    """

    ignore_for_config: ClassVar[list[str]] = ["statistics"]
    _SAVED = STATISTICS_FOLDER  # one model call per step: order 1 (the solver's: solver_order)
    _BUILDER = "from_statistics"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: dict[str, Any] | None = None,
        image_shape: list[int] | None = None,
        solver_order: int = 3,
        spacing: str = "trailing",
        pseudo_order: bool | None = None,
        corrector: bool = True,
        corrector_pseudo: bool = False,
        half_corrector: bool = False,
        lower_order_final: bool | None = None,
        statistics: SolverStatistics | None = None,
    ) -> None:
        self._init_schedule(num_train_timesteps, schedule)
        check_int(solver_order, "solver_order", low=1, high=MAX_ORDER)
        check_choice(spacing, "spacing", SPACINGS)
        for name, value in (("pseudo_order", pseudo_order),
                            ("lower_order_final", lower_order_final)):  # fmt: skip
            if value is not None:
                check_bool(value, name)
        check_bool(corrector, "corrector")
        check_bool(corrector_pseudo, "corrector_pseudo")
        check_bool(half_corrector, "half_corrector")
        self.statistics: SolverStatistics | None = None
        if statistics is not None:
            self.attach_statistics(statistics)
        self.plan: V3Plan | None = None  # after set_timesteps
        self._on: dict[tuple[torch.device, torch.dtype], _PlanOn] = {}
        self._fs: dict[int, Tensor] = {}  # rescaled model outputs f[j] of this trajectory
        self._x_base: Tensor | None = None  # the (corrected) state at the last step
        self._next = 0  # the index in timesteps the next step must have

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_statistics(
        cls,
        statistics: SolverStatistics,
        schedule: NoiseSchedule | Mapping[str, Any] | Any | None = None,
        *,
        solver_order: int = 3,
        spacing: str = "trailing",
        pseudo_order: bool | None = None,
        corrector: bool = True,
        corrector_pseudo: bool = False,
        half_corrector: bool = False,
        lower_order_final: bool | None = None,
    ) -> DPMSolverV3Scheduler:
        """The scheduler of the model whose ``statistics``
        (:func:`~kexue.diffusion.estimate_solver_statistics`) are given; ``schedule`` (a
        :class:`~kexue.diffusion.NoiseSchedule`, or the pipeline's diffusers scheduler or its
        config, converted by :func:`noise_schedule_from_diffusers`) defaults to the one they
        record and is checked against them. The options are
        :func:`~kexue.diffusion.dpm_solver_v3.dpm_solver_v3_sample`'s (``solver_order``: its
        ``order``)."""
        if not isinstance(statistics, SolverStatistics):
            raise TypeError(f"statistics must be a SolverStatistics, got {describe(statistics)}")
        if schedule is not None and not isinstance(schedule, NoiseSchedule):
            schedule = noise_schedule_from_diffusers(schedule)
        if schedule is None:
            if not statistics.schedule_config:
                raise ValueError("these statistics record no schedule: pass schedule=")
            schedule = NoiseSchedule.from_config(statistics.schedule_config)
        statistics.check(schedule)
        if not schedule.config:
            raise ValueError("schedule must carry its config (build it with NoiseSchedule's "
                             "constructors) so the scheduler can save it")  # fmt: skip
        return cls(
            num_train_timesteps=schedule.T, schedule=dict(schedule.config),
            image_shape=list(statistics.image_shape), solver_order=solver_order,
            spacing=spacing, pseudo_order=pseudo_order, corrector=corrector,
            corrector_pseudo=corrector_pseudo, half_corrector=half_corrector,
            lower_order_final=lower_order_final, statistics=statistics,
        )  # fmt: skip

    def attach_statistics(self, statistics: SolverStatistics) -> None:
        """Use ``statistics`` (checked against the schedule and the configured image shape)."""
        if not isinstance(statistics, SolverStatistics):
            raise TypeError(f"statistics must be a SolverStatistics, got {describe(statistics)}")
        statistics.check(self.noise_schedule, self.config.image_shape)
        self.statistics = statistics

    @classmethod
    def _load_saved(cls, folder: Path) -> SolverStatistics:
        return SolverStatistics.from_pretrained(folder)

    def _attach(self, saved: SolverStatistics) -> None:
        self.attach_statistics(saved)

    def _model_steps(self) -> list[int] | None:
        return None if self.plan is None else self.plan.steps

    # ------------------------------------------------------------------ diffusers API
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Plan ``num_inference_steps`` model calls on kexue's trajectory with the configured
        ``spacing`` (:func:`~kexue.diffusion.dpm_solver_v3.v3_trajectory`), or calls at the
        given diffusers ``timesteps`` (0-based, any order; denoised to clean data after the
        smallest), and compute every coefficient of the solver; starts a new trajectory."""
        if self.statistics is None:
            raise ValueError("this scheduler has no statistics: build it with from_statistics")
        schedule, cfg = self.noise_schedule, self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        steps: int | list[int]
        if timesteps is not None:
            if isinstance(timesteps, Tensor):
                timesteps = timesteps.tolist()
            steps = sorted({check_int(k, "timesteps entries", low=0, high=schedule.T - 1) + 1
                            for k in timesteps})  # fmt: skip
        else:
            high = schedule.T if cfg.spacing == "trailing" else schedule.T - 1
            steps = check_int(num_inference_steps, "num_inference_steps", low=1, high=high)
        options = V3Options(cfg.solver_order, cfg.spacing, cfg.pseudo_order, cfg.corrector,
                            cfg.corrector_pseudo, cfg.half_corrector,
                            cfg.lower_order_final)  # fmt: skip
        self.plan = dpm_solver_v3_plan(schedule, self.statistics, steps, options)
        self._on = {}
        self.num_inference_steps = len(self.plan.steps)
        self.timesteps = torch.tensor(self.plan.steps, dtype=torch.long, device=device) - 1
        self._restart()

    def _restart(self) -> None:
        self._fs, self._x_base, self._next = {}, None, 0

    def previous_timestep(self, timestep: int | Tensor) -> int:
        """The diffusers timestep the step from ``timestep`` lands on (-1: clean data)."""
        i = self._index(timestep)
        assert self.plan is not None
        steps = self.plan.steps
        return (steps[i + 1] if i + 1 < len(steps) else self.plan.final_step) - 1

    def _plan_on(self, device: torch.device, dtype: torch.dtype) -> _PlanOn:
        key = (device, dtype)
        if key not in self._on:
            assert self.plan is not None
            plan = self.plan
            self._on[key] = _PlanOn(
                f_x=[v.to(device=device, dtype=dtype) for v in plan.f_x],
                correctors=[None if u is None else u.to(device, dtype) for u in plan.correctors],
                predictors=[u.to(device, dtype) for u in plan.predictors],
            )
        return self._on[key]

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DPMSolverV3SchedulerOutput | tuple[Tensor]:
        """One model call's worth of DPM-Solver-v3 at ``timestep`` (diffusers' 0-based):
        ``f = f_eps eps_theta + f_x x`` from ``model_output``, the corrector of the previous
        step with it (when the plan has one), then the predictor to the next timestep
        (``docs/guides/few-step.md``, "DPM-Solver-v3").

        ``model_output``: the model's eps at ``sample`` (a learned-variance model's ``2C``
        channels: the first ``C``). Steps must follow :attr:`timesteps` in order; the first
        timestep starts a new trajectory. The coefficients are float64 maps applied in
        ``sample``'s dtype (float32 for half precision); the result has ``sample``'s dtype.
        """
        sample = check_tensor(sample, "sample", floating=True, min_ndim=2)
        model_output = check_tensor(model_output, "model_output", floating=True)
        if model_output.ndim == sample.ndim and model_output.shape[1] == 2 * sample.shape[1]:
            model_output = model_output[:, : sample.shape[1]]
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output must have sample's shape {tuple(sample.shape)}, got "
                f"{tuple(model_output.shape)}"
            )
        check_generator(generator)
        i = self._index(timestep)
        assert self.statistics is not None and self.plan is not None
        if tuple(sample.shape[1:]) != tuple(self.statistics.image_shape):
            raise ValueError(
                f"sample must hold images of shape {tuple(self.statistics.image_shape)} (the "
                f"statistics'), got {tuple(sample.shape)}"
            )
        if i == 0:
            self._restart()
        elif i != self._next:
            expected = int(self.timesteps[self._next]) if self._next < len(self.timesteps) else None
            raise ValueError(
                f"timestep {int(self.timesteps[i])} out of order: this multistep solver expects "
                f"timestep {expected} next (loop over scheduler.timesteps in order; the first "
                "one starts a new trajectory)"
            )
        elif self._x_base is not None and self._x_base.shape != sample.shape:
            raise ValueError(
                f"sample has shape {tuple(sample.shape)} but this trajectory's states have "
                f"{tuple(self._x_base.shape)}: start again from the first timestep"
            )
        plan = self.plan
        work = torch.promote_types(sample.dtype, torch.float32)
        on = self._plan_on(sample.device, work)
        x, eps = sample.to(work), model_output.to(device=sample.device, dtype=work)
        self._fs[i] = plan.f_eps[i] * eps + on.f_x[i] * x
        corrector = on.correctors[i]
        if corrector is not None:
            assert self._x_base is not None
            x = corrector.apply(self._x_base, self._fs)
        self._x_base = x
        prev = on.predictors[i].apply(x, self._fs)
        for j in [j for j in self._fs if j < i - MAX_ORDER]:
            del self._fs[j]
        self._next = i + 1
        t = plan.steps[i]
        abar_t, bbar_t = float(self.noise_schedule.abar[t]), float(self.noise_schedule.bbar[t])
        x0 = ((sample.to(work) - bbar_t * eps) / abar_t).to(sample.dtype)
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return DPMSolverV3SchedulerOutput(prev_sample=prev, pred_original_sample=x0)


@dataclass(frozen=True)
class _PlanOn:
    """A :class:`~kexue.diffusion.dpm_solver_v3.V3Plan`'s maps on one device and dtype."""

    f_x: list[Tensor]
    correctors: list[V3Update | None]
    predictors: list[V3Update]


def _randn(
    shape: torch.Size, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Draw as ``sample`` does: on the generator's device, then moved."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=where).to(device)
