"""The batch design: which level of each batch variable every cell belongs to.

Harmony's ``Phi`` is a one-hot matrix (levels x cells). It is never needed in
dense form by the engine: an integer level code per cell and variable does the
same work in gathers and scatter-adds, at a fraction of the memory.
"""

from __future__ import annotations

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
        Cells per level (``N_b``).
    """

    variables: list
    levels: list
    codes: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray

    @property
    def n_cells(self) -> int:
        return int(self.codes.shape[0])

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
        return [f"{v}={lv}" for v, lvls in zip(self.variables, self.levels) for lv in lvls]

    @property
    def proportions(self) -> np.ndarray:
        """``Pr_b``: fraction of cells in each level, shape (B,)."""
        return self.counts / self.n_cells

    def one_hot(self, dtype=np.float64) -> np.ndarray:
        """Dense ``Phi`` (B x N); built only when a caller asks for it."""
        phi = np.zeros((self.n_levels, self.n_cells), dtype=dtype)
        cells = np.arange(self.n_cells)
        for v in range(self.n_variables):
            phi[self.codes[:, v], cells] = 1
        return phi


def _sort_key(value):
    # Levels of mixed types ("1" and 1) must stay distinct and sortable.
    return (type(value).__name__, value)


def _encode_column(name: str, column: pd.Series) -> tuple[list, np.ndarray]:
    """Level list (observed levels only) and integer codes for one column."""
    missing = int(column.isna().sum())
    if missing:
        examples = list(column.index[column.isna().to_numpy()][:5])
        raise ValueError(
            f"batch column {name!r} has {missing} missing value(s) (None/NaN/NA), "
            f"e.g. at rows {examples}; fill or drop those cells before running Harmony"
        )
    if isinstance(column.dtype, pd.CategoricalDtype):
        # Keep the categorical's own order but drop categories no cell uses:
        # an empty level would have N_b = 0 and divide by zero in E.
        used = column.cat.remove_unused_categories()
        levels = list(used.cat.categories)
        codes = used.cat.codes.to_numpy().astype(np.int64)
        return levels, codes
    values = column.to_numpy()
    uniques = pd.unique(values)
    try:
        levels = sorted(uniques)
    except TypeError:
        levels = sorted(uniques, key=_sort_key)
    lookup = {level: i for i, level in enumerate(levels)}
    if len(lookup) != len(levels):  # values equal under == but distinct objects
        levels = list(uniques)
        lookup = {level: i for i, level in enumerate(levels)}
    codes = np.fromiter((lookup[v] for v in values), dtype=np.int64, count=len(values))
    return levels, codes


def build_design(meta_data: pd.DataFrame, vars_use: list[str]) -> BatchDesign:
    """Encode the batch columns of ``meta_data`` named in ``vars_use``.

    Raises
    ------
    ValueError
        For a missing column, missing labels, or a variable with a single level.
    """
    missing = [v for v in vars_use if v not in meta_data.columns]
    if missing:
        raise ValueError(
            f"vars_use names column(s) {missing} not found in meta_data; "
            f"available columns: {list(map(str, meta_data.columns))}"
        )
    all_levels, all_codes, offsets = [], [], [0]
    for name in vars_use:
        column = meta_data[name]
        if isinstance(column, pd.DataFrame):
            raise ValueError(f"meta_data has more than one column named {name!r}")
        levels, codes = _encode_column(name, column)
        if len(levels) < 2:
            raise ValueError(
                f"batch column {name!r} has a single level ({levels[0]!r}) across all "
                f"{len(codes)} cells: there is no batch effect to remove for it; "
                f"drop it from vars_use"
            )
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
