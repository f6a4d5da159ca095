"""Pairing an embedding's cells with their metadata rows by cell name.

An embedding and a metadata table that both name their cells are matched by
name, never by position: the same set of names in another order is reordered
(and logged at INFO); duplicated names, or names present on one side only, are
an error that shows a few of them. Row order is used only when at least one
side carries no names.

What counts as "names": a pandas index other than the default positions
``0 .. n-1`` (a ``RangeIndex`` or an integer index equal to it), or, in the
metadata, a text column that holds the embedding's names (e.g. a ``cell`` or
``barcode`` column next to a default index).

Integer index labels count as names against integer names, but against text
names they are taken for row numbers (a sorted or filtered frame's index) when
a text column of the metadata holds the text names: that column pairs.

Names that share no value with the other side still count when both sides
hold text names (:func:`text_names`) and the metadata's come from its index
or from a column under an identifier header (:func:`declared_names`): the
pairing is then refused, not done by row order. Integer labels that share
nothing (a filtered frame's index, R's ``1 .. n``) are taken for row numbers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: Metadata values looked up among the embedding's names to find a name column.
_PROBE_VALUES = 1000

#: Offending names shown in an error message.
_SHOWN = 5

_API_REMEDY = (
    "Give both the same cells (e.g. meta.loc[pcs.index]), make the names unique, "
    "or drop one side's names to pair rows by position (e.g. "
    "pcs.reset_index(drop=True) or pcs.to_numpy())"
)

#: Column headers that say "this column holds cell names" (compared lower-case,
#: without ``_``, ``-``, ``.``, ``:`` and spaces, so ``cell_id``, ``Cell ID`` and
#: ``cellID`` all count).
_IDENTIFIER_HEADERS = frozenset(
    {
        "",
        "cell",
        "cells",
        "cellid",
        "cellids",
        "cellname",
        "cellnames",
        "cellbarcode",
        "cellbarcodes",
        "barcode",
        "barcodes",
        "index",
        "obs",
        "obsname",
        "obsnames",
        "id",
        "ids",
        "name",
        "names",
        "rowname",
        "rownames",
        "unnamed0",
    }
)


def carries_names(index: pd.Index) -> bool:
    """Whether ``index`` names cells, i.e. is not just the positions ``0 .. n-1``.

    A ``RangeIndex(0, n)`` (what pandas gives a table read without row names)
    and an integer index equal to it say nothing about which cell a row is.
    """
    n = len(index)
    if isinstance(index, pd.RangeIndex):
        return not (index.start == 0 and index.step == 1 and index.stop == n)
    if pd.api.types.is_integer_dtype(index.dtype) and not isinstance(index, pd.MultiIndex):
        values = index.to_numpy()
        return not (values.size == n and np.array_equal(values, np.arange(n)))
    return True


def identifier_header(name: Any) -> bool:
    """Whether a column header says the column holds cell names (``cell_id``, ``barcode``)."""
    return re.sub(r"[\s_.\-:]", "", str(name).lower()) in _IDENTIFIER_HEADERS


def _text_like(values: pd.Index | pd.Series) -> bool:
    """Strings, objects or categories: not numbers, not booleans."""
    return not (
        pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype)
    )


def text_names(names: pd.Index | pd.Series) -> bool:
    """Whether ``names`` are text names (barcodes), not integers that may number rows.

    Integer labels (as numbers or as digit strings: ``0 .. n-1``, R's
    ``1 .. n``, a filtered frame's index, anndata's default ``"0", "1", ...``)
    may be positions rather than names; text such as ``AAACCTG-1`` is a name.
    The first :data:`_PROBE_VALUES` values decide when one of them is not an
    integer, so barcodes cost O(1) here; only integer-like labels are read in
    full.
    """
    if len(names) == 0 or not _text_like(names):
        return False
    values = pd.Index(names)
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = pd.Index(values.categories)
    head = values[:_PROBE_VALUES].astype(str)
    if not head.str.fullmatch(r"-?\d+").all():
        return True
    return not bool(values.astype(str).str.fullmatch(r"-?\d+").all())


def declared_names(meta: pd.DataFrame, *, index: bool) -> tuple[Any, pd.Index] | None:
    """The names ``meta`` gives its rows, whether or not they match the embedding's.

    Used when no metadata source shares a name with the embedding, to tell
    "the metadata names other cells" (an error) from "the metadata has no
    names" (row order).

    Parameters
    ----------
    meta : DataFrame, (n_rows, n_columns)
    index : bool
        Whether ``meta.index`` holds row names (not pandas' default positions).

    Returns
    -------
    (None, Index) or (column, Index) or None
        The index when ``index`` and it holds :func:`text_names`; else the
        first column under an identifier header (:func:`identifier_header`)
        holding distinct text names, e.g. ``cell_id`` or ``barcode``
        (distinct, so that a ``name`` column repeating sample names is not
        taken for cell names); else None.
    """
    if index and text_names(meta.index):
        return None, meta.index
    for column in meta.columns:
        values = meta[column]
        if (
            identifier_header(column)
            and _text_like(values)
            and values.is_unique
            and text_names(values)
        ):
            return column, pd.Index(values)
    return None


def _examples(values: Sequence, limit: int = _SHOWN) -> str:
    values = list(values)
    shown = ", ".join(repr(str(value)) for value in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def _percent(part: int, whole: int) -> str:
    """``part / whole`` in whole percent, never rounded to 0% or 100% unless exact."""
    value = round(100 * part / whole)
    if 0 < part < whole:
        value = min(max(value, 1), 99)
    return f"{value}%"


def describe_repeats(names: pd.Index) -> str:
    """``"2 name(s) occur more than once ('a' (2 times), ...)"``."""
    counts = names.value_counts()
    counts = counts[counts > 1]
    shown = ", ".join(
        f"{str(name)!r} ({count} times)" for name, count in counts.iloc[:_SHOWN].items()
    )
    more = ", ..." if len(counts) > _SHOWN else ""
    return f"{len(counts):,} name(s) occur more than once ({shown}{more})"


def name_column(meta: pd.DataFrame, cell_names: pd.Index) -> str | None:
    """The first text column of ``meta`` whose values include the embedding's cell names.

    Only the first :data:`_PROBE_VALUES` values of each column are looked up,
    so this costs O(columns) hash lookups, not O(N x columns).
    """
    # One hash table of the names, reused for every column.
    lookup = pd.Index(cell_names.astype(str)).unique()
    for column in meta.columns:
        values = meta[column]
        if not _text_like(values):
            continue
        probe = values.iloc[:_PROBE_VALUES].astype(str)
        if (lookup.get_indexer(probe) >= 0).any():
            return column
    return None


def match_order(
    cell_names: pd.Index,
    meta_names: pd.Index,
    *,
    cells_from: str,
    meta_from: str,
    remedy: str = _API_REMEDY,
) -> np.ndarray | None:
    """Positions in the metadata of each embedding cell, or None if already aligned.

    The one place where two lists of cell names are compared, for the API
    (:func:`align_metadata`) and for the command line (:func:`harmonypy.io.names.match_cells`).

    Parameters
    ----------
    cell_names : Index, (N,)
        Names of the embedding's cells, in the embedding's order.
    meta_names : Index, (N',)
        Names of the metadata rows, in the metadata's order.
    cells_from, meta_from : str
        Where each side's names come from, for the messages (e.g.
        ``"data_mat's index"``, ``"the metadata meta.tsv (column 'cell')"``).
    remedy : str
        What the caller can do, appended to the error messages.

    Returns
    -------
    ndarray of int64, (N,), or None
        ``meta.iloc[order]`` puts the metadata in the embedding's order; None
        when both already list the same names in the same order.

    Raises
    ------
    ValueError
        Names repeat on either side, or the two sides do not hold the same
        set of names; the message gives counts and up to five names of each
        kind.
    """
    # Compare as text: a table read from a file may hold the same names as
    # numbers on one side and as strings on the other.
    cells_text = pd.Index(cell_names.astype(str))
    meta_text = pd.Index(meta_names.astype(str))
    for names, where in ((cells_text, cells_from), (meta_text, meta_from)):
        if not names.is_unique:
            raise ValueError(
                f"{where} names cells, but {describe_repeats(names)}; cells cannot be paired "
                f"with their metadata by name. {remedy}"
            )
    n_cells = len(cells_text)
    order = meta_text.get_indexer(cells_text)
    missing = cells_text[order < 0]
    extra = meta_text.difference(cells_text, sort=False)
    if missing.size or extra.size:
        shared = n_cells - missing.size
        parts = [
            f"{shared:,} of the embedding's {n_cells:,} cells ({_percent(shared, n_cells)})"
            f" are in the metadata"
        ]
        if missing.size:
            parts.append(
                f"{missing.size:,} embedding cell(s) are not in the metadata ({_examples(missing)})"
            )
        if extra.size:
            parts.append(
                f"{extra.size:,} metadata name(s) are not in the embedding ({_examples(extra)})"
            )
        raise ValueError(
            f"{cells_from} and {meta_from} name different cells: {'; '.join(parts)}. {remedy}"
        )
    if np.array_equal(order, np.arange(n_cells)):
        return None
    return order


def metadata_names(
    meta_data, cell_names: pd.Index, *, meta_name: str = "meta_data"
) -> tuple[pd.Index, str] | None:
    """The names ``meta_data`` gives its rows, to compare with ``cell_names``.

    Parameters
    ----------
    meta_data : DataFrame or Series, (n_rows, ...)
    cell_names : Index, (N,)
        The names of the cells the metadata is to be paired with.
    meta_name : str
        How the messages call ``meta_data``.

    Returns
    -------
    (Index, str) or None
        The names and where they come from (for messages): ``meta_data``'s
        index when it carries names (:func:`carries_names`), unless it holds
        integer labels while ``cell_names`` are text names and a text column
        holds those (integer labels then number rows, as a sorted or filtered
        frame's do); else a text column holding some of ``cell_names``
        (:func:`name_column`); else, when ``cell_names`` are text names, a
        column under an identifier header (:func:`declared_names`), so that
        two sets of names sharing nothing are refused, not paired by row
        order. None: the metadata names no cells.
    """
    index_names = carries_names(meta_data.index)
    text = text_names(cell_names)
    if index_names and (
        text_names(meta_data.index) or not text or not isinstance(meta_data, pd.DataFrame)
    ):
        return meta_data.index, f"{meta_name}'s index"
    if isinstance(meta_data, pd.DataFrame):
        column = name_column(meta_data, cell_names)
        if column is None and not index_names and text:
            declared = declared_names(meta_data, index=False)
            column = None if declared is None else declared[0]
        if column is not None:
            return pd.Index(meta_data[column]), f"{meta_name} column {column!r}"
    if index_names:
        return meta_data.index, f"{meta_name}'s index"
    return None


def align_to_names(
    cell_names: pd.Index,
    meta_data,
    *,
    cells_from: str,
    meta_name: str = "meta_data",
    remedy: str = _API_REMEDY,
):
    """``meta_data`` in the order of ``cell_names``, when it names its rows.

    Parameters
    ----------
    cell_names : Index, (N,)
        Names of the cells, in their order.
    meta_data : DataFrame or Series, (N', ...)
    cells_from, meta_name : str
        Where ``cell_names`` come from and how ``meta_data`` is called, for
        the messages.
    remedy : str
        What the caller can do, appended to the error messages.

    Returns
    -------
    (DataFrame or Series, bool)
        The metadata (a reordered copy when its order differed, logged at
        INFO; the caller's object otherwise, never modified), and whether it
        was paired by name (False: it names no cells, its rows are taken in
        order).

    Raises
    ------
    ValueError
        As :func:`match_order`: repeated names, or names on one side only.
    """
    found = metadata_names(meta_data, cell_names, meta_name=meta_name)
    if found is None:
        return meta_data, False
    meta_names, meta_from = found
    order = match_order(
        cell_names, meta_names, cells_from=cells_from, meta_from=meta_from, remedy=remedy
    )
    if order is not None:
        logger.info(
            "metadata rows reordered to match the embedding's cells by name (%s, %s)",
            cells_from,
            meta_from,
        )
        meta_data = meta_data.iloc[order]
    return meta_data, True


def align_metadata(
    data_mat, meta_data, *, data_name: str = "data_mat", meta_name: str = "meta_data"
):
    """``meta_data`` in the order of ``data_mat``'s cells, when both name their cells.

    ``data_mat``'s cell names are its index when it is a DataFrame with as
    many rows as ``meta_data`` (cells x PCs), else its columns when those
    match (PCs x cells). ``meta_data``'s are found by :func:`metadata_names`:
    its index, or a text column that holds those names, or, when
    ``data_mat``'s are text names (:func:`text_names`) and no column holds
    any of them, a column under an identifier header (``cell_id``,
    ``barcode``, ...; see :func:`declared_names`): names that share nothing
    are refused, not paired by row order. Anything else (arrays, default
    indexes, shapes that match nothing; those are checked later) is returned
    unchanged, as is ``meta_data`` when the order already agrees. The
    caller's object is never modified: a reordered copy is returned.

    Raises
    ------
    ValueError
        Duplicated names, or names on one side that are not on the other
        (including two sets of names with nothing in common).
    """
    if not isinstance(meta_data, (pd.DataFrame, pd.Series)):
        return meta_data
    n_meta = len(meta_data)
    if not isinstance(data_mat, pd.DataFrame):
        return meta_data
    if data_mat.shape[0] == n_meta:
        cell_names, cells_from = data_mat.index, f"{data_name}'s index"
    elif data_mat.shape[1] == n_meta:
        cell_names, cells_from = data_mat.columns, f"{data_name}'s columns (PCs x cells)"
    else:
        return meta_data
    if not carries_names(cell_names):
        return meta_data
    return align_to_names(cell_names, meta_data, cells_from=cells_from, meta_name=meta_name)[0]


def run_cell_names(data_mat, meta_data) -> pd.Index | None:
    """The names of a run's cells, in the run's order; None when nothing names them.

    What a :class:`~harmonypy.Harmony` object remembers, so that a table
    met later (``build_reference(ho, meta_data)``, ``plot_embedding``) is
    paired with its cells by name. Called after :func:`align_metadata`,
    with inputs already checked: ``meta_data``'s rows are then in
    ``data_mat``'s order.

    Parameters
    ----------
    data_mat : array-like or DataFrame, (N, d) or (d, N)
    meta_data : DataFrame, Series or 1-D labels, (N, ...)

    Returns
    -------
    Index (N,) or None
        ``data_mat``'s index (its columns when it is PCs x cells) when it
        carries names (:func:`carries_names`); else ``meta_data``'s index;
        else a column of ``meta_data`` under an identifier header holding
        distinct text names (:func:`declared_names`, e.g. ``cell_id``).
        None also when those names repeat: they do not tell cells apart
        (the run paired its inputs by position), so nothing met later can
        be paired by them.
    """
    n_cells = len(meta_data)
    names = None
    if isinstance(data_mat, pd.DataFrame):
        axis = data_mat.index if data_mat.shape[0] == n_cells else data_mat.columns
        if len(axis) == n_cells and carries_names(axis):
            names = axis
    if (
        names is None
        and isinstance(meta_data, (pd.DataFrame, pd.Series))
        and carries_names(meta_data.index)
    ):
        names = meta_data.index
    if names is None and isinstance(meta_data, pd.DataFrame):
        declared = declared_names(meta_data, index=False)
        names = None if declared is None else declared[1]
    return names if names is not None and names.is_unique else None
