"""How much does Harmony's result move with the seed? Seed-to-seed spread per k-means start.

For each data set, algorithm and ``kmeans_init``, Harmony runs with seeds
0..S-1; every pair of runs is compared by the minimum over PCs of the per-PC
Pearson r of the corrected embeddings (median and worst pair), and each run
against the R package's output where one is bundled (pbmc_3500: R harmony
1.2.4 for Harmony 1, R harmony 2.0.4 for Harmony2). Data: the three bundled
real sets and one simulation with overlapping cell types (``hard5000``).

    python benchmarks/bench_seed_spread.py --out benchmarks/results/seed_spread.md

``--peer scanpy-native`` computes the same rows for scanpy's native Harmony
(``sc.pp.harmony_integrate(adata, key, rng=seed)``, scanpy's defaults, in the
virtualenv ``benchmarks/.venvs/scanpy-native`` that ``run.py`` builds; see
README.md, "scanpy native"), run by ``_scanpy_seed_worker.py`` in a subprocess:

    python benchmarks/bench_seed_spread.py --peer scanpy-native
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from device_check import per_pc_r as min_per_pc_r  # noqa: E402 - beside this script

import harmonypy as hm  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SCANPY_PYTHON = REPO / "benchmarks" / ".venvs" / "scanpy-native" / "bin" / "python"


def load(name: str):
    """(cells x PCs, metadata, batch column, {algorithm: R's output})."""
    if name == "pbmc_3500":
        pcs, meta, r1 = hm.datasets.load_pbmc_3500()
        r2 = hm.datasets.load_pbmc_3500_harmony2_reference()
        return pcs.to_numpy(), meta, "donor", {"harmony1": r1.to_numpy(), "harmony2": r2.to_numpy()}
    if name == "pbmcs_small":
        pcs, meta = hm.datasets.load_pbmcs_small()
        return pcs.to_numpy(), meta, "donor", {}
    if name == "cell_lines_small":
        pcs = pd.read_csv(SHARED / "cell_lines_small_pcs.tsv.gz", sep="\t")
        meta = pd.read_csv(SHARED / "cell_lines_small_meta.tsv.gz", sep="\t")
        return pcs.select_dtypes("number").to_numpy(), meta, "dataset", {}
    if name.startswith("hard"):
        X, meta = hm.datasets.simulate(
            int(name[4:]), 30, 5, n_cell_types=12, type_spread=2.0, seed=1
        )
        return X, meta, "batch", {}
    raise ValueError(f"unknown data set {name!r}")


def spread(name: str, algorithm: str, kmeans_init: str, seeds: int) -> dict:
    X, meta, key, references = load(name)
    outputs = []
    t0 = time.perf_counter()
    for seed in range(seeds):
        ho = hm.run_harmony(
            X,
            meta,
            key,
            algorithm=algorithm,
            kmeans_init=kmeans_init,
            random_state=seed,
            verbose=False,
            ncores=1,
        )
        outputs.append(ho.Z_corr.T.astype(np.float64))
    seconds = (time.perf_counter() - t0) / seeds
    pairs = [min_per_pc_r(a, b) for a, b in itertools.combinations(outputs, 2)]
    to_r = (
        [min_per_pc_r(o, references[algorithm]) for o in outputs] if algorithm in references else []
    )
    return dict(
        data=name,
        algorithm=algorithm,
        kmeans_init=kmeans_init,
        median_pair=float(np.median(pairs)),
        worst_pair=min(pairs),
        median_to_R=float(np.median(to_r)) if to_r else None,
        worst_to_R=min(to_r) if to_r else None,
        seconds=seconds,
    )


def peer_spread(name: str, algorithm: str, seeds: int) -> dict:
    """The same row for scanpy's native Harmony, run in its own virtualenv."""
    if not SCANPY_PYTHON.exists():
        raise SystemExit(
            f"--peer scanpy-native needs {SCANPY_PYTHON}; build it as benchmarks/README.md, "
            '"scanpy native", describes'
        )
    X, meta, key, references = load(name)
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "pcs.npy", np.ascontiguousarray(X, dtype=np.float64))
        meta[[key]].astype(str).to_csv(Path(folder) / "meta.csv", index=False)
        # No PYTHONPATH: our src/ must not shadow anything in the peer's venv.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONNOUSERSITE"] = "1"
        worker = REPO / "benchmarks" / "_scanpy_seed_worker.py"
        command = [str(SCANPY_PYTHON), str(worker), "--folder", folder, "--key", key]
        command += ["--algorithm", algorithm, "--seeds", str(seeds)]
        subprocess.run(command, check=True, env=env)
        outputs = [np.load(Path(folder) / f"{algorithm}_{s}.npy") for s in range(seeds)]
        info = json.loads((Path(folder) / "info.json").read_text())
    pairs = [min_per_pc_r(a, b) for a, b in itertools.combinations(outputs, 2)]
    to_r = (
        [min_per_pc_r(o, references[algorithm]) for o in outputs] if algorithm in references else []
    )
    return dict(
        data=name,
        algorithm=algorithm,
        kmeans_init="scanpy-native",
        median_pair=float(np.median(pairs)),
        worst_pair=min(pairs),
        median_to_R=float(np.median(to_r)) if to_r else None,
        worst_to_R=min(to_r) if to_r else None,
        seconds=float(np.mean(info["seconds"])),
        scanpy=info["version"],
    )


def table(rows: list[dict], seeds: int) -> str:
    def f(v):
        return "–" if v is None else f"{v:.4f}"

    lines = [
        "| data | algorithm | kmeans_init | median pair | worst pair | median to R "
        "| worst to R | s per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['algorithm']} | {r['kmeans_init']} | {f(r['median_pair'])} | "
            f"{f(r['worst_pair'])} | {f(r['median_to_R'])} | {f(r['worst_to_R'])} | "
            f"{r['seconds']:.2f} |"
        )
    return (
        f"Seeds 0..{seeds - 1}: min per-PC r over the {seeds * (seeds - 1) // 2} pairs "
        f"(median, worst), and of each run against R's output.\n\n" + "\n".join(lines) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="pbmc_3500,pbmcs_small,cell_lines_small,hard5000")
    parser.add_argument("--algorithms", default="harmony1,harmony2")
    parser.add_argument("--inits", default="r,greedy")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--peer", choices=("scanpy-native",), help="rows for this peer instead of ours"
    )
    args = parser.parse_args(argv)
    if args.peer:
        rows = []
        for name, algorithm in itertools.product(args.data.split(","), args.algorithms.split(",")):
            rows.append(peer_spread(name, algorithm, args.seeds))
            print(rows[-1], file=sys.stderr, flush=True)
        print(table(rows, args.seeds))
        return 0
    rows = []
    for name, algorithm, init in itertools.product(
        args.data.split(","), args.algorithms.split(","), args.inits.split(",")
    ):
        rows.append(spread(name, algorithm, init, args.seeds))
        print(rows[-1], file=sys.stderr, flush=True)
    text = table(rows, args.seeds)
    print(text)
    if args.out:
        args.out.write_text(
            "# Seed-to-seed spread by k-means start\n\n"
            "`python benchmarks/bench_seed_spread.py`\n\n" + text
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
