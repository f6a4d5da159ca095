"""Benchmark harmonypy's LISI (exact, faiss and IVF neighbour search) against harmonypy 0.2.0.

Usage::

    python benchmarks/bench_lisi.py [--cells 100000] [--dims 30] [--million]
                                    [--pynndescent] [--ten-million]
                                    [--data mixture|simulate] [--probes 16,32,64,96]
                                    [--compare-cells 5000,20000] [--repeats 3]
                                    [--old-cells N] [--old-timeout S] [--skip-old]

Generates an embedding with two label columns (``batch``, ``cell_type``),
times the neighbour search and the scores separately for the exact search
(PyTorch), the exact search by faiss's flat index (when faiss is installed)
and the inverted-file (IVF) search, measures the IVF recall of the exact
neighbours (also for other ``n_probe`` values), runs ``harmonypy==0.2.0``'s
``compute_lisi`` on the same input in its own virtualenv
(``benchmarks/.venvs/harmonypy-0.2.0``, created on first use) and writes a
table to ``benchmarks/results/lisi.md``.  ``--million`` also scores 1,000,000
cells with the IVF search (the default share of probed lists, and the fixed
64 probes used before) and measures recall against exact neighbours of 2,000
sampled cells among all cells; it also times the exact search of 10,000
sampled cells that ``evaluate(n_query=10_000)`` uses.  ``--compare-cells``
times the neighbour searches side by side at those sizes (each ``--repeats``
times, interleaved, medians and ratios reported), checking that faiss finds
the same neighbours and LISI as the PyTorch exact search.  ``--pynndescent`` adds
pynndescent at 1,000,000 cells.  ``--ten-million`` measures the default IVF
search's recall at 10,000,000 cells on 1,000 sampled cells (their rows are
those of a full search, which would take hours on 2 cores: its cost grows as
``IVF_PROBE_FRACTION * n**2``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from harmonypy import neighbors  # noqa: E402 - after the sys.path insertion above
from harmonypy.metrics import lisi as _lisi  # noqa: E402

OLD_VERSION = "0.2.0"
OLD_VENV = HERE / ".venvs" / f"harmonypy-{OLD_VERSION}"
RESULTS = HERE / "results" / "lisi.md"
PERPLEXITY = 30


def make_data(n_cells: int, n_dims: int = 30, n_types: int = 20, n_batches: int = 4, seed: int = 0):
    """Gaussian mixture: cell-type centres, a per-batch shift, PCA-like scales."""
    rng = np.random.default_rng(seed)
    scale = np.linspace(3.0, 0.5, n_dims)  # decreasing variance, like PCs
    centres = rng.normal(size=(n_types, n_dims)) * scale * 2.0
    shifts = rng.normal(size=(n_batches, n_dims)) * scale * 0.2
    cell_type = rng.integers(n_types, size=n_cells)
    batch = rng.integers(n_batches, size=n_cells)
    # in place, so that 10**7 cells need one copy of X, not four
    X = rng.normal(size=(n_cells, n_dims))
    X *= scale * 0.7
    X += centres[cell_type]
    X += shifts[batch]
    meta = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(batch, [f"b{i}" for i in range(n_batches)]),
            "cell_type": pd.Categorical.from_codes(cell_type, [f"t{i}" for i in range(n_types)]),
        }
    )
    return X, meta


def make_input(kind: str, n_cells: int, n_dims: int, seed: int = 0):
    """The benchmark's Gaussian mixture, or harmonypy's simulator (PC-like scales)."""
    if kind == "mixture":
        return make_data(n_cells, n_dims, seed=seed)
    from harmonypy._simulate import simulate

    X, meta = simulate(n_cells, n_dims, 8, 10, seed=seed)
    return X.astype(np.float64), meta[["batch", "cell_type"]]


def time_ours(X, meta, neighbors_method: str, **knn_kwargs):
    """Neighbours and scores timed separately; returns (lisi, idx, knn s, score s)."""
    labels = ["batch", "cell_type"]
    codes = [_lisi._encode_labels(meta[c], c) for c in labels]
    k = _lisi._neighbourhood_size(PERPLEXITY, X.shape[0])
    Xf = np.ascontiguousarray(X, dtype=np.float64)
    t0 = time.perf_counter()
    if knn_kwargs:  # only the IVF search takes options
        found = neighbors.knn_ivf(Xf, k, **knn_kwargs)
    else:
        found = neighbors.knn(Xf, k, method=neighbors_method)
    t1 = time.perf_counter()
    idx = found.indices
    lisi = _lisi._lisi_from_knn(found.distances, idx, codes, float(PERPLEXITY))
    t2 = time.perf_counter()
    return lisi, idx, t1 - t0, t2 - t1


def ensure_old_venv() -> Path:
    py = OLD_VENV / "bin" / "python"
    if py.exists():
        check = subprocess.run(
            [str(py), "-c", "import harmonypy.lisi"], capture_output=True, text=True
        )
        if check.returncode == 0:
            return py
    print(f"creating {OLD_VENV} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(OLD_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    # torch first and pinned: an unpinned torch would pull the multi-GB CUDA build
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + [f"harmonypy=={OLD_VERSION}"], check=True)
    return py


OLD_DRIVER = r"""
import sys, time, json
import numpy as np, pandas as pd
from harmonypy.lisi import compute_lisi
X = np.load(sys.argv[1]); meta = pd.read_pickle(sys.argv[2])
t0 = time.perf_counter()
res = compute_lisi(X, meta, ["batch", "cell_type"], perplexity=30)
t = time.perf_counter() - t0
np.save(sys.argv[3], res)
print(json.dumps({"seconds": t}))
"""


def time_old(X, meta, timeout: float):
    """Run harmonypy 0.2.0 in its own venv; returns (lisi, seconds) or (None, msg)."""
    py = ensure_old_venv()
    with tempfile.TemporaryDirectory() as tmp:
        xp, mp, rp = (os.path.join(tmp, n) for n in ("x.npy", "meta.pkl", "res.npy"))
        np.save(xp, X)
        meta.to_pickle(mp)
        try:
            out = subprocess.run(
                [str(py), "-c", OLD_DRIVER, xp, mp, rp],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return None, f"> {timeout:.0f} s (timed out)"
        if out.returncode != 0:
            return None, "failed: " + out.stderr.strip().splitlines()[-1]
        seconds = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
        return np.load(rp), seconds


OUR_DRIVER = r"""
import sys, time, json
import numpy as np, pandas as pd
import harmonypy as hm
X = np.load(sys.argv[1]); meta = pd.read_pickle(sys.argv[2])
t0 = time.perf_counter()
res = hm.compute_lisi(X, meta, ["batch", "cell_type"], perplexity=30)
t = time.perf_counter() - t0
np.save(sys.argv[3], res)
print(json.dumps({"seconds": t}))
"""


def time_fresh(X, meta, fused: str | None):
    """``hm.compute_lisi`` with its defaults in a fresh process, timed like
    harmonypy 0.2.0 (the call only, which loads numba's kernels when they
    run); ``fused`` sets HARMONYPY_FUSED (None: unset). Returns (lisi, s)."""
    env = {k: v for k, v in os.environ.items() if k != "HARMONYPY_FUSED"}
    env["PYTHONPATH"] = str(ROOT / "src")
    if fused is not None:
        env["HARMONYPY_FUSED"] = fused
    with tempfile.TemporaryDirectory() as tmp:
        xp, mp, rp = (os.path.join(tmp, n) for n in ("x.npy", "meta.pkl", "res.npy"))
        np.save(xp, X)
        meta.to_pickle(mp)
        out = subprocess.run(
            [sys.executable, "-c", OUR_DRIVER, xp, mp, rp],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        seconds = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
        return np.load(rp), seconds


def recall(idx_approx: np.ndarray, idx_exact: np.ndarray) -> float:
    """Fraction of the exact neighbours that the approximate search found."""
    hits = 0
    for s in range(0, len(idx_exact), 10_000):
        a, e = idx_approx[s : s + 10_000], idx_exact[s : s + 10_000]
        hits += int((a[:, :, None] == e[:, None, :]).any(axis=2).sum())
    return hits / idx_exact.size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--dims", type=int, default=30)
    ap.add_argument("--data", choices=["mixture", "simulate"], default="mixture")
    ap.add_argument(
        "--probes",
        default="16,32,64,96",
        help="comma-separated n_probe values for the IVF recall sweep ('' to skip)",
    )
    ap.add_argument(
        "--old-cells",
        type=int,
        default=None,
        help="cells for harmonypy 0.2.0 (default: same as --cells)",
    )
    ap.add_argument(
        "--compare-cells",
        default="",
        help="comma-separated cell counts at which to time the searches side by side",
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs per search for --compare-cells")
    ap.add_argument("--old-timeout", type=float, default=3600.0)
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument(
        "--million", action="store_true", help="also score 1,000,000 cells with the IVF search"
    )
    ap.add_argument(
        "--pynndescent",
        action="store_true",
        help="with --million: also pynndescent at 1,000,000 cells",
    )
    ap.add_argument(
        "--ten-million",
        action="store_true",
        help="recall of the default IVF search at 10,000,000 cells (sampled cells)",
    )
    args = ap.parse_args(argv)

    import torch

    env = (
        f"{os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}"
    )
    print(env, flush=True)
    rows = []  # (cells, implementation, knn s, scores s, total s, note)
    sweep = []  # (n_probe, knn s, recall)

    X, meta = make_input(args.data, args.cells, args.dims)
    lisi_exact, idx_exact, t_knn, t_sc = time_ours(X, meta, "exact")
    rows.append((args.cells, "harmonypy, exact", t_knn, t_sc, t_knn + t_sc, "matches R to ~1e-15"))
    print(rows[-1], flush=True)

    if neighbors.faiss_available():
        lisi_f, idx_f, f_knn, f_sc = time_ours(X, meta, "faiss")
        rows.append(
            (
                args.cells,
                "harmonypy, exact by faiss (IndexFlatL2)",
                f_knn,
                f_sc,
                f_knn + f_sc,
                f"{_agreement(idx_f, idx_exact, lisi_f, lisi_exact)}; neighbours "
                f"{t_knn / f_knn:.2f}x the PyTorch exact search's speed",
            )
        )
        print(rows[-1], flush=True)

    lisi_ivf, idx_ivf, a_knn, a_sc = time_ours(X, meta, "ivf")
    err = np.abs(lisi_ivf - lisi_exact)
    rows.append(
        (
            args.cells,
            f"harmonypy, IVF (default: n_probe="
            f"{neighbors.ivf_n_probe(neighbors.ivf_n_lists(args.cells))})",
            a_knn,
            a_sc,
            a_knn + a_sc,
            f"recall {recall(idx_ivf, idx_exact):.4f}; |LISI - exact| median "
            f"{np.median(err):.1e}, 99th pct {np.quantile(err, 0.99):.2g}, max {err.max():.2g}",
        )
    )
    print(rows[-1], flush=True)
    for n_probe in [int(p) for p in args.probes.split(",") if p.strip()]:
        _, idx_p, p_knn, _ = time_ours(X, meta, "ivf", n_probe=n_probe)
        sweep.append((n_probe, p_knn, recall(idx_p, idx_exact)))
        print("sweep", sweep[-1], flush=True)

    fresh = {}
    for label, fused in (("defaults, fresh process", None), ("HARMONYPY_FUSED=0", "0")):
        lisi_fresh, seconds = time_fresh(X, meta, fused)
        fresh[label] = seconds
        note = f"|LISI - IVF above| max {np.abs(lisi_fresh - lisi_ivf).max():.1e}"
        rows.append((args.cells, f"harmonypy compute_lisi, {label}", None, None, seconds, note))
        print(rows[-1], flush=True)

    old_line = None
    if not args.skip_old:
        n_old = args.old_cells or args.cells
        if n_old == args.cells:
            ours = {name: rows[i][4] for i, name in enumerate(_our_names())}
            ours.update(fresh)
            Xo, mo = X, meta
            ours_lisi = lisi_exact
        else:
            Xo, mo = make_input(args.data, n_old, args.dims)
            ours_lisi, _, k2, s2 = time_ours(Xo, mo, "exact")
            _, _, k3, s3 = time_ours(Xo, mo, "ivf")
            ours = {"exact": k2 + s2, "IVF": k3 + s3}
            rows.append((n_old, "harmonypy, exact", k2, s2, k2 + s2, ""))
            rows.append((n_old, "harmonypy, IVF", k3, s3, k3 + s3, ""))
        old_lisi, old_t = time_old(Xo, mo, args.old_timeout)
        if old_lisi is None:
            rows.append((n_old, f"harmonypy {OLD_VERSION}", None, None, None, old_t))
        else:
            diff = np.abs(old_lisi - ours_lisi).max()
            rows.append(
                (
                    n_old,
                    f"harmonypy {OLD_VERSION}",
                    None,
                    None,
                    old_t,
                    f"max |LISI - ours exact| {diff:.3g}",
                )
            )
            old_line = (n_old, old_t, ours)
        print(rows[-1], flush=True)

    compare = [compare_backends(args, int(c)) for c in args.compare_cells.split(",") if c.strip()]

    if args.million:
        rows += million(args)

    if args.ten_million:
        rows.append(ten_million(args))
        print(rows[-1], flush=True)

    write_report(rows, sweep, old_line, env, args, compare)
    return 0


def _our_names() -> list[str]:
    """Names of the searches timed at ``--cells``, in the order of their rows."""
    return ["exact"] + (["faiss"] if neighbors.faiss_available() else []) + ["IVF"]


def _agreement(idx, idx_exact, lisi, lisi_exact) -> str:
    """How far a search's neighbours and LISI are from the PyTorch exact search's."""
    same = np.mean(np.sort(idx, axis=1) == np.sort(idx_exact, axis=1))
    return (
        f"same neighbours as exact: {same:.6f}; max |LISI - exact| "
        f"{np.abs(lisi - lisi_exact).max():.1e}"
    )


def compare_backends(args, n: int):
    """The searches side by side at ``n`` cells: medians of interleaved runs.

    Returns (n, {name: [seconds...]}, agreement of faiss with the PyTorch exact search).
    """
    X, meta = make_input(args.data, n, args.dims, seed=n)
    methods = {"exact (PyTorch)": "exact", "ivf": "ivf", "auto": "auto"}
    if neighbors.faiss_available():
        methods["faiss"] = "faiss"
    if neighbors.resolve_method("auto", n) == "ivf":
        del methods["auto"]  # the IVF search again
    times, results = {}, {}
    for _ in range(max(1, args.repeats)):
        for name, method in methods.items():
            lisi, idx, t_knn, _ = time_ours(X, meta, method)
            times.setdefault(name, []).append(t_knn)
            results[name] = (lisi, idx)
    agree = ""
    if "faiss" in results:
        (lisi_f, idx_f), (lisi_e, idx_e) = results["faiss"], results["exact (PyTorch)"]
        agree = _agreement(idx_f, idx_e, lisi_f, lisi_e)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("compare", n, {k: np.median(v) for k, v in times.items()}, agree, flush=True)
    return n, times, agree, load


def million(args, n: int = 1_000_000):
    """IVF (default and the 64 probes used before), pynndescent and a sampled exact search."""
    rows = []
    Xm, mm = make_input(args.data, n, args.dims, seed=1)
    sample = np.random.default_rng(2).choice(n, 2000, replace=False)
    ex = _exact_for_queries(Xm, sample, _lisi._neighbourhood_size(PERPLEXITY, n))
    n_lists = neighbors.ivf_n_lists(n)
    for n_probe, what in ((None, "default"), (neighbors.IVF_PROBES, "before")):
        probe = neighbors.ivf_n_probe(n_lists) if n_probe is None else n_probe
        kwargs = {} if n_probe is None else {"n_probe": n_probe}
        _, idx_m, m_knn, m_sc = time_ours(Xm, mm, "ivf", **kwargs)
        rows.append(
            (
                n,
                f"harmonypy, IVF ({what}: n_probe={probe} of {n_lists} lists)",
                m_knn,
                m_sc,
                m_knn + m_sc,
                f"recall {recall(idx_m[sample], ex):.4f} (2,000 sampled cells)",
            )
        )
        print(rows[-1], flush=True)
        del idx_m
    if args.pynndescent:
        idx_m, m_knn = time_pynndescent(Xm, ex.shape[1])
        if idx_m is None:
            rows.append((n, "harmonypy, pynndescent", None, None, None, m_knn))
        else:
            rows.append(
                (
                    n,
                    "harmonypy, pynndescent",
                    m_knn,
                    None,
                    None,
                    f"recall {recall(idx_m[sample], ex):.4f} (2,000 sampled cells); "
                    "numba compilation included",
                )
            )
        print(rows[-1], flush=True)
        del idx_m
    cells = np.sort(np.random.default_rng(3).choice(n, 10_000, replace=False))
    t0 = time.perf_counter()
    neighbors.knn_of_cells(np.ascontiguousarray(Xm), cells, ex.shape[1])
    rows.append(
        (
            n,
            "harmonypy, exact search of 10,000 sampled cells among all",
            time.perf_counter() - t0,
            None,
            None,
            "what `evaluate(n_query=10_000)` searches; exact",
        )
    )
    print(rows[-1], flush=True)
    return rows


PYNN_DRIVER = r"""
import sys, time, json
import numpy as np
sys.path.insert(0, sys.argv[4])
from harmonypy import neighbors
X = np.load(sys.argv[1])
t0 = time.perf_counter()
idx = neighbors.knn_pynndescent(X, int(sys.argv[3])).indices
t = time.perf_counter() - t0
np.save(sys.argv[2], idx.astype(np.int32))
print(json.dumps({"seconds": t}))
"""


def time_pynndescent(X: np.ndarray, k: int):
    """pynndescent in a child process (a crash there must not end the benchmark).

    Returns (neighbour indices, seconds) or (None, what went wrong).
    """
    with tempfile.TemporaryDirectory() as tmp:
        xp, ip = os.path.join(tmp, "x.npy"), os.path.join(tmp, "idx.npy")
        np.save(xp, X)
        out = subprocess.run(
            [
                sys.executable,
                "-X",
                "faulthandler",
                "-c",
                PYNN_DRIVER,
                xp,
                ip,
                str(k),
                str(ROOT / "src"),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            return None, f"failed (exit status {out.returncode}): {tail}"
        seconds = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
        return np.load(ip).astype(np.int64), seconds


def ten_million(args, n: int = 10_000_000, n_sample: int = 1000):
    """Default IVF recall at 10**7 cells on sampled cells (a full search takes hours)."""
    X, _ = make_input(args.data, n, args.dims, seed=1)
    X = np.ascontiguousarray(X, dtype=np.float64)
    k = _lisi._neighbourhood_size(PERPLEXITY, n)
    sample = np.random.default_rng(2).choice(n, n_sample, replace=False)
    ex = _exact_for_queries(X, sample, k)
    t0 = time.perf_counter()
    idx = neighbors.knn_ivf(X, k, cells=sample).indices
    t = time.perf_counter() - t0
    n_lists = neighbors.ivf_n_lists(n)
    return (
        n,
        f"harmonypy, IVF (default: n_probe={neighbors.ivf_n_probe(n_lists)} of {n_lists} "
        f"lists), {n_sample:,} sampled cells only",
        t,
        None,
        None,
        f"recall {recall(idx, ex):.4f} ({n_sample:,} sampled cells); time = partition "
        "+ search of the sampled cells, not of all cells",
    )


def _exact_for_queries(X: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact neighbours (self excluded) of a few query cells, by brute force."""
    import torch

    T = torch.from_numpy(X)
    out = np.empty((len(queries), k), dtype=np.int64)
    step = max(1, min(100, 2**28 // (8 * len(X))))  # 256 MiB of float64 distances
    for s in range(0, len(queries), step):
        q = queries[s : s + step]
        d = torch.cdist(T[q], T)
        d[torch.arange(len(q)), torch.from_numpy(q)] = float("inf")
        out[s : s + step] = torch.topk(d, k, largest=False).indices.numpy()
    return out


def _fmt(x):
    return "" if x is None else f"{x:.2f}"


def write_report(rows, sweep, old_line, env, args, compare=()):
    data = (
        "Gaussian mixture (20 cell types, 4 batches, PC-like decreasing scales)"
        if args.data == "mixture"
        else "harmonypy._simulate.simulate (10 cell types, 8 batches)"
    )
    cmd = " ".join(
        ["python benchmarks/bench_lisi.py", f"--cells {args.cells}"]
        + ([f"--data {args.data}"] if args.data != "mixture" else [])
        + (["--million"] if args.million else [])
        + (["--pynndescent"] if args.pynndescent else [])
        + (["--ten-million"] if args.ten_million else [])
        + ([f"--probes {args.probes!r}"] if args.probes != "16,32,64,96" else [])
        + ([f"--compare-cells {args.compare_cells}"] if args.compare_cells else [])
        + ([f"--repeats {args.repeats}"] if args.compare_cells else [])
        + ([f"--old-cells {args.old_cells}"] if args.old_cells else [])
        + (["--skip-old"] if args.skip_old else [])
    )
    lines = [
        "# LISI benchmark",
        "",
        f"`{cmd}`",
        "",
        f"Machine: {env}; shared with other jobs, so compare timings within this table. "
        f"Data: {data}, {args.dims} dims; labels `batch` and `cell_type` scored in one "
        f"call, perplexity {PERPLEXITY}.",
        "",
        "| cells | implementation | neighbours (s) | scores (s) | total (s) | notes |",
        "| ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for n, name, a, b, c, note in rows:
        lines.append(f"| {n:,} | {name} | {_fmt(a)} | {_fmt(b)} | {_fmt(c)} | {note} |")
    if old_line:
        n, old_t, ours = old_line
        lines += [""] + [
            f"Speed-up at {n:,} cells, harmonypy {OLD_VERSION} / ours ({name}): "
            f"**{old_t / t:.1f}x** ({old_t:.1f} s vs {t:.1f} s)."
            for name, t in ours.items()
        ]
    if sweep:
        lines += [
            "",
            f"IVF recall of the exact neighbours at {args.cells:,} cells by `n_probe` "
            f"({neighbors.ivf_n_lists(args.cells)} lists):",
            "",
            "| n_probe | neighbours (s) | recall |",
            "| ---: | ---: | ---: |",
        ]
        lines += [f"| {p} | {t:.2f} | {r:.4f} |" for p, t, r in sweep]
    lines += _compare_lines(compare)
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = RESULTS if args.data == "mixture" else RESULTS.with_name(f"lisi-{args.data}.md")
    out.write_text(text)
    print(text)


def _compare_lines(compare) -> list[str]:
    """The side-by-side table of ``--compare-cells``: median seconds and ratios."""
    if not compare:
        return []
    names = list(dict.fromkeys(k for _, times, _, _ in compare for k in times))
    lines = [
        "",
        "Neighbour searches side by side (median seconds of interleaved runs; ratio: "
        "PyTorch exact / this search; load: 1-minute load average at the end):",
        "",
        "| cells | " + " | ".join(names) + " | ratios to PyTorch exact | load | faiss vs exact |",
        "| ---: | " + " | ".join("---:" for _ in names) + " | --- | ---: | --- |",
    ]
    for n, times, agree, load in compare:
        med = {k: float(np.median(v)) for k, v in times.items()}
        base = med["exact (PyTorch)"]
        ratios = ", ".join(f"{k} {base / t:.2f}x" for k, t in med.items() if k != "exact (PyTorch)")
        runs = " | ".join(
            f"{med[k]:.2f} ({', '.join(f'{x:.1f}' for x in times[k])})" if k in med else ""
            for k in names
        )
        lines.append(f"| {n:,} | {runs} | {ratios} | {load:.1f} | {agree} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
