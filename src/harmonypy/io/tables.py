"""The table a file is read into, and the column tests reading and matching share.

A :class:`Table` carries a frame and whether its rows name cells; the
embedding reader (:mod:`harmonypy.io.readers`) and the pairing of cells by
name (:mod:`harmonypy.io.names`) both decide what a column holds with the
tests here, so that "row numbers are not names" means the same in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "SHOWN",
    "Table",
    "close_match",
    "column_list",
    "did_you_mean",
    "is_numeric",
    "row_numbers",
]

#: Offending names or columns shown in a message.
SHOWN = 5


@dataclass
class Table:
    """A cells x columns table read from a file.

    Attributes
    ----------
    frame : DataFrame, (n_cells, n_columns)
        The values; when ``has_names``, ``frame.index`` holds the cell names.
    has_names : bool
        Whether the rows carry cell names (worth matching on and writing back).
    names_from : str or None
        Where the names came from, for messages: ``"row names"`` or
        ``"column 'cell'"``.
    """

    frame: pd.DataFrame
    has_names: bool
    names_from: str | None = None

    @property
    def names(self) -> pd.Index | None:
        """The cell names, (n_cells,), or None."""
        return self.frame.index if self.has_names else None


def is_numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def row_numbers(values: pd.Index | pd.Series, *, any_order: bool = False) -> bool:
    """Whether ``values`` are 0..n-1 or 1..n (in order, or in any order if asked).

    Such values number rows (pandas' default index, R's default row names)
    rather than name cells. Text that spells integers counts too.
    """
    n = len(values)
    if n == 0:
        return False
    if pd.api.types.is_integer_dtype(values.dtype):
        numbers = np.asarray(values, dtype=np.int64)
    else:
        text = pd.Index(values).astype(str)
        if not text.str.fullmatch(r"\d{1,18}").all():
            return False
        numbers = text.astype(np.int64).to_numpy()
    if any_order:
        numbers = np.sort(numbers)
    return bool(numbers[0] in (0, 1) and np.array_equal(numbers, np.arange(n) + numbers[0]))


def close_match(name: str, available: Sequence[str]) -> str | None:
    """The entry of ``available`` that ``name`` most likely meant (case, spaces, typos)."""
    import difflib

    same_case = [c for c in available if c.strip().lower() == name.strip().lower()]
    close = same_case or difflib.get_close_matches(name, list(available), n=1)
    return close[0] if close else None


def did_you_mean(name: str, available: Sequence[str]) -> str:
    match = close_match(name, available)
    return f" (did you mean {match!r}?)" if match else ""


def column_list(columns: Sequence[Any], limit: int = 20) -> str:
    names = [str(c) for c in columns]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"
