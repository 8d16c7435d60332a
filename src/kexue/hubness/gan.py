"""A small GAN on the built-in MNIST digits: the generator the hub prior was proposed for.

The hub prior's claim concerns GAN latents (``docs/guides/hubness.md``, "Hub-prior
sampling"), so kexue ships one GAN to test it on: :class:`DigitGenerator`, a DCGAN-style
generator (latent ``z ~ N(0, I_128)`` -> 28 x 28 digit in ``[-1, 1]``), trained against
:class:`DigitDiscriminator`, a spectrally normalised convolutional critic, with the hinge loss

    L_D = E_x[relu(1 - D(T(x)))] + E_z[relu(1 + D(T(G(z))))],   L_G = -E_z[D(T(G(z)))],

where ``T`` is a random shift of up to 2 pixels applied to real and generated digits alike
(differentiable augmentation, so the critic cannot memorise the 4,000 training digits). Why
this recipe (``docs/guides/hubness.md``, "The GAN"): spectral normalisation bounds the critic's
Lipschitz constant with one power iteration per step, so one critic step per generator step
suffices (a WGAN-GP critic needs several, each with a second backward pass, too slow for two
CPU cores); the hinge loss does not saturate; an exponential moving average of the generator's
weights removes most of the step-to-step jitter of GAN training.

:func:`train_gan` trains with a progress bar and crash-safe checkpoints from which a killed
run resumes bit-exactly: every random draw of step ``s`` comes from a generator seeded by
``(seed, s)``, the data order of epoch ``e`` from one seeded by ``(seed, e)``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import TextColumn
from torch import Tensor, nn

from kexue.exceptions import CheckpointError
from kexue.io import fsync_dir, write_json_atomic
from kexue.pretrained import PretrainedMixin, load_folder, save_folder
from kexue.progress import progress_bar
from kexue.validation import check_generator, check_int, check_real, check_tensor

__all__ = [
    "DigitDiscriminator",
    "DigitGenerator",
    "GANTrainConfig",
    "critic_hinge_loss",
    "latest_gan_checkpoint",
    "shift_images",
    "standing_statistics",
    "train_gan",
]

ASSETS = Path(__file__).parent / "assets"
_CHECKPOINT_KIND = "kexue.hubness.GANCheckpoint"


class DigitGenerator(PretrainedMixin, nn.Module):
    """DCGAN-style generator: ``z`` (N, latent_dim) -> digits (N, 1, 28, 28) in ``[-1, 1]``.

    ``z -> linear -> (channels, 7, 7) -> 2x up-convolution -> (channels/2, 14, 14) -> 2x
    up-convolution -> (1, 28, 28) -> tanh``, batch normalisation and ReLU between layers
    (the InfoGAN/DCGAN MNIST generator without its hidden dense layer) when ``refine=False``.
    With ``refine=True`` (the default, and the shipped generator) a 3 x 3 convolution follows
    the first up-convolution at 14 x 14, the second one keeps ``channels/4`` maps at 28 x 28,
    and a 3 x 3 convolution turns those into the digit: two more layers where the strokes are
    drawn (``docs/guides/hubness.md``, "The GAN").
    Latents are ``N(0, I)`` during training; any other latent prior (hub prior, truncation)
    is applied by the caller. Load the shipped one with
    ``DigitGenerator.from_pretrained("mnist-gan")``.
    """

    pretrained_kind: ClassVar[str] = "kexue.hubness.DigitGenerator"
    pretrained_extra: ClassVar[str] = "hubness"
    pretrained_assets: ClassVar[Path | None] = ASSETS

    def __init__(self, latent_dim: int = 128, channels: int = 128, refine: bool = True) -> None:
        super().__init__()
        self.latent_dim = check_int(latent_dim, "latent_dim", low=1)
        self.channels = check_int(channels, "channels", low=2)
        if not isinstance(refine, bool):
            raise TypeError(f"refine must be a bool, got {type(refine).__name__}")
        self.refine = refine
        step = 4 if refine else 2
        if channels % step:
            raise ValueError(
                f"channels must be a multiple of {step}{' with refine=True' if refine else ''}, "
                f"got {channels}"
            )
        c = channels
        self.project = nn.Linear(latent_dim, c * 49, bias=False)
        layers: list[nn.Module] = [
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c // 2),
            nn.ReLU(),
        ]
        if refine:
            layers += [
                nn.Conv2d(c // 2, c // 2, 3, padding=1, bias=False),
                nn.BatchNorm2d(c // 2),
                nn.ReLU(),
                nn.ConvTranspose2d(c // 2, c // 4, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c // 4),
                nn.ReLU(),
                nn.Conv2d(c // 4, 1, 3, padding=1),
            ]
        else:
            layers.append(nn.ConvTranspose2d(c // 2, 1, 4, stride=2, padding=1))
        self.body = nn.Sequential(*layers, nn.Tanh())
        self.training_info: dict[str, Any] = {}

    def forward(self, z: Tensor) -> Tensor:
        """Digits for the latents ``z`` of shape (N, latent_dim); float32 or float64."""
        z = check_tensor(z, "z", floating=True, ndim=2)
        if z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (N, {self.latent_dim}), got {tuple(z.shape)}")
        weight = self.project.weight
        if z.dtype != weight.dtype or z.device != weight.device:
            raise TypeError(
                f"z is a {z.dtype} tensor on {z.device} but the generator is {weight.dtype} on "
                f"{weight.device}; convert one of them (generator.to(...))"
            )
        h = self.project(z).view(-1, self.channels, 7, 7)
        return self.body(h)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        batch_size: int = 1000,
    ) -> Tensor:
        """``n`` digits from ``z ~ N(0, I)`` drawn with ``generator`` (eval mode)."""
        n = check_int(n, "n", low=1)
        batch_size = check_int(batch_size, "batch_size", low=1)
        check_generator(generator)
        weight = self.project.weight
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=weight.dtype)
        was = self.training
        self.eval()
        try:
            return torch.cat([self(chunk.to(weight.device)) for chunk in z.split(batch_size)])
        finally:
            self.train(was)

    def pretrained_state(self) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
        config = {
            "latent_dim": self.latent_dim,
            "channels": self.channels,
            "refine": self.refine,
            "training": self.training_info,
        }
        return config, {"generator": self.state_dict()}

    @classmethod
    def from_pretrained_state(
        cls, config: dict[str, Any], tensors: dict[str, dict[str, Tensor]], **kwargs: Any
    ) -> DigitGenerator:
        model = cls(config["latent_dim"], config["channels"], bool(config.get("refine", False)))
        _load_strict(model, tensors["generator"], "the saved generator")
        model.training_info = dict(config.get("training", {}))
        return model.eval().requires_grad_(False)


class DigitDiscriminator(nn.Module):
    """Spectrally normalised critic: (N, 1, 28, 28) -> one real-valued score per digit.

    ``conv 4x4 /2 (channels) -> conv 4x4 /2 (2 channels) -> linear``, leaky ReLU (0.2);
    with ``deep=True`` a 3 x 3 convolution follows each strided one (four convolutions, so
    the linear head judges features of features); every weight divided by its largest
    singular value (one power iteration per call).
    """

    def __init__(self, channels: int = 32, deep: bool = False) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", low=1)
        if not isinstance(deep, bool):
            raise TypeError(f"deep must be a bool, got {type(deep).__name__}")
        self.deep = deep
        sn = nn.utils.parametrizations.spectral_norm
        c = channels
        layers: list[nn.Module] = []
        for c_in, c_out in ((1, c), (c, 2 * c)):
            layers += [sn(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            if deep:
                layers += [sn(nn.Conv2d(c_out, c_out, 3, padding=1)), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.head = sn(nn.Linear(2 * c * 49, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).flatten(1)).squeeze(1)


@dataclass
class GANTrainConfig:
    """Everything that defines a GAN training run (saved with every checkpoint)."""

    steps: int = 16_000  # one step: a critic update, then a generator update
    batch_size: int = 64  # real digits per critic step (and latents per update)
    latent_dim: int = 128  # z ~ N(0, I) in R^latent_dim
    g_channels: int = 128  # generator channels at 7 x 7
    g_refine: bool = True  # DigitGenerator(refine=...): 3 x 3 layers at 14 x 14 and 28 x 28
    d_channels: int = 32  # critic channels at 14 x 14 (twice that at 7 x 7)
    d_deep: bool = True  # DigitDiscriminator(deep=...): a 3 x 3 layer after each strided one
    lr: float = 2e-4  # Adam, both networks; constant until decay_from ...
    beta1: float = 0.5
    beta2: float = 0.999
    ema_decay: float = 0.999  # generator weights averaged for sampling
    decay_from: float = 0.5  # ... then linear to 0 over the last half of the steps
    shift: int = 2  # pixels of random translation seen by the critic
    seed: int = 0  # initial weights, data order and every draw
    ckpt_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "latent_dim", "g_channels", "d_channels"):
            check_int(getattr(self, name), name, low=1)
        for name in ("ckpt_every", "keep_checkpoints"):
            check_int(getattr(self, name), name, low=1)
        check_int(self.shift, "shift", low=0, high=13)
        check_int(self.seed, "seed", low=0)
        check_real(self.lr, "lr", low=0.0, low_open=True)
        for name in ("beta1", "beta2", "ema_decay", "decay_from"):
            check_real(getattr(self, name), name, low=0.0, high=1.0, high_open=True)


def _stream(seed: int, *keys: int) -> torch.Generator:
    """A generator for one (seed, step or epoch, purpose) triple, independent of the others."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def shift_images(x: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """Each image of ``x`` (N, 1, H, W) moved by its own random offset: pixel ``(i, j)`` of
    the result is pixel ``(i + dy - pad, j + dx - pad)`` of the input with
    ``dy, dx ~ U{0..2 pad}``, background (-1) where that falls outside. The critic sees real
    and generated digits only through this (``docs/guides/hubness.md``, "The GAN")."""
    if pad == 0:
        return x
    n, _, h, w = x.shape
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1, 1), generator=generator)
    rows = torch.arange(h).view(1, h, 1) + dy
    cols = torch.arange(w).view(1, 1, w) + dx
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    return padded[torch.arange(n).view(n, 1, 1), 0, rows, cols].unsqueeze(1)


def critic_hinge_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """``L_D = mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``."""
    return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()


def _load_strict(module: nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{what} does not fit: {str(err).splitlines()[0]}") from err


class _GANRun:
    """The state of one training run: models, EMA, optimisers, step; checkpoint I/O."""

    def __init__(self, config: GANTrainConfig, images: Tensor) -> None:
        self.config = config
        self.images = images
        with torch.random.fork_rng(devices=[]):  # initial weights depend on the seed only
            torch.manual_seed(config.seed)
            self.g = DigitGenerator(config.latent_dim, config.g_channels, config.g_refine)
            self.d = DigitDiscriminator(config.d_channels, config.d_deep)
        self.ema = copy.deepcopy(self.g).requires_grad_(False)
        betas = (config.beta1, config.beta2)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=config.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=config.lr, betas=betas)
        self.step = 0

    def batch(self, step: int) -> Tensor:
        n, size = len(self.images), self.config.batch_size
        epoch, within = divmod(step, n // size)
        order = torch.randperm(n, generator=_stream(self.config.seed, epoch, 0))
        return self.images[order[within * size : (within + 1) * size]]

    def lr_at(self, step: int) -> float:
        """``lr``, then a linear decay to 0 over the last ``1 - decay_from`` of the steps."""
        cfg = self.config
        tail = (1 - cfg.decay_from) * cfg.steps
        return cfg.lr * min(1.0, (cfg.steps - step) / tail) if tail > 0 else cfg.lr

    def train_step(self) -> tuple[float, float]:
        cfg = self.config
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = self.lr_at(self.step)
        gen = _stream(cfg.seed, self.step, 1)
        real = self.batch(self.step)
        z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=gen)
        with torch.no_grad():
            fake = self.g(z)
        d_loss = critic_hinge_loss(
            self.d(shift_images(real, cfg.shift, gen)), self.d(shift_images(fake, cfg.shift, gen))
        )
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=gen)
        g_loss = -self.d(shift_images(self.g(z), cfg.shift, gen)).mean()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        self.step += 1
        with torch.no_grad():  # EMA warm-up: early averages forget the random init quickly
            decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
            e: Tensor  # a parameter, then a buffer
            for e, p in zip(self.ema.parameters(), self.g.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
            for e, b in zip(self.ema.buffers(), self.g.buffers(), strict=True):
                e.copy_(b)
        return float(d_loss.detach()), float(g_loss.detach())

    # -------------------------------------------------------------- checkpoints
    def save(self, out: Path) -> Path:
        """Checkpoint ``OUT/checkpoints/step-XXXXXXXX`` (written aside, renamed into place,
        then ``latest.json`` moved to it), keeping the newest ``keep_checkpoints``."""
        root = out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.step:08d}"
        tmp = root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tensors, groups = {}, {}
        for key, opt in (("opt_g", self.opt_g), ("opt_d", self.opt_d)):
            state = opt.state_dict()
            tensors[key] = {f"{i}/{k}": v for i, s in state["state"].items() for k, v in s.items()}
            groups[key] = state["param_groups"]
        tensors |= {
            "g": self.g.state_dict(),
            "d": self.d.state_dict(),
            "ema": self.ema.state_dict(),
        }
        config = {"step": self.step, "train": asdict(self.config), "param_groups": groups}
        save_folder(
            tmp, kind=_CHECKPOINT_KIND, version=1, config=config, tensors=tensors, extra="hubness"
        )
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        write_json_atomic(root / "latest.json", {"step": self.step, "dir": name})
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[
            : -self.config.keep_checkpoints
        ]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, folder: Path) -> None:
        config, tensors = load_folder(folder, kind=_CHECKPOINT_KIND, version=1, extra="hubness")
        _load_strict(self.g, tensors["g"], f"the generator of {folder}")
        _load_strict(self.d, tensors["d"], f"the discriminator of {folder}")
        _load_strict(self.ema, tensors["ema"], f"the EMA generator of {folder}")
        for key, opt in (("opt_g", self.opt_g), ("opt_d", self.opt_d)):
            state: dict[int, dict[str, Tensor]] = {}
            for flat, value in tensors[key].items():
                index, entry = flat.split("/")
                state.setdefault(int(index), {})[entry] = value
            opt.load_state_dict({"state": state, "param_groups": config["param_groups"][key]})
        self.step = int(config["step"])


def latest_gan_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint folder ``OUT/checkpoints/latest.json`` points to, or None."""
    pointer = Path(out) / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return None
    try:
        return pointer.parent / json.loads(pointer.read_text())["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{pointer} is unreadable ({err}); the run cannot resume") from err


@torch.no_grad()
def standing_statistics(
    model: DigitGenerator, *, batches: int = 40, batch_size: int = 500, seed: int = 0
) -> DigitGenerator:
    """Recompute the batch-norm statistics of ``model`` as exact averages over
    ``batches`` batches of ``z ~ N(0, I)`` (for EMA weights, whose running statistics
    were collected with other weights); returns ``model`` in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        model(torch.randn(batch_size, model.latent_dim, generator=gen))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    return model.eval()


def train_gan(
    out_dir: str | os.PathLike,
    config: GANTrainConfig | None = None,
    *,
    resume: bool = False,
    steps: int | None = None,
    images: Tensor | None = None,
    progress: bool = True,
    command: str = "",
) -> DigitGenerator:
    """Train :class:`DigitGenerator` on the 4,000 training digits of ``mnist5k``.

    A new run (``resume=False``) needs an ``out_dir`` without checkpoints; ``resume=True``
    continues ``out_dir`` from its latest checkpoint (``steps`` may extend it). Checkpoints
    every ``config.ckpt_every`` steps and at the end; the final EMA generator, with
    batch-norm statistics recomputed (:func:`standing_statistics`), is written to
    ``OUT/generator`` with :meth:`~DigitGenerator.save_pretrained` and returned.
    ``images`` (N, 1, 28, 28) in ``[-1, 1]`` replaces the digits (tests).
    """
    out = Path(out_dir)
    latest = latest_gan_checkpoint(out)
    if resume:
        if latest is None:
            raise ValueError(f"{out} holds no GAN checkpoint to resume; start without resume")
        saved, _ = load_folder(latest, kind=_CHECKPOINT_KIND, version=1, extra="hubness")
        # runs saved before a key existed: the layout they were trained with
        config = GANTrainConfig(**{"g_refine": False, "d_deep": False, **saved["train"]})
    else:
        if latest is not None:
            raise ValueError(f"{out} already holds a run; resume it or choose a new folder")
        config = config or GANTrainConfig()
    if steps is not None:
        config.steps = check_int(steps, "steps", low=1)
    if images is None:
        from kexue.datasets import mnist5k_split

        train_images, _ = mnist5k_split()["train"]
        images = train_images[:, None] * 2 - 1
    images = check_tensor(images, "images", floating=True, ndim=4).float()
    if tuple(images.shape[1:]) != (1, 28, 28) or len(images) < config.batch_size:
        raise ValueError(
            f"images must have shape (N, 1, 28, 28) with N >= batch_size={config.batch_size}, "
            f"got {tuple(images.shape)}"
        )
    run = _GANRun(config, images)
    if resume:
        run.load(cast(Path, latest))  # checked above: resume needs a checkpoint
    start, first = time.perf_counter(), run.step
    d_avg = g_avg = math.nan
    status = TextColumn("{task.fields[status]}")
    with progress_bar(status, disable=not progress) as bar:
        task = bar.add_task("GAN training", total=config.steps, completed=run.step, status="")
        while run.step < config.steps:
            d_loss, g_loss = run.train_step()
            d_avg = d_loss if math.isnan(d_avg) else 0.98 * d_avg + 0.02 * d_loss
            g_avg = g_loss if math.isnan(g_avg) else 0.98 * g_avg + 0.02 * g_loss
            rate = (run.step - first) / max(time.perf_counter() - start, 1e-9)
            status_text = f"D {d_avg:6.3f} · G {g_avg:6.3f} · {rate:5.2f} it/s"
            bar.update(task, advance=1, status=status_text)
            if run.step % config.ckpt_every == 0 or run.step == config.steps:
                run.save(out)
    final = standing_statistics(copy.deepcopy(run.ema), seed=config.seed)
    final.training_info = {
        "data": "mnist5k train split (4,000 digits)",
        "step": run.step,
        "config": asdict(config),
        "command": command,
    }
    final.save_pretrained(out / "generator")
    return final.requires_grad_(False)
