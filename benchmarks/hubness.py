"""Benchmark of kexue.hubness -> docs/benchmarks/hubness.md (+ hubness.json, hubness-*.png).

Parts (each a plan of ``benchmarks/_common.main``; a part's numbers are merged into the
``hubness.json`` beside the page, which is rendered from every stored part):

1. ``knn``: exact k-occurrence of N = 10k i.i.d. N(0, I) points, d = 512, k = 5, float32, in
   one process: kexue (torch) vs the article's NumPy computation (|a|^2 + |b|^2 - 2ab against
   chunks of 1,000 queries, full argsort per column) vs the same with argpartition vs
   scikit-learn ``NearestNeighbors`` (brute) vs faiss exact flat, and the Gram matmul
   ``X @ X.T``, the floor of any exact all-pairs search, timed in the same run.
2. ``large``: N = 100k (torch exact all-pairs as ground truth; faiss flat on a sample of
   queries; faiss IVF and HNSW: time, recall, k-occurrence error) and N = 1M (HNSW on all
   points; recall on random queries; exact k-occurrence of random points, computed exactly by
   re-searching every query that could hold them; exact search time extrapolated).
   ``--exact-1m GPU_OUT`` compares with the exact 1M lists that the ``gpu`` part wrote.
3. ``sampling``: the shipped MNIST-5k diffusion model as a deterministic generator (DDIM,
   eta = 0, fixed K): equal numbers of images from random, hub-prior, truncated and scaled
   latents; Fréchet distance, confidence, label entropy, precision and recall.
4. ``gpu``: the torch backend on CUDA (correctness against the CPU, speed against the Gram
   floor) and the exact lists of the 1M set, written to ``--out`` (run on a GPU machine, then
   merged here with ``--import-json GPU_OUT/hubness.json``).

Plans: ``smoke`` (every CPU part at toy sizes, into a temporary folder; what the slow test
runs), ``default`` (the CPU parts 1-3), or one part by name. Heavy plans take the shared CPU
lock (``benchmarks/_common.heavy_lock``). ``--render-only`` rewrites the page from the JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy import stats

from _common import Table, command_line, machine_line, main, markdown_table, wall_seconds
from kexue.experiments.hub_prior import LatentPrior, hub_prior_claims, interpolate_curve
from kexue.experiments.machine import machine_info
from kexue.hubness import k_occurrence, k_skewness, knn, neighbor_recall, occurrence_counts
from kexue.hubness.knn import SELECTION_GROUP, smallest_k_grouped  # the selection alone

K = 5
PARTS = ("knn", "large", "sampling", "gpu", "gan", "ddim")
PLANS = ("smoke", "default", *PARTS)


# ---------------------------------------------------------------------------------------------
# peers


def numpy_article(X: np.ndarray, k: int, chunk: int = 1000) -> np.ndarray:
    """The article's computation, written from its description: squared distances of every
    point to a chunk of queries as |a|^2 + |b|^2 - 2 a.b, a full sort of each column, skip
    the first entry (the query itself, at distance about 0), count the next k."""
    n = len(X)
    sq = (X * X).sum(axis=1)
    counts = np.zeros(n, dtype=np.int64)
    for start in range(0, n, chunk):
        q = X[start : start + chunk]
        d = sq[:, None] + sq[start : start + chunk][None, :] - 2 * (X @ q.T)
        nearest = np.argsort(d, axis=0)[1 : 1 + k]
        counts += np.bincount(nearest.ravel(), minlength=n)
    return counts


def numpy_argpartition(X: np.ndarray, k: int, chunk: int = 1000) -> np.ndarray:
    """Same distances; the query's own entry set to +inf and ``argpartition`` instead of a
    full sort (the cheapest NumPy selection)."""
    n = len(X)
    sq = (X * X).sum(axis=1)
    counts = np.zeros(n, dtype=np.int64)
    for start in range(0, n, chunk):
        q = X[start : start + chunk]
        d = sq[:, None] + sq[start : start + chunk][None, :] - 2 * (X @ q.T)
        cols = np.arange(len(q))
        d[start + cols, cols] = np.inf
        nearest = np.argpartition(d, k - 1, axis=0)[:k]
        counts += np.bincount(nearest.ravel(), minlength=n)
    return counts


def sklearn_counts(X: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(X)
    idx = nn.kneighbors(return_distance=False)  # no X: each point's own entry is skipped
    return np.bincount(idx.ravel(), minlength=len(X))


# ---------------------------------------------------------------------------------------------
# part 1: exact k-occurrence at N = 10k


def part_knn(quick: bool) -> dict:
    n, d = (5000, 512) if quick else (10_000, 512)
    reps = 2 if quick else 5
    X = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    Xn = X.numpy()
    buffer = torch.empty(n, n)
    print(f"[knn] N = {n}, d = {d}, k = {K}", flush=True)
    results = {}
    results["gram_new"], _ = wall_seconds(lambda: X @ X.T, reps)
    results["gram_out"], _ = wall_seconds(functools.partial(torch.mm, X, X.T, out=buffer), reps)
    # ablation: the selection alone, on the Gram block, torch.topk vs group minima
    topk = functools.partial(torch.topk, buffer, K, dim=1, largest=False)
    results["select_topk"], _ = wall_seconds(topk, reps)
    group = SELECTION_GROUP
    width = n + (-n % (group * 16) if n >= 8192 else -n % group)
    padded = torch.full((n, width), math.inf)
    padded[:, :n] = buffer
    del buffer, topk
    results["select_groups"], _ = wall_seconds(
        functools.partial(smallest_k_grouped, padded, K, group), reps
    )
    del padded
    results["gram_numpy"], _ = wall_seconds(lambda: Xn @ Xn.T, reps)
    results["kexue"], ours = wall_seconds(lambda: k_occurrence(X, K), reps)
    results["kexue_faiss"], faiss_counts = wall_seconds(
        lambda: k_occurrence(X, K, backend="faiss"), reps
    )
    results["sklearn"], sk = wall_seconds(lambda: sklearn_counts(Xn, K), max(2, reps - 2))
    results["numpy_argpartition"], npp = wall_seconds(
        lambda: numpy_argpartition(Xn, K), 2, warmup=False
    )
    results["numpy_article"], art = wall_seconds(lambda: numpy_article(Xn, K), 2, warmup=False)
    exact = k_occurrence(X.double(), K).numpy()
    counts = {
        "kexue": ours.numpy(),
        "kexue_faiss": faiss_counts.numpy(),
        "sklearn": sk,
        "numpy_argpartition": npp,
        "numpy_article": art,
    }
    disagree = {name: int((c != exact).sum()) for name, c in counts.items()}
    return {
        "n": n,
        "d": d,
        "k": K,
        "seconds": results,
        "points_with_nk_differing_from_float64": disagree,
        "k_skewness": k_skewness(exact),
        "tie_rule": True,
        "threads": {"torch": torch.get_num_threads(), "numpy_blas": _blas_threads()},
        "command": command_line(),
    }


def _blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info

        found = {f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info()}
        return ", ".join(sorted(found))
    except ImportError:  # pragma: no cover
        return "unknown"


# ---------------------------------------------------------------------------------------------
# part 2: large N with faiss


def nk_errors(approx: np.ndarray, exact: np.ndarray, k: int) -> dict:
    diff = approx.astype(np.int64) - exact.astype(np.int64)
    hubs_a, hubs_e = approx >= 2 * k, exact >= 2 * k
    union = (hubs_a | hubs_e).sum()
    return {
        "mean_abs_error": float(np.abs(diff).mean()),
        "max_abs_error": int(np.abs(diff).max()),
        "share_points_wrong": float((diff != 0).mean()),
        "spearman": float(stats.spearmanr(approx, exact).statistic),
        "hub_jaccard": float((hubs_a & hubs_e).sum() / union) if union else 1.0,
    }


def exact_counts_of_sample(
    X: torch.Tensor, approx_distances: torch.Tensor, sample: torch.Tensor, k: int
) -> tuple[np.ndarray, int]:
    """Exact ``N_k`` of the points ``X[sample]`` without an all-pairs search.

    An approximate list holds real points, so its k-th distance ``r(y)`` is at least the exact
    k-th distance of ``y``: any ``y`` with ``x`` among its exact k nearest has
    ``|y - x| <= r(y)``. Those candidate queries ``y`` (all of ``X`` scanned against the
    sample) are searched exactly, and their exact lists counted.
    """
    radius = approx_distances[:, k - 1].double() * (1 + 1e-4) + 1e-6  # float32 slack
    S = X[sample]
    found = []
    for lo in range(0, len(X), 65536):
        dist = torch.cdist(X[lo : lo + 65536].double(), S.double())
        hit = dist <= radius[lo : lo + 65536, None]
        rows, cols = hit.nonzero(as_tuple=True)
        keep = rows + lo != sample[cols]
        found.append(rows[keep] + lo)
    candidates = torch.unique(torch.cat(found))
    counts = torch.zeros(len(sample), dtype=torch.long)
    for lo in range(0, len(candidates), 4096):
        exact = knn(X, k, rows=candidates[lo : lo + 4096]).indices
        counts += (exact[:, :, None] == sample[None, None, :]).any(dim=1).sum(dim=0)
    return counts.numpy(), len(candidates)


def _approx_row(name, X, exact_idx, exact_nk, index, params, sample_for_estimator=None):
    t0 = time.perf_counter()
    found = knn(X, K, index=index, index_params=params)
    seconds = time.perf_counter() - t0
    approx_nk = occurrence_counts(found.indices, len(X)).numpy()
    row = {
        "method": name,
        "seconds": seconds,
        "recall": neighbor_recall(found.indices, exact_idx),
        "missing_slots": int((found.indices < 0).sum()),
        "k_skewness": k_skewness(approx_nk),
        **nk_errors(approx_nk, exact_nk, K),
    }
    print(f"  {name}: {seconds:.1f} s, recall {row['recall']:.3f}", flush=True)
    if sample_for_estimator is not None:
        est, n_cand = exact_counts_of_sample(X, found.distances, sample_for_estimator, K)
        row["estimator_check"] = {
            "sample": len(sample_for_estimator),
            "candidates": n_cand,
            "max_abs_difference_from_exact": int(
                np.abs(est - exact_nk[sample_for_estimator.numpy()]).max()
            ),
        }
    return row


def million_points(n: int) -> torch.Tensor:
    """The N = 1M set: NumPy's PCG64 stream (seed 1000), the same on every machine and
    NumPy version since 1.17, so the GPU part can compute its exact neighbours elsewhere."""
    return torch.from_numpy(np.random.default_rng(1000).standard_normal((n, 512), np.float32))


def checksum(X: torch.Tensor) -> list[float]:
    return [float(X.double().sum()), float(X[::9973].double().square().sum())]


def load_exact_lists(folder: Path, X: torch.Tensor) -> tuple[np.ndarray | None, str]:
    """Exact neighbour lists of the 1M set from the GPU part, if their checksum matches."""
    meta = folder / "hubness-1m-exact.json"
    if not meta.exists():
        return None, f"no {meta}"
    info = json.loads(meta.read_text())
    mine = checksum(X)
    if not np.allclose(info["checksum"], mine, rtol=1e-9):
        return None, f"checksum mismatch: {info['checksum']} vs {mine}"
    parts = [np.load(folder / name) for name in info["files"]]
    return np.concatenate(parts).astype(np.int64), info["device"]


def part_large(quick: bool, skip_1m: bool, exact_dir: Path | None = None) -> dict:
    out: dict = {"command": command_line(), "k": K, "d": 512}
    n = 20_000 if quick else 100_000
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, 512, generator=gen)
    print(f"[large] N = {n}: exact all-pairs (torch)", flush=True)
    t0 = time.perf_counter()
    exact = knn(X, K)
    exact_seconds = time.perf_counter() - t0
    exact_nk = occurrence_counts(exact.indices, n).numpy()
    queries = torch.randperm(n, generator=gen)[: n // 10]
    t_torch_q, _ = wall_seconds(lambda: knn(X, K, rows=queries), 1, warmup=False)
    t_faiss_q, flat = wall_seconds(
        lambda: knn(X, K, rows=queries, backend="faiss"), 1, warmup=False
    )
    small = {
        "n": n,
        "exact_torch_seconds": exact_seconds,
        "exact_gflops": 2 * n * n * 513 / exact_seconds / 1e9,
        "sample_queries": len(queries),
        "torch_sample_seconds": t_torch_q,
        "faiss_flat_sample_seconds": t_faiss_q,
        "faiss_flat_recall_vs_torch": neighbor_recall(flat.indices, exact.indices[queries]),
        "k_skewness_exact": k_skewness(exact_nk),
        "hub_share_exact": float((exact_nk >= 2 * K).mean()),
        "antihub_share_exact": float((exact_nk == 0).mean()),
    }
    sample = torch.randperm(n, generator=gen)[:500]
    rows = [
        _approx_row(
            "faiss IVF (nlist 4 sqrt N, nprobe 16)",
            X,
            exact.indices,
            exact_nk,
            "ivf",
            {"nprobe": 16},
            sample,
        ),
        _approx_row(
            "faiss IVF (nlist 4 sqrt N, nprobe 64)",
            X,
            exact.indices,
            exact_nk,
            "ivf",
            {"nprobe": 64},
        ),
        _approx_row(
            "faiss HNSW (M 16, efC 40, efS 64)",
            X,
            exact.indices,
            exact_nk,
            "hnsw",
            {"M": 16, "ef_construction": 40, "ef_search": 64},
        ),
        _approx_row(
            "faiss HNSW (M 32, efC 80, efS 128; kexue default)",
            X,
            exact.indices,
            exact_nk,
            "hnsw",
            {},
        ),
    ]
    small["approximate"] = rows
    out["100k"] = small
    del X, exact
    if skip_1m:
        return out
    n = 100_000 if quick else 1_000_000
    print(f"[large] N = {n}", flush=True)
    X = million_points(n)
    params = {"M": 16, "ef_construction": 40, "ef_search": 64}
    t0 = time.perf_counter()
    found = knn(X, K, index="hnsw", index_params=params)
    hnsw_seconds = time.perf_counter() - t0
    print(f"  HNSW: {hnsw_seconds:.0f} s", flush=True)
    approx_nk = occurrence_counts(found.indices, n).numpy()
    queries = torch.randperm(n, generator=gen)[:1000]
    t0 = time.perf_counter()
    exact_q = knn(X, K, rows=queries)
    torch_q = time.perf_counter() - t0
    t0 = time.perf_counter()
    knn(X, K, rows=queries, backend="faiss")
    faiss_q = time.perf_counter() - t0
    sample = torch.randperm(n, generator=gen)[:500]
    t0 = time.perf_counter()
    sample_nk, n_cand = exact_counts_of_sample(X, found.distances, sample, K)
    estimator_seconds = time.perf_counter() - t0
    approx_sample = approx_nk[sample.numpy()]
    diff = approx_sample - sample_nk
    out["1M"] = {
        "n": n,
        "hnsw_params": params,
        "hnsw_seconds": hnsw_seconds,
        "recall_sample_queries": len(queries),
        "recall": neighbor_recall(found.indices[queries], exact_q.indices),
        "missing_slots": int((found.indices < 0).sum()),
        "torch_exact_sample_seconds": torch_q,
        "faiss_flat_sample_seconds": faiss_q,
        "torch_exact_all_extrapolated_seconds": torch_q * n / len(queries),
        "faiss_flat_all_extrapolated_seconds": faiss_q * n / len(queries),
        "k_skewness_hnsw": k_skewness(approx_nk),
        "sample_points": len(sample),
        "sample_candidates_searched": n_cand,
        "sample_estimator_seconds": estimator_seconds,
        "sample_mean_abs_error": float(np.abs(diff).mean()),
        "sample_max_abs_error": int(np.abs(diff).max()),
        "sample_share_points_wrong": float((diff != 0).mean()),
        "sample_mean_nk_exact": float(sample_nk.mean()),
        "sample_mean_nk_hnsw": float(approx_sample.mean()),
        "sample_spearman": float(stats.spearmanr(approx_sample, sample_nk).statistic),
        "sample_hub_share_exact": float((sample_nk >= 2 * K).mean()),
        "sample_hub_share_hnsw": float((approx_sample >= 2 * K).mean()),
    }
    if exact_dir is not None:
        exact_idx, source = load_exact_lists(exact_dir, X)
        out["1M"]["exact_source"] = source
        if exact_idx is not None:
            exact_nk = np.bincount(exact_idx.ravel(), minlength=n)
            out["1M"]["full"] = {
                "recall": neighbor_recall(found.indices, torch.from_numpy(exact_idx)),
                "k_skewness_exact": k_skewness(exact_nk),
                "sample_matches_exact": bool((exact_nk[sample.numpy()] == sample_nk).all()),
                "sample_queries_match_exact": neighbor_recall(
                    exact_q.indices, torch.from_numpy(exact_idx[queries.numpy()])
                ),
                **nk_errors(approx_nk, exact_nk, K),
            }
    return out


# ---------------------------------------------------------------------------------------------
# part gpu: the torch backend on CUDA (correctness, speed) and exact lists of the 1M set


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _gpu_wall_seconds(fn, repeats: int = 3) -> float:
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_gpu(quick: bool, out_dir: Path) -> dict:
    from kexue.hubness import Hubness, HubPriorSampler

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(5)
    checks = []
    cases = [(3000, 64, 5, "euclidean"), (3000, 64, 5, "cosine"), (40_000, 24, 7, "euclidean")]
    for n, d, k, metric in cases[:2] if quick else cases:
        X = torch.randn(n, d, generator=gen, dtype=torch.float64)
        rows = torch.randperm(n, generator=gen)[:500]
        ref = knn(X, k, metric=metric, rows=rows)  # CPU, float64
        got64 = knn(X.to(dev), k, metric=metric, rows=rows.to(dev))
        got32 = knn(X.float().to(dev), k, metric=metric, rows=rows.to(dev))
        checks.append(
            {
                "case": f"N={n}, d={d}, k={k}, {metric}",
                "float64_indices_equal": bool(torch.equal(got64.indices.cpu(), ref.indices)),
                "float64_max_distance_error": float(
                    (got64.distances.cpu() - ref.distances).abs().max()
                ),
                "float32_recall": neighbor_recall(got32.indices.cpu(), ref.indices),
            }
        )
    X = torch.randn(2000, 128, generator=gen)
    hub_cpu, hub_dev = Hubness(k=(5, 10)).fit(X), Hubness(k=(5, 10)).fit(X.to(dev))
    checks.append(
        {
            "case": "Hubness(k=(5, 10)) on 2000 x 128, device vs CPU",
            "k_occurrence_equal": bool(
                torch.equal(hub_cpu.k_occurrence_, hub_dev.k_occurrence_.cpu())
            ),
        }
    )
    dev_gen = torch.Generator(device=dev).manual_seed(0)
    sampler = HubPriorSampler(
        784, threshold=50, generator=dev_gen, device=dev, progress=False
    )  # the default pool of 10,000
    t0 = time.perf_counter()
    z = sampler.sample(1000)
    _sync()
    checks.append(
        {
            "case": "HubPriorSampler(784, threshold=50).sample(1000) on the device",
            "device": str(z.device),
            "rounds": sampler.rounds_,
            "seconds": time.perf_counter() - t0,
            "all_reach_threshold": bool((sampler.hub_values_ >= 50).all()),
        }
    )
    timing = []
    for n in (10_000,) if quick else (10_000, 100_000):
        X = torch.randn(n, 512, generator=gen).to(dev)
        chunk = 4096 if n <= 10_000 else 8192
        block = torch.empty(chunk, n, device=dev)

        def floor(X=X, block=block, chunk=chunk):
            for lo in range(0, len(X), chunk):
                torch.mm(X[lo : lo + chunk], X.T, out=block[: len(X[lo : lo + chunk])])

        t_floor = _gpu_wall_seconds(floor)
        t_ours = _gpu_wall_seconds(lambda X=X, chunk=chunk: k_occurrence(X, K, chunk_size=chunk))
        timing.append({"n": n, "gram_seconds": t_floor, "kexue_seconds": t_ours})
        del X, block
    result = {
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "checks": checks,
        "timing": timing,
        "command": command_line(),
    }
    n = 20_000 if quick else 1_000_000
    X = million_points(n)
    Xd = X.to(dev)
    _sync()
    t0 = time.perf_counter()
    found = knn(Xd, K, chunk_size=8192)
    _sync()
    seconds = time.perf_counter() - t0
    idx = found.indices.cpu().numpy().astype(np.int32)
    half = (n + 1) // 2
    files = ["hubness-1m-exact-a.npy", "hubness-1m-exact-b.npy"]
    np.save(out_dir / files[0], idx[:half])
    np.save(out_dir / files[1], idx[half:])
    meta = {"checksum": checksum(X), "files": files, "n": n, "device": result["device"]}
    (out_dir / "hubness-1m-exact.json").write_text(json.dumps(meta) + "\n")
    result["exact_1m"] = {
        "n": n,
        "seconds": seconds,
        "k_skewness": k_skewness(np.bincount(idx.ravel(), minlength=n)),
    }
    return result


# ---------------------------------------------------------------------------------------------
# part 3: hub-prior sampling on the shipped diffusion model

GRID_ROWS = ("random N(0, I)", "hub prior, N_5 >= 50", "truncated, psi = 1.5")


def part_sampling(quick: bool, out_dir: Path) -> dict:
    from kexue.diffusion import DigitEvaluator, UNet, image_grid, sample
    from kexue.experiments.hub_prior import LatentPrior, compare_latent_priors

    n, steps = (64, 4) if quick else (1000, 10)
    model = UNet.from_pretrained("mnist5k")
    schedule, info = model.schedule, model.info
    evaluator = DigitEvaluator()

    def generate(z: torch.Tensor) -> torch.Tensor:
        return sample(model, schedule, tuple(z.shape), steps=steps, eta=0.0, x_T=z, progress=False)

    priors = [
        LatentPrior("random"),
        LatentPrior("random", seed_offset=1),
        LatentPrior("random", seed_offset=2),
        LatentPrior("hub", 10),
        LatentPrior("hub", 20),
        LatentPrior("hub", 50),
        LatentPrior("truncate", 1.0),
        LatentPrior("truncate", 1.5),
        LatentPrior("truncate", 2.0),
        LatentPrior("truncate", 2.5),
    ]

    def on_row(label: str) -> None:
        print(f"[sampling] {n} images: {label}", flush=True)

    rows = compare_latent_priors(
        generate, evaluator, priors, n, (1, 28, 28), seed=0, on_row=on_row, keep_images=16
    )
    by = {r["prior"]: r for r in rows}
    ratio = by["hub prior, N_5 >= 50"]["latent_norm"] / by["random N(0, I)"]["latent_norm"]
    rows += compare_latent_priors(
        generate,
        evaluator,
        [LatentPrior("scale", round(ratio, 4))],
        n,
        (1, 28, 28),
        seed=0,
        on_row=on_row,
        keep_images=16,
    )
    shown = [row for row in rows if row["prior"] in GRID_ROWS or row["kind"] == "scale"]
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 0.85 * len(shown) + 0.3))
    for ax, row in zip(axes, shown, strict=True):
        ax.imshow(image_grid(row["images"], nrow=16), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{row['prior']} (first 16 of the scored images)", fontsize=9, loc="left")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / "hubness-samples.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    for row in rows:
        row.pop("images", None)
    return {
        "n": n,
        "steps": steps,
        "model_step": info.get("step"),
        "model_command": info.get("command"),
        "rows": rows,
        "command": command_line(),
    }


# ---------------------------------------------------------------------------------------------
# part 5: the paper's comparison (seeds, bootstrap, norm-matched control, cost) on a generator

HUB_SETTINGS = ((5, 20), (5, 50), (10, 100))  # (k, threshold): 4, 10 and 10 times the mean N_k
PSIS = (1.0, 1.5, 2.0)
SAMPLE_GRID = ("random N(0, I)", "hub prior, N_5 >= 50", "norm-matched to N_5 >= 50",
               "truncated, psi = 1.5")  # fmt: skip


def study_priors(quick: bool) -> list:
    """Random; the hub prior at each of :data:`HUB_SETTINGS`; the norm-matched control of the
    paper's setting (k = 5, threshold 50; of every hub row in the smoke plan); truncation."""
    hubs = ((5, 10), (5, 20)) if quick else HUB_SETTINGS
    controls = hubs if quick else ((5, 50),)
    return [
        LatentPrior("random"),
        *(LatentPrior("hub", t, k=k) for k, t in hubs),
        *(LatentPrior("matched", t, k=k) for k, t in controls),
        *(LatentPrior("truncate", psi) for psi in ((1.0, 2.0) if quick else PSIS)),
    ]


def _generator(name: str, steps: int) -> tuple[Any, tuple[int, ...], dict]:
    """The generator as a plain callable from latents to images, the latent shape, and what
    to say about it."""
    if name == "gan":
        from kexue.hubness import DigitGenerator

        gan = DigitGenerator.from_pretrained("mnist-gan")
        info = {"name": "mnist-gan", **gan.training_info}
        return gan, (gan.latent_dim,), info
    from kexue.diffusion import UNet, sample

    model = UNet.from_pretrained("mnist5k")

    def ddim(z: torch.Tensor) -> torch.Tensor:
        return sample(model, model.schedule, tuple(z.shape), steps=steps, eta=0.0, x_T=z,
                      progress=False)  # fmt: skip

    info = {"name": "mnist5k", "steps": steps, **model.info}
    return ddim, (1, 28, 28), info


def part_study(name: str, quick: bool, out_dir: Path) -> dict:
    """Every latent prior of :func:`study_priors` with 3 seeds on generator ``name``."""
    from kexue.diffusion import DigitEvaluator, image_grid
    from kexue.experiments.hub_prior import (
        LatentPrior,
        paired_differences,
        prior_study,
        summarize_study,
    )

    n, seeds, bootstrap, pool = (100, (0, 1), 20, 2000) if quick else (1000, (0, 1, 2), 30, 10_000)
    generate, shape, info = _generator(name, steps=4 if quick else 10)
    priors = study_priors(quick)
    rows = prior_study(
        generate, DigitEvaluator(), priors, n, shape, seeds, pool_size=pool, bootstrap=bootstrap,
        on_row=lambda label: print(f"[{name}] {n} images: {label}", flush=True), keep_images=16,
    )  # fmt: skip
    shown = [r for r in rows if r["seed"] == seeds[0] and r["prior"] in SAMPLE_GRID]
    if shown:
        fig, axes = plt.subplots(len(shown), 1, figsize=(9, 0.85 * len(shown) + 0.3))
        for ax, row in zip(np.atleast_1d(axes), shown, strict=True):
            ax.imshow(image_grid(row["images"], nrow=16), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{row['prior']} (first 16 scored images, seed {row['seed']})",
                         fontsize=9, loc="left")  # fmt: skip
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out_dir / f"hubness-{name}-samples.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    for row in rows:
        row.pop("images", None)
    paired = []
    for prior in priors:
        if prior.kind != "random":
            paired.append(paired_differences(rows, prior.label, "random N(0, I)"))
        control = LatentPrior("matched", prior.value, k=prior.k)
        if prior.kind == "hub" and control in priors:
            paired.append(paired_differences(rows, prior.label, control.label))
    return {
        "generator": info,
        "latent_shape": list(shape),
        "n": n,
        "seeds": list(seeds),
        "bootstrap": bootstrap,
        "pool_size": pool,
        "rows": rows,
        "summary": summarize_study(rows),
        "paired": paired,
        "command": command_line(),
    }


# ---------------------------------------------------------------------------------------------
# the document


def _load(r: dict) -> str:
    wall = r.get("wall_seconds")
    load = r.get("load_average")
    parts = [f"{wall / 60:.1f} min" if wall else None]
    if load:
        parts.append(f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end")
    return "; ".join(p for p in parts if p)


def knn_section(r: dict) -> list[str]:
    s = r["seconds"]
    floor = min(s["gram_new"], s["gram_out"])
    names = [
        ("Gram `X @ X.T` (torch/MKL, fresh N x N output)", "gram_new"),
        ("Gram `torch.mm(X, X.T, out=buf)` (preallocated output)", "gram_out"),
        ("Gram `X @ X.T` (NumPy/OpenBLAS)", "gram_numpy"),
        ("**kexue** `k_occurrence(X, 5)` (torch exact)", "kexue"),
        ("kexue `k_occurrence(X, 5, backend='faiss')` (faiss exact flat)", "kexue_faiss"),
        ("scikit-learn `NearestNeighbors(algorithm='brute').kneighbors()`", "sklearn"),
        ("NumPy, article's computation (chunks of 1,000, full argsort)", "numpy_article"),
        ("NumPy, same with argpartition", "numpy_argpartition"),
    ]
    wrong = r["points_with_nk_differing_from_float64"]
    rows = [
        [label, s[key], s[key] / floor, s["numpy_article"] / s[key], wrong.get(key, "-")]
        for label, key in names
    ]
    ratio, speedup = s["kexue"] / floor, s["numpy_article"] / s["kexue"]
    return [
        f"## 1. Exact k-occurrence, N = {r['n']:,}, d = {r['d']}, k = {r['k']} (float32)",
        "",
        f"Command: `{r['command']}` ({_load(r)}). Points: i.i.d. N(0, I), seed 0; "
        f"k-skewness of the float64 exact counts {r['k_skewness']:.2f}. Median wall time "
        "(5 runs for the fast rows after a warm-up call, 2 runs for the NumPy rows), all in "
        "one process; torch "
        f"{r['threads']['torch']} threads; thread pools loaded: {r['threads']['numpy_blas']}. "
        "The floor is the "
        "faster of the two torch Gram timings. The last column counts points whose N_k "
        "differs from a float64 exact search (float32 rounding can reorder near-ties).",
        "",
        markdown_table(
            Table(
                "",
                ["method", "seconds", "x floor", "speed-up vs article NumPy", "N_k != float64"],
                rows,
            )
        ),
        "",
        f"- Goal: kexue <= 1.3x the Gram floor: **{ratio:.2f}x** "
        f"({'holds' if ratio <= 1.3 else 'does not hold'}).",
        f"- Goal: kexue >= 3x faster than the article's NumPy snippet: **{speedup:.1f}x** "
        f"({'holds' if speedup >= 3 else 'does not hold'}); against NumPy with argpartition "
        f"{s['numpy_argpartition'] / s['kexue']:.1f}x, against scikit-learn "
        f"{s['sklearn'] / s['kexue']:.1f}x, against faiss exact flat "
        f"{s['kexue_faiss'] / s['kexue']:.2f}x.",
        "",
        "How kexue's exact search works: the distance matrix of a point set is symmetric, so "
        "it is computed in 2048 x 2048 blocks, each once (half the Gram matrix's products): a "
        "block's rows and its columns both get their candidates from it. The score is the "
        "squared distance straight out of the product (`[x, |x|^2, 1] . [-2y, 1, |y|^2]`), and "
        "the top-k of a row or column is found through minima of groups of "
        f"{SELECTION_GROUP} entries (one vectorised pass) instead of a selection over every "
        "entry; candidates merge into running lists. The selection alone, on the N x N Gram "
        "block: "
        f"`torch.topk` {s['select_topk']:.3f} s ({s['select_topk'] / floor:.2f}x the floor), "
        f"group minima {s['select_groups']:.3f} s ({s['select_groups'] / floor:.2f}x). "
        "Measured against half the floor (the products it needs), kexue takes "
        f"{s['kexue'] / (floor / 2):.2f}x.",
        "",
        _tie_rule_note(r),
        "",
    ]


def _tie_rule_note(r: dict) -> str:
    if r.get("tie_rule"):
        return (
            "Each query keeps 4 candidates beyond k; where two of its first k + 1 rounded "
            "scores lie within their rounding bound, the candidates are re-ranked by float64 "
            "distances, exact ties going to the smaller index (the timings include this)."
        )
    return (
        "These timings were measured before kexue settled near-ties in float64 (4 extra "
        "candidates per query, re-ranked where two rounded scores lie within their rounding "
        "bound, exact ties to the smaller index); `--plan knn` times the current code."
    )


def large_section(r: dict) -> list[str]:
    s = r["100k"]
    lines = [
        f"## 2. Large N: faiss exact and approximate (d = {r['d']}, k = {r['k']}, float32)",
        "",
        f"Command: `{r['command']}` ({_load(r)}). i.i.d. N(0, I) points, a hard case for "
        "approximate indexes (no low-dimensional structure).",
        "",
        f"### N = {s['n']:,}",
        "",
        f"- Exact all-pairs with kexue (torch): **{s['exact_torch_seconds']:.1f} s** "
        f"({s['exact_gflops']:.0f} GFLOP/s of matmul-equivalent work); this is the ground "
        f"truth below. Exact k-skewness {s['k_skewness_exact']:.2f}, hubs (N_k >= 10) "
        f"{s['hub_share_exact']:.2%}, anti-hubs {s['antihub_share_exact']:.2%}.",
        f"- Same {s['sample_queries']:,} random queries (measured, not extrapolated): torch "
        f"exact {s['torch_sample_seconds']:.1f} s, faiss exact flat "
        f"{s['faiss_flat_sample_seconds']:.1f} s (recall of faiss flat against torch: "
        f"{s['faiss_flat_recall_vs_torch']:.4f}).",
        "",
    ]
    rows = [
        [
            a["method"],
            a["seconds"],
            s["exact_torch_seconds"] / a["seconds"],
            a["recall"],
            a["mean_abs_error"],
            a["share_points_wrong"],
            a["max_abs_error"],
            a["spearman"],
            a["hub_jaccard"],
            a["k_skewness"],
        ]
        for a in s["approximate"]
    ]
    lines += [
        markdown_table(
            Table(
                "",
                [
                    "index (build + search of all N)",
                    "seconds",
                    "speed-up vs exact",
                    "recall@5",
                    "mean abs N_k error",
                    "share of points with N_k wrong",
                    "max abs N_k error",
                    "Spearman(N_k)",
                    "hub-set Jaccard",
                    "k-skewness",
                ],
                rows,
            )
        ),
        "",
        f"Exact k-skewness: {s['k_skewness_exact']:.2f}. Recall and errors against the exact "
        "all-pairs result, over every point.",
        "",
    ]
    check = next((a["estimator_check"] for a in s["approximate"] if "estimator_check" in a), None)
    if check:
        lines += [
            f"Check of the sample estimator used at 1M (exact N_k of a random point from the "
            f"candidate queries only): on {check['sample']} random points at N = {s['n']:,}, "
            f"searching {check['candidates']:,} candidate queries, it differs from the "
            f"all-pairs counts by at most {check['max_abs_difference_from_exact']}.",
            "",
        ]
    if "1M" in r:
        m = r["1M"]
        p = m["hnsw_params"]
        lines += [
            f"### N = {m['n']:,}",
            "",
            f"- faiss HNSW (M {p['M']}, efConstruction {p['ef_construction']}, efSearch "
            f"{p['ef_search']}), build + search of all {m['n']:,} points: "
            f"**{m['hnsw_seconds']:.0f} s** (measured). Empty slots: {m['missing_slots']}.",
            f"- Recall@5 on {m['recall_sample_queries']:,} random queries against exact "
            f"search: **{m['recall']:.3f}** (measured on the sample).",
            f"- Exact search time, measured on those {m['recall_sample_queries']:,} queries: "
            f"torch {m['torch_exact_sample_seconds']:.1f} s, faiss flat "
            f"{m['faiss_flat_sample_seconds']:.1f} s; **extrapolated** to all points: torch "
            f"{m['torch_exact_all_extrapolated_seconds'] / 3600:.1f} h, faiss flat "
            f"{m['faiss_flat_all_extrapolated_seconds'] / 3600:.1f} h (linear in the number "
            "of queries; not run).",
            f"- k-occurrence error, measured exactly on {m['sample_points']} random points "
            f"(their exact N_k from {m['sample_candidates_searched']:,} candidate queries "
            f"searched exactly, {m['sample_estimator_seconds']:.0f} s): mean |error| "
            f"{m['sample_mean_abs_error']:.2f}, max {m['sample_max_abs_error']}, "
            f"{m['sample_share_points_wrong']:.1%} of the points wrong, Spearman "
            f"{m['sample_spearman']:.3f}; mean N_k {m['sample_mean_nk_hnsw']:.2f} (HNSW) vs "
            f"{m['sample_mean_nk_exact']:.2f} (exact); hub share (N_k >= 10) "
            f"{m['sample_hub_share_hnsw']:.1%} vs {m['sample_hub_share_exact']:.1%}.",
            f"- k-skewness from the HNSW lists (all points): {m['k_skewness_hnsw']:.2f}.",
            "",
        ]
        full = m.get("full")
        if full:
            lines += [
                f"Against the exact lists of all {m['n']:,} points (computed by kexue's torch "
                f"backend on {m['exact_source']}, section 4; same points, checksum-verified): "
                f"recall@5 **{full['recall']:.3f}**, mean |N_k error| "
                f"{full['mean_abs_error']:.2f}, {full['share_points_wrong']:.1%} of the points "
                f"wrong, max |error| {full['max_abs_error']}, Spearman {full['spearman']:.3f}, "
                f"hub-set Jaccard {full['hub_jaccard']:.3f}; exact k-skewness "
                f"{full['k_skewness_exact']:.2f} vs {m['k_skewness_hnsw']:.2f} from HNSW. The "
                "CPU sample estimates above agree with these exact lists: sampled points' exact "
                f"N_k identical: {full['sample_matches_exact']}; recall of the CPU exact "
                f"search on the sampled queries against the GPU lists: "
                f"{full['sample_queries_match_exact']:.4f}.",
                "",
            ]
        elif "exact_source" in m:
            lines += [f"(No exact 1M lists compared: {m['exact_source']}.)", ""]
    return lines


def sampling_noise(r: dict) -> dict[str, float]:
    """The DDIM part's noise floor: spread (max - min) of its random-latent rows."""
    randoms = [row for row in r["rows"] if row["kind"] == "random"]
    return {
        key: max(row[key] for row in randoms) - min(row[key] for row in randoms)
        for key in ("frechet", "precision", "recall")
    }


def sampling_claims(r: dict) -> dict[str, list[tuple[str, str, str]]]:
    """Per hub row of the DDIM part, the claims of ``hub_prior_claims`` (noise: the spread of
    the random rows; no norm-matched row in this part, its scaled row is a norm control)."""
    rows = r["rows"]
    by = {row["prior"]: row for row in rows}
    trunc = sorted((row for row in rows if row["kind"] == "truncate"), key=lambda x: x["value"])
    noise = sampling_noise(r)
    return {
        row["prior"]: hub_prior_claims(row, by["random N(0, I)"], trunc, noise)
        for row in rows
        if row["kind"] == "hub"
    }


def sampling_section(r: dict) -> tuple[list[str], plt.Figure]:
    from kexue.experiments.hub_prior import (
        SAMPLING_HEADERS,
        quality_diversity_figure,
        sampling_table_rows,
    )

    rows = r["rows"]
    by = {row["prior"]: row for row in rows}
    r0 = by["random N(0, I)"]
    randoms = [row for row in rows if row["kind"] == "random"]
    noise = sampling_noise(r)
    hub_rows = [row for row in rows if row["kind"] == "hub"]
    trunc = sorted((row for row in rows if row["kind"] == "truncate"), key=lambda x: x["value"])
    lines = [
        "## 3. Hub-prior latents for a diffusion model (DDIM as a deterministic generator)",
        "",
        f"Command: `{r['command']}` ({_load(r)}). Model: the shipped `mnist5k` (training step "
        f"{r['model_step']}; {r['model_command']}). Generator: `sample(model, schedule, shape, "
        f"steps={r['steps']}, eta=0.0, x_T=z)`, a deterministic map from a 784-d latent to an "
        f"image. {r['n']:,} images per row (K = {r['steps']} and this count keep the part "
        "within about 15 minutes of the 2-core CPU). Hub prior: `HubPriorSampler((1, 28, 28), "
        "k=5, threshold=t, pool_size=10_000)`. Truncated: every coordinate of z conditioned on "
        "|z_i| <= psi. Scaled: psi * N(0, I), psi chosen so that the mean |z| matches the "
        "hub prior at t = 50 (a control: does the hub prior do more than shrink |z|?). "
        "Scores: `DigitEvaluator` (classifier features; Fréchet distance to the 1,000 "
        "held-out digits, mean max-softmax confidence, entropy of the predicted-label "
        "histogram (log 10 = 2.30 is balanced), k-NN precision and recall with k = 3).",
        "",
        markdown_table(Table("", SAMPLING_HEADERS, sampling_table_rows(rows))),
        "",
    ]
    hub_cost = [
        [
            row["prior"],
            row.get("rounds"),
            row.get("acceptance"),
            row.get("latent_seconds"),
            row["generate_seconds"],
        ]
        for row in hub_rows
    ]
    lines += [
        markdown_table(
            Table(
                "",
                [
                    "hub prior",
                    "rounds of 10,000",
                    "acceptance",
                    "latent search s",
                    f"generation s ({r['n']:,} images)",
                ],
                hub_cost,
            )
        ),
        "",
        "![quality and diversity](hubness-quality-diversity.png)",
        "",
        "![samples](hubness-samples.png)",
        "",
        "### What was measured about the claim",
        "",
        f"Noise floor: spread (max - min) of the {len(randoms)} random-latent rows (different "
        f"seeds): Fréchet {noise['frechet']:.1f}, precision {noise['precision']:.3f}, recall "
        f"{noise['recall']:.3f}.",
        "",
    ]
    for h in hub_rows:
        match = interpolate_curve(trunc, "precision", h["precision"], "recall")
        match_fd = interpolate_curve(trunc, "frechet", h["frechet"], "recall")
        lines.append(
            f"- {h['prior']}: Fréchet {h['frechet']:.1f} vs random {r0['frechet']:.1f}; "
            f"precision {h['precision']:.3f} vs {r0['precision']:.3f}; recall "
            f"{h['recall']:.3f} vs {r0['recall']:.3f}. Truncation at the same precision "
            + (
                f"(interpolated between psi values) has recall {match:.3f}"
                if match is not None
                else "is outside the measured psi range"
            )
            + "; at the same Fréchet distance "
            + (f"recall {match_fd:.3f}." if match_fd is not None else "outside the range.")
        )
    lines.append("")
    lines += _verdict_lines(r0, noise, hub_rows, trunc, by)
    fig = quality_diversity_figure(
        rows, f"{r['n']:,} DDIM samples (K = {r['steps']}) per latent prior, shipped mnist5k"
    )
    return lines, fig


def _verdict_lines(r0, noise, hub_rows, trunc, by) -> list[str]:
    better = [h for h in hub_rows if r0["frechet"] - h["frechet"] > noise["frechet"]]
    less_loss = []
    for h in hub_rows:
        m = interpolate_curve(trunc, "precision", h["precision"], "recall")
        if m is not None and h["recall"] - m > noise["recall"]:
            less_loss.append(h)

    def names(rows: list[dict]) -> str:
        return ", ".join(h["prior"] for h in rows) if rows else "no hub threshold"

    text = (
        "**Verdict on this model** (a difference counts when it exceeds the spread of the "
        "random-latent rows). Fréchet distance lower than random latents' for: "
        f"{names(better)}. Recall higher than truncation's at matched precision for: "
        f"{names(less_loss)}."
    )
    scale = next((row for row in by.values() if row["kind"] == "scale"), None)
    h50 = by.get("hub prior, N_5 >= 50")
    if scale is not None and h50 is not None:
        same = [
            key
            for key in ("frechet", "precision", "recall")
            if abs(scale[key] - h50[key]) <= noise[key]
        ]
        text += (
            f" Norm-matched control ({scale['prior']}): Fréchet {scale['frechet']:.1f}, "
            f"precision {scale['precision']:.3f}, recall {scale['recall']:.3f}, against the hub "
            f"prior's (t = 50) {h50['frechet']:.1f}, {h50['precision']:.3f}, "
            f"{h50['recall']:.3f}; within the random-seed spread on "
            + (", ".join(same) if same else "none of the three")
            + (
                ": on this generator the hub prior acts like shrinking |z|."
                if len(same) == 3
                else "."
            )
        )
    return [text, ""]


def _significant(d: dict) -> bool:
    """A paired difference counts when its mean exceeds twice its standard error over the
    seeds (with 3 seeds a rough rule; every seed's difference is in the JSON)."""
    return len(d["diffs"]) > 1 and abs(d["mean"]) > 2 * d["se"]


def _pm(mean: float, sd: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def study_claims(r: dict) -> dict[str, Any]:
    """Per hub row of a 3-seed study, the claims of ``hub_prior_claims`` judged on the means
    over the seeds; a difference counts beyond twice its standard error over the seeds (paired
    by seed for Fréchet and precision; the hub row's recall error for truncation)."""
    summary = r["summary"]
    by = {s["prior"]: s for s in summary}
    pairs = {(d["prior"], d["baseline"]): d for d in r["paired"]}
    trunc = sorted((s for s in summary if s["family"] == "truncation"), key=lambda s: s["value"])
    rand = by["random N(0, I)"]
    out: dict[str, list[tuple[str, str, str]]] = {}
    for h in (s for s in summary if s["family"] == "hub"):
        vs_random = pairs[(h["prior"], "random N(0, I)")]
        noise = {key: 2 * vs_random[key]["se"] for key in ("frechet", "precision")}
        noise["recall"] = 2 * h["recall_sd"] / math.sqrt(len(h["seeds"]))
        claims = hub_prior_claims(h, rand, trunc, noise)
        control = LatentPrior("matched", h["value"], k=h["k"]).label
        if control in by:
            vs_control = pairs[(h["prior"], control)]
            control_noise = {key: 2 * vs_control[key]["se"] for key in ("frechet", "precision")}
            claims.append(
                hub_prior_claims(h, rand, trunc, control_noise | {"recall": 0.0}, by[control])[2]
            )
        out[h["prior"]] = claims
    return {"claims": out, "random": rand}


def claim_holds(claims: dict[str, list[tuple[str, str, str]]]) -> list[str]:
    """The hub rows for which both parts of the claim hold: better than random latents, and
    more recall than truncation at the same precision."""
    return [p for p, c in claims.items() if c[0][1] == "holds" and c[1][1] == "holds"]


def study_section(r: dict, number: int, title: str, out: Path, stem: str) -> list[str]:
    from kexue.experiments.hub_prior import families_figure

    g = r["generator"]
    summary = r["summary"]
    claims = study_claims(r)
    rand = claims["random"]
    if g["name"] == "mnist-gan":
        made = (
            f'`DigitGenerator.from_pretrained("mnist-gan")` (z in R^{r["latent_shape"][0]}, '
            f"{g.get('step')} training steps: `{g.get('command')}`)"
        )
    else:
        made = (
            f"the shipped `mnist5k` diffusion model run as DDIM (eta = 0, K = {g['steps']}) from "
            f"z in R^784 (training step {g.get('step')})"
        )
    lines = [
        f"## {number}. {title}",
        "",
        f"Command: `{r['command']}` ({_load(r)}"
        + (
            "; without the shared CPU lock, which another benchmark held"
            if "--no-lock" in r["command"]
            else ""
        )
        + f"). Generator: {made}. {r['n']:,} images per row "
        f"and seed, seeds {', '.join(map(str, r['seeds']))}; hub rows search pools of "
        f"{r['pool_size']:,} candidates (`HubPriorSampler(k, threshold)`); the norm-matched "
        "control takes other random directions and gives each the norm of a hub latent of the "
        "same row and seed; truncation conditions every coordinate on |z_i| <= psi. Scores: "
        "`DigitEvaluator` (Fréchet distance of classifier features to the 1,000 held-out "
        "digits, k-NN precision and recall with k = 3, mean confidence). Each cell: mean ± "
        f"standard deviation over the seeds; 'bootstrap' is the mean standard deviation of the "
        f"Fréchet distance over {r['bootstrap']} resamples of one row's generated features.",
        "",
        f"Recognisability of plain N(0, I) samples: mean classifier confidence "
        f"**{_pm(rand['confidence'], rand['confidence_sd'], 3)}**, predicted-label entropy "
        f"{rand['label_entropy']:.3f} (log 10 = 2.303 is perfectly balanced), Fréchet distance "
        f"{_pm(rand['frechet'], rand['frechet_sd'], 1)}.",
        "",
    ]
    rows = [
        [
            s["prior"],
            s["latent_norm"],
            _pm(s["frechet"], s["frechet_sd"], 1),
            s["frechet_bootstrap_sd"],
            _pm(s["precision"], s["precision_sd"], 3),
            _pm(s["recall"], s["recall_sd"], 3),
            _pm(s["confidence"], s["confidence_sd"], 3),
            s.get("candidates_per_latent", 1.0),
            s["seconds_per_latent"] * 1e3,
        ]
        for s in summary
    ]
    headers = ["latents", "mean norm of z", "Fréchet", "bootstrap", "precision", "recall",
               "confidence", "candidates per kept latent", "ms per latent"]  # fmt: skip
    lines += [markdown_table(Table("", headers, rows)), ""]
    paired = [
        [
            d["prior"],
            d["baseline"],
            _pm(d["frechet"]["mean"], d["frechet"]["se"], 2),
            _pm(d["precision"]["mean"], d["precision"]["se"], 4),
            _pm(d["recall"]["mean"], d["recall"]["se"], 4),
            "yes" if any(_significant(d[k]) for k in ("frechet", "precision", "recall")) else "no",
        ]
        for d in r["paired"]
        if d["prior"] != d["baseline"]
    ]
    lines += [
        "Paired differences (row minus baseline, same seed; mean ± standard error over the "
        "seeds; a difference counts when the mean exceeds twice its standard error):",
        "",
        markdown_table(
            Table("", ["row", "baseline", "Δ Fréchet", "Δ precision", "Δ recall", "counts"], paired)
        ),
        "",
    ]
    fig = families_figure(summary, f"{title}: mean over seeds, bars = seed sd")
    fig.savefig(out / f"{stem}-quality-diversity.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    rand_ms = rand["seconds_per_latent"] * 1e3
    costs = [s for s in summary if s["family"] == "hub"]
    cheapest = min(costs, key=lambda s: s["seconds_per_latent"]) if costs else None
    dearest = max(costs, key=lambda s: s["seconds_per_latent"]) if costs else None
    lines += [
        f"![quality against diversity]({stem}-quality-diversity.png)",
        "",
        f"![samples]({stem}-samples.png)",
        "",
    ]
    if cheapest is not None:
        lines += [
            f"Cost: a random latent takes {rand_ms:.4f} ms to draw; a hub latent from "
            f"{cheapest['seconds_per_latent'] * 1e3:.2f} ms ({cheapest['prior']}, "
            f"{cheapest['candidates_per_latent']:.0f} candidates searched per kept latent) to "
            f"{dearest['seconds_per_latent'] * 1e3:.2f} ms ({dearest['prior']}, "
            f"{dearest['candidates_per_latent']:.0f} candidates), measured on this CPU. The "
            "norm-matched rows cost the same search (they reuse it for their norms).",
            "",
        ]

    holds = claim_holds(claims["claims"])
    lines += [
        "**Does the claim hold on this generator?** Each hub row's three parts, judged on the "
        "means over the seeds (a difference counts beyond twice its standard error over the "
        "seeds, paired by seed):",
        "",
        markdown_table(
            Table(
                "",
                ["hub row", "part of the claim", "status", "numbers"],
                [
                    [prior, text.split(": ", 1)[1], status, key]
                    for prior, parts in claims["claims"].items()
                    for text, status, key in parts
                ],
            )
        ),
        "",
        (
            f"**The claim holds here** for {', '.join(holds)}: better than random latents and "
            "more diverse than truncation at the same precision."
            if holds
            else "**The claim does not hold here**: no hub row is both better than random "
            "latents and more diverse than truncation at the same precision."
        ),
        "",
    ]
    return lines


def gpu_section(r: dict) -> list[str]:
    rows = [
        [t["n"], t["gram_seconds"], t["kexue_seconds"], t["kexue_seconds"] / t["gram_seconds"]]
        for t in r["timing"]
    ]
    checks = []
    for c in r["checks"]:
        items = [f"{key} = {value}" for key, value in c.items() if key != "case"]
        checks.append(f"- {c['case']}: " + ", ".join(items))
    e = r["exact_1m"]
    return [
        f"## 4. The torch backend on a GPU ({r['device']}, torch {r['torch']})",
        "",
        f"Command: `{r['command']}` on a borrowed GPU machine (not the CPU above). "
        "Correctness against the CPU float64 search:",
        "",
        *checks,
        "",
        "Exact k-occurrence (k = 5, d = 512, float32) against the Gram floor computed in the "
        "same blocks (`torch.mm` of every block of queries with all points, nothing else):",
        "",
        markdown_table(Table("", ["N", "Gram floor s", "kexue k_occurrence s", "x floor"], rows)),
        "",
        f"Exact all-pairs 5-NN of the N = {e['n']:,} set of section 2: **{e['seconds']:.1f} s** "
        f"on the GPU (k-skewness {e['k_skewness']:.2f}); these lists are the ground truth of "
        "section 2's full 1M comparison.",
        "",
    ]


def summary_lines(results: dict) -> list[str]:
    """The page's answer to the hub prior's claim, per generator, from the stored parts."""
    found = []
    for part, what in (("gan", "GAN latents"), ("ddim", "DDIM latents")):
        if part not in results:
            continue
        study = study_claims(results[part])
        holds = claim_holds(study["claims"])
        rand = study["random"]
        found.append(
            f"**{what}** (section {5 if part == 'gan' else 6}, {results[part]['n']:,} images x "
            f"{len(results[part]['seeds'])} seeds per row; random-latent Fréchet distance "
            f"{_pm(rand['frechet'], rand['frechet_sd'], 1)}, confidence "
            f"{rand['confidence']:.3f}): "
            + (f"the claim **holds** for {', '.join(holds)}." if holds else "the claim "
               "**does not hold** for any hub row.")
        )  # fmt: skip
    if "ddim" not in results and "sampling" in results:
        r = results["sampling"]
        holds = claim_holds(sampling_claims(r))
        rand = [row for row in r["rows"] if row["kind"] == "random"]
        fd = [row["frechet"] for row in rand]
        gen_s = statistics.mean(row["generate_seconds"] for row in r["rows"])
        found.append(
            f"**DDIM latents** (section 3: the shipped diffusion model, K = {r['steps']}, "
            f"{r['n']:,} images per row, one seed per hub row, {len(rand)} random seeds as the "
            f"noise floor; random-latent Fréchet distance {statistics.mean(fd):.1f} ± "
            f"{statistics.stdev(fd):.1f}, confidence "
            f"{statistics.mean(row['confidence'] for row in rand):.3f}): "
            + (f"the claim **holds** for {', '.join(holds)}." if holds else "the claim "
               "**does not hold** for any hub row.")
            + f" The 3-seed study of section 5 was not run on DDIM (`--plan ddim`): at about "
            f"{gen_s:.0f} s per 1,000 images it needs {len(study_priors(False))} priors x 3 "
            f"seeds, about {len(study_priors(False)) * 3 * gen_s / 60:.0f} minutes of a quiet "
            "2-core CPU, which this round's shared machine (load 10-16) could not give; "
            "section 3's numbers are reused from its committed run."
        )  # fmt: skip
    if not found:
        return []
    return ["## Does the hub prior's claim hold?", "", *(f"- {line}" for line in found), ""]


def render(results: dict, out: Path) -> str:
    """The page from ``results`` (every stored part) alone; the quality-diversity figure is
    redrawn from the numbers, the sample grids were drawn when the part was measured."""
    machine = results["machine"] if "machine" in results else machine_info()
    lines = [
        "# Benchmark: hubness measures and hub-prior sampling (kexue.hubness)",
        "",
        f"{machine_line(machine)} Every part ran under the shared CPU lock "
        "(`benchmarks/_common.heavy_lock`); the lock does not stop processes that ignore it, so "
        "the 1-minute load average at the start and end of each part is given with it (2.0 = "
        "both cores busy). Numbers: `hubness.json` next to this file; each part's command "
        "below reproduces it (`GPU_OUT` is the folder the `gpu` part wrote its exact 1M "
        "neighbour lists to, 20 MB, not committed).",
        "",
        *summary_lines(results),
    ]
    if "knn" in results:
        lines += knn_section(results["knn"])
    if "large" in results:
        lines += large_section(results["large"])
    if "sampling" in results:
        more, fig = sampling_section(results["sampling"])
        fig.savefig(out / "hubness-quality-diversity.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        lines += more
    if "gpu" in results:
        lines += gpu_section(results["gpu"])
    if "gan" in results:
        lines += study_section(
            results["gan"], 5, "The hub prior on GAN latents (the paper's setting)", out,
            "hubness-gan",
        )  # fmt: skip
    if "ddim" in results:
        lines += study_section(
            results["ddim"], 6, "The same comparison on DDIM latents", out, "hubness-ddim"
        )
    return "\n".join(lines)


def _measure_part(part: str, quick: bool, args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    if part == "knn":
        result = part_knn(quick)
    elif part == "large":
        result = part_large(quick, quick or args.skip_1m, args.exact_1m)
    elif part == "sampling":
        result = part_sampling(quick, args.out)
    elif part in ("gan", "ddim"):
        result = part_study(part, quick, args.out)
    else:
        result = part_gpu(quick, args.out)
    result["wall_seconds"] = time.perf_counter() - t0
    result["load_average"] = [load_before, os.getloadavg()[0]]
    result["machine"] = machine_info()
    return result


def measure(plan: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run the plan's parts and return them merged into the parts already stored beside the
    page (a part measured elsewhere, e.g. ``gpu``, comes in with ``--import-json``)."""
    store = args.out / "hubness.json"
    results = json.loads(store.read_text()) if store.exists() and plan != "smoke" else {}
    results = {key: results[key] for key in PARTS if key in results}
    if args.import_json is not None:
        imported = json.loads(args.import_json.read_text())
        results.update({key: imported[key] for key in PARTS if key in imported})
    quick = plan == "smoke"
    parts = ["knn", "large", "sampling", "gan"] if plan in ("smoke", "default") else [plan]
    for part in parts:
        results[part] = _measure_part(part, quick, args)
        print(f"[{part}] done in {results[part]['wall_seconds']:.0f} s", flush=True)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-1m", action="store_true", help="large part: stop at 100k")
    parser.add_argument(
        "--exact-1m",
        type=Path,
        default=None,
        help="large part: folder with the gpu part's exact lists of the 1M set",
    )
    parser.add_argument(
        "--import-json", type=Path, default=None, help="merge parts from another hubness.json"
    )


if __name__ == "__main__":
    main(
        "hubness",
        measure,
        render,
        plans=PLANS,
        description=__doc__.split("\n")[0],
        add_arguments=add_arguments,
    )
