"""``harmonypy reference build`` and ``harmonypy map``
(:mod:`harmonypy.cli.reference`, :mod:`harmonypy.cli.mapping`), end to end.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_support import (
    CLOSE,
    FAST,
    FAST_KW,
    HAS_ANNDATA,
    no_harmony,
    run_main,
    snapshot,
)

import harmonypy as hm


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """``harmonypy example-data``'s files (the bundled 1,200 PBMCs, cell_id first)."""
    folder = tmp_path_factory.mktemp("example")
    hm.datasets.save_example(folder)
    return folder / "pcs.tsv.gz", folder / "meta.tsv.gz"


def test_reference_build_and_map_equal_the_library(example, tmp_path, capsys):
    pcs_path, meta_path = example
    ref_path, out = tmp_path / "ref.npz", tmp_path / "mapped.tsv"
    status, _, err = run_main(
        [
            "reference",
            "build",
            pcs_path,
            meta_path,
            "--vars",
            "donor",
            "--subset",
            "donor=3pv1,3pv2",
            "--labels",
            "cell_type",
            "-o",
            ref_path,
            *FAST,
        ],
        capsys,
    )
    assert status == 0, err
    status, _, err = run_main(
        [
            "map",
            pcs_path,
            meta_path,
            "--subset",
            "donor=5p",
            "--reference",
            ref_path,
            "--labels",
            "cell_type",
            "--neighbors",
            "10",
            "--min-probability",
            "0.6",
            "-o",
            out,
        ],
        capsys,
    )
    assert status == 0, err
    assert "harmonypy: wrote" in err and "430 cells x 20 PCs mapped onto reference of 770" in err

    pcs, meta = hm.datasets.load_pbmcs_small()
    in_query = (meta["donor"] == "5p").to_numpy()
    named = meta[~in_query].set_index("cell_id")  # the CLI pairs and names cells by cell_id
    ho = hm.run_harmony(pcs[~in_query].set_axis(named.index), named, "donor", **FAST_KW)
    expected = hm.build_reference(ho, named, labels="cell_type")
    saved = hm.load_reference(ref_path)
    np.testing.assert_allclose(saved.C, expected.C, **CLOSE)
    np.testing.assert_allclose(saved.cells, expected.cells, **CLOSE)
    np.testing.assert_array_equal(saved.cell_names, expected.cell_names)
    pd.testing.assert_frame_equal(saved.labels, expected.labels)

    q = hm.map_query(pcs[in_query], meta[in_query], saved)
    labels = hm.transfer_labels(q, saved, "cell_type", k=10, min_probability=0.6)
    result = pd.read_csv(out, sep="\t", index_col=0)
    assert list(result.columns) == (
        [f"PC{i}_harmony" for i in range(1, 21)]
        + ["cell_type_predicted", "cell_type_probability", "mapping_score"]
    )
    assert list(result.index) == list(meta.loc[in_query, "cell_id"])
    np.testing.assert_allclose(result.iloc[:, :20].to_numpy(), q.result(), **CLOSE)
    assert list(result["cell_type_predicted"]) == list(labels["label"].astype(str))
    np.testing.assert_allclose(result["cell_type_probability"], labels["probability"])
    np.testing.assert_allclose(result["mapping_score"], q.confidence, rtol=1e-4)
    assert (
        result["cell_type_predicted"] == meta.loc[in_query, "cell_type"].to_numpy()
    ).mean() > 0.9
    # .npy: the corrected PCs only; the query as one batch by its own column works too.
    status, _, err = run_main(
        [
            "map",
            pcs_path,
            meta_path,
            "--subset",
            "donor=5p",
            "--vars",
            "donor",
            "--reference",
            ref_path,
            "-o",
            tmp_path / "m.npy",
            "-q",
        ],
        capsys,
    )
    assert status == 0 and err == ""
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), q.result(), **CLOSE)


def test_one_batch_reference_build_equals_the_library(example, tmp_path, capsys):
    """Without --vars, 'reference build' builds a one-batch reference (clustered,
    no Harmony run), as build_reference(pcs, meta_data=..., labels=...) does."""
    pcs_path, meta_path = example
    ref_path = tmp_path / "ref.npz"
    status, _, err = run_main(
        [
            "reference",
            "build",
            pcs_path,
            meta_path,
            "--subset",
            "donor=3pv2",
            "--labels",
            "cell_type",
            "--nclust",
            "16",
            "--seed",
            "3",
            "-o",
            ref_path,
        ],
        capsys,
    )
    assert status == 0, err
    assert "reference of 480 cells x 20 PCs, 16 clusters (none), labels cell_type" in err
    assert "one batch" in err
    pcs, meta = hm.datasets.load_pbmcs_small()
    in_ref = (meta["donor"] == "3pv2").to_numpy()
    names = meta.loc[in_ref, "cell_id"].to_numpy()
    expected = hm.build_reference(
        pcs[in_ref].set_axis(names),
        meta[in_ref].set_index("cell_id"),
        labels="cell_type",
        nclust=16,
        random_state=3,
    )
    saved = hm.load_reference(ref_path)
    assert (saved.algorithm, saved.variables, saved.K) == ("none", [], 16)
    np.testing.assert_allclose(saved.Nr, expected.Nr, **CLOSE)
    np.testing.assert_allclose(saved.C, expected.C, **CLOSE)
    np.testing.assert_array_equal(saved.cells, expected.cells)
    np.testing.assert_array_equal(saved.cell_names, names)
    pd.testing.assert_frame_equal(saved.labels, expected.labels)
    # The 5' cells mapped onto it get their types.
    out = tmp_path / "mapped.tsv"
    status, _, err = run_main(
        [
            "map",
            pcs_path,
            meta_path,
            "--subset",
            "donor=5p",
            "--reference",
            ref_path,
            "--labels",
            "cell_type",
            "-o",
            out,
        ],
        capsys,
    )
    assert status == 0, err
    mapped = pd.read_csv(out, sep="\t", index_col=0)
    truth = meta.set_index("cell_id").loc[mapped.index, "cell_type"]
    assert (mapped["cell_type_predicted"] == truth).mean() > 0.8
    # No META at all: the embedding alone, its cell names kept.
    status, _, err = run_main(
        ["reference", "build", pcs_path, "--nclust", "20", "-q", "-o", tmp_path / "bare.npz"],
        capsys,
    )
    assert status == 0 and err == ""
    bare = hm.load_reference(tmp_path / "bare.npz")
    assert (bare.algorithm, bare.n_cells, bare.label_columns) == ("none", 1200, [])
    np.testing.assert_array_equal(bare.cell_names, meta["cell_id"].to_numpy())


def test_reference_and_map_refuse_before_any_work(example, tmp_path, capsys, monkeypatch):
    pcs_path, meta_path = example
    pcs, meta = tmp_path / "pcs.tsv.gz", tmp_path / "meta.tsv.gz"
    pcs.write_bytes(pcs_path.read_bytes())
    meta.write_bytes(meta_path.read_bytes())
    ref = tmp_path / "ref.npz"
    status, _, err = run_main(
        [
            "reference",
            "build",
            pcs,
            meta,
            "--vars",
            "donor",
            "--labels",
            "cell_type",
            "-o",
            ref,
            *FAST,
        ],
        capsys,
    )
    assert status == 0, err
    (tmp_path / "exists.npz").write_text("previous\n")
    (tmp_path / "exists.tsv").write_text("previous\n")
    no_harmony(monkeypatch)

    def boom(*args, **kwargs):
        raise RuntimeError("mapping ran although the command should have been refused")

    monkeypatch.setattr("harmonypy.mapping.query.map_query", boom)
    before = snapshot(tmp_path)
    build = ["reference", "build", pcs, meta, "--vars", "donor"]
    query = ["map", pcs, meta, "--reference", ref]
    cases = [
        (build + ["-o", meta], "-o/--output", "is the input META"),
        (build + ["-o", pcs, "--force"], "-o/--output", "is the input EMBEDDING"),
        (build + ["-o", tmp_path / "exists.npz"], "exists.npz", "already exists; pass --force"),
        (build + ["-o", tmp_path / "ref.tsv"], "-o/--output", "format 'tsv' not possible here"),
        (
            build + ["--labels", "cell_type", "--no-cells", "-o", tmp_path / "r.npz"],
            "--labels",
            "drop --no-cells",
        ),
        (
            build + ["--labels", "celltype", "-o", tmp_path / "r.npz"],
            "--labels",
            "(did you mean 'cell_type'?)",
        ),
        (
            build + ["--subset", "donor=5P", "-o", tmp_path / "r.npz"],
            "--subset",
            "no cell has donor '5P'",
        ),
        (
            build + ["--layer", "counts", "-o", tmp_path / "r.npz"],
            "--layer",
            "only for .h5ad input",
        ),
        (
            [
                "reference",
                "build",
                pcs,
                meta,
                "--theta",
                "1",
                "--algorithm",
                "harmony2",
                "-o",
                tmp_path / "r.npz",
            ],
            "--theta, --algorithm",
            "Harmony parameters, but no --vars",
        ),
        (
            ["reference", "build", pcs, "--labels", "cell_type", "-o", tmp_path / "r.npz"],
            "--labels",
            "names columns of META, the metadata table, which was not given",
        ),
        (
            ["reference", "build", pcs, "--vars", "donor", "-o", tmp_path / "r.npz"],
            "--vars",
            "names columns of META, the metadata table, which was not given",
        ),
        (query + ["-o", ref], "-o/--output", "is the input --reference"),
        (query + ["-o", ref, "--force"], "-o/--output", "is the input --reference"),
        (query + ["-o", pcs, "--force"], "-o/--output", "is the input QUERY"),
        (query + ["-o", tmp_path / "exists.tsv"], "exists.tsv", "already exists; pass --force"),
        (query + ["-o", tmp_path / "m.h5ad"], "-o/--output", "format 'h5ad' not possible"),
        (
            query + ["--labels", "celltype", "-o", tmp_path / "m.tsv"],
            "--labels",
            "(did you mean 'cell_type'?)",
        ),
        (
            query + ["--labels", "cell_type", "-o", tmp_path / "m.npy"],
            "--labels",
            "a .npy output holds the corrected PCs only",
        ),
        (
            query + ["--min-probability", "2", "-o", tmp_path / "m.tsv"],
            "--min-probability",
            "must be in [0, 1]",
        ),
        (query + ["--vars", "dnor", "-o", tmp_path / "m.tsv"], "--vars", "(did you mean 'donor'?)"),
        (
            ["map", pcs, "--vars", "donor", "--reference", ref, "-o", tmp_path / "m.tsv"],
            "--vars",
            "META, the query's metadata table, which was not given",
        ),
        (
            ["map", pcs, "--reference", meta, "-o", tmp_path / "m.tsv"],
            "meta.tsv.gz",
            "cannot be read as a .npz",
        ),
        (
            ["map", pcs, "--reference", tmp_path / "none.npz", "-o", tmp_path / "m.tsv"],
            "none.npz",
            "does not exist",
        ),
    ]
    for argv, option, fragment in cases:
        status, _, err = run_main(argv, capsys)
        assert status == 2, (argv, err)
        assert err.startswith("harmonypy: error: ") and len(err.strip().splitlines()) == 1, err
        assert option in err and fragment in err, (argv, err)
    assert snapshot(tmp_path) == before  # nothing written, nothing replaced
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_map_lamb_is_checked_and_named_as_the_option(example, tmp_path, capsys):
    """--lamb 0 (with or without --vars) is bad input: exit 2, one line naming
    --lamb and, for a one-batch query, --vars; no output written."""
    pcs_path, meta_path = example
    ref = tmp_path / "ref.npz"
    status, _, err = run_main(
        [
            "reference",
            "build",
            pcs_path,
            meta_path,
            "--vars",
            "donor",
            "--subset",
            "donor=3pv1,3pv2",
            "--labels",
            "cell_type",
            "-o",
            ref,
            *FAST,
        ],
        capsys,
    )
    assert status == 0, err
    query = [
        "map",
        pcs_path,
        meta_path,
        "--subset",
        "donor=5p",
        "--reference",
        ref,
        "-o",
        tmp_path / "m.tsv",
    ]
    for extra, fragments in [
        (
            ["--lamb", "0"],
            ["--lamb must be > 0", "without --vars the query is one batch", "--lamb=-1"],
        ),
        (["--lamb", "1,2"], ["--lamb has 2 values", "without --vars", "with --vars"]),
        (["--lamb", "0", "--vars", "donor"], ["--lamb must be > 0", "donor=5p"]),
        (["--iterations", "0"], ["--iterations must be at least 1, got 0"]),
        (
            ["--neighbors", "5000", "--labels", "cell_type"],
            ["--neighbors 5000", "770 reference cells", "cell_type"],
        ),
    ]:
        status, _, err = run_main(query + extra, capsys)
        assert status == 2 and len(err.strip().splitlines()) == 1, (extra, err)
        for fragment in fragments:
            assert fragment in err, (extra, fragment, err)
    assert not (tmp_path / "m.tsv").exists()


def test_npy_with_named_metadata_is_paired_by_position_and_keeps_its_names(
    example, tmp_path, capsys
):
    """An .npy embedding names no cells: its rows are paired with META's by
    position (the rule --help states), the note says so, and the outputs are
    named by META's cell names instead of dropping them."""
    pcs_path, meta_path = example
    pcs, meta = hm.datasets.load_pbmcs_small()
    shuffled = meta.sample(frac=1, random_state=0)  # a cell_id column, in another order
    np.save(tmp_path / "pcs.npy", pcs.to_numpy(np.float32))
    shuffled.to_csv(tmp_path / "meta.tsv", sep="\t", index=False)
    status, _, err = run_main(
        [
            "run",
            tmp_path / "pcs.npy",
            tmp_path / "meta.tsv",
            "--vars",
            "donor",
            "-o",
            tmp_path / "out.tsv",
            *FAST[:-1],
        ],
        capsys,
    )
    assert status == 0, err
    note = [line for line in err.splitlines() if "by position" in line]
    assert len(note) == 1 and "pcs.npy has no cell names" in note[0], err
    assert "named by the metadata's column 'cell_id'" in note[0]
    out = pd.read_csv(tmp_path / "out.tsv", sep="\t", index_col=0)
    assert list(out.index) == list(shuffled["cell_id"])
    # map: the same rule for a query, and its output keeps the names.
    ref = tmp_path / "ref.npz"
    status, _, err = run_main(
        [
            "reference",
            "build",
            pcs_path,
            meta_path,
            "--subset",
            "donor=3pv2",
            "--nclust",
            "10",
            "-o",
            ref,
            "-q",
        ],
        capsys,
    )
    assert status == 0, err
    in_query = (shuffled["donor"] != "3pv2").to_numpy()
    np.save(tmp_path / "q.npy", pcs.to_numpy(np.float32)[in_query])
    shuffled[in_query].to_csv(tmp_path / "qmeta.tsv", sep="\t", index=False)
    status, _, err = run_main(
        [
            "map",
            tmp_path / "q.npy",
            tmp_path / "qmeta.tsv",
            "--vars",
            "donor",
            "--reference",
            ref,
            "-o",
            tmp_path / "m.tsv",
        ],
        capsys,
    )
    assert status == 0 and "by position" in err and "q.npy has no cell names" in err, err
    mapped = pd.read_csv(tmp_path / "m.tsv", sep="\t", index_col=0)
    assert list(mapped.index) == list(shuffled.loc[in_query, "cell_id"])
    # The rule is in --help of every command that pairs an embedding with META.
    for command in (["run"], ["map"], ["evaluate"], ["reference", "build"]):
        status, out, _ = run_main(command + ["--help"], capsys)
        text = " ".join(out.split())
        assert status == 0 and "else by position (row order)" in text, command
        assert "names no cells, so its rows are paired by position" in text, command


@pytest.mark.skipif(not HAS_ANNDATA, reason="anndata not installed")
def test_map_h5ad_keeps_the_querys_own_correction(example, tmp_path, capsys):
    """An .h5ad query integrated on its own (obsm['X_pca_harmony']): map refuses
    to replace that entry in the output (exit 2, naming --adjusted-basis and
    --force); --adjusted-basis KEY keeps both, --force replaces it."""
    import anndata

    pcs_path, meta_path = example
    ref = tmp_path / "ref.npz"
    status, _, err = run_main(
        [
            "reference",
            "build",
            pcs_path,
            meta_path,
            "--subset",
            "donor=3pv2",
            "--nclust",
            "10",
            "-o",
            ref,
            "-q",
        ],
        capsys,
    )
    assert status == 0, err
    pcs, meta = hm.datasets.load_pbmcs_small()
    in_query = (meta["donor"] != "3pv2").to_numpy()
    query = anndata.AnnData(
        obs=meta[in_query].set_index("cell_id"), obsm={"X_pca": pcs[in_query].to_numpy(np.float32)}
    )
    hm.integrate(query, "donor", **FAST_KW)
    query.write_h5ad(tmp_path / "query.h5ad")
    argv = [
        "map",
        tmp_path / "query.h5ad",
        "--reference",
        ref,
        "--vars",
        "donor",
        "--basis",
        "X_pca",
        "-q",
    ]
    status, _, err = run_main(argv + ["-o", tmp_path / "m.h5ad"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    for fragment in ["obsm['X_pca_harmony']", "no earlier mapping", "--adjusted-basis", "--force"]:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "m.h5ad").exists()
    status, _, err = run_main(
        argv + ["--adjusted-basis", "X_mapped", "-o", tmp_path / "m.h5ad"], capsys
    )
    assert status == 0, err
    mapped = anndata.read_h5ad(tmp_path / "m.h5ad")
    np.testing.assert_array_equal(mapped.obsm["X_pca_harmony"], query.obsm["X_pca_harmony"])
    assert mapped.obsm["X_mapped"].shape == (720, 20)
    status, _, err = run_main(argv + ["--force", "-o", tmp_path / "m2.h5ad"], capsys)
    assert status == 0, err
    replaced = anndata.read_h5ad(tmp_path / "m2.h5ad")
    np.testing.assert_allclose(replaced.obsm["X_pca_harmony"], mapped.obsm["X_mapped"], **CLOSE)


@pytest.mark.skipif(not HAS_ANNDATA, reason="anndata not installed")
def test_h5ad_reference_maps_a_query_from_its_genes(tmp_path, capsys):
    from test_mapping import _expression, _query_adata, _scanpy_like

    log_ref, obs_ref = _expression(31, 300, [0, 1])
    log_query, obs_query = _expression(32, 120, [2, 3])
    _scanpy_like(log_ref, obs_ref, max_value=2.0).write_h5ad(tmp_path / "ref.h5ad")
    genes = [f"g{i}" for i in range(60)]
    _query_adata(log_query[:, 4:], obs_query, genes[4:], sparse=True).write_h5ad(
        tmp_path / "query.h5ad"
    )
    status, _, err = run_main(
        [
            "reference",
            "build",
            tmp_path / "ref.h5ad",
            "--vars",
            "batch",
            "--labels",
            "cell_type",
            "-o",
            tmp_path / "ref.npz",
            *FAST[:4],
            "--nclust",
            "6",
        ],
        capsys,
    )
    assert status == 0, err
    assert "projection from 60 genes" in err
    saved = hm.load_reference(tmp_path / "ref.npz")
    library = hm.build_reference(
        _scanpy_like(log_ref, obs_ref, max_value=2.0),
        "batch",
        labels="cell_type",
        max_iter_harmony=3,
        nclust=6,
        random_state=0,
        verbose=False,
    )
    for name in ("genes", "loadings", "mean", "std", "scaled_mean", "pc_mean"):
        np.testing.assert_array_equal(
            getattr(saved.projection, name), getattr(library.projection, name)
        )
    np.testing.assert_allclose(saved.C, library.C, **CLOSE)

    argv = [
        "map",
        tmp_path / "query.h5ad",
        "--reference",
        tmp_path / "ref.npz",
        "--vars",
        "batch",
        "--labels",
        "cell_type",
        "--neighbors",
        "10",
    ]
    status, _, err = run_main(argv + ["-o", tmp_path / "mapped.h5ad"], capsys)
    assert status == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert warning == [
        "harmonypy: warning: 4 of the reference's 60 genes are missing from "
        "adata_query (e.g. 'g0', 'g1', 'g2', 'g3'); they are set to the "
        "reference's mean and add nothing to the projection (Symphony fills "
        "them with 0 after scaling)"
    ]
    status, _, err = run_main(argv + ["-o", tmp_path / "mapped.csv", "-q"], capsys)
    assert status == 0, err

    import anndata

    query = anndata.read_h5ad(tmp_path / "query.h5ad")
    with pytest.warns(UserWarning, match="4 of the reference's 60 genes"):
        q = hm.map_query(query, saved, "batch", labels="cell_type", k=10)
    mapped = anndata.read_h5ad(tmp_path / "mapped.h5ad")
    for key in ("X_pca_reference", "X_pca_harmony"):
        np.testing.assert_allclose(mapped.obsm[key], query.obsm[key], **CLOSE)
    assert list(mapped.obs["cell_type_predicted"]) == list(query.obs["cell_type_predicted"])
    table = pd.read_csv(tmp_path / "mapped.csv", index_col=0)
    assert list(table.index) == list(query.obs_names)
    assert list(table.columns[:2]) == ["PC1_harmony", "PC2_harmony"]
    np.testing.assert_allclose(table.iloc[:, :8].to_numpy(), q.result(), **CLOSE)
    np.testing.assert_allclose(table["mapping_score"], q.confidence, rtol=1e-4)
    assert list(table["cell_type_predicted"]) == list(query.obs["cell_type_predicted"])

    # A reference .h5ad without loadings: refused before Harmony, naming the option.
    bare = anndata.read_h5ad(tmp_path / "ref.h5ad")
    del bare.varm["PCs"]
    bare.write_h5ad(tmp_path / "bare.h5ad")
    status, _, err = run_main(
        [
            "reference",
            "build",
            tmp_path / "bare.h5ad",
            "--vars",
            "batch",
            "-o",
            tmp_path / "bare.npz",
        ],
        capsys,
    )
    assert status == 2 and "adata.varm has no 'PCs'" in err and "--no-loadings" in err, err
    assert not (tmp_path / "bare.npz").exists()
    status, _, err = run_main(
        [
            "reference",
            "build",
            tmp_path / "ref.h5ad",
            "--vars",
            "batch",
            "-o",
            tmp_path / "ref.h5ad",
            "--force",
        ],
        capsys,
    )
    assert status == 2 and "is the input EMBEDDING" in err
    # Without --vars: one batch, the gene projection kept all the same.
    status, _, err = run_main(
        [
            "reference",
            "build",
            tmp_path / "ref.h5ad",
            "--labels",
            "cell_type",
            "--nclust",
            "6",
            "-o",
            tmp_path / "one.npz",
        ],
        capsys,
    )
    assert status == 0, err
    one = hm.load_reference(tmp_path / "one.npz")
    library = hm.build_reference(
        _scanpy_like(log_ref, obs_ref, max_value=2.0), None, labels="cell_type", nclust=6
    )
    assert (one.algorithm, one.K, one.projection.n_genes) == ("none", 6, 60)
    np.testing.assert_allclose(one.C, library.C, **CLOSE)


def test_mapping_tutorial_commands_run(tmp_path, capsys, monkeypatch):
    """The bash block of docs/mapping-tutorial.md (also proposed for the README)
    runs as written from an empty folder."""
    import shlex

    page = Path(__file__).resolve().parents[2] / "docs" / "mapping-tutorial.md"
    block = re.search(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S).group(1)
    commands = [
        shlex.split(line)
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith("harmonypy ")
    ]
    assert [c[1] for c in commands] == ["example-data", "reference", "map"]
    monkeypatch.chdir(tmp_path)
    for words in commands:
        status, _, err = run_main(words[1:], capsys)
        assert status == 0, (words, err)
    mapped = pd.read_csv(tmp_path / "mapped.tsv.gz", sep="\t", index_col=0)
    meta = pd.read_csv(tmp_path / "meta.tsv.gz", sep="\t", index_col=0)
    assert mapped.shape == (430, 23)
    accuracy = (mapped["cell_type_predicted"] == meta.loc[mapped.index, "cell_type"]).mean()
    assert accuracy == pytest.approx(0.951, abs=0.005)


def test_reference_and_map_help(capsys):
    status, out, _ = run_main(["reference", "build", "--help"], capsys)
    text = " ".join(out.split())
    assert status == 0
    for option in [
        "--vars",
        "--labels",
        "--no-cells",
        "--subset",
        "--output",
        "--basis",
        "--adjusted-basis",
        "--loadings",
        "--no-loadings",
        "--layer",
        "--force",
        "--theta",
        "--algorithm",
        "--names",
    ]:
        assert option in text, option
    status, out, _ = run_main(["map", "--help"], capsys)
    text = " ".join(out.split())
    assert status == 0
    for option in [
        "--reference",
        "--vars",
        "--labels",
        "--min-probability",
        "--neighbors",
        "--subset",
        "--basis",
        "--layer",
        "--lamb",
        "--iterations",
        "--device",
        "--dtype",
        "--force",
        "(default: 0.5)",
        "(default: 5)",
    ]:
        assert option in text, option
    status, out, _ = run_main(["--help"], capsys)
    assert "reference" in out and "map" in out
