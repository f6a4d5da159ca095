"""The command line, end to end through ``python -m harmonypy`` in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import harmonypy as hm
from harmonypy import cli
from harmonypy.cli import run as cli_run
from harmonypy.cli.options import harmony_kwargs

from conftest import read_tsv

PCS = "pbmcs_small_pcs.tsv.gz"
META = "pbmcs_small_meta.tsv.gz"
# Options that keep each end-to-end run short; also checks that they are passed on.
FAST = ["--max-iter-harmony", "3", "--nclust", "20", "--seed", "5", "--quiet"]
FAST_KW = dict(max_iter_harmony=3, nclust=20, random_state=5, verbose=False)
HAS_ANNDATA = importlib.util.find_spec("anndata") is not None
# The CLI and the in-process reference may run with different thread counts,
# which changes float32 summation order slightly.
CLOSE = dict(rtol=1e-4, atol=1e-4)


def harmonypy(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "harmonypy", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def run_main(argv, capsys) -> tuple[int, str, str]:
    """``cli.main`` in this process (no interpreter start-up): (status, stdout, stderr)."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harmonypy: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def small(shared_data):
    return (shared_data / PCS, shared_data / META, read_tsv(shared_data / PCS),
            read_tsv(shared_data / META))


# ------------------------------------------------------------------ run
def test_run_tsv_matches_library_and_plots(small, tmp_path):
    pcs_path, meta_path, pcs, meta = small
    out, png = tmp_path / "out.tsv.gz", tmp_path / "before_after.png"
    proc = harmonypy("run", pcs_path, meta_path, "--vars", "donor", "-o", out, "--theta", "1.5",
                     "--plot", png, "--color", "donor,cell_type", "--plot-pcs", "1,4", *FAST)
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
    status, _, err = run_main(["run", tmp_path / "pcs.npy", meta_path, "--vars", "donor",
                               "-o", tmp_path / "out.npy", *FAST], capsys)
    assert status == 0, err
    result = np.load(tmp_path / "out.npy")
    assert result.shape == (1200, 20) and result.dtype == np.float32
    expected = hm.run_harmony(pcs.to_numpy(np.float32), meta, "donor", **FAST_KW).Z_corr.T
    np.testing.assert_allclose(result, expected, **CLOSE)
    # float64 in, float64 out (written chunk by chunk into the memory-mapped file)
    np.save(tmp_path / "pcs64.npy", pcs.to_numpy(np.float64))
    status, _, err = run_main(["run", tmp_path / "pcs64.npy", meta_path, "--vars", "donor",
                               "--dtype", "float64", "-o", tmp_path / "out64.npy", *FAST],
                              capsys)
    assert status == 0, err
    result64 = np.load(tmp_path / "out64.npy")
    assert result64.dtype == np.float64
    expected64 = hm.run_harmony(pcs.to_numpy(np.float64), meta, "donor", dtype="float64",
                                **FAST_KW).Z_corr.T
    np.testing.assert_array_equal(result64, expected64)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp.npy")]


def test_npy_embedding_is_memory_mapped(tmp_path):
    # Read without a copy: the frame's values are the file's pages (read-only),
    # so a 10M-cell embedding is not held twice before the engine copies it.
    from harmonypy._io import read_embedding

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
    status, _, err = run_main(["run", tmp_path / "pcs.csv", tmp_path / "meta.csv", "--vars",
                               "donor", "-o", tmp_path / "out.csv", *FAST], capsys)
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
    status, _, err = run_main(["run", tmp_path / "pcs.csv", tmp_path / "meta.csv", "--vars",
                               "donor", "-o", tmp_path / "out.csv"], capsys)
    assert status == 2
    assert ("(column 'cell_id') name different cells: 1,199 of the embedding's 1,200 cells "
            "(99%) are in the metadata; 1 embedding cell(s) are not in the metadata "
            f"('{meta['cell_id'][0]}')") in err


@pytest.mark.skipif(not HAS_ANNDATA, reason="anndata not installed")
def test_run_h5ad(small, tmp_path):
    import anndata

    _, _, pcs, meta = small
    adata = anndata.AnnData(obs=meta.set_index("cell_id"),
                            obsm={"X_pca": pcs.to_numpy(np.float32)})
    adata.write_h5ad(tmp_path / "in.h5ad")
    proc = harmonypy("run", tmp_path / "in.h5ad", "--vars", "donor", "-o",
                     tmp_path / "out.h5ad", "--adjusted-basis", "X_harmony", *FAST)
    assert proc.returncode == 0, proc.stderr
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_harmony"].shape == (1200, 20)
    assert out.obsm["X_harmony"].dtype == np.float32
    assert out.uns["harmony"]["params"]["nclust"] == 20
    expected = hm.run_harmony(pcs.to_numpy(np.float32), meta, "donor", **FAST_KW).Z_corr.T
    np.testing.assert_allclose(out.obsm["X_harmony"], expected, **CLOSE)

    proc = harmonypy("run", tmp_path / "in.h5ad", "--vars", "donor", "--basis", "X_scvi",
                     "-o", tmp_path / "x.h5ad")
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
    adata = anndata.AnnData(X=x, obs=meta.set_index("cell_id"),
                            obsm={"X_pca": pcs.to_numpy(np.float32),
                                  "X_umap": rng.random((1200, 2))},
                            uns={"note": "kept", "harmony": {"old": 1}})
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
        "print(int(hwm.split()[1]) * 1024, code)\n")
    proc = subprocess.run(
        [sys.executable, "-c", code, "run", str(tmp_path / "in.h5ad"), "--vars", "donor",
         "-o", str(tmp_path / "out.h5ad"), *FAST], capture_output=True, text=True,
        timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    peak, status = proc.stdout.split()[-2:]
    assert status in ("0", "None"), proc.stderr
    # torch and pandas alone take ~0.3 GB; loading X would add 0.24 GB on top
    baseline = subprocess.run(
        [sys.executable, "-c", "import harmonypy, anndata, torch; "
         "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
         "if l.startswith('VmHWM')][0])"], capture_output=True, text=True, timeout=120)
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
    status, _, err = run_main(["run", tmp_path / "in.h5ad", "--vars", "donor", "-o",
                               tmp_path / "out.h5ad"], capsys)
    assert status == 2
    assert err == ("harmonypy: error: reading or writing .h5ad files needs the anndata "
                   "package: pip install harmonypy[anndata]\n")


# --------------------------------------------------------------- errors
def test_missing_column(small, tmp_path):
    pcs_path, meta_path, _, _ = small
    proc = harmonypy("run", pcs_path, meta_path, "--vars", "donor,batch", "-o",
                     tmp_path / "out.tsv")
    assert_one_line_error(proc, "batch", "available: cell_id, donor")
    assert not (tmp_path / "out.tsv").exists()


def test_bad_inputs_in_process(small, tmp_path, capsys):
    """Usage and input errors: one line, exit status 2 (in-process for speed)."""
    pcs_path, meta_path, _, _ = small
    cases = [
        (["run", pcs_path, meta_path, "--vars", "donor", "-o", tmp_path / "o.xyz"],
         "cannot tell the format"),
        (["run", pcs_path, tmp_path / "nope.tsv", "--vars", "donor", "-o", tmp_path / "o.tsv"],
         "metadata file not found"),
        (["run", pcs_path, "--vars", "donor", "-o", tmp_path / "o.tsv"], "META"),
        (["run", pcs_path, meta_path, "--vars", "donor", "-o", tmp_path / "no" / "o.tsv"],
         "output folder does not exist"),
        (["run", pcs_path, meta_path, "--vars", "donor", "-o", tmp_path / "o.tsv",
          "--theta", "1,2"], "theta"),
        (["run", pcs_path, meta_path, "--vars", "donor", "-o", tmp_path / "o.tsv",
          "--theta", "abc"], "argument --theta"),
        (["run", pcs_path, meta_path, "-o", tmp_path / "o.tsv"], "--vars"),
        (["evaluate", pcs_path, meta_path, "--batch", "plate"], "plate"),
        ([], "COMMAND"),
    ]
    for argv, fragment in cases:
        status, _, err = run_main(argv, capsys)
        err = err.strip()
        assert status == 2, (argv, err)
        assert err.startswith("harmonypy: error: ") and "\n" not in err, err
        assert fragment in err, (fragment, err)


def test_unexpected_error_exit_1(monkeypatch, capsys, small, tmp_path):
    pcs_path, meta_path, _, _ = small

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("harmonypy._harmony.run_harmony", boom)
    argv = ["run", str(pcs_path), str(meta_path), "--vars", "donor", "-o",
            str(tmp_path / "o.tsv")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("harmonypy: error: RuntimeError: out of memory "
                           "(run with --debug for the traceback)")
    with pytest.raises(RuntimeError):
        cli.main(["--debug"] + argv)


def test_options_map_to_run_harmony():
    args = cli.build_parser().parse_args(
        ["run", "e.tsv", "m.tsv", "--vars", "a,b", "-o", "o.tsv", "--theta", "2,1",
         "--lamb=-1", "--sigma", "0.2", "--nclust", "7", "--tau", "5", "--block-size", "0.1",
         "--max-iter-harmony", "4", "--max-iter-kmeans", "9", "--epsilon-cluster", "1e-3",
         "--epsilon-harmony=-inf", "--alpha", "0.3", "--algorithm", "harmony2",
         "--device", "cpu", "--dtype", "float64", "--seed", "11", "--threads", "1",
         "--batch-prop-cutoff", "0.01"])
    assert args.vars_use == ["a", "b"]
    assert harmony_kwargs(args) == dict(
        theta=[2.0, 1.0], lamb=-1.0, sigma=0.2, nclust=7, tau=5.0, block_size=0.1,
        max_iter_harmony=4, max_iter_kmeans=9, epsilon_cluster=1e-3,
        epsilon_harmony=-np.inf, alpha=0.3, random_state=11, device="cpu", dtype="float64",
        algorithm="harmony2", batch_prop_cutoff=0.01, ncores=1)
    # Unset options are left out, so run_harmony's (and Harmony2's) defaults apply.
    defaults = harmony_kwargs(cli.build_parser().parse_args(
        ["run", "e.tsv", "--vars", "a", "-o", "o.tsv"]))
    assert not {"theta", "lamb", "nclust", "max_iter_kmeans", "epsilon_cluster",
                "epsilon_harmony", "device", "ncores"} & set(defaults)


# ------------------------------------------------------------ help etc.
def test_help_documents_every_option(capsys):
    status, out, _ = run_main(["run", "--help"], capsys)
    assert status == 0
    text = " ".join(out.split())
    for option in ["--vars", "--output", "--basis", "--adjusted-basis", "--plot", "--quiet",
                   "--theta", "--lamb", "--sigma", "--nclust", "--tau", "--block-size",
                   "--max-iter-harmony", "--max-iter-kmeans", "--epsilon-cluster",
                   "--epsilon-harmony", "--alpha", "--algorithm", "--device", "--dtype",
                   "--seed", "--threads", "--batch-prop-cutoff"]:
        assert option in text, option
    for default in ["(default: 0.1)", "(default: 10)", "(default: 20; harmony2: 4)",
                    "(default: harmony1)", "(default: X_pca)"]:
        assert default in text, default
    status, out, _ = run_main(["--help"], capsys)
    assert status == 0 and all(c in out for c in ("run", "demo", "evaluate"))
    for command in ("demo", "evaluate"):
        status, out, _ = run_main([command, "--help"], capsys)
        assert status == 0 and "--debug" in out
    assert "(default: 30.0)" in out  # evaluate --perplexity


def test_help_subprocess():
    proc = harmonypy("--help")
    assert proc.returncode == 0 and "usage: harmonypy" in proc.stdout


def test_version():
    proc = harmonypy("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"harmonypy {hm.__version__}"


def test_python_m_harmonypy_cli_runs_the_command_line():
    """``python -m harmonypy.cli`` runs it as ``python -m harmonypy`` does."""
    proc = subprocess.run([sys.executable, "-m", "harmonypy.cli", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"harmonypy {hm.__version__}"


def test_demo():
    proc = harmonypy("demo")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for fragment in ["3,500", "donor: 3 levels", "A (500)", "R agreement", "median"]:
        assert fragment in out, out
    # The run agrees with R and improves donor mixing.
    r_min = float(re.search(r"min (\d\.\d+)", out).group(1))
    assert r_min > 0.95, out
    mixing = re.search(r"median (\d\.\d+) before -> (\d\.\d+) after", out)
    assert mixing, out
    assert float(mixing.group(2)) > float(mixing.group(1)) + 0.5, out


def test_evaluate(small, tmp_path, capsys):
    pcs_path, meta_path, _, _ = small
    out = tmp_path / "lisi.tsv"
    status, stdout, err = run_main(["evaluate", pcs_path, meta_path, "--batch", "donor",
                                    "--label", "cell_type", "--perplexity", "20", "-o", out],
                                   capsys)
    assert status == 0, err
    header, ilisi, clisi = stdout.strip().splitlines()
    assert header.split() == ["score", "column", "levels", "best", "median", "scaled", "mean",
                              "q05", "q95"]
    assert ilisi.split()[:4] == ["iLISI", "donor", "3", "3"]
    assert clisi.split()[:4] == ["cLISI", "cell_type", "9", "1"]
    # The medians and scaled scores agree with harmonypy.evaluate.
    scores = hm.evaluate(small[2], small[3], "donor", "cell_type", perplexity=20)
    assert float(ilisi.split()[4]) == pytest.approx(scores.ilisi_median, abs=1e-3)
    assert float(ilisi.split()[5]) == pytest.approx(scores.ilisi_scaled, abs=1e-3)
    assert float(clisi.split()[5]) == pytest.approx(scores.clisi_scaled, abs=1e-3)
    per_cell = pd.read_csv(out, sep="\t", index_col=0)  # named by META's cell_id
    assert list(per_cell.index) == list(small[3]["cell_id"])
    assert list(per_cell.columns) == ["iLISI_donor", "cLISI_cell_type"]
    assert per_cell.shape == (1200, 2) and (per_cell.to_numpy() >= 1 - 1e-9).all()


# ===================================================== first-use hardening
def no_harmony(monkeypatch):
    """Make any Harmony run fail loudly: checks must refuse before it (exit 2, not 1)."""
    def boom(*args, **kwargs):
        raise RuntimeError("Harmony ran although the command should have been refused")

    monkeypatch.setattr("harmonypy._harmony.run_harmony", boom)
    monkeypatch.setattr("harmonypy._anndata.integrate", boom)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def copies(small, tmp_path):
    """The small embedding and metadata copied into tmp_path (so outputs can collide)."""
    pcs_path, meta_path, _, _ = small
    pcs, meta = tmp_path / "pcs.tsv.gz", tmp_path / "meta.tsv.gz"
    pcs.write_bytes(pcs_path.read_bytes())
    meta.write_bytes(meta_path.read_bytes())
    return pcs, meta


def test_output_that_is_an_input_is_refused(copies, tmp_path, capsys, monkeypatch):
    no_harmony(monkeypatch)
    pcs, meta = copies
    os.symlink(meta, tmp_path / "link.tsv.gz")
    before = snapshot(tmp_path)
    run = ["run", pcs, meta, "--vars", "donor", *FAST]
    cases = [
        (run + ["-o", meta], "-o/--output", "is the input META"),
        (run + ["-o", meta, "--force"], "-o/--output", "is the input META"),  # never
        (run + ["-o", pcs], "-o/--output", "is the input EMBEDDING"),
        (run + ["-o", tmp_path / "link.tsv.gz"], "-o/--output", "is the input META"),
        (run + ["-o", tmp_path / "x.tsv", "--plot", pcs], "--plot", "is the input EMBEDDING"),
        (run + ["-o", tmp_path / "x.tsv", "--plot", tmp_path / "x.tsv"], "--plot",
         "name the same file"),
        (["evaluate", pcs, meta, "--batch", "donor", "-o", pcs], "-o/--output",
         "is the input EMBEDDING"),
    ]
    for argv, option, fragment in cases:
        status, _, err = run_main(argv, capsys)
        assert status == 2, (argv, err)
        assert option in err and fragment in err, err
    assert snapshot(tmp_path) == before  # nothing written, nothing replaced


@pytest.mark.skipif(not HAS_ANNDATA, reason="anndata not installed")
def test_h5ad_output_that_is_the_input_and_same_basis_are_refused(small, tmp_path, capsys,
                                                                   monkeypatch):
    import anndata

    no_harmony(monkeypatch)
    _, _, pcs, meta = small
    adata = anndata.AnnData(obs=meta.set_index("cell_id"),
                            obsm={"X_pca": pcs.to_numpy(np.float32)})
    adata.write_h5ad(tmp_path / "in.h5ad")
    before = snapshot(tmp_path)
    status, _, err = run_main(["run", tmp_path / "in.h5ad", "--vars", "donor", "-o",
                               tmp_path / "in.h5ad"], capsys)
    assert status == 2 and "is the input EMBEDDING" in err
    status, _, err = run_main(["run", tmp_path / "in.h5ad", "--vars", "donor", "-o",
                               tmp_path / "out.h5ad", "--adjusted-basis", "X_pca"], capsys)
    assert status == 2 and "--adjusted-basis 'X_pca' is the same as --basis" in err
    status, _, err = run_main(["run", tmp_path / "in.h5ad", "--vars", "dnor", "-o",
                               tmp_path / "out.h5ad"], capsys)
    assert status == 2
    assert ("--vars: column(s) 'dnor' not found in adata.obs of " in err
            and "(did you mean 'donor'?)" in err), err
    status, _, err = run_main(["run", tmp_path / "in.h5ad", "--vars", "donor", "-o",
                               tmp_path / "out.h5ad", "--no-names"], capsys)
    assert status == 2 and "--no-names: not used with .h5ad input" in err
    assert snapshot(tmp_path) == before


def test_existing_output_needs_force(copies, tmp_path, capsys):
    pcs, meta = copies
    out = tmp_path / "out.tsv"
    out.write_text("previous result\n")
    argv = ["run", pcs, meta, "--vars", "donor", "-o", out, *FAST]
    status, _, err = run_main(argv, capsys)
    assert status == 2 and "already exists; pass --force" in err
    assert out.read_text() == "previous result\n"
    for flag in ("--force", "--overwrite"):
        out.write_text("previous result\n")
        status, _, err = run_main(argv[:-1] + [flag], capsys)  # without --quiet
        assert status == 0, err
        assert "(replaced the previous file)" in err
        assert pd.read_csv(out, sep="\t", index_col=0).shape == (1200, 20)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_outputs_are_checked_before_harmony(copies, tmp_path, capsys, monkeypatch):
    no_harmony(monkeypatch)
    pcs, meta = copies
    (tmp_path / "folder.tsv").mkdir()
    run = ["run", pcs, meta, "--vars", "donor"]
    cases = [
        (run + ["-o", tmp_path / "o.tsv", "--plot", tmp_path / "p.xyz"], "matplotlib cannot"),
        (run + ["-o", tmp_path / "o.tsv", "--plot", tmp_path / "p.png", "--plot-pcs", "1,21"],
         "--plot-pcs 1,21: the embedding has only 20 PCs"),
        (run + ["-o", tmp_path / "folder.tsv"], "is a folder"),
        (run + ["-o", tmp_path / "o.h5ad"], "format 'h5ad' not possible"),
        (["demo", "--plot", tmp_path / "demo.txt"], "matplotlib cannot"),
    ]
    before = snapshot(tmp_path)
    for argv, fragment in cases:
        status, _, err = run_main(argv, capsys)
        assert status == 2 and fragment in err, (argv, err)
    monkeypatch.setattr("harmonypy._io.os.access", lambda path, mode: False)
    status, _, err = run_main(run + ["-o", tmp_path / "o.tsv"], capsys)
    assert status == 2 and "no permission to write" in err
    assert snapshot(tmp_path) == before


def test_all_outputs_or_none(copies, tmp_path, capsys, monkeypatch):
    # The plot fails after the table is complete: the table must not appear
    # either (exit 0 means everything was written; anything else, nothing).
    pcs, meta = copies
    out, png = tmp_path / "out.tsv", tmp_path / "plot.png"

    def broken_savefig(fig, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    pytest.importorskip("matplotlib")
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", broken_savefig)
    status, _, err = run_main(["run", pcs, meta, "--vars", "donor", "-o", out, "--plot", png,
                               *FAST], capsys)
    assert status == 1 and "OSError: [Errno 28] No space left on device" in err
    assert not out.exists() and not png.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_corrupt_gzip_input_names_the_file(copies, tmp_path, capsys):
    pcs, meta = copies
    data = pcs.read_bytes()
    truncated = tmp_path / "truncated.tsv.gz"
    truncated.write_bytes(data[: len(data) // 2])
    status, _, err = run_main(["run", truncated, meta, "--vars", "donor", "-o",
                               tmp_path / "o.tsv"], capsys)
    assert status == 2, err
    assert err.startswith(f"harmonypy: error: cannot read {truncated} (embedding): the "
                          f"compressed data ends early") and err.count("\n") == 1
    bad_meta = tmp_path / "bad_meta.tsv"
    bad_meta.write_bytes("donor\n\xe9\n".encode("latin-1"))
    status, _, err = run_main(["evaluate", pcs, bad_meta, "--batch", "donor"], capsys)
    assert status == 2 and f"cannot read {bad_meta} (metadata): not UTF-8" in err


# ----------------------------------------------------------- cell names
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
    meta.assign(cell_id=ids).iloc[shuffled].to_csv(tmp_path / "meta.tsv", sep="\t",
                                                   index=False)
    argv = ["run", tmp_path / "pcs.tsv", tmp_path / "meta.tsv", "--vars", "donor", "-o",
            tmp_path / "out.tsv", *FAST[:-1]]  # not --quiet: the reorder note is shown
    status, _, err = run_main(argv, capsys)
    assert status == 0, err
    assert ("harmonypy: metadata matched by cell name (column 'cell_id'): 1,200 rows, "
            "reordered to the embedding") in err
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
    status, _, err = run_main(["run", tmp_path / "dup.csv", tmp_path / "meta.csv", "--vars",
                               "donor", "-o", tmp_path / "o.csv"], capsys)
    assert status == 2
    assert f"1 name(s) occur more than once ('{names[0]}' (4 times))" in err

    # 37% of the metadata's names are the embedding's, the rest are other cells.
    shared = int(0.37 * len(meta))
    partial = np.concatenate([names[:shared], [f"other{i}" for i in range(len(meta) - shared)]])
    embedding_with(pcs, "cell", names).to_csv(tmp_path / "pcs.csv", index=False)
    meta.assign(cell_id=partial).to_csv(tmp_path / "partial.csv", index=False)
    status, _, err = run_main(["run", tmp_path / "pcs.csv", tmp_path / "partial.csv",
                               "--vars", "donor", "-o", tmp_path / "o.csv"], capsys)
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
    status, _, err = run_main(run + ["-o", tmp_path / "a.csv", "--names", "barcode_text",
                                     "--meta-names", "bc"], capsys)
    assert status == 0, err
    result = pd.read_csv(tmp_path / "a.csv", index_col=0)
    assert list(result.index) == list(names) and result.columns[0] == "depth_harmony"
    # --no-names pairs by position: the reversed metadata then gives other labels.
    status, _, err = run_main(run + ["-o", tmp_path / "b.csv", "--names", "barcode_text",
                                     "--no-names"], capsys)
    assert status == 0, err
    assert not np.allclose(pd.read_csv(tmp_path / "b.csv", index_col=0), result)
    status, _, err = run_main(run + ["-o", tmp_path / "c.csv", "--names", "barcode",
                                     "--meta-names", "bc"], capsys)
    assert status == 2 and "--names: column 'barcode' not found" in err
    assert "did you mean 'barcode_text'?" in err
    status, _, err = run_main(run + ["-o", tmp_path / "c.csv", "--meta-names", "bc",
                                     "--no-names"], capsys)
    assert status == 2 and "not allowed with argument" in err


# ------------------------------------------------------------- messages
def test_missing_columns_name_option_file_and_close_match(copies, capsys, monkeypatch):
    no_harmony(monkeypatch)
    pcs, meta = copies
    cases = [
        (["run", pcs, meta, "--vars", "Donor", "-o", meta.parent / "o.tsv"], "--vars", "Donor",
         "donor"),
        (["run", pcs, meta, "--vars", "donor", "--color", "cell_typ", "--plot",
          meta.parent / "p.png", "-o", meta.parent / "o.tsv"], "--color", "cell_typ",
         "cell_type"),
        (["evaluate", pcs, meta, "--batch", "donr"], "--batch", "donr", "donor"),
        (["evaluate", pcs, meta, "--batch", "donor", "--label", "celltype"], "--label",
         "celltype", "cell_type"),
    ]
    for argv, option, wrong, right in cases:
        status, _, err = run_main(argv, capsys)
        assert status == 2, err
        assert err.startswith(f"harmonypy: error: {option}: column(s) '{wrong}' not found in "
                              f"the metadata {meta} (did you mean '{right}'?); available: "
                              f"cell_id, donor"), err


def test_library_parameter_names_become_options(copies, capsys):
    pcs, meta = copies
    status, _, err = run_main(["run", pcs, meta, "--vars", "donor,donor", "-o",
                               meta.parent / "o.tsv", *FAST], capsys)
    assert status == 2
    assert "--vars names column(s) ['donor'] more than once" in err and "vars_use" not in err
    assert cli._message(ValueError("max_iter_harmony must be >= 1; see vars_use"), "run") == \
        "--max-iter-harmony must be >= 1; see --vars"


# ---------------------------------------------------------------- Ctrl-C
# Start the CLI with Python's own SIGINT handler even if this test runs with
# SIGINT ignored (as background jobs of a non-interactive shell do): Python
# would then leave it ignored in the child and the test would wait in vain.
_INTERRUPTIBLE = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                  "runpy.run_module('harmonypy', run_name='__main__', alter_sys=True)")


def _has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (Linux /proc)."""
    folder = Path(f"/proc/{pid}/fd")
    try:
        links = [os.readlink(folder / fd) for fd in os.listdir(folder)]
    except OSError:
        return False
    return str(path) in links


def _interrupt_when(argv, ready, limit: float = 60.0) -> tuple[int, str]:
    """Run the CLI, send SIGINT as soon as ``ready(pid, stderr_so_far)``; (status, stderr)."""
    import signal
    import threading
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTIBLE, *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + limit
    try:
        while not ready(proc.pid, "".join(lines)):
            assert proc.poll() is None, f"finished before the interrupt: {''.join(lines)}"
            assert time.monotonic() < deadline, "the moment to interrupt never came"
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=limit)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    return status, "".join(lines)


@pytest.mark.slow
def test_ctrl_c_leaves_previous_output_or_nothing(tmp_path):
    """200,000 cells; SIGINT while reading, running and writing (.tsv and .tsv.gz).

    Afterwards the output holds its previous bytes (or does not exist), no
    temporary file is left, and the exit status is 130.
    """
    import gzip

    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    rng = np.random.default_rng(0)
    n_cells = 200_000
    batch = rng.integers(0, 2, n_cells)
    pcs = rng.standard_normal((n_cells, 10)).astype(np.float32)
    pcs[:, 0] += 2 * batch
    text = pd.DataFrame(pcs, columns=[f"PC{i}" for i in range(1, 11)]).to_csv(
        sep="\t", index=False, float_format="%.4f")
    (inputs / "pcs.tsv").write_text(text)
    (inputs / "pcs.tsv.gz").write_bytes(gzip.compress(text.encode(), compresslevel=1))
    pd.DataFrame({"donor": np.where(batch, "a", "b")}).to_csv(inputs / "meta.tsv", sep="\t",
                                                               index=False)
    previous = b"PC1_harmony\n0.5\n"  # an earlier result that must survive

    def temporary_file(pid, err):
        return any(".tmp" in name for name in os.listdir(outputs))

    def harmony_started(pid, err):
        return "Harmony: " in err

    def reading(path):
        return lambda pid, err: _has_open(pid, path)

    cases = [  # (input, output, a previous output?, when to interrupt)
        ("pcs.tsv.gz", "res.tsv", True, reading(inputs / "pcs.tsv.gz")),
        ("pcs.tsv", "res.tsv.gz", False, harmony_started),
        ("pcs.tsv", "res.tsv", True, temporary_file),
        ("pcs.tsv.gz", "res.tsv.gz", False, temporary_file),
    ]
    if not Path("/proc/self/fd").is_dir():
        cases = cases[1:]  # no way to see the read from outside
    for embedding, output, has_previous, when in cases:
        for path in outputs.iterdir():
            path.unlink()
        if has_previous:
            (outputs / output).write_bytes(previous)
        status, err = _interrupt_when(
            ["run", inputs / embedding, inputs / "meta.tsv", "--vars", "donor", "-o",
             outputs / output, "--force", "--nclust", "10", "--max-iter-harmony", "4",
             "--max-iter-kmeans", "3", "--seed", "1"], when)
        moment = f"{embedding} -> {output}, {when.__name__}: {err}"
        assert status == 130, moment
        assert err.rstrip().endswith("harmonypy: interrupted"), moment
        assert "wrote" not in err, moment
        left = snapshot(outputs)
        assert left == ({output: previous} if has_previous else {}), moment
        assert sorted(os.listdir(inputs)) == ["meta.tsv", "pcs.tsv", "pcs.tsv.gz"]
        if when is not harmony_started and "temporary" not in when.__name__:
            assert "Harmony: " not in err, moment  # stopped during the read


def test_sigterm_while_writing_removes_the_temporary_file_exit_143(copies, tmp_path, capsys,
                                                                   monkeypatch):
    """SIGTERM (a scheduler's stop, ``timeout``) is handled as Ctrl-C is: the
    half-written temporary file is removed, a previous output is untouched,
    exit status 143. SIGTERM during the final renames waits for them."""
    import signal

    pcs, meta = copies
    out = tmp_path / "out.tsv"
    out.write_text("previous\n")
    real_write_table = cli_run.write_table

    def terminated_while_writing(table, path):
        real_write_table(table, path)  # the temporary file exists, complete
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli_run, "write_table", terminated_while_writing)
    previous = signal.getsignal(signal.SIGTERM)
    status, _, err = run_main(["run", pcs, meta, "--vars", "donor", "-o", out, "--force",
                               *FAST], capsys)
    assert status == 143 and err.strip() == "harmonypy: terminated (SIGTERM)", err
    assert out.read_text() == "previous\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is the command's only

    monkeypatch.setattr(cli_run, "write_table", real_write_table)
    real_replace = os.replace

    def terminated_while_renaming(source, destination):
        os.kill(os.getpid(), signal.SIGTERM)  # held back until every output is in place
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", terminated_while_renaming)
    status, _, err = run_main(["run", pcs, meta, "--vars", "donor", "-o", out, "--force",
                               *FAST], capsys)
    assert status == 143, err
    assert out.read_text().startswith("cell_id\tPC1_harmony")  # the new output, complete
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_example_data_writes_the_bundled_example_and_keeps_existing_files(tmp_path):
    assert cli.main(["example-data", str(tmp_path)]) == 0
    pcs = pd.read_csv(tmp_path / "pcs.tsv.gz", sep="\t", index_col=0)
    meta = pd.read_csv(tmp_path / "meta.tsv.gz", sep="\t", index_col=0)
    assert pcs.shape == (1200, 20) and pcs.index.equals(meta.index)
    assert {"donor", "cell_type"} <= set(meta.columns)
    before = (tmp_path / "pcs.tsv.gz").read_bytes()
    assert cli.main(["example-data", str(tmp_path)]) == 2          # refused: files exist
    assert (tmp_path / "pcs.tsv.gz").read_bytes() == before
    assert cli.main(["example-data", str(tmp_path), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.tsv.gz", "pcs.tsv.gz"]


def test_memory_guard_is_exit_2_and_no_memory_check_lifts_it(tmp_path, capsys, monkeypatch):
    from harmonypy import _memory

    assert cli.main(["example-data", str(tmp_path)]) == 0
    monkeypatch.setattr(_memory, "host_available", lambda: 1_000_000)   # 1 MB free
    args = ["run", tmp_path / "pcs.tsv.gz", tmp_path / "meta.tsv.gz", "--vars", "donor",
            "-o", tmp_path / "out.tsv", "--quiet"]
    status, _, err = run_main(args, capsys)
    assert status == 2 and "--no-memory-check" in err and "check_memory" not in err
    assert not (tmp_path / "out.tsv").exists()
    status, _, err = run_main(args + ["--no-memory-check"], capsys)
    assert status == 0, err
    assert (tmp_path / "out.tsv").exists()


# ==================================================== reference build, map
@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """``harmonypy example-data``'s files (the bundled 1,200 PBMCs, cell_id first)."""
    folder = tmp_path_factory.mktemp("example")
    hm.datasets.save_example(folder)
    return folder / "pcs.tsv.gz", folder / "meta.tsv.gz"


def test_reference_build_and_map_equal_the_library(example, tmp_path, capsys):
    pcs_path, meta_path = example
    ref_path, out = tmp_path / "ref.npz", tmp_path / "mapped.tsv"
    status, _, err = run_main(["reference", "build", pcs_path, meta_path, "--vars", "donor",
                               "--subset", "donor=3pv1,3pv2", "--labels", "cell_type",
                               "-o", ref_path, *FAST], capsys)
    assert status == 0, err
    status, _, err = run_main(["map", pcs_path, meta_path, "--subset", "donor=5p",
                               "--reference", ref_path, "--labels", "cell_type",
                               "--neighbors", "10", "--min-probability", "0.6", "-o", out],
                              capsys)
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
    assert list(result.columns) == ([f"PC{i}_harmony" for i in range(1, 21)] +
                                    ["cell_type_predicted", "cell_type_probability",
                                     "mapping_score"])
    assert list(result.index) == list(meta.loc[in_query, "cell_id"])
    np.testing.assert_allclose(result.iloc[:, :20].to_numpy(), q.result(), **CLOSE)
    assert list(result["cell_type_predicted"]) == list(labels["label"].astype(str))
    np.testing.assert_allclose(result["cell_type_probability"], labels["probability"])
    np.testing.assert_allclose(result["mapping_score"], q.confidence, rtol=1e-4)
    assert (result["cell_type_predicted"] == meta.loc[in_query, "cell_type"].to_numpy()).mean() \
        > 0.9
    # .npy: the corrected PCs only; the query as one batch by its own column works too.
    status, _, err = run_main(["map", pcs_path, meta_path, "--subset", "donor=5p", "--vars",
                               "donor", "--reference", ref_path, "-o", tmp_path / "m.npy",
                               "-q"], capsys)
    assert status == 0 and err == ""
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), q.result(), **CLOSE)


def test_one_batch_reference_build_equals_the_library(example, tmp_path, capsys):
    """Without --vars, 'reference build' builds a one-batch reference (clustered,
    no Harmony run), as build_reference(pcs, meta_data=..., labels=...) does."""
    pcs_path, meta_path = example
    ref_path = tmp_path / "ref.npz"
    status, _, err = run_main(["reference", "build", pcs_path, meta_path, "--subset",
                               "donor=3pv2", "--labels", "cell_type", "--nclust", "16",
                               "--seed", "3", "-o", ref_path], capsys)
    assert status == 0, err
    assert "reference of 480 cells x 20 PCs, 16 clusters (none), labels cell_type" in err
    assert "one batch" in err
    pcs, meta = hm.datasets.load_pbmcs_small()
    in_ref = (meta["donor"] == "3pv2").to_numpy()
    names = meta.loc[in_ref, "cell_id"].to_numpy()
    expected = hm.build_reference(pcs[in_ref].set_axis(names),
                                  meta[in_ref].set_index("cell_id"), labels="cell_type",
                                  nclust=16, random_state=3)
    saved = hm.load_reference(ref_path)
    assert (saved.algorithm, saved.variables, saved.K) == ("none", [], 16)
    np.testing.assert_allclose(saved.Nr, expected.Nr, **CLOSE)
    np.testing.assert_allclose(saved.C, expected.C, **CLOSE)
    np.testing.assert_array_equal(saved.cells, expected.cells)
    np.testing.assert_array_equal(saved.cell_names, names)
    pd.testing.assert_frame_equal(saved.labels, expected.labels)
    # The 5' cells mapped onto it get their types.
    out = tmp_path / "mapped.tsv"
    status, _, err = run_main(["map", pcs_path, meta_path, "--subset", "donor=5p",
                               "--reference", ref_path, "--labels", "cell_type", "-o", out],
                              capsys)
    assert status == 0, err
    mapped = pd.read_csv(out, sep="\t", index_col=0)
    truth = meta.set_index("cell_id").loc[mapped.index, "cell_type"]
    assert (mapped["cell_type_predicted"] == truth).mean() > 0.8
    # No META at all: the embedding alone, its cell names kept.
    status, _, err = run_main(["reference", "build", pcs_path, "--nclust", "20", "-q",
                               "-o", tmp_path / "bare.npz"], capsys)
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
    status, _, err = run_main(["reference", "build", pcs, meta, "--vars", "donor", "--labels",
                               "cell_type", "-o", ref, *FAST], capsys)
    assert status == 0, err
    (tmp_path / "exists.npz").write_text("previous\n")
    (tmp_path / "exists.tsv").write_text("previous\n")
    no_harmony(monkeypatch)

    def boom(*args, **kwargs):
        raise RuntimeError("mapping ran although the command should have been refused")

    monkeypatch.setattr("harmonypy._mapping.map_query", boom)
    before = snapshot(tmp_path)
    build = ["reference", "build", pcs, meta, "--vars", "donor"]
    query = ["map", pcs, meta, "--reference", ref]
    cases = [
        (build + ["-o", meta], "-o/--output", "is the input META"),
        (build + ["-o", pcs, "--force"], "-o/--output", "is the input EMBEDDING"),
        (build + ["-o", tmp_path / "exists.npz"], "exists.npz", "already exists; pass --force"),
        (build + ["-o", tmp_path / "ref.tsv"], "-o/--output", "format 'tsv' not possible here"),
        (build + ["--labels", "cell_type", "--no-cells", "-o", tmp_path / "r.npz"], "--labels",
         "drop --no-cells"),
        (build + ["--labels", "celltype", "-o", tmp_path / "r.npz"], "--labels",
         "(did you mean 'cell_type'?)"),
        (build + ["--subset", "donor=5P", "-o", tmp_path / "r.npz"], "--subset",
         "no cell has donor '5P'"),
        (build + ["--layer", "counts", "-o", tmp_path / "r.npz"], "--layer",
         "only for .h5ad input"),
        (["reference", "build", pcs, meta, "--theta", "1", "--algorithm", "harmony2", "-o",
          tmp_path / "r.npz"], "--theta, --algorithm", "Harmony parameters, but no --vars"),
        (["reference", "build", pcs, "--labels", "cell_type", "-o", tmp_path / "r.npz"],
         "--labels", "names columns of META, the metadata table, which was not given"),
        (["reference", "build", pcs, "--vars", "donor", "-o", tmp_path / "r.npz"],
         "--vars", "names columns of META, the metadata table, which was not given"),
        (query + ["-o", ref], "-o/--output", "is the input --reference"),
        (query + ["-o", ref, "--force"], "-o/--output", "is the input --reference"),
        (query + ["-o", pcs, "--force"], "-o/--output", "is the input QUERY"),
        (query + ["-o", tmp_path / "exists.tsv"], "exists.tsv", "already exists; pass --force"),
        (query + ["-o", tmp_path / "m.h5ad"], "-o/--output", "format 'h5ad' not possible"),
        (query + ["--labels", "celltype", "-o", tmp_path / "m.tsv"], "--labels",
         "(did you mean 'cell_type'?)"),
        (query + ["--labels", "cell_type", "-o", tmp_path / "m.npy"], "--labels",
         "a .npy output holds the corrected PCs only"),
        (query + ["--min-probability", "2", "-o", tmp_path / "m.tsv"], "--min-probability",
         "must be in [0, 1]"),
        (query + ["--vars", "dnor", "-o", tmp_path / "m.tsv"], "--vars",
         "(did you mean 'donor'?)"),
        (["map", pcs, "--vars", "donor", "--reference", ref, "-o", tmp_path / "m.tsv"],
         "--vars", "META, the query's metadata table, which was not given"),
        (["map", pcs, "--reference", meta, "-o", tmp_path / "m.tsv"], "meta.tsv.gz",
         "cannot be read as a .npz"),
        (["map", pcs, "--reference", tmp_path / "none.npz", "-o", tmp_path / "m.tsv"],
         "none.npz", "does not exist"),
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
    status, _, err = run_main(["reference", "build", pcs_path, meta_path, "--vars", "donor",
                               "--subset", "donor=3pv1,3pv2", "--labels", "cell_type",
                               "-o", ref, *FAST], capsys)
    assert status == 0, err
    query = ["map", pcs_path, meta_path, "--subset", "donor=5p", "--reference", ref,
             "-o", tmp_path / "m.tsv"]
    for extra, fragments in [
            (["--lamb", "0"], ["--lamb must be > 0", "without --vars the query is one batch",
                               "--lamb=-1"]),
            (["--lamb", "1,2"], ["--lamb has 2 values", "without --vars", "with --vars"]),
            (["--lamb", "0", "--vars", "donor"], ["--lamb must be > 0", "donor=5p"]),
            (["--iterations", "0"], ["--iterations must be at least 1, got 0"]),
            (["--neighbors", "5000", "--labels", "cell_type"],
             ["--neighbors 5000", "770 reference cells", "cell_type"])]:
        status, _, err = run_main(query + extra, capsys)
        assert status == 2 and len(err.strip().splitlines()) == 1, (extra, err)
        for fragment in fragments:
            assert fragment in err, (extra, fragment, err)
    assert not (tmp_path / "m.tsv").exists()


def test_npy_with_named_metadata_is_paired_by_position_and_keeps_its_names(example, tmp_path,
                                                                           capsys):
    """An .npy embedding names no cells: its rows are paired with META's by
    position (the rule --help states), the note says so, and the outputs are
    named by META's cell names instead of dropping them."""
    pcs_path, meta_path = example
    pcs, meta = hm.datasets.load_pbmcs_small()
    shuffled = meta.sample(frac=1, random_state=0)  # a cell_id column, in another order
    np.save(tmp_path / "pcs.npy", pcs.to_numpy(np.float32))
    shuffled.to_csv(tmp_path / "meta.tsv", sep="\t", index=False)
    status, _, err = run_main(["run", tmp_path / "pcs.npy", tmp_path / "meta.tsv", "--vars",
                               "donor", "-o", tmp_path / "out.tsv", *FAST[:-1]], capsys)
    assert status == 0, err
    note = [line for line in err.splitlines() if "by position" in line]
    assert len(note) == 1 and "pcs.npy has no cell names" in note[0], err
    assert "named by the metadata's column 'cell_id'" in note[0]
    out = pd.read_csv(tmp_path / "out.tsv", sep="\t", index_col=0)
    assert list(out.index) == list(shuffled["cell_id"])
    # map: the same rule for a query, and its output keeps the names.
    ref = tmp_path / "ref.npz"
    status, _, err = run_main(["reference", "build", pcs_path, meta_path, "--subset",
                               "donor=3pv2", "--nclust", "10", "-o", ref, "-q"], capsys)
    assert status == 0, err
    in_query = (shuffled["donor"] != "3pv2").to_numpy()
    np.save(tmp_path / "q.npy", pcs.to_numpy(np.float32)[in_query])
    shuffled[in_query].to_csv(tmp_path / "qmeta.tsv", sep="\t", index=False)
    status, _, err = run_main(["map", tmp_path / "q.npy", tmp_path / "qmeta.tsv", "--vars",
                               "donor", "--reference", ref, "-o", tmp_path / "m.tsv"], capsys)
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
    status, _, err = run_main(["reference", "build", pcs_path, meta_path, "--subset",
                               "donor=3pv2", "--nclust", "10", "-o", ref, "-q"], capsys)
    assert status == 0, err
    pcs, meta = hm.datasets.load_pbmcs_small()
    in_query = (meta["donor"] != "3pv2").to_numpy()
    query = anndata.AnnData(obs=meta[in_query].set_index("cell_id"),
                            obsm={"X_pca": pcs[in_query].to_numpy(np.float32)})
    hm.integrate(query, "donor", **FAST_KW)
    query.write_h5ad(tmp_path / "query.h5ad")
    argv = ["map", tmp_path / "query.h5ad", "--reference", ref, "--vars", "donor", "--basis",
            "X_pca", "-q"]
    status, _, err = run_main(argv + ["-o", tmp_path / "m.h5ad"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    for fragment in ["obsm['X_pca_harmony']", "no earlier mapping", "--adjusted-basis",
                     "--force"]:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "m.h5ad").exists()
    status, _, err = run_main(argv + ["--adjusted-basis", "X_mapped", "-o",
                                      tmp_path / "m.h5ad"], capsys)
    assert status == 0, err
    mapped = anndata.read_h5ad(tmp_path / "m.h5ad")
    np.testing.assert_array_equal(mapped.obsm["X_pca_harmony"], query.obsm["X_pca_harmony"])
    assert mapped.obsm["X_mapped"].shape == (720, 20)
    status, _, err = run_main(argv + ["--force", "-o", tmp_path / "m2.h5ad"], capsys)
    assert status == 0, err
    replaced = anndata.read_h5ad(tmp_path / "m2.h5ad")
    np.testing.assert_allclose(replaced.obsm["X_pca_harmony"], mapped.obsm["X_mapped"],
                               **CLOSE)


@pytest.mark.skipif(not HAS_ANNDATA, reason="anndata not installed")
def test_h5ad_reference_maps_a_query_from_its_genes(tmp_path, capsys):
    from test_mapping import _expression, _query_adata, _scanpy_like

    log_ref, obs_ref = _expression(31, 300, [0, 1])
    log_query, obs_query = _expression(32, 120, [2, 3])
    _scanpy_like(log_ref, obs_ref, max_value=2.0).write_h5ad(tmp_path / "ref.h5ad")
    genes = [f"g{i}" for i in range(60)]
    _query_adata(log_query[:, 4:], obs_query, genes[4:], sparse=True).write_h5ad(
        tmp_path / "query.h5ad")
    status, _, err = run_main(["reference", "build", tmp_path / "ref.h5ad", "--vars", "batch",
                               "--labels", "cell_type", "-o", tmp_path / "ref.npz", *FAST[:4],
                               "--nclust", "6"], capsys)
    assert status == 0, err
    assert "projection from 60 genes" in err
    saved = hm.load_reference(tmp_path / "ref.npz")
    library = hm.build_reference(_scanpy_like(log_ref, obs_ref, max_value=2.0), "batch",
                                 labels="cell_type", max_iter_harmony=3, nclust=6,
                                 random_state=0, verbose=False)
    for name in ("genes", "loadings", "mean", "std", "scaled_mean", "pc_mean"):
        np.testing.assert_array_equal(getattr(saved.projection, name),
                                      getattr(library.projection, name))
    np.testing.assert_allclose(saved.C, library.C, **CLOSE)

    argv = ["map", tmp_path / "query.h5ad", "--reference", tmp_path / "ref.npz", "--vars",
            "batch", "--labels", "cell_type", "--neighbors", "10"]
    status, _, err = run_main(argv + ["-o", tmp_path / "mapped.h5ad"], capsys)
    assert status == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert warning == ["harmonypy: warning: 4 of the reference's 60 genes are missing from "
                       "adata_query (e.g. 'g0', 'g1', 'g2', 'g3'); they are set to the "
                       "reference's mean and add nothing to the projection (Symphony fills "
                       "them with 0 after scaling)"]
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
    status, _, err = run_main(["reference", "build", tmp_path / "bare.h5ad", "--vars", "batch",
                               "-o", tmp_path / "bare.npz"], capsys)
    assert status == 2 and "adata.varm has no 'PCs'" in err and "--no-loadings" in err, err
    assert not (tmp_path / "bare.npz").exists()
    status, _, err = run_main(["reference", "build", tmp_path / "ref.h5ad", "--vars", "batch",
                               "-o", tmp_path / "ref.h5ad", "--force"], capsys)
    assert status == 2 and "is the input EMBEDDING" in err
    # Without --vars: one batch, the gene projection kept all the same.
    status, _, err = run_main(["reference", "build", tmp_path / "ref.h5ad", "--labels",
                               "cell_type", "--nclust", "6", "-o", tmp_path / "one.npz"], capsys)
    assert status == 0, err
    one = hm.load_reference(tmp_path / "one.npz")
    library = hm.build_reference(_scanpy_like(log_ref, obs_ref, max_value=2.0), None,
                                 labels="cell_type", nclust=6)
    assert (one.algorithm, one.K, one.projection.n_genes) == ("none", 6, 60)
    np.testing.assert_allclose(one.C, library.C, **CLOSE)


def test_mapping_tutorial_commands_run(tmp_path, capsys, monkeypatch):
    """The bash block of docs/mapping-tutorial.md (also proposed for the README)
    runs as written from an empty folder."""
    import shlex

    page = Path(__file__).resolve().parents[1] / "docs" / "mapping-tutorial.md"
    block = re.search(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S).group(1)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines()
                if line.startswith("harmonypy ")]
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
    for option in ["--vars", "--labels", "--no-cells", "--subset", "--output", "--basis",
                   "--adjusted-basis", "--loadings", "--no-loadings", "--layer", "--force",
                   "--theta", "--algorithm", "--names"]:
        assert option in text, option
    status, out, _ = run_main(["map", "--help"], capsys)
    text = " ".join(out.split())
    assert status == 0
    for option in ["--reference", "--vars", "--labels", "--min-probability", "--neighbors",
                   "--subset", "--basis", "--layer", "--lamb", "--iterations", "--device",
                   "--dtype", "--force", "(default: 0.5)", "(default: 5)"]:
        assert option in text, option
    status, out, _ = run_main(["--help"], capsys)
    assert "reference" in out and "map" in out
