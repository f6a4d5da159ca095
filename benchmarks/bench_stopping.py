"""The opt-in embedding test against R's objective test: iterations saved, result kept.

Harmony runs on one simulated input with R's rule alone (the default) and with
``epsilon_embedding`` set; the table gives iterations, seconds, the stop reason
and the min per-PC r of each run's corrected embedding against the default run's.

    python benchmarks/bench_stopping.py --cells 1000000 --out benchmarks/results/stopping-1m.md

``--one-run`` reads every tolerance off one default run instead (for 10M cells,
where each run takes minutes): the embedding test draws no random numbers, so
a run with ``epsilon_embedding`` is the default run's bits up to the iteration
where it stops. A callback follows the engine's own measure of the change and
keeps a copy of the embedding where each tolerance would have stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from device_check import per_pc_r  # noqa: E402 - beside this script (minimum over PCs)

import harmonypy as hm  # noqa: E402
from harmonypy._simulate import simulate  # noqa: E402


def one_run(X, meta, algorithm: str, epsilons: list[float]) -> list[dict]:
    """Every tolerance's stop, read off one default run (see the module docstring)."""
    import torch

    from harmonypy.engine.convergence import EmbeddingChange
    from harmonypy.engine.reduce import LOCAL

    change = EmbeddingChange(X.shape[0], device=torch.device("cpu"), reduction=LOCAL)
    t0 = time.perf_counter()
    stops: dict[float, dict] = {}

    def follow(report) -> None:
        delta = change.update(torch.from_numpy(np.ascontiguousarray(report.Z_corr.T)))
        print(f"iteration {report.iteration}: change {delta:.3g}", file=sys.stderr, flush=True)
        for eps in epsilons:
            if eps not in stops and delta < eps:
                stops[eps] = dict(
                    n_iter=report.iteration,
                    seconds=time.perf_counter() - t0,
                    objective=report.objective,
                    Z=np.array(report.Z_corr.T, dtype=np.float32),
                )

    ho = hm.run_harmony(X, meta, "batch", algorithm=algorithm, verbose=False, callback=follow)
    total = time.perf_counter() - t0
    final = ho.result()
    full = dict(
        algorithm=algorithm,
        n_iter=ho.n_iter,
        seconds=total,
        r=1.0,
        objective=ho.objective_harmony[-1],
    )
    rows = [dict(full, eps=None, reason=ho.stop_reason)]
    for eps in epsilons:
        stop = stops.get(eps)
        if stop is None:  # the test never passed: that run is the full run
            rows.append(dict(full, eps=eps, reason=f"{ho.stop_reason} (test not passed)"))
            continue
        Z = stop.pop("Z")
        rows.append(
            dict(algorithm=algorithm, eps=eps, reason="embedding", r=per_pc_r(Z, final), **stop)
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--algorithms", default="harmony2,harmony1")
    parser.add_argument("--epsilons", default="1e-2,3e-3,1e-3")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one-run", action="store_true", help="read every tolerance off one run")
    args = parser.parse_args(argv)
    X, meta = simulate(args.cells, 50, args.batches, seed=0)
    rows = []
    for algorithm in args.algorithms.split(","):
        if args.one_run:
            rows += one_run(X, meta, algorithm, [float(e) for e in args.epsilons.split(",")])
            continue
        reference = None
        for eps in [None] + [float(e) for e in args.epsilons.split(",")]:
            t0 = time.perf_counter()
            ho = hm.run_harmony(
                X, meta, "batch", algorithm=algorithm, epsilon_embedding=eps, verbose=False
            )
            seconds = time.perf_counter() - t0
            Z = ho.result().astype(np.float64)
            if reference is None:
                reference = Z
            rows.append(
                dict(
                    algorithm=algorithm,
                    eps=eps,
                    n_iter=ho.n_iter,
                    seconds=seconds,
                    reason=ho.stop_reason,
                    r=per_pc_r(Z, reference),
                    objective=ho.objective_harmony[-1],
                )
            )
            print(rows[-1], file=sys.stderr, flush=True)
    lines = [
        f"# Stopping on the embedding ({args.cells:,} cells x 50 PCs, {args.batches} batches)",
        "",
        f"`python benchmarks/bench_stopping.py --cells {args.cells}"
        f"{' --one-run' if args.one_run else ''}`; min per-PC r against "
        f"the default run (R's objective test only) of the same algorithm"
        + (" (every tolerance read off one default run: `--one-run`)." if args.one_run else "."),
        "",
        "| algorithm | epsilon_embedding | iterations | stop reason | seconds | last objective "
        "| min per-PC r |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "– (R's test)" if r["eps"] is None else f"{r['eps']:g}"
        lines.append(
            f"| {r['algorithm']} | {eps} | {r['n_iter']} | {r['reason']} | "
            f"{r['seconds']:.1f} | {r['objective']:.1f} | {r['r']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
