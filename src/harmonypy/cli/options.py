"""What the commands share: the parser, option types and option groups, notes.

The Harmony options (:func:`add_harmony_options`, :func:`harmony_kwargs`)
serve ``run``, ``reference build`` and ``python -m harmonypy.shard`` alike,
so that one list of options maps onto :func:`harmonypy.run_harmony`. Notes
and warnings go to stderr as ``harmonypy: ...`` lines: the command line's own
output, while the library only logs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import Any

PROG = "harmonypy"
TABLE_OUTPUTS = ("tsv", "csv", "parquet", "npy")
# Library parameter names in messages, as the options that set them (run).
HARMONY_OPTION_NAMES = {
    "vars_use": "--vars",
    "block_size": "--block-size",
    "max_iter_harmony": "--max-iter-harmony",
    "max_iter_kmeans": "--max-iter-kmeans",
    "epsilon_cluster": "--epsilon-cluster",
    "epsilon_harmony": "--epsilon-harmony",
    "random_state": "--seed",
    "ncores": "--threads",
    "batch_prop_cutoff": "--batch-prop-cutoff",
    "check_memory=False": "--no-memory-check",
    "meta_data": "the metadata",
    "data_mat": "the embedding",
}
# The input arguments' help: how cells and metadata rows are paired.
EMBEDDING_HELP = (
    "cells x PCs: a table (cell names in its row names or first column), "
    "an .npy or .zarr array (no cell names) or .h5ad"
)


def meta_help(embedding: str, needed: str) -> str:
    """META's help: how its rows pair with ``embedding``'s cells, when ``needed``."""
    return (
        f"metadata table with one row per cell ({needed}), paired with {embedding}'s "
        f"cells by cell name when both name them, else by position (row order); an .npy "
        f"or .zarr {embedding} names no cells, so its rows are paired by position and "
        f"take META's cell names, if it has any"
    )


def name_list(text: str) -> list[str]:
    """Option type: ``'a,b'`` -> ``['a', 'b']`` (one or more names)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more comma-separated names")
    return names


def number_list(text: str) -> float | list[float]:
    """'2' -> 2.0, '2,1' -> [2.0, 1.0] (one value per variable or per level)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or comma-separated numbers, got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def pc_pair(text: str) -> tuple[int, int]:
    """Option type: ``'1,4'`` -> ``(1, 4)``, two PC numbers counted from 1."""
    try:
        first, second = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two PC numbers like 1,2, got {text!r}"
        ) from None
    if min(first, second) < 1:
        raise argparse.ArgumentTypeError("PC numbers start at 1")
    return first, second


def subset_spec(text: str) -> tuple[str, list[str]]:
    """'donor=3pv1,3pv2' -> ('donor', ['3pv1', '3pv2'])."""
    column, sep, values = text.partition("=")
    levels = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not column.strip() or not levels:
        raise argparse.ArgumentTypeError(f"expected COL=VALUE[,VALUE...], got {text!r}")
    return column.strip(), levels


def number(text: str) -> float:
    """Option type: one number; the message quotes the text that is not one."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like the library errors."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` unless the help text already explains the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
        ):
            return text
        return super()._get_help_string(action) or ""


def add_common(parser: argparse.ArgumentParser) -> None:
    """Add ``--debug`` to a subcommand."""
    # SUPPRESS keeps a subcommand from resetting a --debug given before it.
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback on errors",
    )


def add_force(parser: argparse.ArgumentParser) -> None:
    """Add ``--force`` (alias ``--overwrite``): replace outputs, never an input."""
    parser.add_argument(
        "--force",
        "--overwrite",
        dest="force",
        action="store_true",
        help="replace output files that already exist (default: refuse); an "
        "input is never replaced",
    )


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """Add ``--quiet`` (``-q``): no progress messages."""
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress messages")


def add_name_options(parser: argparse.ArgumentParser) -> None:
    """Add the "cell names" group: ``--names``, ``--meta-names``, ``--no-names``."""
    g = parser.add_argument_group(
        "cell names",
        "when EMBEDDING and META both name their cells, rows are matched by name: the same "
        "cells in another order are reordered; repeated names, or cells on one side only, "
        "are an error. Row order is used when one side has no names",
    )
    g.add_argument(
        "--names",
        metavar="COL",
        help="column of the EMBEDDING table that holds the cell names (default: "
        "its row names, else its first column when that holds text, integers "
        "under a header such as cell, cell_id, barcode, index, id or name, or "
        "the row numbers 0..N-1 or 1..N)",
    )
    exclusive = g.add_mutually_exclusive_group()
    exclusive.add_argument(
        "--meta-names",
        metavar="COL",
        help="column of META that holds the cell names (default: META's "
        "row names, or the column that shares names with EMBEDDING)",
    )
    exclusive.add_argument(
        "--no-names",
        action="store_true",
        help="pair META rows with EMBEDDING rows by position, ignoring cell "
        "names (a name column of EMBEDDING is still not a PC)",
    )


def add_subset_option(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--subset COL=VALUE[,...]``; ``what``: what the cells are used as."""
    parser.add_argument(
        "--subset",
        type=subset_spec,
        metavar="COL=VALUE[,VALUE...]",
        help=f"use only the cells whose metadata column COL holds one of the "
        f"VALUEs (compared as text) as {what}, e.g. donor=3pv1,3pv2 "
        f"(default: all cells)",
    )


def add_harmony_options(parser: argparse.ArgumentParser) -> None:
    """One option per run_harmony parameter. None = leave run_harmony's default."""
    g = parser.add_argument_group(
        "Harmony parameters",
        "list values are comma-separated (--theta 2,1); write --opt=VALUE for values "
        "that start with '-' (--lamb=-1, --epsilon-harmony=-inf)",
    )
    _add_model_options(g)
    _add_iteration_options(g)
    _add_compute_options(g)


def _add_model_options(g: Any) -> None:
    """The options of Harmony's model: theta, lamb, sigma, nclust, tau, block size."""
    g.add_argument(
        "--theta",
        type=number_list,
        metavar="T[,T...]",
        help="diversity penalty, one value, one per variable or per level (default: 2)",
    )
    g.add_argument(
        "--lamb",
        type=number_list,
        metavar="L[,L...]",
        help="ridge penalty; -1 estimates it per cluster (default: 1; harmony2: estimated)",
    )
    g.add_argument(
        "--sigma",
        type=number_list,
        default=0.1,
        metavar="S[,S...]",
        help="soft-clustering bandwidth, one value or one per cluster",
    )
    g.add_argument(
        "--nclust",
        type=int,
        metavar="K",
        help="number of clusters (default: min(round(N / 30), 100))",
    )
    g.add_argument(
        "--tau", type=number, default=0.0, metavar="X", help="protection of small batches (0: off)"
    )
    g.add_argument(
        "--block-size",
        type=number,
        default=0.05,
        metavar="F",
        help="fraction of cells updated at once",
    )


def _add_iteration_options(g: Any) -> None:
    """The options of Harmony's iterations: their limits and tolerances, alpha, the
    algorithm and Harmony2's cutoff."""
    g.add_argument(
        "--max-iter-harmony", type=int, default=10, metavar="N", help="maximum Harmony iterations"
    )
    g.add_argument(
        "--max-iter-kmeans",
        type=int,
        metavar="N",
        help="maximum clustering rounds per iteration (default: 20; harmony2: 4)",
    )
    g.add_argument(
        "--epsilon-cluster",
        type=number,
        metavar="EPS",
        help="clustering convergence tolerance (default: 1e-5; harmony2: 1e-3)",
    )
    g.add_argument(
        "--epsilon-harmony",
        type=number,
        metavar="EPS",
        help="Harmony convergence tolerance (default: 1e-4; harmony2: 1e-2)",
    )
    g.add_argument(
        "--alpha",
        type=number,
        default=0.2,
        metavar="X",
        help="scale of the estimated ridge penalty (with --lamb=-1)",
    )
    g.add_argument(
        "--algorithm",
        choices=("harmony1", "harmony2"),
        default="harmony1",
        help="formulas of R harmony 1.2.4 (harmony1) or 2.0 (harmony2)",
    )
    g.add_argument(
        "--batch-prop-cutoff",
        type=number,
        default=1e-5,
        metavar="X",
        help="harmony2 only: minimum share of a batch level in a cluster",
    )


def _add_compute_options(g: Any) -> None:
    """Where and how the run computes: device, precision, seed, threads, the memory check."""
    g.add_argument(
        "--device",
        metavar="DEVICE",
        help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU)",
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="floating-point precision",
    )
    g.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (random_state)")
    g.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads, 0 = half the CPUs (default: one thread for small "
        "inputs, else the cores other processes leave idle)",
    )
    g.add_argument(
        "--no-memory-check",
        dest="check_memory",
        action="store_false",
        help="run even when the estimated peak memory exceeds the available "
        "memory (default: refuse before the run)",
    )


def harmony_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """run_harmony keyword arguments from the options; unset ones are left out."""
    mapping = {
        "theta": args.theta,
        "lamb": args.lamb,
        "sigma": args.sigma,
        "nclust": args.nclust,
        "tau": args.tau,
        "block_size": args.block_size,
        "max_iter_harmony": args.max_iter_harmony,
        "max_iter_kmeans": args.max_iter_kmeans,
        "epsilon_cluster": args.epsilon_cluster,
        "epsilon_harmony": args.epsilon_harmony,
        "alpha": args.alpha,
        "random_state": args.seed,
        "device": args.device,
        "dtype": args.dtype,
        "algorithm": args.algorithm,
        "batch_prop_cutoff": args.batch_prop_cutoff,
        "ncores": args.threads,
        "check_memory": None if args.check_memory else False,
    }
    # Leaving an option out (rather than passing its default) matters: harmony2
    # swaps in its own defaults only for parameters the caller did not pass.
    return {name: value for name, value in mapping.items() if value is not None}


def note(args: argparse.Namespace, text: str) -> None:
    """A progress note on stderr (the CLI's own; the library only logs)."""
    if not getattr(args, "quiet", False):
        print(f"{PROG}: {text}", file=sys.stderr)


@contextlib.contextmanager
def convergence_noted(args: argparse.Namespace) -> Any:
    """The library's ConvergenceWarning as one CLI line naming the option (unless --quiet)."""
    from harmonypy.engine.convergence import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            if not getattr(args, "quiet", False):
                print(
                    f"{PROG}: warning: Harmony did not converge in {args.max_iter_harmony} "
                    f"iteration(s); raise --max-iter-harmony",
                    file=sys.stderr,
                )
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )


@contextlib.contextmanager
def warnings_as_notes() -> Any:
    """Show the library's warnings as ``harmonypy: warning: ...`` lines (even on error)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                print(f"{PROG}: warning: {warning.message}", file=sys.stderr)
