"""The ops tour section's claims follow from its numbers (each verdict flips with them)."""

from __future__ import annotations

from kexue.tour.sections.ops import INEQUALITIES, section_claims


def _numbers(**changes: float) -> dict:
    numbers = {k: 0.0 for k in INEQUALITIES}
    numbers |= {
        "smooth_max(max_error=0.01) worst error, n=100": 0.0015,
        "smooth_max(max_error=0.01) smallest error, n=100": -4e-16,
        "time ratio 256 x 1000, masked, 30% dropped": 0.32,
        "time ratio 256 x 1000, plain, N(0,1)": 1.1,
        "time ratio 256 x 10000, masked, 30% dropped": 0.24,
    }
    return numbers | changes


def test_claims_hold_on_good_numbers() -> None:
    claims = section_claims(_numbers())
    assert [c.status for c in claims] == ["holds"] * 4
    assert "1.10x" in claims[2].key_number


def test_each_claim_fails_when_its_number_does() -> None:
    bad = [
        {INEQUALITIES[3]: -1e-6},
        {"smooth_max(max_error=0.01) worst error, n=100": 0.011},
        {"time ratio 256 x 1000, plain, N(0,1)": 1.35},
        {"time ratio 256 x 10000, masked, 30% dropped": 1.01},
    ]
    for index, change in enumerate(bad):
        statuses = [c.status for c in section_claims(_numbers(**change))]
        assert statuses[index] == "does not hold", change
        assert statuses.count("holds") == 3
