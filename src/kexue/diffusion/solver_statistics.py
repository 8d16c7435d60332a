"""Empirical model statistics of an eps-model: the three per-pixel curves DPM-Solver-v3 needs.

``docs/guides/few-step.md``, "Empirical model statistics". In half log-SNR
``lambda_t = log(abar_t / bbar_t)`` the probability-flow ODE reads
``dx/dlambda = bbar^2 x - bbar eps_theta``. DPM-Solver-v3 integrates it exactly except for the
rescaled model output

    f(x, t) = (bbar_t eps_theta(x, t) - l_t * x) / abar_t

and chooses, per pixel and per step (``*`` is elementwise),

- ``l_t = bbar_t E[diag(d eps_theta / dx)]``, which makes ``f`` depend as little as possible on
  ``x`` (it minimises ``E||d f/dx||_F^2``);
- ``s_t, b_t``, the least-squares fit ``f' ~ s_t * f + b_t`` of the derivative of ``f`` along
  the ODE trajectory (``s = Cov(f', f) / Var f``, ``b = E f' - s E f``), which makes the
  first-order discretisation error of the solver as small as possible.

The expectations run over noisy training images ``x_t = abar_t x_0 + bbar_t eps`` on a grid of
steps and are interpolated linearly in ``lambda`` to every step. The estimation is a loop over
(image, grid step) pairs whose noise comes from :func:`pair_generator` ``(seed, image, step)``,
and everything it accumulates is a sum (:class:`SolverSums`), so splitting the pairs across
processes and adding the sums gives the same statistics.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from kexue.diffusion.schedule import NoiseSchedule
from kexue.distributed import (
    all_reduce_sum,
    is_distributed,
    rank,
    shard,
    shared_seed,
    world_size,
)
from kexue.exceptions import CheckpointError
from kexue.pretrained import PretrainedMixin, read_config, shipped_names
from kexue.progress import progress_bar
from kexue.validation import (
    check_callable,
    check_choice,
    check_generator,
    check_int,
    check_model_output,
    check_real,
    check_tensor,
    describe,
)

__all__ = [
    "METHODS",
    "SolverStatistics",
    "SolverSums",
    "accumulate_solver_sums",
    "check_same_schedule",
    "default_statistics",
    "estimate_solver_statistics",
    "log_snr",
    "model_fingerprint",
    "pair_generator",
    "statistics_grid",
]

METHODS = ("jvp", "finite-difference")
# Per-pixel quantities summed over pairs (docs/guides/few-step.md, "Estimating the statistics"):
# the l-estimate and its square, q = -x0_hat, u = x / abar, w = dq/dlambda along the ODE, and
# products. f = q - (l - 1) u keeps the large u (at high noise) behind a small factor.
FIELDS = ("l", "l2", "q", "u", "w", "qq", "uu", "qu", "qw", "uw", "ww")
ASSETS = Path(__file__).parent / "assets" / "solver_statistics"
_FD_STEP = 1e-3  # relative step of the finite-difference Jacobian-vector product
_SAVED = ("steps", "l", "s", "b", "abar")


def log_snr(schedule: NoiseSchedule) -> Tensor:
    """Half log-SNR ``lambda_t = log(abar_t / bbar_t)`` for ``t = 0..T`` (float64; ``+inf`` at
    ``t = 0``), decreasing in ``t`` (``docs/guides/few-step.md``, "Time and lambda")."""
    abar, bbar = schedule.abar.double(), schedule.bbar.double()
    lam = torch.log(abar) - torch.log(bbar)
    lam[0] = math.inf
    return lam


def check_same_schedule(schedule: object, abar: Tensor, what: str, name: str = "schedule"):
    """``schedule`` as a :class:`NoiseSchedule` whose ``abar`` equals ``abar`` (to 1e-12);
    ``TypeError``/``ValueError`` naming ``name`` and ``what`` (the object built for ``abar``)."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"{name} must be a NoiseSchedule, got {describe(schedule)}")
    same = schedule.T == len(abar) - 1 and torch.allclose(
        schedule.abar.double(), abar.double(), rtol=1e-12, atol=0
    )
    if not same:
        raise ValueError(
            f"{what} belongs to a schedule with T={len(abar) - 1} and abar_T="
            f"{float(abar[-1]):.4g}, not to {name} {schedule!r} (abar_T="
            f"{float(schedule.abar[-1]):.4g}): use the schedule it was built for"
        )
    return schedule


def check_model_schedule(eps_model: object, schedule: NoiseSchedule) -> None:
    """``ValueError`` when ``eps_model`` carries the schedule it was trained with
    (``eps_model.schedule``) and ``schedule`` is another one."""
    trained = getattr(eps_model, "schedule", None)
    if isinstance(trained, NoiseSchedule):
        check_same_schedule(schedule, trained.abar, "eps_model (model.schedule)")


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def pair_generator(seed: int, image_index: int, step: int) -> torch.Generator:
    """The CPU generator of one (image, step) pair, seeded with a SplitMix64 hash of
    ``(seed, image_index, step)``: a pair draws the same noise whichever process, batch or
    order computes it."""
    key = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ image_index) ^ step)
    return torch.Generator().manual_seed(key)


def statistics_grid(schedule: NoiseSchedule, grid: int | Sequence[int]) -> list[int]:
    """Increasing grid steps in ``1..T``: an int ``G`` gives ``G`` steps evenly spaced in
    ``lambda`` from ``lambda_T`` to ``lambda_1`` (rounded to the nearest step, duplicates
    dropped, so possibly fewer); a sequence is an explicit list of steps."""
    T = schedule.T
    if isinstance(grid, numbers.Integral) and not isinstance(grid, bool | np.bool_):
        G = check_int(grid, "grid", low=2)
        lam = log_snr(schedule)[1:]  # step t at index t - 1
        targets = torch.linspace(float(lam[-1]), float(lam[0]), G, dtype=torch.float64)
        nearest = (lam[None, :] - targets[:, None]).abs().argmin(1) + 1
        return sorted(set(nearest.tolist()) | {1, T})
    if isinstance(grid, Tensor | np.ndarray):
        grid = grid.tolist()
    if not isinstance(grid, Sequence) or isinstance(grid, str | bytes):
        raise TypeError(f"grid must be an int or a sequence of steps, got {describe(grid)}")
    steps = [check_int(v, "grid entries", low=1, high=T) for v in grid]
    if not steps or any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"grid must be a non-empty increasing list of steps in 1..T={T}")
    return steps


def _slope(lam: Tensor, values: Tensor) -> Tensor:
    """d values / d lambda at each node of an increasing ``lam`` grid (second-order central
    differences on an uneven grid, one-sided at the ends; 0 for a single node)."""
    G = len(lam)
    out = torch.zeros_like(values)
    if G < 2:
        return out
    view = (-1,) + (1,) * (values.ndim - 1)
    h = (lam[1:] - lam[:-1]).view(view)
    d = (values[1:] - values[:-1]) / h  # slope of each interval
    out[0], out[-1] = d[0], d[-1]
    if G > 2:
        hl, hr = h[:-1], h[1:]
        out[1:-1] = (hr * d[:-1] + hl * d[1:]) / (hl + hr)
    return out


def interpolate_lambda(lam_nodes: Tensor, values: Tensor, lam: Tensor) -> Tensor:
    """Piecewise-linear interpolation in ``lambda`` of ``values`` (rows at the increasing
    ``lam_nodes``) at ``lam``, constant beyond the ends: shape ``(len(lam), *values[0].shape)``."""
    G = len(lam_nodes)
    if G == 1:
        return values[:1].expand(len(lam), *values.shape[1:]).clone()
    lam = lam.clamp(float(lam_nodes[0]), float(lam_nodes[-1]))
    idx = torch.searchsorted(lam_nodes, lam).clamp(1, G - 1)
    lo, hi = lam_nodes[idx - 1], lam_nodes[idx]
    w = ((lam - lo) / (hi - lo)).view((-1,) + (1,) * (values.ndim - 1))
    return values[idx - 1] * (1 - w) + values[idx] * w


@dataclass
class SolverSums:
    """Sums over (image, step) pairs of the per-pixel quantities in :data:`FIELDS`, one row per
    grid step: what :func:`accumulate_solver_sums` returns and :meth:`statistics` turns into
    :class:`SolverStatistics`. Sums of disjoint sets of pairs add up (:meth:`merge`)."""

    steps: list[int]
    sums: Tensor  # (G, len(FIELDS), *image_shape) float64
    counts: Tensor  # (G,) float64: pairs per grid step

    @classmethod
    def zeros(cls, steps: Sequence[int], image_shape: Sequence[int]) -> SolverSums:
        G, shape = len(steps), tuple(image_shape)
        sums = torch.zeros((G, len(FIELDS), *shape), dtype=torch.float64)
        return cls(list(steps), sums, torch.zeros(G, dtype=torch.float64))

    def merge(self, other: SolverSums) -> SolverSums:
        """The sums of both sets of pairs (same grid and image shape)."""
        if list(other.steps) != list(self.steps) or other.sums.shape != self.sums.shape:
            raise ValueError("can only merge sums over the same grid and image shape")
        return SolverSums(self.steps, self.sums + other.sums, self.counts + other.counts)

    def _moments(self, schedule: NoiseSchedule) -> dict[str, Tensor]:
        """Per grid step and pixel: ``l``, ``E f``, ``E f'``, ``Var f``, ``Var f'`` and
        ``Cov(f', f)`` with ``f = q - (l - 1) u`` and ``f' = w + (l - 1) q + (l - 1 - l') u``
        (``l'``: slope of ``l`` in ``lambda`` on the grid)."""
        if bool((self.counts < 1).any()):
            missing = [t for t, c in zip(self.steps, self.counts.tolist(), strict=True) if c < 1]
            raise ValueError(f"no pairs were accumulated at grid steps {missing[:5]}")
        view = (-1,) + (1,) * (self.sums.ndim - 1)
        m = dict(zip(FIELDS, (self.sums / self.counts.view(view)).unbind(1), strict=True))
        lam_steps = log_snr(schedule)[torch.tensor(self.steps)]
        order = torch.argsort(lam_steps)  # increasing lambda = decreasing step
        l = m["l"]  # noqa: E741
        l_dot = torch.empty_like(l)
        l_dot[order] = _slope(lam_steps[order], l[order])
        # f = q - d u and f' = w + d q + g u with d = l - 1, g = l - 1 - l'
        d, g = l - 1, l - 1 - l_dot
        q, u, w = m["q"], m["u"], m["w"]
        e_f = q - d * u
        e_ff = m["qq"] - 2 * d * m["qu"] + d**2 * m["uu"]
        e_fd = w + d * q + g * u
        e_ffd = (m["qw"] + d * m["qq"] + g * m["qu"] - d * m["uw"] - d**2 * m["qu"]
                 - d * g * m["uu"])  # fmt: skip
        e_fdfd = (m["ww"] + d**2 * m["qq"] + g**2 * m["uu"] + 2 * d * m["qw"] + 2 * g * m["uw"]
                  + 2 * d * g * m["qu"])  # fmt: skip
        return {
            "l": l,
            "l_sq": m["l2"],
            "e_f": e_f,
            "e_fd": e_fd,
            "var": torch.clamp(e_ff - e_f**2, min=0.0),
            "var_d": torch.clamp(e_fdfd - e_fd**2, min=0.0),
            "cov": e_ffd - e_f * e_fd,
        }

    def standard_errors(self, schedule: NoiseSchedule) -> dict[str, Tensor]:
        """Monte Carlo standard errors of ``l`` and ``s`` per grid step and pixel (over the
        pairs): ``sd(l estimate) / sqrt(n)`` and the regression's
        ``sd(f' - s f - b) / (sd(f) sqrt(n))``."""
        m = self._moments(schedule)
        view = (-1,) + (1,) * (self.sums.ndim - 2)
        n = self.counts.view(view)
        var_l = torch.clamp(m["l_sq"] - m["l"] ** 2, min=0.0) * n / torch.clamp(n - 1, min=1)
        var = torch.clamp(m["var"], min=torch.finfo(torch.float64).tiny)
        resid = torch.clamp(m["var_d"] - m["cov"] ** 2 / var, min=0.0)
        return {"l": (var_l / n).sqrt(), "s": (resid / (var * torch.clamp(n - 2, min=1))).sqrt()}

    def statistics(
        self,
        schedule: NoiseSchedule,
        *,
        ridge: float = 1e-3,
        max_standard_error: float | None = None,
        num_images: int | None = None,
        info: dict[str, Any] | None = None,
    ) -> SolverStatistics:
        """``l, s, b`` on the grid from the sums (``docs/guides/few-step.md``, "Estimating the
        statistics"); ``ridge`` regularises ``s = Cov(f', f) / (Var f + ridge * mean Var f)``
        where a pixel barely varies (an always-black border: ``Var f ~ 0``).
        ``max_standard_error``: at grid steps where the median (over pixels) Monte Carlo
        standard error of ``s`` exceeds it, ``s = b = 0`` (DPM-Solver++'s parameterisation
        there, with the estimated ``l``): too few pairs to resolve them, typically at high
        noise (``"Noise in the statistics"``)."""
        ridge = check_real(ridge, "ridge", low=0.0)
        m = self._moments(schedule)
        view = (-1,) + (1,) * (self.sums.ndim - 2)
        floor = ridge * m["var"].flatten(1).mean(1).view(view)
        var, cov = m["var"], m["cov"]
        s = torch.where(var + floor > 0, cov / (var + floor), torch.zeros_like(cov))
        b = m["e_fd"] - s * m["e_f"]
        l = m["l"]  # noqa: E741
        if max_standard_error is not None:
            limit = check_real(max_standard_error, "max_standard_error", low=0.0, low_open=True)
            se = self.standard_errors(schedule)["s"].flatten(1).median(1).values
            resolved = (se <= limit).to(s.dtype).view(view)
            s, b = s * resolved, b * resolved
            info = dict(info or {}) | {
                "max_standard_error": limit,
                "s_b_zeroed_at": [
                    t for t, r in zip(self.steps, (se > limit).tolist(), strict=True) if r
                ],
            }
        n = int(self.counts.min()) if num_images is None else num_images
        return SolverStatistics(
            steps=torch.tensor(self.steps, dtype=torch.long),
            l=l.contiguous(),
            s=s.contiguous(),
            b=b.contiguous(),
            abar=schedule.abar.double().clone(),
            image_shape=tuple(self.sums.shape[2:]),
            num_images=n,
            schedule_config=dict(schedule.config),
            info=dict(info or {}) | {"ridge": ridge},
        )


@dataclass(frozen=True, eq=False)
class SolverStatistics(PretrainedMixin):
    """The empirical model statistics ``l, s, b`` of an eps-model on a grid of steps
    (``docs/guides/few-step.md``, "Empirical model statistics").

    ``steps``: increasing grid steps ``(G,)``; ``l, s, b``: float64 ``(G, *image_shape)``, row
    ``g`` at ``steps[g]``; between grid steps (and at every step ``1..T``) they are linear in
    ``lambda``, constant beyond the grid's ends (:meth:`at`). Save and load with
    ``save_pretrained(folder)`` / ``SolverStatistics.from_pretrained(folder)``. The object
    records the schedule it belongs to (``abar``) and refuses another one (:meth:`check`).
    """

    steps: Tensor
    l: Tensor  # noqa: E741 -- the paper's name
    s: Tensor
    b: Tensor
    abar: Tensor  # (T + 1,) of the schedule the statistics belong to
    image_shape: tuple[int, ...]
    num_images: int = 0
    schedule_config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    pretrained_kind: ClassVar[str] = "kexue.diffusion.SolverStatistics"
    pretrained_version: ClassVar[int] = 1
    pretrained_extra: ClassVar[str] = "diffusion"
    pretrained_assets: ClassVar[Path | None] = ASSETS

    def __post_init__(self) -> None:
        steps = check_tensor(self.steps, "steps", ndim=1)
        if steps.dtype.is_floating_point or steps.dtype == torch.bool or not len(steps):
            raise TypeError(f"steps must be a non-empty integer tensor, got {describe(steps)}")
        T = len(self.abar) - 1
        if int(steps.min()) < 1 or int(steps.max()) > T or bool((steps[1:] <= steps[:-1]).any()):
            raise ValueError(f"steps must be strictly increasing steps in 1..T={T}")
        shape = (len(steps), *tuple(self.image_shape))
        for name in ("l", "s", "b"):
            value = check_tensor(getattr(self, name), name, floating=True)
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"{name} must have shape {shape} (one row per grid step), got "
                    f"{tuple(value.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} must be finite")

    # ------------------------------------------------------------------ special cases
    @classmethod
    def constant(
        cls,
        schedule: NoiseSchedule,
        image_shape: Sequence[int],
        *,
        l: float,  # noqa: E741
        s: float,
        b: float = 0.0,
        name: str = "constant",
    ) -> SolverStatistics:
        """Statistics equal to the numbers ``l, s, b`` at every step and pixel (no model)."""
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {describe(schedule)}")
        shape = tuple(check_int(v, "image_shape entries", low=1) for v in image_shape)
        steps = torch.tensor(sorted({1, schedule.T}), dtype=torch.long)
        values = {
            key: torch.full((len(steps), *shape), check_real(v, key), dtype=torch.float64)
            for key, v in (("l", l), ("s", s), ("b", b))
        }
        return cls(steps=steps, l=values["l"], s=values["s"], b=values["b"],
                   abar=schedule.abar.double().clone(), image_shape=shape,
                   schedule_config=dict(schedule.config), info={"kind": name})  # fmt: skip

    @classmethod
    def data_prediction(
        cls, schedule: NoiseSchedule, image_shape: Sequence[int]
    ) -> SolverStatistics:
        """``l = 1, s = b = 0``: then ``f = -x0_hat`` and DPM-Solver-v3 is DPM-Solver++
        (multistep, data prediction); its first-order step is DDIM."""
        return cls.constant(schedule, image_shape, l=1.0, s=0.0, name="data-prediction")

    @classmethod
    def noise_prediction(
        cls, schedule: NoiseSchedule, image_shape: Sequence[int]
    ) -> SolverStatistics:
        """``l = 0, s = -1, b = 0``: then ``g`` is ``eps_theta`` (up to a constant) and
        DPM-Solver-v3 is the noise-prediction DPM-Solver; its first-order step is DDIM."""
        return cls.constant(schedule, image_shape, l=0.0, s=-1.0, name="noise-prediction")

    # ------------------------------------------------------------------ queries
    @property
    def T(self) -> int:
        return len(self.abar) - 1

    @property
    def lambdas(self) -> Tensor:
        """``lambda`` at the grid steps, ``(G,)`` float64 (decreasing)."""
        abar = self.abar.double()[self.steps]
        return torch.log(abar) - 0.5 * torch.log1p(-(abar**2))

    def curves(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(lambda_nodes, l, s, b)`` with ``lambda_nodes`` increasing and rows in that order:
        the piecewise-linear functions of ``lambda`` the solver integrates."""
        lam = self.lambdas
        order = torch.argsort(lam)
        return lam[order], self.l[order].double(), self.s[order].double(), self.b[order].double()

    def at(self, steps: Sequence[int] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(l, s, b)`` at the given steps in ``1..T``, each ``(len(steps), *image_shape)``
        float64, interpolated linearly in ``lambda`` (constant beyond the grid)."""
        if isinstance(steps, Tensor):
            steps = steps.tolist()
        t = torch.tensor([check_int(v, "steps entries", low=1, high=self.T) for v in steps])
        abar = self.abar.double()[t]
        lam = torch.log(abar) - 0.5 * torch.log1p(-(abar**2))
        nodes, *curves = self.curves()
        return tuple(interpolate_lambda(nodes, v, lam) for v in curves)  # type: ignore[return-value]

    def check(self, schedule: object, image_shape: Sequence[int] | None = None) -> None:
        """``ValueError`` unless these statistics belong to ``schedule`` (same ``abar``) and,
        when given, to images of ``image_shape`` (``(C, H, W)`` or ``(N, C, H, W)``)."""
        check_same_schedule(schedule, self.abar, "these solver statistics")
        if image_shape is not None:
            shape = tuple(int(v) for v in image_shape)
            shape = shape[1:] if len(shape) == len(self.image_shape) + 1 else shape
            if shape != tuple(self.image_shape):
                raise ValueError(
                    f"these solver statistics were estimated on images of shape "
                    f"{tuple(self.image_shape)}, not {shape}: estimate them on such images"
                )

    # ------------------------------------------------------------------ persistence
    def pretrained_state(self) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
        config = {"image_shape": list(self.image_shape), "num_images": self.num_images,
                  "schedule": self.schedule_config, "info": self.info}  # fmt: skip
        return config, {"statistics": {k: getattr(self, k) for k in _SAVED}}

    @classmethod
    def from_pretrained_state(
        cls, config: dict[str, Any], tensors: dict[str, dict[str, Tensor]], **kwargs: Any
    ) -> SolverStatistics:
        if kwargs:
            raise TypeError(f"SolverStatistics.from_pretrained takes no options: {sorted(kwargs)}")
        stored = tensors.get("statistics", {})
        try:  # a missing tensor or config key, or inconsistent shapes
            return cls(
                **{k: stored[k] for k in _SAVED},
                image_shape=tuple(int(v) for v in config["image_shape"]),
                num_images=int(config.get("num_images", 0)),
                schedule_config=dict(config.get("schedule", {})),
                info=dict(config.get("info", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"saved solver statistics are inconsistent: {err}") from err

    def __repr__(self) -> str:
        kind = self.info.get("kind", f"{self.num_images} images")
        return (
            f"SolverStatistics(T={self.T}, grid={len(self.steps)} steps, "
            f"image_shape={tuple(self.image_shape)}, {kind})"
        )


# ---------------------------------------------------------------------- estimation
def _placement(eps_model: object, device: torch.device | str | None, fallback: torch.dtype):
    """Device and dtype to call ``eps_model`` in: a module's first floating parameter decides,
    a plain callable gets ``fallback`` (the data's dtype) on ``device``."""
    if isinstance(eps_model, nn.Module):
        for p in eps_model.parameters():
            if p.is_floating_point():
                return (p.device if device is None else torch.device(device)), p.dtype
    return (torch.device("cpu") if device is None else torch.device(device)), fallback


def _images(data: object) -> Tensor:
    held = getattr(data, "train", None)
    if isinstance(held, Tensor) and not isinstance(data, Tensor):  # an ImageData: its train split
        data = held
    images = check_tensor(data, "data", min_ndim=2)
    if not images.is_floating_point():
        raise TypeError(f"data must hold floating-point pixels, got dtype {images.dtype}")
    if len(images) < 1 or not bool(torch.isfinite(images).all()):
        raise ValueError(f"data must hold at least one finite image, got {describe(images)}")
    return images


def _check_range(images: Tensor, data_range: object) -> tuple[float, float]:
    if not isinstance(data_range, tuple | list) or len(data_range) != 2:
        raise TypeError(f"data_range must be a pair (a, b), got {describe(data_range)}")
    lo = check_real(data_range[0], "data_range[0]", finite=False)
    hi = check_real(data_range[1], "data_range[1]", finite=False)
    if not hi > lo:
        raise ValueError(f"data_range must be (a, b) with a < b, got {tuple(data_range)!r}")
    if float(images.min()) < lo - 1e-6 or float(images.max()) > hi + 1e-6:
        raise ValueError(
            f"data must lie in data_range={(lo, hi)}, got values in [{float(images.min()):g}, "
            f"{float(images.max()):g}]: scale the images (x / 127.5 - 1 for 0..255 pixels) or "
            "pass their data_range"
        )
    return lo, hi


def accumulate_solver_sums(
    eps_model: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    images: Tensor,
    pairs: Sequence[tuple[int, int]] | Tensor,
    *,
    seed: int,
    grid: Sequence[int],
    method: str = "jvp",
    batch_size: int = 64,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> SolverSums:
    """The sums of :data:`FIELDS` over ``pairs`` = ``(image index, grid step)`` rows
    (``docs/guides/few-step.md``, "Estimating the statistics").

    Pair ``(i, t)`` uses image ``images[i]`` and the noise of ``pair_generator(seed, i, t)``
    (``eps`` first, then the Rademacher probe ``v``), so the sums of any split of the pairs add
    up to the sums of all of them. ``method="jvp"`` takes ``l`` from ``bbar v * (J v)`` and the
    ``x``-part of ``d eps_theta / d lambda`` from ``J x_dot`` (``torch.func.jvp``, one call for
    both) and the ``t``-part from neighbouring steps at fixed ``x``; ``"finite-difference"``
    takes ``l`` from Stein's identity ``E[eps * eps_theta]`` and the whole derivative from two
    model calls one step up and down the ODE (no JVP: ~2x cheaper). Inputs are trusted: this is
    the loop :func:`estimate_solver_statistics` runs after validating them.
    """
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    T, shape = schedule.T, tuple(images.shape[1:])
    row = {t: g for g, t in enumerate(grid)}
    out = SolverSums.zeros(grid, shape)
    dev, mdtype = _placement(eps_model, device, images.dtype)
    abar, bbar, lam_all = schedule.abar.double(), schedule.bbar.double(), log_snr(schedule)
    view = (-1,) + (1,) * len(shape)
    label = "jvp" if method == "jvp" else "finite differences"
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"solver statistics ({label})", total=len(pairs))
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            idx, t = chunk[:, 0], chunk[:, 1]
            draws = [_draw(seed, int(i), int(s), shape) for i, s in chunk.tolist()]
            eps = torch.stack([d[0] for d in draws])
            probe = torch.stack([d[1] for d in draws])
            x0 = images[idx].double().cpu()
            a, b = abar[t].view(view), bbar[t].view(view)
            t_prev, t_next = (t - 1).clamp(min=1), (t + 1).clamp(max=T)
            lam, lam_prev, lam_next = (lam_all[k].view(view) for k in (t, t_prev, t_next))
            gap = lam_prev - lam_next
            gap = torch.where(gap > 0, gap, torch.ones_like(gap))  # T = 1: no neighbours
            x = a * x0 + b * eps
            e, l_est, e_dot = _pair_terms(
                eps_model, x, eps, probe, (t, t_prev, t_next), (a, b, lam, lam_prev, lam_next),
                gap, method, dev, mdtype,
            )  # fmt: skip
            q, u, w = (b * e - x) / a, x / a, (b / a) * e_dot
            terms = (l_est, l_est**2, q, u, w, q * q, u * u, q * u, q * w, u * w, w * w)
            stacked = torch.stack(terms, 1)
            for step in torch.unique(t).tolist():  # batches are step-major: few distinct steps
                here = t == step
                out.sums[row[step]] += stacked[here].sum(0)
                out.counts[row[step]] += float(here.sum())
            bar.advance(task, len(chunk))
    return out


def _draw(seed: int, image: int, step: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    gen = pair_generator(seed, image, step)
    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
    probe = torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1
    return eps, probe


def _call(eps_model: Callable, x: Tensor, t: Tensor, dev, mdtype, what: str) -> Tensor:
    xm = x.to(dev, mdtype)
    out = check_model_output(eps_model(xm, t.to(dev)), xm, step=what)
    return out.detach().to("cpu", torch.float64)


def _pair_terms(eps_model, x, eps, probe, steps, scales, gap, method, dev, mdtype):
    """``(eps_theta, l estimate, d eps_theta / d lambda along the ODE)`` of a batch, float64."""
    t, t_prev, t_next = steps
    _, b, lam, lam_prev, lam_next = scales
    label = f"{int(t.min())}..{int(t.max())}"
    n = len(x)
    if method == "jvp":
        out = _call(eps_model, torch.cat([x, x, x]), torch.cat([t, t_prev, t_next]), dev,
                    mdtype, label)  # fmt: skip
        e, e_prev, e_next = out[:n], out[n : 2 * n], out[2 * n :]
        x_dot = b**2 * x - b * e
        primal = torch.cat([x, x]).to(dev, mdtype)
        tangent = torch.cat([probe, x_dot]).to(dev, mdtype)
        tt = torch.cat([t, t]).to(dev)
        try:
            jv = torch.func.jvp(lambda z: eps_model(z, tt), (primal,), (tangent,))[1]
        except (RuntimeError, TypeError, NotImplementedError) as err:
            raise RuntimeError(
                f"torch.func.jvp failed on eps_model ({err}); pass method='finite-difference' "
                "for models that forward-mode autodiff cannot trace"
            ) from err
        jv = jv.detach().to("cpu", torch.float64)
        l_est = b * probe * jv[:n]
        e_dot = jv[n:] + (e_prev - e_next) / gap
        return e, l_est, e_dot
    e = _call(eps_model, x, t, dev, mdtype, label)
    x_dot = b**2 * x - b * e
    # central differences: J v along the probe, d eps / d lambda one step up and down the ODE
    delta = _FD_STEP * b  # eps_theta bends on the scale of the noise level bbar_t
    moved = torch.cat([x + delta * probe, x - delta * probe,
                       x + x_dot * (lam_prev - lam), x + x_dot * (lam_next - lam)])  # fmt: skip
    out = _call(eps_model, moved, torch.cat([t, t, t_prev, t_next]), dev, mdtype, label)
    jv = (out[:n] - out[n : 2 * n]) / (2 * delta)
    e_dot = (out[2 * n : 3 * n] - out[3 * n :]) / gap
    return e, b * probe * jv, e_dot


def estimate_solver_statistics(
    eps_model: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    data: Any,
    *,
    num_images: int | None = 256,
    grid: int | Sequence[int] = 40,
    method: str = "jvp",
    ridge: float = 1e-3,
    max_standard_error: float | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    generator: torch.Generator | None = None,
    progress: bool = True,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> SolverStatistics:
    """Estimate the empirical model statistics ``l, s, b`` of ``eps_model`` over training
    images (``docs/guides/few-step.md``, "Empirical model statistics" and "Estimating the
    statistics").

    Args:
        eps_model: any callable ``eps_model(x_t, t) -> eps`` (``t``: long tensor of steps in
            ``1..T``); with ``method="jvp"`` it must run under ``torch.func.jvp``.
        schedule: the model's :class:`NoiseSchedule` (a model carrying ``model.schedule``
            must match it).
        data: training images ``(N, C, H, W)`` in ``data_range`` (or an ``ImageData``: its
            ``train`` split).
        num_images: images used (a random subset drawn with ``generator``; None = all). Each
            gets one noise draw per grid step.
        grid: the steps where the statistics are estimated: an int ``G`` (``G`` steps evenly
            spaced in ``lambda``, always including 1 and ``T``) or an increasing list of steps.
            Between grid steps the statistics are linear in ``lambda``.
        method: ``"jvp"`` (Jacobian-vector products, as the paper) or ``"finite-difference"``
            (no autodiff; Stein's identity for ``l``): see :func:`accumulate_solver_sums`.
        ridge: regularises ``s`` where ``Var f`` is tiny (see :meth:`SolverSums.statistics`).
        max_standard_error: set ``s = b = 0`` at grid steps whose ``s`` the pairs do not
            resolve (see :meth:`SolverSums.statistics`); None keeps every estimate.
        data_range: ``(a, b)``, the pixel range the images must lie in.
        generator: draws the image subset and one seed; the noise of pair ``(image i, step t)``
            then comes from :func:`pair_generator` ``(seed, i, t)``.
        progress: show a progress bar.
        batch_size: pairs per model call.
        device: where to run the model (default: its parameters' device).

    Cost: ``num_images * len(grid)`` pairs; per pair 3 model evaluations plus one JVP with two
    tangents (``"jvp"``, about 10 forward passes in all) or 3 evaluations
    (``"finite-difference"``), shared by the processes.

    Many processes: under ``accelerate launch`` (any initialised ``torch.distributed`` group)
    the seed and the image subset are rank 0's, the batches of (image, step) pairs are split
    over the processes (:func:`~kexue.distributed.shard`; each batch exactly as one process
    would form it) and the float64 sums reduced; every process returns the same statistics as
    one process would, to float64 rounding (``docs/guides/few-step.md``, "Estimating the
    statistics"). The progress bar is rank 0's.

    Raises:
        NonFiniteError: the model returned NaN or inf (the message names the steps).
    """
    check_callable(eps_model, "eps_model", "eps_model(x_t, t)")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {describe(schedule)}")
    check_model_schedule(eps_model, schedule)
    if schedule.T < 2:
        raise ValueError(f"schedule must have T >= 2 steps, got T={schedule.T}")
    images = _images(data)
    _check_range(images, data_range)
    if num_images is not None:
        num_images = check_int(num_images, "num_images", low=2)
    method = check_choice(method, "method", METHODS)
    batch_size = check_int(batch_size, "batch_size", low=1)
    generator = check_generator(generator)
    steps = statistics_grid(schedule, grid)
    started = time.perf_counter()
    # one draw from generator (rank 0's under torch.distributed, sent to every process)
    seed = shared_seed(generator)
    N = len(images)
    n = N if num_images is None else min(num_images, N)
    chosen = torch.randperm(N, generator=generator)[:n] if n < N else torch.arange(N)
    chosen = torch.sort(chosen).values
    if is_distributed():  # rank 0's subset on every process (a sum with one non-zero term)
        chosen = all_reduce_sum(chosen if rank() == 0 else torch.zeros_like(chosen))
    pairs = torch.stack(
        [chosen.repeat(len(steps)), torch.tensor(steps).repeat_interleave(n)], 1
    )  # step-major: a batch holds few distinct steps
    # Whole batches are split over processes (batch b of one process's loop goes to rank
    # b mod W), so every model call sees the batch one process would give it: a float32
    # model's outputs, whose rounding depends on the batch, are then bit-for-bit those of one
    # process, and each pair's noise is keyed by (seed, image, step) whoever draws it.
    mine = torch.cat([pairs[b : b + batch_size] for b in shard(range(0, len(pairs), batch_size))]
                     or [pairs[:0]])  # fmt: skip
    sums = accumulate_solver_sums(
        eps_model, schedule, images, mine, seed=seed, grid=steps, method=method,
        batch_size=batch_size, progress=progress, device=device,
    )  # fmt: skip
    if is_distributed():  # float64 sums over processes
        sums = SolverSums(sums.steps, all_reduce_sum(sums.sums), all_reduce_sum(sums.counts))
    info = {
        "method": method,
        "seed": seed,
        "grid": len(steps),
        "seconds": round(time.perf_counter() - started, 3),
        "model": type(eps_model).__name__,
    }
    if is_distributed():
        info["processes"] = world_size()
    return sums.statistics(
        schedule, ridge=ridge, max_standard_error=max_standard_error, num_images=n, info=info
    )


# ---------------------------------------------------------------------- shipped statistics
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes of every tensor of its
    ``state_dict``, in order): what ties shipped statistics to the exact weights they were
    estimated on (a converted or fine-tuned copy has another fingerprint)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {describe(model)}")
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def default_statistics(eps_model: object, schedule: NoiseSchedule) -> SolverStatistics:
    """The shipped statistics estimated on exactly ``eps_model``'s weights (recorded as
    ``info["model_fingerprint"]``, see :func:`model_fingerprint`) for ``schedule``;
    ``ValueError`` naming ``statistics`` when none is shipped for it."""
    if isinstance(eps_model, nn.Module):
        found = None
        for name in shipped_names(ASSETS):
            wanted = read_config(ASSETS / name).get("info", {}).get("model_fingerprint")
            if wanted is not None:
                found = found or model_fingerprint(eps_model)
                if wanted == found:
                    statistics = SolverStatistics.from_pretrained(name)
                    statistics.check(schedule)
                    return statistics
    raise ValueError(
        "statistics=None: no statistics are shipped for this eps_model (only for the shipped "
        f"models {shipped_names(ASSETS) or '(none)'}, as loaded with UNet.from_pretrained); pass "
        "statistics=estimate_solver_statistics(eps_model, schedule, data) (or "
        "SolverStatistics.data_prediction(schedule, image_shape), which is DPM-Solver++)"
    )
