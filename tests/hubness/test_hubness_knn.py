"""Neighbour search against float64 brute force, faiss exact flat, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kexue.extras import is_available
from kexue.hubness import Hubness, k_occurrence, knn, neighbor_recall
from kexue.hubness.knn import smallest_k_grouped
from kexue.testing.hubness import (
    brute_force_k_occurrence,
    brute_force_neighbors,
    smallest_gap,
    tied_points,
)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize(("n", "d", "k"), [(7, 3, 2), (10, 4, 9), (301, 16, 5), (600, 64, 7)])
def test_float64_search_equals_brute_force(metric, n, d, k, points):
    X = points(n, d, seed=n) + 3.0  # off-centre, so the centring matters
    ref_d, ref_i = brute_force_neighbors(X.numpy(), k, metric=metric)
    found = knn(X, k, metric=metric)
    assert found.indices.dtype == torch.int64 and found.distances.dtype == torch.float64
    np.testing.assert_array_equal(found.indices.numpy(), ref_i)
    np.testing.assert_allclose(found.distances.numpy(), ref_d, rtol=1e-9, atol=1e-9)


def test_float32_search_equals_float64_reference_without_near_ties(points):
    X = points(600, 48, seed=3)
    assert smallest_gap(X.numpy(), 6) > 1e-6  # float32 errors here are ~1e-7 relative
    _, ref_i = brute_force_neighbors(X.numpy(), 6)
    found = knn(X.float() * 100 + 1000, 6)  # large offset: centring keeps float32 accurate
    np.testing.assert_array_equal(found.indices.numpy(), ref_i)
    assert found.distances.dtype == torch.float32


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunking_does_not_change_the_result(chunk_size, points):
    X = points(257, 10, seed=1)
    _, ref_i = brute_force_neighbors(X.numpy(), 4)
    np.testing.assert_array_equal(knn(X, 4, chunk_size=chunk_size).indices.numpy(), ref_i)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_separate_queries_and_row_subsets(metric, points):
    X, Y = points(400, 12, seed=4), points(30, 12, seed=5)
    ref_d, ref_i = brute_force_neighbors(X.numpy(), 400, Y=Y.numpy(), metric=metric)
    found = knn(X, 400, Y=Y, metric=metric)  # k = N is allowed for separate queries
    np.testing.assert_array_equal(found.indices.numpy(), ref_i)
    np.testing.assert_allclose(found.distances.numpy(), ref_d, rtol=1e-9, atol=1e-9)
    rows = torch.tensor([399, 0, 17, 17])
    _, all_i = brute_force_neighbors(X.numpy(), 5, metric=metric)
    sub = knn(X, 5, rows=rows, metric=metric)
    np.testing.assert_array_equal(sub.indices.numpy(), all_i[rows.numpy()])


def test_self_is_excluded_by_index_and_kept_on_request(points):
    X = points(50, 5, seed=6)
    X = torch.cat([X, X[:3]])  # rows 50, 51, 52 duplicate rows 0, 1, 2
    found = knn(X, 3)
    assert not (found.indices == torch.arange(53)[:, None]).any()
    assert found.indices[0, 0] == 50 and found.indices[50, 0] == 0  # the twin, at distance 0
    assert found.distances[0, 0] == 0
    kept = knn(X[:50], 3, exclude_self=False)
    assert (kept.indices[:, 0] == torch.arange(50)).all()
    assert (kept.distances[:, 0] == 0).all()
    _, ref_i = brute_force_neighbors(X[:50].numpy(), 2)
    np.testing.assert_array_equal(kept.indices[:, 1:].numpy(), ref_i)


@given(
    rows=st.integers(1, 6),
    width=st.integers(1, 300),
    k=st.integers(1, 12),
    group=st.integers(1, 40),
    seed=st.integers(0, 10_000),
    levels=st.sampled_from([None, 3]),
)
def test_grouped_selection_equals_topk(rows, width, k, group, seed, levels):
    k = min(k, width * group)
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(rows, width * group, generator=gen, dtype=torch.float64)
    if levels is not None:  # many exact ties: only the values are determined
        block = torch.randint(0, levels, block.shape, generator=gen).double()
    vals, idx = smallest_k_grouped(block, k, group)
    ref = block.topk(k, dim=1, largest=False, sorted=True).values
    torch.testing.assert_close(vals, ref, rtol=0, atol=0)
    torch.testing.assert_close(block.gather(1, idx), vals, rtol=0, atol=0)
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()  # no column twice


def test_faiss_exact_flat_equals_torch_exact(points):
    pytest.importorskip("faiss")
    X = points(1000, 32, seed=12, dtype=torch.float32)
    unit = X.double() / X.double().norm(dim=1, keepdim=True)
    # no near-tie that float32 rounding could legitimately order either way
    assert min(smallest_gap(X.double().numpy(), 5), smallest_gap(unit.numpy(), 5)) > 1e-6
    for metric in ("euclidean", "cosine"):
        ours = knn(X, 5, metric=metric, backend="torch")
        theirs = knn(X, 5, metric=metric, backend="faiss")
        assert torch.equal(ours.indices, theirs.indices)
        torch.testing.assert_close(ours.distances, theirs.distances, rtol=1e-4, atol=1e-4)
    Y = points(20, 32, seed=8, dtype=torch.float32)
    assert torch.equal(knn(X, 5, Y=Y).indices, knn(X, 5, Y=Y, backend="faiss").indices)
    rows = torch.tensor([5, 999, 3])
    assert torch.equal(knn(X, 5, rows=rows).indices, knn(X, 5, rows=rows, backend="faiss").indices)


def test_approximate_indexes_report_their_recall(points):
    pytest.importorskip("faiss")
    X = points(3000, 16, seed=9, dtype=torch.float32)
    exact = knn(X, 10)
    # nprobe = nlist visits every inverted list: IVF is then exact
    full = knn(X, 10, index="ivf", index_params={"nlist": 20, "nprobe": 20})
    assert neighbor_recall(full.indices, exact.indices) == 1.0
    # one list out of 50: clearly approximate, and the recall says so
    coarse = knn(X, 10, index="ivf", index_params={"nlist": 50, "nprobe": 1})
    assert 0.2 < neighbor_recall(coarse.indices, exact.indices) < 0.95
    graph = knn(X, 10, index="hnsw", index_params={"ef_search": 200})
    assert neighbor_recall(graph.indices, exact.indices) > 0.97
    assert not (graph.indices == torch.arange(3000)[:, None]).any()


def test_neighbor_recall_on_hand_made_lists():
    exact = torch.tensor([[1, 2, 3], [4, 5, 6]])
    found = torch.tensor([[3, 2, 9], [-1, -1, 4]])
    assert neighbor_recall(found, exact) == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="same queries"):
        neighbor_recall(found[:1], exact)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 10}, ValueError, r"k=10 is too large.*N = 10"),
        ({"k": 11, "Y": torch.zeros(2, 3)}, ValueError, r"k=11 is too large"),
        ({"k": 0}, ValueError, "k must be >= 1"),
        ({"k": 2.0}, TypeError, "k must be an int"),
        ({"metric": "manhattan"}, ValueError, "metric must be"),
        ({"backend": "annoy"}, ValueError, "backend must be"),
        ({"index": "hnsw", "backend": "torch"}, ValueError, "needs backend='faiss'"),
        ({"index": "ivf", "index_params": {"M": 4}}, ValueError, "index_params"),
        ({"Y": torch.zeros(2, 4)}, ValueError, "Y has 4 features"),
        ({"Y": torch.zeros(2, 3), "rows": [0]}, ValueError, "not both"),
        ({"rows": [0, 10]}, ValueError, "rows must index"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, match, points):
    X = points(10, 3)
    kwargs = {"k": 2, **kwargs}
    with pytest.raises(error, match=match):
        knn(X, **kwargs)


def test_bad_points_name_the_argument_and_the_row(points):
    X = points(10, 3)
    with pytest.raises(ValueError, match=r"X must be 2-D.*\(10,\).*X\[:, None\]"):
        knn(X[:, 0], 2)
    X[4, 1] = float("nan")
    X[7, 0] = float("inf")
    message = r"X has NaN or infinite values in 2 row\(s\), the first at row 4"
    with pytest.raises(ValueError, match=message):
        knn(X, 2)
    with pytest.raises(ValueError, match=r"Y has NaN"):
        knn(points(10, 3), 2, Y=X)
    with pytest.raises(TypeError, match=r"X must be a torch\.Tensor or a NumPy array"):
        knn([[0.0, 1.0]], 1)
    zero = points(10, 3)
    zero[2] = 0
    with pytest.raises(ValueError, match="all-zero row"):
        knn(zero, 2, metric="cosine")


def test_faiss_cosine_rejects_all_zero_rows_like_torch(points):
    pytest.importorskip("faiss")
    zero = points(10, 3)
    zero[2] = 0
    with pytest.raises(ValueError, match=r"X has 1 all-zero row\(s\) \(first: 2\)"):
        knn(zero, 2, metric="cosine", backend="faiss")
    with pytest.raises(ValueError, match="Y has 1 all-zero row"):
        knn(points(10, 3), 2, Y=zero, metric="cosine", backend="faiss")


def test_numpy_and_integer_input():
    X = np.arange(12, dtype=np.int64).reshape(6, 2) ** 2
    found = knn(X, 1)
    assert found.distances.dtype == torch.float32
    assert found.indices[:, 0].tolist() == [1, 0, 1, 2, 3, 4]


def test_column_tiles_are_merged_exactly(monkeypatch, points):
    import importlib

    module = importlib.import_module("kexue.hubness.knn")  # the attribute is the function
    monkeypatch.setattr(module, "COLUMN_TILE", 1024)  # many tiles, a short last one
    X = points(5000, 6, seed=10)
    rows = torch.arange(0, 5000, 37)
    ref_d, ref_i = brute_force_neighbors(X.numpy(), 10, Y=X[rows].numpy())
    assert (ref_i[:, 0] == rows.numpy()).all()  # the query itself, then its 9 neighbours
    found = knn(X, 9, rows=rows, chunk_size=50)
    np.testing.assert_array_equal(found.indices.numpy(), ref_i[:, 1:])
    np.testing.assert_allclose(found.distances.numpy(), ref_d[:, 1:], rtol=1e-9)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_all_pairs_blocks_computed_once_are_exact(monkeypatch, metric, points):
    import importlib

    module = importlib.import_module("kexue.hubness.knn")
    monkeypatch.setattr(module, "SYMMETRIC_BLOCK", 512)  # 4 blocks, the last one padded
    X = points(1800, 5, seed=11)
    ref_d, ref_i = brute_force_neighbors(X.numpy(), 6, metric=metric)
    found = knn(X, 6, metric=metric)
    np.testing.assert_array_equal(found.indices.numpy(), ref_i)
    np.testing.assert_allclose(found.distances.numpy(), ref_d, rtol=1e-9, atol=1e-12)
    kept = knn(X, 6, metric=metric, exclude_self=False)
    assert (kept.indices[:, 0] == torch.arange(1800)).all()
    np.testing.assert_array_equal(kept.indices[:, 1:].numpy(), ref_i[:, :5])


@pytest.mark.parametrize("scale", [1e19, 1e-30, 3e37])
@pytest.mark.parametrize("n", [50, 4200])  # the row-block search and the all-pairs blocks
def test_huge_and_tiny_magnitudes_give_the_unscaled_neighbours(scale, n, points):
    # squares of 1e19 overflow float32 (an IndexError from the padding, once), of 1e-30 vanish
    X = points(n, 4, seed=13, dtype=torch.float32)
    plain = knn(X, 3)
    scaled = knn(X * scale, 3)
    assert torch.equal(scaled.indices, plain.indices)
    fed = (X * scale).double().numpy() / scale  # what the search saw, in unscaled units
    ref_d, _ = brute_force_neighbors(fed[:200], 3, Y=None) if n == 50 else (None, None)
    rel = (scaled.distances.double() / scale / plain.distances.double() - 1).abs().max()
    assert rel < 1e-3  # float32 rounding of the scaled input and of the expansion, not 1e38
    if ref_d is not None:
        np.testing.assert_allclose(scaled.distances.double() / scale, ref_d, rtol=1e-3)
    cosine = knn(X * scale, 3, metric="cosine")
    assert torch.equal(cosine.indices, knn(X, 3, metric="cosine").indices)


def test_exact_ties_go_to_the_smaller_index_on_every_path(one_thread):
    # 5,000 points of {0, 1, 2}^16: nearly every neighbour list ends in an exact tie, so any
    # dependence on blocks, threads, dtype or backend would show in the indices
    X = tied_points(5000, 16, seed=1)
    found = {"all pairs": knn(X, 5).indices}  # N >= 4096: blocks of the symmetric matrix
    for chunk_size in (1, 7, 1000):
        found[f"chunk_size={chunk_size}"] = knn(X, 5, chunk_size=chunk_size).indices
    found["float64"] = knn(X.astype(np.float64), 5).indices
    found["rows"] = knn(X, 5, rows=np.arange(5000)).indices
    torch.set_num_threads(2)
    found["2 threads"] = knn(X, 5).indices
    found["2 threads, chunk_size=64"] = knn(X, 5, chunk_size=64).indices
    if is_available("faiss"):
        found["faiss flat"] = knn(X, 5, backend="faiss").indices
    first = found["all pairs"]
    for name, indices in found.items():
        assert torch.equal(indices, first), name
    # the float64 brute-force answer with ties broken by index: the first 300 rows' lists
    _, with_self = brute_force_neighbors(X, 6, Y=X[:300])
    expected = np.stack([row[row != i][:5] for i, row in enumerate(with_self)])
    np.testing.assert_array_equal(first[:300].numpy(), expected)


def test_hubness_scores_do_not_depend_on_threads_or_blocks(one_thread):
    X = tied_points(3000, 12, seed=2)
    runs = [Hubness(k=(5, 10)).fit(X).k_occurrence_]
    runs.append(Hubness(k=(5, 10), chunk_size=97).fit(X).k_occurrence_)
    torch.set_num_threads(2)
    runs.append(Hubness(k=(5, 10)).fit(X).k_occurrence_)
    for counts in runs[1:]:
        assert torch.equal(counts, runs[0])
    ref = brute_force_k_occurrence(X[:1500], 5)  # a smaller set: its own exact counts
    assert torch.equal(k_occurrence(X[:1500], 5), torch.from_numpy(ref))
