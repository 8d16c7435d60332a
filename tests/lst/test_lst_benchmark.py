"""``benchmarks/lst.py``: the smoke plan measures (JSON beside the page) and renders the page;
re-rendering from the JSON alone gives the same page (slow: about a minute)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/lst.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_smoke_plan_measures_and_renders(tmp_path):
    _bench("--plan", "smoke", "--out", str(tmp_path))
    results = json.loads((tmp_path / "lst.json").read_text())
    assert results["plan"] == "smoke" and len(results["runs"]) == 5
    assert {r["name"] for r in results["runs"]} == {
        "full fine-tuning",
        "LoRA (peft)",
        "LST, random init",
        "LST, Fisher init",
        "LST, Fisher init, cached backbone",
    }
    parallel = results["parallel"]
    assert [(r["name"], r["processes"], r["threads"]) for r in parallel] == [
        ("LST, random init", 2, 1),
        ("LST, random init", 1, 2),
    ]
    assert all(r["spec"]["device"] == "cpu" and 0 <= r["eval_accuracy"] <= 1 for r in parallel)
    page = (tmp_path / "lst.md").read_text()
    assert "## Results" in page and "Smoke plan" in page
    assert "## Data-parallel training on CPU processes" in page
    assert ("## Not run: the GPU scale run" in page) != results["cuda"]
    for png in ("lst-memory-time.png", "lst-gates.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    _bench("--render-only", "--out", str(tmp_path))
    assert (tmp_path / "lst.md").read_text() == page
