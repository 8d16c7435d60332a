"""Hubness measures and hub-prior latent sampling (guide: ``docs/guides/hubness.md``).

``knn`` (exact torch, faiss exact/approximate) -> ``k_occurrence`` -> the measures of its
distribution (``Hubness`` estimator), ``HubPriorSampler`` for latent generators, and the small
digit GAN the hub prior is tested on (``DigitGenerator.from_pretrained("mnist-gan")``).
"""

from kexue.hubness.gan import DigitDiscriminator, DigitGenerator, GANTrainConfig, train_gan
from kexue.hubness.knn import Neighbors, knn, neighbor_recall
from kexue.hubness.measures import (
    MEASURES,
    Hubness,
    HubnessScores,
    antihub_occurrence,
    atkinson_index,
    gini_index,
    hub_mask,
    hub_occurrence,
    hubness_scores,
    k_occurrence,
    k_skewness,
    occurrence_counts,
    robin_hood_index,
)
from kexue.hubness.sampling import HubPriorSampler, truncated_normal_latents

__all__ = [
    "MEASURES",
    "DigitDiscriminator",
    "DigitGenerator",
    "GANTrainConfig",
    "HubPriorSampler",
    "Hubness",
    "HubnessScores",
    "Neighbors",
    "NotFittedError",
    "antihub_occurrence",
    "atkinson_index",
    "gini_index",
    "hub_mask",
    "hub_occurrence",
    "hubness_scores",
    "k_occurrence",
    "k_skewness",
    "knn",
    "neighbor_recall",
    "occurrence_counts",
    "robin_hood_index",
    "train_gan",
    "truncated_normal_latents",
]


def __getattr__(name: str) -> object:
    # scikit-learn's NotFittedError, resolved on first use: importing scikit-learn takes seconds
    if name == "NotFittedError":
        from kexue.exceptions import NotFittedError

        return NotFittedError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
