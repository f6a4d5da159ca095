"""Checks on everything a caller passes to :func:`run_harmony`.

Every check runs before any heavy work and raises :class:`TypeError` (wrong
kind of object) or :class:`ValueError` (right kind, wrong value) with a
message that names the argument, the offending value, column or count, and
what was expected. Nothing the caller passed is modified: arrays are read,
and copied by the engine before any arithmetic.

See ``docs/input-validation.md`` for the table of rejected inputs.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

MIN_CELLS = 6

#: Rows examined at once by the O(N d) checks, to bound temporary memory.
_CHUNK_ROWS = 65536

#: Float types the engine computes in, by name.
_FINFO = {"float32": np.finfo(np.float32), "float64": np.finfo(np.float64)}


# ---------------------------------------------------------------- helpers
def _is_sparse(x) -> bool:
    """True for SciPy sparse matrices/arrays and sparse torch tensors."""
    if type(x).__module__.startswith("scipy.sparse") or hasattr(x, "tocsr"):
        return True
    layout = getattr(x, "layout", None)
    return layout is not None and "strided" not in str(layout)


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


@dataclass(frozen=True)
class CellRows:
    """How messages number the cells a process holds, and how few it may hold.

    Attributes
    ----------
    first : int
        Number of its first row among all cells: 0 in a single process; in a
        distributed run the cells of the lower ranks (rank order is the
        order of the gathered result), so that an error names the cell as
        the caller counts it, not its row within the shard.
    names : pandas.Index or None
        The cells' names, in row order, when the input names them.
    min_cells : int
        Fewest cells accepted here: :data:`MIN_CELLS` in a single process; 1
        per process in a distributed run, whose total is checked once the
        processes have exchanged their counts.
    """

    first: int = 0
    names: pd.Index | None = None
    min_cells: int = MIN_CELLS

    def label(self, row: int) -> str:
        """``"15000"``, or ``"15000 ('AAAC-1')"`` when the cells are named."""
        text = str(self.first + int(row))
        if self.names is not None and 0 <= row < len(self.names):
            text += f" ({str(self.names[row])!r})"
        return text

    def too_few(self, n_cells: int, what: str) -> str | None:
        """The refusal for ``n_cells`` rows of ``what``, or None when enough."""
        if n_cells >= self.min_cells:
            return None
        if self.min_cells < MIN_CELLS:
            return (
                f"{what} has {n_cells} rows: every process of a distributed run needs at "
                f"least {self.min_cells} cell(s) (and all of them together at least "
                f"{MIN_CELLS})"
            )
        return f"Harmony needs at least {self.min_cells} cells, {what} has {n_cells}"


def cell_rows_of(meta_data, *, first: int = 0, min_cells: int = MIN_CELLS) -> CellRows:
    """:class:`CellRows` whose names are ``meta_data``'s index unless it only numbers the rows."""
    index = getattr(meta_data, "index", None)
    named = (
        isinstance(index, pd.Index)
        and not isinstance(index, pd.RangeIndex)
        and not pd.api.types.is_integer_dtype(index.dtype)
    )
    return CellRows(first=first, names=index if named else None, min_cells=min_cells)


def _describe_rows(
    mask: np.ndarray, limit: int = 5, what: str = "cell", rows: CellRows | None = None
) -> str:
    """``"cell(s) 3, 7, ... (12 in all)"`` for the True entries of ``mask``
    (numbered and named by ``rows`` when given)."""
    idx = np.flatnonzero(mask)
    label = rows.label if rows is not None and what == "cell" else str
    shown = ", ".join(label(i) for i in idx[:limit])
    more = f", ... ({idx.size} in all)" if idx.size > limit else ""
    return f"{what}(s) {shown}{more}"


def _shape_of(obj) -> str:
    shape = getattr(obj, "shape", None)
    return str(tuple(shape)) if shape is not None else f"({len(obj)},)"


# -------------------------------------------------------------- data_mat
def to_array(data_mat) -> np.ndarray:
    """A NumPy view or copy of ``data_mat``, refusing what is not a dense real matrix."""
    if data_mat is None:
        raise TypeError("data_mat is None; expected a cells x PCs array or DataFrame")
    if _is_sparse(data_mat):
        raise TypeError(
            f"data_mat is a sparse matrix ({type(data_mat).__name__}); Harmony works on "
            f"a dense embedding such as PCs, not on a sparse expression matrix. If these "
            f"values really are the embedding, pass data_mat.toarray() (SciPy) or "
            f"data_mat.to_dense() (torch)"
        )
    if isinstance(data_mat, pd.DataFrame):
        bad = [
            c
            for c in data_mat.columns
            if not pd.api.types.is_numeric_dtype(data_mat[c])
            or pd.api.types.is_bool_dtype(data_mat[c])
        ]
        if bad:
            kinds = sorted({str(data_mat[c].dtype) for c in bad})
            raise TypeError(
                f"data_mat has {len(bad)} non-numeric column(s) {list(map(str, bad[:5]))} "
                f"(dtype {', '.join(kinds)}); expected only numeric PC columns"
            )
        if all(isinstance(t, np.dtype) for t in data_mat.dtypes):
            return data_mat.to_numpy()  # keeps float32 as float32 (no doubled memory)
        # Nullable (Float64/Int64) columns: pd.NA becomes NaN and is reported below.
        return data_mat.to_numpy(dtype=np.float64, na_value=np.nan)
    if isinstance(data_mat, pd.Series):
        raise TypeError(
            "data_mat is a pandas Series (1-D); expected a 2-D cells x PCs array or DataFrame"
        )
    if _is_tensor(data_mat):
        tensor = data_mat.detach()
        if str(tensor.dtype) == "torch.bfloat16":
            # NumPy has no bfloat16; float32 holds every bfloat16 value exactly.
            tensor = tensor.float()
        return tensor.cpu().numpy()
    if isinstance(data_mat, (str, bytes)):
        raise TypeError(f"data_mat must be a numeric matrix, not {type(data_mat).__name__}")
    array = np.asarray(data_mat)
    if array.dtype == object:
        try:  # lists or object arrays of plain numbers
            array = np.asarray(data_mat, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(
                "data_mat holds non-numeric objects (dtype object); expected a "
                "matrix of real numbers"
            ) from None
    return array


def as_cells_by_features(
    data_mat, n_cells: int, meta_shape: tuple | None = None, *, rows: CellRows | None = None
) -> np.ndarray:
    """Return the embedding as a (cells x features) real array, checked.

    The orientation is taken from ``n_cells = len(meta_data)``: cells x PCs when
    the first dimension matches (also when both do), else PCs x cells. The
    result may be a view of the caller's array; it is never written to.

    Parameters
    ----------
    data_mat : array-like, DataFrame or torch.Tensor
    n_cells : int
        Number of rows of ``meta_data``.
    meta_shape : tuple, optional
        Shape of ``meta_data``, for the error message when no dimension matches.
    rows : CellRows, optional
        How messages number and name the cells, and the fewest accepted
        (default: from 0, unnamed, :data:`MIN_CELLS`).

    Raises
    ------
    TypeError
        Sparse, non-numeric or ``None`` input.
    ValueError
        Not 2-D, empty, no dimension equal to ``n_cells``, fewer than 6 cells,
        NaN or infinite values, or cells whose vector is all zeros.
    """
    rows = rows if rows is not None else CellRows()
    array = to_array(data_mat)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(
            f"data_mat must hold real numbers, got dtype {array.dtype}; expected a float "
            f"or integer matrix"
        )
    if array.ndim != 2:
        raise ValueError(
            f"data_mat must be 2-D (cells x PCs), got an array with {array.ndim} "
            f"dimension(s) and shape {array.shape}"
        )
    if array.size == 0:
        raise ValueError(
            f"data_mat is empty (shape {array.shape}); expected at least {rows.min_cells} "
            f"cell(s) and 1 PC"
        )
    if array.shape[0] == n_cells:
        cells = array
    elif array.shape[1] == n_cells:
        cells = array.T
    else:
        meta = f"shape {tuple(meta_shape)}" if meta_shape is not None else f"{n_cells} rows"
        raise ValueError(
            f"data_mat has shape {array.shape} but meta_data has {meta}: one dimension "
            f"of data_mat must equal the number of cells ({n_cells}), as cells x PCs or "
            f"PCs x cells"
        )
    refusal = rows.too_few(cells.shape[0], "data_mat")
    if refusal:
        raise ValueError(refusal)
    if np.issubdtype(cells.dtype, np.floating):
        check_finite(cells, rows)
    check_nonzero_cells(cells, rows)
    return cells


#: More features per cell than this suggests genes rather than a reduced embedding.
MAX_EMBEDDING_DIMS = 200

#: Rows looked at by the counts check (a sample keeps it O(1) in N).
_COUNTS_SAMPLE_ROWS = 2000


def warn_if_not_reduced(cells: np.ndarray, stacklevel: int = 3) -> None:
    """Warn when ``cells`` looks like an expression matrix rather than PCs.

    Harmony corrects a low-dimensional embedding (typically 20-50 PCs). Two
    signs of a genes matrix passed by mistake: more than
    :data:`MAX_EMBEDDING_DIMS` columns, or only non-negative whole numbers
    (counts; a PCA embedding is centred and never integral). The counts check
    looks at the first :data:`_COUNTS_SAMPLE_ROWS` cells only.
    """
    n_dims = cells.shape[1]
    if n_dims > MAX_EMBEDDING_DIMS:
        warnings.warn(
            f"data_mat has {n_dims} dimensions per cell; Harmony expects a reduced "
            f"embedding such as 20-50 PCs, not genes. Run a PCA first (and pass "
            f"cells x PCs)",
            UserWarning,
            stacklevel=stacklevel,
        )
        return
    sample = cells[:_COUNTS_SAMPLE_ROWS]
    if np.issubdtype(sample.dtype, np.integer):
        integral = True
    else:
        integral = bool(np.all(np.floor(sample) == sample))
    if integral and sample.min() >= 0:
        warnings.warn(
            f"data_mat holds only non-negative whole numbers (checked in the first "
            f"{sample.shape[0]} cells): it looks like counts, but Harmony expects a "
            f"reduced embedding such as PCs. Run a PCA first",
            UserWarning,
            stacklevel=stacklevel,
        )


def check_finite(cells: np.ndarray, rows: CellRows) -> None:
    n_bad = n_nan = 0
    bad_rows = np.zeros(cells.shape[0], dtype=bool)
    bad_cols = np.zeros(cells.shape[1], dtype=bool)
    for start in range(0, cells.shape[0], _CHUNK_ROWS):
        chunk = cells[start : start + _CHUNK_ROWS]
        block = ~np.isfinite(chunk)
        if block.any():
            n_bad += int(block.sum())
            n_nan += int(np.isnan(chunk).sum())
            bad_rows[start : start + chunk.shape[0]] = block.any(axis=1)
            bad_cols |= block.any(axis=0)
    if n_bad:
        raise ValueError(
            f"data_mat has {n_bad} non-finite value(s) ({n_nan} NaN, {n_bad - n_nan} "
            f"infinite) in {int(bad_rows.sum())} {_describe_rows(bad_rows, rows=rows)} and "
            f"{_describe_rows(bad_cols, what='column')}; expected finite numbers: "
            f"remove or impute those cells"
        )


def _squared_norms(cells: np.ndarray) -> np.ndarray:
    """Squared L2 length of every cell, in float64, chunk by chunk."""
    out = np.empty(cells.shape[0], dtype=np.float64)
    with np.errstate(over="ignore", under="ignore"):
        for start in range(0, cells.shape[0], _CHUNK_ROWS):
            _squared_norms_chunk(cells[start : start + _CHUNK_ROWS], out[start:])
    return out


def _squared_norms_chunk(block: np.ndarray, out: np.ndarray) -> None:
    """``_squared_norms`` for one chunk, written to the start of ``out``."""
    rows = out[: block.shape[0]]
    rows[:] = np.einsum("ij,ij->i", block, block, dtype=np.float64)
    # Only where squaring could overflow or underflow float64 (entries far
    # beyond any embedding's scale) is the slower rescaled sum needed.
    risky = ~np.isfinite(rows) | (rows < 1e-280)
    if risky.any():
        exact = block[risky].astype(np.float64)
        peak = np.abs(exact).max(axis=1)
        safe = np.where(peak > 0, peak, 1.0)
        scaled = exact / safe[:, None]
        rows[risky] = np.einsum("ij,ij->i", scaled, scaled) * safe**2


def check_nonzero_cells(cells: np.ndarray, rows: CellRows) -> None:
    zero = np.zeros(cells.shape[0], dtype=bool)
    for start in range(0, cells.shape[0], _CHUNK_ROWS):
        zero[start : start + _CHUNK_ROWS] = ~cells[start : start + _CHUNK_ROWS].any(axis=1)
    if zero.any():
        raise ValueError(
            f"data_mat has {int(zero.sum())} all-zero {_describe_rows(zero, rows=rows)}; "
            f"a cell with zero length cannot be cosine-normalised. Expected every cell to have a "
            f"non-zero vector: remove those cells"
        )


def check_cell_lengths(cells: np.ndarray, dtype, *, rows: CellRows | None = None) -> None:
    """Refuse cells whose length cannot be computed in the working float type.

    The engine normalises every cell to unit length; in float32 the squared
    length of a cell overflows above about 1.8e19 and loses all precision below
    about 1e-19, which would silently give wrong clusters.

    Parameters
    ----------
    cells : (N, d) array
    dtype : torch.dtype, numpy dtype or str
        ``float32`` or ``float64``.
    rows : CellRows, optional
        How the message numbers and names the cells.
    """
    rows = rows if rows is not None else CellRows()
    name = str(dtype).replace("torch.", "")
    info = _FINFO.get(name, _FINFO["float32"])
    sq = _squared_norms(cells)
    low, high = float(info.tiny), float(info.max) / max(1, cells.shape[1])
    bad = (sq < low) | (sq > high) | ~np.isfinite(sq)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        hint = " or pass dtype='float64'" if name == "float32" else ""
        raise ValueError(
            f"data_mat has {int(bad.sum())} {_describe_rows(bad, rows=rows)} whose length (e.g. "
            f"{math.sqrt(sq[first]):.3g} for cell {rows.label(first)}) is outside what {name} can "
            f"normalise (about {math.sqrt(low):.0e} to {math.sqrt(high):.0e}); expected "
            f"an embedding on a usual scale: rescale data_mat (e.g. divide it by its "
            f"standard deviation){hint}"
        )


# ------------------------------------------------------ meta_data, vars_use
def _labels_frame(meta_data, vars_use) -> pd.DataFrame:
    """A one-column DataFrame from a Series or 1-D array of labels."""
    name: Hashable
    if isinstance(vars_use, str):
        name = vars_use
    elif (
        vars_use is not None
        and not isinstance(vars_use, str)
        and isinstance(vars_use, (Sequence, np.ndarray, pd.Index))
        and len(vars_use) == 1
    ):
        name = list(vars_use)[0]
    elif isinstance(meta_data, pd.Series) and meta_data.name is not None:
        name = meta_data.name
    else:
        name = "batch"
    if isinstance(meta_data, pd.Series):
        series = meta_data.reset_index(drop=True)
    else:
        if isinstance(meta_data, (np.ndarray, pd.Index)) or hasattr(meta_data, "dtype"):
            ndim = getattr(meta_data, "ndim", 1)
        else:
            ndim = np.asarray(meta_data, dtype=object).ndim
        if ndim != 1:
            raise TypeError(
                f"meta_data given as an array must be 1-D (one batch label per cell), got "
                f"shape {_shape_of(np.asarray(meta_data, dtype=object))}; pass a DataFrame "
                f"for several batch variables"
            )
        series = pd.Series(meta_data if hasattr(meta_data, "dtype") else list(meta_data))
    return series.to_frame(name=name)


def as_metadata(meta_data, vars_use, *, rows: CellRows | None = None) -> tuple[pd.DataFrame, list]:
    """Normalise ``meta_data``/``vars_use`` to a DataFrame and a list of names.

    A Series, list, tuple, 1-D array, Index or Categorical of labels is accepted
    as a single batch variable (as the R package accepts a vector); ``vars_use``
    may then be omitted, or give the variable's name. The caller's object is
    never modified.

    Raises
    ------
    TypeError
        ``meta_data`` or ``vars_use`` of an unsupported type.
    ValueError
        ``vars_use`` empty, missing while several columns exist, or naming a
        column twice; fewer than 6 rows (``rows.min_cells``).
    """
    if isinstance(meta_data, pd.DataFrame):
        frame = meta_data
    elif isinstance(
        meta_data, (pd.Series, pd.Index, pd.Categorical, list, tuple, np.ndarray)
    ) or isinstance(meta_data, pd.api.extensions.ExtensionArray):
        frame = _labels_frame(meta_data, vars_use)
    else:
        raise TypeError(
            f"meta_data must be a pandas DataFrame (or a Series/1-D array of batch labels, "
            f"one per cell), not {type(meta_data).__name__}"
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
    elif isinstance(vars_use, (Sequence, np.ndarray, pd.Index)) and not isinstance(vars_use, bytes):
        names = list(vars_use)
    else:
        raise TypeError(
            f"vars_use must be a column name or a list of column names, "
            f"not {type(vars_use).__name__} ({vars_use!r})"
        )
    if not names:
        raise ValueError(
            f"vars_use is empty; expected at least one batch column of meta_data "
            f"(available: {list(map(str, frame.columns))})"
        )
    unhashable = [n for n in names if not isinstance(n, Hashable)]
    if unhashable:
        raise TypeError(f"vars_use must hold column names, got {unhashable[0]!r}")
    duplicates = sorted({str(n) for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"vars_use names column(s) {duplicates} more than once ({names}); "
            f"expected each batch variable once"
        )
    refusal = (rows if rows is not None else CellRows()).too_few(len(frame), "meta_data")
    if refusal:
        raise ValueError(refusal)
    return frame, names


# ------------------------------------------------------------ parameters
def check_real(name: str, value, *, allow_neg_inf: bool = False) -> float:
    """``value`` as a float; refuses bools, non-numbers, NaN and infinities."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        if isinstance(value, np.ndarray) and value.ndim == 0:
            return check_real(name, value.item(), allow_neg_inf=allow_neg_inf)
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not (allow_neg_inf and value < 0)):
        allowed = " (or -inf to never stop early)" if allow_neg_inf else ""
        raise ValueError(f"{name} must be finite{allowed}, got {value}")
    return value


def check_int(
    name: str, value, minimum: int, maximum: int | None = None, *, maximum_is: str | None = None
) -> int:
    """``value`` as an int in ``[minimum, maximum]``; integral floats are accepted.

    Parameters
    ----------
    maximum_is : str, optional
        What the maximum stands for, for the message (e.g. "the number of cells").
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        if (
            isinstance(value, (float, np.floating))
            and math.isfinite(value)
            and float(value).is_integer()
        ):
            value = int(value)
        else:
            raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        upper = ""
        if maximum is not None:
            upper = f" and at most {maximum}" + (f" ({maximum_is})" if maximum_is else "")
        raise ValueError(f"{name} must be at least {minimum}{upper}, got {value}")
    return value


def check_positive(name: str, value) -> float:
    """A finite real number > 0."""
    value = check_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_nonnegative(name: str, value) -> float:
    """A finite real number >= 0."""
    value = check_real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_fraction(name: str, value) -> float:
    """A real number in [0, 1)."""
    value = check_real(name, value)
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def check_flag(name: str, value) -> bool:
    """``True``/``False`` (also NumPy bools and the integers 0 and 1)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_epsilon(name: str, value) -> float:
    """A finite real number, or ``-inf`` (never stop early)."""
    return check_real(name, value, allow_neg_inf=True)


def check_block_size(value) -> float:
    """``block_size`` in (0, 1]."""
    value = check_real("block_size", value)
    if not 0 < value <= 1:
        raise ValueError(
            f"block_size must be in (0, 1] (the fraction of cells updated at once), got {value}"
        )
    return value


def _values(name: str, value) -> np.ndarray | None:
    """Floats of a list-like parameter, or None for a scalar."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a number or a list of numbers, got {value!r}")
    if np.isscalar(value) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return None
    if isinstance(value, dict) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be a number or a list of numbers, got {type(value).__name__}")
    raw = np.asarray(value, dtype=object).ravel()
    return np.array([check_real(f"{name}[{i}]", v) for i, v in enumerate(raw)], dtype=np.float64)


def per_level(
    name: str, value, design, default: float, *, minimum: float, strict: bool = False
) -> np.ndarray:
    """Expand a scalar, per-variable or per-level parameter to one value per level.

    Parameters
    ----------
    name : str
        Argument name, for messages.
    value : None, number or sequence of numbers
        One value (all levels), one per batch variable (in ``vars_use`` order)
        or one per batch level (in ``Phi`` row order).
    design : BatchDesign
    default : float
        Used when ``value`` is None.
    minimum, strict
        Values must be ``>= minimum`` (``> minimum`` when ``strict``).

    Returns
    -------
    ndarray of shape (B,), float64
    """
    n_vars, n_levels = design.n_variables, design.n_levels
    if value is None:
        values = np.full(n_levels, default, dtype=np.float64)
    else:
        floats = _values(name, value)
        if floats is None:
            values = np.full(n_levels, check_real(name, value), dtype=np.float64)
        elif floats.size == 1:
            values = np.full(n_levels, floats[0])
        elif floats.size == n_vars:
            values = np.repeat(floats, np.diff(design.offsets))
        elif floats.size == n_levels:
            values = floats
        else:
            raise ValueError(
                f"{name} has {floats.size} values; expected 1 (all levels), "
                f"{n_vars} (one per batch variable: {list(map(str, design.variables))}) or "
                f"{n_levels} (one per batch level: {design.level_names[:10]}"
                f"{' ...' if n_levels > 10 else ''})"
            )
    bad = values <= minimum if strict else values < minimum
    if bad.any():
        relation = ">" if strict else ">="
        which = [design.level_names[i] for i in np.flatnonzero(bad)[:5]]
        raise ValueError(
            f"{name} must be {relation} {minimum:g} for every level; got "
            f"{values[bad][:5].tolist()} for {which}"
        )
    return values


def check_sigma(sigma, n_clusters: int, dtype=None) -> np.ndarray:
    """``sigma`` as one positive bandwidth per cluster.

    Parameters
    ----------
    sigma : number or sequence of numbers
        One value, or one per cluster.
    n_clusters : int
    dtype : optional
        Working float type; ``sigma`` and ``1 / sigma`` must be representable
        in it.
    """
    floats = _values("sigma", sigma)
    if floats is None:
        values = np.full(n_clusters, check_positive("sigma", sigma))
    elif floats.size == 1:
        values = np.full(n_clusters, floats[0])
    elif floats.size == n_clusters:
        values = floats
    else:
        raise ValueError(
            f"sigma has {floats.size} values; expected 1 or one per cluster (nclust = {n_clusters})"
        )
    if (values <= 0).any():
        raise ValueError(f"sigma must be > 0, got {values[values <= 0][:5].tolist()}")
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        info = _FINFO.get(name, _FINFO["float32"])
        limit = 1.0 / float(info.tiny)
        out = (values > limit) | (values < 1.0 / limit)
        if out.any():
            raise ValueError(
                f"sigma must be between {1 / limit:.0e} and {limit:.0e} in {name}, got "
                f"{values[out][:5].tolist()}; usual values are 0.05 to 1"
            )
    return values


def check_random_state(random_state) -> None:
    """Refuse a ``random_state`` that is not None, an int >= 0 or a NumPy generator."""
    if random_state is None or isinstance(
        random_state, (np.random.Generator, np.random.RandomState)
    ):
        return
    if isinstance(random_state, (bool, np.bool_)) or not isinstance(random_state, numbers.Integral):
        raise TypeError(
            f"random_state must be an int, None or a numpy Generator, got {random_state!r} "
            f"({type(random_state).__name__})"
        )
    if random_state < 0:
        raise ValueError(f"random_state must be >= 0, got {random_state}")


def resolve_seed(random_state) -> int:
    """A 63-bit integer seed, drawn without touching any global RNG.

    An int is used as is (modulo 2**63 - 1); a ``Generator`` or ``RandomState``
    the caller passed is advanced by one draw (that is the point of passing
    one); ``None`` draws fresh entropy from the operating system.
    """
    check_random_state(random_state)
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> 1)
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**63 - 1))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    return int(random_state) % (2**63 - 1)
