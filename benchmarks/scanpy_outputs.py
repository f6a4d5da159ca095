"""Store scanpy's native Harmony outputs on the real data sets, as test data.

Run this inside the scanpy peer environment (see benchmarks/README.md,
"scanpy native"), not in this package's: scanpy 1.13's
``sc.pp.harmony_integrate`` is its own NumPy implementation and does not import
harmonypy. It reads the data files directly (no harmonypy import) and writes

* ``tests/data/scanpy_native.npz``: one (n_cells, n_pcs) array per run (float32
  copies of scanpy's float64 output), named ``<data set>__<flavor>``;
* ``tests/data/scanpy_native.json``: scanpy's version and source commit, the
  Python and NumPy versions, the arguments of every run, and the signature of
  ``harmony_integrate`` (name, kind, default of each parameter) as read from
  scanpy's source, so that ``tests/adapters/test_scanpy.py`` can check this package's
  signature against it where scanpy 1.13 is not installed.

Usage::

    benchmarks/.venvs/scanpy-native/bin/python benchmarks/scanpy_outputs.py \
        --commit fabadb9412c0d1cd9df9d9c2e95ac266d564ee18
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "src" / "harmonypy" / "data"
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "tests" / "data"

#: data set -> (pcs file, meta file, batch key)
DATA_SETS = {
    "pbmc_3500": (BUNDLED / "pbmc_3500_pcs.tsv.gz", BUNDLED / "pbmc_3500_meta.tsv.gz", "donor"),
    "pbmcs_small": (
        BUNDLED / "pbmcs_small_pcs.tsv.gz",
        BUNDLED / "pbmcs_small_meta.tsv.gz",
        "donor",
    ),
    "cell_lines_small": (
        SHARED / "cell_lines_small_pcs.tsv.gz",
        SHARED / "cell_lines_small_meta.tsv.gz",
        "dataset",
    ),
}
FLAVORS = ("harmony2", "harmony1")
SEED = 0


def signature_from_source(function) -> list[dict]:
    """Name, kind and default (as source text) of each parameter, read with ``ast``."""
    tree = ast.parse(inspect.getsource(function))
    node = tree.body[0]
    assert isinstance(node, ast.FunctionDef)
    args = node.args
    params = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(positional, defaults, strict=True):
        params.append(
            dict(
                name=arg.arg,
                kind="POSITIONAL_OR_KEYWORD",
                default=None if default is None else ast.unparse(default),
            )
        )
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        params.append(
            dict(
                name=arg.arg,
                kind="KEYWORD_ONLY",
                default=None if default is None else ast.unparse(default),
            )
        )
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--commit", required=True, help="the scverse/scanpy commit the environment was built from"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    from importlib.metadata import version

    import anndata as ad
    import scanpy as sc

    arrays: dict[str, np.ndarray] = {}
    runs = []
    for name, (pcs_path, meta_path, key) in DATA_SETS.items():
        pcs = pd.read_csv(pcs_path, sep="\t").to_numpy(dtype=np.float64)
        meta = pd.read_csv(meta_path, sep="\t")
        for flavor in FLAVORS:
            adata = ad.AnnData(
                obs=meta.astype({key: str}).set_index(pd.Index([str(i) for i in range(len(meta))]))
            )
            adata.obsm["X_pca"] = pcs.copy()
            kwargs = dict(flavor=flavor, rng=SEED)
            start = time.perf_counter()
            sc.pp.harmony_integrate(adata, key, **kwargs)
            seconds = time.perf_counter() - start
            # float32 halves the file; the tests compare correlations, not bits.
            arrays[f"{name}__{flavor}"] = np.asarray(adata.obsm["X_pca_harmony"], np.float32)
            runs.append(
                dict(
                    data_set=name,
                    key=key,
                    n_cells=int(pcs.shape[0]),
                    n_pcs=int(pcs.shape[1]),
                    kwargs=kwargs,
                    dtype=str(adata.obsm["X_pca_harmony"].dtype),
                    seconds=round(seconds, 3),
                )
            )
            print(f"{name} {flavor}: {seconds:.2f} s", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "scanpy_native.npz", **arrays)
    record = dict(
        scanpy_version=version("scanpy"),
        scanpy_commit=args.commit,
        python=platform.python_version(),
        numpy=np.__version__,
        scikit_learn=version("scikit-learn"),
        call="sc.pp.harmony_integrate(adata, key, flavor=flavor, rng=0)",
        runs=runs,
        signature=signature_from_source(sc.pp.harmony_integrate),
    )
    (args.out / "scanpy_native.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
