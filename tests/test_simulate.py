"""Tests for the simulated PCA embeddings in ``harmonypy._simulate``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harmonypy._simulate import simulate


def _nearest_centroid_accuracy(
    X: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int = 0
) -> tuple[float, float]:
    """Held-out accuracy of a nearest-centroid classifier for ``labels``.

    Centroids are fitted within each level of ``groups`` (cell types), on a
    random half of the cells, so the score measures how separable the labels
    are among cells of the same type.  Returns (accuracy, chance level),
    where chance is the accuracy of always guessing the majority label of
    each group.
    """
    rng = np.random.default_rng(seed)
    train = rng.random(len(labels)) < 0.5
    hits = majority = total = 0
    for g in np.unique(groups):
        in_g = groups == g
        levels = np.unique(labels[in_g & train])
        test = in_g & ~train & np.isin(labels, levels)
        if len(levels) < 2 or not test.any():
            continue
        centroids = np.stack([X[in_g & train & (labels == lv)].mean(axis=0) for lv in levels])
        d2 = ((X[test][:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
        hits += int((levels[d2.argmin(axis=1)] == labels[test]).sum())
        majority += int(pd.Series(labels[test]).value_counts().iloc[0])
        total += int(test.sum())
    return hits / total, majority / total


def test_shapes_dtypes_and_columns():
    X, meta = simulate(n_cells=3000, n_pcs=20, n_batches=4, n_cell_types=5, seed=1)
    assert X.shape == (3000, 20)
    assert X.dtype == np.float32
    assert X.flags.c_contiguous
    assert np.isfinite(X).all()
    assert list(meta.columns) == ["batch", "cell_type"]
    assert len(meta) == 3000
    assert isinstance(meta["batch"].dtype, pd.CategoricalDtype)
    assert list(meta["batch"].cat.categories) == ["b0", "b1", "b2", "b3"]
    assert set(meta["cell_type"]) <= {f"t{t}" for t in range(5)}
    assert all(isinstance(v, str) for v in meta["cell_type"].head())


def test_float64_and_second_batch_column():
    X, meta = simulate(2000, 10, 3, 4, seed=2, second_batch=2, dtype=np.float64)
    assert X.dtype == np.float64
    assert list(meta.columns) == ["batch", "cell_type", "batch2"]
    assert list(meta["batch2"].cat.categories) == ["tech0", "tech1"]
    # Crossed, not nested: some batch holds cells of both technologies.
    assert (pd.crosstab(meta["batch"], meta["batch2"]) > 0).all(axis=1).any()


def test_pca_like_profile_and_centred():
    X, _ = simulate(5000, 30, seed=3)
    sd = X.std(axis=0)
    assert sd[0] > 2 * sd[-1]  # variance decreases along PCs
    assert np.all(np.abs(X.mean(axis=0)) < 1e-3 * sd)


def test_deterministic_for_seed_and_leaves_global_rng_alone():
    state = np.random.get_state()[1].copy()
    X1, m1 = simulate(2000, 10, 3, 4, seed=7, second_batch=2)
    X2, m2 = simulate(2000, 10, 3, 4, seed=7, second_batch=2)
    X3, _ = simulate(2000, 10, 3, 4, seed=8, second_batch=2)
    np.testing.assert_array_equal(X1, X2)
    pd.testing.assert_frame_equal(m1, m2)
    assert not np.array_equal(X1, X3)
    np.testing.assert_array_equal(np.random.get_state()[1], state)


def test_composition_has_absent_types_but_stays_valid():
    _, meta = simulate(10000, 10, 8, 10, seed=0)
    counts = pd.crosstab(meta["batch"], meta["cell_type"])
    assert (counts == 0).to_numpy().any()  # some types missing from some batches
    assert counts.shape == (8, 10)  # every batch and type occurs
    assert (counts.sum(axis=1) > 0).all() and (counts.sum(axis=0) > 0).all()
    # Compositions differ between batches, not just by sampling noise.
    props = counts.div(counts.sum(axis=1), axis=0)
    assert props.max(axis=0).min() > 0  # guard against degenerate columns
    assert (props.max(axis=0) - props.min(axis=0)).max() > 0.1


@pytest.mark.parametrize("absent_fraction", [0.0, 0.9, 0.99])
def test_every_batch_and_type_present_even_when_mostly_absent(absent_fraction):
    _, meta = simulate(500, 5, 6, 7, seed=4, absent_fraction=absent_fraction)
    assert meta["batch"].value_counts().min() >= 1
    assert meta["batch"].nunique() == 6
    assert meta["cell_type"].nunique() == 7


def test_smallest_valid_size():
    X, meta = simulate(n_cells=5, n_pcs=2, n_batches=2, n_cell_types=3, seed=0)
    assert X.shape == (5, 2)
    assert meta["batch"].nunique() == 2 and meta["cell_type"].nunique() == 3


def test_batches_separable_before_correction():
    X, meta = simulate(8000, 20, 4, 5, seed=5, second_batch=2)
    types = meta["cell_type"].to_numpy()
    acc, chance = _nearest_centroid_accuracy(X, meta["batch"].astype(str).to_numpy(), types)
    assert acc > 0.9 and acc > chance + 0.3
    acc2, chance2 = _nearest_centroid_accuracy(X, meta["batch2"].astype(str).to_numpy(), types)
    assert acc2 > chance2 + 0.1
    # Cell types, the biology to keep, are separated more than batches are.
    acc_t, _ = _nearest_centroid_accuracy(X, types, np.zeros(len(types), dtype=int))
    assert acc_t > 0.9


def test_no_batch_effect_means_no_batch_signal():
    X, meta = simulate(8000, 20, 4, 5, seed=6, batch_shift=0.0, type_shift=0.0)
    acc, chance = _nearest_centroid_accuracy(
        X, meta["batch"].astype(str).to_numpy(), meta["cell_type"].to_numpy()
    )
    assert acc < chance + 0.1


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(n_cells=10, n_batches=8, n_cell_types=10), ValueError),
        (dict(n_cells=0), ValueError),
        (dict(n_cells=100.0), TypeError),
        (dict(n_cells=True), TypeError),
        (dict(n_pcs=1), ValueError),
        (dict(n_batches=0), ValueError),
        (dict(n_cell_types=0), ValueError),
        (dict(second_batch=0), ValueError),
        (dict(second_batch="2"), TypeError),
        (dict(absent_fraction=1.0), ValueError),
        (dict(absent_fraction=-0.1), ValueError),
        (dict(batch_shift=-1.0), ValueError),
        (dict(type_shift=float("nan")), ValueError),
        (dict(noise=float("inf")), ValueError),
        (dict(type_spread="big"), TypeError),
        (dict(dtype=np.int32), ValueError),
        (dict(dtype=np.float16), ValueError),
    ],
)
def test_invalid_arguments(kwargs, error):
    args = dict(n_cells=1000, n_pcs=10)
    args.update(kwargs)
    with pytest.raises(error):
        simulate(**args)


def test_large_simulation_is_fast_and_light():
    # Guards the vectorised path; 1M cells take a few seconds, 200k << 1 s.
    X, meta = simulate(200_000, 50, seed=0)
    assert X.shape == (200_000, 50) and X.nbytes == 200_000 * 50 * 4
    assert len(meta) == 200_000
