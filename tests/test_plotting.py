"""harmonypy.plotting renders off-screen (Agg) and leaves matplotlib's settings alone."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

matplotlib = pytest.importorskip("matplotlib", reason="matplotlib not installed")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import harmonypy as hm  # noqa: E402
from harmonypy import plotting  # noqa: E402


@pytest.fixture(scope="module")
def small_run():
    """A quick real run on simulated data: (pcs (300, 5), meta, Harmony)."""
    rng = np.random.default_rng(0)
    batch = np.repeat(["a", "b", "c"], 100)
    kind = np.tile(["t", "b"], 150)
    pcs = rng.normal(size=(300, 5)) + (kind == "t")[:, None] * 4.0
    pcs[:, 1] += np.select([batch == "a", batch == "b"], [3.0, -3.0], 0.0)
    meta = pd.DataFrame({"batch": batch, "cell_type": kind, "depth": rng.gamma(2.0, size=300)})
    ho = hm.run_harmony(pcs, meta, "batch", nclust=5, max_iter_harmony=4, verbose=False)
    return pcs, meta, ho


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _pixels_vary(fig) -> bool:
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba(), dtype=float)
    return image[..., :3].std() > 5


def test_convergence_plot(small_run):
    _, _, ho = small_run
    ax = plotting.plot_convergence(ho)
    lines = ax.get_lines()
    # One line per Harmony iteration plus the initial objective.
    assert len(lines) == ho.n_iter + 1
    n_points = sum(len(line.get_xdata()) for line in lines)
    assert n_points == len(ho.objective_kmeans) == 1 + sum(ho.kmeans_rounds)
    np.testing.assert_allclose(
        np.concatenate([ln.get_ydata() for ln in lines]), ho.objective_kmeans
    )
    assert "iteration" in ax.get_title()
    assert _pixels_vary(ax.figure)


def test_convergence_method_and_given_axes(small_run):
    _, _, ho = small_run
    fig, ax = plt.subplots()
    assert ho.plot_convergence(ax=ax) is ax


def test_convergence_without_initial_objective():
    # An object whose objective list has no initial entry is coloured by iteration too.
    fake = SimpleNamespace(objective_kmeans=[5.0, 4.0, 3.0, 2.9], kmeans_rounds=[2, 2])
    ax = plotting.plot_convergence(fake)
    assert len(ax.get_lines()) == 2
    assert ax.get_title() == "Harmony convergence"


def test_convergence_needs_a_run():
    with pytest.raises(ValueError, match="no objective"):
        plotting.plot_convergence(SimpleNamespace(objective_kmeans=[], kmeans_rounds=[]))


def test_embedding_plot_grid(small_run):
    pcs, meta, ho = small_run
    fig = plotting.plot_embedding(pcs, ho, meta, ["batch", "cell_type", "depth"])
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(axes) == 6  # rows = colour columns, columns = before / after
    assert axes[0].get_title() == "Before Harmony: batch"
    assert axes[1].get_title() == "After Harmony: batch"
    # Categorical columns get a legend with their levels, the numeric one a colour bar.
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["a", "b", "c"]
    assert axes[5].get_legend() is None and len(fig.axes) == 7
    # The after panel shows the corrected coordinates.
    after = axes[1].collections[0].get_offsets()
    np.testing.assert_allclose(np.sort(after[:, 1]), np.sort(ho.Z_corr.T[:, 1]), rtol=1e-6)
    assert _pixels_vary(fig)


def test_embedding_plot_dims_and_names(small_run):
    pcs, meta, ho = small_run
    before = pd.DataFrame(pcs, columns=[f"PC{i + 1}" for i in range(5)])
    after = pd.DataFrame(ho.Z_corr.T, columns=[f"PC{i + 1}_harmony" for i in range(5)])
    fig = plotting.plot_embedding(before, after, meta, "batch", dims=(0, 3))
    assert fig.axes[0].get_xlabel() == "PC1" and fig.axes[0].get_ylabel() == "PC4"
    assert fig.axes[1].get_ylabel() == "PC4_harmony"


def test_embedding_plot_into_given_figure(small_run):
    from matplotlib.figure import Figure

    pcs, meta, ho = small_run
    fig = Figure(figsize=plotting.embedding_figsize(1))
    assert plotting.plot_embedding(pcs, ho, meta, ["batch"], fig=fig) is fig
    assert len(fig.axes) == 2


def test_embedding_plot_errors(small_run):
    pcs, meta, ho = small_run
    with pytest.raises(KeyError, match="'donor'.*available"):
        plotting.plot_embedding(pcs, ho, meta, ["donor"])
    with pytest.raises(ValueError, match="same number of cells"):
        plotting.plot_embedding(pcs[:10], ho, meta, ["batch"])
    with pytest.raises(ValueError, match="basis"):
        plotting.plot_embedding(pcs, ho, meta, ["batch"], basis="tsne")
    with pytest.raises(ValueError, match="dims"):
        plotting.plot_embedding(pcs, ho, meta, ["batch"], dims=(0, 9))


def test_no_global_state_change(small_run):
    pcs, meta, ho = small_run
    before = dict(matplotlib.rcParams)
    plotting.plot_embedding(pcs, ho, meta, ["batch"])
    plotting.plot_convergence(ho)
    assert dict(matplotlib.rcParams) == before


def test_umap_needs_umap_learn(small_run, monkeypatch):
    pcs, meta, ho = small_run
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(ImportError, match="umap-learn"):
        plotting.plot_embedding(pcs, ho, meta, ["batch"], basis="umap")


def test_matplotlib_hint(monkeypatch, small_run):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install harmonypy\[plot\]"):
        plotting.plot_convergence(small_run[2])
