"""harmonypy.integrate on AnnData (and AnnData look-alikes), and scanpy's wrapper."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import harmonypy as hm
from conftest import read_tsv
from harmonypy._optional import require_anndata
from harmonypy.adapters.anndata import integrate
from harmonypy.engine.design import ColumnNotFoundError

# A short run is enough to compare two code paths with the same seed.
FAST = dict(max_iter_harmony=3, verbose=False)


@pytest.fixture(scope="module")
def pbmcs_small(shared_data):
    """(pcs (1200, 20) float32, meta with cell_id as index, donor, cell_type, ...)."""
    pcs = read_tsv(shared_data / "pbmcs_small_pcs.tsv.gz").to_numpy(np.float32)
    meta = read_tsv(shared_data / "pbmcs_small_meta.tsv.gz").set_index("cell_id")
    return pcs, meta


def _duck(pcs: np.ndarray, meta: pd.DataFrame) -> SimpleNamespace:
    """The three attributes integrate() uses, without anndata."""
    return SimpleNamespace(obsm={"X_pca": pcs.copy()}, obs=meta.copy(), uns={})


def _adata(pcs: np.ndarray, meta: pd.DataFrame):
    anndata = pytest.importorskip("anndata", reason="anndata not installed")
    return anndata.AnnData(obs=meta.copy(), obsm={"X_pca": pcs.copy()})


def test_public_name():
    assert hm.integrate is integrate


def test_integrate_matches_run_harmony(pbmcs_small):
    pcs, meta = pbmcs_small
    adata = _duck(pcs, meta)
    ho = integrate(adata, "donor", random_state=3, **FAST)
    expected = hm.run_harmony(pcs, meta, ["donor"], random_state=3, **FAST).Z_corr.T

    out = adata.obsm["X_pca_harmony"]
    assert out.shape == (1200, 20)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, ho.Z_corr.T)
    # The input embedding is left alone.
    np.testing.assert_array_equal(adata.obsm["X_pca"], pcs)


def test_uns_record(pbmcs_small):
    pcs, meta = pbmcs_small
    adata = _duck(pcs, meta)
    ho = integrate(adata, ["donor"], adjusted_basis="X_h", theta=1.5, nclust=20, **FAST)
    rec = adata.uns["harmony"]
    assert rec["key"] == ["donor"]
    assert (rec["basis"], rec["adjusted_basis"]) == ("X_pca", "X_h")
    assert rec["params"]["theta"] == 1.5 and rec["params"]["nclust"] == 20
    assert rec["params"]["max_iter_harmony"] == 3
    assert rec["algorithm"] == "harmony1"
    assert rec["n_iter"] == ho.n_iter and rec["converged"] == ho.converged
    np.testing.assert_allclose(rec["objective_harmony"], ho.objective_harmony)
    assert list(rec["kmeans_rounds"]) == list(ho.kmeans_rounds)
    assert rec["n_clusters"] == 20
    assert rec["version"] == hm.__version__
    assert "X_h" in adata.obsm


def test_dataframe_basis(pbmcs_small):
    # obsm may hold a DataFrame indexed by cell names.
    pcs, meta = pbmcs_small
    adata = _duck(pcs, meta)
    adata.obsm["X_pca"] = pd.DataFrame(pcs, index=meta.index)
    integrate(adata, "donor", **FAST)
    assert adata.obsm["X_pca_harmony"].shape == (1200, 20)


def test_missing_basis_lists_keys(pbmcs_small):
    pcs, meta = pbmcs_small
    adata = _duck(pcs, meta)
    adata.obsm["X_umap"] = pcs[:, :2]
    with pytest.raises(KeyError, match=r"'X_scvi'.*available obsm keys: 'X_pca', 'X_umap'"):
        integrate(adata, "donor", basis="X_scvi")


def test_missing_obs_column_lists_columns(pbmcs_small):
    pcs, meta = pbmcs_small
    with pytest.raises(KeyError, match=r"'batch' not found in adata.obs.*'donor'.*'cell_type'"):
        integrate(_duck(pcs, meta), ["donor", "batch"])


def test_not_an_anndata():
    with pytest.raises(TypeError, match="needs an AnnData object"):
        integrate(np.zeros((10, 2)), "donor")


def test_bad_key_type(pbmcs_small):
    pcs, meta = pbmcs_small
    with pytest.raises(TypeError, match="obs column name"):
        integrate(_duck(pcs, meta), 3)


def test_require_anndata_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "anndata", None)  # makes `import anndata` fail
    with pytest.raises(ImportError, match=r"pip install harmonypy\[anndata\]"):
        require_anndata()


def test_real_anndata_and_h5ad_roundtrip(pbmcs_small, tmp_path):
    pcs, meta = pbmcs_small
    adata = _adata(pcs, meta)
    integrate(adata, "donor", **FAST)
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)  # the uns record must be storable
    back = require_anndata().read_h5ad(path)
    np.testing.assert_array_equal(back.obsm["X_pca_harmony"], adata.obsm["X_pca_harmony"])
    assert back.uns["harmony"]["n_iter"] == adata.uns["harmony"]["n_iter"]
    assert back.uns["harmony"]["params"]["max_iter_harmony"] == 3


def test_scanpy_wrapper_matches_integrate(pbmcs_small):
    try:
        import scanpy.external as sce
    except Exception as err:  # noqa: BLE001 - scanpy missing, or broken against this numpy/pandas
        pytest.skip(f"scanpy cannot be imported: {err}")
    pcs, meta = pbmcs_small
    ours = _adata(pcs, meta)
    theirs = _adata(pcs, meta)
    integrate(ours, "donor", random_state=7, **FAST)
    # scanpy casts X_pca to float64 and calls harmonypy.run_harmony(x, obs, key, **kwargs).
    sce.pp.harmony_integrate(theirs, "donor", random_state=7, **FAST)
    np.testing.assert_array_equal(
        np.asarray(theirs.obsm["X_pca_harmony"], dtype=np.float32), ours.obsm["X_pca_harmony"]
    )


def test_scanpy_wrapper_defaults(pbmcs_small):
    """scanpy's call with no extra kwargs (verbose=True by default) works too."""
    try:
        import scanpy.external as sce
    except Exception as err:  # noqa: BLE001 - as above
        pytest.skip(f"scanpy cannot be imported: {err}")
    pcs, meta = pbmcs_small
    adata = _adata(pcs, meta)
    sce.pp.harmony_integrate(adata, ["donor"], max_iter_harmony=2)
    assert adata.obsm["X_pca_harmony"].shape == (1200, 20)


def test_adjusted_basis_equal_to_basis_is_refused(pbmcs_small):
    pcs, meta = pbmcs_small
    adata = _duck(pcs, meta)
    with pytest.raises(ValueError, match=r"adjusted_basis must differ from basis \('X_pca'\)"):
        integrate(adata, "donor", adjusted_basis="X_pca", **FAST)
    np.testing.assert_array_equal(adata.obsm["X_pca"], pcs)  # the input is still there
    assert "harmony" not in adata.uns


def test_every_writer_refuses_adjusted_basis_equal_to_basis_alike(mapping_case):
    """One check and one message wherever a corrected embedding would go to obsm."""
    ref, pcs, meta = mapping_case
    calls = {
        "integrate": lambda a: integrate(a, "donor", adjusted_basis="X_pca", **FAST),
        "harmony_integrate": lambda a: hm.harmony_integrate(a, "donor", adjusted_basis="X_pca"),
        "build_reference": lambda a: hm.build_reference(a, None, adjusted_basis="X_pca"),
        "map_query": lambda a: hm.map_query(a, ref, basis="X_pca", adjusted_basis="X_pca"),
    }
    expected = (
        r"^adjusted_basis must differ from basis \('X_pca'\): writing the corrected "
        r"embedding there would replace the only copy of the uncorrected one; use e\.g\. "
        r"adjusted_basis='X_pca_harmony'$"
    )
    for name, call in calls.items():
        adata = _duck(pcs, meta)
        with pytest.raises(ValueError, match=expected):
            call(adata)
        assert set(adata.obsm) == {"X_pca"}, name  # nothing written


def test_missing_columns_raise_one_error_type_everywhere(mapping_case):
    """A column named by an argument but absent: ColumnNotFoundError (a KeyError
    and a ValueError, so either ``except`` still catches it) from every layer."""
    ref, pcs, meta = mapping_case
    cases = [
        (
            lambda: hm.run_harmony(pcs, meta, "dnor", **FAST),
            r"vars_use names column\(s\) \['dnor'\] not found in meta_data \(did you mean: "
            r"'dnor' -> 'donor'\?\); available columns: \['donor', 'nUMI', .*'cell_type'",
        ),
        (
            lambda: hm.map_query(pcs, meta, ref, vars_use="dnor"),
            r"vars_use names column\(s\) \['dnor'\] not found in meta_data \(did you mean",
        ),
        (
            lambda: hm.build_reference(pcs, meta, labels="celltype"),
            r"labels names column\(s\) \['celltype'\] not found in meta_data \(did you mean: "
            r"'celltype' -> 'cell_type'\?\)",
        ),
        (
            lambda: integrate(_duck(pcs, meta), "dnor", **FAST),
            r"batch column\(s\) 'dnor' not found in adata\.obs \(did you mean: 'dnor' -> "
            r"'donor'\?\); available columns: 'donor', 'nUMI', .*'cell_type'",
        ),
        (
            lambda: hm.build_reference(_duck(pcs, meta), None, labels="celltype"),
            r"label column\(s\) 'celltype' not found in adata\.obs",
        ),
    ]
    for call, pattern in cases:
        with pytest.raises(ColumnNotFoundError, match=pattern) as info:
            call()
        assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
        assert not str(info.value).startswith("'"), str(info.value)  # not KeyError's quotes


# ------------------------------------------------- mapping outputs (AnnData)
@pytest.fixture(scope="module")
def mapping_case():
    """A one-batch reference of the bundled 3' v2 cells (labels kept) and the
    3' v1 + 5' cells as a query, each chemistry its own batch."""
    pcs, meta = hm.datasets.load_pbmcs_small()
    meta = meta.set_index("cell_id")
    pcs = pcs.set_axis(meta.index).to_numpy(np.float32)
    in_ref = (meta["donor"] == "3pv2").to_numpy()
    ref = hm.build_reference(
        pcs[in_ref], meta[in_ref], labels="cell_type", nclust=10, random_state=0
    )
    return ref, pcs[~in_ref], meta[~in_ref]


def _query(mapping_case):
    _, pcs, meta = mapping_case
    return _adata(pcs, meta[["donor", "cell_type"]])


def test_mapping_never_replaces_what_it_did_not_write(mapping_case):
    """A query integrated on its own keeps obsm['X_pca_harmony']: map_query
    refuses to write there (or over obs columns it did not write) unless
    overwrite=True, before any work; an earlier mapping's outputs are its own
    and are replaced by mapping again."""
    ref = mapping_case[0]
    query = _query(mapping_case)
    hm.integrate(query, "donor", **FAST)
    own = query.obsm["X_pca_harmony"].copy()
    query.obs["mapping_score"] = 1.0
    before = (query.obs.copy(), dict(query.uns))
    with pytest.raises(ValueError) as info:
        hm.map_query(query, ref, "donor", basis="X_pca", labels="cell_type")
    message = str(info.value)
    for fact in [
        "obsm['X_pca_harmony']",
        "obs['mapping_score']",
        "no earlier mapping",
        "hm.integrate",
        "adjusted_basis=",
        "overwrite=True",
    ]:
        assert fact in message, (fact, message)
    np.testing.assert_array_equal(query.obsm["X_pca_harmony"], own)
    pd.testing.assert_frame_equal(query.obs, before[0])
    assert "harmony_mapping" not in query.uns and query.uns.keys() == before[1].keys()
    # Another key for the embedding: the obs column still stands in the way.
    with pytest.raises(ValueError, match=r"obs\['mapping_score'\]") as info:
        hm.map_query(query, ref, "donor", basis="X_pca", adjusted_basis="X_mapped")
    assert "obsm" not in str(info.value)
    q = hm.map_query(
        query, ref, "donor", basis="X_pca", adjusted_basis="X_mapped", confidence=False
    )
    np.testing.assert_array_equal(query.obsm["X_pca_harmony"], own)
    np.testing.assert_array_equal(query.obsm["X_mapped"], q.result().astype(np.float32))
    assert (query.obs["mapping_score"] == 1.0).all()
    # Mapping again replaces the earlier mapping's own outputs without asking.
    hm.map_query(
        query,
        ref,
        "donor",
        basis="X_pca",
        adjusted_basis="X_mapped",
        confidence=False,
        labels="cell_type",
    )
    hm.transfer_labels(query, ref, "cell_type", k=5)
    assert query.uns["harmony_mapping"]["k"] == [5]
    # overwrite=True replaces what it was told to.
    q = hm.map_query(query, ref, "donor", basis="X_pca", overwrite=True)
    np.testing.assert_array_equal(query.obsm["X_pca_harmony"], q.result().astype(np.float32))
    np.testing.assert_array_equal(query.obs["mapping_score"], q.confidence)


def test_transfer_labels_never_replaces_columns_it_did_not_write(mapping_case):
    ref = mapping_case[0]
    query = _query(mapping_case)
    hm.map_query(query, ref, "donor", basis="X_pca")
    query.obs["cell_type_probability"] = 0.25  # someone else's column
    with pytest.raises(ValueError) as info:
        hm.transfer_labels(query, ref, "cell_type")
    message = str(info.value)
    for fact in ["obs['cell_type_probability']", "no earlier mapping", "overwrite=True"]:
        assert fact in message, (fact, message)
    assert "adjusted_basis" not in message  # not a remedy for an obs column
    assert (
        "cell_type_predicted" not in query.obs
        and (query.obs["cell_type_probability"] == 0.25).all()
    )
    table = hm.transfer_labels(query, ref, "cell_type", overwrite=True)
    np.testing.assert_array_equal(query.obs["cell_type_probability"], table["probability"])
    # overwrite is for an AnnData query only.
    with pytest.raises(TypeError, match="overwrite.*only for an AnnData query"):
        hm.transfer_labels(query.obsm["X_pca_harmony"], ref, "cell_type", overwrite=True)
    with pytest.raises(TypeError, match="overwrite.*only for an AnnData query"):
        hm.map_query(query.obsm["X_pca"], query.obs, ref, "donor", overwrite=True)


def test_mapping_errors_name_the_anndata_entry(mapping_case):
    """Errors about the query's cells name where they come from (obsm[basis]),
    not map_query's data_mat, and an empty query is refused as such."""
    ref = mapping_case[0]
    query = _query(mapping_case)
    query.obsm["X_pca"][3, 2] = np.nan
    query.obsm["X_short"] = query.obsm["X_pca"][:, :5]
    cases = [
        (
            dict(basis="X_pca"),
            [r"adata_query\.obsm\['X_pca'\] has 1 non-finite", r"cell\(s\) 3 \('threepv1_\w+'\)"],
        ),
        (
            dict(basis="X_short"),
            [r"adata_query\.obsm\['X_short'\] has 5 dimensions per cell", r"built on 20"],
        ),
    ]
    for kwargs, facts in cases:
        with pytest.raises(ValueError) as info:
            hm.map_query(query, ref, **kwargs)
        assert "data_mat" not in str(info.value), str(info.value)
        for fact in facts:
            assert re.search(fact, str(info.value)), (fact, str(info.value))
    with pytest.raises(ValueError, match=r"adata_query has no cells"):
        hm.map_query(query[:0].copy(), ref, basis="X_pca")


# The adapter layer: the modules that know AnnData objects (besides the file
# formats in _io). Only the command line and the package's front page sit above it.
ADAPTERS = {
    "harmonypy.adapters.anndata",
    "harmonypy.adapters.mapping_api",
    "harmonypy.adapters.scanpy",
}
ABOVE_ADAPTERS = {"harmonypy", "harmonypy.cli"}


def _package_imports(path: Path, package: str) -> set[str]:
    """Modules of ``harmonypy`` that the file at ``path`` imports, inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1]
                    + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("harmonypy.")}


def _within(module: str, packages: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_only_the_adapter_layer_imports_the_adapters():
    """The array layers (engine, mapping, I/O, metrics, shard) never import the
    AnnData adapters, which call them: no import circle through _anndata."""
    root = Path(hm.__file__).parent
    offenders = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module == "harmonypy" or _within(module, ADAPTERS | ABOVE_ADAPTERS - {"harmonypy"}):
            continue
        package = ".".join(parts[:-1])
        bad = {name for name in _package_imports(path, package) if _within(name, ADAPTERS)}
        if bad:
            offenders[module] = sorted(bad)
    assert not offenders, offenders
