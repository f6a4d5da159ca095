"""Pairing the metadata's rows with the embedding's cells, by name or by position.

When the embedding and the metadata both name their cells, they are paired by
name; the same cells in another order are reordered, anything else (repeated
names, cells on one side only, two sets of names with nothing in common) is
an error that shows a few offending names. Row order is used only when one
side has no names. The messages name command-line options (``--names``,
``--meta-names``, ``--no-names``) where they are the remedy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harmonypy.engine.cellnames import declared_names, identifier_header, match_order, text_names
from harmonypy.io.tables import Table, column_list, did_you_mean, is_numeric, row_numbers

logger = logging.getLogger(__name__)

__all__ = ["CellMatch", "match_cells"]

#: Values of each metadata column looked up among the embedding's names to
#: find a name column cheaply (a name column shares names from its first rows).
_PROBE_VALUES = 1000


@dataclass
class CellMatch:
    """How the metadata rows were paired with the embedding's cells.

    Attributes
    ----------
    meta : DataFrame, (n_cells, n_columns)
        The metadata in the embedding's cell order, with a default index.
    by_name : bool
        True when paired by cell name, False when by row order.
    names_from : str or None
        Which metadata names were used (``"row names"``, ``"column 'cell'"``).
    reordered : bool
        Whether the metadata rows had to be reordered.
    names : Index (n_cells,) or None
        Paired by position with an embedding that names no cells: the
        metadata's own cell names (``names_from`` says where from), which
        then name the cells (outputs keep them). None otherwise.
    paths : tuple of str
        The embedding and metadata files, for :meth:`describe`.
    """

    meta: pd.DataFrame
    by_name: bool
    names_from: str | None = None
    reordered: bool = False
    names: pd.Index | None = None
    paths: tuple[str, str] = ("the embedding", "the metadata")

    def describe(self) -> str:
        """One line for the user, e.g. ``matched ... by cell name ... (reordered)``."""
        embedding, meta = self.paths
        if not self.by_name:
            text = f"metadata {meta} paired with the embedding's cells by position (row order)"
            if self.names is not None:
                text += (
                    f": the embedding {embedding} has no cell names, so its cells are "
                    f"named by the metadata's {self.names_from}"
                )
            return text
        how = "reordered to" if self.reordered else "in the same order as"
        return (
            f"metadata matched by cell name ({self.names_from}): {len(self.meta):,} rows, "
            f"{how} the embedding"
        )


def _meta_name_candidates(
    meta: Table, cell_text: pd.Index, integer_names: bool
) -> list[tuple[str, pd.Index]]:
    """Metadata name sources that share at least one name with the embedding.

    The row names are always looked at; so are text and categorical columns.
    When the embedding's names are plain integers, only columns with an
    identifier header (``cell_id``, ``barcode``, ...) count, or every integer
    data column (counts, cluster numbers) would look like a partial match.
    """
    lookup = cell_text.unique()
    sources: list[tuple[str, pd.Index]] = []
    if meta.has_names:
        sources.append(("row names", meta.frame.index))
    for column in meta.frame.columns:
        values = meta.frame[column]
        text_like = not is_numeric(values) and not pd.api.types.is_bool_dtype(values)
        if integer_names:
            usable = identifier_header(column) and (
                text_like or pd.api.types.is_integer_dtype(values.dtype)
            )
        else:
            usable = text_like
        if usable:
            sources.append((f"column {str(column)!r}", pd.Index(values)))

    def shares_a_name(names: pd.Index) -> bool:
        if isinstance(names, pd.CategoricalIndex):  # the categories say it all
            names = pd.Index(names.categories)
        # A name column usually shares names within its first rows: try those
        # before looking up every value.
        head = pd.Index(names[:_PROBE_VALUES].astype(str))
        return bool(
            (lookup.get_indexer(head) >= 0).any()
            or (lookup.get_indexer(pd.Index(names.astype(str)).unique()) >= 0).any()
        )

    return [(where, names) for where, names in sources if shares_a_name(names)]


def match_cells(
    embedding: Table,
    meta: Table,
    *,
    embedding_path: str | Path,
    meta_path: str | Path,
    meta_names: str | None = None,
    by_name: bool = True,
) -> CellMatch:
    """Put the metadata rows in the order of the embedding's cells.

    Parameters
    ----------
    embedding : Table
        The embedding, (n_cells, n_pcs); its names (if any) are the index.
    meta : Table
        The metadata, (n_rows, n_columns).
    embedding_path, meta_path : str or Path
        The files, for messages.
    meta_names : str, optional
        The metadata column holding the cell names (``--meta-names``).
        Default: the metadata's row names or the column that shares the most
        names with the embedding. When nothing is shared and the embedding's
        names are text, the metadata's text row names or a column under an
        identifier header (``cell_id``, ``barcode``, ...) still count as its
        names (and the pairing is refused); otherwise the metadata has none.
    by_name : bool, default True
        False pairs rows by position whatever the names (``--no-names``).

    Returns
    -------
    CellMatch
        The metadata in embedding order and how it was matched.

    Raises
    ------
    ValueError
        Both sides name cells but names repeat, or the two sets differ, even
        entirely (the message gives counts and up to five names of each
        kind); by row order, a different number of rows.
    KeyError
        ``meta_names`` is not a metadata column.

    Notes
    -----
    Two lists of row numbers (0..N-1 from pandas, 1..N from R) are not
    names: they are paired by row order. Nor are integer labels that share
    nothing with the other side (a filtered frame's index written by
    pandas): they are paired by row order with a warning.
    """
    n_cells = len(embedding.frame)
    cell_names = embedding.names
    if meta_names is not None:
        _check_meta_names(meta_names, meta, embedding, paths=(embedding_path, meta_path))
    if cell_names is None:
        return _by_row_order(meta, n_cells, embedding_path, meta_path, adopt_names=True)
    if not by_name:
        return _by_row_order(meta, n_cells, embedding_path, meta_path)

    cell_text = pd.Index(cell_names.astype(str))
    if meta_names is not None:
        column = meta.frame.columns[[str(c) for c in meta.frame.columns].index(meta_names)]
        where, names = f"column {meta_names!r}", pd.Index(meta.frame[column])
    else:
        integer_names = bool(cell_text.str.fullmatch(r"-?\d+").all())
        candidates = _meta_name_candidates(meta, cell_text, integer_names)
        if candidates:
            lookup = cell_text.unique()
            where, names = max(
                candidates,
                key=lambda c: int((lookup.get_indexer(pd.Index(c[1].astype(str))) >= 0).sum()),
            )
            if row_numbers(cell_names) and row_numbers(names):
                logger.info("both files number their rows (0..N-1 or 1..N); pairing by row order")
                return _by_row_order(meta, n_cells, embedding_path, meta_path)
        else:
            # Nothing shared. Text names on both sides name other cells: refused
            # below (match_order), never paired by position (issue #11).
            declared = (
                declared_names(meta.frame, index=meta.has_names) if text_names(cell_names) else None
            )
            if declared is None:
                if meta.has_names and not row_numbers(meta.frame.index):
                    logger.warning(
                        "the metadata %s has row names but shares none with the "
                        "embedding %s; taking integer labels for row numbers and "
                        "pairing rows by position",
                        meta_path,
                        embedding_path,
                    )
                return _by_row_order(meta, n_cells, embedding_path, meta_path)
            column, names = declared
            where = "row names" if column is None else f"column {str(column)!r}"

    order = match_order(
        cell_names,
        names,
        cells_from=f"the embedding {embedding_path} ({embedding.names_from})",
        meta_from=f"the metadata {meta_path} ({where})",
        remedy="Give both files the same cells, make the names unique, choose the name "
        "columns with --names/--meta-names, or pass --no-names to pair rows by position",
    )
    if order is None:
        order = np.arange(n_cells)
    reordered = not np.array_equal(order, np.arange(n_cells))
    frame = meta.frame.iloc[order] if reordered else meta.frame
    match = CellMatch(frame.reset_index(drop=True), True, where, reordered)
    logger.info("%s", match.describe())
    return match


def _check_meta_names(meta_names: str, meta: Table, embedding: Table, *, paths: tuple) -> None:
    """Refuse ``--meta-names`` naming no metadata column, or given with an
    embedding that names no cells (``paths``: the embedding's and the metadata's)."""
    embedding_path, meta_path = paths
    columns = [str(c) for c in meta.frame.columns]
    if meta_names not in columns:
        raise KeyError(
            f"--meta-names: column {meta_names!r} not found in the metadata "
            f"{meta_path}{did_you_mean(meta_names, columns)}; available: "
            f"{column_list(columns)}"
        )
    if embedding.names is None:
        raise ValueError(
            f"--meta-names {meta_names!r}: the embedding {embedding_path} has "
            f"no cell names to match (choose its name column with --names)"
        )


def _by_row_order(
    meta: Table,
    n_cells: int,
    embedding_path: str | Path,
    meta_path: str | Path,
    adopt_names: bool = False,
) -> CellMatch:
    """Pair by position; with ``adopt_names`` (the embedding names no cells),
    the metadata's own distinct cell names, if any, name the cells."""
    if len(meta.frame) != n_cells:
        raise ValueError(
            f"metadata {meta_path} has {len(meta.frame):,} rows but the embedding "
            f"{embedding_path} has {n_cells:,} cells (paired by row order: "
            f"the two files do not share cell names)"
        )
    names = names_from = None
    if adopt_names:
        found = _own_names(meta)
        if found is not None:
            names_from, names = found
    match = CellMatch(
        meta.frame.reset_index(drop=True),
        False,
        names_from,
        names=names,
        paths=(str(embedding_path), str(meta_path)),
    )
    logger.info("%s", match.describe())
    return match


def _own_names(meta: Table) -> tuple[str, pd.Index] | None:
    """``(where, names)`` of the metadata's distinct cell names, or None.

    Its row names unless they only number the rows, else a column of distinct
    text names under an identifier header (``cell_id``, ``barcode``, ...).
    """
    index = meta.frame.index
    if meta.has_names and not row_numbers(index) and index.is_unique:
        return "row names", pd.Index(index)
    declared = declared_names(meta.frame, index=False)
    if declared is None:
        return None
    return f"column {str(declared[0])!r}", declared[1]
