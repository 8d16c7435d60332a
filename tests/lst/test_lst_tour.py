"""The tour section ``lst`` (about two minutes on 2 cores: marked slow)."""

from __future__ import annotations

import json

import pytest

from kexue.experiments.lst import MIN_ABS_MEAN, vader_lexicon
from kexue.tour.runner import SECTIONS, run_tour


def test_section_is_registered():
    assert SECTIONS["lst"] == "kexue.tour.sections.lst"


def test_vader_lexicon_ships_with_the_wheel():
    words, means = vader_lexicon()
    assert len(words) > 7000 and len(words) == len(means)
    assert all(-4.0 <= m <= 4.0 for m in means)
    assert sum(abs(m) >= MIN_ABS_MEAN for m in means) > 5000


@pytest.mark.slow
def test_tour_lst_writes_figures_and_numbers(tmp_path):
    run_tour(["lst"], tmp_path, progress=False)
    data = json.loads((tmp_path / "results.json").read_text())["sections"]["lst"]
    assert {f["path"] for f in data["figures"]} == {"lst-memory-time.png", "lst-gates.png"}
    for f in data["figures"]:
        assert (tmp_path / f["path"]).read_bytes()[:4] == b"\x89PNG"
    numbers = data["numbers"]
    assert 0.5 < numbers["LST accuracy"] <= 1.0
    assert numbers["LST trainable"] < numbers["full fine-tuning trainable"] / 20


def _numbers(memory: float, step: float, lst_acc: float, full_acc: float = 0.9) -> dict:
    return {
        "memory ratio LST / full": memory,
        "step time ratio LST / full": step,
        "LST accuracy": lst_acc,
        "full fine-tuning accuracy": full_acc,
        "LST trainable": 318584,
        "full fine-tuning trainable": 22713986,
    }


def test_claims_follow_from_the_numbers():
    """Each verdict is the paper's threshold applied to the measured number: memory <= 0.31x
    full's, step <= 0.5x, accuracy within 1 point (partly: within 3 points / below 1x)."""
    from kexue.tour.sections.lst import section_claims

    def statuses(*args) -> list[str]:
        return [c.status for c in section_claims(_numbers(*args))]

    assert statuses(0.30, 0.15, 0.895) == ["holds", "holds", "holds", "measured"]
    assert statuses(0.33, 0.6, 0.887) == ["partly", "partly", "partly", "measured"]
    assert statuses(1.2, 1.5, 0.85) == ["does not hold"] * 3 + ["measured"]
    assert statuses(0.31, 0.5, 0.89)[:3] == ["holds"] * 3  # the thresholds themselves
    assert statuses(0.5, 0.2, 0.92)[2] == "holds"  # LST above full fine-tuning
    claims = section_claims(_numbers(0.33, 0.15, 0.898, 0.911))
    assert claims[0].key_number == "0.33x full fine-tuning's peak training memory"
    assert claims[2].key_number == "89.8% vs 91.1% (1.3 points below)"
    above = section_claims(_numbers(0.33, 0.15, 0.906, 0.901))[2]
    assert above.status == "holds" and above.key_number == "90.6% vs 90.1% (0.5 points above)"
    assert claims[3].key_number == "1.40% of full fine-tuning's"
