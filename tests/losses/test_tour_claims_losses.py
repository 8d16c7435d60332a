"""The losses tour section's claims follow from its numbers (each verdict flips with them)."""

from __future__ import annotations

from kexue.tour.sections.losses import section_claims


def _numbers(**changes: float) -> dict:
    numbers = {}
    for name, micro, macro in (("ZLPR (s>0)", 0.890, 0.612), ("BCE (tuned t)", 0.890, 0.608)):
        numbers |= {
            f"{name} micro_f1 mean": micro,
            f"{name} micro_f1 sd": 0.003,
            f"{name} macro_f1 mean": macro,
            f"{name} macro_f1 sd": 0.005,
        }
    numbers |= {
        "ECE ZLPR (s>0), sigmoid(2s)": 0.02,
        "ECE ZLPR (s>0), sigmoid(s)": 0.05,
        "speed 256 x 1000 ZLPR/BCE": 1.05,
        "speed 256 x 10000 ZLPR/BCE": 0.8,
    }
    return numbers | changes


def test_claims_hold_on_good_numbers() -> None:
    claims = section_claims(_numbers())
    assert [c.status for c in claims] == ["holds"] * 3
    assert "256 x 1000: 1.05x" in claims[2].key_number


def test_each_claim_follows_its_numbers() -> None:
    # macro-F1 more than 2 sd behind, micro level: partly; both behind: does not hold
    partly = section_claims(_numbers(**{"ZLPR (s>0) macro_f1 mean": 0.58}))
    assert partly[0].status == "partly"
    behind = {"ZLPR (s>0) macro_f1 mean": 0.58, "ZLPR (s>0) micro_f1 mean": 0.87}
    assert section_claims(_numbers(**behind))[0].status == "does not hold"
    worse = section_claims(_numbers(**{"ECE ZLPR (s>0), sigmoid(2s)": 0.06}))
    assert worse[1].status == "does not hold"
    slow = section_claims(_numbers(**{"speed 256 x 10000 ZLPR/BCE": 1.2}))
    assert slow[2].status == "does not hold" and "1.20x" in slow[2].key_number
