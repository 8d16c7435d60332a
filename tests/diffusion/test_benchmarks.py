"""The diffusion benchmarks' smoke plans: each measures (JSON beside the page) and renders the
page into a temporary folder; re-rendering from the JSON alone gives the same page (slow:
minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(script: str, *args: str) -> None:
    out = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_diffusion_sampling_smoke_plan(tmp_path):
    _bench("diffusion_sampling.py", "--plan", "smoke", "--out", str(tmp_path))
    results = json.loads((tmp_path / "diffusion.json").read_text())
    assert results["plan"] == "smoke"
    assert results["quality"]["classifier_accuracy"] > 0.95
    assert {r[0] for r in results["quality"]["rows"]} == {"DDPM", "DDIM", "real training digits"}
    page = (tmp_path / "diffusion.md").read_text()
    assert "held-out digits" in page and "| DDIM | 5 | 16 |" in page
    _bench("diffusion_sampling.py", "--render-only", "--out", str(tmp_path))
    assert (tmp_path / "diffusion.md").read_text() == page


@pytest.mark.slow
def test_optimal_variance_smoke_plan(tmp_path):
    _bench("optimal_variance.py", "--plan", "smoke", "--out", str(tmp_path))
    results = json.loads((tmp_path / "optimal_variance_smoke.json").read_text())
    assert results["plan"] == "smoke" and results["ddim_reach"] is not None
    names = {r[0] for r in results["quality"]}
    assert {"DDPM", "DDIM", "Analytic-DDPM", "Analytic-DDIM", "SN-DDIM", "NPR-DDPM"} <= names
    page = (tmp_path / "optimal_variance_smoke.md").read_text()
    assert "## The claims" in page and "## NLL bound (bits/dim) on held-out digits" in page
    for part in ("estimators", "testbed", "nll", "quality", "grids"):
        png = tmp_path / f"optimal-variance-smoke-{part}.png"
        assert png.read_bytes()[:4] == b"\x89PNG", png
    _bench("optimal_variance.py", "--plan", "smoke", "--render-only", "--out", str(tmp_path))
    assert (tmp_path / "optimal_variance_smoke.md").read_text() == page


@pytest.mark.slow
def test_gpu_check_smoke_plan(tmp_path):
    pytest.importorskip("transformers")
    _bench("gpu_check.py", "--plan", "smoke", "--out", str(tmp_path))
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["device"] == "CPU (smoke plan)"
    assert result["diffusion"][0]["max_abs_diff"] == 0.0  # the CPU against itself
    assert "## CPU (smoke plan)" in (tmp_path / "gpu.md").read_text()
