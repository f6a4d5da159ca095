"""``harmonypy evaluate``: LISI of an embedding, a summary on stdout."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from harmonypy.cli.inputs import (
    check_columns,
    note_position,
    read_tables,
    refuse_name_options,
)
from harmonypy.cli.options import (
    EMBEDDING_HELP,
    PROG,
    TABLE_OUTPUTS,
    HelpFormatter,
    add_common,
    add_force,
    add_name_options,
    add_quiet,
    meta_help,
    name_list,
    note,
    number,
)
from harmonypy.cli.results import replaced
from harmonypy.io.formats import file_format
from harmonypy.io.outputs import OutputSpec, check_outputs, write_outputs
from harmonypy.io.readers import read_h5ad
from harmonypy.io.tables import Table
from harmonypy.io.writers import write_table

#: Library parameter names in messages, as the options of evaluate that set them.
OPTION_NAMES = {"label_colnames": "--batch/--label"}


def add_evaluate(commands) -> None:
    """Add ``evaluate`` to the subcommands: LISI of an embedding."""
    p = commands.add_parser(
        "evaluate",
        formatter_class=HelpFormatter,
        help="score mixing (iLISI) and cell-type separation (cLISI)",
        description="Local Inverse Simpson Index of EMBEDDING over the --batch column "
        "(iLISI: 1 = not mixed, number of batches = fully mixed) and the "
        "--label column (cLISI: 1 = cell types kept apart).",
        epilog=f"example: {PROG} evaluate pcs_harmony.tsv.gz meta.tsv.gz --batch donor "
        f"--label cell_type",
    )
    p.add_argument("embedding", metavar="EMBEDDING", help=EMBEDDING_HELP)
    p.add_argument("meta", metavar="META", nargs="?", help=meta_help("EMBEDDING", "not for .h5ad"))
    p.add_argument(
        "--batch",
        type=name_list,
        required=True,
        metavar="COL[,COL...]",
        help="batch column(s) for iLISI",
    )
    p.add_argument(
        "--label",
        type=name_list,
        metavar="COL[,COL...]",
        help="cell-type column(s) for cLISI (default: none)",
    )
    p.add_argument(
        "--perplexity",
        type=number,
        default=30.0,
        metavar="P",
        help="effective number of neighbours",
    )
    p.add_argument(
        "--basis",
        default="X_pca_harmony",
        metavar="KEY",
        help=".h5ad input: obsm key of the embedding to score",
    )
    p.add_argument(
        "-o", "--output", metavar="OUT", help="also write the per-cell LISI values to this table"
    )
    add_force(p)
    add_quiet(p)
    add_name_options(p)
    add_common(p)
    p.set_defaults(handler=command_evaluate)


def command_evaluate(args: argparse.Namespace) -> int:
    """``harmonypy evaluate``: LISI summary table on stdout."""
    from harmonypy import compute_lisi

    check_outputs(
        [OutputSpec("-o/--output", args.output, TABLE_OUTPUTS)],
        {"EMBEDDING": args.embedding, "META": args.meta},
        force=args.force,
    )
    embedding, meta, cells, source = _evaluation_input(args)
    check_columns(meta, args.batch, "--batch", source)
    check_columns(meta, args.label or [], "--label", source)
    labels = args.batch + (args.label or [])
    lisi = compute_lisi(embedding, meta, labels, perplexity=args.perplexity)
    kinds = ["iLISI"] * len(args.batch) + ["cLISI"] * len(args.label or [])
    summary = lisi_summary(lisi, meta, labels, kinds)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.output:
        columns = [f"{kind}_{label}" for kind, label in zip(kinds, labels, strict=True)]
        table = Table(pd.DataFrame(lisi, index=cells, columns=columns), cells is not None)
        files = write_outputs([(args.output, lambda path: write_table(table, path))])
        note(args, f"wrote {args.output}{replaced(files, args.output)}")
    note_position(args)
    return 0


def _evaluation_input(args: argparse.Namespace) -> tuple[np.ndarray, pd.DataFrame, Any, str]:
    """(embedding (n_cells, n_dims), metadata in cell order, cell names or None, its source)."""
    if file_format(args.embedding) == "h5ad":
        from harmonypy.adapters.anndata import get_basis

        if args.meta is not None:
            raise ValueError("META is not used with .h5ad input: labels come from adata.obs")
        refuse_name_options(args)
        adata = read_h5ad(args.embedding, backed=True)  # X is not needed: not loaded
        try:
            return (
                get_basis(adata, args.basis),
                adata.obs.reset_index(drop=True),
                adata.obs_names,
                f"adata.obs of {args.embedding}",
            )
        finally:
            adata.file.close()
    if args.meta is None:
        raise ValueError("META (the metadata table) is required unless EMBEDDING is .h5ad")
    embedding, meta = read_tables(args)
    return (
        embedding.frame.to_numpy(dtype=float),
        meta,
        embedding.names,
        f"the metadata {args.meta}",
    )


def lisi_summary(
    lisi: np.ndarray, meta: pd.DataFrame, labels: Sequence[str], kinds: Sequence[str]
) -> pd.DataFrame:
    """One row per label: median, mean and quantiles of the per-cell LISI.

    ``scaled`` maps the median to [0, 1], higher = better, as
    :func:`harmonypy.evaluate` does: iLISI ``(median - 1) / (levels - 1)``,
    cLISI ``(levels - median) / (levels - 1)``.
    """
    rows = []
    for j, (label, kind) in enumerate(zip(labels, kinds, strict=True)):
        values = lisi[:, j]
        values = values[values > 0]  # -1 marks a cell whose LISI is undefined (as in R)
        n_levels = int(meta[label].nunique())
        median = float(np.median(values)) if values.size else float("nan")
        span = max(n_levels - 1, 1)
        rows.append(
            {
                "score": kind,
                "column": label,
                "levels": n_levels,
                "best": n_levels if kind == "iLISI" else 1,
                "median": median,
                "scaled": (median - 1) / span if kind == "iLISI" else (n_levels - median) / span,
                "mean": float(values.mean()) if values.size else float("nan"),
                "q05": float(np.quantile(values, 0.05)) if values.size else float("nan"),
                "q95": float(np.quantile(values, 0.95)) if values.size else float("nan"),
            }
        )
    return pd.DataFrame(rows)
