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

    result = pd.read_csv(out, sep="\t")
    assert list(result.columns) == [f"PC{i}_harmony" for i in range(1, 21)]
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
    assert "column 'cell_id' names cells, but 1 of the embedding's 1200 cells" in err


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
    assert cli.harmony_kwargs(args) == dict(
        theta=[2.0, 1.0], lamb=-1.0, sigma=0.2, nclust=7, tau=5.0, block_size=0.1,
        max_iter_harmony=4, max_iter_kmeans=9, epsilon_cluster=1e-3,
        epsilon_harmony=-np.inf, alpha=0.3, random_state=11, device="cpu", dtype="float64",
        algorithm="harmony2", batch_prop_cutoff=0.01, ncores=1)
    # Unset options are left out, so run_harmony's (and Harmony2's) defaults apply.
    defaults = cli.harmony_kwargs(cli.build_parser().parse_args(
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
    per_cell = pd.read_csv(out, sep="\t")
    assert list(per_cell.columns) == ["iLISI_donor", "cLISI_cell_type"]
    assert per_cell.shape == (1200, 2) and (per_cell.to_numpy() >= 1 - 1e-9).all()
