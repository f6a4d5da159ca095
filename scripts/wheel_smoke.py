"""Smoke checks of a built harmonypy, run by scripts/check_wheel.sh.

    python wheel_smoke.py contents WHEEL SDIST CHECKOUT   # what the archives hold
    python wheel_smoke.py core VERSION                    # the installed wheel, no extras
    python wheel_smoke.py missing EXTRA...                # before they are installed
    python wheel_smoke.py extra EXTRA                     # after it is installed

All but ``contents`` run in the fresh virtual environment the wheel was installed
into, from a folder outside the checkout (the current folder gets the outputs).
Each check raises on failure (exit status 1) and prints one line when it passes.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

EXTRAS = ("anndata", "plot", "progress", "ann", "parquet", "faiss", "fast")
FAST = ["--max-iter-harmony", "3", "--seed", "0", "--quiet"]
START = time.perf_counter()


def ok(what: str) -> None:
    print(f"  ok ({time.perf_counter() - START:5.1f} s): {what}", flush=True)


def cli(*words: str, expect: int = 0, script: bool = False) -> subprocess.CompletedProcess:
    """Run the command line: the installed ``harmonypy`` console script (the one beside
    this Python) when ``script``, else its ``main`` in this process (each new process
    costs seconds of importing torch)."""
    if script:
        path = Path(sysconfig.get_path("scripts")) / "harmonypy"
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(
            [str(path), *words], check=False, capture_output=True, text=True, env=env, timeout=300
        )
    else:
        from harmonypy.cli import main

        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                status = main(list(words))
            except SystemExit as exit_:  # argparse's errors
                status = exit_.code
        proc = subprocess.CompletedProcess(words, status, out.getvalue(), err.getvalue())
    if proc.returncode != expect:
        raise AssertionError(
            f"harmonypy {' '.join(words)} exited with {proc.returncode}, expected {expect}:\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return proc


# ------------------------------------------------------------------ contents
def check_contents(wheel: Path, sdist: Path, checkout: Path) -> None:
    """The wheel holds every file of the package; the sdist the sources, tests and docs."""
    package = checkout / "src" / "harmonypy"
    sources = {
        p.relative_to(package.parent).as_posix()
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = archive.read(info).decode()
    missing = sources - names
    assert not missing, f"the wheel lacks {sorted(missing)}"
    for required in ("harmonypy/shard.py", "harmonypy/data/pbmc_3500_pcs.tsv.gz"):
        assert required in names, f"the wheel lacks {required}"
    if (package / "py.typed").exists():
        assert "harmonypy/py.typed" in names, "the wheel lacks harmonypy/py.typed"
    assert re.search(r"^harmonypy = harmonypy\.cli:main$", entry_points, re.MULTILINE), entry_points
    stray = [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not stray, f"the wheel holds compiled files {stray[:5]}"
    typed = ", py.typed" if (package / "py.typed").exists() else ""
    ok(f"{wheel.name}: {len(sources)} package files, console script{typed}")

    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        held = {n.removeprefix(f"{top}/") for n in archive.getnames()}
    expected = {f"src/{s}" for s in sources} | {
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
        "tests/test_readme.py",
        "docs/index.md",
    }
    missing = expected - held
    assert not missing, f"the sdist lacks {sorted(missing)}"
    stray = [n for n in held if n.startswith((".venv/", ".git/")) or "__pycache__" in n]
    assert not stray, f"the sdist holds {stray[:5]}"
    ok(f"{sdist.name}: sources, tests, docs, no .venv or caches")


# ---------------------------------------------------------------------- core
def check_installed(version: str) -> None:
    """The package imported is the installed wheel, and every version agrees."""
    import importlib.metadata

    import harmonypy as hm

    where = Path(hm.__file__).resolve()
    assert Path(sys.prefix).resolve() in where.parents, f"harmonypy imported from {where}"
    assert hm.__version__ == version, (hm.__version__, version)
    assert importlib.metadata.version("harmonypy") == version
    printed = cli("--version", script=True).stdout.strip()
    assert printed == f"harmonypy {version}", printed
    for name in hm.__all__:
        assert getattr(hm, name) is not None, name
    ok(f"harmonypy {version} from {where.parent}; --version; {len(hm.__all__)} public names")


def check_seed_example() -> None:
    """The seed's call: ``run_harmony(pcs, meta, ['donor'])``; ``Z_corr`` is PCs x cells."""
    import numpy as np

    import harmonypy as hm

    pcs, meta, _ = hm.datasets.load_pbmc_3500()
    assert hm.datasets.load_pbmc_3500_harmony2_reference().shape == pcs.shape
    ho = hm.run_harmony(pcs, meta, ["donor"], verbose=False)
    assert ho.Z_corr.shape == (pcs.shape[1], pcs.shape[0]), ho.Z_corr.shape
    assert np.isfinite(ho.Z_corr).all()
    ok(f"run_harmony(pcs, meta, ['donor']): Z_corr {ho.Z_corr.shape} (PCs x cells)")


def check_mapping_round_trip() -> None:
    """build_reference -> save -> load_reference -> map_query -> transfer_labels."""
    import numpy as np

    import harmonypy as hm

    pcs, meta = hm.datasets.load_pbmcs_small()
    query = (meta["donor"] == "5p").to_numpy()
    ho = hm.run_harmony(pcs[~query], meta[~query], "donor", max_iter_harmony=3, verbose=False)
    path = Path("reference.npz")
    hm.build_reference(ho, meta[~query], labels="cell_type").save(path)
    ref = hm.load_reference(path)
    mapped = hm.map_query(pcs[query], meta[query], ref)
    assert mapped.Z_corr.shape == (pcs.shape[1], int(query.sum())), mapped.Z_corr.shape
    assert np.isfinite(mapped.Z_corr).all()
    labels = hm.transfer_labels(mapped, ref, "cell_type", k=10)
    assert len(labels) == int(query.sum())
    ok(f"mapping round trip through {path}: {int(query.sum())} query cells")


def check_command_line() -> None:
    """The demo, the README's commands, the multi-process launcher and the shard entry point."""
    report = cli("demo", script=True).stdout
    assert "R agreement" in report, report
    cli("example-data", ".")
    cli("run", "pcs.tsv.gz", "meta.tsv.gz", "--vars", "donor", "-o", "out.tsv.gz", *FAST)
    cli(
        "run", "pcs.tsv.gz", "meta.tsv.gz", "--vars", "donor", "--nproc", "2", "-o", "np.npy", *FAST
    )
    ok("harmonypy demo (the console script), example-data, run, run --nproc 2")
    proc = subprocess.run(
        [sys.executable, "-m", "harmonypy.shard", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
    ok("python -m harmonypy.shard --help")


# -------------------------------------------------------------------- extras
def progress_output() -> str:
    """What a verbose run writes to a stderr that says it is a terminal."""
    import harmonypy as hm

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    with redirect_stderr(stream):
        hm.run_harmony(*hm.datasets.load_pbmcs_small(), "donor", max_iter_harmony=2)
    return stream.getvalue()


def fused_path_message() -> str:
    """The engine's INFO line on its CPU path, for a run with HARMONYPY_FUSED=always."""
    import logging
    import os

    import harmonypy as hm

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("harmonypy.engine.fused")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    os.environ["HARMONYPY_FUSED"] = "always"
    try:
        hm.run_harmony(*hm.datasets.load_pbmcs_small(), "donor", max_iter_harmony=2, verbose=False)
    finally:
        del os.environ["HARMONYPY_FUSED"]
        logger.removeHandler(handler)
        logger.setLevel(level)
    return " | ".join(records)


def feature(extra: str) -> str:
    """Use the feature of ``extra``; returns what it shows of itself."""
    import harmonypy as hm

    pcs, meta = hm.datasets.load_pbmcs_small()
    if extra == "anndata":
        import anndata as ad

        adata = ad.AnnData(obs=meta.set_index("cell_id"), obsm={"X_pca": pcs.to_numpy()})
        adata.write_h5ad("adata.h5ad")
        cli("run", "adata.h5ad", "--vars", "donor", "-o", "adata_harmony.h5ad", *FAST)
        hm.integrate(adata, "donor", max_iter_harmony=2, verbose=False)
        return f"integrate and .h5ad in/out: X_pca_harmony {adata.obsm['X_pca_harmony'].shape}"
    if extra == "plot":
        import matplotlib

        matplotlib.use("Agg")
        ho = hm.run_harmony(pcs, meta, "donor", max_iter_harmony=2, verbose=False)
        ho.plot_convergence().figure.savefig("convergence.png")
        return "plot_convergence, saved as .png"
    if extra == "ann":
        lisi = hm.compute_lisi(pcs.to_numpy(), meta, ["donor"], neighbors="pynndescent")
        assert lisi.shape == (len(meta), 1) and (lisi >= 1 - 1e-9).all(), lisi
        return "compute_lisi(neighbors='pynndescent')"
    if extra == "faiss":
        lisi = hm.compute_lisi(pcs.to_numpy(), meta, ["donor"], neighbors="faiss")
        exact = hm.compute_lisi(pcs.to_numpy(), meta, ["donor"], neighbors="exact")
        assert abs(lisi - exact).max() < 1e-6, abs(lisi - exact).max()
        return "compute_lisi(neighbors='faiss') equals the exact torch search"
    if extra == "fast":
        path = fused_path_message()
        assert "fused numba kernels" in path, path
        return f"HARMONYPY_FUSED=always: {path}"
    if extra == "parquet":
        hm.datasets.save_example(".", overwrite=True)
        cli("run", "pcs.tsv.gz", "meta.tsv.gz", "--vars", "donor", "-o", "o.parquet", *FAST)
        cli("run", "o.parquet", "meta.tsv.gz", "--vars", "donor", "-o", "o2.parquet", *FAST)
        return "run to and from .parquet"
    text = progress_output()
    assert "iter" in text and "\r" in text, text  # tqdm redraws the bar in place
    return "a progress bar on a terminal"


def without(extra: str) -> str:
    """The error of ``extra``'s feature when ``extra`` is not installed."""
    import harmonypy as hm

    pcs, meta = hm.datasets.load_pbmcs_small()
    if extra == "anndata":
        Path("empty.h5ad").write_bytes(b"")
        return cli("run", "empty.h5ad", "--vars", "donor", "-o", "x.h5ad", expect=2).stderr
    if extra == "parquet":
        hm.datasets.save_example(".", overwrite=True)
        return cli(
            "run", "pcs.tsv.gz", "meta.tsv.gz", "--vars", "donor", "-o", "o.parquet", expect=2
        ).stderr
    try:
        if extra == "plot":
            hm.run_harmony(pcs, meta, "donor", max_iter_harmony=1, verbose=False).plot_convergence()
        elif extra == "faiss":
            hm.compute_lisi(pcs.to_numpy(), meta, ["donor"], neighbors="faiss")
        else:
            hm.compute_lisi(pcs.to_numpy(), meta, ["donor"], neighbors="pynndescent")
    except ImportError as err:
        return str(err)
    raise AssertionError(f"[{extra}]'s feature works without it")


def check_missing(extra: str) -> None:
    """Before ``extra`` is installed its feature says how to install it."""
    if extra == "fast":
        # The fused kernels are a speed-up, not a feature: without numba the torch
        # path runs, and the INFO line says how to get them.
        message = fused_path_message()
        assert "torch operations" in message and "harmonypy[fast]" in message, message
        ok("without [fast]: the torch path runs; the INFO line names harmonypy[fast]")
        return
    if extra == "progress":
        # Progress bars are a nicety, not a failure: one line per iteration instead.
        text = progress_output()
        assert "Harmony: iteration 1/2" in text and "\r" not in text, text
        ok("without [progress]: one line per iteration, no bar")
        return
    hint = f"pip install harmonypy[{extra}]"
    message = without(extra)
    assert hint in message, f"without [{extra}], the error does not say {hint!r}: {message}"
    ok(f"without [{extra}]: the error says {hint}")


def main(argv: list[str]) -> None:
    command, *args = argv
    if command != "contents":  # which runs where harmonypy is not installed
        import warnings

        import harmonypy as hm

        # The checks run few iterations on purpose.
        warnings.simplefilter("ignore", hm.ConvergenceWarning)
    if command == "contents":
        check_contents(*map(Path, args))
    elif command == "core":
        check_installed(*args)
        check_seed_example()
        check_mapping_round_trip()
        check_command_line()
    elif command == "missing":
        for extra in args:
            check_missing(extra)
    elif command == "extra":
        (extra,) = args
        ok(f"with [{extra}]: {feature(extra)}")
    else:
        raise SystemExit(f"unknown command {command!r}; see the docstring")


if __name__ == "__main__":
    main(sys.argv[1:])
