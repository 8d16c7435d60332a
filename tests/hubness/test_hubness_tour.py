"""The tour's hubness section: its claims follow from its numbers."""

from __future__ import annotations

import pytest

from kexue.tour.sections.hubness import CLAIMED, SECTION_PRIORS, section_claims


def _rows(hub_frechet: float, hub_recall: float) -> list[dict]:
    values = {
        "random N(0, I)": (50.0, 0.80, 0.80),
        "random N(0, I) (seed +1)": (52.0, 0.81, 0.79),  # noise: 2.0, 0.01, 0.01
        "hub prior, N_5 >= 20": (45.0, 0.85, 0.78),
        CLAIMED: (hub_frechet, 0.90, hub_recall),
        "norm-matched to N_5 >= 50": (49.0, 0.85, 0.70),
        "truncated, psi = 1": (200.0, 0.95, 0.30),
        "truncated, psi = 1.5": (120.0, 0.92, 0.45),
        "truncated, psi = 2": (60.0, 0.85, 0.70),
        "truncated, psi = 2.5": (52.0, 0.82, 0.78),
    }
    rows = []
    for prior in SECTION_PRIORS:
        frechet, precision, recall = values[prior.label]
        rows.append(
            {
                "prior": prior.label,
                "kind": prior.kind,
                "value": prior.value,
                "frechet": frechet,
                "precision": precision,
                "recall": recall,
            }
        )
    return rows


NUMBERS = {
    "k-skewness, k=5, d=2": 0.1,
    "k-skewness, k=5, d=512": 9.3,
    "Spearman(N_5, distance to centre), d=512": -0.88,
}


@pytest.mark.parametrize(
    ("frechet", "recall", "statuses"),
    [
        # recall at precision 0.90 on the truncation curve: 0.45 + (0.70 - 0.45) * 2 / 7
        (40.0, 0.70, ["holds", "holds", "holds"]),
        # precision up but Fréchet worse beyond the noise: the DDIM pattern
        (70.0, 0.40, ["does not hold", "does not hold", "does not hold"]),
        # precision up, Fréchet within the noise
        (51.0, 0.40, ["partly", "does not hold", "partly"]),
    ],
)
def test_claims_follow_the_numbers(frechet, recall, statuses):
    claims = section_claims(NUMBERS, _rows(frechet, recall))
    assert [c.status for c in claims] == ["holds", "holds", *statuses]
    assert "9.30 at d = 512" in claims[0].key_number
    assert claims[2].text.startswith("GAN latents, hub prior, N_5 >= 50")


def test_hubness_claims_fail_when_the_numbers_do():
    flat = dict(NUMBERS) | {
        "k-skewness, k=5, d=512": 0.2,
        "Spearman(N_5, distance to centre), d=512": 0.1,
    }
    claims = section_claims(flat, _rows(40.0, 0.70))
    assert [c.status for c in claims[:2]] == ["does not hold", "does not hold"]
