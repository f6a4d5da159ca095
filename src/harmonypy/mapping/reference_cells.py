"""What a reference keeps of its cells' metadata: the rows of its cells, their labels, their names.

:func:`run_metadata` pairs ``meta_data``'s rows with a Harmony run's cells (by
name when both sides name them, else by position); :func:`label_frame` keeps
the label columns as categoricals with a stable category order, and
:func:`kept_cell_names` the names that label transfer and plots report.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from harmonypy.engine.cellnames import align_to_names, carries_names
from harmonypy.engine.design import check_columns

__all__ = ["kept_cell_names", "label_frame", "metadata_rows", "run_metadata"]

logger = logging.getLogger(__name__)


#: What to do when a Harmony run's cells and ``meta_data`` name different cells.
_RUN_REMEDY = (
    "Pass the metadata of the run's cells (e.g. meta.loc[ho.cell_names]), make "
    "the names unique, run Harmony on inputs named as this metadata is (e.g. "
    "run_harmony(pcs.set_axis(meta.index), meta, ...)), or drop the metadata's "
    "names to pair its rows with the run's cells by position "
    "(meta.reset_index(drop=True))"
)


def run_metadata(ho, meta_data) -> pd.DataFrame | None:
    """``meta_data``'s rows in the order of the Harmony run's cells.

    Paired by name when both sides name their cells (``ho.cell_names``, set
    by :func:`run_harmony`; ``meta_data``'s index or name column, as
    ``harmonypy.engine.cellnames.metadata_names`` finds it): the same names in
    another order are reordered, as :func:`run_harmony` does with its own
    inputs, and names that disagree are refused. Otherwise rows pair by
    position, which is logged at INFO: nothing can check that pairing.
    """
    if meta_data is None:
        return None
    if not isinstance(meta_data, pd.DataFrame):
        raise TypeError(f"meta_data must be a pandas DataFrame, not {type(meta_data).__name__}")
    names = getattr(ho, "cell_names", None)
    by_name = False
    if names is not None:
        meta_data, by_name = align_to_names(
            pd.Index(names),
            meta_data,
            cells_from="the Harmony run's cell names (ho.cell_names)",
            remedy=_RUN_REMEDY,
        )
    if not by_name:
        unnamed = [
            what
            for what, named in [
                ("the Harmony run's inputs", names is not None),
                ("meta_data", carries_names(meta_data.index)),
            ]
            if not named
        ]
        logger.info(
            "build_reference: meta_data's rows are paired with the Harmony run's cells "
            "by position (%s named no cells)",
            " and ".join(unnamed),
        )
    return metadata_rows(meta_data, ho.N, "the Harmony run's cells")


def metadata_rows(meta_data, n_cells: int, what: str) -> pd.DataFrame | None:
    """``meta_data`` (or None), checked to be a DataFrame with one row per
    reference cell (``what`` names those cells in the error)."""
    if meta_data is None:
        return None
    if not isinstance(meta_data, pd.DataFrame):
        raise TypeError(f"meta_data must be a pandas DataFrame, not {type(meta_data).__name__}")
    if len(meta_data) != n_cells:
        raise ValueError(
            f"meta_data has {len(meta_data)} rows but there are {n_cells} "
            f"reference cells ({what}); expected one row per cell, in their order"
        )
    return meta_data


def label_frame(frame: pd.DataFrame | None, names: list) -> pd.DataFrame | None:
    """The label columns as categorical columns (category order: the column's
    own for a categorical, else sorted), with a default index."""
    if not names:
        return None
    if frame is None:  # build_reference refuses labels without meta_data first
        raise ValueError(f"labels={names} names columns of meta_data, but there is no meta_data")
    check_columns(frame.columns, names, what="labels names column(s)", where="meta_data")
    out = {}
    for name in names:
        column = frame[name]
        if isinstance(column, pd.DataFrame):
            raise ValueError(f"meta_data has {column.shape[1]} columns named {name!r}")
        if not isinstance(column.dtype, pd.CategoricalDtype):
            try:
                column = column.astype(pd.CategoricalDtype(sorted(column.dropna().unique())))
            except TypeError:  # labels of mixed types: compared as text
                column = column.map(lambda v: v if pd.isna(v) else str(v)).astype("category")
        categories = column.cat.categories
        if categories.dtype == object:  # mixed or non-string objects: kept as text
            text = pd.Index([str(c) for c in categories])
            if text.has_duplicates:
                raise ValueError(
                    f"label column {name!r} has categories that are equal as "
                    f"text ({list(categories[:5])}); expected distinct labels"
                )
            column = column.cat.rename_categories(text)
        out[str(name)] = column.reset_index(drop=True)
    return pd.DataFrame(out)


def kept_cell_names(data_mat, frame: pd.DataFrame | None) -> np.ndarray | None:
    """The reference cells' names as text (N,): the metadata's index, else
    ``data_mat``'s; None when neither names its cells."""
    if frame is not None and carries_names(frame.index):
        return frame.index.astype(str).to_numpy(dtype=str)
    if isinstance(data_mat, pd.DataFrame) and carries_names(data_mat.index):
        return data_mat.index.astype(str).to_numpy(dtype=str)
    return None
