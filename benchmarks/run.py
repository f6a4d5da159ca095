"""Benchmark this repository's Harmony against published implementations.

Every tool runs in its own subprocess through ``benchmarks/_worker.py`` on
the same simulated PCA embedding (``harmonypy._simulate.simulate``): peers in
private virtual environments under ``benchmarks/.venvs/`` (created on first
use), this repository's package with the current interpreter and
``PYTHONPATH=<repo>/src``.  The parent then scores the saved embeddings
(iLISI, cLISI, per-PC correlation with the peer running the same algorithm),
prints one table and writes CSV, Markdown and a time-vs-cells plot to
``benchmarks/results/``.

Examples
--------
    python benchmarks/run.py --sizes 10000
    python benchmarks/run.py --sizes 10000,100000 --modes defaults,fixed
    python benchmarks/run.py --million --peers harmonypy-2.1.0 --timeout 3600
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SRC = REPO / "src"
VENVS = BENCH / ".venvs"
WORK = BENCH / "work"  # inputs and raw embeddings (git-ignored)
RESULTS = BENCH / "results"
WORKER = BENCH / "_worker.py"
TORCH_PIN = "torch==2.13.0"  # CPU wheel; an unpinned torch pulls CUDA builds


@dataclasses.dataclass(frozen=True)
class Tool:
    """One benchmarked implementation and how to run it."""

    name: str  # row label and venv directory name
    algorithm: str  # "harmony1" or "harmony2"
    worker_tool: str  # runner in _worker.py
    packages: tuple[str, ...] = ()  # pip specs, installed in this order
    import_name: str = "harmonypy"
    ours: bool = False
    reference: str | None = None  # tool whose output we correlate with
    baseline: str | None = None  # our row its time is divided by (default: by algorithm)
    base_python: str | None = None  # interpreter the venv is made from (default: this one)
    worker_args: tuple[str, ...] = ()  # extra arguments for _worker.py
    with_peer: str | None = None  # an "ours" row that runs only beside this peer

    def python(self) -> Path:
        """Interpreter that runs this tool."""
        if self.ours:
            return Path(sys.executable)
        return VENVS / self.name / "bin" / "python"


#: scanpy's native Harmony (1.13, not yet on the registry): a source checkout
#: of scverse/scanpy, e.g. ``git archive <commit> src pyproject.toml README.md
#: LICENSE`` unpacked into a folder; see README.md, "scanpy native".
SCANPY_SOURCE = os.environ.get("SCANPY_SOURCE", "")
SCANPY_SPEC = SCANPY_SOURCE or "scanpy>=1.13"
SCANPY_COMMIT = "fabadb9412c0d1cd9df9d9c2e95ac266d564ee18"  # the one measured here


OURS_1, OURS_2 = "ours (harmony1)", "ours (harmony2)"
OURS_SC64 = "ours (harmony_integrate)"
OURS_SC32 = "ours (harmony_integrate, float32)"
TOOLS = [
    Tool(OURS_1, "harmony1", "harmonypy", ours=True, reference="harmonypy-0.2.0"),
    Tool(OURS_2, "harmony2", "harmonypy", ours=True, reference="harmonypy-2.1.0"),
    Tool(
        "harmonypy-0.2.0",
        "harmony1",
        "harmonypy",
        (TORCH_PIN, "harmonypy==0.2.0"),
        reference=OURS_1,
    ),
    Tool("harmonypy-2.1.0", "harmony2", "harmonypy", ("harmonypy==2.1.0",), reference=OURS_2),
    Tool(
        "harmony-pytorch-0.1.8",
        "harmony1",
        "harmony-pytorch",
        (TORCH_PIN, "harmony-pytorch==0.1.8"),
        import_name="harmony",
        reference=OURS_1,
    ),
    # scanpy's own NumPy Harmony, beside this package's scanpy-compatible
    # function with scanpy's defaults (float64, 200 rounds) and in float32.
    Tool(
        OURS_SC64,
        "harmony2",
        "harmonypy-scanpy",
        ours=True,
        reference="scanpy-native",
        with_peer="scanpy-native",
    ),
    Tool(
        OURS_SC32,
        "harmony2",
        "harmonypy-scanpy",
        ours=True,
        reference="scanpy-native",
        worker_args=("--dtype", "float32"),
        with_peer="scanpy-native",
    ),
    Tool(
        "scanpy-native",
        "harmony2",
        "scanpy",
        (SCANPY_SPEC,),
        import_name="scanpy",
        reference=OURS_SC64,
        baseline=OURS_SC64,
        base_python="python3.12",
    ),
]
PEERS = [t.name for t in TOOLS if not t.ours]
OURS_BY_ALGORITHM = {"harmony1": OURS_1, "harmony2": OURS_2}


# --------------------------------------------------------------------------
# environments


def log(msg: str) -> None:
    """Progress message on stderr, so stdout holds just the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_venv(tool: Tool) -> None:
    """Create ``benchmarks/.venvs/<name>`` with the tool's pinned packages once."""
    if tool.ours:
        return
    venv = VENVS / tool.name
    marker = venv / ".bench-packages"
    wanted = "\n".join(tool.packages)
    if marker.exists() and marker.read_text() == wanted and tool.python().exists():
        return
    if tool.name == "scanpy-native" and not SCANPY_SOURCE:
        log(
            "scanpy-native: SCANPY_SOURCE is not set; trying 'scanpy>=1.13' from the "
            "registry (see benchmarks/README.md to build it from a source snapshot)"
        )
    log(f"creating virtualenv {venv} ({', '.join(tool.packages)})")
    if not tool.python().exists():
        base = sys.executable
        if tool.base_python:
            base = shutil.which(tool.base_python) or ""
            if not base:
                raise SystemExit(
                    f"{tool.name} needs {tool.base_python} to make its "
                    f"virtualenv, and it is not on PATH"
                )
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(tool.python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # torch first and alone, so the peer cannot drag in a different build.
    env = dict(os.environ)
    if SCANPY_SOURCE:  # a source snapshot has no git metadata for hatch-vcs
        env.setdefault("SETUPTOOLS_SCM_PRETEND_VERSION", "1.13.0.dev0")
    for spec in tool.packages:
        subprocess.run(pip + [spec], check=True, env=env)
    subprocess.run(
        [str(tool.python()), "-c", f"import {tool.import_name}"], check=True, env=peer_env()
    )
    marker.write_text(wanted)


def peer_env(threads: int | None = None) -> dict[str, str]:
    """Environment for a peer: no PYTHONPATH, so our src/ cannot shadow it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    return env


def tool_env(tool: Tool, threads: int | None) -> dict[str, str]:
    """Environment for running ``tool``'s worker."""
    env = peer_env(threads)
    if tool.ours:
        env["PYTHONPATH"] = str(SRC)
    return env


# --------------------------------------------------------------------------
# inputs


def load_simulate() -> Callable[..., tuple[np.ndarray, pd.DataFrame]]:
    """Return ``harmonypy._simulate.simulate`` from this repository's src/.

    The package ``__init__`` imports the Harmony core; if that cannot be
    imported (e.g. mid-development) the simulator module is loaded from its
    file directly, since it depends only on NumPy and pandas.
    """
    sys.path.insert(0, str(SRC))
    try:
        from harmonypy._simulate import simulate
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "_bench_simulate", SRC / "harmonypy" / "_simulate.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        simulate = module.simulate
    return simulate


def make_inputs(n_cells: int, args: argparse.Namespace) -> dict[str, Path]:
    """Simulate (once, cached on disk) the input of one size."""
    tag = f"n{n_cells}_p{args.n_pcs}_b{args.n_batches}_t{args.n_cell_types}_s{args.seed}"
    folder = WORK / "inputs" / tag
    paths = {"pcs": folder / "pcs.npy", "meta": folder / "meta.csv"}
    if not all(p.exists() for p in paths.values()):
        log(f"simulating {n_cells} cells -> {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        X, meta = load_simulate()(
            n_cells, args.n_pcs, args.n_batches, args.n_cell_types, seed=args.seed
        )
        np.save(paths["pcs"], X)
        meta.to_csv(paths["meta"], index=False)
    return paths


# --------------------------------------------------------------------------
# running


def run_once(
    tool: Tool, inputs: dict[str, Path], mode: str, out_npy: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Run the worker for ``tool`` once; never raises for a failing tool."""
    out_json = out_npy.with_suffix(".json")
    for p in (out_npy, out_json):
        p.unlink(missing_ok=True)
    cmd = [
        str(tool.python()),
        str(WORKER),
        "--tool",
        tool.worker_tool,
        "--algorithm",
        tool.algorithm,
        "--mode",
        mode,
        "--pcs",
        str(inputs["pcs"]),
        "--meta",
        str(inputs["meta"]),
        "--seed",
        str(args.seed),
        "--out-npy",
        str(out_npy),
        "--out-json",
        str(out_json),
    ]
    if tool.ours:
        cmd.append("--ours")
    cmd += list(tool.worker_args)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log_path = out_npy.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        returncode, timed_out, peak_gb = _run_measured(
            cmd, fh, tool_env(tool, args.threads), args.timeout
        )
    if timed_out:
        return dict(status=f"timeout (>{args.timeout:g} s)", rss_peak_gb=peak_gb)
    wall = time.perf_counter() - t0
    if out_json.exists():
        result = json.loads(out_json.read_text())
        result["wall_seconds"] = wall
        if result["status"] == "error":
            log(f"{tool.name} {mode}: {result.get('error')}")
        return result
    # No JSON: the process died (e.g. killed by the OOM killer: rc -9).
    tail = log_path.read_text().strip().splitlines()[-1:] or [""]
    log(f"{tool.name} {mode} crashed rc={returncode} (peak RSS {peak_gb:.2f} GB): {tail[0]}")
    return dict(status=f"crashed (rc={returncode})", error=tail[0], rss_peak_gb=peak_gb)


def _run_measured(cmd: list[str], log_file, env: dict, timeout: float) -> tuple[int, bool, float]:
    """Run ``cmd``; return (exit code, timed out, peak RSS in GB).

    The peak comes from the kernel's accounting of the child (``wait4``), so it
    is known also for a run that was killed (out of memory, or past
    ``timeout``), when the worker could not report it. It is at least the
    driver's RSS at the fork (``ru_maxrss`` survives ``exec``), far below the
    peaks this is for.
    """
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    factor = 1 if sys.platform == "darwin" else 1024
    return proc.returncode, killed.is_set(), usage.ru_maxrss * factor / 1e9


def run_tools(
    tools: list[Tool], inputs: dict[str, Path], mode: str, n_cells: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Run every tool ``args.repeats`` times; keep the fastest time, first output.

    Repeats go round-robin (tool A, tool B, ..., then A, B, ... again), so a
    slow drift in the machine's speed touches every tool alike. The minimum is
    reported (median kept too) because noise from other processes only ever
    adds time.
    """
    out_dir = WORK / "outputs" / f"n{n_cells}"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {tool.name: [] for tool in tools}
    for rep in range(args.repeats):
        for tool in tools:
            done = runs[tool.name]
            if done and done[-1]["status"] != "ok":
                continue  # a tool that fails or times out once will do so again
            slug = tool.name.replace(" ", "_").replace("(", "").replace(")", "")
            out_npy = out_dir / f"{slug}_{mode}_r{rep}.npy"
            log(f"{tool.name} {mode} n={n_cells} repeat {rep + 1}/{args.repeats}")
            res = run_once(tool, inputs, mode, out_npy, args)
            res["output"] = str(out_npy)
            done.append(res)
            if res["status"] == "ok":
                log(
                    f"  {res['seconds']:.2f} s, {res.get('iterations')} iterations, "
                    f"peak RSS {res['rss_peak_gb']:.2f} GB"
                )
    return [_summarise(runs[tool.name]) for tool in tools]


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a tool's repeats: fastest time, median, all times, worst memory."""
    first = dict(runs[0])
    ok = [r for r in runs if r["status"] == "ok"]
    if ok and len(ok) == len(runs):
        first["seconds"] = float(min(r["seconds"] for r in ok))
        first["seconds_median"] = float(np.median([r["seconds"] for r in ok]))
        first["seconds_all"] = [round(r["seconds"], 4) for r in ok]
        first["loadavg_max"] = max(
            max(r.get("loadavg_before", 0), r.get("loadavg_after", 0)) for r in ok
        )
        first["rss_peak_gb"] = max(r["rss_peak_gb"] for r in ok)
        calls = [
            r["rss_peak_gb"] - r["rss_before_call_gb"]
            for r in ok
            if r.get("rss_before_call_gb") is not None
        ]
        if calls:
            first["rss_call_gb"] = max(calls)
        if first.get("iterations"):
            first["seconds_per_iteration"] = first["seconds"] / first["iterations"]
    return first


# --------------------------------------------------------------------------
# quality


def _lisi_fallback(X: np.ndarray, labels: pd.DataFrame, perplexity: float = 30) -> np.ndarray:
    """Exact-kNN LISI (Korsunsky et al. 2019), used if compute_lisi is missing.

    Neighbours are the ``3 * perplexity`` nearest other cells by Euclidean
    distance; Gaussian weights are calibrated per cell to the perplexity by a
    vectorised bisection on the precision, and LISI is the inverse Simpson
    index of the label distribution under those weights.
    """
    n = X.shape[0]
    k = min(int(3 * perplexity), n - 1)
    Xd = X.astype(np.float64)
    sq = (Xd**2).sum(axis=1)
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k))
    for lo in range(0, n, 2048):  # blocks keep the distance matrix small
        d2 = sq[lo : lo + 2048, None] + sq[None, :] - 2 * Xd[lo : lo + 2048] @ Xd.T
        rows = np.arange(d2.shape[0])
        d2[rows, rows + lo] = np.inf  # exclude the cell itself
        part = np.argpartition(d2, k, axis=1)[:, :k]
        dpart = np.take_along_axis(d2, part, axis=1)
        order = np.argsort(dpart, axis=1)
        idx[lo : lo + 2048] = np.take_along_axis(part, order, axis=1)
        dist[lo : lo + 2048] = np.sqrt(np.maximum(np.take_along_axis(dpart, order, axis=1), 0))

    # Bisection on beta so that the entropy of the weights is log(perplexity).
    target = math.log(perplexity)
    beta = np.ones(n)
    lo_b, hi_b = np.zeros(n), np.full(n, np.inf)
    for _ in range(50):
        P = np.exp(-(dist - dist[:, :1]) * beta[:, None])  # shift: no underflow
        sumP = P.sum(axis=1)
        H = np.log(sumP) + beta * ((dist - dist[:, :1]) * P).sum(axis=1) / sumP
        too_flat = H > target  # entropy too high: sharpen (raise beta)
        lo_b = np.where(too_flat, beta, lo_b)
        hi_b = np.where(too_flat, hi_b, beta)
        beta = np.where(np.isinf(hi_b), beta * 2, (lo_b + hi_b) / 2)
    P = np.exp(-(dist - dist[:, :1]) * beta[:, None])
    P /= P.sum(axis=1, keepdims=True)

    out = np.empty((n, labels.shape[1]))
    for j, col in enumerate(labels.columns):
        codes = pd.factorize(labels[col])[0][idx]
        simpson = sum((np.where(codes == c, P, 0).sum(axis=1)) ** 2 for c in np.unique(codes))
        out[:, j] = 1.0 / simpson
    return out


def lisi_function() -> tuple[Callable, str]:
    """``harmonypy.compute_lisi`` if importable, else the local fallback."""
    sys.path.insert(0, str(SRC))
    try:
        from harmonypy import compute_lisi

        return compute_lisi, "harmonypy.compute_lisi"
    except ImportError:
        return _lisi_fallback, "local exact-kNN fallback"


def score_lisi(
    Z: np.ndarray, meta: pd.DataFrame, subset: np.ndarray, lisi: Callable
) -> tuple[float, float]:
    """Median iLISI (batch) and cLISI (cell type) on the scoring subset."""
    labels = meta.iloc[subset][["batch", "cell_type"]].reset_index(drop=True)
    values = np.asarray(
        lisi(np.ascontiguousarray(Z[subset], dtype=np.float64), labels, ["batch", "cell_type"])
    )
    return float(np.median(values[:, 0])), float(np.median(values[:, 1]))


def min_pc_correlation(A: np.ndarray, B: np.ndarray) -> float:
    """Smallest Pearson correlation between matching columns (PCs) of A and B."""
    A = A.astype(np.float64) - A.mean(axis=0)
    B = B.astype(np.float64) - B.mean(axis=0)
    r = (A * B).sum(axis=0) / np.sqrt((A * A).sum(axis=0) * (B * B).sum(axis=0))
    return float(r.min())


def add_quality(
    rows: list[dict],
    inputs: dict[str, Path],
    n_cells: int,
    args: argparse.Namespace,
    lisi: Callable,
) -> None:
    """Fill iLISI, cLISI and min per-PC r into the rows of one size, in place."""
    meta = pd.read_csv(inputs["meta"], dtype=str, keep_default_na=False)
    rng = np.random.default_rng(args.seed)
    n_sub = min(n_cells, args.lisi_cells)
    # One subsample, shared by every tool, so scores are comparable.
    subset = (
        np.sort(rng.choice(n_cells, n_sub, replace=False))
        if n_sub < n_cells
        else np.arange(n_cells)
    )
    outputs = {
        (r["tool"], r["mode"]): np.load(r["output"])
        for r in rows
        if r["status"] == "ok" and Path(r["output"]).exists()
    }
    for row in rows:
        row["lisi_cells"] = n_sub
        Z = outputs.get((row["tool"], row["mode"]))
        if Z is None:
            continue
        t0 = time.perf_counter()
        row["ilisi"], row["clisi"] = score_lisi(Z, meta, subset, lisi)
        log(f"scored {row['tool']} {row['mode']} n={n_cells} ({time.perf_counter() - t0:.1f} s)")
        ref = next((t.reference for t in TOOLS if t.name == row["tool"]), None)
        if ref is not None and (ref, row["mode"]) in outputs:
            row["r_vs"] = ref
            row["min_pc_r"] = min_pc_correlation(Z, outputs[(ref, row["mode"])])
    if not args.keep_outputs:
        for row in rows:
            Path(row.get("output", "")).unlink(missing_ok=True)


def input_row(
    inputs: dict[str, Path], n_cells: int, args: argparse.Namespace, lisi: Callable
) -> dict[str, Any]:
    """A reference row scoring the uncorrected input the same way."""
    row = dict(
        tool="input (uncorrected)",
        algorithm="-",
        mode="-",
        n_cells=n_cells,
        status="ok",
        output=str(inputs["pcs"]),
    )
    meta = pd.read_csv(inputs["meta"], dtype=str, keep_default_na=False)
    rng = np.random.default_rng(args.seed)
    n_sub = min(n_cells, args.lisi_cells)
    subset = (
        np.sort(rng.choice(n_cells, n_sub, replace=False))
        if n_sub < n_cells
        else np.arange(n_cells)
    )
    row["lisi_cells"] = n_sub
    row["ilisi"], row["clisi"] = score_lisi(np.load(inputs["pcs"]), meta, subset, lisi)
    return row


# --------------------------------------------------------------------------
# reporting

COLUMNS = [  # (key in row, header, format)
    ("tool", "tool", "{}"),
    ("algorithm", "algorithm", "{}"),
    ("mode", "mode", "{}"),
    ("n_cells", "cells", "{:,}"),
    ("seconds", "seconds", "{:.2f}"),
    ("rss_peak_gb", "peak RSS GB", "{:.2f}"),
    ("rss_delta_gb", "RSS increase GB", "{:.2f}"),
    ("rss_call_gb", "call RSS GB", "{:.2f}"),
    ("iterations", "iterations", "{}"),
    ("seconds_per_iteration", "s/iteration", "{:.3f}"),
    ("ilisi", "iLISI", "{:.2f}"),
    ("clisi", "cLISI", "{:.2f}"),
    ("min_pc_r", "min per-PC r", "{:.4f}"),
    ("r_vs", "r vs", "{}"),
    ("time_ratio", "peer time / our time", "{:.2f}"),
    ("loadavg_max", "load avg", "{:.1f}"),
    ("status", "status", "{}"),
]


def add_ratios(rows: list[dict]) -> None:
    """Peer time / our time for the same algorithm, mode and size."""
    ours = {
        (r["tool"], r["mode"], r["n_cells"]): r.get("seconds") for r in rows if r["status"] == "ok"
    }
    for row in rows:
        if row.get("rss_peak_gb") is not None and row.get("rss_after_load_gb") is not None:
            row["rss_delta_gb"] = row["rss_peak_gb"] - row["rss_after_load_gb"]
        tool = next((t for t in TOOLS if t.name == row["tool"]), None)
        our_name = (
            tool.baseline
            if tool is not None and tool.baseline
            else OURS_BY_ALGORITHM.get(row.get("algorithm"))
        )
        if tool is not None and tool.ours:
            continue  # our own rows are the baselines
        if row["status"] != "ok" or row["tool"] == our_name or our_name is None:
            continue
        base = ours.get((our_name, row["mode"], row["n_cells"]))
        if base and row.get("seconds"):
            row["time_ratio"] = row["seconds"] / base


def format_cell(row: dict, key: str, fmt: str) -> str:
    """Format one value for the table; missing values become ``-``."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    """Render rows as a GitHub-flavoured Markdown table."""
    head = [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row, k, f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict], args: argparse.Namespace, lisi_name: str) -> Path:
    """Write ``<name>.csv`` and ``<name>.md`` to benchmarks/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / args.name
    keep = [k for k, _, _ in COLUMNS] + [
        "rss_after_load_gb",
        "rss_before_call_gb",
        "seconds_median",
        "seconds_all",
        "kmeans_rounds",
        "lisi_cells",
        "torch_threads",
        "version",
        "error",
    ]
    pd.DataFrame([{k: r.get(k) for k in keep} for r in rows]).to_csv(
        stem.with_suffix(".csv"), index=False
    )
    notes = [
        f"# Harmony benchmark `{args.name}`",
        "",
        f"Simulated PCA embedding: {args.n_pcs} PCs, {args.n_batches} batches, "
        f"{args.n_cell_types} cell types, seed {args.seed} "
        "(`harmonypy._simulate.simulate`).",
        f"Machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
        f"threads per tool: {args.threads or 'each tool default'}; "
        f"repeats: {args.repeats} (fastest time shown; median and all times in the "
        "CSV). `load avg` is the highest 1-minute load average seen at the start or "
        "end of the runs: above the CPU count, other processes competed for the CPUs "
        "and the time is inflated.",
        "Modes: `defaults` = each tool's own defaults (batch variable and seed "
        "only); `fixed` = 10 Harmony iterations x 20 clustering rounds with early "
        "stopping disabled.",
        f"iLISI/cLISI: median over {args.lisi_cells:,} cells at most (the same random "
        f"subsample for every tool; neighbours searched within it), via {lisi_name}.",
        "min per-PC r: smallest Pearson correlation over PCs with the tool in "
        "`r vs` (same algorithm). Peak RSS is the worker's high-water mark (VmHWM "
        "on Linux); 'RSS increase' subtracts the mark after loading the inputs, so it "
        "covers importing the tool and the call; 'call RSS' subtracts the mark after "
        "importing the tool, so it covers the call alone (importing torch alone takes "
        "about 0.25 GB). Times cover the Harmony call only.",
        "",
        markdown_table(rows),
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(notes))
    return stem


def plot_times(rows: list[dict]) -> Path | None:
    """Log-log plot of seconds vs cells, one line per tool and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        secs = r.get("seconds")
        if r["status"] == "ok" and secs is not None and secs > 0 and not math.isnan(secs):
            series.setdefault((r["tool"], r["mode"]), []).append((r["n_cells"], r["seconds"]))
    if not series:
        plt.close(fig)
        return None
    # One colour per tool, solid for defaults and dashed for fixed mode.
    names = sorted({tool for tool, _ in series})
    colours = dict(zip(names, plt.get_cmap("tab10").colors, strict=False))  # <= 10 tools
    for (tool, mode), pts in sorted(series.items()):
        pts.sort()
        ax.plot(
            *zip(*pts, strict=True),
            marker="o",
            linestyle="-" if mode == "defaults" else "--",
            color=colours[tool],
            label=f"{tool} [{mode}]",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="cells",
        ylabel="seconds",
        title="Harmony run time vs number of cells",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path = RESULTS / "time_vs_cells.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes", default="10000,100000", help="comma-separated cell counts (default 10000,100000)"
    )
    p.add_argument("--million", action="store_true", help="also run 1,000,000 cells")
    p.add_argument("--modes", default="defaults,fixed", help="defaults,fixed")
    p.add_argument("--peers", default="all", help=f"'all', 'none' or a subset of {PEERS}")
    p.add_argument("--no-ours", action="store_true", help="skip this repository's package")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="thread count for every tool (default: each tool's own)",
    )
    p.add_argument("--n-pcs", type=int, default=50)
    p.add_argument("--n-batches", type=int, default=8)
    p.add_argument("--n-cell-types", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lisi-cells",
        type=int,
        default=20000,
        help="cells subsampled for LISI scoring (default 20000)",
    )
    p.add_argument(
        "--name",
        default=time.strftime("%Y%m%d-%H%M%S"),
        help="results file stem (default: timestamp)",
    )
    p.add_argument(
        "--keep-outputs",
        action="store_true",
        help="keep corrected embeddings under benchmarks/work/outputs",
    )
    p.add_argument(
        "--replot",
        default=None,
        metavar="CSV[,CSV...]",
        help="only redraw time_vs_cells.png from earlier results CSVs",
    )
    args = p.parse_args(argv)
    args.sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s]
    if args.million and 1_000_000 not in args.sizes:
        args.sizes.append(1_000_000)
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.modes) - {"defaults", "fixed"}:
        p.error("--modes takes defaults and/or fixed")
    if args.peers == "all":
        # scanpy's native Harmony needs a source snapshot until 1.13 is released:
        # part of "all" only once its virtualenv or SCANPY_SOURCE is there.
        scanpy_ready = bool(SCANPY_SOURCE) or (VENVS / "scanpy-native" / "bin" / "python").exists()
        args.peers = [p for p in PEERS if p != "scanpy-native" or scanpy_ready]
    elif args.peers == "none":
        args.peers = []
    else:
        args.peers = [s for s in args.peers.split(",") if s]
        unknown = set(args.peers) - set(PEERS)
        if unknown:
            p.error(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every selected tool on every size and mode, then report."""
    args = parse_args(argv)
    if args.replot:  # e.g. merge a defaults run and a fixed run into one plot
        frames = [pd.read_csv(path) for path in args.replot.split(",")]
        rows = pd.concat(frames).to_dict("records")
        log(f"wrote {plot_times(rows)}")
        return 0
    tools = [
        t
        for t in TOOLS
        if (t.ours and not args.no_ours and (t.with_peer is None or t.with_peer in args.peers))
        or t.name in args.peers
    ]
    for tool in tools:
        ensure_venv(tool)
    lisi, lisi_name = lisi_function()
    log(f"LISI via {lisi_name}")
    rows: list[dict] = []
    for n_cells in args.sizes:
        inputs = make_inputs(n_cells, args)
        size_rows = [input_row(inputs, n_cells, args, lisi)]
        for mode in args.modes:
            for tool, res in zip(tools, run_tools(tools, inputs, mode, n_cells, args), strict=True):
                res.update(tool=tool.name, algorithm=tool.algorithm, mode=mode, n_cells=n_cells)
                size_rows.append(res)
        add_quality(size_rows[1:], inputs, n_cells, args, lisi)
        rows += size_rows
    add_ratios(rows)
    print(markdown_table(rows))
    stem = write_results(rows, args, lisi_name)
    plot = plot_times(rows)
    log(f"wrote {stem}.csv, {stem}.md" + (f", {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
