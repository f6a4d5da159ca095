"""Inputs of the commands: pairing the tables, checking the columns and options.

Reading the files and matching cells by name is :mod:`harmonypy.io`; this
module turns its results into what a command runs on, with messages that
name the option at fault.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import pandas as pd

from harmonypy.cli.options import note
from harmonypy.engine.design import ColumnNotFoundError
from harmonypy.io.names import match_cells
from harmonypy.io.readers import read_embedding, read_meta
from harmonypy.io.tables import Table, close_match


def read_tables(args: argparse.Namespace) -> tuple[Table, pd.DataFrame]:
    """The embedding and the metadata in the embedding's cell order."""
    embedding = read_embedding(args.embedding, names=args.names)
    return paired(args, embedding, args.embedding, args.meta)


def paired(
    args: argparse.Namespace, embedding: Table, embedding_path: str, meta_path: str
) -> tuple[Table, pd.DataFrame]:
    """``(embedding, metadata in its cell order)``, paired as :func:`match_cells` says.

    Paired by position with an embedding that names no cells (``.npy``,
    ``.zarr``), the metadata's own cell names name the cells, so that the
    outputs keep them. A reordering is noted now; a pairing by position once
    the outputs are written (:func:`note_position`), so that an error stays
    the only line.
    """
    match = match_cells(
        embedding,
        read_meta(meta_path),
        embedding_path=embedding_path,
        meta_path=meta_path,
        meta_names=args.meta_names,
        by_name=not args.no_names,
    )
    if match.reordered:
        note(args, match.describe())
    args.position_note = None if match.by_name else match.describe()
    if match.names is not None:
        frame = embedding.frame.copy(deep=False)  # an .npy stays memory-mapped
        frame.index = match.names
        embedding = Table(frame, True, f"the metadata's {match.names_from}")
    return embedding, match.meta


def note_position(args: argparse.Namespace) -> None:
    """The note of a pairing by position (:func:`paired`), after the outputs."""
    if getattr(args, "position_note", None):
        note(args, args.position_note)


def refuse_name_options(args: argparse.Namespace) -> None:
    """--names/--meta-names/--no-names mean nothing for .h5ad input: say so."""
    given = [
        option
        for option, value in (
            ("--names", args.names),
            ("--meta-names", args.meta_names),
            ("--no-names", args.no_names),
        )
        if value
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)}: not used with .h5ad input, whose cells are "
            f"named by obs_names and described by obs"
        )


def refuse_h5ad_options(args: argparse.Namespace, options) -> None:
    """Refuse the ``(option, value)`` pairs given: they are for .h5ad input only."""
    given = [option for option, value in options if value]
    if given:
        raise ValueError(f"{', '.join(given)}: only for .h5ad input")


def check_columns(meta: pd.DataFrame, columns: Sequence[str], option: str, source: str) -> None:
    """Every name in ``columns`` (given with ``option``) is a column of ``meta``.

    Raises
    ------
    ColumnNotFoundError
        (a KeyError and a ValueError, as the API's) naming the option, the file, a
        close match if any, and the columns.
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
    shown = ", ".join(available[:30]) + (
        f", ... ({len(available) - 30} more)" if len(available) > 30 else ""
    )
    raise ColumnNotFoundError(
        f"{option}: column(s) {', '.join(map(repr, missing))} not found "
        f"in {source}{hint}; available: {shown or 'none'}"
    )


def subset_mask(
    frame: pd.DataFrame, spec: tuple[str, list[str]] | None, source: str
) -> np.ndarray | None:
    """Rows of ``frame`` selected by ``--subset COL=VALUES``; None without --subset."""
    if spec is None:
        return None
    column, values = spec
    check_columns(frame, [column], "--subset", source)
    text = frame[column].astype(str)
    present = set(text)
    unknown = [v for v in values if v not in present]
    if unknown:
        listed = sorted(present)
        shown = ", ".join(listed[:20]) + (", ..." if len(listed) > 20 else "")
        raise ValueError(
            f"--subset {column}={','.join(values)}: no cell has {column} "
            f"{', '.join(map(repr, unknown))} in {source} (values: {shown})"
        )
    return text.isin(values).to_numpy()


#: The metadata of a command: a table, or None where the command has none.
_Meta = TypeVar("_Meta", pd.DataFrame, None)


def take_rows(embedding: Table, meta: _Meta, mask: np.ndarray | None) -> tuple[Table, _Meta]:
    """The embedding and metadata rows selected by ``mask`` (all when None)."""
    if mask is None:
        return embedding, meta
    return (
        Table(embedding.frame[mask], embedding.has_names, embedding.names_from),
        None if meta is None else meta[mask].reset_index(drop=True),
    )


def check_plot_pcs(args: argparse.Namespace, n_pcs: int) -> None:
    """Refuse ``--plot-pcs`` beyond the embedding's ``n_pcs`` PCs, before Harmony."""
    if args.plot and max(args.plot_pcs) > n_pcs:
        raise ValueError(
            f"--plot-pcs {args.plot_pcs[0]},{args.plot_pcs[1]}: the embedding has "
            f"only {n_pcs} PC{'s' if n_pcs != 1 else ''}"
        )
