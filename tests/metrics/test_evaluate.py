"""Tests of evaluate(): summary iLISI / cLISI scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import harmonypy as hm


def _data(mixed: bool, seed: int = 0):
    """Two cell types far apart; batches either interleaved or split."""
    rng = np.random.default_rng(seed)
    n = 200
    cell_type = np.repeat([0, 1], n // 2)
    X = np.c_[cell_type * 50.0, np.zeros(n)] + rng.normal(size=(n, 2))
    batch = rng.integers(0, 2, size=n) if mixed else (np.arange(n) % 100 < 50).astype(int)
    if not mixed:
        X[:, 1] += batch * 30.0
    meta = pd.DataFrame({"batch": np.array(["b1", "b2"])[batch], "cell_type": cell_type})
    return X, meta


def test_well_mixed_and_pure():
    X, meta = _data(mixed=True)
    res = hm.evaluate(X, meta, "batch", "cell_type", perplexity=10)
    assert res.n_cells == 200 and res.n_batches == 2 and res.n_labels == 2
    assert 1.7 < res.ilisi_median <= 2.0
    assert res.ilisi_scaled == pytest.approx(res.ilisi_median - 1.0)
    assert res.clisi_median == 1.0 and res.clisi_scaled == 1.0


def test_separated_batches_score_low():
    X, meta = _data(mixed=False)
    res = hm.evaluate(X, meta, "batch", perplexity=10)
    assert res.ilisi_median == pytest.approx(1.0)
    assert res.ilisi_scaled == pytest.approx(0.0)
    assert res.clisi_median is None and res.n_labels is None


def test_to_frame_and_repr():
    X, meta = _data(mixed=True)
    res = hm.evaluate(pd.DataFrame(X), meta, "batch", "cell_type", perplexity=10)
    frame = res.to_frame()
    assert frame.shape[0] == 1
    assert {"n_cells", "ilisi_median", "ilisi_scaled", "clisi_median", "clisi_scaled"} <= set(frame)
    text = repr(res)
    assert text.startswith("IntegrationScores(") and "iLISI=" in text and "cLISI=" in text
    with pytest.raises(AttributeError):
        res.n_cells = 3  # frozen


def test_matches_compute_lisi_median():
    X, meta = _data(mixed=True, seed=2)
    lisi = hm.compute_lisi(X, meta, ["batch", "cell_type"], perplexity=10, neighbors="exact")
    res = hm.evaluate(X, meta, "batch", "cell_type", perplexity=10, neighbors="exact")
    assert res.ilisi_median == pytest.approx(np.median(lisi[:, 0]))
    assert res.clisi_median == pytest.approx(np.median(lisi[:, 1]))


def test_single_batch_or_label_is_an_error():
    X, meta = _data(mixed=True)
    meta = meta.assign(one="x")
    with pytest.raises(ValueError, match="iLISI needs at least 2 batch"):
        hm.evaluate(X, meta, "one", perplexity=10)
    with pytest.raises(ValueError, match="label_key=None"):
        hm.evaluate(X, meta, "batch", "one", perplexity=10)


def test_bad_keys():
    X, meta = _data(mixed=True)
    with pytest.raises(ValueError, match="available columns"):
        hm.evaluate(X, meta, "donor", perplexity=10)
    with pytest.raises(TypeError, match="batch_key"):
        hm.evaluate(X, meta, ["batch"], perplexity=10)


def test_neighbors_option_passes_through():
    X, meta = _data(mixed=True, seed=4)
    exact = hm.evaluate(X, meta, "batch", "cell_type", perplexity=10, neighbors="exact")
    ivf = hm.evaluate(X, meta, "batch", "cell_type", perplexity=10, neighbors="ivf")
    # 200 cells: the IVF search probes enough lists to be exhaustive here
    assert ivf.ilisi_median == pytest.approx(exact.ilisi_median, abs=1e-12)
    with pytest.raises(ValueError, match="neighbors must be one of"):
        hm.evaluate(X, meta, "batch", perplexity=10, neighbors="kdtree")
