"""Checks on everything a caller passes to :func:`run_harmony`.

Every check runs before any heavy work and names the argument, the offending
value and what was expected. Nothing the caller passed is modified.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import pandas as pd

MIN_CELLS = 6


def _is_sparse(x) -> bool:
    return hasattr(x, "tocsr") or type(x).__module__.startswith("scipy.sparse")


def _describe_cells(mask: np.ndarray, limit: int = 5) -> str:
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:limit])
    more = f", ... ({idx.size} in all)" if idx.size > limit else ""
    return f"cell(s) {shown}{more}"


def as_cells_by_features(data_mat, n_cells: int) -> np.ndarray:
    """Return the embedding as a (cells x features) float array.

    The orientation is taken from ``n_cells = len(meta_data)``: cells x PCs when
    the first dimension matches (also when both do), else PCs x cells.
    """
    if data_mat is None:
        raise TypeError("data_mat is None; expected a cells x PCs array or DataFrame")
    if _is_sparse(data_mat):
        raise TypeError(
            "data_mat is a sparse matrix; Harmony works on a dense embedding such as "
            "PCs. Pass data_mat.toarray() if you really mean to use these values."
        )
    if isinstance(data_mat, pd.DataFrame):
        bad = [c for c in data_mat.columns if not pd.api.types.is_numeric_dtype(data_mat[c])
               or pd.api.types.is_bool_dtype(data_mat[c])]
        if bad:
            raise TypeError(
                f"data_mat has non-numeric column(s) {list(map(str, bad[:5]))}; "
                f"expected only numeric PC columns"
            )
        array = data_mat.to_numpy()
    elif hasattr(data_mat, "detach") and hasattr(data_mat, "cpu"):  # a torch tensor
        array = data_mat.detach().cpu().numpy()
    else:
        array = np.asarray(data_mat)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.floating)
                                     or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(
            f"data_mat must hold real numbers, got dtype {array.dtype}"
        )
    if array.ndim != 2:
        raise ValueError(
            f"data_mat must be 2-D (cells x PCs), got an array with shape {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"data_mat is empty (shape {array.shape})")
    if array.shape[0] == n_cells:
        cells = array
    elif array.shape[1] == n_cells:
        cells = array.T
    else:
        raise ValueError(
            f"data_mat has shape {array.shape} but meta_data has {n_cells} rows; one "
            f"dimension of data_mat must equal the number of cells"
        )
    if cells.shape[0] < MIN_CELLS:
        raise ValueError(
            f"Harmony needs at least {MIN_CELLS} cells, got {cells.shape[0]}"
        )
    finite = np.isfinite(cells)
    if not finite.all():
        bad_cells = ~finite.all(axis=1)
        raise ValueError(
            f"data_mat has {int((~finite).sum())} NaN or infinite value(s) in "
            f"{int(bad_cells.sum())} {_describe_cells(bad_cells)}; remove or impute them"
        )
    norms = np.linalg.norm(cells.astype(np.float64, copy=False), axis=1)
    zero = norms == 0
    if zero.any():
        raise ValueError(
            f"data_mat has {int(zero.sum())} all-zero {_describe_cells(zero)}; a cell "
            f"with zero length cannot be cosine-normalised. Remove those cells"
        )
    return cells


def as_metadata(meta_data, vars_use) -> tuple[pd.DataFrame, list[str]]:
    """Normalise ``meta_data``/``vars_use`` to a DataFrame and a list of names.

    A Series, list or 1-D array of labels is accepted as a single batch variable
    (as the R package accepts a vector); ``vars_use`` may then be omitted.
    """
    if isinstance(meta_data, pd.DataFrame):
        frame = meta_data
    elif isinstance(meta_data, pd.Series):
        name = meta_data.name if meta_data.name is not None else "batch"
        if vars_use is not None and not isinstance(vars_use, str) and len(vars_use) == 1:
            name = vars_use[0]
        elif isinstance(vars_use, str):
            name = vars_use
        frame = meta_data.to_frame(name=name)
    elif isinstance(meta_data, (list, tuple, np.ndarray)):
        values = np.asarray(meta_data, dtype=object)
        if values.ndim != 1:
            raise TypeError(
                f"meta_data as an array must be 1-D labels (one per cell), got shape "
                f"{values.shape}; pass a DataFrame for several variables"
            )
        name = vars_use if isinstance(vars_use, str) else (
            vars_use[0] if vars_use is not None and len(vars_use) == 1 else "batch")
        frame = pd.DataFrame({name: pd.Series(list(meta_data))})
    else:
        raise TypeError(
            f"meta_data must be a pandas DataFrame (or a Series/array of batch labels), "
            f"not {type(meta_data).__name__}"
        )
    if vars_use is None:
        if frame.shape[1] != 1:
            raise ValueError(
                f"vars_use is required when meta_data has several columns; "
                f"available columns: {list(map(str, frame.columns))}"
            )
        names = [frame.columns[0]]
    elif isinstance(vars_use, str):
        names = [vars_use]
    elif isinstance(vars_use, Sequence) or isinstance(vars_use, (np.ndarray, pd.Index)):
        names = list(vars_use)
    else:
        raise TypeError(
            f"vars_use must be a column name or a list of column names, "
            f"not {type(vars_use).__name__}"
        )
    if not names:
        raise ValueError("vars_use is empty; name at least one batch column of meta_data")
    duplicates = sorted({str(n) for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"vars_use names column(s) {duplicates} more than once")
    if len(frame) < MIN_CELLS:
        raise ValueError(f"Harmony needs at least {MIN_CELLS} cells, meta_data has {len(frame)}")
    return frame, names


def _real(name: str, value, *, allow_neg_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not (allow_neg_inf and value < 0)):
        allowed = " (or -inf to never stop early)" if allow_neg_inf else ""
        raise ValueError(f"{name} must be finite{allowed}, got {value}")
    return value


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be at least {minimum}{upper}, got {value}")
    return value


def check_positive(name: str, value) -> float:
    value = _real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_epsilon(name: str, value) -> float:
    return _real(name, value, allow_neg_inf=True)


def check_block_size(value) -> float:
    value = _real("block_size", value)
    if not 0 < value <= 1:
        raise ValueError(f"block_size must be in (0, 1], got {value}")
    return value


def per_level(name: str, value, design, default: float, *, minimum: float,
              strict: bool = False) -> np.ndarray:
    """Expand a scalar, per-variable or per-level parameter to one value per level.

    Parameters
    ----------
    minimum, strict
        Values must be ``>= minimum`` (``> minimum`` when ``strict``).
    """
    n_vars, n_levels = design.n_variables, design.n_levels
    if value is None:
        values = np.full(n_levels, default, dtype=np.float64)
    else:
        raw = np.asarray(value, dtype=object).ravel() if not np.isscalar(value) else None
        if raw is None:
            values = np.full(n_levels, _real(name, value), dtype=np.float64)
        else:
            floats = np.array([_real(f"{name}[{i}]", v) for i, v in enumerate(raw)],
                              dtype=np.float64)
            if floats.size == 1:
                values = np.full(n_levels, floats[0])
            elif floats.size == n_vars:
                values = np.repeat(floats, np.diff(design.offsets))
            elif floats.size == n_levels:
                values = floats
            else:
                raise ValueError(
                    f"{name} has {floats.size} values; expected 1 (all levels), "
                    f"{n_vars} (one per batch variable: {design.variables}) or "
                    f"{n_levels} (one per batch level: {design.level_names})"
                )
    bad = values <= minimum if strict else values < minimum
    if bad.any():
        relation = ">" if strict else ">="
        which = [design.level_names[i] for i in np.flatnonzero(bad)[:5]]
        raise ValueError(
            f"{name} must be {relation} {minimum} for every level; got "
            f"{values[bad][:5].tolist()} for {which}"
        )
    return values


def check_sigma(sigma, n_clusters: int) -> np.ndarray:
    """``sigma`` as one positive bandwidth per cluster."""
    if np.isscalar(sigma):
        values = np.full(n_clusters, check_positive("sigma", sigma))
    else:
        values = np.array([_real(f"sigma[{i}]", v) for i, v in
                           enumerate(np.asarray(sigma, dtype=object).ravel())], dtype=np.float64)
        if values.size == 1:
            values = np.full(n_clusters, values[0])
        elif values.size != n_clusters:
            raise ValueError(
                f"sigma has {values.size} values; expected 1 or one per cluster "
                f"(nclust = {n_clusters})"
            )
    if (values <= 0).any():
        raise ValueError(f"sigma must be > 0, got {values[values <= 0][:5].tolist()}")
    return values


def resolve_seed(random_state) -> int:
    """A 63-bit integer seed, drawn without touching any global RNG."""
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> 1)
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**63 - 1))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral):
        raise TypeError(
            f"random_state must be an int, None or a numpy Generator, got {random_state!r}"
        )
    if random_state < 0:
        raise ValueError(f"random_state must be >= 0, got {random_state}")
    return int(random_state) % (2**63 - 1)
