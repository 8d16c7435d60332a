"""Diffusion models: schedules, U-Net, training, DDPM/DDIM sampling, optimal reverse variances,
the NLL bound and sample-quality scores (``docs/guides/diffusion.md``,
``docs/guides/optimal-variance.md``)::

    from kexue.diffusion import UNet, sample

    model = UNet.from_pretrained("mnist5k")  # the shipped model; carries model.schedule
    images = sample(model, model.schedule, (16, 1, 28, 28), steps=50, eta=0.0)  # DDIM
"""

from kexue.diffusion.conditional import (
    HeadVariance,
    VarianceHead,
    VarianceHeadConfig,
    train_variance_head,
    variance_head_loss,
)
from kexue.diffusion.data import ImageData, load_images
from kexue.diffusion.evaluate import (
    DigitClassifier,
    DigitEvaluator,
    SampleQuality,
    classifier_accuracy,
    classify,
    frechet_distance,
    precision_recall,
    train_digit_classifier,
)
from kexue.diffusion.images import image_grid, save_image_grid
from kexue.diffusion.likelihood import NLLResult, nll_bpd
from kexue.diffusion.moments import DiffusionMoments, estimate_moments
from kexue.diffusion.sampler import DiffusersEpsModel, from_diffusers, resolve_steps, sample
from kexue.diffusion.schedule import NoiseSchedule, NoisyBatch
from kexue.diffusion.solver_statistics import SolverStatistics, estimate_solver_statistics
from kexue.diffusion.train import (
    DiffusionTrainConfig,
    Trainer,
    diffusion_loss,
    ema_from_checkpoint,
)
from kexue.diffusion.unet import UNet, UNetConfig
from kexue.diffusion.variance import (
    fixed_variance,
    jump_costs,
    optimal_trajectory,
    optimal_variance,
)

__all__ = [
    "DiffusersEpsModel",
    "DiffusionMoments",
    "DiffusionTrainConfig",
    "DigitClassifier",
    "DigitEvaluator",
    "HeadVariance",
    "ImageData",
    "NLLResult",
    "NoiseSchedule",
    "NoisyBatch",
    "SampleQuality",
    "SolverStatistics",
    "Trainer",
    "UNet",
    "UNetConfig",
    "VarianceHead",
    "VarianceHeadConfig",
    "classifier_accuracy",
    "classify",
    "diffusion_loss",
    "ema_from_checkpoint",
    "estimate_moments",
    "estimate_solver_statistics",
    "fixed_variance",
    "frechet_distance",
    "from_diffusers",
    "image_grid",
    "jump_costs",
    "load_images",
    "nll_bpd",
    "optimal_trajectory",
    "optimal_variance",
    "precision_recall",
    "resolve_steps",
    "sample",
    "save_image_grid",
    "train_digit_classifier",
    "train_variance_head",
    "variance_head_loss",
]
