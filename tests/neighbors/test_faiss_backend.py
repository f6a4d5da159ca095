"""Tests of the faiss exact search (harmonypy.neighbors.faiss_backend) against the torch search."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import harmonypy as hm
from harmonypy import neighbors
from harmonypy.neighbors import faiss_backend

needs_faiss = pytest.mark.skipif(
    not faiss_backend.faiss_available(), reason="faiss-cpu not installed (harmonypy[faiss])"
)


def _blobs(n_per, n_clusters, dims=5, sep=4.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dims)) * sep
    lab = np.repeat(np.arange(n_clusters), n_per)
    return centres[lab] + rng.normal(size=(lab.size, dims)), lab


def _numpy_knn(X, k):
    """Exact neighbours (self excluded) by a float64 NumPy brute force."""
    diff = X[:, None, :] - X[None, :, :]
    d = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


@needs_faiss
def test_same_neighbours_and_distances_as_the_torch_exact_search():
    X, _ = _blobs(150, 4)
    got = neighbors.knn_faiss(X, 25)
    want = neighbors.knn_exact(X, 25)
    assert isinstance(got, neighbors.Neighbors)
    assert got.indices.dtype == np.int64 and got.distances.dtype == np.float64
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.distances, want.distances)
    d_np, _ = _numpy_knn(X, 25)
    np.testing.assert_allclose(got.distances, d_np, rtol=1e-12)


@needs_faiss
def test_some_cells_get_the_rows_of_the_full_search():
    X, _ = _blobs(100, 3, dims=8)
    cells = np.array([0, 7, 150, 299])
    full = neighbors.knn_faiss(X, 12)
    some = neighbors.knn_faiss(X, 12, cells=cells)
    np.testing.assert_array_equal(some.indices, full.indices[cells])
    np.testing.assert_array_equal(some.distances, full.distances[cells])


@needs_faiss
def test_float64_distances_below_float32_resolution_are_still_ranked_exactly(caplog, monkeypatch):
    # Two clusters 200 apart: after centring every norm is ~100, so float32's
    # |q|^2 + |r|^2 - 2 q.r (faiss's BLAS path, forced here; it otherwise
    # takes it for large query blocks) is off by ~1e-5 while the true squared
    # distances within a cluster are ~1e-6 (float64's error: ~1e-11). The
    # candidates' float32 order is noise; the certificate must send those rows
    # to the float64 brute force.
    faiss = faiss_backend.require_faiss()
    monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 1)
    rng = np.random.default_rng(1)
    X = np.vstack(
        [
            [100.0, 0.0, 0.0] + rng.normal(size=(60, 3)) * 1e-3,
            [-100.0, 0.0, 0.0] + rng.normal(size=(60, 3)) * 1e-3,
        ]
    )
    caplog.set_level(logging.DEBUG, logger="harmonypy.neighbors.faiss_backend")
    got = neighbors.knn_faiss(X, 5)
    d_np, i_np = _numpy_knn(X, 5)
    np.testing.assert_array_equal(got.indices, i_np)
    np.testing.assert_allclose(got.distances, d_np, rtol=1e-9)
    assert "120 of 120 rows re-searched in float64" in caplog.text


@needs_faiss
def test_copies_of_cells_come_in_either_order_with_the_same_lisi():
    # every cell twice: each cell's copy is at distance 0 and every neighbour
    # ties with its copy, so the searches may order them differently
    X, lab = _blobs(40, 3)
    X, lab = np.vstack([X, X]), np.concatenate([lab, lab])
    meta = pd.DataFrame({"lab": lab, "half": np.arange(lab.size) % 2})
    got = neighbors.knn_faiss(X, 15)
    want = neighbors.knn_exact(X, 15)
    np.testing.assert_array_equal(got.distances, want.distances)
    lisi_f = hm.compute_lisi(X, meta, ["lab", "half"], perplexity=5, neighbors="faiss")
    lisi_t = hm.compute_lisi(X, meta, ["lab", "half"], perplexity=5, neighbors="exact")
    np.testing.assert_allclose(lisi_f, lisi_t, rtol=0, atol=1e-12)


@needs_faiss
def test_thread_count_is_torchs_during_the_search_and_restored_after(monkeypatch):
    # torch's setting is faked (2) so that it differs from faiss's (1) even
    # where both libraries share one OpenMP runtime, as they do with some wheels
    faiss = faiss_backend.require_faiss()
    seen = []
    real = faiss.IndexFlatL2

    class Recording(real):
        def search(self, *args, **kwargs):
            seen.append(faiss.omp_get_max_threads())
            return super().search(*args, **kwargs)

    monkeypatch.setattr(faiss, "IndexFlatL2", Recording)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        neighbors.knn_faiss(_blobs(30, 2)[0], 5)
        assert seen == [2]
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)


@needs_faiss
def test_thread_count_is_restored_when_the_search_fails():
    faiss = faiss_backend.require_faiss()
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        with pytest.raises(RuntimeError, match="search failed"):
            with faiss_backend.faiss_threads(faiss, 2):
                assert faiss.omp_get_max_threads() == 2
                raise RuntimeError("search failed")
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)


@needs_faiss
def test_matches_r_lisi_with_faiss():
    env = os.environ.get("HARMONYPY_SHARED_DATA")
    paths = ([Path(env)] if env else []) + [Path(__file__).resolve().parents[3] / "shared" / "data"]
    path = next((p for p in paths if (p / "lisi_x.tsv.gz").is_file()), None)
    if path is None:
        pytest.skip("R reference data lisi_*.tsv.gz not found")
    X = pd.read_csv(path / "lisi_x.tsv.gz", sep="\t")
    meta = pd.read_csv(path / "lisi_metadata.tsv.gz", sep="\t")
    expected = pd.read_csv(path / "lisi_lisi.tsv.gz", sep="\t", index_col=0).to_numpy()
    got = hm.compute_lisi(X, meta, ["label1", "label2"], neighbors="faiss")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    torch_exact = hm.compute_lisi(X, meta, ["label1", "label2"], neighbors="exact")
    np.testing.assert_allclose(got, torch_exact, rtol=0, atol=1e-12)


def test_auto_uses_faiss_only_where_it_measured_faster(monkeypatch):
    monkeypatch.setattr(neighbors, "faiss_available", lambda: True)
    assert neighbors.resolve_method("auto", neighbors.FAISS_MIN_CELLS - 1) == "exact"
    assert neighbors.resolve_method("auto", neighbors.FAISS_MIN_CELLS) == "faiss"
    assert neighbors.resolve_method("auto", neighbors.EXACT_MAX_CELLS) == "faiss"
    assert neighbors.resolve_method("auto", neighbors.EXACT_MAX_CELLS + 1) == "ivf"
    assert neighbors.resolve_method("exact", neighbors.EXACT_MAX_CELLS) == "exact"
    monkeypatch.setattr(neighbors, "faiss_available", lambda: False)
    assert neighbors.resolve_method("auto", neighbors.EXACT_MAX_CELLS) == "exact"


def test_faiss_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now fails
    with pytest.raises(ImportError, match=r"neighbors='faiss'.*pip install harmonypy\[faiss\]"):
        neighbors.resolve_method("faiss", 100)
    X, _ = _blobs(20, 2)
    meta = pd.DataFrame({"lab": np.arange(40) % 2})
    with pytest.raises(ImportError, match=r"harmonypy\[faiss\]"):
        hm.compute_lisi(X, meta, "lab", perplexity=3, neighbors="faiss")
