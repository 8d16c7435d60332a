"""The latent-prior comparison of kexue.experiments.hub_prior, stand-in generator and scorer."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import pytest
import torch

from kexue.experiments.hub_prior import (
    METRICS,
    LatentPrior,
    compare_latent_priors,
    draw_latents,
    hub_prior_claims,
    interpolate_curve,
    paired_differences,
    prior_study,
    quality_diversity_figure,
    sampling_table_rows,
    summarize_study,
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


def _stand_in(z: torch.Tensor) -> torch.Tensor:
    return z.flatten(1)


class _Scorer:
    """Stand-in for DigitEvaluator: the 'features' are the images themselves."""

    def __init__(self, dim: int) -> None:
        self.reference_features = torch.randn(300, dim, generator=torch.Generator().manual_seed(9))
        self.classifier = None

    def __call__(self, images: torch.Tensor):
        norm = float(images.norm(dim=1).mean())
        return SimpleNamespace(
            frechet=norm,
            confidence=0.5,
            label_entropy=1.0,
            precision=1 / norm,
            recall=0.1,
            histogram=[len(images)] + [0] * 9,
        )


def test_norm_matched_latents_have_the_hub_norms_and_other_directions():
    hub, _ = draw_latents(LatentPrior("hub", 15), 30, (12,), seed=3, pool_size=500)
    matched, info = draw_latents(LatentPrior("matched", 15), 30, (12,), seed=3, pool_size=500)
    torch.testing.assert_close(matched.norm(dim=1), hub.norm(dim=1))
    cosines = (matched * hub).sum(1) / hub.norm(dim=1) ** 2
    assert cosines.abs().max() < 0.99  # not the hub latents themselves
    assert info["candidates"] % 500 == 0 and info["candidates"] >= 500
    random, _ = draw_latents(LatentPrior("random"), 30, (12,), seed=3)
    assert matched.norm(dim=1).mean() < random.norm(dim=1).mean()  # hubs are short


def test_paired_differences_by_hand():
    rows = [
        {"prior": p, "seed": s, **dict.fromkeys(METRICS, v)}
        for p, s, v in [("a", 0, 1.0), ("a", 1, 3.0), ("b", 0, 0.5), ("b", 1, 0.0), ("b", 2, 9.0)]
    ]
    d = paired_differences(rows, "a", "b")
    assert d["seeds"] == [0, 1]  # seed 2 has no partner
    assert d["frechet"]["diffs"] == [0.5, 3.0]
    assert d["frechet"]["mean"] == 1.75
    sd = (((0.5 - 1.75) ** 2 + (3.0 - 1.75) ** 2) / 1) ** 0.5  # n - 1 in the denominator
    assert d["frechet"]["sd"] == pytest.approx(sd)
    assert d["frechet"]["se"] == pytest.approx(sd / 2**0.5)
    with pytest.raises(ValueError, match="no seed has rows"):
        paired_differences(rows, "a", "c")


def test_prior_study_and_summary(monkeypatch):
    import kexue.diffusion as diffusion

    # the stand-in scorer's features are the images; Fréchet by the float64 formula
    monkeypatch.setattr(diffusion, "classify", lambda model, images: (images, None))
    monkeypatch.setattr(diffusion, "frechet_distance", lambda a, b: float(a.mean() - b.mean()))
    priors = [LatentPrior("random"), LatentPrior("hub", 12), LatentPrior("truncate", 1.0)]
    rows = prior_study(_stand_in, _Scorer(6), priors, 20, (6,), (0, 1), pool_size=200, bootstrap=5)
    assert [(r["prior"], r["seed"]) for r in rows] == [(p.label, s) for p in priors for s in (0, 1)]
    assert all(r["frechet_bootstrap_sd"] > 0 for r in rows)
    assert rows[2]["candidates_per_latent"] == rows[2]["candidates"] / 20
    summary = summarize_study(rows)
    assert [s["prior"] for s in summary] == [p.label for p in priors]
    hub = summary[1]
    values = [r["frechet"] for r in rows[2:4]]
    assert hub["frechet"] == pytest.approx(sum(values) / 2)
    assert hub["frechet_sd"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert hub["family"] == "hub" and summary[2]["family"] == "truncation"


def _row(prior, frechet, precision, recall, kind="hub", value=None):
    return {
        "prior": prior,
        "kind": kind,
        "value": value,
        "frechet": frechet,
        "precision": precision,
        "recall": recall,
    }


TRUNCATION = [
    _row("t1", 200.0, 0.95, 0.30, "truncate", 1.0),
    _row("t2", 60.0, 0.85, 0.70, "truncate", 2.0),
]
NOISE = {"frechet": 2.0, "precision": 0.01, "recall": 0.02}


def test_interpolated_truncation_recall():
    # precision 0.90 is half way between the two psi values: recall half way, 0.50; 0.93
    # is a fifth of the way from psi = 1 (0.95) to psi = 2 (0.85): 0.30 + 0.2 * 0.40
    assert interpolate_curve(TRUNCATION, "precision", 0.90, "recall") == pytest.approx(0.5)
    assert interpolate_curve(TRUNCATION, "precision", 0.93, "recall") == pytest.approx(0.38)
    assert interpolate_curve(TRUNCATION, "precision", 0.97, "recall") is None


@pytest.mark.parametrize(
    ("hub", "statuses"),
    [
        # better Fréchet and precision; recall 0.6 > 0.5 at precision 0.9; better than matched
        (_row("h", 40.0, 0.90, 0.60), ["holds", "holds", "holds"]),
        # better precision only, Fréchet worse: the DDIM pattern
        (_row("h", 70.0, 0.90, 0.45), ["does not hold", "does not hold", "does not hold"]),
        # better precision, Fréchet within the noise; recall within the noise of the curve
        (_row("h", 49.0, 0.90, 0.51), ["partly", "does not hold", "partly"]),
        # precision between psi = 2 and random latents (psi = infinity): recall 0.76 there;
        # lower precision than the norm-matched row
        (_row("h", 40.0, 0.82, 0.79), ["holds", "holds", "does not hold"]),
        # precision beyond every truncation row: no comparison possible
        (_row("h", 40.0, 0.99, 0.60), ["holds", "measured", "holds"]),
    ],
)
def test_hub_prior_claims_follow_the_numbers(hub, statuses):
    random = _row("random", 50.0, 0.80, 0.80, "random")
    matched = _row("m", 50.0, 0.85, 0.70, "matched")
    claims = hub_prior_claims(hub, random, TRUNCATION, NOISE, matched)
    assert [c[1] for c in claims] == statuses
    assert "Fréchet" in claims[0][2] and claims[0][0].startswith("h: better")
