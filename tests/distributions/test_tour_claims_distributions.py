"""The distributions tour section's claims follow from its numbers."""

from __future__ import annotations

from kexue.tour.sections.distributions import HEADS, section_claims


def _numbers(**changes: float) -> dict:
    numbers = {
        "gumbel_vs_softmax_max_error_n10": 1e-12,
        "gumbel_vs_softmax_max_error_n100": 1e-12,
        "property_neg": 0.0,
        "property_sum": 4e-16,
        "property_order": 0,
        "property_shift": 3e-15,
        "probit_monte_carlo_max_z": 1.1,
        "sparse-uniform zero-probability classes per digit": 8.5,
        "head cost 64 x 100 probit x softmax": 20.0,
        "head cost 64 x 100 probit, pairwise form x softmax": 1400.0,
        "head cost 64 x 1000 probit x softmax": 90.0,
    }
    numbers |= {f"{h} accuracy": 0.98 for h in HEADS}
    return numbers | changes


def test_claims_hold_on_good_numbers() -> None:
    claims = section_claims(_numbers())
    assert [c.status for c in claims] == ["holds"] * 6 + ["measured"]
    assert "1.4e+03x" in claims[4].key_number


def test_each_claim_fails_when_its_number_does() -> None:
    bad = [
        {"gumbel_vs_softmax_max_error_n100": 2e-6},
        {"property_order": 1},
        {"probit_monte_carlo_max_z": 4.5},
        {"sparse-uniform zero-probability classes per digit": 0.0},
        {"head cost 64 x 100 probit x softmax": 31.0},
        {"head cost 64 x 1000 probit x softmax": 101.0},
    ]
    for index, change in enumerate(bad):
        statuses = [c.status for c in section_claims(_numbers(**change))]
        assert statuses[index] == "does not hold", change
        assert statuses.count("holds") == 5
