"""``harmonypy run`` (:mod:`harmonypy.cli.run`), end to end: formats, cell names,
.h5ad, the Harmony options.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from cli_support import (
    CLOSE,
    FAST,
    FAST_KW,
    HAS_ANNDATA,
    assert_one_line_error,
    harmonypy,
    no_harmony,
    run_main,
    small,  # noqa: F401 - fixtures
)

import harmonypy as hm
from harmonypy import cli
from harmonypy.cli.options import harmony_kwargs


def test_run_tsv_matches_library_and_plots(small, tmp_path):
    pcs_path, meta_path, pcs, meta = small
    out, png = tmp_path / "out.tsv.gz", tmp_path / "before_after.png"
    proc = harmonypy(
        "run",
        pcs_path,
        meta_path,
        "--vars",
        "donor",
        "-o",
        out,
        "--theta",
        "1.5",
        "--plot",
        png,
        "--color",
        "donor,cell_type",
        "--plot-pcs",
        "1,4",
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet

    # The embedding names no cells: paired by position, named by META's cell_id.
    result = pd.read_csv(out, sep="\t", index_col=0)
    assert list(result.columns) == [f"PC{i}_harmony" for i in range(1, 21)]
    assert result.index.name == "cell_id" and list(result.index) == list(meta["cell_id"])
    expected = hm.run_harmony(pcs, meta, "donor", theta=1.5, **FAST_KW).Z_corr.T
    np.testing.assert_allclose(result.to_numpy(), expected, **CLOSE)

    image = pytest.importorskip("matplotlib.image").imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # not blank


def test_run_npy(small, tmp_path, capsys):
    # In-process: the subprocess path is covered above; this checks the format.
    pcs_path, meta_path, pcs, meta = small
    np.save(tmp_path / "pcs.npy", pcs.to_numpy(np.float32))
    status, _, err = run_main(
        [
            "run",
            tmp_path / "pcs.npy",
            meta_path,
            "--vars",
            "donor",
            "-o",
            tmp_path / "out.npy",
            *FAST,
        ],
        capsys,
    )
    assert status == 0, err
    result = np.load(tmp_path / "out.npy")
    assert result.shape == (1200, 20) and result.dtype == np.float32
    expected = hm.run_harmony(pcs.to_numpy(np.float32), meta, "donor", **FAST_KW).Z_corr.T
    np.testing.assert_allclose(result, expected, **CLOSE)
    # float64 in, float64 out (written chunk by chunk into the memory-mapped file)
    np.save(tmp_path / "pcs64.npy", pcs.to_numpy(np.float64))
    status, _, err = run_main(
        [
            "run",
            tmp_path / "pcs64.npy",
            meta_path,
            "--vars",
            "donor",
            "--dtype",
            "float64",
            "-o",
            tmp_path / "out64.npy",
            *FAST,
        ],
        capsys,
    )
    assert status == 0, err
    result64 = np.load(tmp_path / "out64.npy")
    assert result64.dtype == np.float64
    expected64 = hm.run_harmony(
        pcs.to_numpy(np.float64), meta, "donor", dtype="float64", **FAST_KW
    ).Z_corr.T
    np.testing.assert_array_equal(result64, expected64)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp.npy")]


def test_npy_embedding_is_memory_mapped(tmp_path):
    # Read without a copy: the frame's values are the file's pages (read-only),
    # so a 10M-cell embedding is not held twice before the engine copies it.
    from harmonypy.io.readers import read_embedding

    values = np.arange(60, dtype=np.float32).reshape(12, 5)
    np.save(tmp_path / "pcs.npy", values)
    table = read_embedding(tmp_path / "pcs.npy")
    array = table.frame.to_numpy()
    assert not array.flags.writeable
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    np.testing.assert_array_equal(array, values)


def test_run_csv_cell_names_align_metadata(small, tmp_path, capsys):
    # Cell names in the embedding's first column; metadata in another order is matched
    # by its cell_id column, and the names are written back.
    _, _, pcs, meta = small
    table = pcs.copy()
    table.insert(0, "cell", meta["cell_id"])
    table.to_csv(tmp_path / "pcs.csv", index=False)
    meta.iloc[::-1].to_csv(tmp_path / "meta.csv", index=False)
    status, _, err = run_main(
        [
            "run",
            tmp_path / "pcs.csv",
            tmp_path / "meta.csv",
            "--vars",
            "donor",
            "-o",
            tmp_path / "out.csv",
            *FAST,
        ],
        capsys,
    )
    assert status == 0, err
    result = pd.read_csv(tmp_path / "out.csv", index_col=0)
    assert result.index.name == "cell"
    assert list(result.index) == list(meta["cell_id"])
    expected = hm.run_harmony(pcs, meta, "donor", **FAST_KW).Z_corr.T
    np.testing.assert_allclose(result.to_numpy(), expected, **CLOSE)


def test_run_csv_cell_names_mismatch(small, tmp_path, capsys):
    _, _, pcs, meta = small
    table = pcs.copy()
    table.insert(0, "cell", meta["cell_id"])
    table.to_csv(tmp_path / "pcs.csv", index=False)
    meta.iloc[1:].to_csv(tmp_path / "meta.csv", index=False)  # one cell short
    status, _, err = run_main(
        [
            "run",
            tmp_path / "pcs.csv",
            tmp_path / "meta.csv",
            "--vars",
            "donor",
            "-o",
            tmp_path / "out.csv",
        ],
        capsys,
    )
    assert status == 2
    assert (
        "(column 'cell_id') name different cells: 1,199 of the embedding's 1,200 cells "
        "(99%) are in the metadata; 1 embedding cell(s) are not in the metadata "
        f"('{meta['cell_id'][0]}')"
    ) in err


@pytest.mark.skipif(not HAS_ANNDATA, reason="anndata not installed")
def test_run_h5ad(small, tmp_path):
    import anndata

    _, _, pcs, meta = small
    adata = anndata.AnnData(obs=meta.set_index("cell_id"), obsm={"X_pca": pcs.to_numpy(np.float32)})
    adata.write_h5ad(tmp_path / "in.h5ad")
    proc = harmonypy(
        "run",
        tmp_path / "in.h5ad",
        "--vars",
        "donor",
        "-o",
        tmp_path / "out.h5ad",
        "--adjusted-basis",
        "X_harmony",
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_harmony"].shape == (1200, 20)
    assert out.obsm["X_harmony"].dtype == np.float32
    assert out.uns["harmony"]["params"]["nclust"] == 20
    expected = hm.run_harmony(pcs.to_numpy(np.float32), meta, "donor", **FAST_KW).Z_corr.T
    np.testing.assert_allclose(out.obsm["X_harmony"], expected, **CLOSE)

    proc = harmonypy(
        "run",
        tmp_path / "in.h5ad",
        "--vars",
        "donor",
        "--basis",
        "X_scvi",
        "-o",
        tmp_path / "x.h5ad",
    )
    assert_one_line_error(proc, "'X_scvi'", "'X_pca'")


@pytest.mark.skipif(not HAS_ANNDATA, reason="anndata not installed")
def test_run_h5ad_leaves_x_on_disk_and_copies_the_rest(small, tmp_path):
    """The input is opened backed: an expression matrix of 240 MB is never
    loaded (the process's peak stays within 0.12 GB of importing the
    packages), and the .h5ad output is the input file with the new obsm entry
    and uns['harmony'] written into it: X, obs and the other obsm and uns
    entries unchanged."""
    import anndata

    _, _, pcs, meta = small
    rng = np.random.default_rng(0)
    x = rng.random((1200, 50_000), dtype=np.float32)  # 240 MB
    adata = anndata.AnnData(
        X=x,
        obs=meta.set_index("cell_id"),
        obsm={"X_pca": pcs.to_numpy(np.float32), "X_umap": rng.random((1200, 2))},
        uns={"note": "kept", "harmony": {"old": 1}},
    )
    adata.write_h5ad(tmp_path / "in.h5ad")
    del x
    code = (
        "import sys, runpy\n"
        "sys.argv = ['harmonypy'] + sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module('harmonypy', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(int(hwm.split()[1]) * 1024, code)\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "run",
            str(tmp_path / "in.h5ad"),
            "--vars",
            "donor",
            "-o",
            str(tmp_path / "out.h5ad"),
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    peak, status = proc.stdout.split()[-2:]
    assert status in ("0", "None"), proc.stderr
    # torch and pandas alone take ~0.3 GB; loading X would add 0.24 GB on top
    baseline = subprocess.run(
        [
            sys.executable,
            "-c",
            "import harmonypy, anndata, torch; "
            "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
            "if l.startswith('VmHWM')][0])",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert int(peak) - int(baseline.stdout) < 0.12 * 2**30, (peak, baseline.stdout)
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    original = anndata.read_h5ad(tmp_path / "in.h5ad")
    np.testing.assert_array_equal(out.X, original.X)
    np.testing.assert_array_equal(out.obsm["X_umap"], original.obsm["X_umap"])
    pd.testing.assert_frame_equal(out.obs, original.obs)
    assert out.uns["note"] == "kept" and "old" not in out.uns["harmony"]
    expected = hm.run_harmony(pcs.to_numpy(np.float32), meta, "donor", **FAST_KW).Z_corr.T
    np.testing.assert_allclose(out.obsm["X_pca_harmony"], expected, **CLOSE)


def test_h5ad_without_anndata_gives_install_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "anndata", None)  # makes `import anndata` fail
    status, _, err = run_main(
        ["run", tmp_path / "in.h5ad", "--vars", "donor", "-o", tmp_path / "out.h5ad"], capsys
    )
    assert status == 2
    assert err == (
        "harmonypy: error: reading or writing .h5ad files needs the anndata "
        "package: pip install harmonypy[anndata]\n"
    )


def test_options_map_to_run_harmony():
    args = cli.build_parser().parse_args(
        [
            "run",
            "e.tsv",
            "m.tsv",
            "--vars",
            "a,b",
            "-o",
            "o.tsv",
            "--theta",
            "2,1",
            "--lamb=-1",
            "--sigma",
            "0.2",
            "--nclust",
            "7",
            "--tau",
            "5",
            "--block-size",
            "0.1",
            "--max-iter-harmony",
            "4",
            "--max-iter-kmeans",
            "9",
            "--epsilon-cluster",
            "1e-3",
            "--epsilon-harmony=-inf",
            "--alpha",
            "0.3",
            "--algorithm",
            "harmony2",
            "--device",
            "cpu",
            "--dtype",
            "float64",
            "--seed",
            "11",
            "--threads",
            "1",
            "--batch-prop-cutoff",
            "0.01",
        ]
    )
    assert args.vars_use == ["a", "b"]
    assert harmony_kwargs(args) == dict(
        theta=[2.0, 1.0],
        lamb=-1.0,
        sigma=0.2,
        nclust=7,
        tau=5.0,
        block_size=0.1,
        max_iter_harmony=4,
        max_iter_kmeans=9,
        epsilon_cluster=1e-3,
        epsilon_harmony=-np.inf,
        alpha=0.3,
        random_state=11,
        device="cpu",
        dtype="float64",
        algorithm="harmony2",
        batch_prop_cutoff=0.01,
        ncores=1,
    )
    # Unset options are left out, so run_harmony's (and Harmony2's) defaults apply.
    defaults = harmony_kwargs(
        cli.build_parser().parse_args(["run", "e.tsv", "--vars", "a", "-o", "o.tsv"])
    )
    assert not {
        "theta",
        "lamb",
        "nclust",
        "max_iter_kmeans",
        "epsilon_cluster",
        "epsilon_harmony",
        "device",
        "ncores",
    } & set(defaults)


def embedding_with(pcs: pd.DataFrame, column: str, values) -> pd.DataFrame:
    table = pcs.copy()
    table.insert(0, column, values)
    return table


def test_integer_cell_id_column_is_not_a_pc(small, tmp_path, capsys):
    # The issue: an integer `cell_id` first column became a 21st PC.
    _, _, pcs, meta = small
    ids = np.random.default_rng(0).choice(10**6, len(pcs), replace=False)
    embedding_with(pcs, "cell_id", ids).to_csv(tmp_path / "pcs.tsv", sep="\t", index=False)
    shuffled = np.random.default_rng(1).permutation(len(meta))
    meta.assign(cell_id=ids).iloc[shuffled].to_csv(tmp_path / "meta.tsv", sep="\t", index=False)
    argv = [
        "run",
        tmp_path / "pcs.tsv",
        tmp_path / "meta.tsv",
        "--vars",
        "donor",
        "-o",
        tmp_path / "out.tsv",
        *FAST[:-1],
    ]  # not --quiet: the reorder note is shown
    status, _, err = run_main(argv, capsys)
    assert status == 0, err
    assert (
        "harmonypy: metadata matched by cell name (column 'cell_id'): 1,200 rows, "
        "reordered to the embedding"
    ) in err
    result = pd.read_csv(tmp_path / "out.tsv", sep="\t", index_col=0)
    assert result.index.name == "cell_id" and list(result.index) == list(ids)
    assert list(result.columns) == [f"PC{i}_harmony" for i in range(1, 21)]
    expected = hm.run_harmony(pcs, meta, "donor", **FAST_KW).Z_corr.T
    np.testing.assert_allclose(result.to_numpy(), expected, **CLOSE)


def test_repeated_or_partly_shared_names_are_errors(small, tmp_path, capsys, monkeypatch):
    no_harmony(monkeypatch)
    _, _, pcs, meta = small
    names = meta["cell_id"].to_numpy().copy()
    repeated = names.copy()
    repeated[10:13] = names[0]
    embedding_with(pcs, "cell", repeated).to_csv(tmp_path / "dup.csv", index=False)
    meta.to_csv(tmp_path / "meta.csv", index=False)
    status, _, err = run_main(
        [
            "run",
            tmp_path / "dup.csv",
            tmp_path / "meta.csv",
            "--vars",
            "donor",
            "-o",
            tmp_path / "o.csv",
        ],
        capsys,
    )
    assert status == 2
    assert f"1 name(s) occur more than once ('{names[0]}' (4 times))" in err

    # 37% of the metadata's names are the embedding's, the rest are other cells.
    shared = int(0.37 * len(meta))
    partial = np.concatenate([names[:shared], [f"other{i}" for i in range(len(meta) - shared)]])
    embedding_with(pcs, "cell", names).to_csv(tmp_path / "pcs.csv", index=False)
    meta.assign(cell_id=partial).to_csv(tmp_path / "partial.csv", index=False)
    status, _, err = run_main(
        [
            "run",
            tmp_path / "pcs.csv",
            tmp_path / "partial.csv",
            "--vars",
            "donor",
            "-o",
            tmp_path / "o.csv",
        ],
        capsys,
    )
    assert status == 2
    assert f"{shared} of the embedding's 1,200 cells (37%) are in the metadata" in err
    assert f"756 embedding cell(s) are not in the metadata ('{names[shared]}'" in err
    assert "756 metadata name(s) are not in the embedding ('other0', 'other1'" in err
    assert not (tmp_path / "o.csv").exists()


def test_name_options(small, tmp_path, capsys):
    _, _, pcs, meta = small
    names = meta["cell_id"].to_numpy()
    reverse = meta.iloc[::-1]
    table = embedding_with(pcs, "depth", np.arange(len(pcs)) * 3)  # an integer PC
    table["barcode_text"] = names
    table.to_csv(tmp_path / "pcs.csv", index=False)
    reverse.rename(columns={"cell_id": "bc"}).to_csv(tmp_path / "meta.csv", index=False)
    run = ["run", tmp_path / "pcs.csv", tmp_path / "meta.csv", "--vars", "donor", *FAST]
    status, _, err = run_main(
        run + ["-o", tmp_path / "a.csv", "--names", "barcode_text", "--meta-names", "bc"], capsys
    )
    assert status == 0, err
    result = pd.read_csv(tmp_path / "a.csv", index_col=0)
    assert list(result.index) == list(names) and result.columns[0] == "depth_harmony"
    # --no-names pairs by position: the reversed metadata then gives other labels.
    status, _, err = run_main(
        run + ["-o", tmp_path / "b.csv", "--names", "barcode_text", "--no-names"], capsys
    )
    assert status == 0, err
    assert not np.allclose(pd.read_csv(tmp_path / "b.csv", index_col=0), result)
    status, _, err = run_main(
        run + ["-o", tmp_path / "c.csv", "--names", "barcode", "--meta-names", "bc"], capsys
    )
    assert status == 2 and "--names: column 'barcode' not found" in err
    assert "did you mean 'barcode_text'?" in err
    status, _, err = run_main(
        run + ["-o", tmp_path / "c.csv", "--meta-names", "bc", "--no-names"], capsys
    )
    assert status == 2 and "not allowed with argument" in err
