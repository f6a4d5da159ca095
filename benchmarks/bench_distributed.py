"""Distributed Harmony on one machine: 1, 2, 4 processes against one process.

    python benchmarks/bench_distributed.py --cells 1000000 --nproc 1,2,4

Simulated cells x 50 PCs, 64 batches. ``1 process`` is a plain run_harmony
with all the CPUs as threads; ``P processes`` is ``run_in_processes`` (what
``harmonypy run --nproc P`` runs: a gloo group on loopback) with the CPUs
divided among them. ``seconds`` is rank 0's run_harmony call, ``with start``
adds spawning the processes and copying the input to shared memory. The
bytes each process handed to all-reduce are compared with the formula of
docs/distributed.md (``harmonypy.engine.reduce.communicated_bytes``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from device_check import per_pc_r  # noqa: E402 - beside this script

import harmonypy as hm
from harmonypy._simulate import simulate
from harmonypy.distributed.launch import run_in_processes
from harmonypy.engine.clustering import n_blocks_of
from harmonypy.engine.reduce import communicated_bytes


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--nproc", default="1,2,4")
    parser.add_argument("--algorithms", default="harmony2,harmony1")
    args = parser.parse_args(argv)
    cpus = os.cpu_count() or 1
    z, meta = simulate(n_cells=args.cells, n_pcs=50, n_batches=64, seed=0)
    B, K, d = 64, 100, 50
    print(f"{args.cells:,} cells x {d} PCs, {B} batches, K = {K}; {cpus} CPUs")
    print(
        "| algorithm | processes x threads | seconds | with start | vs 1 process | "
        "iterations | rounds | bytes/process | expected bytes | bytes/round | min per-PC r |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for algorithm in args.algorithms.split(","):
        base = None
        for nproc in [int(n) for n in args.nproc.split(",")]:
            threads = max(1, cpus // nproc)
            t = time.perf_counter()
            if nproc == 1:
                ho = hm.run_harmony(
                    z, meta, "batch", algorithm=algorithm, ncores=threads, verbose=False
                )
                seconds = start = time.perf_counter() - t
                corrected, n_iter, rounds, sent = ho.result(), ho.n_iter, ho.kmeans_rounds, 0
            else:
                run = run_in_processes(
                    z, meta, "batch", nproc, algorithm=algorithm, ncores=threads, verbose=False
                )
                start, seconds = time.perf_counter() - t, run.seconds
                corrected, n_iter, rounds = run.corrected, run.n_iter, run.kmeans_rounds
                sent = run.bytes_per_process
            n_rounds = sum(rounds)
            expect = (
                communicated_bytes(
                    rounds=n_rounds,
                    iterations=n_iter,
                    n_blocks=n_blocks_of(args.cells, 0.05),
                    n_levels=B,
                    n_clusters=K,
                    n_features=d,
                    algorithm=algorithm,
                )
                if nproc > 1
                else 0
            )
            if base is None:
                base = (seconds, corrected.copy())
            print(
                f"| {algorithm} | {nproc} x {threads} | {seconds:.1f} | {start:.1f} | "
                f"{seconds / base[0]:.2f}x | {n_iter} | {n_rounds} | {sent:,} | {expect:,} | "
                f"{sent // max(n_rounds, 1):,} | {per_pc_r(corrected, base[1]):.5f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
