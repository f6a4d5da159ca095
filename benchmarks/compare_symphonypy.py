"""Check ``hm.map_query`` against symphonypy 0.2.4's ``map_embedding`` on the same reference.

One command::

    python benchmarks/compare_symphonypy.py            # 10,000 reference, 20,000 query cells
    python benchmarks/compare_symphonypy.py --ref-cells 20000 --query-cells 100000

A reference is integrated once with this package's Harmony (Harmony 1,
default settings) on simulated PCs (``hm.datasets.simulate``); its ``R``,
``Z_corr``, ``sigma`` and the query's PCs and batch labels are written to
``.npy``/``.csv`` files and symphonypy maps the query in its own virtualenv
(``benchmarks/.venvs/symphonypy-0.2.4``, created on first use with the
machinery of ``benchmarks/run.py``; see ``benchmarks/_symphonypy_worker.py``).
This package maps the same query onto ``hm.build_reference`` of the same run.

For each query design (one batch; one batch variable; two variables) the
table gives the per-PC Pearson r between the two corrected queries (min and
median over PCs), the largest absolute difference of the corrected
coordinates and of ``R``, and the time of each (ours in float32, the
default, and float64; symphonypy's ``map_embedding``, NumPy float64). On a
subset of query cells it compares the mapping scores: ours (R's
``calcPerCellMappingMetric`` default ``Z_orig = TRUE``: the reference's
uncorrected cells) with symphonypy's ``per_cell_confidence`` run on the
reference's uncorrected cells and on its default, the corrected ones.

Results: printed, and written to ``benchmarks/results/symphonypy.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import run as bench_run  # noqa: E402  (benchmarks/run.py: virtualenv machinery)

SYMPHONYPY = bench_run.Tool(
    "symphonypy-0.2.4",
    "harmony1",
    "symphonypy",
    # harmonypy 0.0.10: the NumPy release symphonypy was written against
    # (d x N); it is only imported, the reference comes from our run.
    ("harmonypy==0.0.10", "symphonypy==0.2.4"),
    import_name="symphonypy",
)
WORKER = BENCH / "_symphonypy_worker.py"
WORK = BENCH / "work" / "symphonypy"


def ensure_symphonypy() -> Path:
    """The symphonypy virtualenv's interpreter (created on first use)."""
    bench_run.ensure_venv(SYMPHONYPY)
    return SYMPHONYPY.python()


def write_inputs(folder: Path, ho, ref_pcs, query, query_meta) -> None:
    """What the symphonypy worker reads (see its docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "ref_pcs.npy", np.asarray(ref_pcs, dtype=np.float64))
    np.save(folder / "Z_corr.npy", np.asarray(ho.Z_corr, dtype=np.float64))
    np.save(folder / "R.npy", np.asarray(ho.R, dtype=np.float64))
    np.save(folder / "sigma.npy", np.asarray(ho.sigma, dtype=np.float64).ravel())
    np.save(folder / "query.npy", np.asarray(query, dtype=np.float64))
    query_meta.to_csv(folder / "query_meta.csv", index=False)


def run_symphonypy(
    python: Path,
    inputs: Path,
    out: Path,
    key: str,
    confidence_cells: int,
    threads: int | None = None,
    timeout: float = 3600,
) -> dict:
    """Run the worker once; returns its result.json plus the output folder."""
    cmd = [
        str(python),
        str(WORKER),
        "--inputs",
        str(inputs),
        "--out",
        str(out),
        "--key",
        key,
        "--confidence-cells",
        str(confidence_cells),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=bench_run.peer_env(threads)
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"symphonypy worker failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads((out / "result.json").read_text())


def per_pc_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each column (PC) of a with the same column of b, float64."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.abs(b)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref-cells", type=int, default=10000)
    p.add_argument("--query-cells", type=int, default=20000)
    p.add_argument("--n-pcs", type=int, default=50)
    p.add_argument("--confidence-cells", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=str(BENCH / "results" / "symphonypy.md"))
    args = p.parse_args(argv)

    import torch

    import harmonypy as hm

    if args.threads:
        torch.set_num_threads(args.threads)
    python = ensure_symphonypy()
    n_ref, n_query = args.ref_cells, args.query_cells
    X, meta = hm.datasets.simulate(
        n_ref + n_query, args.n_pcs, 8, 10, seed=args.seed, second_batch=2
    )
    X = X.astype(np.float64)
    ref_pcs, query = X[:n_ref], X[n_ref:]
    ref_meta = meta.iloc[:n_ref].reset_index(drop=True)
    query_meta = meta.iloc[n_ref:].reset_index(drop=True)[["batch", "batch2"]].astype(str)
    ho = hm.run_harmony(ref_pcs, ref_meta, "batch", verbose=False, random_state=args.seed)
    ref = hm.build_reference(ho)
    inputs = WORK / "inputs"
    write_inputs(inputs, ho, ref_pcs, query, query_meta)
    flipped = int((query.max(1) < 0).sum())

    rows = []
    for key in ("", "batch", "batch,batch2"):
        out = WORK / f"out_{key.replace(',', '_') or 'none'}"
        theirs = run_symphonypy(
            python, inputs, out, key, args.confidence_cells if key == "batch" else 0, args.threads
        )
        vars_use = [k for k in key.split(",") if k] or None
        mine = {}
        for dtype in ("float32", "float64"):
            hm.map_query(query[:100], query_meta[:100], ref, vars_use=vars_use, dtype=dtype)
            t0 = time.perf_counter()
            q = hm.map_query(
                query, query_meta, ref, vars_use=vars_use, dtype=dtype, confidence=False
            )
            mine[dtype] = (q, time.perf_counter() - t0)
        z_theirs = np.load(out / "Z_corr.npy")
        r_theirs = np.load(out / "R.npy")
        row = {
            "design": key or "none (one batch)",
            "n_query": n_query,
            "symphonypy_s": theirs["map_embedding_seconds"],
            "projection_exact": theirs["projection_exact"],
        }
        for dtype, (q, seconds) in mine.items():
            r = per_pc_r(q.result().astype(np.float64), z_theirs)
            row[dtype] = {
                "seconds": seconds,
                "r_min": float(r.min()),
                "r_median": float(np.median(r)),
                "max_abs_diff": float(np.abs(q.result() - z_theirs).max()),
                "max_abs_R_diff": float(np.abs(q.R.T - r_theirs).max()),
            }
        if key == "batch":
            n = args.confidence_cells
            q = hm.map_query(query[:n], query_meta[:n], ref, vars_use=vars_use, dtype="float64")
            row["confidence_vs_uncorrected"] = relative(
                q.confidence, np.load(out / "confidence_X_pca.npy")
            )
            row["confidence_vs_corrected"] = relative(
                q.confidence, np.load(out / "confidence_X_pca_harmony.npy")
            )
            row["confidence_cells"] = n
            row["symphonypy_confidence_s"] = theirs.get("confidence_X_pca_seconds")
            # symphonypy keeps sigma in float32: with that sigma the two agree to rounding.
            same_sigma = np.asarray(ho.sigma, dtype=np.float32).astype(np.float64).ravel()
            q = hm.map_query(
                query,
                query_meta,
                ref,
                vars_use=vars_use,
                dtype="float64",
                sigma=same_sigma,
                confidence=False,
            )
            row["float32_sigma_max_abs_diff"] = float(np.abs(q.result() - z_theirs).max())
        rows.append(row)
        print(f"[compare] {row['design']}: done", file=sys.stderr, flush=True)

    lines = [
        "# hm.map_query vs symphonypy 0.2.4 `map_embedding`",
        "",
        f"Reference: {n_ref:,} simulated cells x {args.n_pcs} PCs (8 batches, 10 cell types, "
        f"seed {args.seed}), integrated once by this package's Harmony 1 "
        f"({ref.K} clusters); query: {n_query:,} other cells of the same simulation. Both "
        "map the same query PCs onto the same run's `R`, `Z_corr` and `sigma` "
        f"(symphonypy in its own virtualenv, harmonypy 0.0.10 installed there; its gene "
        f"projection reproduced the PCs exactly: "
        f"{all(r['projection_exact'] for r in rows)}). Query cells whose PCs are all "
        f"negative (symphonypy divides each cell by its largest PC before the cosine "
        f"normalisation, which flips them): {flipped}.",
        "",
        "| query design | per-PC r min | per-PC r median | max abs diff | max abs diff of R "
        "| ours float32 (s) | ours float64 (s) | symphonypy (s) | symphonypy / ours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for dtype in ("float32", "float64"):
            m = row[dtype]
            lines.append(
                f"| {row['design']} ({dtype}) | 1 - {1 - m['r_min']:.1e} "
                f"| 1 - {1 - m['r_median']:.1e} | "
                f"{m['max_abs_diff']:.2e} | {m['max_abs_R_diff']:.2e} | "
                f"{row['float32']['seconds']:.3f} | {row['float64']['seconds']:.3f} | "
                f"{row['symphonypy_s']:.3f} | "
                f"{row['symphonypy_s'] / row['float32']['seconds']:.1f}x |"
            )
    conf = next(r for r in rows if "confidence_vs_uncorrected" in r)
    lines += [
        "",
        f"Mapping score on {conf['confidence_cells']:,} query cells (design `batch`, float64): "
        f"largest relative difference from symphonypy's `per_cell_confidence` with "
        f"`ref_basis_adjusted='X_pca'` (the reference's uncorrected cells, R symphony's "
        f"default `Z_orig = TRUE`): {conf['confidence_vs_uncorrected']:.2e}; with "
        f"symphonypy's default `ref_basis_adjusted='X_pca_harmony'` (corrected cells, R's "
        f"`Z_orig = FALSE`): {conf['confidence_vs_corrected']:.2e}. symphonypy's "
        f"`per_cell_confidence` took {conf['symphonypy_confidence_s']:.2f} s for these cells.",
        "",
        f"The float64 differences above come from `sigma`: symphonypy stores it in float32 "
        f"(0.1 -> 0.10000000149). Mapping with that float32-rounded sigma, ours and "
        f"symphonypy's corrected queries (design `batch`, float64) differ by at most "
        f"{conf['float32_sigma_max_abs_diff']:.2e}.",
        "",
        f"Command: `python benchmarks/compare_symphonypy.py --ref-cells {n_ref} "
        f"--query-cells {n_query}`. Times: one run each, on a shared machine.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
