"""Distributed Harmony on a GPU machine: NCCL groups against a single-process run.

    PYTHONPATH=src python benchmarks/device_distributed.py --cells 1000000 --out results/

For each algorithm: a single-process CUDA run, the same run as a one-process
NCCL group (``run_in_processes``, which takes NCCL when every process has a
GPU: bit-identical results expected) and, with several GPUs, a group of all
of them; then a gloo group of 2 CPU processes on a tenth of the cells.
Prints one JSON line per run and a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from device_check import per_pc_r  # noqa: E402 - beside this script

import harmonypy as hm
from harmonypy._simulate import simulate
from harmonypy.distributed.launch import run_in_processes


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "device_distributed.jsonl", "a")
    rows = []

    def record(row):
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(row, flush=True)

    z, meta = simulate(n_cells=args.cells, n_pcs=50, n_batches=64, seed=0)
    gpus = torch.cuda.device_count()
    for algorithm in ["harmony2", "harmony1"]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        single = hm.run_harmony(z, meta, "batch", device="cuda", algorithm=algorithm, verbose=False)
        torch.cuda.synchronize()
        base = single.result().copy()
        record(
            dict(
                run="single process",
                algorithm=algorithm,
                device="cuda",
                cells=args.cells,
                seconds=round(time.perf_counter() - t, 2),
                iterations=single.n_iter,
            )
        )
        for nproc in sorted({1, gpus}):
            t = time.perf_counter()
            group = run_in_processes(
                z, meta, "batch", nproc, device="cuda", algorithm=algorithm, verbose=False
            )
            record(
                dict(
                    run=f"{nproc} process(es), {group.backend}",
                    algorithm=algorithm,
                    device="cuda",
                    cells=args.cells,
                    seconds=round(time.perf_counter() - t, 2),
                    iterations=group.n_iter,
                    identical=bool(np.array_equal(group.corrected, base)),
                    r_vs_single=per_pc_r(group.corrected, base),
                    bytes_per_process=group.bytes_per_process,
                )
            )
    small = args.cells // 10
    zs, ms = z[:small], meta.iloc[:small]
    cpu = hm.run_harmony(zs, ms, "batch", device="cpu", verbose=False)
    group = run_in_processes(zs, ms, "batch", 2, device="cpu", verbose=False)
    record(
        dict(
            run="2 processes, gloo",
            algorithm="harmony1",
            device="cpu",
            cells=small,
            iterations=group.n_iter,
            r_vs_single=per_pc_r(group.corrected, cpu.result()),
            bytes_per_process=group.bytes_per_process,
        )
    )
    print("\n| run | algorithm | device | cells | seconds | iterations | identical | r vs single |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['algorithm']} | {r['device']} | {r['cells']:,} | "
            f"{r.get('seconds', '-')} | {r['iterations']} | {r.get('identical', '-')} | "
            f"{r.get('r_vs_single', '-')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
