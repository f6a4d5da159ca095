"""Harmony2 mode (R harmony 2.0.x): agreement with R and each of its differences."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_engine_reference import _data, replayed_blocks
from test_harmony import per_pc_correlation, simulated

import harmonypy as hm
from conftest import read_tsv
from harmonypy.engine.correction import batch_filter, solve_arrowhead, solve_dense
from harmonypy.engine.design import build_design
from harmonypy.engine.harmony import Harmony
from reference_harmony import ReferenceHarmony


@pytest.fixture(scope="module")
def pbmc2(shared_data):
    meta = read_tsv(shared_data / "pbmc_3500_meta.tsv.gz")
    pcs = read_tsv(shared_data / "pbmc_3500_pcs.tsv.gz")
    ref = read_tsv(shared_data / "pbmc_3500_pcs_harmonized_harmony2.tsv.gz").to_numpy()
    return pcs, meta, ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_r_harmony2(pbmc2, seed):
    pcs, meta, ref = pbmc2
    ho = hm.run_harmony(
        pcs, meta, ["donor"], algorithm="harmony2", random_state=seed, verbose=False
    )
    assert per_pc_correlation(ho.Z_corr.T, ref).min() >= 0.99


def test_harmony2_defaults_apply_only_to_parameters_not_passed():
    z, meta = simulated()
    ho = hm.run_harmony(z, meta, "batch", algorithm="harmony2", verbose=False)
    assert ho.max_iter_kmeans == 4
    assert ho.epsilon_cluster == 1e-3 and ho.epsilon_harmony == 1e-2
    assert (ho.lamb[1:] == -1).all()  # estimated
    assert all(r <= 4 for r in ho.kmeans_rounds)
    explicit = hm.run_harmony(
        z,
        meta,
        "batch",
        algorithm="harmony2",
        verbose=False,
        max_iter_kmeans=20,
        epsilon_cluster=1e-5,
        lamb=1.0,
        epsilon_harmony=1e-4,
    )
    assert explicit.max_iter_kmeans == 20 and explicit.epsilon_cluster == 1e-5
    assert explicit.epsilon_harmony == 1e-4 and (explicit.lamb[1:] == 1).all()
    # and Harmony 1 keeps the seed's defaults
    h1 = hm.run_harmony(z, meta, "batch", verbose=False, max_iter_harmony=1)
    assert h1.max_iter_kmeans == 20 and h1.epsilon_cluster == 1e-5 and (h1.lamb[1:] == 1).all()


def test_harmony2_accepts_harmonypy2_arguments():
    z, meta = simulated()
    before = torch.get_num_threads()
    ho = hm.run_harmony(
        z, meta, "batch", algorithm="harmony2", batch_prop_cutoff=1e-4, ncores=1, verbose=False
    )
    assert ho.batch_prop_cutoff == 1e-4
    assert torch.get_num_threads() == before


def test_centroids_are_normalised_intercepts():
    z, meta = simulated()
    ho = hm.run_harmony(z, meta, "batch", algorithm="harmony2", verbose=False)
    intercept = ho.W_intercept
    np.testing.assert_allclose(ho.Y, intercept / np.linalg.norm(intercept, axis=0), atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 3e-4)])
@pytest.mark.parametrize("n_vars", [1, 2])
def test_harmony2_replays_reference(dtype, tol, n_vars):
    """Every Harmony2 step, including the batch filter, against the literal reference."""
    z, meta = _data(n_vars=n_vars, n_cells=300)
    # Make one level rare so that the batch filter drops it in some clusters.
    meta.loc[meta.index[:297], "batch"] = np.where(
        meta["batch"][:297] == "b2", "b0", meta["batch"][:297]
    )
    variables = ["batch", "tech"][:n_vars]
    design = build_design(meta, variables)
    theta = np.full(design.n_levels, 2.0)
    sigma = np.full(8, 0.1)
    cutoff = 0.05
    ho = Harmony(
        z,
        design,
        theta=theta,
        lamb=None,
        sigma=sigma,
        n_clusters=8,
        block_size=0.1,
        max_iter_kmeans=3,
        epsilon_cluster=-np.inf,
        epsilon_harmony=-np.inf,
        alpha=0.2,
        seed=5,
        device=torch.device("cpu"),
        dtype=dtype,
        algorithm="harmony2",
        batch_prop_cutoff=cutoff,
    )
    ref = ReferenceHarmony(
        z.T,
        design.one_hot(),
        theta,
        None,
        sigma,
        0.1,
        lambda_estimation=True,
        harmony2=True,
        level_variable=design.level_variable,
        batch_prop_cutoff=cutoff,
    )
    ho.init_cluster()
    ref.init_cluster(ho.Y.astype(np.float64))
    dropped = 0
    replay = torch.Generator().set_state(ho._generator.get_state())
    for iteration in range(3):
        if iteration > 0:
            ref.soft_assign()
        rows = None if iteration > 0 else ho._cache.rows  # Harmony2 starts each step afresh
        ho.cluster()
        for cells in replayed_blocks(replay, rows, ho.kmeans_rounds[-1], ref.N, ho._shuffle_base):
            ref.cluster_round(cells)
        np.testing.assert_allclose(ho.R, ref.R, atol=tol)
        ho.moe_correct_ridge()
        ref.moe_correct_ridge()
        dropped += int((~ho.kept_levels).sum())
        np.testing.assert_allclose(ho.Z_corr, ref.Z_corr, atol=20 * tol * np.abs(ref.Z_corr).max())
        np.testing.assert_allclose(ho.Y, ref.Y, atol=20 * tol)
    assert dropped > 0, "the test data should exercise the batch filter"


def _random_system(n_clusters=5, n_levels=4, d=3, seed=0):
    rng = np.random.default_rng(seed)
    observed = torch.tensor(rng.uniform(0.5, 20, (n_clusters, n_levels)))
    penalty = torch.tensor(rng.uniform(0.1, 2, (n_clusters, n_levels)))
    total = observed.sum(1)
    rhs0 = torch.tensor(rng.normal(size=(n_clusters, d)))
    rhs = torch.tensor(rng.normal(size=(n_clusters, n_levels, d)))
    cov = torch.zeros((n_clusters, n_levels + 1, n_levels + 1), dtype=torch.float64)
    cov[:, 0, 0] = total
    cov[:, 0, 1:] = observed
    cov[:, 1:, 0] = observed
    idx = torch.arange(n_levels)
    cov[:, idx + 1, idx + 1] = observed + penalty
    return total, observed, penalty, rhs0, rhs, cov


def test_arrowhead_equals_dense_inverse():
    total, observed, penalty, rhs0, rhs, cov = _random_system()
    intercept, coef = solve_arrowhead(total, observed, penalty, rhs0, rhs)
    full = torch.linalg.inv(cov) @ torch.cat([rhs0[:, None], rhs], dim=1)
    np.testing.assert_allclose(intercept, full[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(coef, full[:, 1:], rtol=1e-10, atol=1e-12)


def test_dropped_level_equals_deleting_it_from_the_system():
    total, observed, penalty, rhs0, rhs, cov = _random_system()
    keep = torch.ones_like(observed, dtype=torch.bool)
    keep[0, 2] = False
    keep[3, 0] = False
    for solver in ("arrowhead", "dense"):
        if solver == "arrowhead":
            intercept, coef = solve_arrowhead(total, observed, penalty, rhs0, rhs, keep)
        else:
            intercept, coef = solve_dense(cov, rhs0, rhs, keep)
        assert coef[0, 2].abs().max() == 0 and coef[3, 0].abs().max() == 0
        for k in (0, 3):
            rows = [0] + [1 + b for b in range(4) if keep[k, b]]
            reduced = cov[k][rows][:, rows]
            full_rhs = torch.cat([rhs0[k][None], rhs[k]], dim=0)[rows]
            expected = torch.linalg.solve(reduced, full_rhs)
            np.testing.assert_allclose(intercept[k], expected[0], rtol=1e-10)
            np.testing.assert_allclose(coef[k][keep[k]], expected[1:], rtol=1e-10)


def test_batch_filter_rules():
    # 2 clusters; variable 0 has levels 0-2, variable 1 has levels 3-4.
    counts = torch.tensor([100.0, 100.0, 100.0, 150.0, 150.0])
    level_variable = torch.tensor([0, 0, 0, 1, 1])
    observed = torch.tensor(
        [
            [50.0, 0.0, 30.0, 40.0, 40.0],  # level 1 absent
            [50.0, 0.0, 0.0, 60.0, 1e-6],
        ]
    )  # one level left in var 0
    keep = batch_filter(observed, counts, level_variable, 1e-5)
    assert keep[0].tolist() == [True, False, True, True, True]
    # cluster 1: variable 0 keeps a single level -> dropped whole; level 4 below cutoff
    # leaves variable 1 with one level -> dropped whole too: nothing left to correct.
    assert keep[1].tolist() == [False, False, False, False, False]


def test_absent_level_cells_keep_their_coordinates_for_that_cluster():
    """A level filtered out of a cluster gets no correction from it."""
    rng = np.random.default_rng(0)
    n = 200
    z = rng.normal(size=(n, 4)) + 5
    z[90:180] += 2  # level b is shifted
    labels = np.array(["a"] * 90 + ["b"] * 90 + ["c"] * 20)
    design = build_design(pd.DataFrame({"batch": labels}), ["batch"])
    ho = Harmony(
        z,
        design,
        theta=np.full(3, 2.0),
        lamb=None,
        sigma=np.full(2, 0.1),
        n_clusters=2,
        block_size=0.1,
        max_iter_kmeans=2,
        epsilon_cluster=-np.inf,
        epsilon_harmony=-np.inf,
        alpha=0.2,
        seed=0,
        device=torch.device("cpu"),
        dtype=torch.float64,
        algorithm="harmony2",
    )
    ho.init_cluster()
    # Cluster 0 holds the cells of a and b and a sliver (1e-9) of each c cell;
    # cluster 1 holds only c, so its one variable has a single level left.
    r = np.zeros((n, 2))
    r[:180] = [1.0, 0.0]
    r[180:] = [1e-9, 1 - 1e-9]
    ho._assignments = torch.tensor(r)
    ho._recount()
    ho.moe_correct_ridge()
    assert ho.kept_levels.tolist() == [[True, True, False], [False, False, False]]
    moved = np.abs(ho.Z_orig.T - ho.Z_corr.T).max(1)
    assert moved[:180].min() > 0.1  # a and b are aligned with each other
    assert (moved[180:] == 0).all()  # c is in no regression: untouched
    # Harmony 1 has no filter: the same sliver moves c, if only a little.
    ho.algorithm = "harmony1"
    ho.moe_correct_ridge()
    assert np.abs(ho.Z_orig.T[180:] - ho.Z_corr.T[180:]).max() > 0
