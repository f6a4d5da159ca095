"""run_harmony and the Harmony object: agreement with R, attributes, options."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import harmonypy as hm
from conftest import read_tsv


@pytest.fixture(scope="module")
def pbmc(shared_data):
    meta = read_tsv(shared_data / "pbmc_3500_meta.tsv.gz")
    pcs = read_tsv(shared_data / "pbmc_3500_pcs.tsv.gz")
    ref = read_tsv(shared_data / "pbmc_3500_pcs_harmonized.tsv.gz").to_numpy()
    return pcs, meta, ref


@pytest.fixture(scope="module")
def pbmc_run(pbmc):
    pcs, meta, _ = pbmc
    return hm.run_harmony(pcs, meta, ["donor"], verbose=False)


def per_pc_correlation(a, b):
    return np.array([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])])


def simulated(n_cells=300, n_dims=10, seed=0, n_batches=3):
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    z = (
        rng.normal(0, 4, (3, n_dims))[types]
        + rng.normal(0, 2, (n_batches, n_dims))[batches]
        + rng.normal(0, 0.5, (n_cells, n_dims))
    )
    meta = pd.DataFrame(
        {
            "batch": [f"b{b}" for b in batches],
            "type": types,
            "tech": rng.choice(["x", "y"], n_cells),
        }
    )
    return z, meta


def batch_spread(z, labels):
    """Mean distance of per-batch centroids from the overall centroid, per type."""
    centre = z.mean(0)
    return np.mean([np.linalg.norm(z[labels == b].mean(0) - centre) for b in np.unique(labels)])


# --------------------------------------------------------------- agreement with R
def test_seed_readme_example_matches_r(pbmc_run, pbmc):
    corrected = pbmc_run.Z_corr.T
    r = per_pc_correlation(corrected, pbmc[2])
    assert corrected.shape == (3500, 30)
    assert r.min() >= 0.995, r


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_matches_r_for_other_seeds(pbmc, seed):
    pcs, meta, ref = pbmc
    ho = hm.run_harmony(pcs, meta, ["donor"], verbose=False, random_state=seed)
    assert per_pc_correlation(ho.Z_corr.T, ref).min() >= 0.995


def test_float64_matches_r(pbmc):
    pcs, meta, ref = pbmc
    ho = hm.run_harmony(pcs, meta, "donor", verbose=False, dtype="float64")
    assert ho.Z_corr.dtype == np.float64
    assert per_pc_correlation(ho.Z_corr.T, ref).min() >= 0.995


# --------------------------------------------------------------- attributes
def test_attribute_shapes_and_invariants(pbmc_run):
    ho = pbmc_run
    N, d, K, B = 3500, 30, 100, 3
    assert (ho.N, ho.d, ho.K, ho.B) == (N, d, K, B)
    shapes = {
        "Z_corr": (d, N),
        "Z_orig": (d, N),
        "Z_cos": (d, N),
        "R": (K, N),
        "Y": (d, K),
        "O": (K, B),
        "E": (K, B),
        "Phi": (B, N),
        "Phi_moe": (B + 1, N),
        "Pr_b": (B,),
        "theta": (B,),
        "sigma": (K,),
        "lamb": (B + 1,),
    }
    for name, shape in shapes.items():
        value = getattr(ho, name)
        assert isinstance(value, np.ndarray), name
        assert value.shape == shape, name
    np.testing.assert_allclose(ho.R.sum(0), 1, atol=1e-5)
    assert (ho.Phi_moe[0] == 1).all()
    np.testing.assert_array_equal(ho.Phi_moe[1:], ho.Phi)
    assert (ho.Phi.sum(0) == 1).all()
    assert ho.lamb[0] == 0 and (ho.lamb[1:] == 1).all()
    np.testing.assert_allclose(ho.Pr_b.sum(), 1)
    np.testing.assert_allclose(np.linalg.norm(ho.Z_cos, axis=0), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ho.Y, axis=0), 1, atol=1e-5)
    # O is R Phi^T and E = rowsum(R) x Pr_b.
    np.testing.assert_allclose(ho.O, ho.R @ ho.Phi.T, rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(ho.E, np.outer(ho.R.sum(1), ho.Pr_b), rtol=1e-3, atol=1e-2)
    assert (ho.theta == 2).all() and (ho.sigma == 0.1).all()


def test_objective_bookkeeping(pbmc_run):
    ho = pbmc_run
    assert np.isfinite(ho.objective_harmony).all()
    assert ho.objective_harmony[-1] < ho.objective_harmony[0]
    assert len(ho.objective_harmony) == ho.n_iter + 1
    assert len(ho.kmeans_rounds) == ho.n_iter
    assert len(ho.objective_kmeans) == 1 + sum(ho.kmeans_rounds)
    parts = np.array(
        [ho.objective_kmeans_dist, ho.objective_kmeans_entropy, ho.objective_kmeans_cross]
    ).sum(0)
    np.testing.assert_allclose(parts, ho.objective_kmeans)
    # each Harmony objective is the last clustering objective of its iteration
    ends = np.cumsum(ho.kmeans_rounds)
    np.testing.assert_allclose(ho.objective_harmony[1:], np.array(ho.objective_kmeans)[ends])


def test_input_is_not_modified(pbmc):
    pcs, meta, _ = pbmc
    pcs_before, meta_before = pcs.copy(), meta.copy()
    ho = hm.run_harmony(pcs, meta, ["donor"], verbose=False, max_iter_harmony=1)
    pd.testing.assert_frame_equal(pcs, pcs_before)
    pd.testing.assert_frame_equal(meta, meta_before)
    np.testing.assert_array_equal(ho.Z_orig.T, pcs.to_numpy().astype(np.float32))


# --------------------------------------------------------------- reproducibility
def test_same_seed_is_bit_identical_and_seeds_differ():
    z, meta = simulated()
    a = hm.run_harmony(z, meta, "batch", verbose=False, random_state=7).Z_corr
    b = hm.run_harmony(z, meta, "batch", verbose=False, random_state=7).Z_corr
    c = hm.run_harmony(z, meta, "batch", verbose=False, random_state=8).Z_corr
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# --------------------------------------------------------------- options
def test_orientation_is_inferred():
    z, meta = simulated()
    a = hm.run_harmony(z, meta, "batch", verbose=False)
    b = hm.run_harmony(z.T.copy(), meta, "batch", verbose=False)
    assert a.Z_corr.shape == b.Z_corr.shape == (z.shape[1], z.shape[0])
    np.testing.assert_array_equal(a.Z_corr, b.Z_corr)


def test_correction_removes_batch_shift():
    z, meta = simulated(n_cells=600)
    labels = meta["batch"].to_numpy()
    ho = hm.run_harmony(z, meta, "batch", verbose=False)
    before = batch_spread(z, labels)
    after = batch_spread(ho.Z_corr.T, labels)
    assert after < 0.6 * before  # harmonypy 0.2.0 reaches the same 0.42 here


def test_two_batch_variables():
    rng = np.random.default_rng(1)
    z, meta = simulated(n_cells=600)
    tech = meta["tech"].to_numpy()
    z = z + np.where(tech == "x", 3.0, -3.0)[:, None] * rng.normal(0, 1, z.shape[1])
    ho = hm.run_harmony(z, meta, ["batch", "tech"], verbose=False)
    assert ho.B == 5 and ho.Phi.shape == (5, 600)
    assert (ho.Phi.sum(0) == 2).all()  # one level of each variable per cell
    assert ho.batch_levels == ["batch=b0", "batch=b1", "batch=b2", "tech=x", "tech=y"]
    # the technology shift is removed only when tech is a batch variable
    only_batch = hm.run_harmony(z, meta, ["batch"], verbose=False)
    assert batch_spread(ho.Z_corr.T, tech) < 0.5 * batch_spread(only_batch.Z_corr.T, tech)
    assert batch_spread(ho.Z_corr.T, tech) < 0.6 * batch_spread(z, tech)


def test_dynamic_lambda():
    z, meta = simulated()
    ho = hm.run_harmony(z, meta, "batch", lamb=-1, verbose=False, alpha=0.3)
    assert ho.lamb.shape == (4,) and ho.lamb[0] == 0 and (ho.lamb[1:] == -1).all()
    est = ho.lamb_estimated
    assert est.shape == (ho.K, ho.B + 1)
    np.testing.assert_allclose(est[:, 1:], 0.3 * ho.E)
    fixed = hm.run_harmony(z, meta, "batch", lamb=1, verbose=False)
    assert not np.allclose(ho.Z_corr, fixed.Z_corr)


def test_heavier_ridge_penalty_corrects_less():
    z, meta = simulated()
    light = hm.run_harmony(z, meta, "batch", lamb=0.1, verbose=False, max_iter_harmony=1)
    heavy = hm.run_harmony(z, meta, "batch", lamb=1e6, verbose=False, max_iter_harmony=1)
    assert np.abs(heavy.Z_corr.T - z).max() < 1e-2
    assert np.abs(light.Z_corr.T - z).max() > 0.5


def test_tau_shrinks_theta_of_small_batches():
    z, meta = simulated()
    counts = meta["batch"].value_counts().sort_index().to_numpy()
    ho = hm.run_harmony(z, meta, "batch", tau=5, nclust=10, verbose=False, max_iter_harmony=1)
    expected = 2 * (1 - np.exp(-((counts / (10 * 5)) ** 2)))
    np.testing.assert_allclose(ho.theta, expected)


def test_theta_per_level_and_per_variable():
    z, meta = simulated()
    per_level = hm.run_harmony(
        z, meta, ["batch", "tech"], theta=[1, 2, 3, 0.5, 0], verbose=False, max_iter_harmony=1
    )
    np.testing.assert_allclose(per_level.theta, [1, 2, 3, 0.5, 0])
    per_var = hm.run_harmony(
        z, meta, ["batch", "tech"], theta=[1, 4], verbose=False, max_iter_harmony=1
    )
    np.testing.assert_allclose(per_var.theta, [1, 1, 1, 4, 4])
    lamb = hm.run_harmony(
        z, meta, ["batch", "tech"], lamb=[0.5, 2], verbose=False, max_iter_harmony=1
    )
    np.testing.assert_allclose(lamb.lamb, [0, 0.5, 0.5, 0.5, 2, 2])


def test_theta_zero_gives_plain_soft_kmeans():
    """With theta = 0 the diversity penalty vanishes: R is a softmax of -dist/sigma."""
    z, meta = simulated()
    ho = hm.run_harmony(z, meta, "batch", theta=0, verbose=False, max_iter_harmony=1)
    # R was computed before the correction, from the cosine-normalised input.
    zc = ho.Z_orig / np.linalg.norm(ho.Z_orig, axis=0)
    logits = -2 * (1 - ho.Y.T @ zc) / 0.1
    softmax = np.exp(logits - logits.max(0))
    softmax /= softmax.sum(0)
    np.testing.assert_allclose(ho.R, softmax, atol=1e-4)


@pytest.mark.parametrize("n_cells", [6, 15, 39])
def test_tiny_inputs(n_cells):
    z, meta = simulated(n_cells=n_cells, seed=n_cells)
    meta["batch"] = ["b0", "b1"] * (n_cells // 2) + ["b0"] * (n_cells % 2)
    ho = hm.run_harmony(z, meta, "batch", verbose=False)
    assert ho.K == max(1, round(n_cells / 30))
    assert ho.block_size == 0.2
    assert np.isfinite(ho.Z_corr).all() and ho.Z_corr.shape == (10, n_cells)
    np.testing.assert_allclose(ho.R.sum(0), 1, atol=1e-5)


def test_fewer_than_six_cells_refused():
    z, meta = simulated(n_cells=5)
    with pytest.raises(ValueError, match="at least 6 cells"):
        hm.run_harmony(z, meta, "batch", verbose=False)


def test_sigma_per_cluster_and_nclust():
    z, meta = simulated()
    sigma = np.linspace(0.05, 0.2, 7)
    ho = hm.run_harmony(z, meta, "batch", nclust=7, sigma=sigma, verbose=False, max_iter_harmony=2)
    assert ho.K == 7 and ho.R.shape == (7, 300)
    np.testing.assert_allclose(ho.sigma, sigma)


def test_epsilon_minus_inf_runs_all_iterations():
    z, meta = simulated()
    ho = hm.run_harmony(
        z,
        meta,
        "batch",
        verbose=False,
        max_iter_harmony=3,
        max_iter_kmeans=6,
        epsilon_cluster=-np.inf,
        epsilon_harmony=-np.inf,
    )
    assert ho.n_iter == 3 and ho.kmeans_rounds == [6, 6, 6] and not ho.converged


def test_meta_as_series():
    z, meta = simulated()
    a = hm.run_harmony(z, meta, "batch", verbose=False, max_iter_harmony=2)
    b = hm.run_harmony(z, meta["batch"], verbose=False, max_iter_harmony=2)
    np.testing.assert_array_equal(a.Z_corr, b.Z_corr)


def test_device_argument_cpu():
    z, meta = simulated()
    a = hm.run_harmony(z, meta, "batch", verbose=False, device="cpu", max_iter_harmony=2)
    b = hm.run_harmony(
        z, meta, "batch", verbose=False, device=torch.device("cpu"), max_iter_harmony=2
    )
    np.testing.assert_array_equal(a.Z_corr, b.Z_corr)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_agrees_with_cpu():
    z, meta = simulated()
    cpu = hm.run_harmony(z, meta, "batch", verbose=False, device="cpu")
    gpu = hm.run_harmony(z, meta, "batch", verbose=False, device="cuda")
    assert per_pc_correlation(cpu.Z_corr.T, gpu.Z_corr.T).min() > 0.99


@pytest.mark.skipif(
    not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    reason="no Apple MPS device on this machine",
)
def test_mps_agrees_with_cpu():
    z, meta = simulated()
    cpu = hm.run_harmony(z, meta, "batch", verbose=False, device="cpu")
    mps = hm.run_harmony(z, meta, "batch", verbose=False, device="mps")
    assert per_pc_correlation(cpu.Z_corr.T, mps.Z_corr.T).min() > 0.99


# ------------------------------------------------- result(out=): no second copy
def test_result_into_a_callers_array_in_chunks(monkeypatch, tmp_path):
    import harmonypy.engine.arrays as arrays

    x, meta = simulated(n_cells=300, n_batches=3)
    ho = hm.run_harmony(x, meta, "batch", dtype="float64", verbose=False)
    expected = ho.Z_corr.T
    monkeypatch.setattr(arrays, "COPY_CHUNK_ROWS", 7)  # 43 chunks, the last one short
    same = ho.result(out=np.empty((300, 10), dtype=np.float64))
    np.testing.assert_array_equal(same, expected)
    cast = np.full((300, 10), np.nan, dtype=np.float32)
    assert ho.result(out=cast) is cast
    np.testing.assert_array_equal(cast, expected.astype(np.float32))
    on_disk = np.lib.format.open_memmap(
        tmp_path / "z.npy", mode="w+", dtype=np.float32, shape=(300, 10)
    )
    ho.result(out=on_disk)
    on_disk.flush()
    np.testing.assert_array_equal(np.load(tmp_path / "z.npy"), expected.astype(np.float32))
    assert ho.numpy_dtype == np.float64
    # Without out: a fresh array in the run's dtype, the same values.
    np.testing.assert_array_equal(ho.result(), expected)


@pytest.mark.parametrize(
    "out, error, match",
    [
        (np.empty((10, 300)), ValueError, r"shape \(300, 10\)"),
        (np.empty((300, 10), dtype=np.int64), ValueError, "float dtype"),
        ([[0.0] * 10] * 300, TypeError, "NumPy array"),
    ],
)
def test_result_out_is_checked(out, error, match):
    x, meta = simulated(n_cells=300)
    ho = hm.run_harmony(x, meta, "batch", max_iter_harmony=1, verbose=False)
    with pytest.raises(error, match=match):
        ho.result(out=out)
    frozen = np.empty((300, 10), dtype=np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ho.result(out=frozen)


# ------------------------------------------- memory-lean paths: same results
def _lean_problem(n_cells=1500):
    x, meta = simulated(n_cells=n_cells, n_batches=4)
    return np.ascontiguousarray(x, dtype=np.float32), meta


@pytest.mark.parametrize("algorithm", ["harmony1", "harmony2"])
def test_memory_mapped_input_gives_the_same_result(tmp_path, algorithm):
    """A read-only memory-mapped .npy is used without a copy and gives the
    in-memory result bit for bit; the file is not written to."""
    x, meta = _lean_problem()
    np.save(tmp_path / "x.npy", x)
    before = (tmp_path / "x.npy").read_bytes()
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    kwargs = dict(verbose=False, algorithm=algorithm, max_iter_harmony=3)
    in_memory = hm.run_harmony(x, meta, "batch", **kwargs)
    from_disk = hm.run_harmony(mapped, meta, "batch", **kwargs)
    np.testing.assert_array_equal(from_disk.Z_corr, in_memory.Z_corr)
    np.testing.assert_array_equal(from_disk.R, in_memory.R)
    assert np.shares_memory(from_disk.Z_orig, mapped)  # not copied
    assert (tmp_path / "x.npy").read_bytes() == before


def test_converted_input_gives_the_same_result_as_the_callers_conversion():
    """float64 or Fortran-ordered input run in float32 is converted in chunks:
    the same numbers as converting it first."""
    x, meta = _lean_problem()
    ref = hm.run_harmony(x, meta, "batch", verbose=False, max_iter_harmony=2)
    for variant, copied in (
        (x.astype(np.float64), True),
        (np.asfortranarray(x), True),
        (x.T, False),
    ):  # PCs x cells of a C array: cells x PCs as is
        ho = hm.run_harmony(variant, meta, "batch", verbose=False, max_iter_harmony=2)
        np.testing.assert_array_equal(ho.Z_corr, ref.Z_corr)
        assert np.shares_memory(ho.Z_orig, variant) is not copied


def test_input_array_is_used_not_written():
    x, meta = _lean_problem()
    copy = x.copy()
    ho = hm.run_harmony(x, meta, "batch", verbose=False, max_iter_harmony=2)
    np.testing.assert_array_equal(x, copy)
    assert np.shares_memory(ho.Z_orig, x)  # float32, C-contiguous: wrapped
    assert not np.shares_memory(ho.Z_corr, x)
    # Z_corr and result() are the engine's array, not copies.
    assert np.shares_memory(ho.Z_corr, ho.result())
    assert ho.result().flags.c_contiguous and ho.result().shape == (len(x), x.shape[1])
    # Z_cos is computed from it: unit rows in the direction of Z_corr's.
    z_cos = ho.Z_cos.T
    np.testing.assert_allclose(np.linalg.norm(z_cos, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(
        z_cos,
        ho.Z_corr.T / np.linalg.norm(ho.Z_corr.T, axis=1, keepdims=True),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("algorithm", ["harmony1", "harmony2"])
def test_result_does_not_depend_on_cells_being_sorted_by_batch(algorithm):
    """Cells stay in the caller's order; the shuffles read through the cells
    sorted by batch, so sorting the input first only changes rounding."""
    x, meta = _lean_problem()
    order = np.argsort(meta["batch"].to_numpy(), kind="stable")
    kwargs = dict(verbose=False, algorithm=algorithm, dtype="float64", max_iter_harmony=3)
    plain = hm.run_harmony(x, meta, "batch", **kwargs)
    sorted_run = hm.run_harmony(
        x[order], meta.iloc[order].reset_index(drop=True), "batch", **kwargs
    )
    back = np.empty_like(plain.Z_corr)
    back[:, order] = sorted_run.Z_corr
    assert plain.kmeans_rounds == sorted_run.kmeans_rounds
    np.testing.assert_allclose(back, plain.Z_corr, rtol=0, atol=1e-8 * np.abs(back).max())


def test_result_with_dtype_copies_only_when_it_must():
    x, meta = _lean_problem(300)
    ho = hm.run_harmony(x, meta, "batch", verbose=False, max_iter_harmony=1)
    assert np.shares_memory(ho.result(dtype=np.float32), ho.Z_corr)
    wide = ho.result(dtype=np.float64)
    assert wide.dtype == np.float64 and not np.shares_memory(wide, ho.Z_corr)
    np.testing.assert_array_equal(wide, ho.Z_corr.T.astype(np.float64))
    with pytest.raises(TypeError, match="either out or dtype"):
        ho.result(out=np.empty((300, x.shape[1])), dtype=np.float64)


def test_run_options_are_run_harmonys_keyword_options():
    """RunOptions is the one internal list of the options: its fields are
    run_harmony's parameters by name (taken from its arguments), and every
    option that is not per process is compared across a distributed run."""
    import dataclasses
    import inspect

    from harmonypy.engine.options import RunOptions

    parameters = set(inspect.signature(hm.run_harmony).parameters)
    not_options = {"data_mat", "meta_data", "vars_use", "distributed", "process_group", "callback"}
    assert {f.name for f in dataclasses.fields(RunOptions)} == parameters - not_options
    options = RunOptions(**{name: 1 for name in parameters - not_options})
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.theta = 2
    assert set(options.shared_settings()) == parameters - not_options - {
        "verbose",
        "random_state",
        "device",
        "dtype",
        "ncores",
        "check_memory",
    }


def _not_clustered():
    """A Harmony built by hand whose init_cluster has not run yet."""
    from harmonypy.engine.design import build_design
    from harmonypy.engine.harmony import Harmony

    z, meta = simulated(n_cells=60, n_dims=4)
    return Harmony(
        z,
        build_design(meta, ["batch"]),
        theta=np.full(3, 2.0),
        lamb=np.full(3, 1.0),
        sigma=np.full(5, 0.1),
        n_clusters=5,
        block_size=0.1,
        max_iter_kmeans=2,
        epsilon_cluster=1e-5,
        epsilon_harmony=1e-4,
        alpha=0.2,
        seed=0,
        device=torch.device("cpu"),
        dtype=torch.float64,
    )


@pytest.mark.parametrize(
    "step, what",
    [
        (lambda ho: ho.R, "assignments"),
        (lambda ho: ho.Y, "centroids"),
        (lambda ho: ho.O, "counts"),
        (lambda ho: ho.E, "counts"),
        (lambda ho: ho.update_R(), "assignments"),
        (lambda ho: ho.compute_objective(0.0, 0.0), "counts"),
        (lambda ho: ho.moe_correct_ridge(), "assignments"),
        (lambda ho: ho.cluster(), "assignments"),
    ],
)
def test_reading_or_stepping_before_init_cluster_says_so(step, what):
    """The clustering state exists from init_cluster on: before it, an error names
    what is missing and the step that makes it, instead of a failure on None."""
    ho = _not_clustered()
    with pytest.raises(RuntimeError, match=rf"no {what} yet: call init_cluster\(\) first"):
        step(ho)
    # What does not need the clustering reads as before.
    assert ho.Z_corr.shape == (4, 60) and ho.lamb_estimated is None and ho.kept_levels is None
    ho.init_cluster()
    assert ho.R.shape == (5, 60) and np.allclose(ho.R.sum(0), 1)
