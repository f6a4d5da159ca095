"""Tests of the IVF search's numba kernel against its PyTorch path."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from harmonypy import neighbors

pytest.importorskip("numba")
import numba  # noqa: E402


def _cloud(n_cells, dims=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dims)) * 4
    return centres[rng.integers(0, 12, n_cells)] + rng.normal(size=(n_cells, dims))


def _search(monkeypatch, path, X, k, **kwargs):
    monkeypatch.setenv("HARMONYPY_FUSED", "always" if path == "numba" else "0")
    return neighbors.knn_ivf(X, k, **kwargs)


@pytest.mark.parametrize("n_probe", [None, 2, 40])
def test_kernel_finds_what_the_torch_path_finds(monkeypatch, n_probe):
    X = _cloud(4000)
    fused = _search(monkeypatch, "numba", X, 29, n_probe=n_probe)
    torch_path = _search(monkeypatch, "torch", X, 29, n_probe=n_probe)
    np.testing.assert_array_equal(fused.indices, torch_path.indices)
    np.testing.assert_allclose(fused.distances, torch_path.distances, rtol=1e-13, atol=1e-13)
    assert np.all(np.diff(fused.distances, axis=1) >= 0)
    assert not np.any(fused.indices == np.arange(4000)[:, None])  # self excluded


def test_ties_are_ranked_by_position_on_both_paths(monkeypatch):
    # 300 points, each three times: every neighbourhood has exact ties
    X = np.repeat(_cloud(300, dims=4, seed=1), 3, axis=0)
    fused = _search(monkeypatch, "numba", X, 20, n_lists=6)
    torch_path = _search(monkeypatch, "torch", X, 20, n_lists=6)
    np.testing.assert_array_equal(fused.indices, torch_path.indices)
    np.testing.assert_array_equal(fused.distances[:, :2], 0.0)  # the two twins


def test_kernel_search_of_some_cells_gives_their_rows(monkeypatch):
    X = _cloud(3000, seed=2)
    every = _search(monkeypatch, "numba", X, 29)
    cells = np.random.default_rng(0).choice(3000, 250, replace=False)
    some = _search(monkeypatch, "numba", X, 29, cells=cells)
    np.testing.assert_array_equal(some.indices, every.indices[cells])
    np.testing.assert_array_equal(some.distances, every.distances[cells])


def test_kernel_gives_the_same_result_on_any_thread_count(monkeypatch):
    X = _cloud(3000, seed=3)
    caller = numba.get_num_threads()
    results = []
    for threads in (1, 2):
        monkeypatch.setattr("torch.get_num_threads", lambda threads=threads: threads)
        results.append(_search(monkeypatch, "numba", X, 29))
    assert numba.get_num_threads() == caller  # the caller's setting is back
    np.testing.assert_array_equal(results[0].indices, results[1].indices)
    np.testing.assert_array_equal(results[0].distances, results[1].distances)


def test_the_choice_is_logged(monkeypatch, caplog):
    monkeypatch.delenv("HARMONYPY_FUSED", raising=False)
    with caplog.at_level(logging.INFO, logger="harmonypy.neighbors.ivf"):
        neighbors.knn_ivf(_cloud(500), 9)
    assert "IVF search: torch operations (500 cells, below the 50,000" in caplog.text
