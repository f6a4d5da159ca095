"""Bad inputs to reference mapping: a clear error before any work, or the right answer.

The surface: ``map_query`` and ``transfer_labels`` on arrays and on AnnData,
``harmonypy map`` and ``harmonypy reference build``. Each case states the
input (what is changed from a good call), the expected error type (for the
command line: exit status 2 and one line on stderr) and the words (regexes)
the message must contain. Inputs that are legitimate but easy to get wrong
(names in another order, one cell, an ``.npy`` beside named metadata) are
checked for the right answer instead. Corrupt reference *files* are
``test_adversarial_reference.py``'s.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import harmonypy as hm
from harmonypy import cli

N_REF, N_QUERY, N_DIMS = 200, 80, 6
REF_NAMES = [f"r{i}" for i in range(N_REF)]
QUERY_NAMES = [f"q{i}" for i in range(N_QUERY)]


def _cells(rng, n, shift):
    types = rng.integers(0, 3, n)
    centres = np.array([[4, 0, 0, 0, 0, 0], [0, 4, 0, 0, 0, 0], [0, 0, 4, 0, 0, 0]], float)
    return centres[types] + shift + rng.normal(0, 0.5, (n, N_DIMS)), types


@pytest.fixture(scope="module")
def data():
    """A Harmony reference (two batches, labels kept) of named cells, and a
    named query of two batches: (ref, query pcs DataFrame, query meta)."""
    rng = np.random.default_rng(5)
    z_ref, t_ref = _cells(rng, N_REF, 0.0)
    z_ref[N_REF // 2 :] += 1.0
    meta_ref = pd.DataFrame(
        {"batch": np.repeat(["a", "b"], N_REF // 2), "cell_type": [f"t{t}" for t in t_ref]},
        index=REF_NAMES,
    )
    ho = hm.run_harmony(
        pd.DataFrame(z_ref, index=REF_NAMES),
        meta_ref,
        "batch",
        nclust=5,
        max_iter_harmony=2,
        verbose=False,
        random_state=0,
    )
    ref = hm.build_reference(ho, meta_ref, labels="cell_type")
    z_query, t_query = _cells(rng, N_QUERY, 0.5)
    query = pd.DataFrame(z_query, index=QUERY_NAMES, columns=[f"PC{i + 1}" for i in range(6)])
    meta = pd.DataFrame(
        {
            "sample": np.repeat(["s1", "s2"], N_QUERY // 2),
            "cell_type": [f"t{t}" for t in t_query],
            "site": "A",
        },
        index=QUERY_NAMES,
    )
    return ref, query, meta


def _facts(message: str, facts) -> None:
    for fact in facts:
        assert re.search(fact, message), f"{fact!r} not in message: {message}"


# ================================================================ map_query
def _with_value(frame, row, column, value):
    out = frame.copy()
    out.iloc[row, column] = value
    return out


# name: (change to map_query(query, meta, ref, "sample"), error, facts).
# A change is a function of (query, meta, ref) returning the call's arguments.
MAP_CASES = {
    "lamb 0 without vars_use": (
        lambda q, m, r: ((q, m, r), dict(lamb=0)),
        ValueError,
        [
            r"lamb must be > 0",
            r"query=all cells",
            r"without vars_use the query is one batch",
            r"lamb=-1",
        ],
    ),
    "lamb -2 without vars_use": (
        lambda q, m, r: ((q, m, r), dict(lamb=-2)),
        ValueError,
        [r"lamb must be > 0", r"\[-2\.0\]", r"one batch"],
    ),
    "two lambs without vars_use": (
        lambda q, m, r: ((q, m, r), dict(lamb=[1, 2])),
        ValueError,
        [r"lamb has 2 values", r"one batch", r"vars_use"],
    ),
    "lamb 0 with vars_use": (
        lambda q, m, r: ((q, m, r, "sample"), dict(lamb=0)),
        ValueError,
        [r"lamb must be > 0", r"sample=s1", r"lamb=-1"],
    ),
    "lamb NaN": (
        lambda q, m, r: ((q, m, r, "sample"), dict(lamb=float("nan"))),
        ValueError,
        [r"lamb must be finite", r"nan"],
    ),
    "lamb as text": (
        lambda q, m, r: ((q, m, r), dict(lamb="1")),
        TypeError,
        [r"lamb must be a number", r"'1'"],
    ),
    "three lambs for two levels": (
        lambda q, m, r: ((q, m, r, "sample"), dict(lamb=[1, 2, 3])),
        ValueError,
        [r"lamb has 3 values", r"sample=s1"],
    ),
    "fewer PCs than the reference": (
        lambda q, m, r: ((q.iloc[:, :4], m, r), {}),
        ValueError,
        [r"4 dimensions per cell", r"built on 6", r"reference's PC space"],
    ),
    "a reference from another basis": (
        lambda q, m, r: ((q, m, hm.build_reference(q.to_numpy()[:, :3], nclust=2)), {}),
        ValueError,
        [r"6 dimensions per cell", r"built on 3"],
    ),
    "NaN in the query": (
        lambda q, m, r: ((_with_value(q, 7, 2, np.nan), m, r), {}),
        ValueError,
        [r"1 non-finite", r"1 NaN", r"cell\(s\) 7 \('q7'\)", r"column\(s\) 2", r"remove or impute"],
    ),
    "infinity in the query": (
        lambda q, m, r: ((_with_value(q, 0, 0, np.inf), m, r), {}),
        ValueError,
        [r"non-finite", r"1 infinite", r"'q0'"],
    ),
    "an all-zero cell": (
        lambda q, m, r: ((_with_value(q, 3, slice(None), 0.0), m, r), {}),
        ValueError,
        [r"all-zero", r"'q3'", r"cosine"],
    ),
    "empty query": (
        lambda q, m, r: ((q.iloc[:0], None, r), {}),
        ValueError,
        [r"empty", r"\(0, 6\)", r"at least one cell"],
    ),
    "one cell as a 1-D array": (
        lambda q, m, r: ((q.to_numpy()[0], None, r), {}),
        ValueError,
        [r"2-D", r"\(6,\)"],
    ),
    "metadata one row short": (
        lambda q, m, r: ((q.to_numpy(), m.iloc[:-1], r), {}),
        ValueError,
        [r"\(80, 6\)", r"79 rows"],
    ),
    "metadata of other cells": (
        lambda q, m, r: ((q, m.set_axis([f"x{i}" for i in range(N_QUERY)]), r), {}),
        ValueError,
        [r"name different cells", r"0 of the embedding's 80 cells", r"'q0'", r"'x0'"],
    ),
    "metadata with repeated names": (
        lambda q, m, r: ((q, m.set_axis(QUERY_NAMES[:40] * 2), r), {}),
        ValueError,
        [r"occur more than once", r"'q0' \(2 times\)"],
    ),
    "unknown batch column": (
        lambda q, m, r: ((q, m, r, "smaple"), {}),
        ValueError,
        [r"'smaple'", r"not found", r"sample"],
    ),
    "batch column without metadata": (
        lambda q, m, r: ((q, None, r, "sample"), {}),
        ValueError,
        [r"vars_use=\['sample'\]", r"meta_data is None"],
    ),
    "missing batch label": (
        lambda q, m, r: ((q, m.assign(sample=m["sample"].where(m.index != "q5")), r, "sample"), {}),
        ValueError,
        [r"'sample' has 1 missing value", r"'q5'"],
    ),
    "cell names as the batch": (
        lambda q, m, r: ((q, m.assign(cell=m.index), r, "cell"), {}),
        ValueError,
        [r"'cell' has 80 levels for 80 cells", r"cell identifier"],
    ),
    "not a reference": (
        lambda q, m, r: ((q, m, "ref.npz"), {}),
        TypeError,
        [r"ref must be a harmonypy Reference", r"str"],
    ),
    "text in the query": (
        lambda q, m, r: ((q.to_numpy().astype(str), m, r), {}),
        TypeError,
        [r"real numbers", r"<U"],
    ),
    "booleans in the query": (
        lambda q, m, r: ((q.to_numpy() > 0, m, r), {}),
        TypeError,
        [r"real numbers", r"bool"],
    ),
    "a float32 overflow": (
        lambda q, m, r: ((q * 1e20, m, r), {}),
        ValueError,
        [r"outside what float32 can normalise", r"rescale", r"dtype='float64'"],
    ),
    "no rounds": (
        lambda q, m, r: ((q, m, r), dict(iterations=0)),
        ValueError,
        [r"iterations must be at least 1, got 0"],
    ),
    "sigma of the wrong length": (
        lambda q, m, r: ((q, m, r), dict(sigma=[0.1, 0.2])),
        ValueError,
        [r"sigma has 2 values", r"one per cluster"],
    ),
    "AnnData-only labels for an array": (
        lambda q, m, r: ((q, m, r), dict(labels="cell_type")),
        TypeError,
        [r"labels: only for an AnnData query", r"transfer_labels"],
    ),
    "overwrite for an array": (
        lambda q, m, r: ((q, m, r), dict(overwrite=True)),
        TypeError,
        [r"overwrite: only for an AnnData query"],
    ),
}


@pytest.mark.parametrize("case", sorted(MAP_CASES))
def test_bad_map_query_inputs(case, data):
    change, error, facts = MAP_CASES[case]
    ref, query, meta = data
    args, kwargs = change(query, meta, ref)
    with pytest.raises(error) as info:
        hm.map_query(*args, **kwargs)
    _facts(str(info.value), facts)


def test_right_answers_for_inputs_easy_to_get_wrong(data):
    """Metadata in another order is paired by name; one cell maps; lamb
    without vars_use is the one query batch's penalty (the larger, the less the
    query moves); integer PCs are numbers."""
    ref, query, meta = data
    plain = hm.map_query(query, meta, ref, "sample", dtype="float64")
    shuffled = hm.map_query(
        query, meta.sample(frac=1, random_state=1), ref, "sample", dtype="float64"
    )
    np.testing.assert_allclose(shuffled.Z_corr, plain.Z_corr)
    assert list(shuffled.cell_names) == QUERY_NAMES
    one = hm.map_query(query.iloc[:1], meta.iloc[:1], ref, "sample", dtype="float64")
    assert one.Z_corr.shape == (N_DIMS, 1)
    moves = [
        np.abs(
            hm.map_query(query, None, ref, lamb=lamb, dtype="float64").Z_corr - query.to_numpy().T
        ).mean()
        for lamb in (0.1, 1.0, 100.0)
    ]
    assert moves[0] > moves[1] > moves[2] > 0
    assert hm.map_query((query * 100).round().astype(np.int64), None, ref).N == N_QUERY


# ========================================================== transfer_labels
TRANSFER_CASES = {
    "unknown label": (
        dict(label="celltype"),
        ValueError,
        [r"'celltype' is not a label column", r"\['cell_type'\]"],
    ),
    "a list of labels": (
        dict(label=["cell_type"]),
        TypeError,
        [r"label must be one label column's name \(a str\)", r"\['cell_type'\]"],
    ),
    "k of 0": (dict(k=0), ValueError, [r"k must be at least 1", r"got 0"]),
    "k above the labelled cells": (
        dict(k=5000),
        ValueError,
        [r"at most 200 \(the labelled reference cells\)", r"got 5000"],
    ),
    "k as a float": (dict(k=2.5), TypeError, [r"k must be an integer", r"2\.5"]),
    "k as a bool": (dict(k=True), TypeError, [r"k must be an integer", r"True"]),
    "min_probability above 1": (
        dict(min_probability=1.5),
        ValueError,
        [r"min_probability must be in \[0, 1\]", r"1\.5"],
    ),
    "min_probability NaN": (
        dict(min_probability=float("nan")),
        ValueError,
        [r"min_probability must be finite"],
    ),
    "min_probability as text": (
        dict(min_probability="half"),
        TypeError,
        [r"min_probability must be a real number", r"'half'"],
    ),
    "cells of another width": (
        dict(query=np.ones((5, 4))),
        ValueError,
        [r"4 dimensions per cell", r"built on 6"],
    ),
    "NaN cells": (
        dict(query=np.full((3, 6), np.nan)),
        ValueError,
        [r"18 non-finite", r"cell\(s\) 0, 1, 2"],
    ),
    "no cells": (dict(query=np.ones((0, 6))), ValueError, [r"empty", r"\(0, 6\)"]),
    "overwrite for an array": (
        dict(query=np.ones((3, 6)), overwrite=True),
        TypeError,
        [r"overwrite: only for an AnnData query"],
    ),
}


@pytest.mark.parametrize("case", sorted(TRANSFER_CASES))
def test_bad_transfer_labels_inputs(case, data):
    ref, query, meta = data
    q = hm.map_query(query, meta, ref, "sample")
    change, error, facts = TRANSFER_CASES[case]
    call = {"query": q, "ref": ref, "label": "cell_type", **change}
    with pytest.raises(error) as info:
        hm.transfer_labels(**call)
    _facts(str(info.value), facts)


def test_transfer_labels_refuses_other_references_and_cell_less_ones(data):
    ref, query, meta = data
    q = hm.map_query(query, meta, ref, "sample")
    other = hm.build_reference(query.to_numpy(), meta, labels="cell_type", nclust=3)
    narrow = hm.build_reference(query.to_numpy()[:, :3], meta, labels="cell_type", nclust=3)
    for wrong in (other, narrow):  # same PCs, other clusters; other PCs (was a torch error)
        with pytest.raises(ValueError) as info:
            hm.transfer_labels(q, wrong, "cell_type")
        _facts(str(info.value), [r"mapped onto another reference", r"reference_digest"])
    import dataclasses

    no_cells = dataclasses.replace(ref, cells=None)
    with pytest.raises(ValueError) as info:
        hm.transfer_labels(q, no_cells, "cell_type")
    _facts(str(info.value), [r"keeps no cells", r"keep_cells=True"])


# ================================================================== AnnData
@pytest.fixture
def adata(data):
    anndata = pytest.importorskip("anndata")
    _, query, meta = data
    return anndata.AnnData(obs=meta.copy(), obsm={"X_pca": query.to_numpy(np.float32)})


def _integrated(adata):
    hm.integrate(adata, "sample", max_iter_harmony=2, nclust=3, verbose=False)
    return adata


def _entry(adata, kind, key, value):
    getattr(adata, kind)[key] = value
    return adata


# name: (change to the AnnData, map_query keywords, error, facts). Every refusal
# leaves the AnnData as it was.
ANNDATA_CASES = {
    "its own Harmony correction under the default key": (
        _integrated,
        {},
        ValueError,
        [
            r"obsm\['X_pca_harmony'\]",
            r"no earlier mapping wrote",
            r"hm\.integrate",
            r"adjusted_basis=KEY",
            r"overwrite=True",
        ],
    ),
    "a mapping_score column of its own": (
        lambda a: _entry(a, "obs", "mapping_score", 1.0),
        {},
        ValueError,
        [r"obs\['mapping_score'\]", r"overwrite=True"],
    ),
    "a <label>_predicted column of its own": (
        lambda a: _entry(a, "obs", "cell_type_predicted", "x"),
        dict(labels="cell_type"),
        ValueError,
        [r"obs\['cell_type_predicted'\]", r"overwrite=True"],
    ),
    "NaN in obsm[basis]": (
        lambda a: _entry(a, "obsm", "X_pca", np.where(np.arange(6) == 1, np.nan, a.obsm["X_pca"])),
        {},
        ValueError,
        [r"adata_query\.obsm\['X_pca'\] has 80 non-finite", r"'q0'"],
    ),
    "obsm[basis] with fewer PCs": (
        lambda a: _entry(a, "obsm", "X_pca", a.obsm["X_pca"][:, :4]),
        {},
        ValueError,
        [r"adata_query\.obsm\['X_pca'\] has 4 dimensions per cell", r"built on 6"],
    ),
    "no cells": (lambda a: a[:0].copy(), {}, ValueError, [r"adata_query has no cells"]),
    "unknown basis": (
        lambda a: a,
        dict(basis="X_pcaa"),
        KeyError,
        [r"basis 'X_pcaa' not found in adata\.obsm", r"'X_pca'"],
    ),
    "unknown batch column": (
        lambda a: a,
        dict(key="smaple"),
        KeyError,
        [r"'smaple' not found in adata\.obs", r"'sample'"],
    ),
    "unknown label": (
        lambda a: a,
        dict(labels="celltype"),
        ValueError,
        [r"'celltype' is not a label column", r"cell_type"],
    ),
    "adjusted_basis equal to basis": (
        lambda a: a,
        dict(adjusted_basis="X_pca"),
        ValueError,
        [r"adjusted_basis must differ from basis"],
    ),
    "no basis and a reference without genes": (
        lambda a: a,
        dict(basis=None),
        ValueError,
        [r"keeps no gene projection", r"basis=KEY"],
    ),
    "k of 0": (lambda a: a, dict(labels="cell_type", k=0), ValueError, [r"k must be at least 1"]),
    "overwrite as text": (
        _integrated,
        dict(overwrite="yes"),
        TypeError,
        [r"overwrite must be True or False", r"'yes'"],
    ),
}


@pytest.mark.parametrize("case", sorted(ANNDATA_CASES))
def test_bad_anndata_queries(case, data, adata):
    ref = data[0]
    change, kwargs, error, facts = ANNDATA_CASES[case]
    adata = change(adata)
    before = (adata.obs.copy(), {k: np.array(v) for k, v in adata.obsm.items()}, set(adata.uns))
    call = {"key": "sample", "basis": "X_pca", **kwargs}
    with pytest.raises(error) as info:
        hm.map_query(adata, ref, **call)
    _facts(str(info.value.args[0]), facts)
    pd.testing.assert_frame_equal(adata.obs, before[0])
    assert set(adata.obsm) == set(before[1]) and set(adata.uns) == before[2]
    for key, value in before[1].items():
        np.testing.assert_array_equal(adata.obsm[key], value)


def test_anndata_refusals_come_before_the_mapping(data, adata, monkeypatch):
    """Label-transfer options, the layer and existing entries are checked before
    any cell is mapped (they used to fail only after the mapping)."""
    ref = data[0]

    def boom(*args, **kwargs):
        raise AssertionError("mapped although the call should have been refused")

    monkeypatch.setattr("harmonypy.mapping.query.map_query", boom)
    cases = [
        (
            dict(labels="cell_type", min_probability=2),
            ValueError,
            r"min_probability must be in \[0, 1\], got 2",
        ),
        (
            dict(labels="cell_type", k=500),
            ValueError,
            r"k must be .* at most 200 \(the reference cells labelled in 'cell_type'\)",
        ),
        (dict(layer="counts"), ValueError, r"layer='counts' is for a query projected"),
        (dict(adjusted_basis="X_pca_harmony"), ValueError, r"no earlier mapping wrote"),
    ]
    _integrated(adata)
    for kwargs, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            hm.map_query(adata, ref, "sample", basis="X_pca", **kwargs)


def test_anndata_outputs_replaced_only_when_asked_or_by_a_mapping(data, adata):
    ref = data[0]
    own = _integrated(adata).obsm["X_pca_harmony"].copy()
    q = hm.map_query(adata, ref, "sample", basis="X_pca", adjusted_basis="X_mapped")
    np.testing.assert_array_equal(adata.obsm["X_pca_harmony"], own)
    hm.map_query(
        adata, ref, "sample", basis="X_pca", adjusted_basis="X_mapped", labels="cell_type"
    )  # its own outputs: replaced without asking
    adata.obs["cell_type_probability"] = 0.5
    adata.uns["harmony_mapping"]["labels"] = []  # the columns are no longer the mapping's
    with pytest.raises(
        ValueError,
        match=r"obs\['cell_type_predicted'\], "
        r"obs\['cell_type_probability'\]",
    ):
        hm.transfer_labels(adata, ref, "cell_type")
    hm.transfer_labels(adata, ref, "cell_type", overwrite=True)
    assert adata.obs["cell_type_probability"].max() <= 1 and q.N == N_QUERY
    adata.obsm["X_mapped"][2, 0] = np.nan  # changed after mapping
    with pytest.raises(ValueError, match=r"adata_query\.obsm\['X_mapped'\] has 1 non-finite"):
        hm.transfer_labels(adata, ref, "cell_type")


# ============================================================= command line
@pytest.fixture(scope="module")
def files(data, tmp_path_factory):
    """The reference and query as the command line reads them."""
    ref, query, meta = data
    folder = tmp_path_factory.mktemp("cli")
    ref.save(folder / "ref.npz")
    query.to_csv(folder / "q.tsv", sep="\t")
    meta.to_csv(folder / "qmeta.tsv", sep="\t")
    np.save(folder / "q.npy", query.to_numpy())
    values = query.to_numpy().copy()
    values[4, 1] = np.nan
    np.save(folder / "qnan.npy", values)
    np.save(folder / "q4.npy", query.to_numpy()[:, :4])
    np.save(folder / "q0.npy", np.zeros((0, N_DIMS)))
    query.iloc[:0].to_csv(folder / "q0.tsv", sep="\t")
    meta.iloc[:-1].to_csv(folder / "qmeta_short.tsv", sep="\t")
    meta.set_axis([f"x{i}" for i in range(N_QUERY)]).to_csv(folder / "qmeta_other.tsv", sep="\t")
    return folder


def _main(argv, capsys):
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


# name: (arguments after 'harmonypy map QUERY' (files are in the fixture's
# folder), fragments of the one-line error). Exit status 2, nothing written.
MAP_CLI_CASES = {
    "--lamb 0": (
        ["q.npy", "--lamb", "0"],
        ["--lamb must be > 0", "without --vars the query is one batch", "--lamb=-1"],
    ),
    "--lamb 1,2 without --vars": (
        ["q.npy", "--lamb", "1,2"],
        ["--lamb has 2 values", "with --vars"],
    ),
    "--lamb 0 with --vars": (
        ["q.tsv", "qmeta.tsv", "--vars", "sample", "--lamb", "0"],
        ["--lamb must be > 0", "sample=s1"],
    ),
    "--iterations 0": (["q.npy", "--iterations", "0"], ["--iterations must be at least 1"]),
    "--neighbors above the labelled cells": (
        ["q.npy", "--labels", "cell_type", "--neighbors", "500"],
        ["--neighbors 500", "200 reference cells labelled", "'cell_type'"],
    ),
    "--neighbors 0": (["q.npy", "--neighbors", "0"], ["--neighbors must be >= 1"]),
    "--labels unknown": (
        ["q.npy", "--labels", "celltype"],
        ["--labels", "did you mean 'cell_type'?"],
    ),
    "--min-probability 2": (
        ["q.npy", "--min-probability", "2"],
        ["--min-probability must be in [0, 1]"],
    ),
    "fewer PCs": (["q4.npy"], ["q4.npy has 4 PC columns", "built on 6"]),
    "NaN in the query": (["qnan.npy"], ["the query has 1 non-finite value(s)", "cell(s) 4"]),
    "an empty .npy": (["q0.npy"], ["the query is empty"]),
    "a header-only table": (["q0.tsv"], ["q0.tsv has no cells (only a header)"]),
    "metadata one row short": (
        ["q.npy", "qmeta_short.tsv"],
        ["has 79 rows", "80 cells", "paired by row order"],
    ),
    "metadata of other cells": (
        ["q.tsv", "qmeta_other.tsv"],
        ["name different cells", "0 of the embedding's 80 cells", "--no-names"],
    ),
    "--vars unknown": (
        ["q.tsv", "qmeta.tsv", "--vars", "smaple"],
        ["--vars", "did you mean 'sample'?"],
    ),
    "--vars without META": (
        ["q.npy", "--vars", "sample"],
        ["--vars names columns of META", "which was not given"],
    ),
    "--subset of a value no cell has": (
        ["q.tsv", "qmeta.tsv", "--subset", "sample=s3"],
        ["--subset sample=s3", "no cell has sample 's3'"],
    ),
    "an .h5ad-only option for a table": (
        ["q.tsv", "--layer", "counts"],
        ["--layer", "only for .h5ad input"],
    ),
}


@pytest.mark.parametrize("case", sorted(MAP_CLI_CASES))
def test_bad_map_command_lines(case, files, capsys):
    argv, fragments = MAP_CLI_CASES[case]
    out = files / "out.tsv"
    status, err = _main(
        [
            "map",
            *[files / a if a.endswith((".npy", ".tsv")) else a for a in argv],
            "--reference",
            files / "ref.npz",
            "-o",
            out,
        ],
        capsys,
    )
    assert status == 2, err
    assert err.startswith("harmonypy: error: ") and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists()


def test_npy_query_with_named_metadata_keeps_the_names(files, capsys):
    """Paired by position (documented), said so after the output, and the
    output named by META's cell names rather than by row numbers."""
    shuffled = pd.read_csv(files / "qmeta.tsv", sep="\t", index_col=0).iloc[::-1]
    shuffled.to_csv(files / "qmeta_rev.tsv", sep="\t")
    status, err = _main(
        [
            "map",
            files / "q.npy",
            files / "qmeta_rev.tsv",
            "--vars",
            "sample",
            "--reference",
            files / "ref.npz",
            "-o",
            files / "named.tsv",
        ],
        capsys,
    )
    assert status == 0, err
    assert "paired with the embedding's cells by position" in err
    assert "q.npy has no cell names, so its cells are named by the metadata's row names" in err
    out = pd.read_csv(files / "named.tsv", sep="\t", index_col=0)
    assert list(out.index) == QUERY_NAMES[::-1]


def test_map_labels_of_a_reference_without_any_label(data, files, capsys):
    ref, query, meta = data
    unlabelled = hm.build_reference(
        query.to_numpy(), meta.assign(cell_type=None), labels="cell_type", nclust=3
    )
    unlabelled.save(files / "unlabelled.npz")
    status, err = _main(
        [
            "map",
            files / "q.npy",
            "--reference",
            files / "unlabelled.npz",
            "--labels",
            "cell_type",
            "-o",
            files / "none.tsv",
        ],
        capsys,
    )
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "--labels: no cell of the reference" in err and "'cell_type' label" in err, err


def test_bad_h5ad_map_command_lines(data, files, capsys):
    """An .h5ad query: the library's keyword names become the options."""
    anndata = pytest.importorskip("anndata")
    _, query, meta = data
    adata = anndata.AnnData(obs=meta.copy(), obsm={"X_pca": query.to_numpy(np.float32)})
    adata.obs["mapping_score"] = 0.0
    adata.write_h5ad(files / "q.h5ad")
    cases = [
        (
            ["--basis", "X_pca", "--layer", "x"],
            ["--layer='x' is for a query projected", "with --basis='X_pca'"],
        ),
        (["--basis", "X_pcaa"], ["--basis 'X_pcaa' not found", "'X_pca'"]),
        ([], ["keeps no gene projection", "--basis KEY"]),
        (["--basis", "X_pca"], ["obs['mapping_score']", "no earlier mapping", "--force"]),
        (["--basis", "X_pca", "--vars", "smaple"], ["--vars", "did you mean 'sample'?"]),
        (["--basis", "X_pca", "--names", "x"], ["--names", "not used with .h5ad input"]),
    ]
    for argv, fragments in cases:
        out = files / "m.h5ad"
        status, err = _main(
            ["map", files / "q.h5ad", "--reference", files / "ref.npz", *argv, "-o", out], capsys
        )
        assert status == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        for fragment in fragments:
            assert fragment in err, (argv, fragment, err)
        assert not out.exists()


def test_bad_reference_build_command_lines(files, capsys):
    meta = pd.DataFrame({"batch": np.repeat(["a", "b"], N_QUERY // 2)}, index=QUERY_NAMES)
    meta.to_csv(files / "bmeta.tsv", sep="\t")
    cases = [
        (["q.npy", "bmeta.tsv", "--vars", "btach"], ["--vars", "did you mean 'batch'?"]),
        (["q.npy", "qmeta_short.tsv", "--vars", "sample"], ["has 79 rows", "80 cells"]),
        (["q.tsv", "qmeta_other.tsv", "--vars", "sample"], ["name different cells"]),
        (
            ["q.npy", "bmeta.tsv", "--vars", "batch", "--labels", "batch", "--no-cells"],
            ["--labels", "drop --no-cells"],
        ),
        (["q0.tsv", "--nclust", "3"], ["q0.tsv has no cells (only a header)"]),
        (["qnan.npy", "bmeta.tsv", "--vars", "batch"], ["non-finite", "cell(s) 4"]),
    ]
    for argv, fragments in cases:
        out = files / "r.npz"
        status, err = _main(
            [
                "reference",
                "build",
                *[files / a if a.endswith((".npy", ".tsv")) else a for a in argv],
                "-o",
                out,
            ],
            capsys,
        )
        assert status == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        for fragment in fragments:
            assert fragment in err, (argv, fragment, err)
        assert not out.exists()
