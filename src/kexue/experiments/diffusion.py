"""Experiments on the shipped diffusion model, shared by the tour and the benchmarks.

The tour's ``diffusion`` and ``optimal-variance`` sections and ``benchmarks/diffusion_sampling.py``
/ ``benchmarks/optimal_variance.py`` run the same experiments at different sizes: loading the
shipped model, the samplers compared (fixed against optimal variances), the variances scored by
the NLL bound, sample-quality rows, throughput, the exact Gaussian-mixture testbed on digits, and
the plot of the ``sbar_t^2`` estimates. Each function takes its randomness explicitly (a
generator, a seed or ``x_T``), so callers keep their own order of random draws.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from kexue.diffusion import (
    DiffusionMoments,
    DiffusionTrainConfig,
    DigitEvaluator,
    NoiseSchedule,
    Trainer,
    UNet,
    classify,
    estimate_moments,
    fixed_variance,
    frechet_distance,
    optimal_variance,
    sample,
)
from kexue.diffusion.solver_statistics import (
    SolverStatistics,
    SolverSums,
    accumulate_solver_sums,
    model_fingerprint,
    statistics_grid,
)
from kexue.testing.diffusion import GaussianMixture

SHIPPED = "mnist5k"
IMAGE_SHAPE = (1, 28, 28)
FORMS = ("gamma", "moment", "mle")
QUALITY_HEADERS = ["Fréchet", "confidence", "label entropy", "precision", "recall"]


def shipped_model(device: torch.device | str | None = None) -> UNet:
    """The shipped MNIST-5k model (EMA weights, eval mode), with ``schedule`` and ``info``."""
    model = UNet.from_pretrained(SHIPPED)
    return model if device is None else model.to(device)


# How the shipped statistics of the shipped model were estimated (docs/guides/few-step.md,
# "Measured"): 128 training digits x 16 grid steps, finite differences, about 11 minutes of
# one loaded CPU core; s and b kept where the pairs resolve them.
SHIPPED_STATISTICS: dict[str, Any] = {
    "num_images": 128,
    "grid": 16,
    "seed": 1234,
    "subset_seed": 0,
    "method": "finite-difference",
    "max_standard_error": 0.05,
}


def shipped_statistics_sums(
    model: UNet, *, progress: bool = False, **overrides: Any
) -> tuple[SolverSums, dict[str, Any]]:
    """The sums behind the shipped :class:`SolverStatistics` of ``model`` (the settings of
    :data:`SHIPPED_STATISTICS`, each overridable): training images ``randperm(seed
    subset_seed)[:num_images]`` of mnist5k, every one at every grid step, the noise of pair
    ``(image, step)`` keyed by ``seed``. Returns ``(sums, settings)``."""
    from kexue.diffusion import load_images

    settings = SHIPPED_STATISTICS | overrides
    schedule = cast(NoiseSchedule, model.schedule)  # the shipped model carries it
    images = load_images(SHIPPED).train
    grid = statistics_grid(schedule, settings["grid"])
    gen = torch.Generator().manual_seed(settings["subset_seed"])
    chosen = torch.randperm(len(images), generator=gen)[: settings["num_images"]].sort().values
    pairs = torch.stack(
        [chosen.repeat(len(grid)), torch.tensor(grid).repeat_interleave(len(chosen))], 1
    )
    sums = accumulate_solver_sums(
        model, schedule, images, pairs, seed=settings["seed"], grid=grid,
        method=settings["method"], progress=progress,
    )  # fmt: skip
    return sums, settings


def shipped_statistics(
    model: UNet, sums: SolverSums, settings: dict[str, Any], seconds: float | None = None
) -> SolverStatistics:
    """The statistics shipped for ``model`` from :func:`shipped_statistics_sums`, recording the
    settings and the model's fingerprint (what ``sample(solver="dpm-solver-v3")`` matches)."""
    info = {
        "kind": f"{SHIPPED} model statistics",
        **{k: v for k, v in settings.items() if k != "max_standard_error"},
        "model": SHIPPED,
        "model_fingerprint": model_fingerprint(model),
        "recipe": "kexue.experiments.diffusion.shipped_statistics_sums",
    }
    if seconds is not None:
        info["seconds"] = round(seconds, 1)
    return sums.statistics(
        cast(NoiseSchedule, model.schedule), max_standard_error=settings["max_standard_error"],
        num_images=settings["num_images"], info=info,
    )  # fmt: skip


def quality_row(evaluator: DigitEvaluator, images: Tensor) -> list[float]:
    """``[Fréchet, confidence, label entropy, precision, recall]`` of ``images`` (see
    :data:`QUALITY_HEADERS`)."""
    q = evaluator(images)
    return [q.frechet, q.confidence, q.label_entropy, q.precision, q.recall]


def frechet_bootstrap_se(
    evaluator: DigitEvaluator, images: Tensor, reps: int, seed: int = 0
) -> float:
    """Bootstrap standard error of the Fréchet distance over the generated images."""
    if reps < 2:
        return 0.0
    feats, _ = classify(evaluator.classifier, images)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(reps):
        idx = torch.randint(0, len(feats), (len(feats),), generator=gen)
        values.append(frechet_distance(feats[idx], evaluator.reference_features))
    return float(torch.tensor(values).std())


def compared_samplers(
    moments: DiffusionMoments, schedule: NoiseSchedule, K: int
) -> list[tuple[str, float, Tensor | None]]:
    """``(name, eta, variance)`` of the four samplers compared at ``K`` steps: DDPM (its small
    variance), Analytic-DDPM, DDIM and Analytic-DDIM (the optimal variance for each eta). Every
    variance is a per-step tensor on the even trajectory the variance builders use (DDIM's is
    zero), so ``sample`` runs all four on the same steps."""
    return [
        ("DDPM", 1.0, fixed_variance(schedule, K, "small")),
        ("Analytic-DDPM", 1.0, optimal_variance(moments, schedule, K, eta=1.0)),
        ("DDIM", 0.0, torch.zeros(K, dtype=torch.float64)),
        ("Analytic-DDIM", 0.0, optimal_variance(moments, schedule, K, eta=0.0)),
    ]


def decoder_variance(
    moments: DiffusionMoments,
    schedule: NoiseSchedule,
    steps: int | Sequence[int] | None,
    kind: str = "analytic",
) -> Tensor:
    """The optimal variance as the NLL bound needs it: eta = 1, a decoder at the last jump,
    no second-to-last cap."""
    return optimal_variance(
        moments, schedule, steps, kind=kind, eta=1.0, last_step="decoder", cap_second_last=None
    )


def nll_variances(
    moments: DiffusionMoments,
    schedule: NoiseSchedule,
    steps: int | Sequence[int] | None,
    *,
    mle: bool = False,
) -> dict[str, str | Tensor]:
    """The variances whose NLL bounds are compared (scored on the same draws by ``nll_bpd``):
    DDPM's small and large ones and Analytic-DDPM (and its imperfect-mean form if ``mle``)."""
    out: dict[str, str | Tensor] = {
        "DDPM-small": "small",
        "DDPM-large": "large",
        "Analytic-DDPM": decoder_variance(moments, schedule, steps),
    }
    if mle:
        out["Analytic-DDPM (MLE)"] = decoder_variance(moments, schedule, steps, "analytic-mle")
    return out


def generate(
    eps_model: torch.nn.Module,
    schedule: NoiseSchedule,
    K: int,
    eta: float,
    variance: Any,
    n: int,
    seed: int,
) -> Tensor:
    """``n`` samples of 28x28 digits, returned on the CPU: ``x_T`` and the per-step noise come
    from one CPU generator seeded ``seed`` (so every device starts from the same ``x_T``; on
    an accelerator the per-step noise comes from a generator of that device)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(eps_model.parameters()).device
    x_T = torch.randn((n, *IMAGE_SHAPE), generator=gen).to(device)
    if device.type != "cpu":
        gen = torch.Generator(device).manual_seed(seed)
    images = sample(
        eps_model,
        schedule,
        (n, *IMAGE_SHAPE),
        steps=K if K < schedule.T else None,
        eta=eta,
        variance=variance,
        x_T=x_T,
        generator=gen,
        progress=False,
    )
    assert isinstance(images, Tensor)  # no trajectory asked for
    return images.cpu()


def training_images_per_s(steps: int, data: str = SHIPPED) -> float:
    """Training throughput (images/s) of the default U-Net at batch 64 after 2 warm-up steps
    (a throw-away run folder; nothing is kept)."""
    with tempfile.TemporaryDirectory(prefix="kexue-train-speed-") as out:
        config = DiffusionTrainConfig(data=data, steps=2, ckpt_every=10**6, sample_every=0)
        trainer = Trainer(config, out)
        trainer.train(progress=False)  # warm-up
        trainer.config.steps = 2 + steps
        return trainer.train(progress=False)["images_per_s"]


def forward_images_per_s(model: torch.nn.Module, batch: int = 250, repeats: int = 3) -> float:
    """Forward (inference) throughput of ``model`` on 28x28 digits, images/s."""
    device = next(model.parameters()).device
    x = torch.randn(batch, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.randint(1, 1001, (batch,), generator=torch.Generator().manual_seed(1)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        model(x, t)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x, t)
        sync()
    return repeats * batch / (time.perf_counter() - start)


def digit_mixture(images: Tensor, labels: Tensor, std: float = 0.25) -> GaussianMixture:
    """The exact testbed on digits: 10 isotropic Gaussians at the class means of ``images``,
    weighted by the class frequencies, each with standard deviation ``std``."""
    means = torch.stack([images[labels == c].double().mean(0) for c in range(10)])
    weights = torch.bincount(labels, minlength=10).double()
    return GaussianMixture(weights, means, std)


def mixture_truth(
    mixture: GaussianMixture,
    schedule: NoiseSchedule,
    steps: Sequence[int],
    n: int,
    generator: torch.Generator,
) -> Tensor:
    """``E Var[x_0 | x_t]`` averaged over dimensions at each of ``steps`` (Monte Carlo over
    ``n`` draws of ``x_t``, the conditional variance exact per draw), float64."""
    return torch.tensor(
        [float(mixture.true_sbar2(schedule, t, n, generator)[0].mean()) for t in steps],
        dtype=torch.float64,
    )


def plot_sbar2_estimates(
    ax: Any, moments: DiffusionMoments, steps: Sequence[int], style: str = ".-"
) -> None:
    """The three raw estimates of ``sbar_t^2`` (Gamma, moment and MLE forms), the default
    clipped one and the upper bound against ``t``, on a log axis (``style``: the raw forms'
    matplotlib format, ``"-"`` for many steps)."""
    idx = torch.tensor(list(steps)) - 1
    for form, color in zip(FORMS, ("C0", "C1", "C2"), strict=True):
        raw = moments.raw_sbar2(form)[idx].clamp_min(1e-7)
        ax.plot(steps, raw, style, color=color, lw=0.8, label=f"{form} form (raw)")
    default = moments.sbar2("analytic")[idx].clamp_min(1e-7)
    ax.plot(steps, default, "k-", lw=1.5, label="default, clipped")
    ax.plot(steps, moments.upper_bound()[idx], color="grey", ls="--", label="upper bound")
    ax.set(
        yscale="log",
        xlabel="step t",
        ylabel="sbar_t^2 (per pixel, [-1, 1] scale)",
        title="E Var[x_0 | x_t], estimated from the moments",
    )
    ax.legend(fontsize=8)


def first_true_step(mask: Tensor) -> int | None:
    """The first ``t`` (1-based) where ``mask`` holds, or None."""
    hits = mask.nonzero()
    return int(hits[0]) + 1 if len(hits) else None


def log_interpolated_crossing(points: Sequence[tuple[int, float]], target: float) -> float | None:
    """The ``K`` at which a decreasing curve ``(K, value)`` first reaches ``target``,
    interpolated linearly in ``(log K, log value)`` between the bracketing points."""
    for (k0, v0), (k1, v1) in itertools.pairwise(points):
        if v0 > target >= v1:
            frac = (math.log(v0) - math.log(target)) / (math.log(v0) - math.log(v1))
            return math.exp(math.log(k0) + frac * (math.log(k1) - math.log(k0)))
    return None


# ---------------------------------------------------------------------- few-step samplers
# the optimal reverse variance (Analytic-DPM) on trailing steps, eta = 1 and 0
ANALYTIC_FEW_STEP = ("Analytic-DDPM trailing", "Analytic-DDIM trailing")
KEXUE_FEW_STEP = ("DDPM even", "DDPM trailing", "DDIM even", "DDIM quadratic", "DDIM trailing",
                  *ANALYTIC_FEW_STEP, "DPM-Solver-v3")  # fmt: skip
PEER_FEW_STEP = ("DPM-Solver++ 2M", "DPM-Solver++ 3M", "DPM-Solver++ 2M SDE", "UniPC")
DETERMINISTIC = ("DDIM even", "DDIM trailing", "DPM-Solver-v3", "DPM-Solver++ 2M",
                 "DPM-Solver++ 3M", "UniPC")  # fmt: skip


def peer_scheduler(name: str) -> Any:
    """A fresh diffusers scheduler for a peer row, configured as diffusers recommends for few
    steps ("trailing" timesteps); ``sample`` replaces its noise schedule by the model's."""
    import diffusers

    if name == "diffusers DDIM trailing":
        return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True,
                                       timestep_spacing="trailing")  # fmt: skip
    if name in ("DPM-Solver++ 2M", "DPM-Solver++ 3M"):
        return diffusers.DPMSolverMultistepScheduler(
            solver_order=int(name[-2]), algorithm_type="dpmsolver++", timestep_spacing="trailing"
        )
    if name == "DPM-Solver++ 2M SDE":
        return diffusers.DPMSolverMultistepScheduler(
            solver_order=2, algorithm_type="sde-dpmsolver++", timestep_spacing="trailing"
        )
    if name == "UniPC":
        return diffusers.UniPCMultistepScheduler(solver_order=3, timestep_spacing="trailing")
    raise ValueError(f"unknown peer sampler {name!r}")


def few_step_moments(
    model: torch.nn.Module, data: Tensor, Ks: Sequence[int], num_images: int, seed: int = 0
) -> DiffusionMoments:
    """The moments the Analytic rows need: ``num_images`` digits of ``data`` at the steps of
    the trailing trajectories of ``Ks`` only (a few dozen steps instead of all ``T``)."""
    schedule = cast(NoiseSchedule, model.schedule)
    steps = sorted({t for K in Ks for t in schedule.trajectory(K, spacing="trailing")})
    device = next(model.parameters()).device
    return estimate_moments(model, schedule, data, num_images=num_images, timesteps=steps,
                            generator=torch.Generator().manual_seed(seed), progress=False,
                            device=device)  # fmt: skip


def few_step_kwargs(
    name: str,
    statistics: SolverStatistics | None = None,
    moments: DiffusionMoments | None = None,
    schedule: NoiseSchedule | None = None,
    K: int | None = None,
) -> dict[str, Any]:
    """The ``sample`` arguments of a few-step row (kexue's or a peer's); the Analytic rows
    need ``moments``, the ``schedule`` and ``K`` for their per-step variance."""
    if name.startswith("Analytic-"):  # "Analytic-DDPM trailing": DDPM/DDIM + optimal variance
        if moments is None or schedule is None or K is None:
            raise ValueError(f"the row {name!r} needs moments, the schedule and K")
        eta, spacing = (1.0 if "DDPM" in name else 0.0), name.split()[1]
        variance = optimal_variance(moments, schedule, K, eta=eta, spacing=spacing)
        return {"eta": eta, "spacing": spacing, "variance": variance}
    if name.startswith(("DDPM ", "DDIM ")):  # "DDPM even", "DDIM trailing", ...
        return {"eta": 1.0 if name.startswith("DDPM") else 0.0, "spacing": name.split()[1]}
    if name == "DPM-Solver-v3":
        return {"solver": "dpm-solver-v3", "statistics": statistics}
    return {"solver": peer_scheduler(name)}


def few_step_images(
    model: torch.nn.Module,
    name: str,
    K: int,
    x_T: Tensor,
    seed: int,
    statistics: SolverStatistics | None = None,
    batch: int = 250,
    moments: DiffusionMoments | None = None,
) -> Tensor:
    """Images of the row ``name`` at ``K`` model calls from the initial noise ``x_T`` (CPU),
    in batches; the per-step noise of stochastic rows comes from a generator seeded ``seed``
    (on the model's device)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    out = []
    for start in range(0, len(x_T), batch):
        chunk = x_T[start : start + batch].to(device)
        schedule = cast(NoiseSchedule, model.schedule)  # a kexue UNet with its schedule
        kwargs = few_step_kwargs(name, statistics, moments, schedule, K)
        images = sample(model, schedule, chunk.shape, steps=K, x_T=chunk, generator=gen,
                        progress=False, **kwargs)  # fmt: skip
        assert isinstance(images, Tensor)  # no trajectory asked for
        out.append(images.cpu())
    return torch.cat(out)
