"""The articles' simplified U-Net: GroupNorm, additive skips, optional low-resolution attention.

``UNet(x_t, t)`` predicts the noise ``eps`` of ``x_t = abar_t x_0 + bbar_t eps`` for integer
steps ``t`` in ``1..T`` (``docs/guides/diffusion.md``, "The network"). Skips are added (not
concatenated), so every level keeps one width; no BatchNorm anywhere (its train/inference
mismatch hurts diffusion models).

A trained model is saved with its noise schedule: ``model.save_pretrained(folder)`` and
``UNet.from_pretrained("mnist5k")`` (a shipped name) or ``UNet.from_pretrained(folder)``; the
loaded model carries ``model.schedule`` (sampling with another schedule is an error) and
``model.info`` (how it was trained: ``step``, ``command``, ``image_shape``, ...).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kexue.diffusion.schedule import NoiseSchedule
from kexue.exceptions import CheckpointError
from kexue.pretrained import CONFIG_NAME, PretrainedMixin

ASSETS = Path(__file__).parent / "assets"
RUN_MODEL_DIR = "model"  # a training run folder keeps its EMA model here (save_pretrained)


@dataclass
class UNetConfig:
    """Size and options of a :class:`UNet` (saved as JSON next to its weights)."""

    in_channels: int = 1
    channels: int = 32
    channel_mults: Sequence[int] = field(default_factory=lambda: (1, 2, 3))
    blocks: int = 2
    attention_levels: Sequence[int] = field(default_factory=tuple)
    time_embedding: str = "sinusoidal"  # or "learned"
    T: int = 1000
    groups: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.attention_levels = tuple(int(a) for a in self.attention_levels)
        if self.in_channels < 1 or self.channels < 1 or self.blocks < 1 or not self.channel_mults:
            raise ValueError(
                "in_channels, channels, blocks must be >= 1 and channel_mults non-empty"
            )
        widths = [self.channels * m for m in self.channel_mults]
        if any(w % self.groups for w in widths):
            raise ValueError(
                f"every level width {widths} must be divisible by groups={self.groups}"
            )
        if any(not 0 <= a < len(widths) for a in self.attention_levels):
            raise ValueError(f"attention_levels must index levels 0..{len(widths) - 1}")
        if self.time_embedding not in ("sinusoidal", "learned"):
            raise ValueError(
                f"time_embedding must be 'sinusoidal' or 'learned', got {self.time_embedding!r}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self) | {
            "channel_mults": list(self.channel_mults),
            "attention_levels": list(self.attention_levels),
        }


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Transformer-style ``[sin(t w_k), cos(t w_k)]`` with ``w_k = 10000^(-k / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, time_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.time = nn.Linear(time_dim, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(cast(Tensor, self.conv2.bias))  # bias=True

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over pixels, residual (for the low-resolution levels)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(cast(Tensor, self.out.bias))  # bias=True

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None], v.transpose(1, 2)[:, None]
        )
        return x + self.out(attn[:, 0].transpose(1, 2).reshape(b, c, h, w))


class Level(nn.Module):
    """``blocks`` residual blocks at one resolution, optionally followed by attention."""

    def __init__(self, channels: int, time_dim: int, cfg: UNetConfig, attention: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(channels, time_dim, cfg.groups, cfg.dropout) for _ in range(cfg.blocks)
        )
        self.attention = Attention(channels, cfg.groups) if attention else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, temb)
        return self.attention(x) if self.attention is not None else x


class UNet(PretrainedMixin, nn.Module):
    """Simplified U-Net ``eps_theta(x_t, t)``; the default (~1.7M parameters, 400 MFLOP per
    28x28 image) suits grey digits. Input height/width must be divisible by
    ``2 ** (len(channel_mults) - 1)``.

    Attributes:
        schedule: the :class:`NoiseSchedule` the model was trained with, or None (a fresh
            model); set by ``from_pretrained`` and by the ``Trainer``, saved with the weights.
        info: free-form, JSON-able facts about how the model was made (saved with it).
    """

    pretrained_kind: ClassVar[str] = "kexue.diffusion.UNet"
    pretrained_version: ClassVar[int] = 1
    pretrained_extra: ClassVar[str] = "diffusion"
    pretrained_assets: ClassVar[Path | None] = ASSETS

    def __init__(
        self,
        config: UNetConfig | None = None,
        *,
        schedule: NoiseSchedule | None = None,
        info: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        cfg = config or UNetConfig(**kwargs)
        if config is not None and kwargs:
            raise TypeError("give either a UNetConfig or keyword arguments, not both")
        if schedule is not None and not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule or None, got {type(schedule)}")
        if schedule is not None and schedule.T != cfg.T:
            raise ValueError(f"schedule has T={schedule.T} but the model is built for T={cfg.T}")
        self.config = cfg
        self.schedule = schedule
        self.info: dict[str, Any] = dict(info or {})
        widths = [cfg.channels * m for m in cfg.channel_mults]
        time_dim = 4 * cfg.channels
        if cfg.time_embedding == "learned":
            self.time_table = nn.Embedding(cfg.T + 1, cfg.channels)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.stem = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        attn = set(cfg.attention_levels)
        self.down = nn.ModuleList(Level(w, time_dim, cfg, i in attn) for i, w in enumerate(widths))
        self.downsample = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in itertools.pairwise(widths)
        )
        self.mid = Level(widths[-1], time_dim, cfg, len(widths) - 1 in attn)
        self.upsample = nn.ModuleList(
            nn.Conv2d(b, a, 3, padding=1) for a, b in itertools.pairwise(widths)
        )
        self.up = nn.ModuleList(Level(w, time_dim, cfg, i in attn) for i, w in enumerate(widths))
        self.head = nn.Sequential(
            nn.GroupNorm(cfg.groups, widths[0]),
            nn.SiLU(),
            nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1),
        )
        head_conv = cast(nn.Conv2d, self.head[-1])
        nn.init.zeros_(head_conv.weight)
        nn.init.zeros_(cast(Tensor, head_conv.bias))  # bias=True

    def time_embedding(self, t: Tensor) -> Tensor:
        if self.config.time_embedding == "learned":
            return self.time_mlp(self.time_table(t))
        emb = sinusoidal_embedding(t, self.config.channels)
        first = cast(nn.Linear, self.time_mlp[0])
        return self.time_mlp(emb.to(first.weight.dtype))  # float64 models too

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.head(self.features(x, t))

    def features(self, x: Tensor, t: Tensor) -> Tensor:
        """The body's output before ``head`` (width ``channels``, full resolution): what a
        second head (e.g. a learned reverse variance) can reuse with the body frozen."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"x must have shape (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        factor = 2 ** (len(self.down) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"image height and width must be divisible by {factor}, got {tuple(x.shape[-2:])}"
            )
        t = torch.as_tensor(t, device=x.device).long().expand(x.shape[0])
        temb = self.time_embedding(t)
        h = self.stem(x)
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, temb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, temb)
        for i in reversed(range(len(self.up))):
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.up[i](h + skips[i], temb)
        return h

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ save / load
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> UNet:
        """Load a shipped model (``"mnist5k"``), a folder written by :meth:`save_pretrained`,
        or a training run folder (its ``model/``: the EMA weights of the latest checkpoint).
        The model comes back in eval mode, frozen, with ``schedule`` and ``info``."""
        if isinstance(name_or_path, str | os.PathLike):
            run_model = Path(name_or_path) / RUN_MODEL_DIR
            if not (Path(name_or_path) / CONFIG_NAME).is_file() or _is_run_config(
                Path(name_or_path) / CONFIG_NAME
            ):
                if (run_model / CONFIG_NAME).is_file():
                    name_or_path = run_model
        return super().from_pretrained(name_or_path, **kwargs)

    def pretrained_state(self) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
        config = {
            "unet": self.config.to_dict(),
            "schedule": None if self.schedule is None else dict(self.schedule.config),
            **self.info,
        }
        return config, {"model": self.state_dict()}

    @classmethod
    def from_pretrained_state(
        cls, config: dict[str, Any], tensors: dict[str, dict[str, Tensor]], **kwargs: Any
    ) -> UNet:
        if kwargs:
            raise TypeError(f"UNet.from_pretrained takes no options, got {sorted(kwargs)}")
        if "model" not in tensors or "unet" not in config:
            raise CheckpointError("a saved UNet needs model.safetensors and the 'unet' config")
        schedule_config = config.get("schedule")
        schedule = None if schedule_config is None else NoiseSchedule.from_config(schedule_config)
        info = {k: v for k, v in config.items() if k not in ("unet", "schedule")}
        model = cls(UNetConfig(**config["unet"]), schedule=schedule, info=info)
        load_state_dict_strict(model, tensors["model"], "the saved UNet weights")
        return model.eval().requires_grad_(False)


def _is_run_config(path: Path) -> bool:
    """True for the ``config.json`` of a training run folder (not a saved kexue object)."""
    try:
        return "_kexue_class" not in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def load_state_dict_strict(module: nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    """``module.load_state_dict(strict=True)`` with a :class:`CheckpointError` naming ``what``
    on mismatched keys or shapes."""
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{what} does not fit this model: {first}") from err
