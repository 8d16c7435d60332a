"""The tour section ``distributions`` runs, states its claim and saves labelled figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kexue.tour import SECTIONS, run_tour


@pytest.mark.slow
def test_distributions_section(tmp_path: Path) -> None:
    assert "distributions" in SECTIONS
    (section,) = run_tour(["distributions"], tmp_path, progress=False)
    assert section.claim and section.method and "softmax" in section.verdict
    numbers = section.numbers
    assert max(numbers[f"gumbel_vs_softmax_max_error_n{n}"] for n in (10, 100)) <= 1e-6
    assert numbers["property_order"] == 0 and numbers["property_neg"] >= 0
    assert numbers["probit_monte_carlo_max_z"] <= 4
    assert numbers["sparse-uniform zero-probability classes per digit"] > 0
    assert numbers["softmax zero-probability classes per digit"] == 0
    for name in ("softmax", "probit", "sparse-uniform"):
        assert numbers[f"{name} accuracy"] > 0.9
    for fig in section.figures:
        assert (tmp_path / fig.path).read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "results.json").read_text())
    assert "distributions" in data["sections"]
