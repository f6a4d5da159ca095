"""The fast engine against the literal NumPy reference, step by step.

Both are driven by the same initial centroids and the same cell orders, so in
float64 they must agree to rounding error, and in float32 to float32 accuracy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from harmonypy.engine.design import build_design
from harmonypy.engine.harmony import Harmony
from reference_harmony import ReferenceHarmony


def _data(n_cells=240, n_dims=8, n_vars=1, seed=0):
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 4, n_cells)
    centres = rng.normal(0, 3, (4, n_dims))
    batches = rng.integers(0, 3, n_cells)
    shift = rng.normal(0, 1.5, (3, n_dims))
    z = centres[types] + shift[batches] + rng.normal(0, 0.7, (n_cells, n_dims))
    meta = pd.DataFrame({"batch": [f"b{b}" for b in batches]})
    if n_vars > 1:
        tech = rng.integers(0, 2, n_cells)
        z += rng.normal(0, 1.0, (2, n_dims))[tech]
        meta["tech"] = np.where(tech == 1, "x", "y")
    return z, meta


def replayed_blocks(generator, rows, n_rounds, n_cells, base):
    """The cells, in block order, of each online update the engine ran.

    The engine draws a permutation of R's rows per round; after a round, row p
    holds the p-th cell of that round's block order. From a fresh R (rows =
    cells) the permutation is read through ``base`` (``ho._shuffle_base``, the
    cells sorted by batch).
    """
    for _ in range(n_rounds):
        order = torch.randperm(n_cells, generator=generator)
        cells = base[order] if rows is None else rows[order]
        rows = cells
        yield cells.numpy()


def _pair(z, meta, variables, *, lamb, dtype, n_clusters=6, block_size=0.1, theta=2.0, sigma=None):
    design = build_design(meta, variables)
    theta_levels = np.full(design.n_levels, theta)
    lamb_levels = None if lamb is None else np.full(design.n_levels, lamb)
    sigma = np.full(n_clusters, 0.1) if sigma is None else sigma
    ho = Harmony(
        z,
        design,
        theta=theta_levels,
        lamb=lamb_levels,
        sigma=sigma,
        n_clusters=n_clusters,
        block_size=block_size,
        max_iter_kmeans=3,
        epsilon_cluster=-np.inf,
        epsilon_harmony=-np.inf,
        alpha=0.2,
        seed=3,
        device=torch.device("cpu"),
        dtype=dtype,
    )
    ref = ReferenceHarmony(
        z.T,
        design.one_hot(),
        theta_levels,
        lamb_levels,
        sigma,
        block_size,
        lambda_estimation=lamb is None,
    )
    return ho, ref


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("n_vars,lamb", [(1, 1.0), (1, None), (2, 1.0), (2, None)])
def test_engine_replays_reference(dtype, tol, n_vars, lamb):
    _replay(dtype, tol, n_vars, lamb)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("n_vars", [1, 2])
def test_engine_replays_reference_per_cluster_sigma_in_pieces(monkeypatch, dtype, tol, n_vars):
    """A bandwidth per cluster, and blocks (24 cells) split into pieces of 7."""
    from harmonypy.engine import online

    monkeypatch.setattr(online, "PIECE_ELEMENTS", 7 * 6)
    monkeypatch.setattr(online, "MIN_PIECE_ROWS", 1)
    _replay(dtype, tol, n_vars, None, sigma=np.linspace(0.05, 0.3, 6))


def _replay(dtype, tol, n_vars, lamb, sigma=None):
    z, meta = _data(n_vars=n_vars)
    variables = ["batch", "tech"][:n_vars]
    ho, ref = _pair(z, meta, variables, lamb=lamb, dtype=dtype, sigma=sigma)
    ho.init_cluster()
    ref.init_cluster(ho.Y.astype(np.float64))
    np.testing.assert_allclose(ho.R, ref.R, atol=tol)
    np.testing.assert_allclose(ho.objective_kmeans[0], ref.objective_kmeans[0], rtol=tol)

    # Orders are drawn in sequence, one per online update (the engine draws
    # each one an update ahead), so one replay generator follows them all.
    replay = torch.Generator().set_state(ho._generator.get_state())
    for _ in range(2):  # two Harmony iterations
        rows = ho._cache.rows
        ho.cluster()
        for cells in replayed_blocks(replay, rows, ho.kmeans_rounds[-1], ref.N, ho._shuffle_base):
            ref.cluster_round(cells)
        np.testing.assert_allclose(ho.R, ref.R, atol=tol)
        np.testing.assert_allclose(ho.O, ref.O, rtol=tol, atol=tol * ref.N)
        np.testing.assert_allclose(ho.E, ref.E, rtol=tol, atol=tol * ref.N)
        ours = np.array(
            [ho.objective_kmeans_dist, ho.objective_kmeans_entropy, ho.objective_kmeans_cross]
        ).T[-3:]
        np.testing.assert_allclose(ours, np.array(ref.parts[-3:]), rtol=10 * tol, atol=tol)
        ho.moe_correct_ridge()
        ref.moe_correct_ridge()
        scale = np.abs(ref.Z_corr).max()
        np.testing.assert_allclose(ho.Z_corr, ref.Z_corr, atol=10 * tol * scale)
        np.testing.assert_allclose(ho.Z_cos, ref.Z_cos, atol=10 * tol)


def test_objective_terms_match_formula_after_init():
    z, meta = _data()
    ho, ref = _pair(z, meta, ["batch"], lamb=1.0, dtype=torch.float64)
    ho.init_cluster()
    ref.init_cluster(ho.Y)
    np.testing.assert_allclose(
        [ho.objective_kmeans_dist[0], ho.objective_kmeans_entropy[0], ho.objective_kmeans_cross[0]],
        ref.parts[0],
        rtol=1e-10,
    )
