"""The latent-prior comparison of kexue.experiments.hub_prior, stand-in generator and scorer."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import torch

from kexue.experiments.hub_prior import (
    LatentPrior,
    compare_latent_priors,
    quality_diversity_figure,
    sampling_table_rows,
)

matplotlib.use("Agg")


def test_every_prior_gets_the_same_number_of_images():
    seen = []

    def generate(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.shape)
        return z.flatten(1)

    def evaluate(images: torch.Tensor):
        norm = float(images.norm(dim=1).mean())
        return SimpleNamespace(
            frechet=norm, confidence=0.5, label_entropy=1.0, precision=1 / norm, recall=0.1
        )

    priors = [
        LatentPrior("random"),
        LatentPrior("hub", 15),
        LatentPrior("truncate", 1.0),
        LatentPrior("scale", 0.5),
    ]
    rows = compare_latent_priors(
        generate, evaluate, priors, 40, (2, 8), batch_size=16, pool_size=600, keep_images=3
    )
    assert [r["n"] for r in rows] == [40] * 4
    assert [s[0] for s in seen] == [16, 16, 8] * 4  # batches of every prior
    assert [r["prior"] for r in rows] == [
        "random N(0, I)",
        "hub prior, N_5 >= 15",
        "truncated, psi = 1",
        "scaled, psi = 0.5",
    ]
    norms = {r["kind"]: r["latent_norm"] for r in rows}
    assert norms["scale"] < norms["truncate"] < norms["hub"] < norms["random"]
    assert rows[1]["rounds"] >= 1 and 0 < rows[1]["acceptance"] < 1
    assert rows[0]["images"].shape == (3, 16)
    assert len(sampling_table_rows(rows)[0]) == 7
    fig = quality_diversity_figure(rows, "test")
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
    assert all(x and y for x, y in labels)
