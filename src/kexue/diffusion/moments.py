"""Monte Carlo moments of an eps-model over training data: what the optimal variances need.

``docs/guides/optimal-variance.md``, "The moments" and "Imperfect mean". For every step ``t``
and a set of training images ``x_0`` (one noise draw ``eps`` per image and step,
``x_t = abar_t x_0 + bbar_t eps``, ``x0_hat = (x_t - bbar_t eps_theta(x_t, t)) / abar_t``) we
keep the means over images of

- ``||eps_theta||^2 / d``                        -> ``Gamma_t`` (paper form of ``sbar_t^2``),
- ``||x_0 - m||^2 / d - ||x0_hat - m||^2 / d``   -> moment form (estimator 1, ``m`` = data mean),
- ``||eps - eps_theta||^2 / d``                  -> maximum likelihood with the learned mean,

each also per dimension, and the mean of their squares (their Monte Carlo standard errors).
These are estimated once, for all ``T`` steps, and reused for every ``K`` and trajectory.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import numpy as np
import torch
from torch import Tensor, nn

from kexue.diffusion.sampler import model_parameter
from kexue.diffusion.schedule import NoiseSchedule, check_schedule
from kexue.distributed import all_reduce_sum, keyed_generator, shard, shared_seed
from kexue.exceptions import CheckpointError
from kexue.pretrained import PretrainedMixin
from kexue.progress import progress_bar
from kexue.validation import (
    check_callable,
    check_generator,
    check_int,
    check_model_output,
    check_real,
    check_tensor,
)

# The scalar estimators of sbar_t^2 whose standard error is known from the stored squares.
FORMS = ("gamma", "moment", "mle")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes, dtypes and bytes), for provenance."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class DiffusionMoments(PretrainedMixin):
    """Per-step moments of an eps-model, row ``t - 1`` holding step ``t`` (``t = 1..T``).

    Save and load with ``save_pretrained(folder)`` / ``DiffusionMoments.from_pretrained(
    folder)`` (safetensors + ``config.json``; a corrupted file is refused).

    Scalars have shape ``(T,)``, per-dimension fields ``(T, C, H, W)``, float64. Rows of steps
    that were not estimated are NaN. ``*_sq`` fields are means of the squared per-image values
    (for standard errors). ``per_image`` optionally keeps ``{"gamma", "moment", "mle"}`` values
    of shape ``(T, N)`` for bootstrap resampling.
    """

    Gamma: Tensor  # mean ||eps_theta||^2 / d
    Gamma_sq: Tensor
    eps2: Tensor  # per dimension: mean eps_theta^2
    moment: Tensor  # mean (||x0 - m||^2 - ||x0_hat - m||^2) / d   (moment form of sbar^2)
    moment_sq: Tensor
    moment_diag: Tensor  # per dimension: mean (x0 - m)^2 - (x0_hat - m)^2
    err: Tensor  # mean ||eps - eps_theta||^2 / d
    err_sq: Tensor
    err_diag: Tensor  # per dimension: mean (eps - eps_theta)^2
    abar: Tensor  # (T + 1,) of the schedule the moments belong to
    data_var: float  # (1/d) mean ||x0 - m||^2 over the images used
    num_images: int
    image_shape: tuple[int, ...]
    data_range: tuple[float, float] = (-1.0, 1.0)
    schedule_config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    per_image: dict[str, Tensor] | None = None

    pretrained_kind: ClassVar[str] = "kexue.diffusion.DiffusionMoments"
    pretrained_version: ClassVar[int] = 1
    pretrained_extra: ClassVar[str] = "diffusion"

    @property
    def T(self) -> int:
        return len(self.Gamma)

    @property
    def estimated_steps(self) -> list[int]:
        """The steps ``t`` with estimates (all of ``1..T`` unless restricted)."""
        return (torch.nonzero(~torch.isnan(self.Gamma)).flatten() + 1).tolist()

    # ------------------------------------------------------------------ checks
    def check(self, schedule: NoiseSchedule, image_shape: Sequence[int] | None = None) -> None:
        """Raise ``ValueError`` unless these moments were estimated for ``schedule`` (the same
        ``abar``) and, when given, images of shape ``image_shape`` (``(C, H, W)`` or
        ``(N, C, H, W)``)."""
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if schedule.T != self.T or not torch.allclose(
            schedule.abar.double(), self.abar, rtol=1e-12, atol=0
        ):
            raise ValueError(
                f"these moments were estimated for schedule {self.schedule_config or 'custom'} "
                f"(T={self.T}), not for {schedule!r}: estimate them again for this schedule"
            )
        if image_shape is not None:
            shape = tuple(int(v) for v in image_shape)
            shape = shape[1:] if len(shape) == len(self.image_shape) + 1 else shape
            if shape != tuple(self.image_shape):
                raise ValueError(
                    f"these moments were estimated on images of shape {tuple(self.image_shape)}, "
                    f"not {shape}: estimate them again on data of that shape"
                )

    def check_steps(self, steps: Sequence[int]) -> None:
        missing = [t for t in steps if math.isnan(float(self.Gamma[t - 1]))]
        if missing:
            raise ValueError(
                f"these moments were estimated at {len(self.estimated_steps)} steps only and lack "
                f"t = {missing[:5]}{'...' if len(missing) > 5 else ''}; estimate them with "
                "steps=None (all of 1..T) or including these steps"
            )

    # ------------------------------------------------------------------ estimates of sbar^2
    def ratio(self) -> Tensor:
        """``bbar_t^2 / abar_t^2`` for ``t = 1..T`` (float64)."""
        abar = self.abar[1:]
        return (1 - abar**2) / abar**2

    def upper_bound(self) -> Tensor:
        """The upper bound on ``sbar_t^2``, ``min(bbar_t^2 / abar_t^2, ((b - a) / 2)^2)`` for
        data in ``[a, b]`` (shape ``(T,)``; ``docs/guides/optimal-variance.md``, "Bounds")."""
        a, b = self.data_range
        return torch.clamp(self.ratio(), max=((b - a) / 2) ** 2)

    def raw_sbar2(self, form: str) -> Tensor:
        """Unclipped scalar estimate of ``sbar_t^2``, shape ``(T,)``:
        ``"gamma"``: ``(bbar^2/abar^2)(1 - Gamma_t)``; ``"moment"``:
        ``(1/d)E||x0 - m||^2 - (1/d)E||x0_hat - m||^2``; ``"mle"``:
        ``(bbar^2/abar^2)(1/d)E||eps - eps_theta||^2``."""
        if form == "gamma":
            return self.ratio() * (1 - self.Gamma)
        if form == "moment":
            return self.moment.clone()
        if form == "mle":
            return self.ratio() * self.err
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")

    def standard_error(self, form: str) -> Tensor:
        """Monte Carlo standard error (over images) of :meth:`raw_sbar2` per step, ``(T,)``:
        ``factor_t * sd_i(v_i) / sqrt(N)`` from the stored means of ``v`` and ``v^2``."""
        mean, sq, factor = {
            "gamma": (self.Gamma, self.Gamma_sq, self.ratio()),
            "moment": (self.moment, self.moment_sq, torch.ones_like(self.Gamma)),
            "mle": (self.err, self.err_sq, self.ratio()),
        }.get(form, (None, None, None))
        if mean is None:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        n = self.num_images
        # sq and factor are tensors whenever mean is
        var = torch.clamp(cast(Tensor, sq) - mean**2, min=0) * n / max(n - 1, 1)
        return cast(Tensor, factor) * torch.sqrt(var / n)

    def bootstrap_standard_error(
        self, form: str, num_resamples: int = 200, generator: torch.Generator | None = None
    ) -> Tensor:
        """Standard error of :meth:`raw_sbar2` by resampling images with replacement (needs
        ``per_image``, i.e. ``estimate_moments(..., keep_per_image=True)``)."""
        if self.per_image is None:
            raise ValueError(
                "bootstrap needs per-image values: estimate_moments(keep_per_image=True)"
            )
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if not isinstance(num_resamples, int) or num_resamples < 2:
            raise ValueError(f"num_resamples must be an int >= 2, got {num_resamples!r}")
        values = self.per_image[form].double()  # (T, N)
        n = values.shape[1]
        factor = self.ratio() if form != "moment" else torch.ones(self.T, dtype=torch.float64)
        draws = []
        for _ in range(num_resamples):
            idx = torch.randint(0, n, (n,), generator=generator)
            mean = values[:, idx].mean(1)
            draws.append(factor * (1 - mean) if form == "gamma" else factor * mean)
        return torch.stack(draws).std(0)

    def moment_form_preferred(self) -> Tensor:
        """Boolean ``(T,)``: True where the moment form has the smaller standard error than the
        Gamma form. Both estimate the same ``sbar_t^2`` under a perfect mean; the Gamma form
        multiplies the noise of ``1 - Gamma_t`` by ``bbar_t^2 / abar_t^2``, which explodes at
        large ``t``, while the moment form stays below ``Var[x_0]`` there."""
        return self.standard_error("moment") < self.standard_error("gamma")

    def sbar2(self, kind: str = "analytic", clip: bool = True) -> Tensor:
        """Estimate of ``sbar_t^2`` (``Var[x_0 | x_t]`` per dimension) for every step: ``(T,)``
        for scalar kinds, ``(T, C, H, W)`` for the diagonal ones; see :func:`optimal_variance`
        (``kexue.diffusion.variance``) for the kinds. ``clip`` applies :meth:`upper_bound` and 0."""
        ratio = self.ratio()
        if kind == "analytic":
            use_moment = self.moment_form_preferred()
            out = torch.where(use_moment, self.raw_sbar2("moment"), self.raw_sbar2("gamma"))
        elif kind == "analytic-gamma":
            out = self.raw_sbar2("gamma")
        elif kind == "analytic-moment":
            out = self.raw_sbar2("moment")
        elif kind == "analytic-mle":
            out = self.raw_sbar2("mle")
        elif kind == "analytic-diag":
            view = (-1,) + (1,) * len(self.image_shape)
            gamma_form = ratio.view(view) * (1 - self.eps2)
            use_moment = self.moment_form_preferred().view(view)
            out = torch.where(use_moment, self.moment_diag, gamma_form)
        elif kind == "analytic-mle-diag":
            view = (-1,) + (1,) * len(self.image_shape)
            out = ratio.view(view) * self.err_diag
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if clip:
            bound = self.upper_bound().view((-1,) + (1,) * (out.ndim - 1))
            out = torch.minimum(torch.clamp(out, min=0.0), bound)
        return out

    # ------------------------------------------------------------------ persistence
    def pretrained_state(self) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
        tensors = {name: getattr(self, name) for name in _TENSORS}
        for key, value in (self.per_image or {}).items():
            tensors[f"per_image.{key}"] = value
        config = {
            "data_var": self.data_var,
            "num_images": self.num_images,
            "image_shape": list(self.image_shape),
            "data_range": list(self.data_range),
            "schedule": self.schedule_config,
            "info": self.info,
        }
        return config, {"moments": tensors}

    @classmethod
    def from_pretrained_state(
        cls, config: dict[str, Any], tensors: dict[str, dict[str, Tensor]], **kwargs: Any
    ) -> DiffusionMoments:
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        stored = tensors.get("moments", {})
        missing = [name for name in _TENSORS if name not in stored]
        if missing:
            raise CheckpointError(f"saved moments lack the tensors {missing}")
        per_image = {
            k.removeprefix("per_image."): v for k, v in stored.items() if k.startswith("per_image.")
        }
        return cls(
            **{name: stored[name] for name in _TENSORS},
            data_var=float(config["data_var"]),
            num_images=int(config["num_images"]),
            image_shape=tuple(config["image_shape"]),
            data_range=cast("tuple[float, float]", tuple(float(v) for v in config["data_range"])),
            schedule_config=config["schedule"],
            info=config.get("info", {}),
            per_image=per_image or None,
        )

    def __repr__(self) -> str:
        return (
            f"DiffusionMoments(T={self.T}, estimated steps={len(self.estimated_steps)}, "
            f"images={self.num_images}, image_shape={tuple(self.image_shape)})"
        )


_TENSORS = ("Gamma", "Gamma_sq", "eps2", "moment", "moment_sq", "moment_diag", "err", "err_sq",
            "err_diag", "abar")  # fmt: skip
KINDS = ("analytic", "analytic-gamma", "analytic-moment", "analytic-mle", "analytic-diag",
         "analytic-mle-diag")  # fmt: skip


def model_placement(
    eps_model: Callable, data_dtype: torch.dtype, device: torch.device | str | None
) -> tuple[torch.device | str | None, torch.dtype]:
    """Where and in which dtype to call ``eps_model``: a module's parameters decide; a plain
    callable gets the data's floating dtype (float64 test models stay float64)."""
    param = model_parameter(eps_model)
    if param is not None:
        return (param.device if device is None else device), param.dtype
    return device, data_dtype if data_dtype.is_floating_point else torch.float32


def check_images(data: object, name: str = "data", *, split: str = "train") -> Tensor:
    """Images ``(N, ...)`` as a tensor: a tensor, or an ``ImageData`` (its ``split``); at least
    one image, finite. ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    held = getattr(data, split, None)
    if isinstance(held, Tensor) and not isinstance(data, Tensor):  # an ImageData
        data = held
    data = check_tensor(data, name, min_ndim=2)
    if data.dtype == torch.bool or data.is_complex():
        raise TypeError(f"{name} must hold real pixel values, got dtype {data.dtype}")
    if len(data) < 1:
        raise ValueError(f"{name} must hold at least one image, got shape {tuple(data.shape)}")
    if data.is_floating_point() and not bool(torch.isfinite(data).all()):
        raise ValueError(f"{name} must be finite (it holds NaN or infinite values)")
    return data


def check_data_range(data_range: object) -> tuple[float, float]:
    """``(a, b)`` with ``a < b`` (infinite ends allowed: unbounded data)."""
    if not isinstance(data_range, tuple | list) or len(data_range) != 2:
        raise TypeError(f"data_range must be a pair (a, b), got {data_range!r}")
    lo = check_real(data_range[0], "data_range[0]", finite=False)
    hi = check_real(data_range[1], "data_range[1]", finite=False)
    if not hi > lo:
        raise ValueError(f"data_range must be (a, b) with a < b, got {tuple(data_range)!r}")
    return lo, hi


def check_in_range(x: Tensor, data_range: tuple[float, float], name: str = "data") -> None:
    """``ValueError`` naming ``name`` and ``data_range`` unless every value of ``x`` lies in
    ``data_range`` (to 1e-6): e.g. 0..255 pixels given with ``data_range=(-1, 1)``."""
    lo, hi = data_range
    low, high = float(x.min()), float(x.max())
    if low < lo - 1e-6 or high > hi + 1e-6:
        raise ValueError(
            f"{name} must lie in data_range={tuple(data_range)}, got values in [{low:g}, "
            f"{high:g}]: scale the images first (e.g. x / 127.5 - 1 for 0..255 pixels) or pass "
            "their real data_range"
        )


def pair_noise(seed: int, images: Tensor, steps: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Float64 ``N(0, I)`` noise of shape ``(len(images), *shape)``: row ``j`` drawn from
    :func:`~kexue.distributed.keyed_generator` ``(seed, images[j], steps[j])``, so the noise of
    an (image, step) pair does not depend on the batch or the process that draws it."""
    return torch.stack([
        torch.randn(shape, generator=keyed_generator(seed, int(i), int(t)), dtype=torch.float64)
        for i, t in zip(images.tolist(), steps.tolist(), strict=True)
    ])  # fmt: skip


def _steps_label(t: Tensor) -> str | int:
    lo, hi = int(t.min()), int(t.max())
    return lo if lo == hi else f"{lo}..{hi}"


@torch.no_grad()
def estimate_moments(
    eps_model: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    data: Any,
    *,
    num_images: int | None = 200,
    batch_size: int = 256,
    timesteps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    keep_per_image: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> DiffusionMoments:
    """Estimate the moments of ``eps_model`` over ``data`` at every step
    (``docs/guides/optimal-variance.md``, "The moments": ``Gamma_t = E||eps_theta(x_t, t)||^2
    / d``, the moment form and, "Imperfect mean", ``E||eps - eps_theta||^2 / d``, also per
    dimension).

    Args:
        eps_model: any callable ``eps_model(x_t, t) -> eps`` (``t``: long tensor ``(B,)``).
        schedule: the model's :class:`NoiseSchedule`.
        data: training images ``(N, C, H, W)`` in ``data_range`` (or an ``ImageData``: its
            ``train`` split); values outside ``data_range`` are an error.
        num_images: images used (a random subset drawn with ``generator``; None = all); each
            gets one noise draw per step. Tens to hundreds suffice at most steps; see
            :meth:`DiffusionMoments.standard_error`.
        batch_size: model inputs per call (pairs of image and step are packed together).
        timesteps: estimate only these steps, an increasing list in ``1..T`` (default: all of
            ``1..T``; the others are NaN).
        generator: draws one seed (on the main process, sent to the others); the subset and
            the noise of each (image, step) pair derive from it (:func:`pair_noise`).
        data_range: ``(a, b)``, the pixel range; gives the bound ``((b - a)/2)^2``. Use
            ``(-inf, inf)`` for unbounded data (no such bound).
        keep_per_image: also keep per-image values (``(T, N)`` each) for
            :meth:`~DiffusionMoments.bootstrap_standard_error`.
        progress: show a progress bar.
        device: where to run the model (default: its parameters' device).

    Many processes: under ``accelerate launch`` (any initialised ``torch.distributed`` group)
    the (image, step) pairs are split over the processes and the float64 sums reduced; every
    process returns the same moments as one process would, to float64 rounding.

    Raises:
        NonFiniteError: the model returned NaN or inf (the message names the steps).

    Cost: ``num_images * len(timesteps)`` model evaluations (forward only), shared by the
    processes.
    """
    check_callable(eps_model, "eps_model", "eps_model(x_t, t)")
    check_schedule(schedule, eps_model)
    images = check_images(data)
    if len(images) < 2:
        raise ValueError(
            f"data must hold at least 2 images (N, ...), got shape {tuple(images.shape)}"
        )
    if num_images is not None and check_int(num_images, "num_images") < 2:
        raise ValueError(f"num_images must be an int >= 2 or None, got {num_images!r}")
    batch_size = check_int(batch_size, "batch_size", low=1)
    lo, hi = check_data_range(data_range)
    check_in_range(images, (lo, hi))
    generator = check_generator(generator)
    if timesteps is None:
        kept = list(range(1, schedule.T + 1))
    else:
        kept = schedule.check_steps(_as_list(timesteps, "timesteps"))
    n_all = len(images)
    n = n_all if num_images is None else min(num_images, n_all)
    seed = shared_seed(generator)  # the same on every process, also for generator=None
    chooser = torch.Generator().manual_seed(seed)
    subset = torch.randperm(n_all, generator=chooser)[:n] if n < n_all else torch.arange(n)
    device, model_dtype = model_placement(eps_model, images.dtype, device)
    x0_all = images.double()
    m = x0_all.mean(0)  # the constant m of the moment form: the per-dimension data mean
    x0 = x0_all[subset]
    d = x0[0].numel()
    dev0 = ((x0 - m) ** 2).flatten(1).sum(1) / d  # (n,)
    T, shape = schedule.T, tuple(images.shape[1:])
    scalars = {k: torch.zeros(T, dtype=torch.float64) for k in
               ("Gamma", "Gamma_sq", "moment", "moment_sq", "err", "err_sq")}  # fmt: skip
    diag = {k: torch.zeros((T, *shape), dtype=torch.float64) for k in
            ("eps2", "moment_diag", "err_diag")}  # fmt: skip
    per_image = (
        {k: torch.zeros((T, n), dtype=torch.float64) for k in FORMS} if keep_per_image else None
    )
    # (image, step) pairs, split over processes; each pair's noise is keyed by the seed, the
    # image's index in the data and the step, so the split does not change the draws
    pairs_t = torch.tensor(kept, dtype=torch.long).repeat_interleave(n)
    pairs_i = torch.arange(n).repeat(len(kept))
    mine = shard(torch.arange(len(pairs_t)))
    pairs_t, pairs_i = pairs_t[mine], pairs_i[mine]
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"moments ({n} images x {len(kept)} steps)", total=len(pairs_t))
        for start in range(0, len(pairs_t), batch_size):
            t = pairs_t[start : start + batch_size]
            i = pairs_i[start : start + batch_size]
            eps = pair_noise(seed, subset[i], t, shape)
            x_t = schedule.add_noise(x0[i], eps, t)
            a, b = schedule.scales(t, x_t)
            out = eps_model(x_t.to(device=device, dtype=model_dtype), t.to(device))
            out = check_model_output(out, x_t, step=_steps_label(t))
            eps_theta = out.detach().to("cpu", torch.float64)
            x0_hat = (x_t - b * eps_theta) / a
            moment_d = (x0[i] - m) ** 2 - (x0_hat - m) ** 2
            err_d = (eps - eps_theta) ** 2
            g = eps_theta.pow(2).flatten(1).sum(1) / d
            mo = dev0[i] - (x0_hat - m).pow(2).flatten(1).sum(1) / d
            e = err_d.flatten(1).sum(1) / d
            rows = t - 1
            for key, v in (("Gamma", g), ("moment", mo), ("err", e)):
                scalars[key].index_add_(0, rows, v)
                scalars[f"{key}_sq"].index_add_(0, rows, v * v)
            diag["eps2"].index_add_(0, rows, eps_theta**2)
            diag["moment_diag"].index_add_(0, rows, moment_d)
            diag["err_diag"].index_add_(0, rows, err_d)
            if per_image is not None:
                per_image["gamma"][rows, i] = g
                per_image["moment"][rows, i] = mo
                per_image["mle"][rows, i] = e
            bar.advance(task, len(t))
    for group in (scalars, diag, per_image or {}):
        for key, value in group.items():
            group[key] = all_reduce_sum(value)  # float64 sums over processes
    estimated = torch.zeros(T, dtype=torch.bool)
    estimated[torch.tensor(kept) - 1] = True
    for group in (scalars, diag):
        for value in group.values():
            value /= n
            value[~estimated] = math.nan
    for value in (per_image or {}).values():
        value[~estimated] = math.nan
    info: dict[str, Any] = {"timesteps": "all" if timesteps is None else len(kept)}
    if isinstance(eps_model, nn.Module):
        info["model_sha256"] = model_fingerprint(eps_model)
    return DiffusionMoments(
        **scalars,
        **diag,
        abar=schedule.abar.double().clone(),
        data_var=float(dev0.mean()),
        num_images=n,
        image_shape=shape,
        data_range=(lo, hi),
        schedule_config=dict(schedule.config),
        info=info,
        per_image=per_image,
    )


def _as_list(values: object, name: str) -> list:
    if isinstance(values, Tensor | np.ndarray):
        return values.tolist()
    if isinstance(values, Sequence | range) and not isinstance(values, str | bytes):
        return list(values)
    raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
