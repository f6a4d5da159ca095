"""The engine against this machine's floor: time per clustering round and per correction.

usage: python benchmarks/bench_floor.py [--cells 200000] [--dtypes float32,float64]
           [--paths eager,fused] [--threads 2] [--repeats 7] [--out FILE [--force]]

Measures, in one process:

* the memory bandwidth (``torch.add`` of two 256 MB arrays into a third:
  3 x 256 MB moved) and the GEMM rate (a 4096 x d piece times d x K, the shape
  of one piece of a round) in each dtype, with the engine's thread count;
* the floor of one Harmony2 clustering round over N cells, d PCs, K clusters:
  max(bytes / bandwidth, flops / GEMM rate), with bytes = N d s (read Z) +
  2 N K s (read and write R) and flops = 2 N K d (the distances); and of one
  correction: bytes = 2 N d s (read and write Z) + N K s (read R), flops =
  4 N K d (the level sums of R z, and the correction R W);
* the engine's time per round and per correction: after one iteration (so
  the start, k-means and first assignment are done), ``Harmony.update_R`` and
  ``Harmony.moe_correct_ridge`` are timed alone, one run per path held at
  once (``eager``: torch operations; ``fused``: the numba kernels,
  ``HARMONYPY_FUSED=always``), round-robin, ``--repeats`` times, median.
  Timing the steps themselves rather than differences of whole runs (as
  ``../shared/tools/floor.py`` does) keeps the run-to-run noise of a shared
  machine out of the difference;
* the fused path's first-call cost: a 3,000-cell run in a fresh process with
  each path (kernels compiled and cached beforehand), median of 3.

The default size runs in about 3 minutes on 2 idle cores;
``--cells 1000000`` is the full measurement (about 15 minutes). The load
average is printed before and after: timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd
import torch

import harmonypy as hm

D, K = 50, 100


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--paths", default="eager,fused")
    parser.add_argument("--threads", type=int, default=2, help="the engine's ncores")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", help="also write the report (markdown) here")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)
    if args.out and os.path.exists(args.out) and not args.force:
        parser.error(f"--out {args.out} exists; pass --force to overwrite it")
    if args.cells < 16 * args.batches:
        parser.error(f"--cells must be at least 16 per batch, got {args.cells}")
    return args


def best_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_rates(dtype: str, threads: int) -> tuple[float, float]:
    """(bandwidth in bytes/s, GEMM rate in flop/s) for ``dtype`` on ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tdt = getattr(torch, dtype)
        size = torch.empty((), dtype=tdt).element_size()
        a = torch.ones(2**28 // size, dtype=tdt)
        b, c = torch.ones_like(a), torch.empty_like(a)
        bandwidth = 3 * a.numel() * size / best_time(lambda: torch.add(a, b, out=c))
        a = b = c = None  # 768 MB back before the GEMM
        z, y = torch.randn(4096, D, dtype=tdt), torch.randn(D, K, dtype=tdt)
        out, reps = torch.empty(4096, K, dtype=tdt), 200
        seconds = best_time(lambda: [torch.mm(z, y, out=out) for _ in range(reps)])
        return bandwidth, 2 * 4096 * D * K * reps / seconds
    finally:
        torch.set_num_threads(before)


def floors(n: int, dtype: str, bandwidth: float, gemm: float) -> dict:
    """Bytes, flops and floors (seconds) of one round and one correction."""
    s = 4 if dtype == "float32" else 8
    round_bytes, round_flops = n * D * s + 2 * n * K * s, 2 * n * K * D
    corr_bytes, corr_flops = 2 * n * D * s + n * K * s, 4 * n * K * D
    return {
        "round_bytes": round_bytes,
        "round_flops": round_flops,
        "round_floor": max(round_bytes / bandwidth, round_flops / gemm),
        "corr_bytes": corr_bytes,
        "corr_flops": corr_flops,
        "corr_floor": max(corr_bytes / bandwidth, corr_flops / gemm),
    }


def simulated(n: int, batches: int) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(11)
    per = -(-n // batches)
    shifts = np.repeat(rng.standard_normal((batches, D)), per, 0)[:n]
    cells = (rng.standard_normal((n, D)) + shifts).astype(np.float32)
    levels = np.repeat([f"b{i}" for i in range(batches)], per)[:n]
    return cells, pd.DataFrame({"batch": levels})


def harmony_after_one_iteration(cells, meta, *, path: str, dtype: str, threads: int):
    """A Harmony2 run stopped after 1 iteration of 1 round, on ``path``."""
    os.environ["HARMONYPY_FUSED"] = "always" if path == "fused" else "0"
    return hm.run_harmony(
        cells, meta, "batch", algorithm="harmony2", max_iter_harmony=1, max_iter_kmeans=1,
        epsilon_cluster=float("-inf"), epsilon_harmony=float("-inf"), verbose=False,
        random_state=0, dtype=dtype, ncores=threads,
    )  # fmt: skip


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def engine_times(args, cells, meta, cases) -> dict:
    """Median seconds per clustering round (``Harmony.update_R``) and per
    correction (``Harmony.moe_correct_ridge``) for each (path, dtype); the
    runs of each dtype are held at once and their steps timed round-robin."""
    result = {}
    for dtype in {dtype for _, dtype in cases}:
        runs = {
            case: harmony_after_one_iteration(
                cells, meta, path=case[0], dtype=dtype, threads=args.threads
            )
            for case in cases
            if case[1] == dtype
        }
        times = {case: {"round": [], "correction": []} for case in runs}
        before = torch.get_num_threads()
        torch.set_num_threads(args.threads)  # as the run set it
        try:
            for _ in range(args.repeats):
                for case, ho in runs.items():
                    times[case]["round"].append(timed(ho.update_R))
                    times[case]["correction"].append(timed(ho.moe_correct_ridge))
        finally:
            torch.set_num_threads(before)
        for case, steps in times.items():
            result[case] = {step: statistics.median(values) for step, values in steps.items()}
        del runs
    return result


FIRST_CALL = """
import os, sys, time
t = time.perf_counter()
import numpy as np, pandas as pd, harmonypy as hm
rng = np.random.default_rng(0)
x = rng.standard_normal((3000, 20)).astype(np.float32)
meta = pd.DataFrame({"b": np.repeat(["p", "q", "r"], 1000)})
hm.run_harmony(x, meta, "b", random_state=0, verbose=False)
print(time.perf_counter() - t)
"""


def first_call_seconds(path: str, repeats: int = 3) -> float:
    """Median wall time of a fresh process importing harmonypy and running 3,000 cells."""
    env = dict(os.environ, HARMONYPY_FUSED="always" if path == "fused" else "0")
    runs = [
        float(subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1])
        for _ in range(repeats)
    ]  # fmt: skip
    return statistics.median(runs)


def report(args, rates, engine, first) -> str:
    n = args.cells
    lines = [
        f"# Engine against the floor: {n:,} cells x {D} PCs, K = {K}, {args.batches} batches, "
        f"Harmony2, {args.threads} threads",
        "",
        f"{torch.__version__=}, numba {_numba_version()}, load average at start/end "
        f"{rates['load'][0]:.2f} / {rates['load'][1]:.2f} (2 cores); medians of {args.repeats}.",
        "",
        "| dtype | bandwidth | GEMM | step | bytes | flops | floor | path | engine | engine / floor |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (path, dtype), times in engine.items():
        bw, gemm = rates[dtype]
        f = floors(n, dtype, bw, gemm)
        for step, key in (("round", "round"), ("correction", "corr")):
            lines.append(
                f"| {dtype} | {bw / 1e9:.1f} GB/s | {gemm / 1e9:.0f} GFLOP/s | {step} | "
                f"{f[key + '_bytes'] / 1e9:.2f} GB | {f[key + '_flops'] / 1e9:.1f} G | "
                f"{f[key + '_floor'] * 1e3:.0f} ms | {path} | {times[step] * 1e3:.0f} ms | "
                f"**{times[step] / f[key + '_floor']:.1f}x** |"
            )
    lines += ["", "| path | fresh process: import and 3,000 cells (median of 3) |", "|---|---|"]
    for path, seconds in first.items():
        lines.append(f"| {path} | {seconds:.2f} s |")
    return "\n".join(lines) + "\n"


def _numba_version() -> str:
    try:
        import numba
    except ImportError:
        return "absent"
    return numba.__version__


def main(argv=None) -> None:
    args = parse_args(argv)
    # Every run stops at its forced rounds and iterations, unconverged by design.
    warnings.filterwarnings("ignore", category=hm.ConvergenceWarning)
    dtypes, paths = args.dtypes.split(","), args.paths.split(",")
    load_start = os.getloadavg()[0]
    rates = {dtype: machine_rates(dtype, args.threads) for dtype in dtypes}
    cells, meta = simulated(args.cells, args.batches)
    cases = [(path, dtype) for dtype in dtypes for path in paths]
    engine = engine_times(args, cells, meta, cases)
    first = {path: first_call_seconds(path) for path in paths}
    rates["load"] = (load_start, os.getloadavg()[0])
    text = report(args, rates, engine, first)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
