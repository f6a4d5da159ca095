"""The batch design: which level of each batch variable every cell belongs to.

Harmony's ``Phi`` is a one-hot matrix (levels x cells). It is never needed in
dense form by the engine: an integer level code per cell and variable does the
same work in gathers and scatter-adds, at a fraction of the memory.
"""

from __future__ import annotations

import difflib
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class BatchDesign:
    """Level codes of the batch variables, in a form the engine consumes.

    Attributes
    ----------
    variables : list of str
        Names of the batch variables, in the order given by ``vars_use``.
    levels : list of list
        Observed levels of each variable, in the order of its rows in ``Phi``.
    codes : ndarray of shape (n_cells, n_variables), int64
        Global level index (0..B-1) of each cell for each variable; the levels of
        variable ``v`` occupy ``offsets[v]:offsets[v + 1]``.
    offsets : ndarray of shape (n_variables + 1,), int64
    counts : ndarray of shape (B,), int64
        Cells per level (``N_b``), over all processes' cells in a distributed run.
    total_cells : int, optional
        Cells of the whole run when ``codes`` hold one process's shard of them
        (a distributed run); None: ``codes`` hold every cell.
    """

    variables: list
    levels: list
    codes: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray
    total_cells: int | None = None

    @property
    def n_cells(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_total(self) -> int:
        """Cells of the whole run (``n_cells`` unless distributed)."""
        return self.n_cells if self.total_cells is None else int(self.total_cells)

    @property
    def n_levels(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_variables(self) -> int:
        return len(self.variables)

    @property
    def level_variable(self) -> np.ndarray:
        """Index of the variable each level belongs to, shape (B,)."""
        return np.repeat(np.arange(self.n_variables), np.diff(self.offsets))

    @property
    def level_names(self) -> list[str]:
        """Readable ``variable=level`` names of the B levels."""
        return [
            f"{v}={lv}" for v, lvls in zip(self.variables, self.levels, strict=True) for lv in lvls
        ]

    @property
    def proportions(self) -> np.ndarray:
        """``Pr_b``: fraction of cells in each level, shape (B,)."""
        return self.counts / self.n_total

    def one_hot(self, dtype=np.float64) -> np.ndarray:
        """Dense ``Phi`` (B x N); built only when a caller asks for it."""
        phi = np.zeros((self.n_levels, self.n_cells), dtype=dtype)
        cells = np.arange(self.n_cells)
        for v in range(self.n_variables):
            phi[self.codes[:, v], cells] = 1
        return phi


def _sort_key(value):
    # Levels of mixed types ("1" and 1) stay distinct and sort by type, then value.
    return (type(value).__name__, value)


def _sorted_levels(uniques: list) -> list[int]:
    """Positions of ``uniques`` in level order: ascending, by type first if mixed."""
    positions = range(len(uniques))
    for key in (
        lambda i: uniques[i],
        lambda i: _sort_key(uniques[i]),
        lambda i: (type(uniques[i]).__name__, str(uniques[i])),
    ):
        try:
            return sorted(positions, key=key)
        except TypeError:
            continue
    return list(positions)  # pragma: no cover - str() always sorts


#: A batch variable may have at most this many levels per cell (N / 2: at least
#: two cells per level on average) ...
MAX_LEVELS_PER_CELL = 0.5
#: ... unless it has at most this many levels, which is always allowed.
ALWAYS_ALLOWED_LEVELS = 16


def max_levels(n_cells: int) -> int:
    """Most levels a batch variable of ``n_cells`` cells may have.

    The rule: at most ``N / 2`` levels (on average at least two cells per
    level), or at most 16 levels whatever N. More looks like a cell identifier
    (barcode, cell name) passed as a batch by mistake: a batch with one or two
    cells has nothing to be mixed with, and the per-level statistics and
    regressions cost memory and time in proportion to the number of levels
    (times N for the per-block sums when ``block_size`` is small). The floor
    of 16 keeps tiny designs legal (a handful of cells in a handful of
    batches, as in toy data and tests), where nothing is expensive.
    """
    return max(ALWAYS_ALLOWED_LEVELS, int(n_cells * MAX_LEVELS_PER_CELL))


def _check_not_identifier(name, n_levels: int, n_cells: int) -> None:
    """Refuse a batch column with more levels than :func:`max_levels` allows."""
    limit = max_levels(n_cells)
    if n_levels > limit:
        raise ValueError(
            f"batch variable {name!r} has {n_levels:,} levels for {n_cells:,} cells "
            f"({n_cells / n_levels:.1f} cells per level): it looks like a cell identifier, "
            f"not a batch; expected at most N/2 levels ({limit:,} here; at least 2 cells "
            f"per level on average): check vars_use"
        )


def encode_column(name, column: pd.Series, check_levels: bool = True) -> tuple[list, np.ndarray]:
    """Level list (observed levels only) and integer codes for one column.

    Level order: a categorical column keeps its categories' order (unused
    categories dropped); any other column is sorted ascending (numbers
    numerically, strings lexicographically, False before True). Labels of
    mixed types are grouped by type name, then sorted. Labels are compared as
    pandas does (by value), so ``1``, ``1.0`` and ``True`` in one object
    column are the same level.

    Raises
    ------
    ValueError
        Missing labels (None, NaN, pd.NA, NaT); more levels than
        :func:`max_levels` allows (counted before the levels are sorted).
    TypeError
        Labels that cannot be compared for equality (lists, dicts, ...).
    """
    missing_mask = column.isna().to_numpy()
    missing = int(missing_mask.sum())
    if missing:
        examples = list(column.index[missing_mask][:5])
        raise ValueError(
            f"batch column {name!r} has {missing} missing value(s) (None/NaN/NA) out of "
            f"{len(column)}, e.g. at rows {examples}; expected a label for every cell: "
            f"fill or drop those cells before running Harmony"
        )
    if isinstance(column.dtype, pd.CategoricalDtype):
        # Keep the categorical's own order but drop categories no cell uses:
        # an empty level would have N_b = 0 and divide by zero in E.
        used = column.cat.remove_unused_categories()
        if check_levels:
            _check_not_identifier(name, len(used.cat.categories), len(column))
        levels = list(used.cat.categories)
        codes = used.cat.codes.to_numpy().astype(np.int64)
        return levels, codes
    try:
        raw_codes, uniques = pd.factorize(column, sort=False)
    except TypeError as err:
        bad = next((v for v in column if not isinstance(v, Hashable)), None)
        raise TypeError(
            f"batch column {name!r} holds labels that cannot be compared "
            f"({type(bad).__name__ if bad is not None else err}); expected strings, "
            f"numbers, booleans or categories"
        ) from None
    if check_levels:
        _check_not_identifier(name, len(uniques), len(column))
    found = list(uniques)
    order = _sorted_levels(found)
    rank = np.empty(len(found), dtype=np.int64)
    rank[np.asarray(order, dtype=np.int64)] = np.arange(len(found), dtype=np.int64)
    levels = [found[i] for i in order]
    codes = rank[np.asarray(raw_codes, dtype=np.int64)]
    return levels, codes


def build_design(meta_data: pd.DataFrame, vars_use: list[str]) -> BatchDesign:
    """Encode the batch columns of ``meta_data`` named in ``vars_use``.

    Parameters
    ----------
    meta_data : DataFrame
        One row per cell; only the columns in ``vars_use`` are read, so the
        order of the other columns (and of these) in the frame does not matter.
    vars_use : list
        Batch column names, in the order their levels are stacked in ``Phi``.

    Raises
    ------
    ValueError
        For a missing column, missing labels, a variable with a single level, or
        a variable with more than N/2 levels (and more than 16): it looks like
        a cell identifier (see :func:`max_levels`). Levels are counted with
        ``pandas.factorize`` before anything of size N x levels exists.
    TypeError
        For labels that cannot be compared (lists, dicts, ...).
    """
    _check_columns(meta_data, vars_use)
    all_levels, all_codes, offsets = [], [], [0]
    for name in vars_use:
        levels, codes = encode_column(name, _column(meta_data, name))
        _check_several_levels(name, levels, len(codes))
        all_codes.append(codes + offsets[-1])
        all_levels.append(levels)
        offsets.append(offsets[-1] + len(levels))
    codes = np.stack(all_codes, axis=1)
    counts = np.zeros(offsets[-1], dtype=np.int64)
    for v in range(codes.shape[1]):
        counts += np.bincount(codes[:, v], minlength=offsets[-1])
    return BatchDesign(
        variables=list(vars_use),
        levels=all_levels,
        codes=codes,
        offsets=np.asarray(offsets, dtype=np.int64),
        counts=counts,
    )


def _check_columns(meta_data: pd.DataFrame, vars_use: list) -> None:
    check_columns(meta_data.columns, vars_use, what="vars_use names column(s)", where="meta_data")


class ColumnNotFoundError(KeyError, ValueError):
    """A column named by an argument is not in the table it names columns of.

    A KeyError (a missing key, as pandas raises it) and a ValueError (a bad
    argument, as the checks of the array functions raise it), so that code
    catching either keeps working. Its text is the message itself (a KeyError
    alone would print it in quotes).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def check_columns(available, names, *, what: str, where: str, as_list: bool = True) -> None:
    """Raise :class:`ColumnNotFoundError` unless every entry of ``names`` is in ``available``.

    Every check that an argument's column names exist goes through here, so
    the error type and the message are the same everywhere: the missing
    columns (after ``what``, e.g. ``"vars_use names column(s)"``), the table
    (``where``), a close match for each when there is one, and the available
    columns; as Python lists (``as_list``, for a DataFrame argument) or quoted
    and comma-separated (for ``adata.obs``).
    """
    missing = [name for name in names if name not in available]
    if not missing:
        return
    available = list(available)
    hints = []
    for name in missing:
        same_text = [c for c in available if str(c) == str(name)]
        close = same_text or difflib.get_close_matches(str(name), [str(c) for c in available], n=1)
        if close:
            hints.append(f"{name!r} -> {close[0]!r}?")
    hint = f" (did you mean: {', '.join(hints)})" if hints else ""
    if as_list:
        named, shown = str(missing), str(list(map(str, available)))
    else:
        named = ", ".join(map(repr, missing))
        shown = ", ".join(repr(str(c)) for c in available) or "none"
    raise ColumnNotFoundError(
        f"{what} {named} not found in {where}{hint}; available columns: {shown}"
    )


def _column(meta_data: pd.DataFrame, name) -> pd.Series:
    column = meta_data[name]
    if isinstance(column, pd.DataFrame):
        raise ValueError(
            f"meta_data has {column.shape[1]} columns named {name!r}; expected "
            f"column names to be unique"
        )
    return column


def _check_several_levels(name, levels: list, n_cells: int) -> None:
    if len(levels) < 2:
        raise ValueError(
            f"batch column {name!r} has a single level ({levels[0]!r}) across all "
            f"{n_cells} cells; expected at least 2 levels: there is no batch "
            f"effect to remove for it, drop it from vars_use"
        )


# ------------------------------------------------------ distributed designs
def encode_local_levels(meta_data: pd.DataFrame, vars_use: list) -> tuple[list, list, list]:
    """One process's part of a distributed design: its levels, codes and counts.

    Returns
    -------
    levels : list (one per variable) of ``(levels, categories)``: the levels
        this process's cells use, in their local order, and the full category
        list of a categorical column (None otherwise). Sent to every process.
    codes : list of (n,) int64 arrays, indices into the local levels.
    counts : list of (n_local_levels,) int64 arrays. Sent to every process.
    """
    _check_columns(meta_data, vars_use)
    levels, codes, counts = [], [], []
    for name in vars_use:
        column = _column(meta_data, name)
        local, local_codes = encode_column(name, column, check_levels=False)
        categories = (
            list(column.cat.categories) if isinstance(column.dtype, pd.CategoricalDtype) else None
        )
        levels.append((local, categories))
        codes.append(local_codes)
        counts.append(np.bincount(local_codes, minlength=len(local)).astype(np.int64))
    return levels, codes, counts


def merge_local_levels(
    vars_use: list,
    own_levels: list,
    local_codes: list,
    gathered_levels: list,
    gathered_counts: list,
) -> BatchDesign:
    """The design of a distributed run, the same on every process.

    ``gathered_levels`` and ``gathered_counts`` hold every process's
    :func:`encode_local_levels` parts, in rank order. A variable's levels are
    the union over the processes, ordered as a single run over all the cells
    would order them (a categorical's category order when every process has
    the same categories; sorted otherwise); the counts are summed. The
    returned design holds this process's cells (``local_codes``, indices into
    its ``own_levels``) coded against the global levels, with ``total_cells``
    the run's cell count.
    """
    n_total = int(sum(c.sum() for c in (counts[0] for counts in gathered_counts)))
    all_levels, all_codes, offsets = [], [], [0]
    counts_total = []
    for v, name in enumerate(vars_use):
        parts = [rank_levels[v] for rank_levels in gathered_levels]
        categories = [cats for _, cats in parts]
        union = pd.Index([lv for levels, _ in parts for lv in levels]).unique()
        if categories[0] is not None and all(c == categories[0] for c in categories):
            present = set(union)
            levels = [c for c in categories[0] if c in present]
        else:
            levels = list(union)
            levels = [levels[i] for i in _sorted_levels(levels)]
        _check_not_identifier(name, len(levels), n_total)
        _check_several_levels(name, levels, n_total)
        index = pd.Index(levels)
        counts = np.zeros(len(levels), dtype=np.int64)
        for (rank_levels, _), rank_counts in zip(
            parts, (c[v] for c in gathered_counts), strict=True
        ):
            counts[index.get_indexer(rank_levels)] += rank_counts
        own = index.get_indexer(own_levels[v][0]).astype(np.int64)
        all_codes.append(own[local_codes[v]] + offsets[-1])
        all_levels.append(levels)
        counts_total.append(counts)
        offsets.append(offsets[-1] + len(levels))
    return BatchDesign(
        variables=list(vars_use),
        levels=all_levels,
        codes=np.stack(all_codes, axis=1).astype(np.int64),
        offsets=np.asarray(offsets, dtype=np.int64),
        counts=np.concatenate(counts_total),
        total_cells=n_total,
    )
