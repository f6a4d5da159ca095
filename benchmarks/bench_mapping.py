"""Speed and memory of reference mapping: ``map_query`` and ``transfer_labels``.

One command::

    python benchmarks/bench_mapping.py                      # 100k and 1M query cells
    python benchmarks/bench_mapping.py --query-cells 100000 --repeats 1 --no-symphonypy

Inputs (simulated once, cached under ``benchmarks/work/mapping/``):
``hm.datasets.simulate`` of reference + query cells x 50 PCs (8 batches, 10
cell types); the first ``--ref-cells`` (100,000) are integrated by Harmony 1
with ``nclust=100`` and kept as a reference (``build_reference`` with the
cell types as labels, saved with ``Reference.save``); the others are the
query, mapped with its batch variable (8 levels).

Every measurement is a fresh child process (this script with ``--worker``),
so its peak RSS (``VmHWM`` from ``/proc/self/status``) is its own: one child
maps without the mapping score, another maps with it and then transfers
labels (k = 30, against the reference's 100,000 cells). symphonypy 0.2.4's
``map_embedding`` runs on the same reference and query in its own
virtualenv (``benchmarks/_symphonypy_worker.py``) at ``--symphonypy-cells``.
Repeats go round-robin over all runs and the fastest time is kept (other
processes only ever add time; the machine is shared).

Prints a Markdown table and writes it to ``benchmarks/results/<name>.md``
(default ``mapping.md``) with the raw times in ``<name>.json``; the report
also gives the slowest repeat of every time. ``--from-json`` rebuilds the
report from an earlier ``<name>.json`` without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SRC = REPO / "src"
RESULTS = BENCH / "results"


def peak_rss_gb() -> float:
    """VmHWM of this process in GB (1e9 bytes); 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


# ------------------------------------------------------------------ worker
def worker(args) -> int:
    """One measurement in this (fresh) process; writes a JSON of times and peak RSS."""
    import pandas as pd
    import torch

    import harmonypy as hm

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.inputs)
    n = args.n_query
    cells = np.ascontiguousarray(np.load(folder / "query.npy", mmap_mode="r")[:n])
    meta = pd.read_csv(folder / "query_meta.csv", nrows=n, dtype="category")
    ref = hm.load_reference(folder / "reference.npz")
    # Warm-up on a few cells: torch's first calls load kernels and libraries.
    hm.map_query(cells[:256], meta[:256], ref, vars_use="batch")
    result = {"n_query": n, "rss_after_load_gb": peak_rss_gb(), "threads": torch.get_num_threads()}
    score = args.worker == "map+score"
    t0 = time.perf_counter()
    q = hm.map_query(cells, meta, ref, vars_use="batch", confidence=score)
    result["map_seconds"] = time.perf_counter() - t0
    result["rss_map_gb"] = peak_rss_gb()
    if score:
        t0 = time.perf_counter()
        labels = hm.transfer_labels(q, ref, "cell_type", k=args.k)
        result["transfer_seconds"] = time.perf_counter() - t0
        result["rss_transfer_gb"] = peak_rss_gb()
        truth = pd.read_csv(folder / "query_meta.csv", nrows=n, usecols=["cell_type"])
        result["accuracy"] = float(
            (
                labels["label"].astype(str).to_numpy() == truth["cell_type"].astype(str).to_numpy()
            ).mean()
        )
    result["loadavg"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------ driver
def make_inputs(args) -> Path:
    """Simulate, integrate and save the reference and the query once (cached)."""
    import pandas as pd

    import harmonypy as hm

    n_query = max(args.query_cells)
    tag = f"ref{args.ref_cells}_q{n_query}_p{args.n_pcs}_k{args.nclust}_s{args.seed}"
    folder = BENCH / "work" / "mapping" / tag
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    log(f"simulating {args.ref_cells + n_query:,} cells -> {folder}")
    X, meta = hm.datasets.simulate(args.ref_cells + n_query, args.n_pcs, 8, 10, seed=args.seed)
    ref_pcs, ref_meta = X[: args.ref_cells], meta.iloc[: args.ref_cells].reset_index(drop=True)
    t0 = time.perf_counter()
    ho = hm.run_harmony(
        ref_pcs, ref_meta, "batch", nclust=args.nclust, verbose=False, random_state=args.seed
    )
    log(f"reference Harmony run: {time.perf_counter() - t0:.1f} s, K = {ho.K}")
    hm.build_reference(ho, ref_meta, labels="cell_type").save(folder / "reference.npz")
    np.save(folder / "query.npy", np.ascontiguousarray(X[args.ref_cells :]))
    meta.iloc[args.ref_cells :].to_csv(folder / "query_meta.csv", index=False)
    # symphonypy's inputs (see _symphonypy_worker.py), at its query size.
    from compare_symphonypy import write_inputs

    n_sym = min(args.symphonypy_cells, n_query)
    write_inputs(
        folder / "symphonypy",
        ho,
        ref_pcs,
        X[args.ref_cells : args.ref_cells + n_sym],
        meta.iloc[args.ref_cells : args.ref_cells + n_sym][["batch"]].astype(str),
    )
    (folder / "done").write_text("ok")
    del pd
    return folder


def log(msg: str) -> None:
    print(f"[bench_mapping {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_child(args, folder: Path, kind: str, n: int, out: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--inputs",
        str(folder),
        "--n-query",
        str(n),
        "--k",
        str(args.k),
        "--out",
        str(out),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} n={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--query-cells", default="100000,1000000")
    p.add_argument("--ref-cells", type=int, default=100000)
    p.add_argument("--n-pcs", type=int, default=50)
    p.add_argument("--nclust", type=int, default=100)
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in every child (default: torch's own)",
    )
    p.add_argument("--symphonypy-cells", type=int, default=100000)
    p.add_argument("--no-symphonypy", action="store_true")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--name", default="mapping")
    p.add_argument(
        "--from-json",
        action="store_true",
        help="rebuild the report from benchmarks/results/<name>.json; run nothing",
    )
    # worker mode (internal)
    p.add_argument("--worker", choices=["map", "map+score"], help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--n-query", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    args.query_cells = [int(s.replace("_", "")) for s in args.query_cells.split(",") if s]
    if args.from_json:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        runs = {
            (key.rsplit(" ", 1)[0], int(key.rsplit(" ", 1)[1])): rs for key, rs in saved.items()
        }
        args.repeats = max(len(rs) for rs in runs.values())
        args.query_cells = sorted({n for kind, n in runs if kind != "symphonypy"})
        write_report(args, runs, raw=False)
        return 0
    sys.path.insert(0, str(SRC))
    sys.path.insert(0, str(BENCH))
    folder = make_inputs(args)
    scratch = BENCH / "work" / "mapping" / "runs"
    scratch.mkdir(parents=True, exist_ok=True)
    runs: dict = {}
    python = None
    if not args.no_symphonypy:
        from compare_symphonypy import ensure_symphonypy

        python = ensure_symphonypy()
    for rep in range(args.repeats):
        for n in args.query_cells:
            for kind in ("map", "map+score"):
                log(f"{kind} n={n:,} repeat {rep + 1}/{args.repeats}")
                res = run_child(args, folder, kind, n, scratch / f"{kind}_{n}.json")
                runs.setdefault((kind, n), []).append(res)
                log(
                    "  " + ", ".join(f"{k}={v:.3g}" for k, v in res.items() if isinstance(v, float))
                )
        if python is not None:
            from compare_symphonypy import run_symphonypy

            n_sym = min(args.symphonypy_cells, max(args.query_cells))
            log(f"symphonypy map_embedding n={n_sym:,} repeat {rep + 1}/{args.repeats}")
            res = run_symphonypy(
                python,
                folder / "symphonypy",
                scratch / "symphonypy",
                "batch",
                0,
                args.threads,
                args.timeout,
            )
            runs.setdefault(("symphonypy", n_sym), []).append(res)
            log(f"  {res['map_embedding_seconds']:.2f} s, peak RSS {res['rss_peak_gb']:.2f} GB")
    write_report(args, runs, raw=True)
    return 0


def write_report(args, runs: dict, *, raw: bool) -> None:
    """The Markdown report of ``runs`` ({(kind, n): [result per repeat]}), printed
    and written to ``<name>.md``; with ``raw``, the runs to ``<name>.json`` too."""

    def fastest(kind, n, field):
        values = [r[field] for r in runs.get((kind, n), []) if field in r]
        return min(values) if values else None

    def worst(kind, n, field):
        values = [r[field] for r in runs.get((kind, n), []) if field in r]
        return max(values) if values else None

    sym = {
        n: fastest("symphonypy", n, "map_embedding_seconds")
        for (kind, n) in runs
        if kind == "symphonypy"
    }
    lines = [
        f"# Reference mapping speed (`{args.name}`)",
        "",
        f"Reference: {args.ref_cells:,} simulated cells x {args.n_pcs} PCs (8 batches, 10 "
        f"cell types, seed {args.seed}) integrated by Harmony 1 with {args.nclust} clusters. "
        f"Query: other cells of the same simulation, mapped with their batch variable "
        f"(8 levels), float32 (the default). Times: fastest of {args.repeats} round-robin "
        f"repeats, each a fresh process (torch threads: "
        f"{args.threads or 'torch default'}); peak RSS: the largest VmHWM of those processes, "
        f"inputs (query PCs, metadata, reference file) and torch included. "
        f"`transfer_labels`: k = {args.k} against the reference's {args.ref_cells:,} cells.",
        "",
        "| query cells | map_query (s) | map_query + score (s) | transfer_labels (s) "
        "| peak RSS map (GB) | peak RSS map + score (GB) | peak RSS + transfer (GB) "
        "| symphonypy map_embedding (s) | symphonypy / map_query | label accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in args.query_cells:
        map_s = fastest("map", n, "map_seconds")
        score_s = fastest("map+score", n, "map_seconds")
        sym_s = sym.get(n)
        lines.append(
            f"| {n:,} | {map_s:.2f} | {score_s:.2f} | "
            f"{fastest('map+score', n, 'transfer_seconds'):.2f} | "
            f"{worst('map', n, 'rss_map_gb'):.2f} | {worst('map+score', n, 'rss_map_gb'):.2f} | "
            f"{worst('map+score', n, 'rss_transfer_gb'):.2f} | "
            f"{'-' if sym_s is None else f'{sym_s:.2f}'} | "
            f"{'-' if sym_s is None else f'{sym_s / map_s:.1f}x'}"
            f"{'' if sym_s is None else f' ({sym_s / score_s:.1f}x with score)'} | "
            f"{worst('map+score', n, 'accuracy'):.4f} |"
        )

    def slowest(kind, n, field):
        found = [
            (r[field], i, r.get("loadavg"))
            for i, r in enumerate(runs.get((kind, n), []))
            if field in r
        ]
        if not found:
            return "-"
        seconds, i, load = max(found)
        return f"{seconds:.2f} (repeat {i + 1}" + (
            f", load {load:.1f})" if load is not None else ")"
        )

    lines += [
        "",
        f"**Fastest of {args.repeats} repeats.** The times above are the fastest "
        f"repeat of each measurement: on this shared machine other processes only "
        f"add time, so the fastest is the closest to the cost of the code itself. "
        f"A single run can take much longer; the slowest repeat of each (which "
        f"repeat, and the 1-minute load average after it):",
        "",
        "| query cells | map_query (s) | map_query + score (s) | transfer_labels (s) "
        "| symphonypy map_embedding (s) |",
        "|---|---|---|---|---|",
    ]
    for n in args.query_cells:
        lines.append(
            f"| {n:,} | {slowest('map', n, 'map_seconds')} | "
            f"{slowest('map+score', n, 'map_seconds')} | "
            f"{slowest('map+score', n, 'transfer_seconds')} | "
            f"{slowest('symphonypy', n, 'map_embedding_seconds')} |"
        )
    loads = [r.get("loadavg", 0) for rs in runs.values() for r in rs]
    lines += [
        "",
        f"Highest 1-minute load average seen after a run: {max(loads):.1f} "
        f"on {os.cpu_count()} CPUs (above that count, other processes took CPU time "
        f"and the times are inflated).",
        "",
        f"Command: `python benchmarks/bench_mapping.py "
        f"--query-cells {','.join(map(str, args.query_cells))} "
        f"--repeats {args.repeats}" + (f" --threads {args.threads}" if args.threads else "") + "`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    if raw:
        (RESULTS / f"{args.name}.json").write_text(
            json.dumps({f"{kind} {n}": rs for (kind, n), rs in runs.items()}, indent=1)
        )


if __name__ == "__main__":
    sys.exit(main())
