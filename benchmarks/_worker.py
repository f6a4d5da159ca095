"""Run one Harmony implementation once and record what it cost.

This script is started by ``benchmarks/run.py`` in a fresh process (inside
the tool's own virtual environment), so import state, thread pools and the
peak-RSS high-water mark belong to that single run.  It deliberately needs
only NumPy and the standard library: harmonypy 2.1.0 does not depend on
pandas, so the metadata falls back to a dict of arrays when pandas is
missing.

Usage (normally driven by run.py)::

    python _worker.py --tool harmonypy --algorithm harmony1 --mode fixed \
        --pcs X.npy --meta meta.csv --out-npy Z.npy --out-json result.json
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import platform
import resource
import sys
import time
import traceback
from typing import Any

import numpy as np

# Settings of the "fixed" mode: a fixed amount of work for every tool.
FIXED_ITER_HARMONY = 10
FIXED_ITER_CLUSTER = 20
NO_EARLY_STOP = float("-inf")  # every peer's "converged" test is `< eps`


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (1e9 bytes).

    On Linux this reads VmHWM from /proc: ``ru_maxrss`` survives ``exec`` and
    so starts at the parent's RSS (the benchmark driver's), whereas VmHWM
    belongs to the new address space.  Elsewhere ``ru_maxrss`` is used.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    factor = 1 if sys.platform == "darwin" else 1024
    return kb * factor / 1e9


def load_meta(path: str) -> Any:
    """Read the metadata CSV as a DataFrame, or a dict of str arrays without pandas."""
    try:
        import pandas as pd
    except ImportError:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        header, body = rows[0], rows[1:]
        return {name: np.array([r[i] for r in body]) for i, name in enumerate(header)}
    # Every column as a categorical of its string labels: every tool sees the
    # same batch labels, and 10 million cells of labels take tens of MB (as in
    # an AnnData's obs), not the GBs of one Python string per cell.
    return pd.read_csv(path, dtype="category", keep_default_na=False)


def n_cells_of(meta: Any) -> int:
    """Number of rows of a DataFrame or dict-of-arrays metadata table."""
    if hasattr(meta, "shape"):
        return int(meta.shape[0])
    return len(next(iter(meta.values())))


def as_cells_by_pcs(Z: np.ndarray, n_cells: int) -> np.ndarray:
    """Return ``Z`` oriented cells x PCs (tools disagree on the orientation)."""
    Z = np.asarray(Z)
    if Z.shape[0] != n_cells and Z.shape[1] == n_cells:
        Z = Z.T
    return np.ascontiguousarray(Z, dtype=np.float32)


def run_harmonypy(X: np.ndarray, meta: Any, args: argparse.Namespace) -> tuple[np.ndarray, dict]:
    """Call ``harmonypy.run_harmony`` (this repo, 0.2.0 or 2.1.0)."""
    import harmonypy

    kwargs: dict[str, Any] = dict(verbose=False, random_state=args.seed)
    if args.mode == "fixed":
        kwargs.update(
            max_iter_harmony=FIXED_ITER_HARMONY,
            max_iter_kmeans=FIXED_ITER_CLUSTER,
            epsilon_cluster=NO_EARLY_STOP,
            epsilon_harmony=NO_EARLY_STOP,
        )
    params = inspect.signature(harmonypy.run_harmony).parameters
    if args.threads:
        set_torch_threads(args.threads)
        if "ncores" in params:  # harmonypy 2.1.0 (C++ threads)
            kwargs["ncores"] = args.threads
    if "algorithm" in params:
        kwargs["algorithm"] = args.algorithm
    elif args.algorithm != "harmony1" and args.tool_is_ours:
        # Our package before the Harmony2 switch exists: report, don't fail.
        raise NotImplementedError("run_harmony has no `algorithm` parameter yet")

    rss_before_call = peak_rss_gb()  # after importing the tool
    t0 = time.perf_counter()
    ho = harmonypy.run_harmony(X, meta, args.batch_key, **kwargs)
    seconds = time.perf_counter() - t0

    rounds = [int(r) for r in getattr(ho, "kmeans_rounds", [])]
    info = dict(
        seconds=seconds,
        rss_before_call_gb=rss_before_call,
        iterations=len(rounds) if rounds else None,
        kmeans_rounds=rounds,
        version=getattr(harmonypy, "__version__", None),
        module_file=harmonypy.__file__,
    )
    return as_cells_by_pcs(ho.Z_corr, X.shape[0]), info


def set_torch_threads(n: int) -> None:
    """Pin torch's intra-op thread pool, if this environment has torch."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)


def run_harmony_pytorch(
    X: np.ndarray, meta: Any, args: argparse.Namespace
) -> tuple[np.ndarray, dict]:
    """Call ``harmony.harmonize`` from harmony-pytorch."""
    import harmony
    import harmony.harmony as hmod

    # harmonize() returns only the embedding; its convergence tests run once
    # per Harmony iteration and once per clustering round, and are looked up
    # as module globals, so counting their calls gives the iteration counts.
    cluster_calls: list = []
    rounds: list[int] = []  # clustering rounds of each Harmony iteration
    orig_h, orig_c = hmod.is_convergent_harmony, hmod.is_convergent_clustering

    def count_harmony(*a: Any, **k: Any) -> Any:
        rounds.append(len(cluster_calls) - sum(rounds))
        return orig_h(*a, **k)

    def count_clustering(*a: Any, **k: Any) -> Any:
        cluster_calls.append(1)
        return orig_c(*a, **k)

    hmod.is_convergent_harmony = count_harmony
    hmod.is_convergent_clustering = count_clustering

    kwargs: dict[str, Any] = dict(verbose=False, random_state=args.seed)
    if args.mode == "fixed":
        kwargs.update(
            max_iter_harmony=FIXED_ITER_HARMONY,
            max_iter_clustering=FIXED_ITER_CLUSTER,
            tol_harmony=NO_EARLY_STOP,
            tol_clustering=NO_EARLY_STOP,
        )
    if args.threads:  # harmonize() calls torch.set_num_threads(n_jobs) itself
        kwargs["n_jobs"] = args.threads
    rss_before_call = peak_rss_gb()  # after importing the tool
    t0 = time.perf_counter()
    Z = harmony.harmonize(X, meta, batch_key=args.batch_key, **kwargs)
    seconds = time.perf_counter() - t0
    info = dict(
        seconds=seconds,
        rss_before_call_gb=rss_before_call,
        iterations=len(rounds),
        kmeans_rounds=rounds,
        version=getattr(harmony, "__version__", None),
        module_file=harmony.__file__,
    )
    return as_cells_by_pcs(Z, X.shape[0]), info


def _anndata_of(X: np.ndarray, meta: Any) -> Any:
    """An AnnData with ``obsm["X_pca"] = X`` and ``meta`` as ``obs`` (string index)."""
    import anndata
    import pandas as pd

    obs = meta.copy()
    obs.index = pd.Index([f"cell{i}" for i in range(len(obs))])
    adata = anndata.AnnData(obs=obs)
    adata.obsm["X_pca"] = X
    return adata


def _scanpy_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """scanpy's ``harmony_integrate`` arguments for the mode (same for both tools)."""
    kwargs: dict[str, Any] = dict(rng=args.seed)
    if args.mode == "fixed":
        kwargs.update(
            max_iter_harmony=FIXED_ITER_HARMONY,
            max_iter_clustering=FIXED_ITER_CLUSTER,
            tol_harmony=NO_EARLY_STOP,
            tol_clustering=NO_EARLY_STOP,
        )
    if args.algorithm == "harmony1":
        kwargs["flavor"] = "harmony1"
    return kwargs


def run_scanpy(X: np.ndarray, meta: Any, args: argparse.Namespace) -> tuple[np.ndarray, dict]:
    """Call scanpy's native ``sc.pp.harmony_integrate`` (scanpy >= 1.13)."""
    from importlib.metadata import version

    import scanpy as sc
    from scanpy.preprocessing._harmony import core

    # Count clustering rounds and Harmony iterations through the module's
    # convergence tests (looked up at call time), as for harmony-pytorch.
    cluster_calls: list = []
    rounds: list[int] = []
    orig_cluster, orig_harmony = core._is_convergent_clustering, core.Harmony._is_convergent

    def count_clustering(*a: Any, **k: Any) -> Any:
        cluster_calls.append(1)
        return orig_cluster(*a, **k)

    def count_harmony(*a: Any, **k: Any) -> Any:
        rounds.append(len(cluster_calls) - sum(rounds))
        return orig_harmony(*a, **k)

    core._is_convergent_clustering = count_clustering
    core.Harmony._is_convergent = staticmethod(count_harmony)
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    adata = _anndata_of(X, meta)
    rss_before_call = peak_rss_gb()
    t0 = time.perf_counter()
    sc.pp.harmony_integrate(adata, args.batch_key, **_scanpy_kwargs(args))
    seconds = time.perf_counter() - t0
    info = dict(
        seconds=seconds,
        rss_before_call_gb=rss_before_call,
        iterations=len(rounds),
        kmeans_rounds=rounds,
        version=version("scanpy"),
        module_file=sc.__file__,
    )
    return as_cells_by_pcs(adata.obsm["X_pca_harmony"], X.shape[0]), info


def run_harmonypy_scanpy(
    X: np.ndarray, meta: Any, args: argparse.Namespace
) -> tuple[np.ndarray, dict]:
    """Call this package's ``harmonypy.harmony_integrate`` (scanpy's signature)."""
    import harmonypy

    # Patched where harmony_integrate looks the name up (its own module's globals).
    import harmonypy.adapters.scanpy as core

    fitted: list = []
    orig_run = core.run_harmony

    def keep(*a: Any, **k: Any) -> Any:  # the Harmony object, for the iteration counts
        fitted.append(orig_run(*a, **k))
        return fitted[-1]

    core.run_harmony = keep
    kwargs = _scanpy_kwargs(args)
    kwargs.update(dtype=np.dtype(args.dtype or "float64"), verbose=False)
    if args.threads:
        set_torch_threads(args.threads)
        kwargs["ncores"] = args.threads
    adata = _anndata_of(X, meta)
    rss_before_call = peak_rss_gb()
    t0 = time.perf_counter()
    harmonypy.harmony_integrate(adata, args.batch_key, **kwargs)
    seconds = time.perf_counter() - t0
    rounds = [int(r) for r in fitted[-1].kmeans_rounds]
    info = dict(
        seconds=seconds,
        rss_before_call_gb=rss_before_call,
        iterations=len(rounds),
        kmeans_rounds=rounds,
        version=harmonypy.__version__,
        module_file=harmonypy.__file__,
    )
    return as_cells_by_pcs(adata.obsm["X_pca_harmony"], X.shape[0]), info


RUNNERS = {
    "harmonypy": run_harmonypy,
    "harmony-pytorch": run_harmony_pytorch,
    "scanpy": run_scanpy,
    "harmonypy-scanpy": run_harmonypy_scanpy,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line interface of the worker."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tool", choices=sorted(RUNNERS), required=True)
    p.add_argument(
        "--ours",
        dest="tool_is_ours",
        action="store_true",
        help="the harmonypy under test is this repository's",
    )
    p.add_argument("--algorithm", choices=["harmony1", "harmony2"], default="harmony1")
    p.add_argument("--mode", choices=["defaults", "fixed"], default="defaults")
    p.add_argument("--pcs", required=True, help="cells x PCs .npy")
    p.add_argument("--meta", required=True, help="metadata .csv")
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="thread count to impose (default: the tool's own)"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=None,
        help="harmonypy-scanpy only: dtype= of harmony_integrate (default float64)",
    )
    p.add_argument("--out-npy", required=True)
    p.add_argument("--out-json", required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load inputs, run the tool, write the embedding and the measurements."""
    args = parse_args(argv)
    # If the machine runs out of memory, this process is the one to stop (the
    # driver then records the crash), not the driver or the user's shell.
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("1000")
    except OSError:
        pass
    result: dict[str, Any] = dict(
        tool=args.tool,
        algorithm=args.algorithm,
        mode=args.mode,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
    )
    X = np.load(args.pcs)
    meta = load_meta(args.meta)
    result["n_cells"], result["n_pcs"] = X.shape
    assert n_cells_of(meta) == X.shape[0], "metadata and PCs disagree on cells"
    result["rss_after_load_gb"] = peak_rss_gb()
    # Other processes competing for the CPUs distort timings; record the load.
    result["loadavg_before"] = os.getloadavg()[0]
    try:
        Z, info = RUNNERS[args.tool](X, meta, args)
    except NotImplementedError as exc:
        result.update(status="not implemented", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - report any tool failure as data, not a crash
        result.update(
            status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
        )
    else:
        np.save(args.out_npy, Z)
        result.update(info, status="ok")
        if result.get("iterations"):
            result["seconds_per_iteration"] = info["seconds"] / info["iterations"]
    result["rss_peak_gb"] = peak_rss_gb()
    result["loadavg_after"] = os.getloadavg()[0]
    if "torch" in sys.modules:  # thread count actually used by torch tools
        result["torch_threads"] = sys.modules["torch"].get_num_threads()
        result["torch_version"] = sys.modules["torch"].__version__
    with open(args.out_json, "w") as fh:
        json.dump(result, fh, indent=2)
    return 0 if result["status"] in ("ok", "not implemented") else 1


if __name__ == "__main__":
    sys.exit(main())
