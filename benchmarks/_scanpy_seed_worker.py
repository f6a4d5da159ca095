"""Run scanpy's native Harmony once per seed, for ``bench_seed_spread.py --peer scanpy-native``.

Started by ``bench_seed_spread.py`` with the interpreter of
``benchmarks/.venvs/scanpy-native`` (see README.md, "scanpy native"), in a
fresh process without this package on its path. It reads ``pcs.npy``
(cells x PCs) and ``meta.csv`` (the batch column) from ``--folder``, calls
``sc.pp.harmony_integrate(adata, key, rng=seed)`` with scanpy's defaults
(plus ``flavor="harmony1"`` for Harmony 1, as ``_worker.py`` does) and writes
``<algorithm>_<seed>.npy`` (cells x PCs, float64) and ``info.json`` (scanpy's
version, module file, seconds per run) into the same folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scanpy as sc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--algorithm", choices=("harmony1", "harmony2"), required=True)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args(argv)
    X = np.load(args.folder / "pcs.npy")
    obs = pd.read_csv(args.folder / "meta.csv", dtype={args.key: str})
    obs.index = pd.Index([f"cell{i}" for i in range(len(obs))])
    seconds = []
    for seed in range(args.seeds):
        adata = anndata.AnnData(obs=obs.copy())
        adata.obsm["X_pca"] = X.copy()
        kwargs: dict = dict(rng=seed)
        if args.algorithm == "harmony1":
            kwargs["flavor"] = "harmony1"
        t0 = time.perf_counter()
        sc.pp.harmony_integrate(adata, args.key, **kwargs)
        seconds.append(time.perf_counter() - t0)
        out = np.asarray(adata.obsm["X_pca_harmony"], dtype=np.float64)
        np.save(args.folder / f"{args.algorithm}_{seed}.npy", out)
    info = dict(version=version("scanpy"), module_file=sc.__file__, seconds=seconds)
    (args.folder / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
