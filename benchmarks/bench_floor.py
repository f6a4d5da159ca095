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
  each path (kernels compiled and cached beforehand), median of 3;
* where the time goes (``--no-phases`` skips it): each phase of a fused round
  and of a correction timed alone over N cells, with the engine's shapes and
  access patterns: rows of Z (d wide) and of R (K wide) read in a random
  order (a round visits the cells in shuffled blocks; the correction reads R,
  stored in the last round's order, and Z by batch level), the products in
  the engine's pieces, the softmax kernel on a piece in cache, Z_corr's rows
  written back by level. Their sum is what the round and the correction
  cost at this machine's rates for the accesses they make: the floor above
  counts every byte as a sequential one and leaves out the exponentials.

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
    parser.add_argument("--no-phases", action="store_true", help="skip the phase table")
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


#: Rows of a round's piece (``online.PIECE_ELEMENTS // K``) and of a
#: correction's level chunk (``correction.LEVEL_CHUNK_ROWS``).
PIECE_ROWS, LEVEL_ROWS = 2**18 // K, 16384


def phase_times(n: int, batches: int, dtype: str, threads: int) -> dict:
    """Seconds of each phase of a fused round and of a correction over ``n``
    cells, each timed alone (best of 3) with the engine's shapes and access
    patterns; the softmax kernel's is None without numba."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _phase_times(n, batches, getattr(torch, dtype))
    finally:
        torch.set_num_threads(before)


def _pieces(n: int, rows: int):
    return [slice(start, min(n, start + rows)) for start in range(0, n, rows)]


def _phase_times(n: int, batches: int, tdt: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn((n, D), dtype=tdt, generator=generator)
    r = torch.rand((n, K), dtype=tdt, generator=generator)
    order = torch.randperm(n, generator=generator)
    y = torch.randn((D, K), dtype=tdt, generator=generator)
    w = torch.randn((K, D), dtype=tdt, generator=generator)
    z_rows, r_rows = (
        torch.empty((LEVEL_ROWS, D), dtype=tdt),
        torch.empty((LEVEL_ROWS, K), dtype=tdt),
    )
    logits = torch.empty((PIECE_ROWS, K), dtype=tdt)
    pieces, chunks = _pieces(n, PIECE_ROWS), _pieces(n, LEVEL_ROWS)

    def gather(source, buffer, parts):
        for part in parts:
            torch.index_select(source, 0, order[part], out=buffer[: part.stop - part.start])

    def products(rows, parts, fn):
        for part in parts:
            fn(rows[: part.stop - part.start])

    sums = torch.empty((K, D), dtype=tdt)
    times = {
        "round: Z rows, random": best_time(lambda: gather(z, z_rows, pieces), 3),
        "round: distances (BLAS)": best_time(
            lambda: products(z_rows, pieces, lambda a: torch.mm(a, y, out=logits[: a.shape[0]])),
            3,
        ),
        "round: softmax kernel (a piece in cache)": _kernel_seconds(n, batches, tdt),
        "correction: R rows, random (x2)": 2 * best_time(lambda: gather(r, r_rows, chunks), 3),
        "correction: Z rows, random (x2)": 2 * best_time(lambda: gather(z, z_rows, chunks), 3),
        "correction: level sums R^T Z (BLAS)": best_time(
            lambda: products(
                r_rows, chunks, lambda a: torch.mm(a.T, z_rows[: a.shape[0]], out=sums)
            ),
            3,
        ),
        "correction: R W (BLAS)": best_time(
            lambda: products(
                r_rows, chunks, lambda a: torch.addmm(z_rows[: a.shape[0]], a, w, alpha=-1.0)
            ),
            3,
        ),
        "correction: Z_corr rows written, random": best_time(
            lambda: [
                z.index_copy_(0, order[part], z_rows[: part.stop - part.start]) for part in chunks
            ],
            3,
        ),
    }
    return times


def _kernel_seconds(n: int, batches: int, tdt: torch.dtype) -> float | None:
    """The fused softmax kernel (``_numba_kernels.update_piece``) on one
    piece in cache, scaled to ``n`` cells; None without numba."""
    try:
        from harmonypy.engine import _numba_kernels as kernels
    except ImportError:
        return None
    dt = torch.empty((), dtype=tdt).numpy().dtype
    rng = np.random.default_rng(0)
    logits0 = (rng.standard_normal((PIECE_ROWS, K)) - 4).astype(dt)
    logits, new = logits0.copy(), np.empty_like(logits0)
    penalty = ((rng.standard_normal((batches, K)) * 0.1).astype(dt), np.empty((0, K), dt),
               np.full(K, 2.0, dt), np.array([1.0], dt))  # fmt: skip
    rows = (new, rng.integers(0, batches, (PIECE_ROWS, 1)), rng.integers(0, 20, PIECE_ROWS))
    outputs = (np.zeros((16, batches * 21, K)), np.zeros((16, 3, 1)))
    consts = kernels.exp_constants(dt)
    kernels.set_threads(torch.get_num_threads())

    def pieces(kernel: bool):
        for _ in range(20):
            logits[...] = logits0
            if kernel:
                kernels.update_piece(logits, penalty, rows, outputs, consts)

    pieces(True)
    seconds = best_time(lambda: pieces(True), 3) - best_time(lambda: pieces(False), 3)
    return seconds / (20 * PIECE_ROWS) * n


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


def phase_report(args, phases: dict, engine: dict) -> list[str]:
    """The phase table: each phase's time alone, their sums, and the
    engine's fused round and correction against those sums."""
    if not phases:
        return []
    dtypes = list(phases)
    lines = [
        "", f"## Where the time goes: each phase alone over {args.cells:,} cells", "",
        "| phase | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes),
    ]  # fmt: skip
    for phase in phases[dtypes[0]]:
        cells = [phases[dt][phase] for dt in dtypes]
        shown = ["n/a (no numba)" if c is None else f"{c * 1e3:.0f} ms" for c in cells]
        lines.append(f"| {phase} | " + " | ".join(shown) + " |")
    for step, key in (("round", "round"), ("correction", "correction")):
        row_sum, row_engine = [], []
        for dt in dtypes:
            total = sum(v or 0.0 for p, v in phases[dt].items() if p.startswith(step))
            engine_step = engine.get(("fused", dt), engine.get(("eager", dt), {})).get(key)
            row_sum.append(f"{total * 1e3:.0f} ms")
            shown = "n/a" if engine_step is None else f"{engine_step * 1e3:.0f} ms"
            if engine_step is not None:
                shown += f" (**{engine_step / total:.2f}x**)"
            row_engine.append(shown)
        lines.append(f"| **{step}: sum of its phases** | " + " | ".join(row_sum) + " |")
        lines.append(
            f"| {step}: engine (fused path; its sum's multiple) | " + " | ".join(row_engine) + " |"
        )
    return lines


def report(args, rates, engine, first, phases=None) -> str:
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
    lines += phase_report(args, phases or {}, engine)
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
    phases = {} if args.no_phases else {
        dtype: phase_times(args.cells, args.batches, dtype, args.threads) for dtype in dtypes
    }  # fmt: skip
    rates["load"] = (load_start, os.getloadavg()[0])
    text = report(args, rates, engine, first, phases)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
