"""Run symphonypy's ``map_embedding`` on a reference made by this package.

Started by ``benchmarks/compare_symphonypy.py`` and ``benchmarks/bench_mapping.py``
with the interpreter of ``benchmarks/.venvs/symphonypy-0.2.4`` (symphonypy
imports a ``harmonypy`` of its own, so it cannot share our environment). The
reference is not re-integrated: ``symphonypy._utils.run_harmony`` is replaced
by a function returning a stand-in of a harmonypy 0.0.x object (``Z_corr``
d x N, ``R`` K x N, ``K``, ``sigma``), so ``pp.harmony_integrate`` stores our
run's ``Nr``, ``C``, ``R`` and ``sigma`` exactly as it would its own.

symphonypy maps from genes: ``map_embedding`` scales the query's genes by the
reference's ``var["mean"]``/``var["std"]``, clips at +-10 and multiplies by
``varm["PCs"]``. The query PCs are handed over as d "genes" with mean 0,
std ``s`` and loadings ``s * I`` for a power of two ``s`` at least a tenth of
the largest |PC|: dividing and multiplying by a power of two is exact and no
value reaches the clip, so symphonypy maps exactly our PCs.

Inputs (``--inputs`` folder, written by the caller): ``ref_pcs.npy`` (N x d,
uncorrected), ``Z_corr.npy`` (d x N), ``R.npy`` (K x N), ``sigma.npy`` (K),
``query.npy`` (N_q x d), ``query_meta.csv``. Outputs (``--out`` folder):
``Z_corr.npy`` (N_q x d, float64), ``R.npy`` (N_q x K), ``confidence_*.npy`` and
``result.json`` (seconds of ``map_embedding`` and ``per_cell_confidence``,
peak RSS, versions).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_gb() -> float:
    """VmHWM of this process in GB (1e9 bytes); 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


class HarmonyStandIn:
    """What symphonypy reads of a harmonypy 0.0.x ``Harmony`` object."""

    def __init__(self, z_corr, assignments, sigma):
        self.Z_corr = z_corr  # d x N
        self.R = assignments  # K x N
        self.K = assignments.shape[0]
        self.sigma = sigma
        self.objective_harmony = []  # symphonypy's convergence check: unknown


def gene_space(pcs: np.ndarray, names):
    """An AnnData whose d "genes" are the PCs (see the module docstring)."""
    import anndata
    import pandas as pd

    adata = anndata.AnnData(
        np.ascontiguousarray(pcs, dtype=np.float64), var=pd.DataFrame(index=names)
    )
    adata.uns["log1p"] = {"base": None}
    return adata


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--key", default="", help="comma-separated query batch columns; '' = none")
    p.add_argument(
        "--confidence-cells",
        type=int,
        default=0,
        help="also run per_cell_confidence on this many query cells",
    )
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)

    from importlib.metadata import version

    import pandas as pd
    import symphonypy as sp
    import symphonypy._utils as sp_utils

    inputs, out = Path(args.inputs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref_pcs = np.load(inputs / "ref_pcs.npy")
    z_corr = np.load(inputs / "Z_corr.npy")
    assignments = np.load(inputs / "R.npy")
    sigma = np.load(inputs / "sigma.npy")
    query = np.load(inputs / "query.npy")
    meta = pd.read_csv(inputs / "query_meta.csv", dtype=str, keep_default_na=False)
    d = ref_pcs.shape[1]
    names = [f"PC{i + 1}" for i in range(d)]
    largest = max(float(np.abs(query).max()), float(np.abs(ref_pcs).max()), 1e-300)
    scale = 2.0 ** math.ceil(math.log2(largest / 8))  # |pc| / scale <= 8 < the clip of 10

    adata_ref = gene_space(ref_pcs, names)
    adata_ref.var["mean"] = 0.0
    adata_ref.var["std"] = scale
    adata_ref.varm["PCs"] = np.eye(d) * scale
    adata_ref.obsm["X_pca"] = np.ascontiguousarray(ref_pcs, dtype=np.float64)
    adata_ref.obs["batch"] = "ref"
    stand_in = HarmonyStandIn(z_corr, assignments, sigma)
    sp_utils.run_harmony = lambda *a, **k: stand_in
    sp.pp.harmony_integrate(adata_ref, "batch")

    adata_query = gene_space(query, names)
    adata_query.obs = meta.set_index(adata_query.obs_names)
    keys = [k for k in args.key.split(",") if k]
    key = None if not keys else (keys[0] if len(keys) == 1 else keys)
    rss_before = peak_rss_gb()
    t0 = time.perf_counter()
    sp.tl.map_embedding(adata_query, adata_ref, key=key, use_genes_column=None)
    seconds = time.perf_counter() - t0
    result = {
        "map_embedding_seconds": seconds,
        "rss_before_call_gb": rss_before,
        "rss_peak_gb": peak_rss_gb(),
        "n_query": int(query.shape[0]),
        "scale": scale,
        "symphonypy": version("symphonypy"),
        "harmonypy_in_venv": version("harmonypy"),
        "python": sys.version.split()[0],
    }
    projected = adata_query.obsm["X_pca_reference"]
    result["projection_exact"] = bool(np.array_equal(projected, query.astype(np.float64)))
    np.save(out / "Z_corr.npy", np.asarray(adata_query.obsm["X_pca_harmony"], dtype=np.float64))
    np.save(out / "R.npy", np.asarray(adata_query.obsm["X_pca_harmony_symphony_R"]))
    if args.confidence_cells:
        subset = adata_query[: args.confidence_cells].copy()
        for basis in ("X_pca", "X_pca_harmony"):  # R's Z_orig = TRUE / symphonypy's default
            adata_ref.uns["harmony"].pop("inv_cluster_covs", None)
            adata_ref.uns["harmony"].pop("cluster_centers", None)
            t0 = time.perf_counter()
            sp.tl.per_cell_confidence(subset, adata_ref, ref_basis_adjusted=basis)
            result[f"confidence_{basis}_seconds"] = time.perf_counter() - t0
            np.save(
                out / f"confidence_{basis}.npy",
                subset.obs["symphony_per_cell_dist"].to_numpy(dtype=np.float64),
            )
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
