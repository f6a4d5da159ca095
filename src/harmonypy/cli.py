"""Command-line interface: ``harmonypy run | reference build | map | evaluate | demo``.

Run ``harmonypy --help`` (or ``python -m harmonypy --help``) for the options.
This module holds the argument parser and thin commands; reading, matching
cells by name and writing files is :mod:`harmonypy._io`.

Exit status:

* 0: done, every output written.
* 2: bad input or options, one line on stderr (``harmonypy: error: ...``).
  Everything that can be checked (options, columns, output files) is checked
  before Harmony runs, so nothing was written.
* 1: an unexpected failure (its type and message; ``--debug`` shows the
  traceback). Nothing was written: outputs are renamed into place only when
  all are complete.
* 130: interrupted (Ctrl-C, SIGINT); 143: terminated (SIGTERM, e.g. a
  scheduler's stop or ``timeout``). Every output holds either its previous
  content (or is absent) or, if the signal came during the final renames
  (held back until they are done), its new content; no temporary file is
  left behind, and with ``--nproc`` every process of the group is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from harmonypy._io import (
    FORMATS_HELP, OutputFiles, OutputSpec, Table, check_outputs, close_match, file_format,
    match_cells, read_embedding, read_h5ad, read_meta, save_figure, write_array, write_h5ad,
    write_h5ad_copy, write_table,
)

logger = logging.getLogger(__name__)

PROG = "harmonypy"
# Errors that mean "the input or the options are wrong": exit status 2, one line.
BAD_INPUT = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError,
             ImportError, IsADirectoryError, NotADirectoryError, PermissionError,
             MemoryError)
TABLE_OUTPUTS = ("tsv", "csv", "parquet", "npy")
# Library parameter names in messages, as the options that set them (run).
_OPTION_NAMES = {
    "vars_use": "--vars", "block_size": "--block-size",
    "max_iter_harmony": "--max-iter-harmony", "max_iter_kmeans": "--max-iter-kmeans",
    "epsilon_cluster": "--epsilon-cluster", "epsilon_harmony": "--epsilon-harmony",
    "random_state": "--seed", "ncores": "--threads", "batch_prop_cutoff": "--batch-prop-cutoff",
    "check_memory=False": "--no-memory-check",
    "meta_data": "the metadata", "data_mat": "the embedding",
}
# Library parameter names in messages of map, as the options that set them.
_MAP_OPTION_NAMES = {
    "vars_use": "--vars", "meta_data": "the metadata", "data_mat": "the query",
    "min_probability": "--min-probability", "adjusted_basis": "--adjusted-basis",
    "basis=KEY": "--basis KEY", "layer=KEY": "--layer KEY", "lamb": "--lamb",
    "overwrite=True": "--force", "basis": "--basis", "layer": "--layer",
}
# reference build: run's names, and these.
_REFERENCE_OPTION_NAMES = {"loadings=None": "--no-loadings", "layer=KEY": "--layer KEY",
                           "adjusted_basis": "--adjusted-basis"}
REFERENCE_OUTPUTS = ("npz",)
# The input arguments' help: how cells and metadata rows are paired.
_EMBEDDING_HELP = ("cells x PCs: a table (cell names in its row names or first column), "
                   "an .npy or .zarr array (no cell names) or .h5ad")


def _meta_help(embedding: str, needed: str) -> str:
    return (f"metadata table with one row per cell ({needed}), paired with {embedding}'s "
            f"cells by cell name when both name them, else by position (row order); an .npy "
            f"or .zarr {embedding} names no cells, so its rows are paired by position and "
            f"take META's cell names, if it has any")


# =========================================================================== #
# Option types
# =========================================================================== #
def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more comma-separated names")
    return names


def _numbers(text: str) -> float | list[float]:
    """'2' -> 2.0, '2,1' -> [2.0, 1.0] (one value per variable or per level)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _pcs(text: str) -> tuple[int, int]:
    try:
        first, second = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two PC numbers like 1,2, got {text!r}") from None
    if min(first, second) < 1:
        raise argparse.ArgumentTypeError("PC numbers start at 1")
    return first, second


def _subset_spec(text: str) -> tuple[str, list[str]]:
    """'donor=3pv1,3pv2' -> ('donor', ['3pv1', '3pv2'])."""
    column, sep, values = text.partition("=")
    levels = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not column.strip() or not levels:
        raise argparse.ArgumentTypeError(f"expected COL=VALUE[,VALUE...], got {text!r}")
    return column.strip(), levels


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# =========================================================================== #
# Parser
# =========================================================================== #
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like the library errors."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` unless the help text already explains the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _add_common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a subcommand from resetting a --debug given before it.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", "--overwrite", dest="force", action="store_true",
                        help="replace output files that already exist (default: refuse); an "
                             "input is never replaced")


def _add_name_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "cell names",
        "when EMBEDDING and META both name their cells, rows are matched by name: the same "
        "cells in another order are reordered; repeated names, or cells on one side only, "
        "are an error. Row order is used when one side has no names")
    g.add_argument("--names", metavar="COL",
                   help="column of the EMBEDDING table that holds the cell names (default: "
                        "its row names, else its first column when that holds text, integers "
                        "under a header such as cell, cell_id, barcode, index, id or name, or "
                        "the row numbers 0..N-1 or 1..N)")
    exclusive = g.add_mutually_exclusive_group()
    exclusive.add_argument("--meta-names", metavar="COL",
                           help="column of META that holds the cell names (default: META's "
                                "row names, or the column that shares names with EMBEDDING)")
    exclusive.add_argument("--no-names", action="store_true",
                           help="pair META rows with EMBEDDING rows by position, ignoring cell "
                                "names (a name column of EMBEDDING is still not a PC)")


def _add_subset_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--subset", type=_subset_spec, metavar="COL=VALUE[,VALUE...]",
                        help=f"use only the cells whose metadata column COL holds one of the "
                             f"VALUEs (compared as text) as {what}, e.g. donor=3pv1,3pv2 "
                             f"(default: all cells)")


def _subset_mask(frame: pd.DataFrame, spec: tuple[str, list[str]] | None,
                 source: str) -> np.ndarray | None:
    """Rows of ``frame`` selected by ``--subset COL=VALUES``; None without --subset."""
    if spec is None:
        return None
    column, values = spec
    _check_columns(frame, [column], "--subset", source)
    text = frame[column].astype(str)
    present = set(text)
    unknown = [v for v in values if v not in present]
    if unknown:
        present = sorted(present)
        shown = ", ".join(present[:20]) + (", ..." if len(present) > 20 else "")
        raise ValueError(f"--subset {column}={','.join(values)}: no cell has {column} "
                         f"{', '.join(map(repr, unknown))} in {source} (values: {shown})")
    return text.isin(values).to_numpy()


def _add_harmony_options(parser: argparse.ArgumentParser) -> None:
    """One option per run_harmony parameter. None = leave run_harmony's default."""
    g = parser.add_argument_group(
        "Harmony parameters",
        "list values are comma-separated (--theta 2,1); write --opt=VALUE for values "
        "that start with '-' (--lamb=-1, --epsilon-harmony=-inf)")
    g.add_argument("--theta", type=_numbers, metavar="T[,T...]",
                   help="diversity penalty, one value, one per variable or per level "
                        "(default: 2)")
    g.add_argument("--lamb", type=_numbers, metavar="L[,L...]",
                   help="ridge penalty; -1 estimates it per cluster (default: 1; "
                        "harmony2: estimated)")
    g.add_argument("--sigma", type=_numbers, default=0.1, metavar="S[,S...]",
                   help="soft-clustering bandwidth, one value or one per cluster")
    g.add_argument("--nclust", type=int, metavar="K",
                   help="number of clusters (default: min(round(N / 30), 100))")
    g.add_argument("--tau", type=_number, default=0.0, metavar="X",
                   help="protection of small batches (0: off)")
    g.add_argument("--block-size", type=_number, default=0.05, metavar="F",
                   help="fraction of cells updated at once")
    g.add_argument("--max-iter-harmony", type=int, default=10, metavar="N",
                   help="maximum Harmony iterations")
    g.add_argument("--max-iter-kmeans", type=int, metavar="N",
                   help="maximum clustering rounds per iteration (default: 20; harmony2: 4)")
    g.add_argument("--epsilon-cluster", type=_number, metavar="EPS",
                   help="clustering convergence tolerance (default: 1e-5; harmony2: 1e-3)")
    g.add_argument("--epsilon-harmony", type=_number, metavar="EPS",
                   help="Harmony convergence tolerance (default: 1e-4; harmony2: 1e-2)")
    g.add_argument("--alpha", type=_number, default=0.2, metavar="X",
                   help="scale of the estimated ridge penalty (with --lamb=-1)")
    g.add_argument("--algorithm", choices=("harmony1", "harmony2"), default="harmony1",
                   help="formulas of R harmony 1.2.4 (harmony1) or 2.0 (harmony2)")
    g.add_argument("--batch-prop-cutoff", type=_number, default=1e-5, metavar="X",
                   help="harmony2 only: minimum share of a batch level in a cluster")
    g.add_argument("--device", metavar="DEVICE",
                   help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="floating-point precision")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (random_state)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads, 0 = half the CPUs (default: one thread for small "
                        "inputs, else the cores other processes leave idle)")
    g.add_argument("--no-memory-check", dest="check_memory", action="store_false",
                   help="run even when the estimated peak memory exceeds the available "
                        "memory (default: refuse before the run)")


def build_parser() -> argparse.ArgumentParser:
    """The ``harmonypy`` argument parser with its subcommands."""
    from harmonypy import __version__

    parser = _Parser(
        prog=PROG, formatter_class=_HelpFormatter,
        description="Harmony integration of single-cell embeddings (PyTorch).",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _build_run(commands)
    _build_reference(commands)
    _build_map(commands)
    _build_demo(commands)
    _build_evaluate(commands)
    _build_example_data(commands)
    return parser


def _build_run(commands) -> None:
    p = commands.add_parser(
        "run", formatter_class=_HelpFormatter, help="integrate an embedding",
        description=f"Integrate EMBEDDING (cells x PCs) over the batch columns of META and "
                    f"write the corrected embedding to OUT. Formats: {FORMATS_HELP}, from "
                    f"the extension. With an .h5ad input, META is not needed: the embedding "
                    f"is obsm[--basis] and the batch columns come from obs.",
        epilog=f"example: {PROG} run pcs.tsv.gz meta.tsv.gz --vars donor -o pcs_harmony.tsv.gz")
    p.add_argument("embedding", metavar="EMBEDDING", help=_EMBEDDING_HELP)
    p.add_argument("meta", metavar="META", nargs="?",
                   help=_meta_help("EMBEDDING", "not needed for .h5ad"))
    p.add_argument("--vars", dest="vars_use", type=_names, required=True,
                   metavar="COL[,COL...]", help="batch column(s) to integrate over")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file; .h5ad input may be written to .h5ad or a table. "
                        "Written to a temporary file in the same folder and renamed into "
                        "place when complete")
    p.add_argument("--basis", default="X_pca", metavar="KEY",
                   help=".h5ad input: obsm key of the embedding")
    p.add_argument("--adjusted-basis", default="X_pca_harmony", metavar="KEY",
                   help=".h5ad input: obsm key for the corrected embedding (must differ "
                        "from --basis)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw the embedding before and after Harmony (any format "
                        "matplotlib writes: .png, .pdf, .svg, ...)")
    p.add_argument("--color", type=_names, metavar="COL[,COL...]",
                   help="columns to colour the --plot by (default: the --vars columns)")
    p.add_argument("--plot-pcs", type=_pcs, default=(1, 2), metavar="I,J",
                   help="PCs on the axes of --plot (1-based; batch effects often show "
                        "in later PCs, e.g. 1,4) (default: 1,2)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="run as N processes of one torch.distributed group on this machine, "
                        "each on a contiguous shard of the cells (gloo on CPUs, NCCL when "
                        "every process has a GPU); --threads is then per process (default: "
                        "the CPUs divided among them). For several machines see the "
                        "README's 'Beyond one machine' (default: 1)")
    _add_force(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
    _add_name_options(p)
    _add_harmony_options(p)
    _add_common(p)
    p.set_defaults(handler=command_run)


def _build_demo(commands) -> None:
    p = commands.add_parser(
        "demo", formatter_class=_HelpFormatter,
        help="run Harmony on the bundled PBMC example and report",
        description="Integrate the 3,500-cell PBMC example of the R package (three donors, "
                    "30 PCs), compare with the R package's result and score the mixing.")
    p.add_argument("--algorithm", choices=("harmony1", "harmony2"), default="harmony1",
                   help="Harmony formulas")
    p.add_argument("--device", metavar="DEVICE",
                   help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.add_argument("--plot", metavar="FILE.png", help="draw the embedding before and after")
    _add_force(p)
    p.add_argument("--verbose", action="store_true", help="show Harmony's progress messages")
    _add_common(p)
    p.set_defaults(handler=command_demo)


def _build_example_data(commands) -> None:
    p = commands.add_parser(
        "example-data", formatter_class=_HelpFormatter,
        help="write the bundled 1,200-PBMC example as pcs.tsv.gz and meta.tsv.gz",
        description="Write the bundled example (1,200 PBMCs, 20 PCs; batch column 'donor' = "
                    "the 10x chemistry, 'cell_type') as pcs.tsv.gz and meta.tsv.gz, both "
                    "starting with a cell_id column, to try the other commands on.",
        epilog=f"example: {PROG} example-data . && {PROG} run pcs.tsv.gz meta.tsv.gz "
               f"--vars donor -o pcs_harmony.tsv.gz")
    p.add_argument("folder", metavar="FOLDER", nargs="?", default=".",
                   help="existing folder to write into (default: the current folder)")
    _add_force(p)
    _add_common(p)
    p.set_defaults(handler=command_example_data)


def command_example_data(args: argparse.Namespace) -> int:
    """``harmonypy example-data``: the bundled example as two files."""
    from harmonypy import datasets

    if not Path(args.folder).is_dir():
        raise FileNotFoundError(f"folder not found: {args.folder}")
    existing = [str(Path(args.folder) / f"{key}.tsv.gz") for key in ("pcs", "meta")
                if (Path(args.folder) / f"{key}.tsv.gz").exists()]
    if existing and not args.force:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --force to "
                              f"replace")
    paths = datasets.save_example(args.folder, overwrite=args.force)
    print("\n".join(str(path) for path in paths.values()))
    return 0


def _build_evaluate(commands) -> None:
    p = commands.add_parser(
        "evaluate", formatter_class=_HelpFormatter,
        help="score mixing (iLISI) and cell-type separation (cLISI)",
        description="Local Inverse Simpson Index of EMBEDDING over the --batch column "
                    "(iLISI: 1 = not mixed, number of batches = fully mixed) and the "
                    "--label column (cLISI: 1 = cell types kept apart).",
        epilog=f"example: {PROG} evaluate pcs_harmony.tsv.gz meta.tsv.gz --batch donor "
               f"--label cell_type")
    p.add_argument("embedding", metavar="EMBEDDING", help=_EMBEDDING_HELP)
    p.add_argument("meta", metavar="META", nargs="?",
                   help=_meta_help("EMBEDDING", "not for .h5ad"))
    p.add_argument("--batch", type=_names, required=True, metavar="COL[,COL...]",
                   help="batch column(s) for iLISI")
    p.add_argument("--label", type=_names, metavar="COL[,COL...]",
                   help="cell-type column(s) for cLISI (default: none)")
    p.add_argument("--perplexity", type=_number, default=30.0, metavar="P",
                   help="effective number of neighbours")
    p.add_argument("--basis", default="X_pca_harmony", metavar="KEY",
                   help=".h5ad input: obsm key of the embedding to score")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="also write the per-cell LISI values to this table")
    _add_force(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
    _add_name_options(p)
    _add_common(p)
    p.set_defaults(handler=command_evaluate)


def _build_reference(commands) -> None:
    p = commands.add_parser(
        "reference", formatter_class=_HelpFormatter,
        help="build a reference to map new cells onto (reference build)",
        description="Reference mapping (Symphony): integrate once, keep the reference in a "
                    "file, map new cells onto it with 'harmonypy map'.",
        epilog=f"example: {PROG} reference build pcs.tsv.gz meta.tsv.gz --vars donor "
               f"--labels cell_type -o ref.npz")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = actions.add_parser(
        "build", formatter_class=_HelpFormatter,
        help="run Harmony on a reference and save it for mapping",
        description=f"Integrate EMBEDDING (cells x PCs) over the batch columns of META, as "
                    f"'{PROG} run' does, and save what mapping needs as a reference file "
                    f"(.npz, see docs/mapping.md). Without --vars the cells are one batch: "
                    f"they are clustered (Symphony's buildReference(vars = NULL)) and not "
                    f"corrected, and META is needed only for --labels and --subset. Formats: "
                    f"{FORMATS_HELP}, from the extension. With an .h5ad input, META is not "
                    f"needed (obs has the columns) and the PCA loadings and per-gene scaling "
                    f"are kept too, so that queries can be mapped from their genes.",
        epilog=f"example: {PROG} reference build pcs.tsv.gz meta.tsv.gz --vars donor "
               f"--labels cell_type -o ref.npz")
    b.add_argument("embedding", metavar="EMBEDDING", help=_EMBEDDING_HELP)
    b.add_argument("meta", metavar="META", nargs="?",
                   help=_meta_help("EMBEDDING", "not needed for .h5ad"))
    b.add_argument("--vars", dest="vars_use", type=_names, metavar="COL[,COL...]",
                   help="batch column(s) to integrate over (default: none, the cells are one "
                        "batch; of the Harmony parameters only --nclust, --sigma, --seed, "
                        "--device and --dtype apply then)")
    b.add_argument("--labels", type=_names, metavar="COL[,COL...]",
                   help="columns of META to keep with the reference cells, for label transfer "
                        "('harmonypy map --labels')")
    _add_subset_option(b, "the reference")
    b.add_argument("--no-cells", dest="keep_cells", action="store_false",
                   help="keep only what mapping needs (a file of O(clusters x PCs^2)), not the "
                        "corrected reference cells: no label transfer then")
    b.add_argument("-o", "--output", required=True, metavar="REF.npz",
                   help="reference file to write (.npz); written to a temporary file in the "
                        "same folder and renamed into place when complete")
    b.add_argument("--basis", default="X_pca", metavar="KEY",
                   help=".h5ad input: obsm key of the PCs")
    b.add_argument("--adjusted-basis", default="X_pca_harmony", metavar="KEY",
                   help=".h5ad input: obsm key the mapped queries' corrected PCs go to")
    loadings = b.add_mutually_exclusive_group()
    loadings.add_argument("--loadings", default="PCs", metavar="KEY",
                          help=".h5ad input: varm key of the PCA loadings")
    loadings.add_argument("--no-loadings", action="store_true",
                          help=".h5ad input: keep no gene projection (queries must then come "
                               "in the reference's PC space)")
    b.add_argument("--layer", metavar="KEY",
                   help=".h5ad input: layer holding the matrix the PCA was computed from "
                        "(default: X)")
    _add_force(b)
    b.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
    _add_name_options(b)
    _add_harmony_options(b)
    _add_common(b)
    b.set_defaults(handler=command_reference_build)


def _build_map(commands) -> None:
    p = commands.add_parser(
        "map", formatter_class=_HelpFormatter,
        help="map new cells onto a reference and transfer its labels",
        description=f"Map QUERY onto the reference built by '{PROG} reference build' "
                    f"(Symphony's mapping: the query moves into the reference's corrected "
                    f"space, the reference does not move) and write the corrected PCs, with "
                    f"the per-cell mapping score and, with --labels, the reference's labels "
                    f"transferred by the nearest reference cells. QUERY is a table or .npy "
                    f"in the reference's PC space, or an .h5ad whose genes are projected "
                    f"through the reference's PCA loadings (a reference built from .h5ad), or "
                    f"whose obsm[--basis] holds such PCs.",
        epilog=f"example: {PROG} map query_pcs.tsv.gz query_meta.tsv.gz --reference ref.npz "
               f"--labels cell_type -o mapped.tsv.gz")
    p.add_argument("query", metavar="QUERY", help=_EMBEDDING_HELP)
    p.add_argument("meta", metavar="META", nargs="?",
                   help=_meta_help("QUERY", "needed with --vars; not for .h5ad"))
    p.add_argument("--reference", required=True, metavar="REF.npz",
                   help="reference file from 'harmonypy reference build'")
    p.add_argument("--vars", dest="vars_use", type=_names, metavar="COL[,COL...]",
                   help="the query's batch column(s) (default: the query is one batch)")
    p.add_argument("--labels", type=_names, metavar="COL[,COL...]",
                   help="reference label column(s) to transfer: adds <label>_predicted and "
                        "<label>_probability columns")
    _add_subset_option(p, "the query (needs META for a table)")
    p.add_argument("--min-probability", type=_number, default=0.5, metavar="P",
                   help="below this share of the neighbours' votes the label is 'unknown'")
    p.add_argument("--neighbors", type=int, default=5, metavar="K",
                   help="reference cells that vote on each query cell's label (5: "
                        "Symphony's choice)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file: a table (corrected PCs, labels, mapping_score), .npy "
                        "(corrected PCs only) or, for .h5ad input, .h5ad. Written to a "
                        "temporary file in the same folder and renamed into place")
    p.add_argument("--basis", metavar="KEY",
                   help=".h5ad input: obsm key of query PCs already in the reference's PC "
                        "space (default: project the genes through the reference's loadings)")
    p.add_argument("--adjusted-basis", metavar="KEY",
                   help=".h5ad input: obsm key for the corrected PCs (default: the "
                        "reference's, else X_pca_harmony). An obsm key or obs column the "
                        "mapping writes that the query already has, and that no earlier "
                        "mapping wrote (e.g. its own Harmony correction), is refused unless "
                        "--force")
    p.add_argument("--layer", metavar="KEY",
                   help=".h5ad input: layer to project instead of X")
    p.add_argument("--lamb", type=_numbers, metavar="L[,L...]",
                   help="ridge penalty of the query's batch terms; -1 estimates it (default: 1; "
                        "a harmony2 reference: estimated)")
    p.add_argument("--iterations", type=int, default=1, metavar="N",
                   help="rounds of assignment and correction (1: Symphony's mapping)")
    p.add_argument("--device", metavar="DEVICE",
                   help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="floating-point precision")
    _add_force(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
    _add_name_options(p)
    _add_common(p)
    p.set_defaults(handler=command_map)


def harmony_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """run_harmony keyword arguments from the options; unset ones are left out."""
    mapping = {
        "theta": args.theta, "lamb": args.lamb, "sigma": args.sigma, "nclust": args.nclust,
        "tau": args.tau, "block_size": args.block_size,
        "max_iter_harmony": args.max_iter_harmony, "max_iter_kmeans": args.max_iter_kmeans,
        "epsilon_cluster": args.epsilon_cluster, "epsilon_harmony": args.epsilon_harmony,
        "alpha": args.alpha, "random_state": args.seed, "device": args.device,
        "dtype": args.dtype, "algorithm": args.algorithm,
        "batch_prop_cutoff": args.batch_prop_cutoff, "ncores": args.threads,
        "check_memory": None if args.check_memory else False,
    }
    # Leaving an option out (rather than passing its default) matters: harmony2
    # swaps in its own defaults only for parameters the caller did not pass.
    return {name: value for name, value in mapping.items() if value is not None}


# =========================================================================== #
# Commands
# =========================================================================== #
def _note(args: argparse.Namespace, text: str) -> None:
    """A progress note on stderr (the CLI's own; the library only logs)."""
    if not getattr(args, "quiet", False):
        print(f"{PROG}: {text}", file=sys.stderr)


@contextlib.contextmanager
def _convergence_noted(args: argparse.Namespace) -> Any:
    """The library's ConvergenceWarning as one CLI line naming the option (unless --quiet)."""
    from harmonypy._convergence import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            if not getattr(args, "quiet", False):
                print(f"{PROG}: warning: Harmony did not converge in {args.max_iter_harmony} "
                      f"iteration(s); raise --max-iter-harmony", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)


def command_run(args: argparse.Namespace) -> int:
    """``harmonypy run``: integrate a file and write the result."""
    if args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if file_format(args.embedding) == "h5ad":
        return _run_h5ad(args)
    if args.meta is None:
        raise ValueError("META (the metadata table) is required unless EMBEDDING is .h5ad")
    check_outputs([OutputSpec("-o/--output", args.output, TABLE_OUTPUTS),
                   OutputSpec("--plot", args.plot, None)],
                  {"EMBEDDING": args.embedding, "META": args.meta}, force=args.force)
    embedding, meta = _read_tables(args)
    source = f"the metadata {args.meta}"
    _check_columns(meta, args.vars_use, "--vars", source)
    _check_columns(meta, args.color or [], "--color", source)
    _check_plot_pcs(args, embedding.frame.shape[1])
    from harmonypy._harmony import run_harmony

    start = time.perf_counter()
    if args.nproc > 1:
        from harmonypy._launch import run_in_processes

        with _convergence_noted(args):
            ho = run_in_processes(embedding.frame.to_numpy(), meta, args.vars_use, args.nproc,
                                  verbose=not args.quiet, **harmony_kwargs(args))
        _note(args, f"{args.nproc} processes ({ho.backend}), {ho.bytes_per_process:,} bytes "
                    f"all-reduced by each")
    else:
        with _convergence_noted(args):
            ho = run_harmony(embedding.frame.to_numpy(), meta, args.vars_use,
                             verbose=not args.quiet, **harmony_kwargs(args))
    elapsed = time.perf_counter() - start
    if file_format(args.output) == "npy" and not args.plot:
        # Numbers only: written straight from the engine into the memory-mapped
        # file, chunk by chunk, without a full copy of the result in memory.
        def write_output(path):
            write_array(path, (ho.N, ho.d), ho.numpy_dtype, lambda out: ho.result(out=out))
        figure = None
    else:
        corrected = Table(pd.DataFrame(ho.result(), index=embedding.frame.index,
                                       columns=[f"{c}_harmony" for c in embedding.frame.columns]),
                          embedding.has_names)

        def write_output(path):
            write_table(corrected, path)
        figure = (_embedding_figure(embedding.frame, corrected.frame, meta,
                                    args.color or args.vars_use, args.plot_pcs)
                  if args.plot else None)
    files = _write_outputs([(args.output, write_output),
                            (args.plot, lambda path: save_figure(figure, path))])
    _note(args, f"wrote {args.output}{_replaced(files, args.output)}: {ho.N:,} cells x "
                f"{ho.d} PCs; {_outcome(ho)} in {elapsed:.1f} s")
    if args.plot:
        _note(args, f"wrote {args.plot}{_replaced(files, args.plot)}")
    _note_position(args)
    return 0


def _read_tables(args: argparse.Namespace) -> tuple[Table, pd.DataFrame]:
    """The embedding and the metadata in the embedding's cell order."""
    embedding = read_embedding(args.embedding, names=args.names)
    return _paired(args, embedding, args.embedding, args.meta)


def _paired(args: argparse.Namespace, embedding: Table, embedding_path: str,
            meta_path: str) -> tuple[Table, pd.DataFrame]:
    """``(embedding, metadata in its cell order)``, paired as :func:`match_cells` says.

    Paired by position with an embedding that names no cells (``.npy``,
    ``.zarr``), the metadata's own cell names name the cells, so that the
    outputs keep them. A reordering is noted now; a pairing by position once
    the outputs are written (:func:`_note_position`), so that an error stays
    the only line.
    """
    match = match_cells(embedding, read_meta(meta_path), embedding_path=embedding_path,
                        meta_path=meta_path, meta_names=args.meta_names,
                        by_name=not args.no_names)
    if match.reordered:
        _note(args, match.describe())
    args.position_note = None if match.by_name else match.describe()
    if match.names is not None:
        frame = embedding.frame.copy(deep=False)  # an .npy stays memory-mapped
        frame.index = match.names
        embedding = Table(frame, True, f"the metadata's {match.names_from}")
    return embedding, match.meta


def _note_position(args: argparse.Namespace) -> None:
    """The note of a pairing by position (:func:`_paired`), after the outputs."""
    if getattr(args, "position_note", None):
        _note(args, args.position_note)


def _refuse_name_options(args: argparse.Namespace) -> None:
    """--names/--meta-names/--no-names mean nothing for .h5ad input: say so."""
    given = [option for option, value in (("--names", args.names),
                                          ("--meta-names", args.meta_names),
                                          ("--no-names", args.no_names)) if value]
    if given:
        raise ValueError(f"{', '.join(given)}: not used with .h5ad input, whose cells are "
                         f"named by obs_names and described by obs")


def _run_h5ad(args: argparse.Namespace) -> int:
    if args.meta is not None:
        raise ValueError("META is not used with .h5ad input: the batch columns come from "
                         "adata.obs")
    _refuse_name_options(args)
    if args.adjusted_basis == args.basis:
        raise ValueError(f"--adjusted-basis {args.adjusted_basis!r} is the same as --basis: the "
                         f"corrected embedding would replace the input one; choose another "
                         f"key (default: X_pca_harmony)")
    check_outputs([OutputSpec("-o/--output", args.output, ("h5ad",) + TABLE_OUTPUTS),
                   OutputSpec("--plot", args.plot, None)],
                  {"EMBEDDING": args.embedding}, force=args.force)
    # Backed: X and the layers stay on disk (an atlas's expression matrix is
    # far larger than its PCs); an .h5ad output is a copy of the input file
    # with the new obsm entry written into it.
    adata = read_h5ad(args.embedding, backed=True)
    try:
        return _run_backed_h5ad(args, adata)
    finally:
        adata.file.close()


def _run_backed_h5ad(args: argparse.Namespace, adata) -> int:
    from harmonypy._anndata import _get_basis, integrate

    source = f"adata.obs of {args.embedding}"
    _check_columns(adata.obs, args.vars_use, "--vars", source)
    _check_columns(adata.obs, args.color or [], "--color", source)
    before = _get_basis(adata, args.basis)
    _check_plot_pcs(args, before.shape[1])

    start = time.perf_counter()
    with _convergence_noted(args):
        ho = integrate(adata, args.vars_use, basis=args.basis,
                       adjusted_basis=args.adjusted_basis, nproc=args.nproc,
                       verbose=not args.quiet, **harmony_kwargs(args))
    elapsed = time.perf_counter() - start
    corrected = adata.obsm[args.adjusted_basis]
    if file_format(args.output) == "h5ad":
        entries = dict(obsm={args.adjusted_basis: corrected},
                       uns={"harmony": adata.uns["harmony"]})
        write_output: Callable[[Path], None] = (  # noqa: E731
            lambda path: write_h5ad_copy(args.embedding, path, **entries))
    else:
        columns = [f"PC{i + 1}_harmony" for i in range(corrected.shape[1])]
        table = Table(pd.DataFrame(corrected, index=adata.obs_names, columns=columns), True)
        write_output = lambda path: write_table(table, path)  # noqa: E731
    figure = (_embedding_figure(before, corrected, adata.obs, args.color or args.vars_use,
                                args.plot_pcs)
              if args.plot else None)
    files = _write_outputs([(args.output, write_output),
                            (args.plot, lambda path: save_figure(figure, path))])
    _note(args, f"wrote {args.output}{_replaced(files, args.output)} "
                f"(obsm[{args.adjusted_basis!r}]): {ho.N:,} cells x {ho.d} PCs; "
                f"{_outcome(ho)} in {elapsed:.1f} s")
    if args.plot:
        _note(args, f"wrote {args.plot}{_replaced(files, args.plot)}")
    return 0


def _write_outputs(outputs: Sequence[tuple[str | None, Callable[[Any], None]]]) -> OutputFiles:
    """Write every ``(path, writer)`` with a path, all or none.

    Each writer writes a temporary file beside its destination; only when all
    have finished are they renamed into place together, so an error or
    Ctrl-C while writing the second output leaves the first untouched too.
    """
    with OutputFiles() as files:
        for path, write in outputs:
            if path is not None:
                write(files.stage(path))
        files.commit()
    return files


def _replaced(files: OutputFiles, path: str) -> str:
    final = Path(os.path.realpath(path))
    return " (replaced the previous file)" if final in files.replaced else ""


def _check_columns(meta: pd.DataFrame, columns: Sequence[str], option: str,
                   source: str) -> None:
    """Every name in ``columns`` (given with ``option``) is a column of ``meta``.

    Raises
    ------
    KeyError
        Naming the option, the file, a close match if any, and the columns.
    """
    available = [str(c) for c in meta.columns]
    missing = [c for c in columns if c not in available]
    if not missing:
        return
    hints = []
    for name in missing:
        close = close_match(name, available)
        if close:
            hints.append(f"{close!r} for {name!r}" if len(missing) > 1 else repr(close))
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    shown = ", ".join(available[:30]) + (f", ... ({len(available) - 30} more)"
                                         if len(available) > 30 else "")
    raise KeyError(f"{option}: column(s) {', '.join(map(repr, missing))} not found in "
                   f"{source}{hint}; available: {shown or 'none'}")


def _check_plot_pcs(args: argparse.Namespace, n_pcs: int) -> None:
    if args.plot and max(args.plot_pcs) > n_pcs:
        raise ValueError(f"--plot-pcs {args.plot_pcs[0]},{args.plot_pcs[1]}: the embedding has "
                         f"only {n_pcs} PC{'s' if n_pcs != 1 else ''}")


def _outcome(ho) -> str:
    if ho.converged:
        return f"converged after {ho.n_iter} iteration{'s' if ho.n_iter != 1 else ''}"
    return f"stopped after {ho.n_iter} iterations without converging"


def _embedding_figure(before, after, meta: pd.DataFrame, color: Sequence[str],
                      pcs: tuple[int, int] = (1, 2)):
    """The before/after scatter plot as a matplotlib Figure (not yet saved)."""
    from harmonypy.plotting import _pyplot, embedding_figsize, plot_embedding

    _pyplot()  # the install hint when matplotlib is missing
    from matplotlib.figure import Figure

    # A Figure outside pyplot renders to a file without choosing a GUI backend
    # or keeping the figure alive in pyplot's registry.
    fig = Figure(figsize=embedding_figsize(len(color)), layout="constrained")
    plot_embedding(before, after, meta.reset_index(drop=True), list(color),
                   dims=(pcs[0] - 1, pcs[1] - 1), fig=fig)
    return fig


# ---------------------------------------------------- reference build, map
def command_reference_build(args: argparse.Namespace) -> int:
    """``harmonypy reference build``: integrate a reference and save it for mapping."""
    from harmonypy._reference import build_reference

    if args.labels and not args.keep_cells:
        raise ValueError("--labels: labels are kept with the reference cells; drop --no-cells")
    one_batch = None if args.vars_use else _one_batch_kwargs(args)
    if file_format(args.embedding) == "h5ad":
        return _reference_build_h5ad(args, one_batch)
    _refuse_h5ad_options(args, [("--layer", args.layer), ("--no-loadings", args.no_loadings)])
    if one_batch is not None:
        return _build_one_batch(args, one_batch)
    if args.meta is None:
        raise ValueError("--vars names columns of META, the metadata table, which was not "
                         "given (without --vars the cells are one batch)")
    check_outputs([OutputSpec("-o/--output", args.output, REFERENCE_OUTPUTS)],
                  {"EMBEDDING": args.embedding, "META": args.meta}, force=args.force)
    embedding, meta = _read_tables(args)
    source = f"the metadata {args.meta}"
    _check_columns(meta, args.vars_use, "--vars", source)
    _check_columns(meta, args.labels or [], "--labels", source)
    embedding, meta = _take_rows(embedding, meta, _subset_mask(meta, args.subset, source))
    from harmonypy._harmony import run_harmony

    start = time.perf_counter()
    with _convergence_noted(args):
        ho = run_harmony(embedding.frame.to_numpy(), meta, args.vars_use,
                         verbose=not args.quiet, **harmony_kwargs(args))
    # The reference keeps the cells' names (from the embedding) with its cells.
    named = meta.set_axis(embedding.frame.index) if embedding.has_names else meta
    ref = build_reference(ho, named, labels=args.labels, keep_cells=args.keep_cells)
    elapsed = time.perf_counter() - start
    files = _write_outputs([(args.output, ref.write)])
    _note(args, f"wrote {args.output}{_replaced(files, args.output)}: {_describe_reference(ref)}; "
                f"{_outcome(ho)} in {elapsed:.1f} s")
    _note_position(args)
    return 0


#: Harmony options that also apply to a one-batch reference (clustered, not
#: integrated): build_reference(pcs, ...)'s nclust, sigma, random_state, device, dtype.
_ONE_BATCH_OPTIONS = ("nclust", "sigma", "seed", "device", "dtype")


def _one_batch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """build_reference's keyword arguments for a one-batch reference (no --vars).

    Refuses the Harmony options that a one-batch reference would ignore, when
    set to anything but their default (the defaults are read from a parser of
    the same options, so they cannot drift).
    """
    scratch = argparse.ArgumentParser(add_help=False)
    _add_harmony_options(scratch)
    defaults = vars(scratch.parse_args([]))
    given = [name for name, default in defaults.items()
             if name not in _ONE_BATCH_OPTIONS and getattr(args, name) != default]
    if given:
        options = ["--no-memory-check" if name == "check_memory" else
                   "--" + name.replace("_", "-") for name in given]
        raise ValueError(f"{', '.join(options)}: Harmony parameters, but no --vars: a "
                         f"one-batch reference is clustered, not integrated (of the Harmony "
                         f"options only {', '.join('--' + o for o in _ONE_BATCH_OPTIONS)} "
                         f"apply); give --vars to integrate over batch columns")
    return {"nclust": args.nclust, "sigma": args.sigma, "random_state": args.seed,
            "device": args.device, "dtype": args.dtype}


def _build_one_batch(args: argparse.Namespace, one_batch: dict[str, Any]) -> int:
    """``reference build`` of a table or .npy without --vars: one batch, no Harmony run."""
    from harmonypy._reference import build_reference

    inputs = {"EMBEDDING": args.embedding}
    if args.meta is not None:
        inputs["META"] = args.meta
    else:
        needs_meta = [option for option, value in (("--labels", args.labels),
                                                   ("--subset", args.subset)) if value]
        if needs_meta:
            raise ValueError(f"{', '.join(needs_meta)} names columns of META, the metadata "
                             f"table, which was not given")
    check_outputs([OutputSpec("-o/--output", args.output, REFERENCE_OUTPUTS)], inputs,
                  force=args.force)
    if args.meta is None:
        embedding, meta = read_embedding(args.embedding, names=args.names), None
    else:
        embedding, meta = _read_tables(args)
        source = f"the metadata {args.meta}"
        _check_columns(meta, args.labels or [], "--labels", source)
        embedding, meta = _take_rows(embedding, meta, _subset_mask(meta, args.subset, source))
    # The reference keeps the cells' names (from the embedding) with its cells.
    cells = embedding.frame if embedding.has_names else embedding.frame.to_numpy()
    named = meta.set_axis(embedding.frame.index) if (
        meta is not None and embedding.has_names) else meta
    start = time.perf_counter()
    ref = build_reference(cells, named, labels=args.labels, keep_cells=args.keep_cells,
                          **one_batch)
    elapsed = time.perf_counter() - start
    files = _write_outputs([(args.output, ref.write)])
    _note(args, f"wrote {args.output}{_replaced(files, args.output)}: {_describe_reference(ref)}; "
                f"one batch, clustered in {elapsed:.1f} s")
    _note_position(args)
    return 0


def _reference_build_h5ad(args: argparse.Namespace, one_batch: dict[str, Any] | None) -> int:
    from harmonypy._reference import build_reference

    if args.meta is not None:
        raise ValueError("META is not used with .h5ad input: the batch and label columns come "
                         "from adata.obs")
    _refuse_name_options(args)
    if args.adjusted_basis == args.basis:
        raise ValueError(f"--adjusted-basis {args.adjusted_basis!r} is the same as --basis; "
                         f"choose another key (default: X_pca_harmony)")
    check_outputs([OutputSpec("-o/--output", args.output, REFERENCE_OUTPUTS)],
                  {"EMBEDDING": args.embedding}, force=args.force)
    adata = read_h5ad(args.embedding)
    source = f"adata.obs of {args.embedding}"
    _check_columns(adata.obs, args.vars_use or [], "--vars", source)
    _check_columns(adata.obs, args.labels or [], "--labels", source)
    mask = _subset_mask(adata.obs, args.subset, source)
    if mask is not None:
        adata = adata[mask].copy()
    start = time.perf_counter()
    options = one_batch if one_batch is not None else {"verbose": not args.quiet,
                                                       **harmony_kwargs(args)}
    ref = build_reference(adata, args.vars_use, labels=args.labels, keep_cells=args.keep_cells,
                          basis=args.basis, adjusted_basis=args.adjusted_basis,
                          loadings=None if args.no_loadings else args.loadings,
                          layer=args.layer, **options)
    elapsed = time.perf_counter() - start
    files = _write_outputs([(args.output, ref.write)])
    genes = (f", projection from {ref.projection.n_genes:,} genes"
             if ref.projection is not None else "")
    _note(args, f"wrote {args.output}{_replaced(files, args.output)}: "
                f"{_describe_reference(ref)}{genes}; built in {elapsed:.1f} s")
    return 0


def _take_rows(embedding: Table, meta: pd.DataFrame | None,
               mask: np.ndarray | None) -> tuple[Table, pd.DataFrame | None]:
    """The embedding and metadata rows selected by ``mask`` (all when None)."""
    if mask is None:
        return embedding, meta
    return (Table(embedding.frame[mask], embedding.has_names, embedding.names_from),
            None if meta is None else meta[mask].reset_index(drop=True))


def _describe_reference(ref) -> str:
    labels = f", labels {', '.join(ref.label_columns)}" if ref.label_columns else ""
    cells = "" if ref.cells is not None else " (cells not kept)"
    return (f"reference of {ref.n_cells:,} cells{cells} x {ref.d} PCs, {ref.K} clusters "
            f"({ref.algorithm}){labels}")


def _refuse_h5ad_options(args: argparse.Namespace, options) -> None:
    given = [option for option, value in options if value]
    if given:
        raise ValueError(f"{', '.join(given)}: only for .h5ad input")


@contextlib.contextmanager
def _warnings_as_notes() -> Any:
    """Show the library's warnings as ``harmonypy: warning: ...`` lines (even on error)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                print(f"{PROG}: warning: {warning.message}", file=sys.stderr)


def command_map(args: argparse.Namespace) -> int:
    """``harmonypy map``: map query cells onto a saved reference."""
    from harmonypy._reference import load_reference

    h5ad = file_format(args.query) == "h5ad"
    check_outputs([OutputSpec("-o/--output", args.output,
                              (("h5ad",) if h5ad else ()) + TABLE_OUTPUTS)],
                  {"QUERY": args.query, "META": args.meta, "--reference": args.reference},
                  force=args.force)
    if args.labels and file_format(args.output) == "npy":
        raise ValueError("--labels: a .npy output holds the corrected PCs only; write a table "
                         "(.tsv, .csv, .parquet) or .h5ad to keep the labels")
    if not 0 <= args.min_probability <= 1:
        raise ValueError(f"--min-probability must be in [0, 1], got {args.min_probability}")
    if args.neighbors < 1:
        raise ValueError(f"--neighbors must be >= 1, got {args.neighbors}")
    if args.iterations < 1:
        raise ValueError(f"--iterations must be at least 1, got {args.iterations}")
    ref = load_reference(args.reference)
    _check_reference_labels(ref, args.labels or [], args.reference, args.neighbors)
    start = time.perf_counter()
    with _warnings_as_notes():
        if h5ad:
            q, write_output = _map_h5ad(args, ref)
        else:
            q, write_output = _map_table(args, ref)
    elapsed = time.perf_counter() - start
    files = _write_outputs([(args.output, write_output)])
    _note(args, f"wrote {args.output}{_replaced(files, args.output)}: {q.N:,} cells x {q.d} PCs "
                f"mapped onto {_describe_reference(ref)} in {elapsed:.1f} s")
    _note_position(args)
    return 0


def _check_reference_labels(ref, labels: Sequence[str], path: str, neighbors: int) -> None:
    missing = [label for label in labels if label not in ref.label_columns]
    if missing:
        hints = [close_match(m, ref.label_columns) for m in missing]
        hint = "".join(f" (did you mean {h!r}?)" for h in hints if h)
        raise KeyError(f"--labels: {', '.join(map(repr, missing))} not a label column of the "
                       f"reference {path}{hint}; its label columns: "
                       f"{', '.join(ref.label_columns) or 'none (build it with --labels)'}")
    if labels and ref.cells is None:
        raise ValueError(f"--labels: the reference {path} keeps no cells (built with "
                         f"--no-cells), and label transfer needs them")
    for label in labels:
        labelled = int((ref.labels[label].cat.codes >= 0).sum())
        if labelled == 0:
            raise ValueError(f"--labels: no cell of the reference {path} has a {label!r} "
                             f"label (all missing), so none can vote")
        if neighbors > labelled:
            raise ValueError(f"--neighbors {neighbors}: the reference {path} has "
                             f"{labelled:,} reference cells labelled in {label!r}, the most "
                             f"that can vote; give --neighbors {labelled} or fewer")


def _map_table(args: argparse.Namespace, ref):
    """Map a table or .npy query: ``(MappedQuery, writer of the output)``."""
    from harmonypy._mapping import map_query, transfer_labels

    _refuse_h5ad_options(args, [("--basis", args.basis), ("--adjusted-basis", args.adjusted_basis),
                                ("--layer", args.layer)])
    if (args.vars_use or args.subset) and args.meta is None:
        option = "--vars" if args.vars_use else "--subset"
        raise ValueError(f"{option} names columns of META, the query's metadata table, which "
                         f"was not given")
    embedding = read_embedding(args.query, names=args.names)
    meta = None
    if args.meta is not None:
        embedding, meta = _paired(args, embedding, args.query, args.meta)
        _check_columns(meta, args.vars_use or [], "--vars", f"the metadata {args.meta}")
        embedding, meta = _take_rows(embedding, meta,
                                     _subset_mask(meta, args.subset, f"the metadata {args.meta}"))
    n_pcs = embedding.frame.shape[1]
    if n_pcs != ref.d:
        raise ValueError(f"the query {args.query} has {n_pcs} PC columns but the reference "
                         f"{args.reference} was built on {ref.d}: map cells in the reference's "
                         f"PC space")
    q = map_query(embedding.frame.to_numpy(), meta, ref, vars_use=args.vars_use,
                  lamb=args.lamb, device=args.device, dtype=args.dtype,
                  iterations=args.iterations)
    frame = pd.DataFrame(q.result(), index=embedding.frame.index,
                         columns=[f"{c}_harmony" for c in embedding.frame.columns])
    if file_format(args.output) != "npy":
        for label in args.labels or []:
            predicted = transfer_labels(q, ref, label, k=args.neighbors,
                                        min_probability=args.min_probability)
            frame[f"{label}_predicted"] = predicted["label"].to_numpy()
            frame[f"{label}_probability"] = predicted["probability"].to_numpy()
        frame["mapping_score"] = q.confidence
    table = Table(frame, embedding.has_names)
    return q, lambda path: write_table(table, path)


def _map_h5ad(args: argparse.Namespace, ref):
    """Map an .h5ad query (genes projected, or obsm[--basis]): ``(MappedQuery, writer)``."""
    from harmonypy._anndata import SCORE_COLUMN
    from harmonypy._mapping import map_query

    if args.meta is not None:
        raise ValueError("META is not used with .h5ad input: the batch columns come from "
                         "adata.obs")
    _refuse_name_options(args)
    adata = read_h5ad(args.query)
    source = f"adata.obs of {args.query}"
    _check_columns(adata.obs, args.vars_use or [], "--vars", source)
    mask = _subset_mask(adata.obs, args.subset, source)
    if mask is not None:
        adata = adata[mask].copy()
    q = map_query(adata, ref, key=args.vars_use, basis=args.basis,
                  adjusted_basis=args.adjusted_basis, layer=args.layer, labels=args.labels,
                  k=args.neighbors, min_probability=args.min_probability, lamb=args.lamb,
                  device=args.device, dtype=args.dtype, iterations=args.iterations,
                  overwrite=args.force)
    if file_format(args.output) == "h5ad":
        return q, lambda path: write_h5ad(adata, path)
    corrected = adata.obsm[adata.uns["harmony_mapping"]["adjusted_basis"]]
    frame = pd.DataFrame(corrected, index=adata.obs_names,
                         columns=[f"PC{i + 1}_harmony" for i in range(corrected.shape[1])])
    if file_format(args.output) != "npy":
        for label in args.labels or []:
            for column in (f"{label}_predicted", f"{label}_probability"):
                frame[column] = adata.obs[column].to_numpy()
        frame["mapping_score"] = adata.obs[SCORE_COLUMN].to_numpy()
    table = Table(frame, True)
    return q, lambda path: write_table(table, path)


# ------------------------------------------------------------------- demo
def command_demo(args: argparse.Namespace) -> int:
    """``harmonypy demo``: the PBMC example with a short report on stdout."""
    from harmonypy import __version__, datasets
    from harmonypy._harmony import run_harmony

    check_outputs([OutputSpec("--plot", args.plot, None)], {}, force=args.force)
    pcs, meta, reference = datasets.load_pbmc_3500()
    r_version = "1.2.4"
    if args.algorithm == "harmony2":
        reference, r_version = datasets.load_pbmc_3500_harmony2_reference(), "2.0.4"
    start = time.perf_counter()
    ho = run_harmony(pcs, meta, "donor", verbose=args.verbose, algorithm=args.algorithm,
                     device=args.device, random_state=args.seed)
    elapsed = time.perf_counter() - start
    corrected = ho.Z_corr.T

    lines = [f"harmonypy {__version__} demo: PBMC example of the R package harmony", ""]
    lines += _rows([
        ("cells", f"{ho.N:,}"),
        ("PCs", f"{ho.d}"),
        ("batches", _level_counts(meta["donor"])),
        ("run", f"{ho.algorithm} on {ho.device} ({str(ho.dtype).replace('torch.', '')}), "
                f"K = {ho.K} clusters, seed {args.seed}"),
        ("result", f"{_outcome(ho)} in {elapsed:.2f} s"),
        ("R agreement", _agreement(corrected, reference, r_version)),
    ])
    lines += _rows(_mixing_rows(pcs.to_numpy(), corrected, meta))
    print("\n".join(lines))
    if args.plot:
        # In this data set the donor effect lies mostly along PC4.
        figure = _embedding_figure(pcs, pd.DataFrame(corrected, columns=list(pcs.columns)),
                                   meta, ["donor"], pcs=(1, 4))
        files = _write_outputs([(args.plot, lambda path: save_figure(figure, path))])
        print(f"\nwrote {args.plot}{_replaced(files, args.plot)}")
    return 0


def _rows(pairs: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(name) for name, _ in pairs)
    return [f"  {name:<{width}}  {value}" for name, value in pairs]


def _level_counts(column: pd.Series) -> str:
    counts = column.value_counts().sort_index()
    levels = ", ".join(f"{level} ({n:,})" for level, n in counts.items())
    return f"{column.name}: {len(counts)} levels, {levels}"


def _agreement(corrected: np.ndarray, reference: pd.DataFrame, r_version: str) -> str:
    """Per-PC Pearson correlation with the R package's corrected PCs."""
    ref = reference.to_numpy(dtype=float)
    ours = np.asarray(corrected, dtype=float)
    ours_c, ref_c = ours - ours.mean(0), ref - ref.mean(0)
    r = (ours_c * ref_c).sum(0) / np.sqrt((ours_c ** 2).sum(0) * (ref_c ** 2).sum(0))
    worst = int(np.argmin(r))
    return (f"per-PC Pearson r with R harmony {r_version}: median {np.median(r):.4f}, "
            f"min {r[worst]:.4f} ({reference.columns[worst]})")


def _mixing_rows(before: np.ndarray, after: np.ndarray,
                 meta: pd.DataFrame) -> list[tuple[str, str]]:
    from harmonypy import evaluate

    scores = [evaluate(x, meta, "donor") for x in (before, after)]
    return [("iLISI donor", f"median {scores[0].ilisi_median:.2f} before -> "
                            f"{scores[1].ilisi_median:.2f} after "
                            f"(1 = separated, {scores[0].n_batches} = fully mixed)")]


# --------------------------------------------------------------- evaluate
def command_evaluate(args: argparse.Namespace) -> int:
    """``harmonypy evaluate``: LISI summary table on stdout."""
    from harmonypy import compute_lisi

    check_outputs([OutputSpec("-o/--output", args.output, TABLE_OUTPUTS)],
                  {"EMBEDDING": args.embedding, "META": args.meta}, force=args.force)
    embedding, meta, cells, source = _evaluation_input(args)
    _check_columns(meta, args.batch, "--batch", source)
    _check_columns(meta, args.label or [], "--label", source)
    labels = args.batch + (args.label or [])
    lisi = compute_lisi(embedding, meta, labels, perplexity=args.perplexity)
    kinds = ["iLISI"] * len(args.batch) + ["cLISI"] * len(args.label or [])
    summary = lisi_summary(lisi, meta, labels, kinds)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.output:
        columns = [f"{kind}_{label}" for kind, label in zip(kinds, labels)]
        table = Table(pd.DataFrame(lisi, index=cells, columns=columns), cells is not None)
        files = _write_outputs([(args.output, lambda path: write_table(table, path))])
        _note(args, f"wrote {args.output}{_replaced(files, args.output)}")
    _note_position(args)
    return 0


def _evaluation_input(args: argparse.Namespace) -> tuple[np.ndarray, pd.DataFrame, Any, str]:
    """(embedding (n_cells, n_dims), metadata in cell order, cell names or None, its source)."""
    if file_format(args.embedding) == "h5ad":
        from harmonypy._anndata import _get_basis

        if args.meta is not None:
            raise ValueError("META is not used with .h5ad input: labels come from adata.obs")
        _refuse_name_options(args)
        adata = read_h5ad(args.embedding, backed=True)  # X is not needed: not loaded
        try:
            return (_get_basis(adata, args.basis), adata.obs.reset_index(drop=True),
                    adata.obs_names, f"adata.obs of {args.embedding}")
        finally:
            adata.file.close()
    if args.meta is None:
        raise ValueError("META (the metadata table) is required unless EMBEDDING is .h5ad")
    embedding, meta = _read_tables(args)
    return (embedding.frame.to_numpy(dtype=float), meta, embedding.names,
            f"the metadata {args.meta}")


def lisi_summary(lisi: np.ndarray, meta: pd.DataFrame, labels: Sequence[str],
                 kinds: Sequence[str]) -> pd.DataFrame:
    """One row per label: median, mean and quantiles of the per-cell LISI.

    ``scaled`` maps the median to [0, 1], higher = better, as
    :func:`harmonypy.evaluate` does: iLISI ``(median - 1) / (levels - 1)``,
    cLISI ``(levels - median) / (levels - 1)``.
    """
    rows = []
    for j, (label, kind) in enumerate(zip(labels, kinds)):
        values = lisi[:, j]
        values = values[values > 0]  # -1 marks a cell whose LISI is undefined (as in R)
        n_levels = int(meta[label].nunique())
        median = float(np.median(values)) if values.size else float("nan")
        span = max(n_levels - 1, 1)
        rows.append({
            "score": kind, "column": label, "levels": n_levels,
            "best": n_levels if kind == "iLISI" else 1,
            "median": median,
            "scaled": (median - 1) / span if kind == "iLISI" else (n_levels - median) / span,
            "mean": float(values.mean()) if values.size else float("nan"),
            "q05": float(np.quantile(values, 0.05)) if values.size else float("nan"),
            "q95": float(np.quantile(values, 0.95)) if values.size else float("nan"),
        })
    return pd.DataFrame(rows)


# =========================================================================== #
# Entry point
# =========================================================================== #
class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``timeout``, ``kill``), raised where the
    command was. A ``KeyboardInterrupt``, so that everything that cleans up
    after Ctrl-C (temporary files, the processes of ``--nproc``) does so."""


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into :class:`Terminated` while the command runs (main thread).

    Later SIGTERMs are ignored while the first one's cleanup runs (it takes
    at most a few seconds); the previous handler is restored afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        with _sigterm_raises():
            return handler(args)
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `harmonypy demo | head -3`
        sys.stderr.close()
        return 1
    except BAD_INPUT as err:
        if args.debug:
            raise
        print(f"{PROG}: error: {_message(err, args.command)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the last line of defence of a CLI
        if args.debug:
            raise
        print(f"{PROG}: error: {type(err).__name__}: {_message(err, args.command)} "
              f"(run with --debug for the traceback)", file=sys.stderr)
        return 1


def _message(err: BaseException, command: str | None = None) -> str:
    """One line for ``err``; library parameter names become the options that set them."""
    # str(KeyError) adds quotes around the message; take it as written.
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(text.split()) or type(err).__name__
    names = (_OPTION_NAMES if command == "run" else
             {**_OPTION_NAMES, **_REFERENCE_OPTION_NAMES} if command == "reference" else
             _MAP_OPTION_NAMES if command == "map" else
             {"label_colnames": "--batch/--label"} if command == "evaluate" else {})
    if names:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
        text = pattern.sub(lambda match: names[match.group(1)], text)
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
