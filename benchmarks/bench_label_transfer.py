"""Label transfer's k and min_probability, measured on leave-one-batch-out splits.

Each batch of a bundled data set with cell-type labels is held out in turn:
Harmony integrates the other batches, ``build_reference`` keeps their cells
and labels, the held-out batch is mapped with ``map_query`` and labelled with
``transfer_labels`` for every ``k`` and ``min_probability``. Accuracy counts
an ``unknown`` call as wrong (it is not the annotated type); the unknown rate
is given beside it. The plain 10-nearest-neighbour vote (k = 10, no
threshold) is the yardstick of issue #24.

    python benchmarks/bench_label_transfer.py --out benchmarks/results/label_transfer.md
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import harmonypy as hm  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def splits():
    """(data set, held-out batch, ref pcs, ref meta, query pcs, query meta, batch column)."""
    pcs, meta = hm.datasets.load_pbmcs_small()
    sets = [("pbmcs_small", pcs.to_numpy(), meta.reset_index(drop=True), "donor")]
    cl_pcs = pd.read_csv(SHARED / "cell_lines_small_pcs.tsv.gz", sep="\t")
    cl_meta = pd.read_csv(SHARED / "cell_lines_small_meta.tsv.gz", sep="\t")
    sets.append(
        (
            "cell_lines_small",
            cl_pcs.select_dtypes("number").to_numpy(),
            cl_meta.reset_index(drop=True),
            "dataset",
        )
    )
    for name, X, meta, key in sets:
        for held_out in sorted(meta[key].unique()):
            query = (meta[key] == held_out).to_numpy()
            yield (
                name,
                held_out,
                X[~query],
                meta[~query].reset_index(drop=True),
                X[query],
                meta[query].reset_index(drop=True),
                key,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,3,5,10,15,20,30,50")
    parser.add_argument("--min-probabilities", default="0,0.3,0.5")
    parser.add_argument("--algorithms", default="harmony1,harmony2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    thresholds = [float(p) for p in args.min_probabilities.split(",")]
    rows = []
    for algorithm in args.algorithms.split(","):
        for name, held_out, rx, rmeta, qx, qmeta, key in splits():
            ho = hm.run_harmony(rx, rmeta, key, algorithm=algorithm, verbose=False)
            ref = hm.build_reference(ho, rmeta, labels="cell_type")
            mapped = hm.map_query(qx, qmeta, ref)
            truth = qmeta["cell_type"].astype(str).to_numpy()
            for k, p in itertools.product(ks, thresholds):
                called = (
                    hm.transfer_labels(mapped, ref, "cell_type", k=k, min_probability=p)["label"]
                    .astype(str)
                    .to_numpy()
                )
                rows.append(
                    dict(
                        algorithm=algorithm,
                        data=name,
                        held_out=held_out,
                        k=k,
                        min_probability=p,
                        accuracy=float((called == truth).mean()),
                        unknown=float((called == "unknown").mean()),
                    )
                )
    frame = pd.DataFrame(rows)
    mean = (
        frame.groupby(["algorithm", "k", "min_probability"])[["accuracy", "unknown"]]
        .mean()
        .reset_index()
    )
    lines = [
        "| algorithm | k | min_probability | mean accuracy | mean unknown | worst split |",
        "|---|---|---|---|---|---|",
    ]
    worst = frame.groupby(["algorithm", "k", "min_probability"])["accuracy"].min()
    for _, r in mean.iterrows():
        lines.append(
            f"| {r.algorithm} | {r.k} | {r.min_probability:g} | {r.accuracy:.4f} | "
            f"{r.unknown:.4f} | {worst[(r.algorithm, r.k, r.min_probability)]:.4f} |"
        )
    per_split = frame[(frame.min_probability == 0) & frame.k.isin([5, 10, 30])].pivot_table(
        index=["algorithm", "data", "held_out"], columns="k", values="accuracy"
    )
    text = (
        "Mean over the leave-one-batch-out splits (pbmcs_small: 3 chemistries; "
        "cell_lines_small: 3 data sets).\n\n" + "\n".join(lines) + "\n\nPer split, "
        "no threshold:\n\n```\n" + per_split.round(4).to_string() + "\n```\n"
    )
    print(text)
    if args.out:
        args.out.write_text(
            "# Label transfer: k and min_probability\n\n"
            "`python benchmarks/bench_label_transfer.py`\n\n" + text
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
