"""What the k-means start costs, and what it changes, at atlas size.

For each algorithm and ``kmeans_init`` ('r': the R package's start; 'greedy':
the default, ten complete runs from greedy k-means++ seedings), Harmony runs on
the same simulated input; the table gives the start's seconds (the k-means on
its 20,000-cell sample), the whole run's seconds and the start's share of it,
iLISI/cLISI (medians over one random subsample of cells), and the per-PC r of
each start's result against the 'r' start's.

    python benchmarks/bench_kmeans_start.py --cells 100000,1000000 \
        --out benchmarks/results/kmeans_start.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from device_check import per_pc_r  # noqa: E402 - beside this script (minimum over PCs)

import harmonypy as hm  # noqa: E402
import harmonypy.engine.harmony as core  # noqa: E402
from harmonypy._simulate import simulate  # noqa: E402
from harmonypy.engine.kmeans import SAMPLE_SIZE  # noqa: E402


def run(X, meta, algorithm: str, kmeans_init: str) -> tuple[np.ndarray, float, float]:
    """Corrected embedding, seconds of the k-means start, seconds of the whole run."""
    timing = {}
    original = core.kmeans_centroids

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        timing["start"] = time.perf_counter() - t0
        return out

    core.kmeans_centroids = timed
    try:
        t0 = time.perf_counter()
        ho = hm.run_harmony(
            X, meta, "batch", algorithm=algorithm, kmeans_init=kmeans_init, verbose=False
        )
        total = time.perf_counter() - t0
    finally:
        core.kmeans_centroids = original
    return ho.result(), timing["start"], total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="100000,1000000")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--lisi-cells", type=int, default=20_000)
    parser.add_argument("--algorithms", default="harmony1,harmony2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    rows = []
    for n in map(int, args.cells.split(",")):
        X, meta = simulate(n, 50, args.batches, 10, seed=0)
        subset = np.sort(np.random.default_rng(0).choice(n, min(n, args.lisi_cells), replace=False))
        sub_meta = meta.iloc[subset].reset_index(drop=True)
        for algorithm in args.algorithms.split(","):
            outputs = {}
            for init in ("r", "greedy"):
                Z, start, total = run(X, meta, algorithm, init)
                outputs[init] = Z.astype(np.float64)
                scores = hm.compute_lisi(Z[subset], sub_meta, ["batch", "cell_type"])
                rows.append(
                    dict(
                        cells=n,
                        algorithm=algorithm,
                        init=init,
                        start=start,
                        total=total,
                        ilisi=float(np.median(scores[:, 0])),
                        clisi=float(np.median(scores[:, 1])),
                        min_r=per_pc_r(outputs["r"], outputs[init]),
                    )
                )
                print(rows[-1], file=sys.stderr, flush=True)

    lines = [
        "# The k-means start's cost",
        "",
        f"Simulated input: cells x 50 PCs, {args.batches} batches, 10 cell types, seed 0; "
        f"`python benchmarks/bench_kmeans_start.py --cells {args.cells}`. The start runs on "
        f"{SAMPLE_SIZE:,} sampled cells. iLISI/cLISI: medians over the same random "
        f"{args.lisi_cells:,} cells; min per-PC r against the 'r' start's result.",
        "",
        "| cells | algorithm | kmeans_init | start s | run s | start share | iLISI | cLISI "
        "| min per-PC r vs 'r' |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['cells']:,} | {row['algorithm']} | {row['init']} | {row['start']:.2f} | "
            f"{row['total']:.2f} | {row['start'] / row['total']:.0%} | {row['ilisi']:.3f} | "
            f"{row['clisi']:.3f} | {row['min_r']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
