"""benchmarks/few_step.py's smoke plan: measures to JSON, renders the page from the JSON alone
(slow: about a minute on 2 CPU cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> None:
    out = subprocess.run([sys.executable, "benchmarks/few_step.py", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_few_step_smoke_plan(tmp_path):
    _bench("--plan", "smoke", "--out", str(tmp_path))
    results = json.loads((tmp_path / "few_step.json").read_text())
    assert results["plan"] == "smoke"
    names = {r["sampler"] for r in results["quality"]}
    assert {"DDIM trailing", "Analytic-DDIM trailing", "DPM-Solver-v3", "UniPC"} <= names
    # the same initial noise: first-order deterministic solvers agree at K = 2 with DDIM
    by = {(r["sampler"], r["K"]): r["frechet"] for r in results["quality"]}
    assert by[("DPM-Solver++ 2M", 2)] == pytest.approx(by[("DDIM trailing", 2)], rel=1e-3)
    page = (tmp_path / "few_step.md").read_text()
    assert "samples per row" in page and "## Goals, as measured" in page
    assert (tmp_path / "few-step-convergence.png").read_bytes()[:4] == b"\x89PNG"
    _bench("--plan", "smoke", "--render-only", "--out", str(tmp_path))
    assert (tmp_path / "few_step.md").read_text() == page
    # an extension plan adds rows at a new K and keeps the stored ones as measured
    _bench("--plan", "smoke-extend", "--no-lock", "--out", str(tmp_path))
    extended = json.loads((tmp_path / "few_step.json").read_text())
    assert extended["config"]["Ks"] == [2, 3, 4]
    assert [r for r in extended["quality"] if r["K"] != 4] == results["quality"]
    assert {r["sampler"] for r in extended["quality"] if r["K"] == 4} == names
    assert extended["quality_from"]["command"] == results["command"]
    page = (tmp_path / "few_step.md").read_text()
    assert "## K = 4 model calls" in page and "Rows at K = 4 added by" in page
    # a rows extension re-measures named rows at the stored steps from the same noise: the
    # Analytic row comes out as it was (moments and sampling are seeded), the rest untouched
    _bench("--plan", "smoke-rows", "--no-lock", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "few_step.json").read_text())
    name = "Analytic-DDPM trailing"
    fd = {(r["sampler"], r["K"]): r["frechet"] for r in rows["quality"]}
    for K in (2, 3, 4):
        assert fd[(name, K)] == pytest.approx(
            next(r["frechet"] for r in extended["quality"] if (r["sampler"], r["K"]) == (name, K))
        )
    others = [r for r in rows["quality"] if r["sampler"] != name]
    assert others == [r for r in extended["quality"] if r["sampler"] != name]
    assert (
        rows["moments"]["num_images"] == 8
        and "The rows Analytic-DDPM trailing (at K = 2, 3, 4)"
        in (tmp_path / "few_step.md").read_text()
    )


def _few_step_module():
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))  # for its `_common`
    try:
        spec = importlib.util.spec_from_file_location(
            "few_step_bench", ROOT / "benchmarks" / "few_step.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


@pytest.mark.parametrize(("sde_at_10", "below"), [(16.0, True), (20.5, False)])
def test_goals_compare_the_best_peer_at_k10_with_the_converged_ode_range(sde_at_10, below):
    bench = _few_step_module()
    ode = {name: 20.0 + i / 2 for i, name in enumerate(bench.DETERMINISTIC)}  # 20.0 ... 22.5
    rows = []
    for K in (5, 10, 50):
        for name in bench.ROWS:
            fd = ode.get(name, 30.0) if K == 50 else 25.0
            if name == "DPM-Solver++ 2M SDE":
                fd = sde_at_10 if K == 10 else 13.0
            rows.append({"sampler": name, "K": K, "frechet": fd, "frechet_se": 1.0,
                         "seconds_per_image": 1.0})  # fmt: skip
    lines = bench.goals({"quality": rows, "config": {"Ks": [5, 10, 50]}})
    limit = next(line for line in lines if line.startswith("The ODE's own limit"))
    assert "K = 50 the deterministic solvers score 20.0 to 22.5" in limit
    assert ("is below that range" in limit) is below


def test_analytic_rows_take_their_eta_and_spacing(monkeypatch) -> None:
    """ "Analytic-DDPM trailing" samples with eta = 1, "Analytic-DDIM trailing" with eta = 0,
    both on trailing steps with the optimal variance of that eta."""
    import kexue.experiments.diffusion as ed

    calls = []
    monkeypatch.setattr(ed, "optimal_variance", lambda *a, **kw: calls.append(kw) or "var")
    for name, eta in (("Analytic-DDPM trailing", 1.0), ("Analytic-DDIM trailing", 0.0)):
        kwargs = ed.few_step_kwargs(name, None, moments="m", schedule="s", K=5)
        assert kwargs == {"eta": eta, "spacing": "trailing", "variance": "var"}
        assert calls[-1] == {"eta": eta, "spacing": "trailing"}
    with pytest.raises(ValueError, match="needs moments"):
        ed.few_step_kwargs("Analytic-DDIM trailing", None)
