"""``benchmarks/lst.py``: the smoke plan, and the scale plan on its tiny size, measure (JSON
beside the page) and render the page; re-rendering from the JSON alone gives the same page
(slow: about a minute each)."""

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


@pytest.mark.slow
def test_scale_plan_tiny_measures_and_renders(tmp_path):
    """The scale plan on the tiny size only (about a minute): lst_scale.json and a page that
    holds its section; re-rendering from the JSON gives the same page."""
    _bench("--plan", "scale", "--sizes", "tiny", "--threads", "1", "--out", str(tmp_path))
    scale = json.loads((tmp_path / "lst_scale.json").read_text())
    assert scale["plan"] == "scale" and list(scale["sizes"]) == ["tiny"]
    assert scale["device"] == ("cuda" if scale["gpu"] else "cpu")
    names = ["full fine-tuning", "LoRA (peft)", "LST, random init"]
    if scale["bf16"]:
        names.append("LST, random init, bf16 backbone")
    runs = scale["runs"]
    assert [r["name"] for r in runs] == names
    epochs = scale["settings"]["epochs"]
    for run in runs:
        assert run["size"] == "tiny" and run["threads"] == 1
        assert run["mean_train_tokens"] == 128 and run["steps"] == 6 * epochs
        assert run["memory_mib"] >= 0 and run["step_ms"] > 0
        assert 0 < run["trainable_parameters"] <= run["all_parameters"]
    full, lst = runs[0], runs[2]
    assert full["memory_x_full"] == full["step_x_full"] == 1.0
    assert full["trainable_parameters"] == full["all_parameters"]
    assert lst["spec"]["init"] == "random" and lst["trainable_parameters"] < 10_000
    page = (tmp_path / "lst.md").read_text()
    assert "## LST at scale (backbones built from a config)" in page
    assert "| tiny | 2 × 32 | LST, random init |" in page
    assert ("the GPU scale run of issue 13 is still not done" in page) == (not scale["gpu"])
    _bench("--plan", "scale", "--render-only", "--out", str(tmp_path))
    assert (tmp_path / "lst.md").read_text() == page
    _bench("--render-only", "--out", str(tmp_path))
    assert (tmp_path / "lst.md").read_text() == page
