"""``hm.harmony_integrate``: scanpy 1.13's signature and output on this engine.

The stored outputs in ``tests/data/scanpy_native.*`` were produced by scanpy's
own ``sc.pp.harmony_integrate`` in the peer environment that
``benchmarks/scanpy_outputs.py`` documents (scanpy built from a source
snapshot; its commit is in the JSON).
"""

from __future__ import annotations

import ast
import inspect
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import harmonypy as hm
from conftest import read_tsv
from harmonypy.adapters.scanpy import SCANPY_TO_RUN_HARMONY, scanpy_default_clusters

DATA = Path(__file__).resolve().parents[1] / "data"
BUNDLED = Path(hm.__file__).resolve().parent / "data"


# ----------------------------------------------------------------- fixtures
def _duck(pcs: np.ndarray, meta: pd.DataFrame) -> SimpleNamespace:
    """An AnnData look-alike with the three attributes the function touches."""
    return SimpleNamespace(obsm={"X_pca": pcs.copy()}, obs=meta.copy(), uns={})


@pytest.fixture(scope="module")
def small():
    """The bundled 1,200 PBMCs (3 chemistries), with string cell names."""
    pcs, meta = hm.datasets.load_pbmcs_small()
    pcs = pcs.to_numpy(dtype=np.float64)
    meta = meta.reset_index(drop=True)
    meta.index = [f"c{i}" for i in range(len(meta))]
    return pcs, meta


def _real_sets(shared_data: Path) -> dict[str, tuple[np.ndarray, pd.DataFrame, str]]:
    return {
        "pbmc_3500": (
            read_tsv(BUNDLED / "pbmc_3500_pcs.tsv.gz").to_numpy(),
            read_tsv(BUNDLED / "pbmc_3500_meta.tsv.gz"),
            "donor",
        ),
        "pbmcs_small": (
            read_tsv(BUNDLED / "pbmcs_small_pcs.tsv.gz").to_numpy(),
            read_tsv(BUNDLED / "pbmcs_small_meta.tsv.gz"),
            "donor",
        ),
        "cell_lines_small": (
            read_tsv(shared_data / "cell_lines_small_pcs.tsv.gz").to_numpy(),
            read_tsv(shared_data / "cell_lines_small_meta.tsv.gz"),
            "dataset",
        ),
    }


def _per_pc_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])])


# ---------------------------------------------------------------- signature
def _scanpy_signature() -> tuple[list[dict], str]:
    """scanpy's parameters (name, kind, default as source text) and where they came from.

    Read at check time from scanpy's source: ``$HARMONYPY_SCANPY_SOURCE`` (the
    path of ``src/scanpy/preprocessing/_harmony/__init__.py`` in a checkout),
    else the installed scanpy when it has the native implementation (1.13+),
    else the signature stored with the scanpy outputs (read from the same
    source by ``benchmarks/scanpy_outputs.py``).
    """
    path = os.environ.get("HARMONYPY_SCANPY_SOURCE")
    if not path:
        try:
            from scanpy.preprocessing import _harmony  # scanpy >= 1.13

            path = _harmony.__file__
        except Exception:  # noqa: BLE001 - not installed, older, or broken: use the stored copy
            path = None
    if path:
        tree = ast.parse(Path(path).read_text())
        node = next(
            n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "harmony_integrate"
        )
        a = node.args
        positional = a.posonlyargs + a.args
        defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
        params = [
            dict(
                name=x.arg,
                kind="POSITIONAL_OR_KEYWORD",
                default=None if d is None else ast.unparse(d),
            )
            for x, d in zip(positional, defaults, strict=True)
        ]
        params += [
            dict(name=x.arg, kind="KEYWORD_ONLY", default=None if d is None else ast.unparse(d))
            for x, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
        ]
        return params, str(path)
    record = json.loads((DATA / "scanpy_native.json").read_text())
    return record["signature"], f"stored signature of scanpy {record['scanpy_commit'][:8]}"


def _default_value(text: str):
    """A default written as source text (``np.float64``, ``1e-05``, ``None``, ...)."""
    if text.startswith("np."):
        return getattr(np, text[3:])
    return ast.literal_eval(text)


def test_every_scanpy_parameter_with_its_default():
    scanpy_params, source = _scanpy_signature()
    ours = inspect.signature(hm.harmony_integrate).parameters
    assert len(scanpy_params) >= 20, source
    names = list(ours)
    for position, param in enumerate(scanpy_params):
        name = param["name"]
        assert name in ours, f"{name} missing ({source})"
        assert names[position] == name, f"{name} out of scanpy's order ({source})"
        assert ours[name].kind.name == param["kind"], name
        if param["default"] is None:
            assert ours[name].default is inspect.Parameter.empty, name
        else:
            expected = _default_value(param["default"])
            assert ours[name].default == expected, (name, ours[name].default, expected)
            assert type(ours[name].default) is type(expected), name
    # This package's own options come after scanpy's and are keyword-only.
    extra = names[len(scanpy_params) :]
    assert set(extra) == {"device", "verbose", "ncores", "callback"}
    assert all(ours[n].kind is inspect.Parameter.KEYWORD_ONLY for n in extra)


def test_mapping_table_covers_every_numeric_argument():
    scanpy_params, _ = _scanpy_signature()
    handled_in_code = {"adata", "basis", "adjusted_basis", "flavor", "correction_method"}
    names = {p["name"] for p in scanpy_params}
    assert names - handled_in_code == set(SCANPY_TO_RUN_HARMONY)
    run_params = inspect.signature(hm.run_harmony).parameters
    assert all(target in run_params for target, _ in SCANPY_TO_RUN_HARMONY.values())


# ----------------------------------------------------- agreement with scanpy
@pytest.mark.parametrize("name", ["pbmc_3500", "pbmcs_small", "cell_lines_small"])
def test_harmony2_defaults_agree_with_scanpy(name, shared_data):
    pcs, meta, key = _real_sets(shared_data)[name]
    stored = np.load(DATA / "scanpy_native.npz", allow_pickle=False)[f"{name}__harmony2"]
    adata = _duck(pcs, meta)
    hm.harmony_integrate(adata, key, rng=0, verbose=False)
    r = _per_pc_r(adata.obsm["X_pca_harmony"], stored)
    assert r.min() >= 0.97, (name, r.min())
    assert np.median(r) >= 0.99, (name, np.median(r))
    # Both moved the cells: the agreement is not the uncorrected input's.
    assert _per_pc_r(pcs, stored).min() < r.min()


def test_harmony1_agrees_with_r():
    pcs = read_tsv(BUNDLED / "pbmc_3500_pcs.tsv.gz").to_numpy()
    meta = read_tsv(BUNDLED / "pbmc_3500_meta.tsv.gz")
    r_package = read_tsv(BUNDLED / "pbmc_3500_pcs_harmonized.tsv.gz").to_numpy()
    adata = _duck(pcs, meta)
    hm.harmony_integrate(adata, "donor", flavor="harmony1", rng=0, verbose=False)
    assert _per_pc_r(adata.obsm["X_pca_harmony"], r_package).min() >= 0.99


# ----------------------------------------------------------- the output
def test_writes_only_obsm_in_the_requested_dtype(small):
    pcs, meta = small
    adata = _duck(pcs, meta)
    obs_before = adata.obs.copy()
    assert hm.harmony_integrate(adata, "donor", rng=0, max_iter_harmony=2, verbose=False) is None
    assert set(adata.obsm) == {"X_pca", "X_pca_harmony"}
    assert adata.uns == {}
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    np.testing.assert_array_equal(adata.obsm["X_pca"], pcs)
    out = adata.obsm["X_pca_harmony"]
    assert out.dtype == np.float64 and out.shape == pcs.shape and out.flags.c_contiguous
    hm.harmony_integrate(
        adata,
        "donor",
        dtype=np.float32,
        adjusted_basis="X_f32",
        rng=0,
        max_iter_harmony=2,
        verbose=False,
    )
    assert adata.obsm["X_f32"].dtype == np.float32
    assert _per_pc_r(adata.obsm["X_f32"], out).min() > 0.999


def test_equals_run_harmony_with_the_translated_defaults(small):
    pcs, meta = small
    adata = _duck(pcs, meta)
    hm.harmony_integrate(adata, "donor", rng=3, verbose=False)
    ho = hm.run_harmony(
        pcs,
        meta,
        "donor",
        algorithm="harmony2",
        dtype="float64",
        nclust=scanpy_default_clusters(len(meta)),
        max_iter_harmony=10,
        max_iter_kmeans=200,
        epsilon_harmony=1e-4,
        epsilon_cluster=1e-5,
        sigma=0.1,
        theta=2.0,
        tau=0,
        lamb=-1,
        alpha=0.2,
        batch_prop_cutoff=1e-5,
        block_size=0.05,
        random_state=3,
        verbose=False,
    )
    np.testing.assert_array_equal(adata.obsm["X_pca_harmony"], ho.Z_corr.T)


def test_scanpy_default_clusters_truncates():
    assert scanpy_default_clusters(1200) == 40
    assert scanpy_default_clusters(1229) == 40  # R would round to 41
    assert scanpy_default_clusters(100_000) == 100
    assert scanpy_default_clusters(40) == 2  # scanpy's floor of 2


# ----------------------------------------- each argument, one at a time
BASE = dict(max_iter_harmony=2, rng=0, verbose=False)

#: scanpy argument and value -> the run_harmony arguments it must become.
ONE_AT_A_TIME = [
    ("n_clusters", 25, dict(nclust=25)),
    ("max_iter_harmony", 1, dict(max_iter_harmony=1)),
    ("max_iter_clustering", 3, dict(max_iter_kmeans=3)),
    ("tol_harmony", 0.5, dict(epsilon_harmony=0.5)),
    ("tol_clustering", 1e-2, dict(epsilon_cluster=1e-2)),
    ("sigma", 0.2, dict(sigma=0.2)),
    ("theta", 0.5, dict(theta=0.5)),
    ("theta", [1.0, 2.0, 4.0], dict(theta=[1.0, 2.0, 4.0])),
    ("tau", 5, dict(tau=5)),
    ("alpha", 0.5, dict(alpha=0.5)),
    ("batch_prune_threshold", 0.2, dict(batch_prop_cutoff=0.2)),
    ("batch_prune_threshold", None, dict(batch_prop_cutoff=0.0)),
    ("block_proportion", 0.2, dict(block_size=0.2)),
    ("rng", 7, dict(random_state=7)),
]


def _translated(meta: pd.DataFrame, **changes) -> dict:
    """run_harmony arguments of harmony_integrate's defaults (flavor harmony2), changed."""
    kwargs = dict(
        algorithm="harmony2",
        dtype="float64",
        nclust=scanpy_default_clusters(len(meta)),
        max_iter_harmony=2,
        max_iter_kmeans=200,
        epsilon_harmony=1e-4,
        epsilon_cluster=1e-5,
        sigma=0.1,
        theta=2.0,
        tau=0,
        lamb=-1,
        alpha=0.2,
        batch_prop_cutoff=1e-5,
        block_size=0.05,
        random_state=0,
        verbose=False,
    )
    kwargs.update(changes)
    return kwargs


@pytest.fixture(scope="module")
def default_output(small):
    pcs, meta = small
    adata = _duck(pcs, meta)
    hm.harmony_integrate(adata, "donor", **BASE)
    return adata.obsm["X_pca_harmony"]


@pytest.mark.parametrize(
    "argument, value, expected", ONE_AT_A_TIME, ids=[f"{a}={v}" for a, v, _ in ONE_AT_A_TIME]
)
def test_each_argument_maps_onto_run_harmony(small, default_output, argument, value, expected):
    pcs, meta = small
    adata = _duck(pcs, meta)
    hm.harmony_integrate(adata, "donor", **{**BASE, argument: value})
    ho = hm.run_harmony(pcs, meta, "donor", **_translated(meta, **expected))
    np.testing.assert_array_equal(adata.obsm["X_pca_harmony"], ho.Z_corr.T)
    if (argument, value) != ("batch_prune_threshold", None):
        # Each argument changes the result (pruning nothing and pruning pairs
        # below 1e-5 of a batch coincide on this data).
        assert not np.array_equal(adata.obsm["X_pca_harmony"], default_output), argument


def test_harmony1_flavor_uses_ridge_lambda(small):
    pcs, meta = small
    outputs = {}
    for lam in (1.0, 5.0):
        adata = _duck(pcs, meta)
        hm.harmony_integrate(adata, "donor", flavor="harmony1", ridge_lambda=lam, **BASE)
        ho = hm.run_harmony(
            pcs,
            meta,
            "donor",
            **_translated(meta, algorithm="harmony1", lamb=lam, batch_prop_cutoff=1e-5),
        )
        np.testing.assert_array_equal(adata.obsm["X_pca_harmony"], ho.Z_corr.T)
        outputs[lam] = adata.obsm["X_pca_harmony"]
    # A larger ridge penalty corrects less: the output stays closer to the input.
    moved = {lam: np.abs(out - pcs).mean() for lam, out in outputs.items()}
    assert moved[5.0] < moved[1.0]


def test_several_keys_are_separate_batch_variables(small):
    pcs, meta = small
    meta = meta.assign(half=np.where(np.arange(len(meta)) % 2 == 0, "a", "b"))
    adata = _duck(pcs, meta)
    hm.harmony_integrate(adata, ["donor", "half"], **BASE)
    ho = hm.run_harmony(pcs, meta, ["donor", "half"], **_translated(meta))
    np.testing.assert_array_equal(adata.obsm["X_pca_harmony"], ho.Z_corr.T)
    assert ho.B == 5


def test_basis_and_adjusted_basis(small):
    pcs, meta = small
    adata = _duck(pcs, meta)
    adata.obsm["X_other"] = pcs[:, :10].copy()
    hm.harmony_integrate(adata, "donor", basis="X_other", adjusted_basis="X_other_h", **BASE)
    assert adata.obsm["X_other_h"].shape == (len(meta), 10)
    assert "X_pca_harmony" not in adata.obsm


def test_rng_generator_is_drawn_from_and_int_is_reproducible(small):
    pcs, meta = small
    outs = []
    for _ in range(2):
        adata = _duck(pcs, meta)
        hm.harmony_integrate(adata, "donor", **{**BASE, "rng": 11})
        outs.append(adata.obsm["X_pca_harmony"])
    np.testing.assert_array_equal(outs[0], outs[1])
    generator = np.random.default_rng(5)
    state = generator.bit_generator.state["state"]["state"]
    adata = _duck(pcs, meta)
    hm.harmony_integrate(adata, "donor", **{**BASE, "rng": generator})
    assert generator.bit_generator.state["state"]["state"] != state  # advanced, as scanpy does
    # The same generator seed gives the same result.
    again = _duck(pcs, meta)
    hm.harmony_integrate(again, "donor", **{**BASE, "rng": np.random.default_rng(5)})
    np.testing.assert_array_equal(adata.obsm["X_pca_harmony"], again.obsm["X_pca_harmony"])
    # A sequence of ints and a SeedSequence are seeds too, as for default_rng.
    for seed in ([1, 2, 3], np.random.SeedSequence(9)):
        other = _duck(pcs, meta)
        hm.harmony_integrate(other, "donor", **{**BASE, "rng": seed})
        assert np.isfinite(other.obsm["X_pca_harmony"]).all()


def test_caller_global_random_state_untouched(small):
    pcs, meta = small
    np.random.seed(123)
    expected = np.random.random_sample(3)
    np.random.seed(123)
    hm.harmony_integrate(_duck(pcs, meta), "donor", **{**BASE, "rng": None})
    np.testing.assert_array_equal(np.random.random_sample(3), expected)


# --------------------------------------------------------------- warnings
@pytest.mark.parametrize(
    "flavor, kwargs, message",
    [
        ("harmony2", dict(ridge_lambda=2.0), "ridge_lambda is ignored"),
        ("harmony1", dict(alpha=0.5), "alpha is ignored"),
        ("harmony1", dict(batch_prune_threshold=0.1), "batch_prune_threshold is ignored"),
    ],
)
def test_ignored_arguments_warn_like_scanpy(small, flavor, kwargs, message):
    pcs, meta = small
    with pytest.warns(UserWarning, match=message):
        hm.harmony_integrate(
            _duck(pcs, meta), "donor", flavor=flavor, **{**BASE, "max_iter_harmony": 1}, **kwargs
        )


# ----------------------------------------------------------------- errors
def test_missing_basis_lists_the_available_ones(small):
    pcs, meta = small
    with pytest.raises(ValueError, match=r"'X_umap' is not available.*\['X_pca'\]"):
        hm.harmony_integrate(_duck(pcs, meta), "donor", basis="X_umap")


def test_missing_key_lists_the_columns(small):
    pcs, meta = small
    with pytest.raises(KeyError, match=r"'donr'.*'donor'"):
        hm.harmony_integrate(_duck(pcs, meta), "donr")


def test_unknown_keyword_is_a_type_error(small):
    pcs, meta = small
    with pytest.raises(TypeError, match="random_state"):
        hm.harmony_integrate(_duck(pcs, meta), "donor", random_state=0)
    with pytest.raises(TypeError):
        hm.harmony_integrate(_duck(pcs, meta), "donor", "X_pca")  # basis is keyword-only


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(flavor="harmony3"), ValueError, "flavor must be 'harmony1' or 'harmony2'"),
        (dict(correction_method="original"), ValueError, "correction_method must be 'fast'"),
        (dict(dtype=np.int32), ValueError, "dtype must be np.float32 or np.float64"),
        (dict(dtype="not a dtype"), TypeError, "dtype"),
        (dict(adjusted_basis="X_pca"), ValueError, "adjusted_basis must differ"),
        (dict(rng=-1), ValueError, "rng must be >= 0"),
        (dict(rng="seed"), TypeError, "rng must be"),
        (dict(sigma=0), ValueError, "sigma"),
        (dict(n_clusters=0), ValueError, "nclust"),
        (dict(block_proportion=2), ValueError, "block_size"),
    ],
)
def test_bad_values_are_refused_before_any_work(small, kwargs, error, match):
    pcs, meta = small
    adata = _duck(pcs, meta)
    with pytest.raises(error, match=match):
        hm.harmony_integrate(adata, "donor", verbose=False, **kwargs)
    assert set(adata.obsm) == {"X_pca"}


def test_nan_input_is_refused(small):
    pcs, meta = small
    bad = pcs.copy()
    bad[5, 2] = np.nan
    adata = _duck(bad, meta)
    with pytest.raises(ValueError, match="NaN|finite"):
        hm.harmony_integrate(adata, "donor", verbose=False)
    assert "X_pca_harmony" not in adata.obsm


# ------------------------------------------------------------ real AnnData
def test_real_anndata(small):
    anndata = pytest.importorskip("anndata")
    pcs, meta = small
    adata = anndata.AnnData(obs=meta.copy())
    adata.obsm["X_pca"] = pcs.copy()
    hm.harmony_integrate(adata, "donor", **BASE)
    assert adata.obsm["X_pca_harmony"].shape == pcs.shape
    assert len(adata.uns) == 0
