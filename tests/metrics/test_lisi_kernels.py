"""Tests of the numba kernel of LISI's scores against the numpy path."""

from __future__ import annotations

import numpy as np
import pytest

from harmonypy.metrics import lisi as _lisi

pytest.importorskip("numba")
import numba  # noqa: E402

from harmonypy.metrics import _lisi_kernels  # noqa: E402


def _neighbours(n_cells, n_neighbors, scale, seed):
    """Ascending positive distances and random neighbours."""
    rng = np.random.default_rng(seed)
    dist = np.sort(rng.gamma(4.0, scale, size=(n_cells, n_neighbors)), axis=1)
    idx = rng.integers(0, n_cells, size=(n_cells, n_neighbors))
    return dist, idx


def _scores(monkeypatch, path, dist, idx, codes, perplexity):
    monkeypatch.setenv("HARMONYPY_FUSED", "always" if path == "numba" else "0")
    return _lisi._lisi_from_knn(dist, idx, codes, perplexity)


@pytest.mark.parametrize("n_categories", [1, 3, 64, 65, 1000])
def test_kernel_equals_numpy_path(monkeypatch, n_categories):
    dist, idx = _neighbours(3000, 29, scale=2.0, seed=n_categories)
    rng = np.random.default_rng(1)
    codes = [rng.integers(0, n_categories, 3000), rng.integers(0, 2, 3000)]
    got = _scores(monkeypatch, "numba", dist, idx, codes, 10.0)
    expected = _scores(monkeypatch, "numpy", dist, idx, codes, 10.0)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


def test_underflowing_rows_are_minus_one_on_both_paths(monkeypatch):
    # Row 0: every weight underflows at every beta R tries (-1 in R); row 1:
    # weights in exp's subnormal range at beta = 1 (the C library's exp,
    # not the polynomial, whose cut-off is -708); the rest ordinary.
    dist, idx = _neighbours(200, 14, scale=1.0, seed=3)
    dist[0] = 1e30
    dist[1] = np.linspace(709.0, 744.0, 14)
    codes = [np.arange(200) % 3]
    got = _scores(monkeypatch, "numba", dist, idx, codes, 5.0)
    expected = _scores(monkeypatch, "numpy", dist, idx, codes, 5.0)
    assert got[0, 0] == -1.0 and expected[0, 0] == -1.0
    assert got[1, 0] > 0
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


def test_kernel_gives_the_same_bits_on_any_thread_count():
    dist, idx = _neighbours(2000, 29, scale=3.0, seed=5)
    codes = np.stack([np.arange(2000) % 4, np.arange(2000) % 7])
    n_cats = np.array([4, 7])
    outs = []
    caller = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            out = np.empty((2000, 2))
            _lisi_kernels.simpson_indices(dist, idx, codes, n_cats, (np.log(10.0), 1e-5, 50), out)
            outs.append(out)
    finally:
        numba.set_num_threads(caller)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_the_default_runs_the_kernel_from_a_size(monkeypatch, caplog):
    monkeypatch.delenv("HARMONYPY_FUSED", raising=False)
    dist, idx = _neighbours(100, 14, scale=1.0, seed=0)
    with caplog.at_level("DEBUG", logger="harmonypy.metrics.lisi"):
        _lisi._lisi_from_knn(dist, idx, [np.arange(100) % 2], 5.0)
    assert "LISI scores: numpy (100 cells, below the 50,000" in caplog.text
