"""Exact testbeds for kexue.diffusion: data whose optimal eps-model and posterior are known.

Everything here is written from the formulas of ``docs/guides/diffusion.md`` and
``docs/guides/optimal-variance.md`` directly, in float64, without calling the code under test
(only :class:`~kexue.diffusion.NoiseSchedule`'s ``abar``/``bbar`` tables are read):

- :func:`point_eps`: the exact eps-model of data that is a single point ``x*``;
- :func:`gaussian_eps`: the exact eps-model of ``N(0, s^2 I)`` data (linear in ``x_t``), and
  :func:`gaussian_posterior_variance`, the closed form of ``Var[x_0 | x_t]``;
- :class:`GaussianMixture`: a mixture of isotropic Gaussians with its exact posterior
  ``p(x_0 | x_t)`` (a mixture again), exact eps-model and exact ``E Var[x_0 | x_t]``;
- :func:`reference_sample`: the reverse process of the DDIM family written from the posterior
  ``q(x_s | x_t, x_0)`` (the mean as ``c x_t + gamma x0_hat``, not the sampler's
  ``abar_s x0_hat + c eps``), drawing its noise in the sampler's documented order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from kexue.diffusion.schedule import NoiseSchedule

__all__ = [
    "DISTRIBUTED_SOLVER_WORKER",
    "DISTRIBUTED_WORKER",
    "GaussianMixture",
    "distributed_problem",
    "distributed_results",
    "distributed_solver_results",
    "gaussian_eps",
    "gaussian_posterior_variance",
    "perturbed_model",
    "point_eps",
    "reference_sample",
]

EpsModel = Callable[[Tensor, Tensor], Tensor]


def _at(schedule: NoiseSchedule, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    view = (-1,) + (1,) * (x.ndim - 1)
    a = schedule.abar.to(x.dtype)[t].view(view)
    b = schedule.bbar.to(x.dtype)[t].view(view)
    return a, b


def point_eps(schedule: NoiseSchedule, point: Tensor) -> EpsModel:
    """Exact eps-model when the data is the single point ``point``:
    ``eps = (x_t - abar_t x*) / bbar_t`` (computed in ``x_t``'s dtype)."""

    def eps(x: Tensor, t: Tensor) -> Tensor:
        a, b = _at(schedule, t, x)
        return (x - a * point.to(x.dtype)) / b

    return eps


def gaussian_eps(schedule: NoiseSchedule, std: float) -> EpsModel:
    """Exact eps-model for data ``N(0, std^2 I)``:
    ``E[eps | x_t] = bbar_t x_t / (abar_t^2 std^2 + bbar_t^2)`` (in ``x_t``'s dtype)."""

    def eps(x: Tensor, t: Tensor) -> Tensor:
        a, b = _at(schedule, t, x)
        return b * x / (a**2 * std**2 + b**2)

    return eps


def gaussian_posterior_variance(schedule: NoiseSchedule, std: float) -> Tensor:
    """``Var[x_0 | x_t] = std^2 bbar_t^2 / (abar_t^2 std^2 + bbar_t^2)`` for ``t = 1..T``
    (float64, shape ``(T,)``): the same for every ``x_t`` and every dimension."""
    a, b = schedule.abar.double()[1:], schedule.bbar.double()[1:]
    return std**2 * b**2 / (a**2 * std**2 + b**2)


class GaussianMixture:
    """``p(x_0) = sum_k w_k N(mu_k, s_k^2 I)`` on images of ``shape`` (float64).

    Given ``x_t = a x_0 + b eps``, component ``k`` has ``x_t ~ N(a mu_k, (a^2 s_k^2 + b^2) I)``
    and ``x_0 | x_t, k ~ N(mu_k + a s_k^2 / (a^2 s_k^2 + b^2) (x_t - a mu_k),
    s_k^2 b^2 / (a^2 s_k^2 + b^2) I)``; the posterior is the mixture of these with the
    components' responsibilities.
    """

    def __init__(self, weights: Sequence[float] | Tensor, means: Tensor, stds) -> None:
        self.w = torch.as_tensor(weights, dtype=torch.float64)
        self.mu = torch.as_tensor(means, dtype=torch.float64)  # (k, *shape)
        self.s = torch.as_tensor(stds, dtype=torch.float64).expand(len(self.w)).clone()
        if self.mu.shape[0] != len(self.w):
            raise ValueError("means need one row per weight")
        self.w = self.w / self.w.sum()
        self.shape = tuple(self.mu.shape[1:])

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` draws ``(n, *shape)``: components first, then the Gaussian noise."""
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        return self.mu[k] + self.s[k].view((-1,) + (1,) * len(self.shape)) * z

    def posterior(self, x_t: Tensor, a: Tensor | float, b: Tensor | float):
        """Per-dimension ``E[x_0 | x_t]`` and ``Var[x_0 | x_t]`` (each shaped like ``x_t``);
        ``a, b`` (``abar_t``, ``bbar_t``) are numbers or broadcast to ``(n, 1, ..., 1)``."""
        x_t = x_t.double()
        n, nd = len(x_t), len(self.shape)
        col = (n,) + (1,) * nd
        a = torch.broadcast_to(torch.as_tensor(a, dtype=torch.float64), col)[:, None]
        b = torch.broadcast_to(torch.as_tensor(b, dtype=torch.float64), col)[:, None]
        s2 = (self.s**2).view((1, -1) + (1,) * nd)
        total = a**2 * s2 + b**2  # (n, k, 1, ...): Var x_t per dim within component k
        r = x_t[:, None] - a * self.mu[None]  # (n, k, *shape)
        quad = (r**2 / total).flatten(2).sum(2)
        log_det = math.prod(self.shape) * torch.log(total.flatten(2)[:, :, 0])
        resp = torch.softmax(torch.log(self.w)[None] - 0.5 * (quad + log_det), 1)
        resp = resp.view((n, -1) + (1,) * nd)
        means = self.mu[None] + (a * s2 / total) * r
        mean = (resp * means).sum(1)
        second = (resp * (s2 * b**2 / total + means**2)).sum(1)
        return mean, second - mean**2

    def eps_model(self, schedule: NoiseSchedule) -> EpsModel:
        """The exact eps-model ``(x_t - abar_t E[x_0 | x_t]) / bbar_t`` (float64 out)."""

        def eps(x: Tensor, t: Tensor) -> Tensor:
            x = x.double()
            view = (-1,) + (1,) * (x.ndim - 1)
            a = schedule.abar.double()[t].view(view)
            b = schedule.bbar.double()[t].view(view)
            mean, _ = self.posterior(x, a, b)
            return (x - a * mean) / b

        return eps

    def true_sbar2(
        self, schedule: NoiseSchedule, t: int, n: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Monte Carlo over ``x_t`` of ``E Var[x_0 | x_t]`` per dimension (the conditional
        variance exact for each draw): ``(estimate, standard error)``, each of ``shape``."""
        x0 = self.sample(n, generator)
        a, b = schedule.abar.double()[t], schedule.bbar.double()[t]
        x_t = a * x0 + b * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        _, var = self.posterior(x_t, a, b)
        return var.mean(0), var.std(0) / math.sqrt(n)


def reference_sample(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    steps: Sequence[int],
    eta: float,
    x_T: Tensor,
    variances: Sequence[float | Tensor],
    generator: torch.Generator,
) -> Tensor:
    """The DDIM-family reverse process from ``x_T`` in float64, written from the posterior
    ``q(x_s | x_t, x_0) = N(c/bbar_t x_t + gamma x_0, sigma^2)`` with ``c = sqrt(bbar_s^2 -
    sigma^2)``, ``gamma = abar_s - abar_t c / bbar_t`` and ``x_0 -> x0_hat``; the noise of jump
    ``i`` (from ``steps[i]``) has variance ``variances[i]`` and is one ``randn`` of ``x_T``'s
    shape from ``generator``, drawn at every jump, from the top step down."""
    abar, bbar = schedule.abar.tolist(), schedule.bbar.tolist()
    kept = [0, *steps]
    x = x_T.double()
    for i in range(len(steps), 0, -1):
        t, s = kept[i], kept[i - 1]
        sigma2 = eta**2 * (bbar[s] / bbar[t]) ** 2 * (1 - abar[t] ** 2 / abar[s] ** 2)
        c = math.sqrt(max(bbar[s] ** 2 - sigma2, 0.0))
        gamma = abar[s] - abar[t] * c / bbar[t]
        eps = eps_model(x, torch.full((len(x),), t, dtype=torch.long)).double()
        x0_hat = (x - bbar[t] * eps) / abar[t]
        z = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        std = torch.as_tensor(variances[i - 1], dtype=torch.float64).sqrt()
        x = c / bbar[t] * x + gamma * x0_hat + std * z
    return x


def tiny_diffusers_unet(seed: int = 0) -> torch.nn.Module:
    """A tiny random diffusers ``UNet2DModel`` on 1 x 8 x 8 images (eval mode), the diffusers
    model of the tests (needs the ``diffusion`` extra)."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    return cast(torch.nn.Module, unet).eval()  # diffusers' ModelMixin is an nn.Module


def distributed_problem(T: int = 20) -> dict:
    """A small fixed problem for the many-process checks: an untrained tiny U-Net (seeded),
    its schedule, 12 training and 7 held-out 8-bit images of shape (1, 8, 8), and 9 random
    28x28 images with a seeded digit classifier (the sample-quality features)."""
    from kexue.diffusion.evaluate import DigitClassifier
    from kexue.diffusion.unet import UNet

    schedule = NoiseSchedule.su_linear(T)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = UNet(channels=8, channel_mults=(1, 2), blocks=1, T=T).eval()
        classifier = DigitClassifier().eval()
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (19, 1, 8, 8), generator=gen).double()
    images = pixels / 127.5 - 1
    digits = torch.rand((9, 1, 28, 28), generator=gen) * 2 - 1
    return {"model": model, "schedule": schedule, "train": images[:12], "heldout": images[12:],
            "classifier": classifier, "digits": digits}  # fmt: skip


def distributed_results(problem: dict) -> dict[str, Tensor]:
    """What the many-process checks compare: moments (with per-image values), the NLL bound of
    two variances and the classifier features, all computed with kexue's public functions
    (split over the processes when a ``torch.distributed`` group is initialised)."""
    from kexue.diffusion.evaluate import classify
    from kexue.diffusion.likelihood import nll_bpd
    from kexue.diffusion.moments import estimate_moments

    model, schedule = problem["model"], problem["schedule"]
    moments = estimate_moments(
        model, schedule, problem["train"], num_images=10, batch_size=7, keep_per_image=True,
        generator=torch.Generator().manual_seed(2), progress=False,
    )  # fmt: skip
    nll = nll_bpd(
        model, schedule, problem["heldout"], steps=4, variance={"small": "small", "large": "large"},
        batch_size=2, generator=torch.Generator().manual_seed(3), progress=False,
    )  # fmt: skip
    assert isinstance(nll, dict)  # several variances, one result each
    features, probs = classify(problem["classifier"], problem["digits"], batch_size=2)
    fields = ("Gamma", "Gamma_sq", "moment", "err", "eps2", "moment_diag", "err_diag")
    out = {f"moments.{k}": getattr(moments, k) for k in fields}
    out.update({f"per_image.{k}": v for k, v in (moments.per_image or {}).items()})
    for name, res in nll.items():
        out[f"nll.{name}.per_image"] = res.bpd_per_image
        out[f"nll.{name}.bpd"] = torch.tensor(res.bpd, dtype=torch.float64)
    out["features"], out["probs"] = features, probs
    return out


# Run by ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N <this text as
# a file> OUT`` (torchrun under the hood: accelerate's ``--cpu`` alone starts one process unless
# MPI is set up); each process saves its results to OUT/rank<i>.pt.
DISTRIBUTED_WORKER = """
import sys

import torch
from accelerate import PartialState

state = PartialState(cpu=True)  # joins the gloo group the launcher prepared
torch.set_num_threads(1)
from kexue.testing.diffusion import distributed_problem, distributed_results

results = distributed_results(distributed_problem())
results["world_size"] = torch.tensor(state.num_processes)
torch.save(results, f"{sys.argv[1]}/rank{state.process_index}.pt")
state.wait_for_everyone()
"""


def perturbed_model(problem: dict, scale: float = 0.1, seed: int = 6) -> torch.nn.Module:
    """A copy of the problem's untrained U-Net with seeded noise (std ``scale``) added to every
    parameter: the untrained U-Net's zero-initialised output layers make its eps exactly 0,
    which every split of the work reproduces trivially."""
    import copy

    model = copy.deepcopy(problem["model"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model


def distributed_solver_results(problem: dict, global_seed: int = 11) -> dict[str, Tensor]:
    """What the many-process check of the solver statistics compares, on
    :func:`perturbed_model`: ``l, s, b`` of :func:`~kexue.diffusion.estimate_solver_statistics`
    by both methods from a seeded generator, and (``"global.*"``) with ``generator=None`` after
    ``torch.manual_seed(global_seed)`` (the seed and image subset must then be rank 0's); and
    (``"perturbed.*"``) :func:`distributed_results` of the same model, whose eps is not 0."""
    from kexue.diffusion.solver_statistics import estimate_solver_statistics

    model, schedule, train = perturbed_model(problem), problem["schedule"], problem["train"]
    out: dict[str, Tensor] = {}
    runs = [("jvp", "jvp", torch.Generator().manual_seed(4)),
            ("finite-difference", "finite-difference", torch.Generator().manual_seed(5)),
            ("global", "finite-difference", None)]  # fmt: skip
    for name, method, generator in runs:
        if generator is None:
            torch.manual_seed(global_seed)
        statistics = estimate_solver_statistics(
            model, schedule, train, num_images=9, grid=5, method=method, batch_size=7,
            generator=generator, progress=False,
        )  # fmt: skip
        for key in ("steps", "l", "s", "b"):
            out[f"{name}.{key}"] = getattr(statistics, key)
        out[f"{name}.seed"] = torch.tensor(statistics.info["seed"])
        out[f"{name}.num_images"] = torch.tensor(statistics.num_images)
    others = distributed_results({**problem, "model": model})
    out.update(
        {f"perturbed.{k}": v for k, v in others.items() if not k.startswith(("features", "probs"))}
    )
    return out


# The same for the solver statistics; rank r seeds its global generator with 11 + r, so the
# generator=None run agrees with one process only if rank 0's seed and subset are used.
DISTRIBUTED_SOLVER_WORKER = """
import sys

import torch
from accelerate import PartialState

state = PartialState(cpu=True)
torch.set_num_threads(1)
from kexue.testing.diffusion import distributed_problem, distributed_solver_results

results = distributed_solver_results(distributed_problem(), 11 + state.process_index)
results["world_size"] = torch.tensor(state.num_processes)
torch.save(results, f"{sys.argv[1]}/rank{state.process_index}.pt")
state.wait_for_everyone()
"""


def launch_worker(source: str, folder: Path, processes: int) -> list[dict[str, Tensor]]:
    """Run the worker script ``source`` (one of the ``DISTRIBUTED_*WORKER`` texts) on
    ``processes`` CPU processes under ``accelerate launch`` and return each rank's saved
    results (``folder/rank{r}.pt``). ``accelerate``'s ``--cpu`` alone starts one process unless
    MPI is set up: torchrun (``--multi_gpu``) with ``ACCELERATE_USE_CPU`` starts CPU processes
    joined by gloo."""
    import os
    import subprocess
    import sys

    from kexue.distributed import free_port

    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        raise FileNotFoundError(f"the accelerate command is not installed beside {sys.executable}")
    script = folder / "worker.py"
    script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), str(folder)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{processes} processes failed:\n{done.stderr[-3000:]}")
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(processes)]
