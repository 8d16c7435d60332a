"""The diffusion section's claims follow from its numbers (computed, never hard-coded), and its
grid figure has no empty bands."""

from __future__ import annotations

import pytest
import torch

from kexue.tour.sections.diffusion import section_claims, strip_figure


def numbers(**changes: float) -> dict[str, float]:
    base = {
        "real training digits K=- Fréchet": 17.0,
        "DDIM K=25 confidence": 0.92,
        "DDIM K=25 Fréchet": 25.0,
        "DDIM K=10 Fréchet": 43.0,
        "DDPM K=10 Fréchet": 52.0,
        "DDIM trailing K=5 Fréchet": 60.0,
        "DDIM even K=5 Fréchet": 90.0,
        "DPM-Solver-v3 K=5 Fréchet": 30.0,
        "UniPC K=5 Fréchet": 31.0,
        "DPM-Solver-v3 K=10 Fréchet": 14.0,
        "UniPC K=10 Fréchet": 14.5,
        "DDIM trailing K=10 Fréchet": 23.0,
    }
    return base | changes


def statuses(**changes: float) -> list[str]:
    return [c.status for c in section_claims(numbers(**changes))]


def test_verdicts_follow_the_numbers():
    assert statuses() == ["holds"] * 4
    assert statuses(**{"DDIM K=25 confidence": 0.85})[0] == "partly"
    assert statuses(**{"DDIM K=25 confidence": 0.5})[0] == "does not hold"
    assert statuses(**{"DDIM K=10 Fréchet": 60.0})[1] == "does not hold"
    assert statuses(**{"DDIM trailing K=5 Fréchet": 95.0})[2] == "does not hold"
    assert statuses(**{"DPM-Solver-v3 K=5 Fréchet": 40.0})[3] == "partly"
    assert statuses(**{"DPM-Solver-v3 K=10 Fréchet": 15.0})[3] == "partly"
    assert (
        statuses(**{"DPM-Solver-v3 K=5 Fréchet": 40.0, "DPM-Solver-v3 K=10 Fréchet": 15.0})[3]
        == "does not hold"
    )


def test_key_numbers_quote_the_measurements():
    claims = section_claims(numbers(**{"UniPC K=5 Fréchet": 27.84}))
    assert "27.8 (UniPC)" in claims[3].key_number and "30.0 (v3)" in claims[3].key_number


def teststrip_figure_rows_are_as_tall_as_their_grids():
    """Each row's axes is as tall (relative to its width) as its image grid, so the figure has
    no empty bands: a row of 8 images is half as tall as a row of 16 (two rows of 8)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    rows = [("a", torch.zeros(8, 1, 28, 28)), ("b", torch.zeros(16, 1, 28, 28))]
    fig = strip_figure(rows, nrow=8)
    fig.canvas.draw()
    heights = [ax.get_window_extent().height for ax in fig.axes]
    widths = [ax.get_window_extent().width for ax in fig.axes]
    plt.close(fig)
    assert widths[0] == pytest.approx(widths[1], rel=0.02)
    ratio = heights[1] / heights[0]
    assert 1.6 < ratio < 2.1, ratio
