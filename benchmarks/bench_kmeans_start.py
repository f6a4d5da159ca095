"""Does the sampled k-means start change Harmony's result at atlas size?

Above ``sample_size`` cells (20,000) the initial k-means (its k-means++
seedings and Lloyd iterations) runs on a random sample of the cells
(``harmonypy._kmeans.kmeans_centroids``); Harmony's own clustering rounds then
refine the centroids on every cell. This script runs Harmony twice on the same
simulated input, with the default sampled start and with the start on all
cells, for each algorithm, and prints a table: time of the start and of the
run, per-PC Pearson r between the two corrected embeddings, and iLISI/cLISI
of both (on one random subsample of cells, the same for both).

    python benchmarks/bench_kmeans_start.py --cells 1000000 --out benchmarks/results/kmeans_start.md
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import harmonypy as hm  # noqa: E402
import harmonypy._harmony as core  # noqa: E402
from harmonypy import _kmeans  # noqa: E402
from harmonypy._simulate import simulate  # noqa: E402


def run(X, meta, algorithm: str, full_start: bool) -> tuple[np.ndarray, float, float]:
    """Corrected embedding, seconds of the k-means start, seconds of the whole run."""
    timing = {}
    original = _kmeans.kmeans_centroids

    def timed(x, k, generator, **kwargs):
        if full_start:
            kwargs["sample_size"] = x.shape[0]
        t0 = time.perf_counter()
        out = original(x, k, generator, **kwargs)
        timing["start"] = time.perf_counter() - t0
        return out

    core.kmeans_centroids = timed
    try:
        t0 = time.perf_counter()
        ho = hm.run_harmony(X, meta, "batch", algorithm=algorithm, verbose=False)
        total = time.perf_counter() - t0
    finally:
        core.kmeans_centroids = original
    return ho.result(), timing["start"], total


def per_pc_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--lisi-cells", type=int, default=20_000)
    parser.add_argument("--algorithms", default="harmony1,harmony2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    X, meta = simulate(args.cells, 50, args.batches, 10, seed=0)
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(args.cells, min(args.cells, args.lisi_cells), replace=False))
    sub_meta = meta.iloc[subset].reset_index(drop=True)
    rows = []
    for algorithm in args.algorithms.split(","):
        outputs = {}
        for full in (False, True):
            Z, start, total = run(X, meta, algorithm, full)
            scores = hm.compute_lisi(Z[subset], sub_meta, ["batch", "cell_type"])
            outputs[full] = Z
            rows.append(dict(algorithm=algorithm,
                             start="all cells" if full else "sample (default)",
                             start_s=start, total_s=total,
                             ilisi=float(np.median(scores[:, 0])),
                             clisi=float(np.median(scores[:, 1]))))
            print(f"{algorithm} {rows[-1]['start']}: start {start:.1f} s, run {total:.1f} s",
                  file=sys.stderr, flush=True)
        r = per_pc_r(outputs[False].astype(np.float64), outputs[True].astype(np.float64))
        rows[-1]["min_r"] = rows[-2]["min_r"] = float(r.min())
        rows[-1]["median_r"] = rows[-2]["median_r"] = float(np.median(r))

    lines = [
        f"# Sampled k-means start against the start on all cells ({args.cells:,} cells)", "",
        f"Simulated input: {args.cells:,} cells x 50 PCs, {args.batches} batches, 10 cell "
        f"types, seed 0; `python benchmarks/bench_kmeans_start.py --cells {args.cells}`. "
        f"Sample: {_kmeans_sample_size()} cells. Per-PC r compares the two corrected "
        f"embeddings of one algorithm; iLISI/cLISI are medians over the same "
        f"{len(subset):,} random cells.", "",
        "| algorithm | k-means start | start s | run s | iLISI | cLISI | min per-PC r | median per-PC r |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['algorithm']} | {row['start']} | {row['start_s']:.1f} | "
                     f"{row['total_s']:.1f} | {row['ilisi']:.3f} | {row['clisi']:.3f} | "
                     f"{row['min_r']:.4f} | {row['median_r']:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def _kmeans_sample_size() -> str:
    import inspect

    return f"{inspect.signature(_kmeans.kmeans_centroids).parameters['sample_size'].default:,}"


if __name__ == "__main__":
    sys.exit(main())
