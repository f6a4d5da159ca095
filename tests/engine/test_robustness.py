"""Robustness: random small problems, reproducibility, hygiene, interrupts, guards.

* A property-based test draws small embeddings and label tables of odd types and
  checks that run_harmony either refuses them with a documented ValueError or
  returns finite output of the right shape, R columns summing to 1, and the same
  bytes on a second run with the same seed.
* The caller's inputs, global RNG states, logging configuration and torch
  settings are unchanged after a call, after a call that raised, and after a
  KeyboardInterrupt.
* Non-finite values inside the iterations stop the run with FloatingPointError.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harmonypy as hm
import harmonypy.engine.harmony as engine

FAST = dict(verbose=False, max_iter_harmony=2, max_iter_kmeans=3, nclust=3)

#: ValueErrors that run_harmony documents for inputs the strategy can draw.
DOCUMENTED_ERRORS = (r"has a single level",)


def small_problem(n_cells: int = 90, n_dims: int = 6, seed: int = 0):
    """Three shifted batches of cells in two groups; returns (z, meta)."""
    rng = np.random.default_rng(seed)
    batch = np.arange(n_cells) % 3
    group = (np.arange(n_cells) // 3) % 2
    z = (
        rng.normal(0, 3, (2, n_dims))[group]
        + rng.normal(0, 1, (3, n_dims))[batch]
        + rng.normal(0, 0.3, (n_cells, n_dims))
    )
    meta = pd.DataFrame(
        {"batch": np.array(["b0", "b1", "b2"])[batch], "group": group, "noise": rng.random(n_cells)}
    )
    return z, meta


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# ------------------------------------------------------------ property test
def _labels(kind: str, codes: np.ndarray, n_levels: int, rng: np.random.Generator):
    """Batch labels of one kind for integer ``codes``."""
    if kind == "str":
        return np.array([f"batch_{c}" for c in range(n_levels)], dtype=object)[codes]
    if kind == "int":
        return (codes * 7 - 3).astype(np.int64)
    if kind == "float":
        return codes * 0.5 + 0.25
    if kind == "bool":
        return (codes % 2).astype(bool)
    if kind == "category_unused":
        names = [f"c{c}" for c in range(n_levels + 2)]
        order = list(rng.permutation(names))  # categories in a random order, two unused
        return pd.Categorical(np.array(names, dtype=object)[codes], categories=order)
    if kind == "mixed":
        pool = np.array([1, "1", 2.5, "x", 3, "b", 7], dtype=object)
        return pool[codes]
    if kind == "string_dtype":
        return pd.array([f"s{c}" for c in codes], dtype="string")
    if kind == "nullable_int":
        return pd.array(codes + 10, dtype="Int64")
    raise AssertionError(kind)


LABEL_KINDS = [
    "str",
    "int",
    "float",
    "bool",
    "category_unused",
    "mixed",
    "string_dtype",
    "nullable_int",
]


@st.composite
def problems(draw):
    n_cells = draw(st.integers(6, 300))
    n_dims = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    z = rng.normal(size=(n_cells, n_dims)) * scale
    if draw(st.booleans()):  # duplicated cells (few distinct points)
        z = z[rng.integers(0, draw(st.integers(1, 5)), n_cells)]
    if draw(st.booleans()):  # a large common offset
        z = z + scale * 10
    columns = {}
    for v in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(LABEL_KINDS))
        n_levels = 2 if kind == "bool" else draw(st.integers(2, 6))
        skew = draw(st.sampled_from(["uniform", "rare", "one_cell"]))
        if skew == "uniform":
            codes = rng.integers(0, n_levels, n_cells)
        elif skew == "rare":
            p = np.r_[np.full(n_levels - 1, 0.9 / max(1, n_levels - 1)), 0.1]
            codes = rng.choice(n_levels, n_cells, p=p / p.sum())
        else:  # one batch of a single cell
            codes = np.zeros(n_cells, dtype=np.int64) + rng.integers(0, n_levels - 1)
            codes[rng.integers(n_cells)] = n_levels - 1
        columns[f"var{v}"] = _labels(kind, codes, n_levels, rng)
    columns["unused"] = rng.random(n_cells)
    names = list(columns)
    order = list(rng.permutation(names))  # column order of meta_data is arbitrary
    meta = pd.DataFrame({k: columns[k] for k in order})
    vars_use = [n for n in names if n != "unused"]
    params = dict(
        nclust=draw(st.integers(1, min(5, n_cells))),
        max_iter_harmony=draw(st.integers(1, 2)),
        max_iter_kmeans=draw(st.integers(1, 3)),
        algorithm=draw(st.sampled_from(["harmony1", "harmony2"])),
        lamb=draw(st.sampled_from([None, -1, 0.5, 2.0])),
        theta=draw(st.sampled_from([None, 0.0, 1.0, 4.0])),
        sigma=draw(st.sampled_from([0.1, 0.05, 0.5])),
        block_size=draw(st.sampled_from([0.05, 0.3, 1.0])),
        random_state=draw(st.integers(0, 2**31)),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        verbose=False,
    )
    if draw(st.booleans()):
        z = z.T.copy()  # PCs x cells is accepted as well
    return z, meta, vars_use, params


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_problems_give_finite_reproducible_output(problem):
    z, meta, vars_use, params = problem
    n_cells = len(meta)
    single_level = any(meta[v].nunique() < 2 for v in vars_use)
    try:
        ho = hm.run_harmony(z, meta, vars_use, **params)
    except ValueError as err:
        assert any(re.search(p, str(err)) for p in DOCUMENTED_ERRORS), err
        assert single_level, err
        return
    assert not single_level
    d = z.shape[1] if z.shape[0] == n_cells else z.shape[0]  # cells x PCs when ambiguous
    assert ho.Z_corr.shape == (d, n_cells)
    assert np.isfinite(ho.Z_corr).all()
    assert np.isfinite(ho.R).all() and np.isfinite(ho.O).all() and np.isfinite(ho.E).all()
    np.testing.assert_allclose(ho.R.sum(0), 1.0, atol=1e-4)
    assert all(np.isfinite(ho.objective_harmony))
    again = hm.run_harmony(z, meta, vars_use, **params)
    assert digest(again.Z_corr) == digest(ho.Z_corr)
    assert digest(again.R) == digest(ho.R)


# ----------------------------------------------------------- reproducibility
def test_same_seed_same_bytes_whatever_the_global_rng_state():
    z, meta = small_problem()
    outputs = []
    for global_seed in (0, 123):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        random.seed(global_seed)
        outputs.append(digest(hm.run_harmony(z, meta, "batch", random_state=7, **FAST).Z_corr))
    assert outputs[0] == outputs[1]
    other = hm.run_harmony(z, meta, "batch", random_state=8, **FAST).Z_corr
    assert digest(other) != outputs[0]


def test_generator_seed_is_reproducible():
    z, meta = small_problem()
    a = hm.run_harmony(z, meta, "batch", random_state=np.random.default_rng(5), **FAST)
    b = hm.run_harmony(z, meta, "batch", random_state=np.random.default_rng(5), **FAST)
    np.testing.assert_array_equal(a.Z_corr, b.Z_corr)


_CHILD = textwrap.dedent("""
    import hashlib, sys
    import numpy as np, pandas as pd, torch
    import harmonypy as hm
    torch.manual_seed(int(sys.argv[1])); np.random.seed(int(sys.argv[1]))
    rng = np.random.default_rng(0)
    n = 90
    batch = np.arange(n) % 3
    z = rng.normal(size=(n, 6)) + rng.normal(0, 2, (3, 6))[batch]
    meta = pd.DataFrame({"batch": np.array(["b0", "b1", "b2"])[batch]})
    ho = hm.run_harmony(z, meta, "batch", random_state=3, verbose=False, ncores=1,
                        max_iter_harmony=3, nclust=3)
    print(hashlib.sha256(np.ascontiguousarray(ho.Z_corr).tobytes()).hexdigest())
""")


def test_bit_identical_across_processes():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    digests = []
    for global_seed in ("1", "99"):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, global_seed],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        digests.append(out.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]
    # The same computation in this process gives the same bytes too.
    rng = np.random.default_rng(0)
    batch = np.arange(90) % 3
    z = rng.normal(size=(90, 6)) + rng.normal(0, 2, (3, 6))[batch]
    meta = pd.DataFrame({"batch": np.array(["b0", "b1", "b2"])[batch]})
    ho = hm.run_harmony(
        z, meta, "batch", random_state=3, verbose=False, ncores=1, max_iter_harmony=3, nclust=3
    )
    assert digest(ho.Z_corr) == digests[0]


# ------------------------------------------------------------------ hygiene
def _logging_state():
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return {lg.name: (tuple(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers}


def _global_state():
    return dict(
        torch_rng=torch.get_rng_state().clone(),
        numpy_rng=np.random.get_state(),
        python_rng=random.getstate(),
        threads=torch.get_num_threads(),
        interop=torch.get_num_interop_threads(),
        grad=torch.is_grad_enabled(),
        default_dtype=torch.get_default_dtype(),
        deterministic=torch.are_deterministic_algorithms_enabled(),
        numpy_err=np.geterr(),
        logging=_logging_state(),
        logging_disable=logging.root.manager.disable,
    )


def _assert_same_state(before, after):
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    b_np, a_np = before["numpy_rng"], after["numpy_rng"]
    assert b_np[0] == a_np[0] and np.array_equal(b_np[1], a_np[1]) and b_np[2:] == a_np[2:]
    assert before["python_rng"] == after["python_rng"]
    for key in (
        "threads",
        "interop",
        "grad",
        "default_dtype",
        "deterministic",
        "numpy_err",
        "logging_disable",
    ):
        assert before[key] == after[key], key
    for name, state in before["logging"].items():
        assert after["logging"].get(name, state) == state, name
    for name, (handlers, level, _, _) in after["logging"].items():
        if name not in before["logging"]:  # a logger created by the call: left bare
            assert handlers == () and level == logging.NOTSET, name


@pytest.fixture
def threads_three():
    """Run with a known torch thread count that differs from ncores=1."""
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(previous)


@pytest.mark.parametrize("verbose", [False, True])
def test_call_leaves_inputs_and_global_state_unchanged(threads_three, verbose, capsys):
    z, meta = small_problem()
    meta["batch"] = meta["batch"].astype("category")
    z_frame = pd.DataFrame(z, columns=[f"PC{i}" for i in range(z.shape[1])])
    z_copy, meta_copy, frame_copy = z.copy(), meta.copy(), z_frame.copy()
    before = _global_state()
    for data in (z, z.T, z_frame):
        hm.run_harmony(
            data,
            meta,
            ["batch", "group"],
            ncores=1,
            random_state=None,
            **{**FAST, "verbose": verbose},
        )
    _assert_same_state(before, _global_state())
    np.testing.assert_array_equal(z, z_copy)
    pd.testing.assert_frame_equal(meta, meta_copy)
    pd.testing.assert_frame_equal(z_frame, frame_copy)
    assert z.flags.writeable


def test_generator_passed_is_not_advanced_by_a_refused_call():
    z, meta = small_problem()
    rng = np.random.default_rng(11)
    state = rng.bit_generator.state
    with pytest.raises(ValueError):
        hm.run_harmony(z, meta, "batch", random_state=rng, theta=[1, 2], **FAST)
    assert rng.bit_generator.state == state


@pytest.mark.parametrize("failure", ["validation", "engine"])
def test_call_that_raises_leaves_everything_unchanged(threads_three, monkeypatch, failure):
    z, meta = small_problem()
    z_copy, meta_copy = z.copy(), meta.copy()
    if failure == "engine":

        def broken(self):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(engine.Harmony, "moe_correct_ridge", broken)
        expected, kwargs = RuntimeError, {}
    else:
        expected, kwargs = ValueError, {"nclust": 10_000}
    before = _global_state()
    with pytest.raises(expected):
        hm.run_harmony(z, meta, "batch", ncores=1, **{**FAST, **kwargs})
    _assert_same_state(before, _global_state())
    np.testing.assert_array_equal(z, z_copy)
    pd.testing.assert_frame_equal(meta, meta_copy)


def test_keyboard_interrupt_restores_state_and_next_call_works(threads_three, monkeypatch):
    z, meta = small_problem()
    clean = hm.run_harmony(z, meta, "batch", ncores=1, **FAST)
    original = engine.Harmony.moe_correct_ridge
    calls = []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(engine.Harmony, "moe_correct_ridge", interrupted)
    before = _global_state()
    with pytest.raises(KeyboardInterrupt):
        hm.run_harmony(z, meta, "batch", ncores=1, **FAST)
    _assert_same_state(before, _global_state())
    assert torch.get_num_threads() == threads_three
    again = hm.run_harmony(z, meta, "batch", ncores=1, **FAST)
    assert len(calls) > 1
    np.testing.assert_array_equal(again.Z_corr, clean.Z_corr)


@pytest.mark.parametrize("path", ["0", "always"])
def test_a_round_stopped_part_way_drops_r_instead_of_misnaming_cells(monkeypatch, path):
    """Ctrl-C inside update_R, after some blocks: R's rows are then in two
    orders, so ho.R must refuse (not return cells under wrong names), and
    init_cluster() gives a working object again."""
    if path == "always":
        pytest.importorskip("numba")
    from harmonypy.engine import fused, online

    monkeypatch.setenv(fused.ENV_VARIABLE, path)
    z, meta = small_problem()
    ho = hm.run_harmony(z, meta, "batch", ncores=1, **FAST)
    original = online._update_blocks
    blocks_done = []

    def stopped_after_a_block(assignments, *, sums, plan, **kwargs):
        update_piece = sums.update_piece

        def piece(*args, **piece_kwargs):
            if blocks_done:
                raise KeyboardInterrupt
            update_piece(*args, **piece_kwargs)
            blocks_done.append(1)

        sums.update_piece = piece
        return original(assignments, sums=sums, plan=plan, **kwargs)

    monkeypatch.setattr(online, "_update_blocks", stopped_after_a_block)
    with pytest.raises(KeyboardInterrupt):
        ho.update_R()
    assert blocks_done  # R was part-way through
    monkeypatch.setattr(online, "_update_blocks", original)
    for read in (lambda: ho.R, lambda: ho.O, ho.update_R):
        with pytest.raises(RuntimeError, match="init_cluster"):
            read()
    ho.init_cluster()
    ho.harmonize(1)
    assert np.isfinite(ho.Z_corr).all()
    np.testing.assert_allclose(ho.R.sum(0), 1, rtol=1e-5)


# -------------------------------------------------------- numerical guards
def test_non_finite_assignments_stop_with_an_error(monkeypatch):
    from harmonypy.engine import online

    original = online.online_update

    def poisoned(assignments, *, centroids, **kwargs):
        # A non-finite centroid makes non-finite assignments, as overflow would.
        centroids = centroids.clone()
        centroids[0, 0] = float("nan")
        return original(assignments, centroids=centroids, **kwargs)

    monkeypatch.setattr(online, "online_update", poisoned)
    z, meta = small_problem()
    with pytest.raises(FloatingPointError) as info:
        hm.run_harmony(z, meta, "batch", **FAST)
    message = str(info.value)
    assert "clustering" in message and "iteration 1" in message
    assert "Usual causes" in message


def test_non_finite_correction_stops_with_an_error(monkeypatch):
    original = engine.ridge_correct

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        corrected = out if isinstance(out, torch.Tensor) else out.z_corr
        corrected[0, 0] = float("inf")
        return out

    monkeypatch.setattr(engine, "ridge_correct", poisoned)
    z, meta = small_problem()
    with pytest.raises(FloatingPointError) as info:
        hm.run_harmony(z, meta, "batch", **FAST)
    message = str(info.value)
    assert "Z_corr" in message and "correction" in message and "iteration 1" in message


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sigma=1e-4),  # hard assignments, exact zeros in R
        dict(nclust=90),  # K = N
        dict(theta=50.0),  # extreme diversity penalty
        dict(lamb=1e-8),  # almost no ridge penalty
        dict(lamb=-1, alpha=1e-6),
        dict(vars_use=["batch", "group"], sigma=1e-4, nclust=30),
        dict(algorithm="harmony2", nclust=60, sigma=1e-3),
    ],
)
def test_extreme_but_valid_parameters_stay_finite(kwargs):
    z, meta = small_problem()
    z = z[np.arange(90) % 9]  # only nine distinct cells
    vars_use = kwargs.pop("vars_use", "batch")
    params = {**FAST, **kwargs}
    try:
        ho = hm.run_harmony(z, meta, vars_use, **params)
    except FloatingPointError:  # an explicit, documented stop is acceptable
        return
    assert np.isfinite(ho.Z_corr).all()
    np.testing.assert_allclose(ho.R.sum(0), 1.0, atol=1e-4)


# Degenerate but valid problems found by the property test. Each once ended in
# NaN (FloatingPointError) or ZeroDivisionError inside the iterations.
def _one_dimensional_two_signs():
    rng = np.random.default_rng(0)
    z = np.r_[np.ones(10), -np.ones(2)][:, None] * rng.uniform(1, 2, (12, 1))
    return z, pd.DataFrame({"b": [0, 1, 2] * 4}), dict(nclust=2, max_iter_harmony=3)


def _whole_data_block():
    z, meta = small_problem(60)
    return z, meta, dict(block_size=1.0, nclust=3, max_iter_harmony=2)


def _zero_objective():
    return (
        np.ones((6, 1)),
        pd.DataFrame({"b": [0, 1] * 3}),
        dict(nclust=1, theta=0, max_iter_harmony=2),
    )


@pytest.mark.parametrize(
    "make",
    [_one_dimensional_two_signs, _whole_data_block, _zero_objective],
    ids=["cluster-inside-one-block", "block_size-1", "zero-objective"],
)
def test_degenerate_valid_problems_finish_with_finite_output(make):
    z, meta, params = make()
    vars_use = "b" if "b" in meta else "batch"
    ho = hm.run_harmony(z, meta, vars_use, verbose=False, **params)
    assert np.isfinite(ho.Z_corr).all()
    np.testing.assert_allclose(ho.R.sum(0), 1.0, atol=1e-4)
    assert all(np.isfinite(ho.objective_harmony))


def test_a_correction_stopped_part_way_is_not_read_as_a_result(monkeypatch):
    """Ctrl-C inside moe_correct_ridge, after some levels' cells were
    corrected in place: Z_corr is then half written, so reading it (or
    clustering on it) must refuse, and a completed correction recovers."""
    from harmonypy.engine import correction

    z, meta = small_problem()
    ho = hm.run_harmony(z, meta, "batch", ncores=1, **FAST)
    expected = ho.Z_corr.copy()
    ho.moe_correct_ridge()  # the same R: the same Z_corr again
    np.testing.assert_allclose(ho.Z_corr, expected, rtol=1e-5, atol=1e-5)
    before = ho.Z_corr.copy()
    original = correction._subtract_batch_parts
    levels_read = []

    def stopped_after_a_level(read, coef, *, levels, out):
        class Stopping:  # the correcting pass's reader, stopped at its second level
            z, chunk = read.z, read.chunk

            def __call__(self, cells, z=True):
                if levels_read:
                    raise KeyboardInterrupt
                levels_read.append(1)
                yield from read(cells, z=z)

        original(Stopping(), coef, levels=levels, out=out)

    monkeypatch.setattr(correction, "_subtract_batch_parts", stopped_after_a_level)
    # Another R (random soft assignments): another correction.
    logits = torch.randn(ho._assignments.shape, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(ho, "_assignments", logits.softmax(1).to(ho._assignments.dtype))
    with pytest.raises(KeyboardInterrupt):
        ho.moe_correct_ridge()
    assert levels_read
    for read in (lambda: ho.Z_corr, lambda: ho.Z_cos, ho.result, ho.update_R, ho.cluster):
        with pytest.raises(RuntimeError, match=r"stopped part-way.*moe_correct_ridge\(\) again"):
            read()
    monkeypatch.setattr(correction, "_subtract_batch_parts", original)
    ho.moe_correct_ridge()
    assert np.isfinite(ho.Z_corr).all() and not np.allclose(ho.Z_corr, before)
    ho.harmonize(1)
    assert np.isfinite(ho.Z_corr).all()


def test_a_fused_round_stopped_part_way_leaves_numbas_threads_as_found(monkeypatch):
    """Ctrl-C inside a fused update_R: the kernels ran on the engine's one
    thread, and the caller's numba thread setting is restored all the same."""
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs numba to allow two threads")
    from harmonypy.engine import fused, online

    monkeypatch.setenv(fused.ENV_VARIABLE, "always")
    z, meta = small_problem()
    ho = hm.run_harmony(z, meta, "batch", ncores=1, **FAST)
    original = online._update_blocks
    threads_seen = []

    def stopped_after_a_piece(assignments, *, sums, plan, **kwargs):
        update_piece = sums.update_piece

        def piece(*args, **piece_kwargs):
            if threads_seen:
                raise KeyboardInterrupt
            update_piece(*args, **piece_kwargs)
            threads_seen.append(numba.get_num_threads())

        sums.update_piece = piece
        return original(assignments, sums=sums, plan=plan, **kwargs)

    monkeypatch.setattr(online, "_update_blocks", stopped_after_a_piece)
    caller = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            ho.update_R()
        assert threads_seen == [1]  # the engine's count (ncores=1)
        assert numba.get_num_threads() == 2
    finally:
        numba.set_num_threads(caller)
