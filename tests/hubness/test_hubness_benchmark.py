"""The hubness benchmark's smoke plan: every CPU part at toy sizes, measured into a temporary
folder (JSON beside the page) and rendered; re-rendering from the JSON alone gives the same
page (slow: minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/hubness.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_hubness_smoke_plan(tmp_path):
    _bench("--plan", "smoke", "--out", str(tmp_path))
    results = json.loads((tmp_path / "hubness.json").read_text())
    assert results["plan"] == "smoke"
    assert {"knn", "large", "sampling", "gan"} <= set(results)
    gan = results["gan"]
    assert len(gan["rows"]) == len(gan["summary"]) * len(gan["seeds"])
    page = (tmp_path / "hubness.md").read_text()
    assert "## 1. Exact k-occurrence" in page and "## 3. Hub-prior latents" in page
    assert "## 5. The hub prior on GAN latents" in page
    assert "## Does the hub prior's claim hold?" in page and "**GAN latents**" in page
    for name in ("quality-diversity", "gan-quality-diversity", "gan-samples"):
        assert (tmp_path / f"hubness-{name}.png").stat().st_size > 0
    _bench("--plan", "smoke", "--out", str(tmp_path), "--render-only")
    assert (tmp_path / "hubness.md").read_text() == page
