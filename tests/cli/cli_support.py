"""What the command-line tests share: running it, its example inputs, snapshots.

Imported by the ``tests/cli/test_cli_*.py`` modules, fixtures included.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import read_tsv
from harmonypy import cli

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
    return subprocess.run(
        [sys.executable, "-m", "harmonypy", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


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
    return (
        shared_data / PCS,
        shared_data / META,
        read_tsv(shared_data / PCS),
        read_tsv(shared_data / META),
    )


def no_harmony(monkeypatch):
    """Make any Harmony run fail loudly: checks must refuse before it (exit 2, not 1)."""

    def boom(*args, **kwargs):
        raise RuntimeError("Harmony ran although the command should have been refused")

    monkeypatch.setattr("harmonypy.engine.run.run_harmony", boom)
    monkeypatch.setattr("harmonypy.adapters.anndata.integrate", boom)


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
