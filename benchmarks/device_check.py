"""Harmony on a GPU: time, memory, iterations and agreement with float64 and the CPU.

Run on a machine with CUDA (this repository's checkout, no install needed):

    PYTHONPATH=src python benchmarks/device_check.py --sizes 1000000,10000000 --out results/

For each size, simulated cells x 50 PCs with 64 batches (the atlas benchmark's
data) are integrated on the GPU with both algorithms in float32, Harmony2 also
in float64; the float32 results are compared with float64's (per-PC r), and,
at the sizes given by ``--cpu-sizes``, with a CPU run on the same data. Each
row records the objective after every iteration, so a run that does not
converge shows why. Rows are appended to ``device_check.jsonl`` as they finish
and a table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import harmonypy as hm
from harmonypy._simulate import simulate


def per_pc_r(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean(0)
    b = b - b.mean(0)
    num = (a * b).sum(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return float((num / den).min())


def one_run(z, meta, *, device, algorithm, dtype, seed=0):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ho = hm.run_harmony(
        z,
        meta,
        "batch",
        device=device,
        algorithm=algorithm,
        dtype=dtype,
        random_state=seed,
        verbose=False,
        check_memory=False,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = dict(
        device=device,
        algorithm=algorithm,
        dtype=dtype,
        cells=len(meta),
        seconds=round(seconds, 3),
        iterations=int(ho.n_iter),
        converged=bool(ho.converged),
        kmeans_rounds=list(map(int, ho.kmeans_rounds)),
        objective=[float(x) for x in ho.objective_harmony],
    )
    if device.startswith("cuda"):
        row["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return ho.result(dtype=np.float32).copy(), row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--cpu-sizes", default="1000000")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n-batches", type=int, default=64)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "device_check.jsonl", "a")
    rows = []
    info = dict(
        torch=torch.__version__,
        cuda=torch.version.cuda,
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        cpu_threads=torch.get_num_threads(),
    )
    print(json.dumps(info), flush=True)
    log.write(json.dumps(dict(info=info)) + "\n")

    def record(row):
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print({k: v for k, v in row.items() if k != "objective"}, flush=True)

    cpu_sizes = {int(s) for s in args.cpu_sizes.split(",") if s}
    # A tiny run first: CUDA's context and kernels load outside the timings.
    z0, meta0 = simulate(n_cells=5000, n_pcs=50, n_batches=4, seed=1)
    one_run(z0, meta0, device=args.device, algorithm="harmony2", dtype="float32")
    for size in [int(s) for s in args.sizes.split(",") if s]:
        t = time.perf_counter()
        z, meta = simulate(n_cells=size, n_pcs=50, n_batches=args.n_batches, seed=0)
        z = np.ascontiguousarray(z, dtype=np.float32)
        print(f"simulated {size} cells in {time.perf_counter() - t:.1f} s", flush=True)
        for algorithm in ["harmony2", "harmony1"]:
            f32, row = one_run(z, meta, device=args.device, algorithm=algorithm, dtype="float32")
            if algorithm == "harmony2":
                f64, row64 = one_run(
                    z, meta, device=args.device, algorithm=algorithm, dtype="float64"
                )
                row["r_vs_float64"] = row64["r_vs_float64"] = per_pc_r(f32, f64)
                record(row)
                record(row64)
                del f64
            else:
                record(row)
            if size in cpu_sizes:
                cpu, crow = one_run(z, meta, device="cpu", algorithm=algorithm, dtype="float32")
                crow["r_vs_gpu_float32"] = per_pc_r(f32, cpu)
                record(crow)
                del cpu
            del f32
        del z, meta
    print(
        "\n| device | algorithm | dtype | cells | seconds | iterations | converged | "
        "GPU peak GB | r vs float64 | r vs GPU f32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['device']} | {r['algorithm']} | {r['dtype']} | {r['cells']:,} | "
            f"{r['seconds']:.2f} | {r['iterations']} | {r['converged']} | "
            f"{r.get('gpu_peak_gb', '-')} | {r.get('r_vs_float64', '-')} | "
            f"{r.get('r_vs_gpu_float32', '-')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
