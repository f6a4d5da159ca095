"""The command line as a whole (:mod:`harmonypy.cli`): exit statuses, one-line
errors in the options' words, help, the outputs checked before any work and
written all or none, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_support import (  # noqa: F401 - fixtures
    FAST,
    HAS_ANNDATA,
    assert_one_line_error,
    copies,
    harmonypy,
    no_harmony,
    run_main,
    small,
    snapshot,
)

import harmonypy as hm
from harmonypy import cli
from harmonypy.cli import run as cli_run


def test_missing_column(small, tmp_path):
    pcs_path, meta_path, _, _ = small
    proc = harmonypy(
        "run", pcs_path, meta_path, "--vars", "donor,batch", "-o", tmp_path / "out.tsv"
    )
    assert_one_line_error(proc, "batch", "available: cell_id, donor")
    assert not (tmp_path / "out.tsv").exists()


def test_bad_inputs_in_process(small, tmp_path, capsys):
    """Usage and input errors: one line, exit status 2 (in-process for speed)."""
    pcs_path, meta_path, _, _ = small
    cases = [
        (
            ["run", pcs_path, meta_path, "--vars", "donor", "-o", tmp_path / "o.xyz"],
            "cannot tell the format",
        ),
        (
            ["run", pcs_path, tmp_path / "nope.tsv", "--vars", "donor", "-o", tmp_path / "o.tsv"],
            "metadata file not found",
        ),
        (["run", pcs_path, "--vars", "donor", "-o", tmp_path / "o.tsv"], "META"),
        (
            ["run", pcs_path, meta_path, "--vars", "donor", "-o", tmp_path / "no" / "o.tsv"],
            "output folder does not exist",
        ),
        (
            [
                "run",
                pcs_path,
                meta_path,
                "--vars",
                "donor",
                "-o",
                tmp_path / "o.tsv",
                "--theta",
                "1,2",
            ],
            "theta",
        ),
        (
            [
                "run",
                pcs_path,
                meta_path,
                "--vars",
                "donor",
                "-o",
                tmp_path / "o.tsv",
                "--theta",
                "abc",
            ],
            "argument --theta",
        ),
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

    monkeypatch.setattr("harmonypy.engine.run.run_harmony", boom)
    argv = ["run", str(pcs_path), str(meta_path), "--vars", "donor", "-o", str(tmp_path / "o.tsv")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "harmonypy: error: RuntimeError: out of memory (run with --debug for the traceback)"
    )
    with pytest.raises(RuntimeError):
        cli.main(["--debug"] + argv)


def test_help_documents_every_option(capsys):
    status, out, _ = run_main(["run", "--help"], capsys)
    assert status == 0
    text = " ".join(out.split())
    for option in [
        "--vars",
        "--output",
        "--basis",
        "--adjusted-basis",
        "--plot",
        "--quiet",
        "--theta",
        "--lamb",
        "--sigma",
        "--nclust",
        "--tau",
        "--block-size",
        "--max-iter-harmony",
        "--max-iter-kmeans",
        "--epsilon-cluster",
        "--epsilon-harmony",
        "--alpha",
        "--algorithm",
        "--device",
        "--dtype",
        "--seed",
        "--threads",
        "--batch-prop-cutoff",
    ]:
        assert option in text, option
    for default in [
        "(default: 0.1)",
        "(default: 10)",
        "(default: 20; harmony2: 4)",
        "(default: harmony1)",
        "(default: X_pca)",
    ]:
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
    proc = subprocess.run(
        [sys.executable, "-m", "harmonypy.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"harmonypy {hm.__version__}"


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
        (
            run + ["-o", tmp_path / "x.tsv", "--plot", tmp_path / "x.tsv"],
            "--plot",
            "name the same file",
        ),
        (
            ["evaluate", pcs, meta, "--batch", "donor", "-o", pcs],
            "-o/--output",
            "is the input EMBEDDING",
        ),
    ]
    for argv, option, fragment in cases:
        status, _, err = run_main(argv, capsys)
        assert status == 2, (argv, err)
        assert option in err and fragment in err, err
    assert snapshot(tmp_path) == before  # nothing written, nothing replaced


@pytest.mark.skipif(not HAS_ANNDATA, reason="anndata not installed")
def test_h5ad_output_that_is_the_input_and_same_basis_are_refused(
    small, tmp_path, capsys, monkeypatch
):
    import anndata

    no_harmony(monkeypatch)
    _, _, pcs, meta = small
    adata = anndata.AnnData(obs=meta.set_index("cell_id"), obsm={"X_pca": pcs.to_numpy(np.float32)})
    adata.write_h5ad(tmp_path / "in.h5ad")
    before = snapshot(tmp_path)
    status, _, err = run_main(
        ["run", tmp_path / "in.h5ad", "--vars", "donor", "-o", tmp_path / "in.h5ad"], capsys
    )
    assert status == 2 and "is the input EMBEDDING" in err
    status, _, err = run_main(
        [
            "run",
            tmp_path / "in.h5ad",
            "--vars",
            "donor",
            "-o",
            tmp_path / "out.h5ad",
            "--adjusted-basis",
            "X_pca",
        ],
        capsys,
    )
    assert status == 2 and "--adjusted-basis must differ from --basis ('X_pca')" in err
    status, _, err = run_main(
        ["run", tmp_path / "in.h5ad", "--vars", "dnor", "-o", tmp_path / "out.h5ad"], capsys
    )
    assert status == 2
    assert (
        "--vars: column(s) 'dnor' not found in adata.obs of " in err
        and "(did you mean 'donor'?)" in err
    ), err
    status, _, err = run_main(
        ["run", tmp_path / "in.h5ad", "--vars", "donor", "-o", tmp_path / "out.h5ad", "--no-names"],
        capsys,
    )
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
        (
            run + ["-o", tmp_path / "o.tsv", "--plot", tmp_path / "p.png", "--plot-pcs", "1,21"],
            "--plot-pcs 1,21: the embedding has only 20 PCs",
        ),
        (run + ["-o", tmp_path / "folder.tsv"], "is a folder"),
        (run + ["-o", tmp_path / "o.h5ad"], "format 'h5ad' not possible"),
        (["demo", "--plot", tmp_path / "demo.txt"], "matplotlib cannot"),
    ]
    before = snapshot(tmp_path)
    for argv, fragment in cases:
        status, _, err = run_main(argv, capsys)
        assert status == 2 and fragment in err, (argv, err)
    monkeypatch.setattr("harmonypy.io.outputs.os.access", lambda path, mode: False)
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
    status, _, err = run_main(
        ["run", pcs, meta, "--vars", "donor", "-o", out, "--plot", png, *FAST], capsys
    )
    assert status == 1 and "OSError: [Errno 28] No space left on device" in err
    assert not out.exists() and not png.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_corrupt_gzip_input_names_the_file(copies, tmp_path, capsys):
    pcs, meta = copies
    data = pcs.read_bytes()
    truncated = tmp_path / "truncated.tsv.gz"
    truncated.write_bytes(data[: len(data) // 2])
    status, _, err = run_main(
        ["run", truncated, meta, "--vars", "donor", "-o", tmp_path / "o.tsv"], capsys
    )
    assert status == 2, err
    assert (
        err.startswith(
            f"harmonypy: error: cannot read {truncated} (embedding): the compressed data ends early"
        )
        and err.count("\n") == 1
    )
    bad_meta = tmp_path / "bad_meta.tsv"
    bad_meta.write_bytes("donor\n\xe9\n".encode("latin-1"))
    status, _, err = run_main(["evaluate", pcs, bad_meta, "--batch", "donor"], capsys)
    assert status == 2 and f"cannot read {bad_meta} (metadata): not UTF-8" in err


def test_missing_columns_name_option_file_and_close_match(copies, capsys, monkeypatch):
    no_harmony(monkeypatch)
    pcs, meta = copies
    cases = [
        (
            ["run", pcs, meta, "--vars", "Donor", "-o", meta.parent / "o.tsv"],
            "--vars",
            "Donor",
            "donor",
        ),
        (
            [
                "run",
                pcs,
                meta,
                "--vars",
                "donor",
                "--color",
                "cell_typ",
                "--plot",
                meta.parent / "p.png",
                "-o",
                meta.parent / "o.tsv",
            ],
            "--color",
            "cell_typ",
            "cell_type",
        ),
        (["evaluate", pcs, meta, "--batch", "donr"], "--batch", "donr", "donor"),
        (
            ["evaluate", pcs, meta, "--batch", "donor", "--label", "celltype"],
            "--label",
            "celltype",
            "cell_type",
        ),
    ]
    for argv, option, wrong, right in cases:
        status, _, err = run_main(argv, capsys)
        assert status == 2, err
        assert err.startswith(
            f"harmonypy: error: {option}: column(s) '{wrong}' not found in "
            f"the metadata {meta} (did you mean '{right}'?); available: "
            f"cell_id, donor"
        ), err


def test_library_parameter_names_become_options(copies, capsys):
    pcs, meta = copies
    status, _, err = run_main(
        ["run", pcs, meta, "--vars", "donor,donor", "-o", meta.parent / "o.tsv", *FAST], capsys
    )
    assert status == 2
    assert "--vars names column(s) ['donor'] more than once" in err and "vars_use" not in err
    assert (
        cli._message(ValueError("max_iter_harmony must be >= 1; see vars_use"), "run")
        == "--max-iter-harmony must be >= 1; see --vars"
    )


# Start the CLI with Python's own SIGINT handler even if this test runs with
# SIGINT ignored (as background jobs of a non-interactive shell do): Python
# would then leave it ignored in the child and the test would wait in vain.
_INTERRUPTIBLE = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('harmonypy', run_name='__main__', alter_sys=True)"
)


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
    proc = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTIBLE, *map(str, argv)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
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
        sep="\t", index=False, float_format="%.4f"
    )
    (inputs / "pcs.tsv").write_text(text)
    (inputs / "pcs.tsv.gz").write_bytes(gzip.compress(text.encode(), compresslevel=1))
    pd.DataFrame({"donor": np.where(batch, "a", "b")}).to_csv(
        inputs / "meta.tsv", sep="\t", index=False
    )
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
            [
                "run",
                inputs / embedding,
                inputs / "meta.tsv",
                "--vars",
                "donor",
                "-o",
                outputs / output,
                "--force",
                "--nclust",
                "10",
                "--max-iter-harmony",
                "4",
                "--max-iter-kmeans",
                "3",
                "--seed",
                "1",
            ],
            when,
        )
        moment = f"{embedding} -> {output}, {when.__name__}: {err}"
        assert status == 130, moment
        assert err.rstrip().endswith("harmonypy: interrupted"), moment
        assert "wrote" not in err, moment
        left = snapshot(outputs)
        assert left == ({output: previous} if has_previous else {}), moment
        assert sorted(os.listdir(inputs)) == ["meta.tsv", "pcs.tsv", "pcs.tsv.gz"]
        if when is not harmony_started and "temporary" not in when.__name__:
            assert "Harmony: " not in err, moment  # stopped during the read


def test_sigterm_while_writing_removes_the_temporary_file_exit_143(
    copies, tmp_path, capsys, monkeypatch
):
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
    status, _, err = run_main(
        ["run", pcs, meta, "--vars", "donor", "-o", out, "--force", *FAST], capsys
    )
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
    status, _, err = run_main(
        ["run", pcs, meta, "--vars", "donor", "-o", out, "--force", *FAST], capsys
    )
    assert status == 143, err
    assert out.read_text().startswith("cell_id\tPC1_harmony")  # the new output, complete
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_memory_guard_is_exit_2_and_no_memory_check_lifts_it(tmp_path, capsys, monkeypatch):
    from harmonypy.engine import memory as _memory

    assert cli.main(["example-data", str(tmp_path)]) == 0
    monkeypatch.setattr(_memory, "host_available", lambda: 1_000_000)  # 1 MB free
    args = [
        "run",
        tmp_path / "pcs.tsv.gz",
        tmp_path / "meta.tsv.gz",
        "--vars",
        "donor",
        "-o",
        tmp_path / "out.tsv",
        "--quiet",
    ]
    status, _, err = run_main(args, capsys)
    assert status == 2 and "--no-memory-check" in err and "check_memory" not in err
    assert not (tmp_path / "out.tsv").exists()
    status, _, err = run_main(args + ["--no-memory-check"], capsys)
    assert status == 0, err
    assert (tmp_path / "out.tsv").exists()
