"""Tests of compute_lisi: agreement with R's lisi, properties, validation."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harmonypy as hm
from harmonypy import neighbors
from harmonypy.metrics import lisi as _lisi

HAVE_PYNNDESCENT = importlib.util.find_spec("pynndescent") is not None


def _shared_data_dir() -> Path | None:
    env = os.environ.get("HARMONYPY_SHARED_DATA")
    for path in ([Path(env)] if env else []) + [
        Path(__file__).resolve().parents[3] / "shared" / "data"
    ]:
        if (path / "lisi_x.tsv.gz").is_file():
            return path
    return None


@pytest.fixture(scope="module")
def r_lisi():
    path = _shared_data_dir()
    if path is None:
        pytest.skip(
            "R reference data lisi_*.tsv.gz not found (../shared/data or $HARMONYPY_SHARED_DATA)"
        )
    X = pd.read_csv(path / "lisi_x.tsv.gz", sep="\t")
    meta = pd.read_csv(path / "lisi_metadata.tsv.gz", sep="\t")
    expected = pd.read_csv(path / "lisi_lisi.tsv.gz", sep="\t", index_col=0)
    return X, meta, expected


def _blobs(n_per, n_clusters, dims=5, sep=100.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dims)) * sep
    lab = np.repeat(np.arange(n_clusters), n_per)
    X = centres[lab] + rng.normal(size=(lab.size, dims))
    return X, lab


# --------------------------------------------------------------------------- #
# Agreement with the R package
# --------------------------------------------------------------------------- #
@pytest.fixture(params=["numpy", "numba"])
def score_path(request, monkeypatch):
    """The scores by numpy, or by the numba kernel (at any size)."""
    if request.param == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("HARMONYPY_FUSED", "always" if request.param == "numba" else "0")
    return request.param


def test_matches_r_lisi(r_lisi, score_path):
    X, meta, expected = r_lisi
    got = hm.compute_lisi(X, meta, ["label1", "label2"])
    assert got.shape == expected.shape
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected.to_numpy(), rtol=0, atol=1e-5)


def test_matches_r_lisi_numpy_and_single_label(r_lisi):
    X, meta, expected = r_lisi
    got = hm.compute_lisi(X.to_numpy(), meta, "label2", perplexity=30, neighbors="exact")
    assert got.shape == (len(X), 1)
    np.testing.assert_allclose(got[:, 0], expected["label2"].to_numpy(), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- #
# Properties
# --------------------------------------------------------------------------- #
def test_pure_neighbourhoods_give_one():
    X, lab = _blobs(60, 3)
    meta = pd.DataFrame({"cluster": lab, "name": np.array(["a", "b", "c"])[lab]})
    got = hm.compute_lisi(X, meta, ["cluster", "name"], perplexity=10)
    # 1 / (sum of normalised weights)^2: equal to 1 up to the last bit
    np.testing.assert_allclose(got, 1.0, rtol=0, atol=1e-12)


def test_interleaved_labels_approach_two():
    # two copies of a grid, one per label: every neighbourhood holds both
    # labels in equal numbers except for the cell's own twin (excluded self)
    grid = np.stack(np.meshgrid(np.arange(40.0), np.arange(40.0)), -1).reshape(-1, 2)
    X = np.vstack([grid, grid + 1e-3])
    meta = pd.DataFrame({"lab": np.repeat(["a", "b"], len(grid))})
    medians = []
    for perplexity in (5, 10, 30):
        got = hm.compute_lisi(X, meta, "lab", perplexity=perplexity)[:, 0]
        assert np.all(got > 1.0) and np.all(got <= 2.0 + 1e-12)
        medians.append(np.median(got))
    assert medians[0] < medians[1] < medians[2]
    assert medians[2] > 1.9
    # random labels on a dense cloud: median close to 2
    rng = np.random.default_rng(0)
    got = hm.compute_lisi(rng.random((3000, 2)), pd.DataFrame({"l": rng.integers(0, 2, 3000)}), "l")
    assert 1.9 < np.median(got) <= 2.0


def test_many_categories_path_matches_table_path():
    rng = np.random.default_rng(3)
    P = rng.random((50, 40))
    P /= P.sum(1, keepdims=True)
    codes = rng.integers(0, 100, size=(50, 40))
    table = _lisi._simpson(P, codes, 100)  # > 64 categories: run-length path
    expected = np.array(
        [sum(P[i, codes[i] == c].sum() ** 2 for c in range(100)) for i in range(50)]
    )
    np.testing.assert_allclose(table, expected, rtol=1e-12)
    small = codes % 5
    expected5 = np.array([sum(P[i, small[i] == c].sum() ** 2 for c in range(5)) for i in range(50)])
    np.testing.assert_allclose(_lisi._simpson(P, small, 5), expected5, rtol=1e-12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_cells=st.integers(30, 120),
    n_categories=st.integers(1, 5),
    perplexity=st.sampled_from([3, 5, 8.5, 10]),
)
def test_lisi_bounds_and_label_invariance(seed, n_cells, n_categories, perplexity):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_cells, 3))
    codes = rng.integers(0, n_categories, size=n_cells)
    names = np.array([f"cat{i}" for i in range(n_categories)])
    meta = pd.DataFrame({"codes": codes, "names": names[codes]})
    # relabel: permute category names, and make it categorical
    perm = rng.permutation(n_categories)
    meta["renamed"] = pd.Categorical(np.array([f"z{p}" for p in perm])[codes])
    got = hm.compute_lisi(X, meta, ["codes", "names", "renamed"], perplexity=perplexity)
    n_present = len(np.unique(codes))
    assert np.all(got >= 1.0 - 1e-12)
    assert np.all(got <= n_present + 1e-12)
    np.testing.assert_array_equal(got[:, 0], got[:, 1])
    np.testing.assert_allclose(got[:, 0], got[:, 2], rtol=0, atol=1e-12)

    # permuting the cells permutes the result
    order = rng.permutation(n_cells)
    got_perm = hm.compute_lisi(
        X[order], meta.iloc[order].reset_index(drop=True), ["names"], perplexity=perplexity
    )
    np.testing.assert_allclose(got_perm[:, 0], got[order, 1], rtol=0, atol=1e-9)


def test_degenerate_weights_give_minus_one_like_r(caplog, score_path):
    # distances so large that exp(-beta * d) underflows even after 50 halvings
    X, lab = _blobs(20, 2, dims=2, sep=1.0)
    X = X * 1e30
    meta = pd.DataFrame({"lab": lab})
    with caplog.at_level(logging.WARNING, logger="harmonypy.metrics.lisi"):
        got = hm.compute_lisi(X, meta, "lab", perplexity=5)
    assert np.all(got == -1.0)
    assert "-1" in caplog.text


def test_does_not_touch_global_state():
    threads = torch.get_num_threads()
    state = np.random.get_state()[1].copy()
    X, lab = _blobs(40, 2)
    hm.compute_lisi(X, pd.DataFrame({"l": lab}), "l", perplexity=5)
    assert torch.get_num_threads() == threads
    np.testing.assert_array_equal(np.random.get_state()[1], state)


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #
@pytest.fixture
def small():
    X, lab = _blobs(30, 2)
    return X, pd.DataFrame({"batch": np.array(["a", "b"])[lab], "num": lab})


def test_shape_mismatch_names_both_shapes(small):
    X, meta = small
    with pytest.raises(ValueError, match=r"\(60, 5\).*\(59, 2\)"):
        hm.compute_lisi(X, meta.iloc[:-1], "batch", perplexity=5)


def test_missing_column_lists_available(small):
    X, meta = small
    with pytest.raises(ValueError, match=r"nope.*available columns.*batch.*num"):
        hm.compute_lisi(X, meta, ["batch", "nope"], perplexity=5)


def test_missing_labels_named_with_count(small):
    X, meta = small
    meta = meta.copy()
    meta.loc[[0, 3, 7], "batch"] = None
    with pytest.raises(ValueError, match=r"'batch' has 3 missing"):
        hm.compute_lisi(X, meta, "batch", perplexity=5)


def test_non_finite_x_counted(small):
    X, meta = small
    X = X.copy()
    X[0, 0] = np.nan
    X[1, 1] = np.inf
    with pytest.raises(ValueError, match="2 non-finite"):
        hm.compute_lisi(X, meta, "batch", perplexity=5)


def test_perplexity_too_large_names_both_numbers(small):
    X, meta = small
    with pytest.raises(ValueError, match=r"3 \* perplexity = 90 cells.*got 60"):
        hm.compute_lisi(X, meta, "batch")
    # exactly 3 * perplexity cells is enough
    assert hm.compute_lisi(X, meta, "batch", perplexity=20).shape == (60, 1)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), 0.5])
def test_bad_perplexity(small, bad):
    X, meta = small
    with pytest.raises(ValueError, match="perplexity"):
        hm.compute_lisi(X, meta, "batch", perplexity=bad)


def test_type_errors(small):
    X, meta = small
    with pytest.raises(TypeError, match="DataFrame"):
        hm.compute_lisi(X, meta.to_dict(), "batch", perplexity=5)
    with pytest.raises(TypeError, match="numeric"):
        hm.compute_lisi(np.full((60, 2), "x"), meta, "batch", perplexity=5)
    with pytest.raises(TypeError, match="perplexity"):
        hm.compute_lisi(X, meta, "batch", perplexity="30")
    with pytest.raises(ValueError, match="2-dimensional"):
        hm.compute_lisi(X[:, 0], meta, "batch", perplexity=5)
    with pytest.raises(ValueError, match="empty"):
        hm.compute_lisi(X, meta, [], perplexity=5)


def test_unknown_neighbors_option(small):
    X, meta = small
    with pytest.raises(ValueError, match="neighbors must be one of"):
        hm.compute_lisi(X, meta, "batch", perplexity=5, neighbors="kdtree")


@pytest.mark.skipif(HAVE_PYNNDESCENT, reason="pynndescent is installed")
def test_pynndescent_without_backend_says_how_to_install(small):
    X, meta = small
    with pytest.raises(ImportError, match=r"harmonypy\[ann\].*ivf"):
        hm.compute_lisi(X, meta, "batch", perplexity=5, neighbors="pynndescent")


def test_auto_switches_to_ivf_above_threshold(monkeypatch, small):
    X, meta = small
    used = []
    real = neighbors.knn_ivf
    monkeypatch.setattr(neighbors, "knn_ivf", lambda *a, **k: used.append(1) or real(*a, **k))
    hm.compute_lisi(X, meta, "batch", perplexity=5)
    assert not used, "auto must stay exact at or below EXACT_MAX_CELLS"
    monkeypatch.setattr(neighbors, "EXACT_MAX_CELLS", len(X) - 1)
    got = hm.compute_lisi(X, meta, "batch", perplexity=5)
    assert used == [1]
    # "approx" is the IVF search too
    np.testing.assert_array_equal(
        got, hm.compute_lisi(X, meta, "batch", perplexity=5, neighbors="approx")
    )


# --------------------------------------------------------------------------- #
# Approximate backend
# --------------------------------------------------------------------------- #
@pytest.mark.slow  # pynndescent's numba compilation takes ~30 s or more on first use
@pytest.mark.skipif(
    not HAVE_PYNNDESCENT, reason="pynndescent not installed (pip install harmonypy[ann])"
)
def test_approx_agrees_with_exact():
    rng = np.random.default_rng(5)
    X, lab = _blobs(500, 4, dims=10, sep=4.0)
    meta = pd.DataFrame({"type": lab, "batch": rng.integers(0, 3, size=lab.size)})
    exact = hm.compute_lisi(X, meta, ["type", "batch"], perplexity=20, neighbors="exact")
    approx = hm.compute_lisi(X, meta, ["type", "batch"], perplexity=20, neighbors="approx")
    assert np.abs(approx - exact).max() < 0.05
    assert np.median(np.abs(approx - exact)) < 1e-6


# --------------------------------------------------------------------------- #
# IVF backend
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def clustered_20k():
    from harmonypy._simulate import simulate

    X, meta = simulate(20_000, 30, 4, 10, seed=3)
    X = X.astype(np.float64)
    k = _lisi._neighbourhood_size(30, len(X))
    return X, meta, neighbors.knn_exact(X, k), neighbors.knn_ivf(X, k)


def test_ivf_scores_close_to_exact(clustered_20k):
    # The search's recall is tested in test_neighbors.py; here its effect on LISI.
    X, meta, exact, ivf = clustered_20k
    codes = [_lisi._encode_labels(meta[c], c) for c in ("batch", "cell_type")]
    ex = _lisi._lisi_from_knn(exact.distances, exact.indices, codes, 30.0)
    iv = _lisi._lisi_from_knn(ivf.distances, ivf.indices, codes, 30.0)
    err = np.abs(iv - ex)
    assert np.median(err) < 1e-3
    assert np.quantile(err, 0.99) < 0.1
    np.testing.assert_allclose(np.median(iv, axis=0), np.median(ex, axis=0), rtol=1e-3)


@pytest.mark.parametrize(
    "n_jobs, error",
    [(0, ValueError), (-2, ValueError), (1.5, TypeError), ("4", TypeError), (True, TypeError)],
)
def test_bad_n_jobs_is_named(n_jobs, error):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    meta = pd.DataFrame({"b": np.arange(60) % 2})
    with pytest.raises(error, match="n_jobs"):
        hm.compute_lisi(X, meta, "b", perplexity=5, n_jobs=n_jobs)


# --------------------------------------------------------------------------- #
# evaluate(n_query=...): a random sample of cells, neighbours among all cells
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def sim_3000():
    from harmonypy._simulate import simulate

    X, meta = simulate(3000, 10, 3, 4, seed=2)
    return X.astype(np.float64), meta


def test_evaluate_sample_scores_sampled_cells_exactly(sim_3000):
    X, meta = sim_3000
    full = hm.compute_lisi(X, meta, ["batch", "cell_type"], neighbors="exact")
    state = np.random.get_state()[1].copy()
    torch_state = torch.get_rng_state()
    res = hm.evaluate(X, meta, "batch", "cell_type", n_query=400, seed=1)
    np.testing.assert_array_equal(np.random.get_state()[1], state)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert (res.n_cells, res.n_cells_total) == (400, 3000)
    assert "random sample of 3000" in repr(res)
    cells = np.sort(np.random.default_rng(1).choice(3000, 400, replace=False))
    np.testing.assert_allclose(res.ilisi_median, np.median(full[cells, 0]), rtol=1e-12)
    np.testing.assert_allclose(res.clisi_median, np.median(full[cells, 1]), rtol=1e-12)
    assert res.n_cells_total == res.to_frame()["n_cells_total"].item()


def test_evaluate_sample_of_every_cell_is_the_full_score(sim_3000):
    X, meta = sim_3000
    whole = hm.evaluate(X, meta, "batch")
    assert hm.evaluate(X, meta, "batch", n_query=5000) == whole
    assert (whole.n_cells, whole.n_cells_total) == (3000, 3000)
    assert "sample" not in repr(whole)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_query": 0}, ValueError, "n_query must be a positive"),
        ({"n_query": 1.5}, TypeError, "n_query must be an integer"),
        ({"n_query": True}, TypeError, "n_query must be an integer"),
        ({"n_query": 10, "seed": -1}, ValueError, "seed must be a non-negative"),
        ({"n_query": 10, "seed": "0"}, TypeError, "seed must be an integer"),
        ({"n_query": 10, "neighbors": "ivf"}, ValueError, "n_query.*neighbors='ivf'"),
    ],
)
def test_evaluate_sample_arguments_named(small, kwargs, error, match):
    X, meta = small
    with pytest.raises(error, match=match):
        hm.evaluate(X, meta, "batch", perplexity=5, **kwargs)
