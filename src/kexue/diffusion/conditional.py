"""Conditional (per-pixel, x_t-dependent) reverse variances: SN-DPM and NPR-DPM.

``docs/guides/optimal-variance.md``, "Conditional variances: SN and NPR heads". Two-stage:
the trained mean model ``eps_theta`` is frozen, its body (``UNet.features``) reused, and a new
output head ``g(x_t, t)`` trained by regression (squared error summed over pixels, on the
training loss's draws: ``t`` uniform on ``1..T``, ``x_t = abar_t x_0 + bbar_t eps``):

- ``"npr"`` (NPR-DPM): ``g`` regresses ``(eps - eps_theta(x_t, t))^2``;
  ``sbar_t^2(x_t) = (bbar_t^2 / abar_t^2) g``.
- ``"sn"`` (SN-DPM): ``g`` regresses ``eps^2``;
  ``sbar_t^2(x_t) = (bbar_t^2 / abar_t^2) (g - eps_theta^2)``.

The reverse variance of a jump ``t -> s`` is then ``sigma^2 + gamma^2 sbar_t^2(x_t)`` per pixel
(see :mod:`kexue.diffusion.variance`), clipped to the same bounds. A :class:`VarianceHead`
is both the ``eps_model`` (it returns ``eps_theta``) and, through :meth:`reverse_variance`,
the ``variance=`` callable of :func:`~kexue.diffusion.sample`; the body runs once per step.
``head.save_pretrained(folder)`` writes only the head (with the base model's fingerprint);
``VarianceHead.from_pretrained(folder)`` reloads it onto its base model.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kexue.diffusion.moments import check_data_range, model_fingerprint
from kexue.diffusion.sampler import check_eta, resolve_steps
from kexue.diffusion.schedule import NoiseSchedule, check_schedule
from kexue.diffusion.unet import UNet, load_state_dict_strict
from kexue.diffusion.variance import LAST_STEP, SECOND_TO_LAST_CAP, jump_coefficients
from kexue.exceptions import CheckpointError
from kexue.pretrained import PretrainedMixin
from kexue.progress import progress_bar
from kexue.validation import check_choice, check_int, check_real, check_tensor

HEAD_KINDS = ("sn", "npr")


@dataclass
class VarianceHeadConfig:
    """How a variance head was trained (saved as ``config.json`` next to its weights)."""

    kind: str = "sn"
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    data: str = "mnist5k"

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"kind must be 'sn' or 'npr', got {self.kind!r}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_real(self.lr, "lr", low=0.0, low_open=True)
        check_int(self.seed, "seed")


class _Head(nn.Module):
    """norm-SiLU-conv, then a norm modulated by the frozen body's time embedding (scale and
    shift after the norm, so a group norm cannot remove it), SiLU, conv to ``C`` channels.

    The time embedding enters directly because the targets vary with ``t`` far more than the
    body's features alone convey in small or young models."""

    def __init__(self, width: int, time_dim: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, width)
        self.time = nn.Linear(time_dim, 2 * width)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.time(temb)[:, :, None, None].chunk(2, dim=1)
        x = self.norm2(self.conv1(F.silu(self.norm1(h))))
        return self.out(F.silu(x * (1 + scale) + shift))


def _new_head(base: UNet) -> _Head:
    cfg = base.config
    width = cfg.channels * cfg.channel_mults[0]
    return _Head(width, 4 * cfg.channels, cfg.in_channels, cfg.groups)


class HeadVariance:
    """The ``variance(x_t, t, s, eps_theta)`` callable of :meth:`VarianceHead.reverse_variance`.

    It records the ``eta`` and trajectory (``steps``) it was built for: :func:`~kexue.diffusion.
    sample` refuses to use it with another ``eta`` or trajectory.
    """

    def __init__(
        self,
        head: VarianceHead,
        steps: list[int],
        eta: float,
        clip: bool,
        last_step: str,
        cap_second_last: float | None,
    ) -> None:
        self.head, self.steps, self.eta = head, steps, eta
        self.clip, self.last_step, self.cap_second_last = clip, last_step, cap_second_last
        self.coefficients = jump_coefficients(head.schedule, steps, eta)
        self.index = {t: i for i, t in enumerate(steps)}

    def __call__(self, x_t: Tensor, t: int, s: int, eps_theta: Tensor) -> Tensor:
        i = self.index.get(int(t))
        kept = self.steps
        if i is None or s != (kept[i - 1] if i > 0 else 0):
            raise ValueError(
                f"this variance was built for the trajectory {kept[:3]}...{kept[-3:]}; got the "
                f"jump {t} -> {s}"
            )
        if i == 0 and self.last_step == "mean":
            return torch.zeros((), dtype=x_t.dtype, device=x_t.device)
        with torch.no_grad():
            sbar2 = self.head.sbar2(x_t, int(t), eps_theta, clip=self.clip)
        coef = self.coefficients
        var = float(coef["sigma2"][i]) + float(coef["gamma"][i]) ** 2 * sbar2
        if i == 1 and self.cap_second_last is not None:
            var = var.clamp(max=self.cap_second_last)
        return var

    def __repr__(self) -> str:
        return f"HeadVariance({self.head.kind}, K={len(self.steps)}, eta={self.eta:g})"


class VarianceHead(PretrainedMixin, nn.Module):
    """A frozen :class:`UNet` plus a trained head ``g(x_t, t)`` on its body's features.

    Calling it returns ``eps_theta(x_t, t)`` (the frozen mean model) and remembers the body's
    features of that very input, so :meth:`g` and the variance callable reuse them.

    Args:
        base: the frozen mean model.
        schedule: its schedule (default: ``base.schedule``, which a loaded model carries;
            another schedule is an error).
        kind: ``"sn"`` or ``"npr"``.
        data_range: the pixel range ``(a, b)`` (gives the bound ``((b - a)/2)^2``).
    """

    pretrained_kind: ClassVar[str] = "kexue.diffusion.VarianceHead"
    pretrained_version: ClassVar[int] = 1
    pretrained_extra: ClassVar[str] = "diffusion"
    history: list[float]  # the training losses, set by train_variance_head

    def __init__(
        self,
        base: UNet,
        schedule: NoiseSchedule | None = None,
        kind: str = "sn",
        *,
        data_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        if not isinstance(base, UNet):
            raise TypeError(f"base must be a kexue UNet, got {type(base).__name__}")
        if kind not in HEAD_KINDS:
            raise ValueError(f"kind must be 'sn' or 'npr', got {kind!r}")
        if schedule is None:
            schedule = base.schedule
            if schedule is None:
                raise ValueError(
                    "schedule is required: base carries no schedule (a model loaded with "
                    "UNet.from_pretrained does)"
                )
        check_schedule(schedule, base)
        if schedule.T != base.config.T:
            raise ValueError(
                f"schedule has T={schedule.T} but the model was built for {base.config.T}"
            )
        self.base = base.eval().requires_grad_(False)
        self.head = _new_head(base)
        self.schedule = schedule
        self.kind = kind
        self.data_range = check_data_range(data_range)
        self.info: dict[str, Any] = {}
        self._cache: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def train(self, mode: bool = True) -> VarianceHead:
        super().train(mode)
        self.base.eval()  # the frozen body never leaves inference mode
        return self

    def _features(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The frozen body's features and time embedding, reused when called again with the
        very same input tensor and steps (as the sampler does: model, then variance)."""
        t = torch.as_tensor(t, device=x.device).long().expand(x.shape[0])
        cache = self._cache
        if cache is not None and cache[0] is x and torch.equal(cache[1], t):
            return cache[2], cache[3]
        with torch.no_grad():
            h, temb = self.base.features(x, t), self.base.time_embedding(t)
        self._cache = (x, t, h, temb)
        return h, temb

    def clear_cache(self) -> None:
        """Forget the remembered features (they hold the last input alive)."""
        self._cache = None

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``eps_theta(x_t, t)`` of the frozen mean model."""
        with torch.no_grad():
            return self.base.head(self._features(x, t)[0])

    def g(self, x: Tensor, t: Tensor | int) -> Tensor:
        """The head's regression output (SN: ``E[eps^2 | x_t]``; NPR:
        ``E[(eps - eps_theta)^2 | x_t]``), shape of ``x``."""
        return self.head(*self._features(x, torch.as_tensor(t)))

    def sbar2(self, x: Tensor, t: int, eps_theta: Tensor | None = None, clip: bool = True):
        """Per-pixel ``sbar_t^2(x_t)``, clipped to ``[0, min(bbar_t^2/abar_t^2, ((b-a)/2)^2)]``."""
        abar = float(self.schedule.abar[t])
        ratio = (1 - abar**2) / abar**2
        g = self.g(x, t)
        if self.kind == "sn":
            eps_theta = self(x, torch.as_tensor(t)) if eps_theta is None else eps_theta
            out = ratio * (g - eps_theta**2)
        else:
            out = ratio * g
        if clip:
            a, b = self.data_range
            out = out.clamp(min=0.0, max=min(ratio, ((b - a) / 2) ** 2))
        return out

    def reverse_variance(
        self,
        steps: int | Sequence[int] | None,
        *,
        eta: float = 0.0,
        clip: bool = True,
        last_step: str = "mean",
        cap_second_last: float | None = SECOND_TO_LAST_CAP,
        spacing: str = "even",
    ) -> HeadVariance:
        """The callable ``variance(x_t, t, s, eps_theta)`` for :func:`~kexue.diffusion.sample`
        (with this head as ``eps_model``): ``sigma^2 + gamma^2 sbar_t^2(x_t)`` per pixel, with
        the last-step and second-to-last-step rules of
        :func:`~kexue.diffusion.variance.optimal_variance`. Pass ``sample`` the same ``steps``
        and ``eta`` (it checks both; note ``sample``'s default is ``eta=1``)."""
        if last_step not in LAST_STEP:
            raise ValueError(f"last_step must be one of {LAST_STEP}, got {last_step!r}")
        eta = check_eta(eta)
        kept = resolve_steps(self.schedule, steps, spacing)
        return HeadVariance(self, kept, eta, clip, last_step, cap_second_last)

    # ------------------------------------------------------------------ save / load
    def pretrained_state(self) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
        """Only what was trained (the head), with the base model's SHA-256 and where it came
        from (``info["base"]``), so loading onto another base model is refused."""
        config = {
            "kind": self.kind,
            "base_sha256": model_fingerprint(self.base),
            "base_unet": self.base.config.to_dict(),
            "schedule": dict(self.schedule.config),
            "data_range": list(self.data_range),
            "info": self.info,
        }
        return config, {"head": self.head.state_dict()}

    @classmethod
    def from_pretrained(  # type: ignore[override]  # takes only base=, not any **kwargs
        cls, name_or_path: str | os.PathLike, *, base: UNet | None = None
    ) -> VarianceHead:
        """Load a head saved by :meth:`save_pretrained` onto ``base`` (default: the model it
        was trained on, ``info["base"]``: a shipped name or a folder). A base with other
        weights is a ``ValueError``."""
        return super().from_pretrained(name_or_path, base=base)

    @classmethod
    def from_pretrained_state(
        cls,
        config: dict[str, Any],
        tensors: dict[str, dict[str, Tensor]],
        *,
        base: UNet | None = None,
        **kwargs: Any,
    ) -> VarianceHead:
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if "head" not in tensors:
            raise CheckpointError("a saved VarianceHead needs head.safetensors")
        info = config.get("info", {})
        if base is None:
            ref = info.get("base")
            if not isinstance(ref, str) or ref == IN_MEMORY:
                raise ValueError("this head was trained on a model in memory: pass it as base=...")
            base = UNet.from_pretrained(ref)
        elif not isinstance(base, UNet):
            raise TypeError(f"base must be a kexue UNet, got {type(base).__name__}")
        if model_fingerprint(base) != config["base_sha256"]:
            raise ValueError(
                f"this variance head was trained on another mean model (SHA-256 "
                f"{config['base_sha256'][:12]}...); load it onto that model"
            )
        schedule = base.schedule or NoiseSchedule.from_config(config["schedule"])
        head = cls(base, schedule, config["kind"], data_range=tuple(config["data_range"]))
        load_state_dict_strict(head.head, tensors["head"], "the saved variance head")
        head.info = dict(info)
        return head.eval()


IN_MEMORY = "in-memory UNet"


def _training_images(data: Any) -> Tensor:
    if isinstance(data, str):
        from kexue.diffusion.data import load_images

        return load_images(data).train
    if hasattr(data, "train") and isinstance(data.train, Tensor):
        return data.train
    if isinstance(data, Tensor) and data.ndim == 4 and len(data) >= 1:
        return check_tensor(data, "data", floating=True)
    raise TypeError(
        "data must be a data spec ('mnist5k', ...), an ImageData or (N, C, H, W) images"
    )


def variance_head_loss(
    head: VarianceHead, x0: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One Monte Carlo estimate of the regression loss ``||g(x_t, t) - target||^2`` (summed
    over pixels, mean over the batch): target ``eps^2`` (SN) or ``(eps - eps_theta)^2``
    (NPR), on one draw of the training loss's :meth:`NoiseSchedule.noise_batch`. Returns
    ``(loss, target)``."""
    t, eps, x_t = head.schedule.noise_batch(x0, generator=generator)
    eps_theta = head(x_t, t)
    target = eps**2 if head.kind == "sn" else (eps - eps_theta) ** 2
    return (head.g(x_t, t) - target).pow(2).flatten(1).sum(1).mean(), target


def train_variance_head(
    eps_model_ckpt: str | Path | UNet,
    kind: str = "sn",
    *,
    data: Any = "mnist5k",
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    schedule: NoiseSchedule | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> VarianceHead:
    """Train an SN or NPR variance head on a frozen mean model (two-stage; see the module).

    Args:
        eps_model_ckpt: a shipped model name (``"mnist5k"``), a folder written by
            ``save_pretrained`` or a training run folder (anything ``UNet.from_pretrained``
            loads), or a :class:`UNet` (``schedule`` defaults to its ``schedule``).
        kind: ``"sn"`` or ``"npr"``.
        data: training images: a data spec for ``load_images``, an ``ImageData`` or a tensor.
        steps, batch_size, lr, seed: AdamW steps on the head only; all randomness from ``seed``.
        schedule: the base model's schedule (default: the one it carries).
        out: folder to save the head to (``save_pretrained``), or None.
        progress: show a progress bar.
        device: where to train (default: the base model's device).

    Returns:
        The trained :class:`VarianceHead` (in eval mode); ``head.history`` holds the losses.
    """
    check_choice(kind, "kind", HEAD_KINDS)
    spec = data if isinstance(data, str) else "custom"
    config = VarianceHeadConfig(kind=kind, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                data=spec)  # fmt: skip
    if isinstance(eps_model_ckpt, UNet):
        base, base_ref = eps_model_ckpt, IN_MEMORY
    elif isinstance(eps_model_ckpt, str | os.PathLike):
        base, base_ref = UNet.from_pretrained(eps_model_ckpt), os.fspath(eps_model_ckpt)
    else:
        raise TypeError(
            f"eps_model_ckpt must be a model name, a folder or a UNet, got {type(eps_model_ckpt)}"
        )
    if schedule is None and base.schedule is None:
        raise ValueError("schedule is required when eps_model_ckpt is a UNet without a schedule")
    images = _training_images(data)
    if tuple(images.shape[1:2]) != (base.config.in_channels,):
        raise ValueError(
            f"data has {images.shape[1]} channels but the model takes {base.config.in_channels}"
        )
    if device is not None:
        base = base.to(device)
    head = VarianceHead(base, schedule, kind)
    head.to(next(base.parameters()).device)
    device = next(base.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # start the bias at the mean target: the regression then starts at 0
        first = images[torch.randint(0, len(images), (batch_size,), generator=gen)].to(device)
        _, target = variance_head_loss(head, first, gen)
        cast(Tensor, head.head.out.bias).fill_(float(target.mean()))  # bias=True
    optimizer = torch.optim.AdamW(head.head.parameters(), lr=lr, weight_decay=0.0)
    history: list[float] = []
    start = time.perf_counter()
    head.train()
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"training {kind.upper()} variance head", total=steps)
        for step in range(steps):
            for group in optimizer.param_groups:  # cosine decay: the target is very noisy
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            idx = torch.randint(0, len(images), (batch_size,), generator=gen)
            loss, _ = variance_head_loss(head, images[idx].to(device), gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
            bar.advance(task)
    seconds = time.perf_counter() - start
    head.eval()
    head.history = history
    head.clear_cache()
    tail = history[-max(1, steps // 10) :]
    head.info = {"base": base_ref, "train": asdict(config), "final_loss": sum(tail) / len(tail),
                 "seconds": seconds,
                 "images_per_s": steps * batch_size / max(seconds, 1e-9)}  # fmt: skip
    if out is not None:
        head.save_pretrained(out)
    return head
