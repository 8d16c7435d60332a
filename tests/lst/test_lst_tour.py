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
