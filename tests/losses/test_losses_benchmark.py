"""``benchmarks/losses.py``: the smoke plan measures (JSON beside the page) and renders the
page; re-rendering from the JSON alone gives the same page (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/losses.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_smoke_plan_measures_and_renders(tmp_path: Path) -> None:
    _bench("--plan", "smoke", "--out", str(tmp_path))
    results = json.loads((tmp_path / "losses.json").read_text())
    assert results["plan"] == "smoke"
    for part in ("speed_default", "speed_warm_allocator"):
        assert [row[0] for row in results[part]["loss"]] == ["256 x 1000"]
        assert all(row[8] < 1e-4 for row in results[part]["loss"])  # |ZLPR - sentinel port|
    page = (tmp_path / "losses.md").read_text()
    assert "Smoke plan" in page and "## Quality on BibTeX" in page
    if results["quality"] is not None:
        assert (tmp_path / "losses-reliability.png").read_bytes()[:4] == b"\x89PNG"
    _bench("--render-only", "--out", str(tmp_path))
    assert (tmp_path / "losses.md").read_text() == page
