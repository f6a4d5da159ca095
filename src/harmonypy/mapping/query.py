"""Mapping query cells onto a :class:`~harmonypy.Reference`, and label transfer.

:func:`map_query` is Symphony's ``mapQuery`` (Kang et al., *Nat Commun* 2021;
immunogenomics/symphony ``R/mapQuery.R`` and ``src/utils.cpp``) for an
embedding already in the reference's PC space, run on this package's engine:

1. soft assignment of the unit-length query cells to the reference centroids,
   with no diversity penalty (``soft_cluster``):
   ``R_q = softmax_k(-2 (1 - Y^T Zq_cos) / sigma_k)``;
2. one mixture-of-ridge-regressions correction of the *uncorrected* query
   cells ``Zq`` (``moe_correct_ref``), per cluster k with the query's design
   ``Xq`` (intercept first):
   ``A = Xq diag(R_q[k]) Xq^T + diag(0, lamb)``, ``A[0, 0] += Nr[k]``,
   ``F = Xq diag(R_q[k]) Zq^T``, ``F[0] += C[k]``, ``beta = A^-1 F``,
   ``beta[0] = 0`` and ``Zq_corr = Zq - sum_k beta_k^T Xq diag(R_q[k])``.
   The reference's cells enter only through ``Nr`` and ``C``: they anchor the
   intercept, so the query moves onto the reference and the reference stays.

Step 2 is the engine's correction kernel itself
(:func:`~harmonypy.engine.correction.ridge_correct`, fitted state in, query
out): the reference's ``Nr`` and ``C`` are its
:class:`~harmonypy.engine.correction.RidgeAnchor`. Per batch level it does one
(K x n_b) by (n_b x d) product; with one query batch variable the
(B+1) x (B+1) systems are arrowheads solved in closed form
(:func:`~harmonypy.engine.correction.solve_arrowhead`, whose
``total - sum_b o_b`` is exactly ``Nr[k]`` here); several variables use the
engine's bordered solve. The query is read in chunks, so beyond the outputs
(``Z_corr`` N x d, ``R`` N x K) and one sorted copy of the query, memory is
O(chunk x K), plus a bounded buffer of (cell, cluster) pairs x d for the
mapping score (:mod:`harmonypy.mapping.score`). ``iterations > 1`` repeats
both steps, assigning the corrected cells (not in Symphony).

The per-cell mapping score is Symphony's ``calcPerCellMappingMetric``
(``R/confidenceScores.R``) and :func:`transfer_labels` is its ``knnPredict``
(``R/utils.R``); see ``docs/mapping.md`` for the Harmony2 variant. This
module knows only arrays: an AnnData query is taken by the adapter layer
(:mod:`harmonypy.adapters.mapping_api`, :mod:`harmonypy.adapters.anndata`), which projects its
genes through the reference's loadings (:mod:`harmonypy.mapping.projection`) and
calls :func:`map_query` here with the PCs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from harmonypy.engine import clustering as clu
from harmonypy.engine import validation as val
from harmonypy.engine.arrays import COPY_CHUNK_ROWS
from harmonypy.engine.cellnames import align_metadata, carries_names
from harmonypy.engine.correction import LevelIndex, RidgeAnchor, RidgeSettings, ridge_correct
from harmonypy.engine.design import BatchDesign, check_columns, encode_column
from harmonypy.engine.device import resolve_device, resolve_dtype
from harmonypy.mapping.reference import Reference, reference_digest
from harmonypy.mapping.score import mapping_scores, score_terms

logger = logging.getLogger(__name__)

__all__ = ["MappedQuery", "map_query", "query_cells"]

#: Cells x clusters x dims per chunk of the mapping score (sets the chunk of
#: query cells; the pairs actually computed are a fraction of cells x clusters).
_SCORE_ELEMENTS = 2**26
#: Query cells soft-assigned at once (the correction reads the engine's
#: :data:`~harmonypy.engine.correction.LEVEL_CHUNK_ROWS`).
_CHUNK = 16384
#: Name of the single batch of a query mapped without batch variables.
_ONE_BATCH = "query"
#: Its one level, as checks name it (``query=all cells``).
_ALL_CELLS = "all cells"


class MappedQuery:
    """Query cells mapped onto a reference: the result of :func:`map_query`.

    Arrays are NumPy, in the orientation of :class:`~harmonypy.Harmony`
    (features or clusters in rows, cells in columns), cells in the caller's order.

    Attributes
    ----------
    Z_corr : ndarray (d, N_q)
        Query cells in the reference's corrected space (``Z_corr.T`` is cells x PCs).
    R : ndarray (K, N_q)
        Soft assignment of each query cell to the reference clusters.
    confidence : ndarray (N_q,) or None
        Symphony's per-cell mapping score (``calcPerCellMappingMetric``): the
        Mahalanobis distance of the uncorrected cell to each reference
        cluster's uncorrected cells, averaged with the cell's R. *Lower means
        more confident*: a cell far from every cluster it was assigned to (a
        cell type the reference lacks) scores high. None with ``confidence=False``.
    batch_levels : list of str
        The query's batch levels (``variable=level``), or ``['query']`` when
        the query was mapped as one batch.
    variables : list of str
        The query's batch variables (empty: one batch).
    lamb : ndarray (K, B_q)
        Ridge penalty used for each cluster and query level.
    kept_levels : ndarray (K, B_q) bool or None
        Harmony2 reference: levels that took part in each cluster's correction.
    sigma : ndarray (K,)
        Bandwidth of the soft assignment.
    cell_names : pandas.Index or None
        The query cells' names, when the inputs named them.
    algorithm : str
        The reference's algorithm.
    reference_digest : str
        Fingerprint of the reference mapped onto (16 hex digits of SHA-256
        over its ``Nr`` and ``C``, as ``uns["harmony_mapping"]`` records it):
        :func:`transfer_labels` refuses another reference's cells.

    Examples
    --------
    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> ref = hm.build_reference(pcs, meta)  # the bundled cells as one batch
    >>> query = hm.map_query(pcs.iloc[:100], ref=ref)
    >>> query
    MappedQuery(N=100, d=20, K=40, batch_levels=1, algorithm='none')
    >>> query.Z_corr.shape, query.R.shape, query.batch_levels  # (d, N_q), (K, N_q)
    ((20, 100), (40, 100), ['query'])
    """

    def __init__(
        self,
        z_corr: np.ndarray,
        assignments: np.ndarray,
        confidence: np.ndarray | None,
        design: BatchDesign,
        variables: list[str],
        lamb: np.ndarray,
        keep: np.ndarray | None,
        sigma: np.ndarray,
        cell_names: pd.Index | None,
        algorithm: str,
    ) -> None:
        self._cells = z_corr  # (N, d)
        self._assignments = assignments  # (N, K)
        self.confidence = confidence
        self.variables = variables
        self.batch_levels = design.level_names if variables else [_ONE_BATCH]
        self.lamb = lamb
        self.kept_levels = keep
        self.sigma = sigma
        self.cell_names = cell_names
        self.algorithm = algorithm
        self.reference_digest: str | None = None  # set by map_query

    @property
    def Z_corr(self) -> np.ndarray:
        """Corrected query cells, (d, N_q)."""
        return self._cells.T

    @property
    def R(self) -> np.ndarray:
        """Soft cluster assignments, (K, N_q); columns sum to 1."""
        return self._assignments.T

    @property
    def N(self) -> int:
        return int(self._cells.shape[0])

    @property
    def d(self) -> int:
        return int(self._cells.shape[1])

    @property
    def K(self) -> int:
        return int(self._assignments.shape[1])

    def result(self) -> np.ndarray:
        """Corrected query cells as cells x PCs (``Z_corr.T``).

        Returns
        -------
        ndarray of shape (N_q, d)
            One row per query cell, in the order the cells were given.

        Examples
        --------
        >>> import harmonypy as hm
        >>> pcs, meta = hm.datasets.load_pbmcs_small()
        >>> query = hm.map_query(pcs.iloc[:100], ref=hm.build_reference(pcs, meta))
        >>> query.result().shape
        (100, 20)
        """
        return self._cells

    def __repr__(self) -> str:
        return (
            f"MappedQuery(N={self.N}, d={self.d}, K={self.K}, "
            f"batch_levels={len(self.batch_levels)}, algorithm={self.algorithm!r})"
        )


# ================================================================= map_query
def map_query(
    data_mat,
    meta_data=None,
    ref: object = None,  # a Reference; anything else is refused below
    vars_use: str | Sequence[str] | None = None,
    sigma=None,
    lamb=None,
    device=None,
    dtype=None,
    *,
    confidence: bool = True,
    iterations: int = 1,
) -> MappedQuery:
    """Map query cells, already in the reference's PC space, onto a reference.

    The array layer of :func:`harmonypy.map_query`, which also takes an
    AnnData query (and whose docstring describes every parameter): Symphony's
    ``mapQuery`` as the module docstring writes it, with the per-cell mapping
    score when ``confidence``. ``map_query(pcs, ref)`` maps a query of one
    batch.

    Parameters
    ----------
    data_mat : array-like, DataFrame or tensor
        (N_q, d) or (d, N_q), ``d`` equal to the reference's; orientation as
        in :func:`~harmonypy.run_harmony`.
    meta_data : DataFrame, Series or None
        One row per query cell, holding the ``vars_use`` columns; paired with
        ``data_mat``'s cells by name when both name them.
    ref : Reference
    vars_use : str or list of str, optional
        The query's batch columns; none: the query is one batch.
    sigma, lamb, device, dtype, confidence, iterations
        As :func:`harmonypy.map_query`'s.

    Returns
    -------
    MappedQuery
    """
    if isinstance(meta_data, Reference) and ref is None:  # map_query(pcs, ref): one batch
        meta_data, ref = None, meta_data
    if not isinstance(ref, Reference):
        raise TypeError(
            f"ref must be a harmonypy Reference (build_reference or "
            f"load_reference), not {type(ref).__name__}"
        )
    confidence = val.check_flag("confidence", confidence)
    iterations = val.check_int("iterations", iterations, 1)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    names = _variable_names(vars_use)
    if meta_data is not None:
        meta_data = align_metadata(data_mat, meta_data)
    elif names:
        raise ValueError(f"vars_use={names} names columns of meta_data, but meta_data is None")
    frame = _query_frame(meta_data, names)
    cells = query_cells(data_mat, frame, ref.d)
    val.check_cell_lengths(cells, torch_dtype)
    design = _query_design(frame, names, cells.shape[0])
    sigma_clusters = val.check_sigma(
        ref.sigma if sigma is None else sigma, ref.K, dtype=torch_dtype
    )
    lamb_levels = None if _estimates_lamb(lamb, ref) else _query_lamb(lamb, design, names)
    cutoff = ref.parameters.get("batch_prop_cutoff") if ref.algorithm == "harmony2" else None
    options = _MapOptions(
        sigma=sigma_clusters,
        lamb=lamb_levels,
        alpha=float(ref.parameters.get("alpha", 0.2)),
        cutoff=cutoff,
        device=torch_device,
        dtype=torch_dtype,
        confidence=confidence,
        iterations=iterations,
    )
    with torch.no_grad():
        z_corr, assignments, scores, penalty, keep = _map_cells(
            cells, design=design, ref=ref, options=options
        )
    cell_names = _query_names(data_mat, frame, cells.shape[0])
    mapped = MappedQuery(
        z_corr,
        assignments,
        scores,
        design,
        names,
        penalty,
        keep,
        sigma_clusters,
        cell_names,
        ref.algorithm,
    )
    mapped.reference_digest = reference_digest(ref)
    return mapped


def _variable_names(vars_use) -> list:
    if vars_use is None:
        return []
    if isinstance(vars_use, str):
        return [vars_use]
    if isinstance(vars_use, (Sequence, np.ndarray, pd.Index)) and not isinstance(vars_use, bytes):
        names = list(vars_use)
        duplicates = sorted({str(n) for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"vars_use names column(s) {duplicates} more than once ({names})")
        return names
    raise TypeError(
        f"vars_use must be a column name or a list of column names, not "
        f"{type(vars_use).__name__} ({vars_use!r})"
    )


def _estimates_lamb(lamb, ref: Reference) -> bool:
    if lamb is None:
        return bool(ref.parameters.get("lamb_estimated", False))
    if isinstance(lamb, np.ndarray) and lamb.ndim == 0:
        lamb = lamb.item()
    return np.isscalar(lamb) and not isinstance(lamb, (str, bytes, bool, np.bool_)) and lamb == -1


def _query_lamb(lamb, design: BatchDesign, names) -> np.ndarray:
    """``lamb`` as one penalty (> 0) per query level.

    Without ``vars_use`` the query is one batch: Symphony's ``vars = NULL``
    design is the intercept and a batch row of ones, and ``lamb`` penalises
    that row (1 by default), so it is one value. The message says so, since
    the caller named no level.
    """
    one_batch = "without vars_use the query is one batch, whose one batch term lamb penalises"
    if (
        not names
        and isinstance(lamb, (Sequence, np.ndarray, torch.Tensor))
        and not isinstance(lamb, (str, bytes))
        and len(lamb) != 1
    ):
        raise ValueError(
            f"lamb has {len(lamb)} values, but {one_batch}: give one value, or "
            f"name the query's batch columns with vars_use"
        )
    try:
        return val.per_level(
            "lamb", 1.0 if lamb is None else lamb, design, 1.0, minimum=0.0, strict=True
        )
    except ValueError as err:
        context = f"{one_batch}; " if not names else ""
        raise ValueError(f"{err} ({context}lamb=-1, a scalar, estimates it per cluster)") from None


def _query_frame(meta_data, names) -> pd.DataFrame | None:
    """``meta_data`` as a DataFrame (a Series or 1-D labels: one variable)."""
    if meta_data is None or isinstance(meta_data, pd.DataFrame):
        return meta_data
    if isinstance(meta_data, pd.Series):
        name = (
            meta_data.name
            if meta_data.name is not None
            else (names[0] if len(names) == 1 else "batch")
        )
        return meta_data.to_frame(name=name)
    if isinstance(meta_data, (list, tuple, np.ndarray, pd.Index, pd.Categorical)):
        labels = pd.Series(meta_data if hasattr(meta_data, "dtype") else list(meta_data))
        if labels.ndim != 1:
            raise TypeError("meta_data given as an array must be 1-D (one label per cell)")
        return labels.to_frame(name=names[0] if len(names) == 1 else "batch")
    raise TypeError(
        f"meta_data must be a pandas DataFrame (or a Series of batch labels), "
        f"not {type(meta_data).__name__}"
    )


def query_cells(data_mat, frame: pd.DataFrame | None, n_dims: int) -> np.ndarray:
    """The query as a (cells x d) real array, checked as :func:`run_harmony`'s input.

    ``frame`` is the query's metadata (one row per cell) or None. Unlike a
    Harmony run, a single query cell is fine. Bad cells are named by the
    query's cell names when it has them.
    """
    n_cells = None if frame is None else len(frame)
    array = val.to_array(data_mat)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"data_mat must hold real numbers, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(
            f"data_mat must be 2-D (cells x PCs), got an array with "
            f"{array.ndim} dimension(s) and shape {array.shape}"
        )
    if array.size == 0:
        raise ValueError(
            f"data_mat is empty (shape {array.shape}); expected at least one cell with {n_dims} PCs"
        )
    if n_cells is not None:
        if array.shape[0] == n_cells:
            cells = array
        elif array.shape[1] == n_cells:
            cells = array.T
        else:
            raise ValueError(
                f"data_mat has shape {array.shape} but meta_data has {n_cells} "
                f"rows: one dimension of data_mat must equal the number of cells"
            )
    else:
        cells = array if array.shape[1] == n_dims or array.shape[0] != n_dims else array.T
    if cells.shape[1] != n_dims:
        raise ValueError(
            f"data_mat has {cells.shape[1]} dimensions per cell but the "
            f"reference was built on {n_dims}: map cells in the reference's PC "
            f"space (project them with the reference's loadings first)"
        )
    rows = val.CellRows(names=_query_names(data_mat, frame, cells.shape[0]), min_cells=1)
    if np.issubdtype(cells.dtype, np.floating):
        val.check_finite(cells, rows)
    val.check_nonzero_cells(cells, rows)
    return cells


def _query_design(frame, names, n_cells: int) -> BatchDesign:
    """The query's batch design; no variable: one level holding every cell.

    Levels as :func:`~harmonypy.engine.design.build_design` encodes them, except
    that a variable with a single level is allowed (a row of ones, as in
    Symphony's ``mapQuery``): the reference anchors the intercept.
    """
    if not names:
        # One variable of one level, so that the design stays consistent
        # (offsets, level names) for the checks that name levels.
        return BatchDesign(
            variables=[_ONE_BATCH],
            levels=[[_ALL_CELLS]],
            codes=np.zeros((n_cells, 1), dtype=np.int64),
            offsets=np.array([0, 1], dtype=np.int64),
            counts=np.array([n_cells], dtype=np.int64),
        )
    check_columns(frame.columns, names, what="vars_use names column(s)", where="meta_data")
    levels, codes, offsets = [], [], [0]
    for name in names:
        column = frame[name]
        if isinstance(column, pd.DataFrame):
            raise ValueError(f"meta_data has {column.shape[1]} columns named {name!r}")
        lv, cd = encode_column(name, column)
        levels.append(lv)
        codes.append(cd + offsets[-1])
        offsets.append(offsets[-1] + len(lv))
    stacked = np.stack(codes, axis=1)
    counts = np.zeros(offsets[-1], dtype=np.int64)
    for v in range(stacked.shape[1]):
        counts += np.bincount(stacked[:, v], minlength=offsets[-1])
    return BatchDesign(
        variables=list(names),
        levels=levels,
        codes=stacked,
        offsets=np.asarray(offsets, dtype=np.int64),
        counts=counts,
    )


def _query_names(data_mat, frame, n_cells: int) -> pd.Index | None:
    """The query cells' names: the metadata's index, else the embedding's."""
    if frame is not None and carries_names(frame.index):
        return frame.index
    if isinstance(data_mat, pd.DataFrame):
        if len(data_mat) == n_cells and carries_names(data_mat.index):
            return data_mat.index
        if data_mat.shape[1] == n_cells and carries_names(data_mat.columns):
            return data_mat.columns
    return None


# --------------------------------------------------------------------- engine
@dataclass(frozen=True)
class _MapOptions:
    """What :func:`map_query` resolved from its arguments for :func:`_map_cells`.

    sigma : (K,) ndarray; lamb : (B,) ndarray, or None to estimate the
    penalties per cluster (``alpha * E``); cutoff : Harmony2's
    ``batch_prop_cutoff``, or None; device, dtype : torch's; confidence :
    whether to compute the mapping score; iterations : rounds of assignment
    and correction.
    """

    sigma: np.ndarray
    lamb: np.ndarray | None
    alpha: float
    cutoff: float | None
    device: torch.device
    dtype: torch.dtype
    confidence: bool
    iterations: int = 1


@dataclass(frozen=True)
class _SortedQuery:
    """The query on the device, sorted by its first variable's level.

    Those levels are then contiguous row ranges (views in the sums and the
    correction). z : (N, d) tensor; codes : (N, V) tensor; levels : LevelIndex;
    caller : (N,) ndarray, the sorted row of each caller's cell, or None when
    the query came sorted.
    """

    z: torch.Tensor
    codes: torch.Tensor
    levels: LevelIndex
    caller: np.ndarray | None

    def back(self, t: torch.Tensor | None) -> np.ndarray | None:
        """``t`` (rows in sorted order) as NumPy, rows in the caller's order."""
        if t is None:
            return None
        if self.caller is not None:
            t = t.index_select(0, torch.from_numpy(self.caller).to(t.device))
        return t.cpu().numpy()


def _sort_query(cells: np.ndarray, design: BatchDesign, *, device, dtype) -> _SortedQuery:
    """Copy the query to the device sorted by level, :data:`COPY_CHUNK_ROWS` at a time."""
    n_cells, d = cells.shape
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    order = np.argsort(design.codes[:, 0], kind="stable")
    sorted_already = bool((order == np.arange(n_cells)).all())
    z = torch.empty((n_cells, d), dtype=dtype, device=device)
    step = COPY_CHUNK_ROWS
    for start in range(0, n_cells, step):
        rows = slice(start, start + step) if sorted_already else order[start : start + step]
        z[start : start + step] = torch.from_numpy(
            np.ascontiguousarray(cells[rows], dtype=np_dtype)
        ).to(device)
    codes = torch.from_numpy(design.codes[order]).to(device)
    caller = None
    if not sorted_already:
        caller = np.empty_like(order)
        caller[order] = np.arange(n_cells)
    return _SortedQuery(z, codes, LevelIndex.from_codes(codes, design.offsets), caller)


def _map_cells(cells: np.ndarray, *, design: BatchDesign, ref: Reference, options: _MapOptions):
    """Soft assignment, per-cell score and anchored correction of the query.

    The correction is the engine's (:func:`~harmonypy.engine.correction.ridge_correct`)
    with the reference's ``Nr`` and ``C`` as its anchor. With ``iterations > 1``
    the corrected cells are assigned again and the correction redone from the
    uncorrected cells (one more N x d copy).

    Returns
    -------
    z_corr : (N, d) ndarray; assignments : (N, K) ndarray; scores : (N,) ndarray
    or None; penalty : (K, B) ndarray; keep : (K, B) bool ndarray or None —
    cells in the caller's order.
    """
    query = _sort_query(cells, design, device=options.device, dtype=options.dtype)
    z, n_cells = query.z, cells.shape[0]
    settings, anchor = _ridge_inputs(design, ref, options=options, n_cells=n_cells)
    assignments = torch.empty((n_cells, ref.K), dtype=options.dtype, device=options.device)
    scores = (
        torch.empty(n_cells, dtype=options.dtype, device=options.device)
        if options.confidence
        else None
    )
    z_corr = z if options.iterations == 1 else torch.empty_like(z)
    for round_ in range(options.iterations):
        # 1. Soft assignment; the score from the uncorrected cells' assignment.
        _assign(
            z if round_ == 0 else z_corr,
            ref,
            options=options,
            out=assignments,
            scores=scores if round_ == 0 else None,
            uncorrected=z,
        )
        # 2.-3. The anchored ridge systems from the uncorrected cells, and the
        # correction: a cell of level b moves by -sum_k R_ik beta_k[b].
        result = ridge_correct(
            z,
            assignments,
            codes=query.codes,
            levels=query.levels,
            settings=settings,
            out=z_corr,
            anchor=anchor,
        )
        if not math.isfinite(float(z_corr.sum())) and not bool(torch.isfinite(z_corr).all()):
            raise FloatingPointError(
                "mapping produced non-finite corrected cells; check the query's scale "
                "(it must be in the reference's PC space) or try dtype='float64'"
            )
    penalty = result.penalty.contiguous().cpu().numpy()
    keep = None if result.keep is None else result.keep.cpu().numpy()
    return (query.back(z_corr), query.back(assignments), query.back(scores), penalty, keep)


def _ridge_inputs(
    design: BatchDesign, ref: Reference, *, options: _MapOptions, n_cells: int
) -> tuple[RidgeSettings, RidgeAnchor]:
    """The engine's ridge settings for the query, and the reference as its anchor.

    The estimated penalties are Harmony2's ``alpha * E``, with E counted over
    reference and query cells together; systems are solved in float64
    (float32 on MPS, solved on the CPU).
    """
    stat_dtype = torch.float32 if options.device.type == "mps" else torch.float64
    solve_device = torch.device("cpu") if options.device.type == "mps" else options.device
    sizes = torch.as_tensor(ref.Nr, dtype=stat_dtype, device=solve_device)
    counts = torch.as_tensor(design.counts, dtype=stat_dtype, device=solve_device)
    lamb = (
        None
        if options.lamb is None
        else torch.as_tensor(options.lamb, dtype=stat_dtype, device=solve_device)
    )
    settings = RidgeSettings(
        lamb,
        options.alpha,
        counts / (sizes.sum() + n_cells),
        stat_dtype,
        batch_prop_cutoff=options.cutoff,
        counts=counts,
    )
    anchor = RidgeAnchor(
        sizes=sizes, sums=torch.as_tensor(ref.C, dtype=stat_dtype, device=solve_device)
    )
    return settings, anchor


def _assign(
    source: torch.Tensor,
    ref: Reference,
    *,
    options: _MapOptions,
    out: torch.Tensor,
    scores: torch.Tensor | None,
    uncorrected: torch.Tensor,
) -> None:
    """Soft-assign ``source`` to the reference's centroids into ``out``, in chunks;
    with ``scores``, the mapping score of the ``uncorrected`` cells too."""
    n_cells, d = source.shape
    stat_dtype = torch.float32 if options.device.type == "mps" else torch.float64
    centroids = torch.as_tensor(ref.centroids, dtype=options.dtype, device=options.device)
    sigma = torch.as_tensor(options.sigma, dtype=stat_dtype, device=options.device)
    terms = score_terms(ref, options.dtype, options.device) if scores is not None else None
    chunk = max(1, min(_CHUNK, _SCORE_ELEMENTS // (ref.K * d))) if scores is not None else _CHUNK
    for start in range(0, n_cells, chunk):
        part = slice(start, start + chunk)
        clu.soft_assign(clu.normalize_rows(source[part]), centroids, sigma, out=out[part])
        if scores is not None and terms is not None:  # both or neither
            scores[part] = mapping_scores(uncorrected[part], out[part], *terms)
