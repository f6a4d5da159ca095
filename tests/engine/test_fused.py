"""The fused CPU kernels of the clustering round (numba, ``HARMONYPY_FUSED``)
against the torch path: the same results up to rounding (per-PC r >= 0.99999,
objective trace to 1e-5 relative), and the same bits on every run."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from test_harmony import per_pc_correlation

import harmonypy as hm
from harmonypy._simulate import simulate
from harmonypy.engine import fused

pytest.importorskip("numba")

MIN_R = 0.99999
OBJECTIVE_RTOL = 1e-5


@pytest.fixture(scope="module")
def data():
    z, meta = simulate(n_cells=1500, n_pcs=10, n_batches=4, seed=3, second_batch=3)
    return z, meta


def run(monkeypatch, path, z, meta, **options):
    monkeypatch.setenv(fused.ENV_VARIABLE, "always" if path == "fused" else "0")
    options.setdefault("random_state", 0)
    return hm.run_harmony(z, meta, options.pop("vars_use", "batch"), verbose=False, **options)


def assert_agree(eager, fast):
    assert eager.n_iter == fast.n_iter
    assert eager.kmeans_rounds == fast.kmeans_rounds
    assert per_pc_correlation(eager.Z_corr, fast.Z_corr).min() >= MIN_R
    np.testing.assert_allclose(
        fast.objective_harmony, eager.objective_harmony, rtol=OBJECTIVE_RTOL, atol=0
    )
    np.testing.assert_allclose(
        fast.objective_kmeans, eager.objective_kmeans, rtol=OBJECTIVE_RTOL, atol=0
    )


@pytest.mark.filterwarnings("ignore:Harmony did not converge")
@pytest.mark.parametrize("algorithm", ["harmony1", "harmony2"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("vars_use", [["batch"], ["batch", "batch2"]])
def test_fused_equals_eager(monkeypatch, data, algorithm, dtype, vars_use):
    z, meta = data
    options = {"algorithm": algorithm, "dtype": dtype, "vars_use": vars_use, "max_iter_harmony": 3}
    eager = run(monkeypatch, "eager", z, meta, **options)
    fast = run(monkeypatch, "fused", z, meta, **options)
    assert_agree(eager, fast)


@pytest.mark.filterwarnings("ignore:Harmony did not converge")
@pytest.mark.parametrize(
    "options",
    [
        {"lamb": -1, "algorithm": "harmony1"},
        # Per-cluster bandwidths: the objective's sums are taken per cluster.
        {"sigma": np.linspace(0.05, 0.3, 12), "nclust": 12},
        # A small sigma puts the softmax's shift far above the largest logit,
        # so the kernel redoes rows with their maximum.
        {"sigma": 0.004, "dtype": "float32"},
        # Many small blocks, pieces of a few cells.
        {"block_size": 0.01, "algorithm": "harmony2", "dtype": "float64"},
    ],
    ids=["lamb-1", "sigma-per-cluster", "small-sigma", "small-blocks"],
)
def test_fused_equals_eager_on_other_options(monkeypatch, data, options):
    z, meta = data
    options = dict(options, max_iter_harmony=3)
    eager = run(monkeypatch, "eager", z, meta, **options)
    fast = run(monkeypatch, "fused", z, meta, **options)
    assert_agree(eager, fast)


@pytest.mark.filterwarnings("ignore:Harmony did not converge")
@pytest.mark.parametrize("algorithm", ["harmony1", "harmony2"])
def test_fused_gives_the_same_bits_on_every_run(monkeypatch, data, algorithm):
    z, meta = data
    first = run(monkeypatch, "fused", z, meta, algorithm=algorithm, max_iter_harmony=2)
    again = run(monkeypatch, "fused", z, meta, algorithm=algorithm, max_iter_harmony=2)
    np.testing.assert_array_equal(first.Z_corr, again.Z_corr)
    np.testing.assert_array_equal(first.R, again.R)
    assert first.objective_kmeans == again.objective_kmeans


@pytest.mark.parametrize("n_variables", [1, 2])
def test_kernel_sums_do_not_depend_on_the_thread_count(n_variables):
    """The lanes, not the threads, fix the order of every sum: one piece on
    1 and on 2 threads gives the same bits (R, batch sums, objective)."""
    from harmonypy.engine import _numba_kernels as kernels

    rng = np.random.default_rng(0)
    n, n_clusters, n_levels, n_next = 997, 12, 5, 3
    logits = rng.normal(size=(n, n_clusters)).astype(np.float32)
    log_penalty = rng.normal(size=(n_levels, n_clusters)).astype(np.float32)
    codes = rng.integers(0, n_levels, size=(n, n_variables))
    row_penalty = (
        np.empty((0, n_clusters), np.float32)
        if n_variables == 1
        else rng.normal(size=(n, n_clusters)).astype(np.float32)
    )
    shift = np.full(n_clusters, 2.0, np.float32)
    bound = np.array([log_penalty.max() + np.log(n_variables) + 3], np.float32)
    next_block = rng.integers(0, n_next, size=n)
    results = []
    before = kernels.get_threads()
    try:
        for threads in (1, min(2, sys.modules["numba"].config.NUMBA_NUM_THREADS)):
            kernels.set_threads(threads)
            new = np.empty((n, n_clusters), np.float32)
            sums = np.zeros((7, n_levels * (1 + n_next), n_clusters))
            objective = np.zeros((7, 3, n_clusters))
            kernels.update_piece(
                logits.copy(),
                (log_penalty, row_penalty, shift, bound),
                (new, codes, next_block),
                (sums, objective),
                kernels.exp_constants(np.float32),
            )
            results.append((new, sums, objective))
    finally:
        kernels.set_threads(before)
    for first, second in zip(*results, strict=True):
        np.testing.assert_array_equal(first, second)
    new, sums, _ = results[0]
    np.testing.assert_allclose(sums.sum(0)[:n_levels].sum(0), n_variables * new.sum(0), rtol=1e-6)


@pytest.mark.filterwarnings("ignore:Harmony did not converge")
def test_mapping_on_a_reference_built_with_the_fused_path(monkeypatch, data):
    z, meta = data
    ref_cells, query_cells = np.arange(1000), np.arange(1000, 1500)
    reference_meta = meta.iloc[ref_cells].reset_index(drop=True)
    query_meta = meta.iloc[query_cells].reset_index(drop=True)
    mapped = {}
    for path in ("eager", "fused"):
        ho = run(monkeypatch, path, z[ref_cells], reference_meta, max_iter_harmony=3)
        reference = hm.build_reference(ho)
        mapped[path] = hm.map_query(z[query_cells], query_meta, reference, vars_use="batch")
    assert per_pc_correlation(mapped["eager"].Z_corr, mapped["fused"].Z_corr).min() >= MIN_R


def test_the_choice_is_logged(monkeypatch, data, caplog):
    z, meta = data
    with caplog.at_level(logging.INFO, logger="harmonypy.engine.fused"):
        run(monkeypatch, "fused", z, meta, max_iter_harmony=1)
        run(monkeypatch, "eager", z, meta, max_iter_harmony=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "harmonypy.engine.fused"]
    assert messages == [
        "clustering rounds: fused numba kernels (HARMONYPY_FUSED=always)",
        "clustering rounds: torch operations (HARMONYPY_FUSED=0)",
    ]


@pytest.mark.parametrize("setting", [None, "auto", "1"])
def test_by_default_they_run_from_a_size(monkeypatch, setting):
    if setting is None:
        monkeypatch.delenv(fused.ENV_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(fused.ENV_VARIABLE, setting)
    named = "HARMONYPY_FUSED unset" if setting is None else f"HARMONYPY_FUSED={setting}"
    cpu = torch.device("cpu")
    assert fused.fused_choice(cpu, n_elements=fused.MIN_ELEMENTS) == (True, named)
    chosen, reason = fused.fused_choice(cpu, n_elements=fused.MIN_ELEMENTS - 1)
    assert not chosen and "below the 67,108,864" in reason and "HARMONYPY_FUSED=always" in reason
    # float64 rounds cost the torch path more: the kernels pay from fewer cells
    f64 = torch.float64
    assert fused.fused_choice(cpu, n_elements=fused.MIN_ELEMENTS_FLOAT64, dtype=f64) == (
        True,
        named,
    )
    chosen, reason = fused.fused_choice(cpu, n_elements=fused.MIN_ELEMENTS_FLOAT64 - 1, dtype=f64)
    assert not chosen and "in float64, below the 8,388,608" in reason


def test_zero_means_the_torch_path(monkeypatch):
    monkeypatch.setenv(fused.ENV_VARIABLE, "0")
    chosen = fused.fused_choice(torch.device("cpu"), n_elements=fused.MIN_ELEMENTS)
    assert chosen == (False, "HARMONYPY_FUSED=0")


def test_other_devices_keep_the_torch_path(monkeypatch):
    monkeypatch.setenv(fused.ENV_VARIABLE, "always")
    for device in ("cuda", "mps"):
        chosen, reason = fused.fused_choice(torch.device(device), n_elements=fused.MIN_ELEMENTS)
        assert not chosen and device in reason


def test_without_numba_the_torch_path_runs(monkeypatch, data):
    monkeypatch.setenv(fused.ENV_VARIABLE, "always")
    monkeypatch.setitem(sys.modules, "harmonypy.engine._numba_kernels", None)
    chosen, reason = fused.fused_choice(torch.device("cpu"), n_elements=fused.MIN_ELEMENTS)
    assert not chosen and "numba is not available" in reason and "harmonypy[fast]" in reason
    z, meta = data
    ho = hm.run_harmony(z, meta, "batch", verbose=False, random_state=0, max_iter_harmony=1)
    assert np.isfinite(ho.Z_corr).all()


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_a_bad_setting_is_refused(monkeypatch, value):
    monkeypatch.setenv(fused.ENV_VARIABLE, value)
    with pytest.raises(
        ValueError, match=rf"HARMONYPY_FUSED must be auto, 1, always or 0 .*'{value}'"
    ):
        fused.fused_choice(torch.device("cpu"), n_elements=1)


@pytest.mark.parametrize("dtype,lowest", [(np.float32, -87.0), (np.float64, -708.0)])
def test_the_kernel_exponential_is_accurate(dtype, lowest):
    """Rows of two clusters with logits (0, x): R_1 / R_0 = exp(x), and the
    objective's sum of log-sum-exps is sum log(1 + exp(x))."""
    from harmonypy.engine import _numba_kernels as kernels

    x = np.concatenate([np.linspace(lowest, 0, 100_001), [-1e-30, 2 * lowest]]).astype(dtype)
    logits = np.stack([np.zeros_like(x), x], axis=1)
    n = logits.shape[0]
    new, zero = np.empty_like(logits), np.zeros(2, dtype)
    lane_sums, lane_objective = np.zeros((3, 1, 2)), np.zeros((3, 3, 1))
    codes = np.zeros((n, 1), np.int64)
    kernels.update_piece(
        logits.copy(),
        (np.zeros((1, 2), dtype), np.empty((0, 2), dtype), zero, zero[:1]),
        (new, codes, np.empty(0, np.int64)),
        (lane_sums, lane_objective),
        kernels.exp_constants(dtype),
    )
    exact = np.exp(x.astype(np.float64))
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(new[:-1, 1] / new[:-1, 0], exact[:-1], rtol=6 * eps, atol=0)
    assert new[-1, 1] == 0 and new[-1, 0] == 1  # below the cut-off: 0, as exp underflows
    lse_sum = lane_objective[:, 1, 0].sum()
    np.testing.assert_allclose(lse_sum, np.log1p(exact).sum(), rtol=10 * eps)
    # The lanes' level sums are the column sums of R.
    np.testing.assert_allclose(lane_sums.sum(0)[0], new.astype(np.float64).sum(0), rtol=1e-12)


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)
def test_distributed_group_with_the_fused_path(monkeypatch, tmp_path):
    from test_distributed import gathered, run_group

    z, meta = simulate(n_cells=2000, n_pcs=10, n_batches=3, seed=5, second_batch=2)
    meta = meta.rename(columns={"batch2": "tech"})
    shards = [np.arange(0, 2000, 2), np.arange(1, 2000, 2)]
    results = {}
    for path in ("eager", "fused"):
        monkeypatch.setenv(fused.ENV_VARIABLE, "always" if path == "fused" else "0")
        out = run_group(tmp_path, z, meta, shards, algorithm="harmony2", ncores=1)
        results[path] = (gathered(z, shards, out), out[0]["objective"])
    (eager, eager_objective), (fast, fast_objective) = results["eager"], results["fused"]
    assert not np.array_equal(eager, fast)  # the ranks did take the fused path
    assert per_pc_correlation(eager.T, fast.T).min() >= MIN_R
    np.testing.assert_allclose(fast_objective, eager_objective, rtol=OBJECTIVE_RTOL, atol=0)
