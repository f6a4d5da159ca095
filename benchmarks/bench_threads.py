"""Time harmonypy's default CPU thread policy against 1 and 2 threads.

One command; prints a markdown table and writes it to
``benchmarks/results/threads.md`` (``--out``)::

    python benchmarks/bench_threads.py                          # 3.5k and 100k, ~15 min
    python benchmarks/bench_threads.py --sizes 3500,100000,1000000 --repeats 3

Every timed run is a fresh subprocess of this script (``--worker``), so the
OpenMP thread pool, the allocator and the imports start clean, as in a new
notebook kernel. Conditions:

* ``idle``: nothing else started by this script (other processes on the
  machine are not controlled: the load before each block is reported);
* ``busy``: one ``python -c 'while True: pass'`` process runs, pinned
  nowhere, for the whole block, i.e. one core's worth of foreign load.

Configurations: ``1`` (``ncores=1``), ``2`` (``ncores=2``) and ``default``
(``ncores=None``: the package's policy, whose choice is recorded). Repeats go
round-robin over every (condition, size, algorithm, configuration), so a drift
in the machine's speed touches all alike; the table shows the fastest repeat.

Inputs: 3,500 cells are the bundled PBMC example
(:func:`harmonypy.datasets.load_pbmc_3500`, donor as the batch); larger sizes
are :func:`harmonypy._simulate.simulate` (50 PCs, 10 cell types, 8 batches,
16 from 1,000,000 cells as in ``benchmarks/run.py``'s 1M rows, seed 0), cached
under ``benchmarks/work/threads-inputs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SRC = ROOT / "src"
INPUTS = BENCH / "work" / "threads-inputs"
CONFIGS = ("1", "2", "default")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# inputs


def input_paths(n_cells: int) -> tuple[Path, Path]:
    folder = INPUTS / f"n{n_cells}"
    return folder / "pcs.npy", folder / "batch.npy"


def make_input(n_cells: int) -> None:
    """Simulate (once, cached) the embedding of a simulated size."""
    if n_cells == 3500:
        return
    pcs, batch = input_paths(n_cells)
    if pcs.exists() and batch.exists():
        return
    import numpy as np

    sys.path.insert(0, str(SRC))
    from harmonypy._simulate import simulate

    log(f"simulating {n_cells} cells -> {pcs.parent}")
    X, meta = simulate(n_cells, 50, 16 if n_cells >= 1_000_000 else 8, 10, seed=0)
    pcs.parent.mkdir(parents=True, exist_ok=True)
    np.save(pcs, X)
    np.save(batch, np.asarray(meta["batch"], dtype=str))


def load_input(n_cells: int):
    import numpy as np
    import pandas as pd

    if n_cells == 3500:
        from harmonypy.datasets import load_pbmc_3500

        pcs, meta, _ = load_pbmc_3500()
        return pcs.to_numpy(np.float32), meta[["donor"]], "donor"
    pcs, batch = input_paths(n_cells)
    return np.load(pcs), pd.DataFrame({"batch": np.load(batch)}), "batch"


# --------------------------------------------------------------------------
# one timed run (in a fresh process)


def worker(n_cells: int, algorithm: str, config: str) -> None:
    sys.path.insert(0, str(SRC))
    import harmonypy as hm

    X, meta, var = load_input(n_cells)
    ncores = None if config == "default" else int(config)
    import logging

    from harmonypy.engine.threads import CpuLoad

    class Choices(logging.Handler):  # the policy's decisions, logged at INFO
        def __init__(self):
            super().__init__(logging.INFO)
            self.threads = []

        def emit(self, record):
            text = record.getMessage()
            if text.startswith("CPU threads: "):
                self.threads.append(int(text.split()[2]))

    choices = Choices()
    logger = logging.getLogger("harmonypy")
    logger.addHandler(choices)
    logger.setLevel(logging.INFO)
    load = CpuLoad()
    start = time.perf_counter()
    ho = hm.run_harmony(X, meta, var, algorithm=algorithm, verbose=False, ncores=ncores)
    seconds = time.perf_counter() - start
    others = load.foreign()  # cores' worth used by other processes during the run
    print(
        json.dumps(
            {
                "seconds": seconds,
                "n_threads": getattr(ho, "n_threads", None),
                "choices": choices.threads,
                "others": others,
                "iterations": len(ho.kmeans_rounds),
            }
        )
    )


def run_worker(n_cells: int, algorithm: str, config: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(n_cells), algorithm, config]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the policy, not the env, decides
        env.pop(name, None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"seconds": float("inf"), "status": f"timeout {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"seconds": float("inf"), "status": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# foreign load


class BusyCore:
    """One process spinning on a core for the duration of a ``with`` block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)  # let it be scheduled and counted
        return self

    def __exit__(self, *exc):
        self.proc.kill()  # this process, by its handle
        self.proc.wait()
        time.sleep(0.5)


def cpu_busy(seconds: float = 1.0) -> float:
    """Cores' worth of non-idle time over ``seconds`` (Linux /proc/stat)."""

    def read():
        with open("/proc/stat") as fh:
            f = [int(v) for v in fh.readline().split()[1:]]
        return sum(f), f[3] + f[4]

    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except OSError:
        return float("nan")
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def wait_quiet(expected: float, max_wait: float, slack: float = 0.3) -> tuple[float, float]:
    """Wait (up to ``max_wait`` s) until the machine's busy cores are at most
    ``expected + slack`` over a 0.5 s sample; return (seconds waited, last sample).

    Other people's processes are not ours to stop; this only avoids starting a
    run in the middle of their burst."""
    start = time.monotonic()
    while True:
        seen = cpu_busy(0.5)
        if not seen > expected + slack or time.monotonic() - start > max_wait:
            return time.monotonic() - start, seen


# --------------------------------------------------------------------------
# table


def fmt_s(s: float) -> str:
    return "-" if s == float("inf") else (f"{s:.2f} s" if s < 10 else f"{s:.1f} s")


# A run is "clean" when other processes (beyond the busy loop of the 'busy'
# condition) used at most this many cores' worth of CPU during it.
NOISE = 0.15


def clean(run: dict, cond: str) -> bool:
    others = run.get("others")
    return others is not None and others <= (1.0 if cond == "busy" else 0.0) + NOISE


def fastest(runs: list[dict], cond: str) -> dict:
    """The fastest clean run, else the fastest run marked ``noisy``."""
    good = [r for r in runs if clean(r, cond)]
    best = min(good or runs, key=lambda r: r["seconds"], default={"seconds": float("inf")})
    return best if good or not runs else {**best, "noisy": True}


def choice_text(run: dict) -> str:
    choices = run.get("choices") or [run.get("n_threads")]
    return "→".join(str(c) for c in choices)


def table(results: dict, cases: list, conditions: list[str], configs=CONFIGS) -> str:
    head = (
        "| cells | algorithm | condition | 1 thread | 2 threads | default (threads) "
        "| default / best | others' load (1 / 2 / default) |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for cond in conditions:
        for n_cells, alg in cases:
            best = {c: fastest(results.get((cond, n_cells, alg, c), []), cond) for c in CONFIGS}
            ref = min(best["1"]["seconds"], best["2"]["seconds"])
            ratio = (
                best["default"]["seconds"] / ref if ref not in (0, float("inf")) else float("nan")
            )
            label = "idle" if cond == "idle" else "1 core busy"
            others = " / ".join(
                f"{best[c].get('others') or 0:.2f}" if "others" in best[c] else "-" for c in CONFIGS
            )
            mark = {c: "*" if best[c].get("noisy") else "" for c in CONFIGS}
            lines.append(
                f"| {n_cells:,} | {alg} | {label} | {fmt_s(best['1']['seconds'])}{mark['1']} "
                f"| {fmt_s(best['2']['seconds'])}{mark['2']} "
                f"| {fmt_s(best['default']['seconds'])}{mark['default']} "
                f"({choice_text(best['default'])}) | {ratio:.2f}× | {others} |"
            )
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes",
        default="3500,100000",
        help="comma-separated cell counts (3500 = the bundled PBMC data)",
    )
    ap.add_argument("--algorithms", default="harmony1,harmony2")
    ap.add_argument(
        "--h1-max-cells",
        type=int,
        default=100_000,
        help="run harmony1 only up to this many cells (default 100000)",
    )
    ap.add_argument("--conditions", default="idle,busy")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    ap.add_argument(
        "--max-wait",
        type=float,
        default=20,
        help="seconds to wait for other processes' load to pass before a run",
    )
    ap.add_argument(
        "--retry-noisy",
        type=int,
        default=0,
        metavar="K",
        help="run again (up to K times) when other processes used more than "
        f"{NOISE} cores during a run",
    )
    ap.add_argument(
        "--merge",
        nargs="*",
        default=[],
        metavar="JSON",
        help="add the runs of earlier results files (the .json written beside "
        "the .md); FILE:idle or FILE:busy takes only that condition's",
    )
    ap.add_argument("--configs", default=",".join(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(BENCH / "results" / "threads.md"))
    ap.add_argument(
        "--worker", nargs=3, metavar=("CELLS", "ALGORITHM", "CONFIG"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.worker:
        worker(int(args.worker[0]), args.worker[1], args.worker[2])
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    algorithms = args.algorithms.split(",")
    conditions = args.conditions.split(",")
    cases = [
        (n, a) for n in sizes for a in algorithms if not (a == "harmony1" and n > args.h1_max_cells)
    ]
    for n in sizes:
        make_input(n)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs "
        f"(affinity {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'})"
    )
    log(f"{machine}; loadavg {os.getloadavg()}; busy cores over 1 s: {cpu_busy():.2f}")
    configs = args.configs.split(",")
    results = {(c, n, a, k): [] for c in conditions for n, a in cases for k in configs}
    notes = []
    for item in args.merge:  # earlier runs (their .json) count as more repeats
        path, _, only = item.partition(":")
        earlier = json.loads(Path(path).read_text())
        notes += [
            f"{Path(path).name}: {n}" for n in earlier["notes"] if not only or f", {only}:" in n
        ]
        for r in earlier["runs"]:
            key = (r.pop("condition"), r.pop("cells"), r.pop("algorithm"), r.pop("config"))
            if key in results and (not only or key[0] == only):
                results[key].append(r)
    for rep in range(args.repeats):  # --repeats 0 with --merge: only the table
        for cond in conditions:
            pre = f"loadavg {os.getloadavg()[0]:.2f}, busy cores {cpu_busy(0.5):.2f}"
            ctx = BusyCore() if cond == "busy" else _Null()
            with ctx:
                during = cpu_busy(0.5)
                notes.append(
                    f"repeat {rep + 1}, {cond}: before: {pre}; after start: busy cores {during:.2f}"
                )
                log(notes[-1])
                for n_cells, alg in cases:
                    for config in configs:
                        for attempt in range(1 + args.retry_noisy):
                            waited, seen = wait_quiet(1.0 if cond == "busy" else 0.0, args.max_wait)
                            res = run_worker(n_cells, alg, config, args.timeout)
                            res["busy_before"], res["waited"] = seen, waited
                            results[(cond, n_cells, alg, config)].append(res)
                            if clean(res, cond) or attempt == args.retry_noisy:
                                break
                            log(
                                f"{cond:5s} {n_cells:>8} {alg} {config:>7}: "
                                f"{fmt_s(res['seconds'])}, other processes used "
                                f"{res.get('others') or 0:.2f} cores: again"
                            )
                        log(
                            f"{cond:5s} {n_cells:>8} {alg} {config:>7}: "
                            f"{fmt_s(res['seconds'])} threads={res.get('choices')} "
                            f"others during run {res.get('others') or 0:.2f} "
                            f"(busy cores before {seen:.2f}, waited {waited:.0f} s) "
                            f"{res.get('status', '')}"
                        )
    text = (
        f"Machine: {machine}, Python {platform.python_version()}; "
        f"fastest of {args.repeats} round-robin repeats"
        + (f" plus the runs of {', '.join(args.merge)}" if args.merge else "")
        + ", each run a fresh process.\n"
        f"'1 core busy': one `python -c 'while True: pass'` process running. "
        f"'others' load': cores' worth of CPU used by other processes during the "
        f"run shown (the busy loop included; it gets less than a core when it shares "
        f"one with our second thread). * marks a time with no clean run (others "
        f"above {NOISE} cores beyond the busy loop).\n\n"
        + table(results, cases, conditions, configs)
        + "\nLoad seen by the driver (other processes on the machine included):\n\n"
        + "".join(f"* {n}\n" for n in notes)
        + "\nAll times (s):\n\n"
        + "".join(
            f"* {c} {n} {a} {k}: "
            + ", ".join(
                f"{fmt_s(r['seconds'])} [threads {choice_text(r)}, "
                f"others {r.get('others') or 0:.2f}]"
                for r in v
            )
            + "\n"
            for (c, n, a, k), v in results.items()
        )
    )
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "notes": notes,
                "runs": [
                    {"condition": c, "cells": n, "algorithm": a, "config": k, **r}
                    for (c, n, a, k), v in results.items()
                    for r in v
                ],
            },
            indent=1,
            default=str,
        )
    )
    log(f"wrote {out}")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


if __name__ == "__main__":
    main()
