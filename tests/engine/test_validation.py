"""Every bad input to run_harmony gets a clear TypeError/ValueError before any work.

Each case asserts the exception type and that the message carries the key facts
(argument name, offending column/value/count, shapes, what was expected).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

import harmonypy as hm
from harmonypy.engine import validation as val
from harmonypy.engine.device import resolve_device, resolve_dtype

N_CELLS = 60
FAST = dict(verbose=False, max_iter_harmony=1, max_iter_kmeans=2, nclust=3)


def make_inputs(n_cells: int = N_CELLS, n_dims: int = 5, seed: int = 0):
    """A small embedding (cells x dims) and a metadata table with three batch columns."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_cells, n_dims))
    meta = pd.DataFrame(
        {
            "batch": np.array(["a", "b", "c"])[np.arange(n_cells) % 3],
            "donor": np.arange(n_cells) % 2,
            "tech": np.array(["x", "y", "z", "w"])[np.arange(n_cells) % 4],
            "const": ["same"] * n_cells,
        }
    )
    return z, meta


_DEFAULT = object()


def run(z=_DEFAULT, meta=_DEFAULT, vars_use="batch", **kwargs):
    """run_harmony on the small inputs, with any argument replaced."""
    z0, meta0 = make_inputs()
    params = {**FAST, **kwargs}
    return hm.run_harmony(
        z0 if z is _DEFAULT else z, meta0 if meta is _DEFAULT else meta, vars_use, **params
    )


def check_raises(error, facts, **call):
    """Run with ``call`` overrides; assert ``error`` and every fact (regex) in the message."""
    with pytest.raises(error) as info:
        run(**call)
    message = str(info.value)
    for fact in facts:
        assert re.search(fact, message), f"{fact!r} not in message: {message}"
    return message


# ------------------------------------------------------------------ data_mat
def _with(index, value, z=None):
    z = make_inputs()[0].copy() if z is None else z
    z[index] = value
    return z


class _Sparse:
    """Stands in for a SciPy sparse matrix (scipy may be absent)."""

    shape = (N_CELLS, 5)

    def tocsr(self):  # pragma: no cover - never called
        raise AssertionError


DATA_CASES = {
    "strings": (np.full((N_CELLS, 5), "x"), TypeError, [r"data_mat", r"real numbers", r"<U1"]),
    "non-numeric column": (
        pd.DataFrame({"pc1": np.arange(N_CELLS, dtype=float), "name": ["c"] * N_CELLS}),
        TypeError,
        [r"data_mat", r"non-numeric column", r"'name'", r"numeric PC columns"],
    ),
    "bool dtype": (np.ones((N_CELLS, 5), dtype=bool), TypeError, [r"data_mat", r"bool"]),
    "object junk": (np.array([[object()] * 5] * N_CELLS), TypeError, [r"data_mat", r"object"]),
    "None": (None, TypeError, [r"data_mat is None"]),
    "nan": (
        _with((3, 1), np.nan),
        ValueError,
        [r"data_mat", r"1 non-finite", r"1 NaN", r"cell\(s\) 3\b", r"column\(s\) 1\b"],
    ),
    "inf": (
        _with((slice(10, 13), 2), np.inf),
        ValueError,
        [r"3 non-finite", r"0 NaN, 3 infinite", r"3 cell\(s\) 10, 11, 12", r"column\(s\) 2"],
    ),
    "-inf many": (
        _with((slice(0, 20), 0), -np.inf),
        ValueError,
        [r"20 non-finite", r"\(20 in all\)"],
    ),
    "shape mismatch": (
        np.zeros((7, 5)) + 1,
        ValueError,
        [
            r"data_mat has shape \(7, 5\)",
            r"meta_data has shape \(60, 4\)",
            r"number of cells \(60\)",
        ],
    ),
    "zero cells": (
        _with((slice(4, 6), slice(None)), 0.0),
        ValueError,
        [r"2 all-zero", r"cell\(s\) 4, 5", r"cosine-normalised"],
    ),
    "1-D": (np.ones(N_CELLS), ValueError, [r"2-D", r"shape \(60,\)"]),
    "3-D": (np.ones((N_CELLS, 5, 2)), ValueError, [r"2-D", r"shape \(60, 5, 2\)"]),
    "empty pcs": (np.ones((N_CELLS, 0)), ValueError, [r"data_mat is empty", r"\(60, 0\)"]),
    "empty cells": (np.ones((0, 5)), ValueError, [r"data_mat is empty", r"\(0, 5\)"]),
    "sparse": (_Sparse(), TypeError, [r"data_mat is a sparse matrix", r"toarray\(\)"]),
    "torch sparse": (
        torch.ones(N_CELLS, 5).to_sparse(),
        TypeError,
        [r"sparse matrix", r"to_dense\(\)"],
    ),
    "series": (pd.Series(np.ones(N_CELLS)), TypeError, [r"data_mat", r"Series", r"2-D"]),
    "float32 overflow": (
        np.full((N_CELLS, 5), 1e30),
        ValueError,
        [r"60 cell\(s\)", r"float32", r"rescale", r"dtype='float64'"],
    ),
    "float32 underflow": (np.full((N_CELLS, 5), 1e-25), ValueError, [r"float32", r"outside"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_mat(case):
    data, error, facts = DATA_CASES[case]
    check_raises(error, facts, z=data)


def test_nullable_float_frame_with_na_reports_nan_cells():
    z = pd.DataFrame(make_inputs()[0]).astype("Float64")
    z.iloc[7, 3] = pd.NA
    check_raises(ValueError, [r"1 NaN", r"cell\(s\) 7", r"column\(s\) 3"], z=z)


def test_too_few_cells():
    z, meta = make_inputs(5)
    with pytest.raises(ValueError, match=r"at least 6 cells, meta_data has 5"):
        hm.run_harmony(z, meta, "batch", **FAST)


def test_transposed_input_is_accepted_and_square_input_is_cells_by_pcs():
    z, meta = make_inputs()
    a = run(z=z)
    b = run(z=z.T.copy())
    np.testing.assert_array_equal(a.Z_corr, b.Z_corr)
    # Both dimensions equal N: cells x PCs is assumed.
    rng = np.random.default_rng(1)
    square = rng.normal(size=(N_CELLS, N_CELLS))
    ho = run(z=square)
    np.testing.assert_array_equal(ho.Z_orig, square.T.astype(np.float32))


def test_float64_accepts_scales_float32_refuses():
    z = make_inputs()[0] * 1e25
    ho = run(z=z, dtype="float64")
    assert np.isfinite(ho.Z_corr).all()


# -------------------------------------------------------- meta_data / vars_use
def _meta(**columns):
    meta = make_inputs()[1]
    for name, values in columns.items():
        meta[name] = values
    return meta


def _with_missing(value, count=3):
    labels = pd.Series(np.array(["a", "b", "c"], dtype=object)[np.arange(N_CELLS) % 3])
    labels[:count] = value
    return labels


META_CASES = {
    "missing column": (
        dict(vars_use=["batch", "plate"]),
        ValueError,
        [r"\['plate'\] not found", r"available columns: \['batch', 'donor'"],
    ),
    "typo hint": (dict(vars_use="Batch"), ValueError, [r"did you mean", r"'batch'"]),
    "None labels": (
        dict(meta=_meta(lab=_with_missing(None, 3)), vars_use="lab"),
        ValueError,
        [r"'lab'", r"3 missing value", r"out of 60"],
    ),
    "NaN labels": (
        dict(meta=_meta(lab=_with_missing(np.nan, 4)), vars_use="lab"),
        ValueError,
        [r"'lab'", r"4 missing"],
    ),
    "pd.NA labels": (
        dict(meta=_meta(lab=_with_missing(pd.NA, 2).astype("string")), vars_use="lab"),
        ValueError,
        [r"'lab'", r"2 missing"],
    ),
    "float NaN labels": (
        dict(meta=_meta(lab=np.where(np.arange(N_CELLS) < 5, np.nan, 1.0)), vars_use="lab"),
        ValueError,
        [r"5 missing"],
    ),
    "categorical NaN": (
        dict(meta=_meta(lab=pd.Categorical(_with_missing(None, 1))), vars_use="lab"),
        ValueError,
        [r"1 missing"],
    ),
    "single level": (
        dict(vars_use=["batch", "const"]),
        ValueError,
        [r"'const'", r"single level \('same'\)", r"60 cells", r"at least 2"],
    ),
    "single used category": (
        dict(
            meta=_meta(lab=pd.Categorical(["a"] * N_CELLS, categories=["a", "b"])), vars_use="lab"
        ),
        ValueError,
        [r"'lab'", r"single level"],
    ),
    "duplicate vars_use": (
        dict(vars_use=["batch", "donor", "batch"]),
        ValueError,
        [r"\['batch'\] more than once"],
    ),
    "empty vars_use": (dict(vars_use=[]), ValueError, [r"vars_use is empty", r"available"]),
    "vars_use None, several columns": (
        dict(vars_use=None),
        ValueError,
        [r"vars_use is required", r"'batch', 'donor'"],
    ),
    "vars_use wrong type": (dict(vars_use=3.5), TypeError, [r"vars_use", r"float"]),
    "vars_use unhashable": (dict(vars_use=[["batch"]]), TypeError, [r"vars_use"]),
    "meta wrong type": (
        dict(meta={"batch": [1, 2]}),
        TypeError,
        [r"meta_data must be a pandas DataFrame", r"dict"],
    ),
    "meta 2-D array": (
        dict(meta=np.zeros((N_CELLS, 2))),
        TypeError,
        [r"meta_data", r"1-D", r"\(60, 2\)"],
    ),
    "unhashable labels": (
        dict(meta=_meta(lab=[[1]] * N_CELLS), vars_use="lab"),
        TypeError,
        [r"'lab'", r"cannot be compared", r"list"],
    ),
    "duplicate column names": (
        dict(meta=pd.concat([make_inputs()[1][["batch"]]] * 2, axis=1), vars_use="batch"),
        ValueError,
        [r"2 columns named 'batch'"],
    ),
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_bad_meta_data(case):
    call, error, facts = META_CASES[case]
    check_raises(error, facts, **call)


# ----------------------------------------------------------------- parameters
PARAM_CASES = {
    "theta length": (
        dict(theta=[1, 2]),
        ValueError,
        [
            r"theta has 2 values",
            r"expected 1",
            r"1 \(one per batch variable",
            r"3 \(one per batch level",
        ],
    ),
    "theta length 2 vars": (
        dict(vars_use=["batch", "donor"], theta=[1, 2, 3]),
        ValueError,
        [r"theta has 3 values", r"2 \(one per batch variable", r"5 \(one per batch level"],
    ),
    "lamb length": (dict(lamb=[1, 2]), ValueError, [r"lamb has 2 values", r"expected 1"]),
    "sigma length": (
        dict(sigma=[0.1, 0.2]),
        ValueError,
        [r"sigma has 2 values", r"one per cluster \(nclust = 3\)"],
    ),
    "negative theta": (dict(theta=-1), ValueError, [r"theta must be >= 0", r"-1\.0", r"batch=a"]),
    "negative theta per level": (
        dict(theta=[1, -0.5, 2]),
        ValueError,
        [r"theta must be >= 0", r"\[-0\.5\]", r"batch=b"],
    ),
    "nan theta": (dict(theta=float("nan")), ValueError, [r"theta must be finite"]),
    "string theta": (dict(theta="2"), TypeError, [r"theta"]),
    "sigma zero": (dict(sigma=0), ValueError, [r"sigma must be > 0", r"0\.0"]),
    "sigma negative list": (dict(sigma=[0.1, -0.1, 0.1]), ValueError, [r"sigma must be > 0"]),
    "sigma inf": (dict(sigma=float("inf")), ValueError, [r"sigma must be finite"]),
    "sigma unrepresentable": (
        dict(sigma=1e-300),
        ValueError,
        [r"sigma must be between", r"float32"],
    ),
    "lamb negative": (
        dict(lamb=-2),
        ValueError,
        [r"lamb must be > 0", r"-2\.0", r"lamb=-1, a scalar, estimates"],
    ),
    "lamb zero": (dict(lamb=0), ValueError, [r"lamb must be > 0"]),
    "lamb -1 in list": (dict(lamb=[-1, 1, 1]), ValueError, [r"lamb must be > 0"]),
    "nclust zero": (dict(nclust=0), ValueError, [r"nclust must be at least 1", r"got 0"]),
    "nclust too big": (
        dict(nclust=61),
        ValueError,
        [r"nclust", r"at most 60 \(the number of cells\)", r"got 61"],
    ),
    "nclust float": (dict(nclust=2.5), TypeError, [r"nclust must be an integer", r"2\.5"]),
    "block_size zero": (dict(block_size=0), ValueError, [r"block_size must be in \(0, 1\]"]),
    "block_size big": (dict(block_size=1.5), ValueError, [r"block_size", r"1\.5"]),
    "max_iter_harmony 0": (
        dict(max_iter_harmony=0),
        ValueError,
        [r"max_iter_harmony must be at least 1", r"got 0"],
    ),
    "max_iter_kmeans 0": (
        dict(max_iter_kmeans=0),
        ValueError,
        [r"max_iter_kmeans must be at least 1"],
    ),
    "max_iter_kmeans str": (dict(max_iter_kmeans="5"), TypeError, [r"max_iter_kmeans"]),
    "epsilon_cluster nan": (
        dict(epsilon_cluster=float("nan")),
        ValueError,
        [r"epsilon_cluster must be finite", r"-inf"],
    ),
    "epsilon_harmony +inf": (
        dict(epsilon_harmony=float("inf")),
        ValueError,
        [r"epsilon_harmony must be finite", r"-inf to never stop"],
    ),
    "alpha zero": (dict(alpha=0), ValueError, [r"alpha must be > 0"]),
    "tau negative": (dict(tau=-1), ValueError, [r"tau must be >= 0", r"-1\.0"]),
    "batch_prop_cutoff": (
        dict(batch_prop_cutoff=1.0),
        ValueError,
        [r"batch_prop_cutoff must be in \[0, 1\)"],
    ),
    "device unknown": (dict(device="gpu"), ValueError, [r"device='gpu'", r"available here: .*cpu"]),
    "device unsupported": (
        dict(device="meta"),
        ValueError,
        [r"device='meta' is not supported", r"available here"],
    ),
    "device type": (dict(device=1.5), TypeError, [r"device must be", r"float"]),
    "dtype": (dict(dtype="float16"), ValueError, [r"dtype='float16' is not supported", r"float32"]),
    "dtype type": (dict(dtype=3), TypeError, [r"dtype=3"]),
    "random_state float": (
        dict(random_state=1.5),
        TypeError,
        [r"random_state must be an int, None or a numpy Generator", r"1\.5"],
    ),
    "random_state str": (dict(random_state="0"), TypeError, [r"random_state"]),
    "random_state negative": (dict(random_state=-1), ValueError, [r"random_state must be >= 0"]),
    "random_state global module": (dict(random_state=np.random), TypeError, [r"random_state"]),
    "ncores negative": (dict(ncores=-2), ValueError, [r"ncores must be at least 0"]),
    "algorithm": (dict(algorithm="harmony3"), ValueError, [r"algorithm", r"harmony3"]),
}


@pytest.mark.parametrize("case", sorted(PARAM_CASES))
def test_bad_parameters(case):
    call, error, facts = PARAM_CASES[case]
    check_raises(error, facts, **call)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_device_names_what_is_available():
    check_raises(
        ValueError,
        [r"device='cuda'", r"not available on this machine", r"available here: cpu"],
        device="cuda",
    )


# ------------------------------------------------------------ accepted forms
@pytest.mark.parametrize("value", [-np.inf, 1e-3, -1.0])
def test_epsilons_accept_minus_inf_and_finite(value):
    ho = run(epsilon_cluster=value, epsilon_harmony=value, max_iter_harmony=2)
    assert np.isfinite(ho.Z_corr).all()
    if value == -np.inf:
        assert ho.n_iter == 2 and ho.kmeans_rounds == [2, 2]


@pytest.mark.parametrize("theta", [0, 1.5, [1.0], [0.5, 1.0, 2.0], np.array([1, 2, 3])])
def test_theta_forms_accepted(theta):
    ho = run(theta=theta)
    assert ho.theta.shape == (3,)


def test_theta_per_variable_expands_to_levels():
    ho = run(vars_use=["batch", "donor"], theta=[1.0, 3.0])
    np.testing.assert_array_equal(ho.theta, [1, 1, 1, 3, 3])


def test_lamb_minus_one_estimates():
    ho = run(lamb=-1)
    assert np.all(ho.lamb[1:] == -1)
    for sentinel in (-1.0, np.float64(-1), np.array(-1)):
        assert np.all(run(lamb=sentinel).lamb[1:] == -1)


@pytest.mark.parametrize(
    "random_state",
    [None, 0, np.int64(5), np.random.default_rng(1), np.random.RandomState(2), 2**70],
)
def test_random_state_forms_accepted(random_state):
    assert np.isfinite(run(random_state=random_state).Z_corr).all()


@pytest.mark.parametrize(
    "dtype",
    [None, "float32", "float64", "double", torch.float64, np.float32, float, np.dtype("float64")],
)
def test_dtype_forms_accepted(dtype):
    ho = run(dtype=dtype)
    assert ho.Z_corr.dtype in (np.float32, np.float64)


@pytest.mark.parametrize("device", ["cpu", " CPU ", torch.device("cpu"), None])
def test_device_forms_accepted(device):
    assert np.isfinite(run(device=device).Z_corr).all()


def test_resolve_helpers_directly():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("float64", torch.device("cpu")) == torch.float64
    with pytest.raises(ValueError, match="MPS"):
        resolve_dtype("float64", torch.device("mps"))
    assert val.check_int("n", 4.0, 1) == 4
    with pytest.raises(TypeError):
        val.check_int("n", True, 0)
    with pytest.raises(TypeError):
        val.check_int("n", float("nan"), 0)


def test_series_meta_data_is_accepted_like_a_dataframe():
    z, meta = make_inputs()
    reference = hm.run_harmony(z, meta, ["batch"], **FAST)
    for labels, vars_use in [
        (meta["batch"], None),  # Series, its name is used
        (meta["batch"], "batch"),
        (meta["batch"].to_numpy(), None),  # array of labels
        (list(meta["batch"]), ["batch"]),  # list of labels
        (pd.Categorical(meta["batch"]), None),  # Categorical
        (pd.Index(meta["batch"]), None),
    ]:
        ho = hm.run_harmony(z, labels, vars_use, **FAST)
        np.testing.assert_array_equal(ho.Z_corr, reference.Z_corr)
    assert hm.run_harmony(z, meta["batch"].rename(None), None, **FAST).batch_levels[0] == "batch=a"


def test_series_with_unrelated_index_is_positional():
    z, meta = make_inputs()
    labels = meta["batch"].copy()
    labels.index = np.arange(N_CELLS)[::-1] + 1000
    a = hm.run_harmony(z, labels, None, **FAST)
    b = hm.run_harmony(z, meta, "batch", **FAST)
    np.testing.assert_array_equal(a.Z_corr, b.Z_corr)


def test_validation_happens_before_heavy_work(monkeypatch):
    """A bad parameter after a valid table is refused before the engine starts."""
    import harmonypy.engine.harmony as engine

    def fail(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("engine started before validation finished")

    monkeypatch.setattr(engine.Harmony, "__init__", fail)
    for call in (
        {"sigma": -1},
        {"theta": [1, 2]},
        {"nclust": 1000},
        {"device": "gpu"},
        {"random_state": "x"},
        {"lamb": -3},
    ):
        with pytest.raises((TypeError, ValueError)):
            run(**call)


# ------------------------------------------------- first-use hardening (#11)
def test_bfloat16_tensor_is_accepted_like_float16():
    z, meta = make_inputs()
    as_bf16 = torch.from_numpy(z).to(torch.bfloat16)
    expected = run(z=as_bf16.float().numpy(), meta=meta).Z_corr
    np.testing.assert_array_equal(run(z=as_bf16, meta=meta).Z_corr, expected)


@pytest.mark.parametrize("verbose", ["no", "yes", 2, None, 0.5])
def test_verbose_must_be_a_flag(verbose, capsys):
    check_raises(
        TypeError, [r"verbose must be True or False", re.escape(repr(verbose))], verbose=verbose
    )
    assert capsys.readouterr().err == ""  # refused before any progress line


def test_verbose_accepts_numpy_bool_and_zero():
    run(verbose=np.bool_(False))
    run(verbose=0)


def test_counts_matrix_warns():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(N_CELLS, 5)) + 1
    with pytest.warns(UserWarning, match=r"non-negative whole numbers.*counts.*PCs"):
        run(z=counts.astype(np.float32))


def test_wide_matrix_warns():
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match=r"300 dimensions per cell.*PCs"):
        run(z=rng.normal(size=(N_CELLS, 300)))


def test_pcs_do_not_warn(recwarn):
    run()
    assert not [
        w
        for w in recwarn
        if issubclass(w.category, UserWarning) and not issubclass(w.category, hm.ConvergenceWarning)
    ]


def test_warnings_point_at_the_callers_line():
    counts = np.random.default_rng(0).poisson(3, size=(60, 8)).astype(float) + 1
    meta = pd.DataFrame({"b": ["x", "y"] * 30})
    with pytest.warns(UserWarning, match="counts") as caught:
        hm.run_harmony(counts, meta, "b", verbose=False, max_iter_harmony=1)
    assert caught[0].filename == __file__
