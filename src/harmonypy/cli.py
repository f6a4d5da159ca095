"""Command-line interface: ``harmonypy run | demo | evaluate``.

Run ``harmonypy --help`` (or ``python -m harmonypy --help``) for the options.
Bad input ends with one line on stderr, ``harmonypy: error: ...``, and exit
status 2; an unexpected failure prints its type and message and exits with 1
(``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

PROG = "harmonypy"
# Errors that mean "the input or the options are wrong": exit status 2, one line.
BAD_INPUT = (ValueError, TypeError, KeyError, FileNotFoundError, ImportError,
             IsADirectoryError, NotADirectoryError, PermissionError)

_TABLE_SEPARATORS = {".tsv": "\t", ".txt": "\t", ".csv": ","}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TABLE_FORMATS_HELP = "TSV/CSV (.tsv, .txt, .csv, optionally .gz), Parquet (.parquet)"
FORMATS_HELP = f"{TABLE_FORMATS_HELP}, NumPy (.npy) or AnnData (.h5ad)"


# =========================================================================== #
# File formats
# =========================================================================== #
def file_format(path: str | Path) -> str:
    """'tsv', 'csv', 'parquet', 'npy' or 'h5ad', from the file name's extension."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in _TABLE_SEPARATORS:
        return "csv" if last == ".csv" else "tsv"
    if last in (".parquet", ".npy", ".h5ad"):
        return last[1:]
    raise ValueError(f"cannot tell the format of {str(path)!r} from its extension; "
                     f"use {FORMATS_HELP}")


@dataclass
class Table:
    """A cells x columns table and whether its row names are worth writing back."""

    frame: pd.DataFrame
    has_index: bool


def _check_exists(path: str | Path, what: str) -> None:
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} file not found: {path}")


def _read_frame(path: str | Path, what: str) -> Table:
    """Read a TSV/CSV/Parquet table; an unnamed first column becomes the index."""
    _check_exists(path, what)
    fmt = file_format(path)
    if fmt == "parquet":
        _need_pyarrow()
        frame = pd.read_parquet(path)
        return Table(frame, not isinstance(frame.index, pd.RangeIndex))
    if fmt not in ("tsv", "csv"):
        raise ValueError(f"the {what} must be a table ({TABLE_FORMATS_HELP}), got {str(path)!r}")
    frame = pd.read_csv(path, sep=_TABLE_SEPARATORS[".csv" if fmt == "csv" else ".tsv"])
    # A header one field shorter than the rows (R's write.table) already gave an
    # index; pandas' own to_csv(index=True) gives an "Unnamed: 0" column.
    if not isinstance(frame.index, pd.RangeIndex):
        return Table(frame, True)
    if len(frame.columns) and str(frame.columns[0]).startswith("Unnamed: 0"):
        frame = frame.set_index(frame.columns[0])
        frame.index.name = None
        return Table(frame, True)
    return Table(frame, False)


def read_embedding(path: str | Path) -> Table:
    """Read a cells x PCs embedding from a table or ``.npy`` file.

    In a table, a leading non-numeric column (cell names) becomes the index.
    """
    _check_exists(path, "embedding")
    if file_format(path) == "npy":
        values = np.load(path, allow_pickle=False)
        if values.ndim != 2:
            raise ValueError(f"the embedding in {path} must be 2-D (cells x PCs), "
                             f"got shape {values.shape}")
        columns = [f"PC{i + 1}" for i in range(values.shape[1])]
        return Table(pd.DataFrame(values, columns=columns), False)
    table = _read_frame(path, "embedding")
    frame = table.frame
    if not table.has_index and len(frame.columns) and not _numeric(frame.iloc[:, 0]):
        frame = frame.set_index(frame.columns[0])
        table = Table(frame, True)
    bad = [str(c) for c in frame.columns if not _numeric(frame[c])]
    if bad:
        raise ValueError(f"embedding {path}: column(s) {', '.join(map(repr, bad[:5]))} are not "
                         f"numeric (only the first column may hold cell names)")
    return table


def _numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def read_meta(path: str | Path, cells: pd.Index | None, n_cells: int) -> pd.DataFrame:
    """Read the metadata table; reorder it by cell name when both files name cells."""
    table = _read_frame(path, "metadata")
    meta = table.frame
    if cells is not None:
        aligned = _align_by_names(meta, table.has_index, cells)
        if aligned is not None:
            return aligned
    if len(meta) != n_cells:
        raise ValueError(f"metadata {path} has {len(meta)} rows but the embedding has "
                         f"{n_cells} cells")
    return meta.reset_index(drop=True)


def _align_by_names(meta: pd.DataFrame, has_index: bool, cells: pd.Index) -> pd.DataFrame | None:
    """``meta`` in the order of ``cells`` if its index or a column holds exactly those names."""
    wanted = pd.Index(cells.astype(str))
    if not wanted.is_unique:
        return None
    candidates: list[tuple[str | None, pd.Index]] = []
    if has_index:
        candidates.append((None, pd.Index(meta.index.astype(str))))
    for column in meta.columns:
        if not _numeric(meta[column]):
            candidates.append((column, pd.Index(meta[column].astype(str))))
    for column, names in candidates:
        where = "row names" if column is None else f"column {column!r}"
        if len(names) == len(wanted) and names.is_unique and set(names) == set(wanted):
            logger.info("metadata matched to the embedding by %s", where)
            return meta.iloc[names.get_indexer(wanted)].reset_index(drop=True)
        shared = len(set(names) & set(wanted))
        if shared >= len(wanted) / 2:
            # Mostly the same cell names but not all: matching by row order
            # would silently pair cells with the wrong labels.
            raise ValueError(f"the metadata's {where} names cells, but {len(wanted) - shared} "
                             f"of the embedding's {len(wanted)} cells are not among them "
                             f"(or names repeat); give both files the same cells")
    return None


def _need_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError("Parquet files need pyarrow: pip install pyarrow") from None


def write_table(table: Table, path: str | Path) -> None:
    """Write a table (format from the extension); ``.npy`` keeps only the numbers."""
    fmt = file_format(path)
    frame = table.frame
    if fmt == "npy":
        np.save(path, frame.to_numpy())
    elif fmt == "parquet":
        _need_pyarrow()
        frame.to_parquet(path, index=table.has_index)
    elif fmt in ("tsv", "csv"):
        frame.to_csv(path, sep="," if fmt == "csv" else "\t", index=table.has_index)
    else:
        raise ValueError(f"cannot write a table to {str(path)!r}; use {TABLE_FORMATS_HELP}")


def _check_output(path: str | Path, allowed: Sequence[str]) -> str:
    """Fail before the (long) computation if the output cannot be written."""
    fmt = file_format(path)
    if fmt not in allowed:
        raise ValueError(f"output {str(path)!r}: format {fmt!r} not possible here; use one "
                         f"of {', '.join(allowed)}")
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {parent}")
    return fmt


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
                   help="CPU threads, 0 = one per physical core (default: torch's setting)")


def build_parser() -> argparse.ArgumentParser:
    """The ``harmonypy`` argument parser with its three subcommands."""
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
    _build_demo(commands)
    _build_evaluate(commands)
    return parser


def _build_run(commands) -> None:
    p = commands.add_parser(
        "run", formatter_class=_HelpFormatter, help="integrate an embedding",
        description=f"Integrate EMBEDDING (cells x PCs) over the batch columns of META and "
                    f"write the corrected embedding to OUT. Formats: {FORMATS_HELP}, from "
                    f"the extension. With an .h5ad input, META is not needed: the embedding "
                    f"is obsm[--basis] and the batch columns come from obs.",
        epilog=f"example: {PROG} run pcs.tsv.gz meta.tsv.gz --vars donor -o pcs_harmony.tsv.gz")
    p.add_argument("embedding", metavar="EMBEDDING", help="cells x PCs table, .npy or .h5ad")
    p.add_argument("meta", metavar="META", nargs="?",
                   help="metadata table with one row per cell (not needed for .h5ad)")
    p.add_argument("--vars", dest="vars_use", type=_names, required=True,
                   metavar="COL[,COL...]", help="batch column(s) to integrate over")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file; .h5ad input may be written to .h5ad or a table")
    p.add_argument("--basis", default="X_pca", metavar="KEY",
                   help=".h5ad input: obsm key of the embedding")
    p.add_argument("--adjusted-basis", default="X_pca_harmony", metavar="KEY",
                   help=".h5ad input: obsm key for the corrected embedding")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw the embedding before and after Harmony")
    p.add_argument("--color", type=_names, metavar="COL[,COL...]",
                   help="columns to colour the --plot by (default: the --vars columns)")
    p.add_argument("--plot-pcs", type=_pcs, default=(1, 2), metavar="I,J",
                   help="PCs on the axes of --plot (1-based; batch effects often show "
                        "in later PCs, e.g. 1,4) (default: 1,2)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
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
    p.add_argument("--verbose", action="store_true", help="show Harmony's progress messages")
    _add_common(p)
    p.set_defaults(handler=command_demo)


def _build_evaluate(commands) -> None:
    p = commands.add_parser(
        "evaluate", formatter_class=_HelpFormatter,
        help="score mixing (iLISI) and cell-type separation (cLISI)",
        description="Local Inverse Simpson Index of EMBEDDING over the --batch column "
                    "(iLISI: 1 = not mixed, number of batches = fully mixed) and the "
                    "--label column (cLISI: 1 = cell types kept apart).",
        epilog=f"example: {PROG} evaluate pcs_harmony.tsv.gz meta.tsv.gz --batch donor "
               f"--label cell_type")
    p.add_argument("embedding", metavar="EMBEDDING", help="cells x PCs table, .npy or .h5ad")
    p.add_argument("meta", metavar="META", nargs="?", help="metadata table (not for .h5ad)")
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
    _add_common(p)
    p.set_defaults(handler=command_evaluate)


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
    }
    # Leaving an option out (rather than passing its default) matters: harmony2
    # swaps in its own defaults only for parameters the caller did not pass.
    return {name: value for name, value in mapping.items() if value is not None}


# =========================================================================== #
# Commands
# =========================================================================== #
def _note(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"{PROG}: {text}", file=sys.stderr)


def command_run(args: argparse.Namespace) -> int:
    """``harmonypy run``: integrate a file and write the result."""
    if file_format(args.embedding) == "h5ad":
        return _run_h5ad(args)
    if args.meta is None:
        raise ValueError("META (the metadata table) is required unless EMBEDDING is .h5ad")
    _check_output(args.output, ("tsv", "csv", "parquet", "npy"))
    _check_plot_path(args.plot)
    from harmonypy._harmony import run_harmony

    table = read_embedding(args.embedding)
    cells = table.frame.index if table.has_index else None
    meta = read_meta(args.meta, cells, len(table.frame))
    _check_columns(meta, args.vars_use + (args.color or []), args.meta)

    start = time.perf_counter()
    ho = run_harmony(table.frame.to_numpy(), meta, args.vars_use, verbose=not args.quiet,
                     **harmony_kwargs(args))
    elapsed = time.perf_counter() - start
    corrected = pd.DataFrame(ho.Z_corr.T, index=table.frame.index,
                             columns=[f"{c}_harmony" for c in table.frame.columns])
    write_table(Table(corrected, table.has_index), args.output)
    _note(args, f"wrote {args.output}: {ho.N} cells x {ho.d} PCs; {_outcome(ho)} "
                f"in {elapsed:.1f} s")
    if args.plot:
        _save_plot(table.frame, corrected, meta, args.color or args.vars_use, args.plot,
                   args.plot_pcs)
        _note(args, f"wrote {args.plot}")
    return 0


def _run_h5ad(args: argparse.Namespace) -> int:
    from harmonypy._anndata import integrate, require_anndata

    if args.meta is not None:
        raise ValueError("META is not used with .h5ad input: the batch columns come from "
                         "adata.obs")
    out_format = _check_output(args.output, ("h5ad", "tsv", "csv", "parquet", "npy"))
    _check_plot_path(args.plot)
    anndata = require_anndata()
    _check_exists(args.embedding, "input")
    adata = anndata.read_h5ad(args.embedding)
    if args.color:
        _check_columns(adata.obs, args.color, "adata.obs")

    start = time.perf_counter()
    ho = integrate(adata, args.vars_use, basis=args.basis, adjusted_basis=args.adjusted_basis,
                   verbose=not args.quiet, **harmony_kwargs(args))
    elapsed = time.perf_counter() - start
    corrected = adata.obsm[args.adjusted_basis]
    if out_format == "h5ad":
        adata.write_h5ad(args.output)
    else:
        columns = [f"PC{i + 1}_harmony" for i in range(corrected.shape[1])]
        frame = pd.DataFrame(corrected, index=adata.obs_names, columns=columns)
        write_table(Table(frame, True), args.output)
    _note(args, f"wrote {args.output} (obsm[{args.adjusted_basis!r}]): {ho.N} cells x "
                f"{ho.d} PCs; {_outcome(ho)} in {elapsed:.1f} s")
    if args.plot:
        before = np.asarray(adata.obsm[args.basis])
        _save_plot(before, corrected, adata.obs, args.color or args.vars_use, args.plot,
                   args.plot_pcs)
        _note(args, f"wrote {args.plot}")
    return 0


def _check_columns(meta: pd.DataFrame, columns: Sequence[str], where: Any) -> None:
    missing = [c for c in columns if c not in meta.columns]
    if missing:
        available = ", ".join(map(str, meta.columns))
        raise KeyError(f"column(s) {', '.join(missing)} not found in {where} "
                       f"(available: {available})")


def _check_plot_path(path: str | None) -> None:
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise FileNotFoundError(f"folder for --plot does not exist: {Path(path).parent}")


def _outcome(ho) -> str:
    if ho.converged:
        return f"converged after {ho.n_iter} iteration{'s' if ho.n_iter != 1 else ''}"
    return f"stopped after {ho.n_iter} iterations without converging"


def _save_plot(before, after, meta: pd.DataFrame, color: Sequence[str], path: str,
               pcs: tuple[int, int] = (1, 2)) -> None:
    from harmonypy.plotting import _pyplot, embedding_figsize, plot_embedding

    _pyplot()  # the install hint when matplotlib is missing
    from matplotlib.figure import Figure

    # A Figure outside pyplot renders to a file without choosing a GUI backend
    # or keeping the figure alive in pyplot's registry.
    fig = Figure(figsize=embedding_figsize(len(color)), layout="constrained")
    plot_embedding(before, after, meta.reset_index(drop=True), list(color),
                   dims=(pcs[0] - 1, pcs[1] - 1), fig=fig)
    fig.savefig(path, dpi=90)


# ------------------------------------------------------------------- demo
def command_demo(args: argparse.Namespace) -> int:
    """``harmonypy demo``: the PBMC example with a short report on stdout."""
    from harmonypy import __version__, datasets
    from harmonypy._harmony import run_harmony

    _check_plot_path(args.plot)
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
        _save_plot(pcs, pd.DataFrame(corrected, columns=list(pcs.columns)), meta, ["donor"],
                   args.plot, pcs=(1, 4))
        print(f"\nwrote {args.plot}")
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

    embedding, meta, index = _evaluation_input(args)
    labels = args.batch + (args.label or [])
    _check_columns(meta, labels, args.meta or "adata.obs")
    lisi = compute_lisi(embedding, meta, labels, perplexity=args.perplexity)
    kinds = ["iLISI"] * len(args.batch) + ["cLISI"] * len(args.label or [])
    summary = lisi_summary(lisi, meta, labels, kinds)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.output:
        columns = [f"{kind}_{label}" for kind, label in zip(kinds, labels)]
        frame = pd.DataFrame(lisi, index=index, columns=columns)
        write_table(Table(frame, index is not None), args.output)
    return 0


def _evaluation_input(args: argparse.Namespace) -> tuple[np.ndarray, pd.DataFrame, Any]:
    if args.output:
        _check_output(args.output, ("tsv", "csv", "parquet", "npy"))
    if file_format(args.embedding) == "h5ad":
        from harmonypy._anndata import _get_basis, require_anndata

        if args.meta is not None:
            raise ValueError("META is not used with .h5ad input: labels come from adata.obs")
        _check_exists(args.embedding, "input")
        adata = require_anndata().read_h5ad(args.embedding)
        return _get_basis(adata, args.basis), adata.obs.reset_index(drop=True), adata.obs_names
    if args.meta is None:
        raise ValueError("META (the metadata table) is required unless EMBEDDING is .h5ad")
    table = read_embedding(args.embedding)
    cells = table.frame.index if table.has_index else None
    meta = read_meta(args.meta, cells, len(table.frame))
    return table.frame.to_numpy(dtype=float), meta, cells


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
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `harmonypy demo | head -3`
        sys.stderr.close()
        return 1
    except BAD_INPUT as err:
        if args.debug:
            raise
        print(f"{PROG}: error: {_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the last line of defence of a CLI
        if args.debug:
            raise
        print(f"{PROG}: error: {type(err).__name__}: {_message(err)} "
              f"(run with --debug for the traceback)", file=sys.stderr)
        return 1


def _message(err: BaseException) -> str:
    # str(KeyError) adds quotes around the message; take it as written.
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
