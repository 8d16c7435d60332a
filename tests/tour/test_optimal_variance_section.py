"""The optimal-variance section's claims: verdicts computed from the measured numbers."""

from __future__ import annotations

from kexue.tour.sections.optimal_variance import NLL_KS, QUALITY_KS, section_claims


def numbers(**changes: float) -> dict[str, float]:
    base: dict[str, float] = {}
    for K in NLL_KS:
        base |= {f"NLL K={K} DDPM-small": 50.0, f"NLL K={K} DDPM-large": 6.0,
                 f"NLL K={K} Analytic-DDPM": 4.0}  # fmt: skip
    for K in QUALITY_KS:
        base |= {f"DDPM K={K} Fréchet": 60.0, f"Analytic-DDPM K={K} Fréchet": 50.0,
                 f"DDIM K={K} Fréchet": 70.0, f"Analytic-DDIM K={K} Fréchet": 65.0}  # fmt: skip
    return base | changes


def statuses(**changes: float) -> list[str]:
    return [c.status for c in section_claims(numbers(**changes))]


def test_verdicts_follow_the_numbers() -> None:
    assert statuses() == ["holds"] * 3
    # the bound is judged against the better of the two fixed variances
    assert statuses(**{"NLL K=10 DDPM-large": 3.9})[0] == "partly"
    worse = {f"NLL K={K} Analytic-DDPM": 7.0 for K in NLL_KS}
    assert statuses(**worse)[0] == "does not hold"
    assert statuses(**{"Analytic-DDPM K=5 Fréchet": 61.0}) == ["holds", "partly", "holds"]
    worse = {f"Analytic-DDIM K={K} Fréchet": 70.0 for K in QUALITY_KS}  # a tie is no win
    assert statuses(**worse)[2] == "does not hold"


def test_baseline_numbers_of_the_shipped_model() -> None:
    """The numbers of the tour before the keyed noise (seed 0): bound holds, samples partly."""
    base = numbers(**{"DDPM K=5 Fréchet": 170.46, "Analytic-DDPM K=5 Fréchet": 173.79,
                      "DDPM K=10 Fréchet": 47.97, "Analytic-DDPM K=10 Fréchet": 48.24})  # fmt: skip
    claims = section_claims(base)
    assert [c.status for c in claims] == ["holds", "partly", "holds"]
    assert "K = 5: 173.8 against 170.5" in claims[1].key_number
    assert "K = 10: 4.00 against 6.00 bits/dim" in claims[0].key_number
