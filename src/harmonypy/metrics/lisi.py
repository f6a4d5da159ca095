"""Local Inverse Simpson Index (LISI), faithful to the R package ``lisi``.

For every cell the ``3 * perplexity`` nearest neighbours in the embedding are
found (the cell itself counts as one of them and is then dropped, so
``3 * perplexity - 1`` neighbours remain, as in R).  Gaussian weights
``exp(-beta * d)`` over the *Euclidean* (not squared) neighbour distances are
calibrated by bisection on ``beta`` so that their entropy equals
``log(perplexity)``; the Simpson index of a label is the sum over categories of
the squared total weight of the neighbours in that category, and LISI is its
inverse.

The bisection reproduces R's ``compute_simpson_index`` step by step (start at
``beta = 1``, double / halve until bracketed, then bisect; at most 50 steps;
stop when the entropy is within 1e-5 of ``log(perplexity)``) in double
precision, which is what reproduces the reference values of the R package to
~1e-15, but runs on all cells of a chunk at once instead of looping over cells.

The neighbours come from :mod:`harmonypy.neighbors` (details and
measurements in ``docs/lisi.md``): ``"exact"`` (float64 brute force up to
20,000 cells, the pruned exact index above; distances agree with R to
~1e-15), ``"ivf"`` (alias ``"approx"``, the inverted-file search, recall of
the exact neighbours >= 0.99 on simulated data), ``"pynndescent"`` (optional
package), ``"faiss"`` (the exact search by faiss's flat index, optional
package).  ``"auto"`` (the default) uses the exact search up to
:data:`harmonypy.neighbors.EXACT_MAX_CELLS` cells (faiss's from
:data:`harmonypy.neighbors.FAISS_MIN_CELLS` cells when it is installed, where
it measured faster) and the IVF search above.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from harmonypy._numba import KERNEL_LOCK, choose, engine_threads
from harmonypy.engine.cellnames import align_metadata
from harmonypy.neighbors import knn, knn_of_cells

logger = logging.getLogger(__name__)

__all__ = ["compute_lisi"]

# R's compute_simpson_index: at most 50 bisection steps, |H - log(perplexity)| <= tol.
_MAX_ITER = 50
_TOL = 1e-5

# Memory budget (bytes) for the per-chunk temporaries of the bisection.
_CHUNK_BYTES = 64 * 2**20

#: The numba kernel of the scores (``harmonypy[fast]``), and the cells from
#: which it runs by default (below, numpy's path costs less than loading numba).
KERNELS = "harmonypy.metrics._lisi_kernels"
KERNELS_MIN_CELLS = 50_000


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def compute_lisi(
    X: Any,
    metadata: pd.DataFrame,
    label_colnames: str | Sequence[str],
    perplexity: float = 30,
    *,
    neighbors: str = "auto",
    n_jobs: int | None = None,
) -> np.ndarray:
    """Compute the Local Inverse Simpson Index of each cell for each label.

    A LISI of 1 means a cell's neighbourhood holds a single category of the
    label; the maximum, the number of categories, means all categories are
    equally represented.  Over batch labels it is called iLISI (higher = better
    mixed), over cell-type labels cLISI (1 = pure).

    Parameters
    ----------
    X : array-like or pandas.DataFrame, shape (n_cells, n_dims)
        Embedding (e.g. PCs or Harmony-corrected PCs), cells in rows.  Must be
        numeric and finite.
    metadata : pandas.DataFrame, shape (n_cells, n_columns)
        One row per cell, in the same order as ``X``.
    label_colnames : str or sequence of str
        Column(s) of ``metadata`` to score.  Values may be strings,
        categoricals, numbers or booleans; missing values are an error.
    perplexity : float, default 30
        Effective number of neighbours.  Each cell's neighbourhood is its
        ``floor(3 * perplexity)`` nearest cells counting itself, so at least
        that many cells are needed (R's ``lisi`` fails on fewer too).
    neighbors : {"auto", "exact", "ivf", "approx", "pynndescent", "faiss"}, default "auto"
        Nearest-neighbour search.  ``"exact"``: exact search (PyTorch, CPU).
        ``"faiss"``: the same neighbours and distances by faiss's exact flat
        index (``pip install harmonypy[faiss]``; float32 candidates, certified
        and re-ranked in float64).
        ``"ivf"`` (alias ``"approx"``): approximate inverted-file search
        (PyTorch, deterministic; recall >= 0.99 on simulated data, distances of
        the neighbours found are exact).  ``"pynndescent"``: approximate search
        with pynndescent (``pip install harmonypy[ann]``).  ``"auto"``: exact
        up to :data:`harmonypy.neighbors.EXACT_MAX_CELLS` cells (so small data sets reproduce R),
        by faiss from :data:`harmonypy.neighbors.FAISS_MIN_CELLS` cells when it
        is installed, IVF above.
    n_jobs : int or None, default None
        Threads for pynndescent (``None``: its default).  The exact and IVF
        searches use PyTorch's current thread setting, which is not changed;
        faiss's thread count is set to it for the search and restored after.

    Returns
    -------
    numpy.ndarray of float64, shape (n_cells, n_labels)
        LISI of each cell (rows, order of ``X``) for each label (columns, order
        of ``label_colnames``; one column when a single string is given).
        As in R, a cell whose bisection ends with zero entropy (all weights
        underflow, e.g. distances above ~1e18, or perplexity <= 1) gets -1; a
        warning is logged when that happens.

    Raises
    ------
    TypeError
        If ``metadata`` is not a DataFrame, ``X`` is not numeric, or a label
        name is not a string.
    ValueError
        On shape mismatch, missing columns, missing labels, non-finite values
        in ``X``, a perplexity too large for the number of cells, or an
        unknown ``neighbors`` value.
    ImportError
        If ``neighbors="pynndescent"`` and pynndescent is not installed, or
        ``neighbors="faiss"`` and faiss is not.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from harmonypy import compute_lisi
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 5))
    >>> meta = pd.DataFrame({"batch": rng.choice(["a", "b"], 200)})
    >>> lisi = compute_lisi(X, meta, "batch", perplexity=10)
    >>> lisi.shape
    (200, 1)
    """
    return _compute_lisi(
        X, metadata, label_colnames, perplexity, neighbors=neighbors, n_jobs=n_jobs
    )[0]


def _compute_lisi(
    X: Any,
    metadata: pd.DataFrame,
    label_colnames: str | Sequence[str],
    perplexity: float = 30,
    *,
    neighbors: str = "auto",
    n_jobs: int | None = None,
    n_query: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """:func:`compute_lisi`, optionally on a random sample of query cells.

    Parameters
    ----------
    X, metadata, label_colnames, perplexity, neighbors, n_jobs
        As in :func:`compute_lisi`.
    n_query : int or None, default None
        Score only this many cells, drawn at random without replacement
        (``None``, or at least the number of cells: score every cell).  Their
        neighbours are still searched among *all* cells, by exact brute force
        (:func:`harmonypy.neighbors.knn_of_cells`, cost ``n_query * n_cells``), so each sampled
        cell's score is the one the exact search gives it; ``neighbors`` must
        then be ``"auto"`` or ``"exact"``.  Validated by the caller.
    seed : int, default 0
        Seed of the local generator that draws the sample (the global RNGs
        are not used).

    Returns
    -------
    lisi : numpy.ndarray of float64, shape (n_scored, n_labels)
        As in :func:`compute_lisi`, rows in increasing cell order.
    n_cells : int
        Cells in ``X`` (the neighbours were searched among all of them).
    """
    # Cells are paired with their labels by name when both sides name them.
    metadata = align_metadata(X, metadata, data_name="X", meta_name="metadata")
    X = _as_embedding(X)
    labels = _as_label_list(label_colnames)
    _check_metadata(metadata, X.shape, labels)
    n_cells = X.shape[0]
    n_neighbors = _neighbourhood_size(perplexity, n_cells)
    _check_n_jobs(n_jobs)
    codes = [_encode_labels(metadata[name], name) for name in labels]

    if n_query is None or n_query >= n_cells:
        found = knn(X, n_neighbors, method=neighbors, n_jobs=n_jobs)
    else:
        cells = np.sort(np.random.default_rng(seed).choice(n_cells, n_query, replace=False))
        logger.debug(
            "compute_lisi: exact neighbours of %d sampled cells among %d", n_query, n_cells
        )
        found = knn_of_cells(X, cells, n_neighbors)
    return _lisi_from_knn(found.distances, found.indices, codes, float(perplexity)), n_cells


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #
def _as_embedding(X: Any) -> np.ndarray:
    """Return ``X`` as a C-contiguous float64 array of shape (n_cells, n_dims)."""
    if isinstance(X, pd.DataFrame):
        non_numeric = [c for c, t in X.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
        if non_numeric:
            raise TypeError(f"X must be numeric; non-numeric column(s): {non_numeric[:10]}")
        arr = X.to_numpy(dtype=np.float64)
    elif isinstance(X, torch.Tensor):
        arr = X.detach().cpu().to(torch.float64).numpy()
    else:
        arr = np.asarray(X)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            raise TypeError(f"X must be a numeric array, got dtype {arr.dtype}")
        arr = arr.astype(np.float64, copy=False)
    if arr.ndim != 2:
        raise ValueError(f"X must be 2-dimensional (cells x dims), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"X must have at least one cell and one dimension, got shape {arr.shape}")
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if n_bad:
        raise ValueError(
            f"X contains {n_bad} non-finite value(s) (NaN or inf); LISI needs finite coordinates"
        )
    return np.ascontiguousarray(arr)


def _check_n_jobs(n_jobs: Any) -> None:
    """``n_jobs`` must be None, -1 (all cores) or a positive integer."""
    if n_jobs is None:
        return
    if isinstance(n_jobs, (bool, np.bool_)) or not isinstance(n_jobs, numbers.Integral):
        raise TypeError(
            f"n_jobs must be None, -1 or a positive integer, got {n_jobs!r} "
            f"({type(n_jobs).__name__})"
        )
    if n_jobs == 0 or n_jobs < -1:
        raise ValueError(
            f"n_jobs must be None, -1 (all cores) or a positive integer (threads "
            f"for pynndescent), got {n_jobs}"
        )


def _as_label_list(label_colnames: str | Sequence[str]) -> list[str]:
    if isinstance(label_colnames, str):
        return [label_colnames]
    try:
        labels = list(label_colnames)
    except TypeError:
        raise TypeError(
            "label_colnames must be a column name or a sequence of column names, "
            f"got {type(label_colnames).__name__}"
        ) from None
    if not labels:
        raise ValueError("label_colnames is empty: give at least one column name")
    return labels


def _check_metadata(metadata: Any, x_shape: tuple[int, int], labels: list) -> None:
    if not isinstance(metadata, pd.DataFrame):
        raise TypeError(f"metadata must be a pandas DataFrame, got {type(metadata).__name__}")
    if metadata.shape[0] != x_shape[0]:
        raise ValueError(
            "X and metadata must have one row per cell: X has shape "
            f"{x_shape}, metadata has shape {metadata.shape}"
        )
    missing = [name for name in labels if name not in metadata.columns]
    if missing:
        raise ValueError(
            f"column(s) {missing} not in metadata; available columns: {list(metadata.columns)}"
        )


def _neighbourhood_size(perplexity: Any, n_cells: int) -> int:
    """Neighbours per cell *excluding* the cell itself (``floor(3p) - 1``)."""
    if isinstance(perplexity, bool) or not isinstance(perplexity, numbers.Real):
        raise TypeError(f"perplexity must be a number, got {type(perplexity).__name__}")
    if not math.isfinite(perplexity) or perplexity <= 0:
        raise ValueError(f"perplexity must be a positive finite number, got {perplexity}")
    k = int(math.floor(3 * float(perplexity)))
    if k < 2:
        raise ValueError(
            f"perplexity={perplexity} gives a neighbourhood of {k} cell(s) "
            "counting the cell itself; it needs 3 * perplexity >= 2"
        )
    if n_cells < k:
        raise ValueError(
            f"perplexity={perplexity} needs at least 3 * perplexity = {k} cells "
            f"(each neighbourhood counts the cell itself), got {n_cells} cells; "
            f"use perplexity <= {n_cells // 3}"
        )
    return k - 1


def _encode_labels(values: pd.Series, name: str) -> np.ndarray:
    """Integer codes 0..n_categories-1 (order irrelevant for LISI)."""
    codes, _ = pd.factorize(values, use_na_sentinel=True)
    n_missing = int(np.count_nonzero(codes < 0))
    if n_missing:
        raise ValueError(
            f"label column {name!r} has {n_missing} missing value(s); "
            "LISI cannot be computed on missing labels (drop or fill those cells)"
        )
    return codes.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- #
# Scores from neighbours
# --------------------------------------------------------------------------- #
def _lisi_from_knn(
    dist: np.ndarray,
    idx: np.ndarray,
    codes: Sequence[np.ndarray],
    perplexity: float,
) -> np.ndarray:
    """LISI of each cell for each label from precomputed neighbours.

    Parameters
    ----------
    dist, idx : numpy.ndarray, shape (n_cells, n_neighbors)
        Neighbour distances and indices (self excluded), as in
        :class:`harmonypy.neighbors.Neighbors`.
    codes : sequence of numpy.ndarray of int, each shape (n_cells,)
        Category codes 0..n_categories-1 of each label.
    perplexity : float

    Returns
    -------
    numpy.ndarray of float64, shape (n_cells, len(codes))
    """
    n, k = dist.shape
    n_cats = [int(c.max()) + 1 if c.size else 0 for c in codes]
    kernels, why = choose(KERNELS, work=n, min_work=KERNELS_MIN_CELLS, unit="cells")
    logger.debug("LISI scores: %s (%s)", "numba kernel" if kernels else "numpy", why)
    if kernels is None:
        simpson, n_failed = _simpson_numpy(dist, idx, codes, n_cats, perplexity)
    else:
        simpson = np.empty((n, len(codes)), dtype=np.float64)
        with KERNEL_LOCK, engine_threads():
            n_failed = kernels.simpson_indices(
                np.ascontiguousarray(dist, dtype=np.float64),
                np.ascontiguousarray(idx, dtype=np.int64),
                np.stack(codes) if codes else np.empty((0, n), dtype=np.int64),
                np.array(n_cats, dtype=np.int64),
                (math.log(perplexity), _TOL, _MAX_ITER),
                simpson,
            )
    if n_failed:
        logger.warning(
            "compute_lisi: the weight calibration failed for %d cell(s) (zero "
            "entropy, e.g. extremely large distances); their LISI is -1 as in R",
            n_failed,
        )
    return 1.0 / simpson


def _simpson_numpy(
    dist: np.ndarray,
    idx: np.ndarray,
    codes: Sequence[np.ndarray],
    n_cats: list[int],
    perplexity: float,
) -> tuple[np.ndarray, int]:
    """The Simpson index of each cell for each label (-1 where the bisection
    failed, R's sentinel) and the number of failed cells, with numpy."""
    n, k = dist.shape
    out = np.empty((n, len(codes)), dtype=np.float64)
    rows = int(max(1, min(n, _CHUNK_BYTES // (8 * 4 * max(k, 1)))))
    n_failed = 0
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        P, failed = _neighbour_weights(dist[start:stop], perplexity)
        n_failed += int(np.count_nonzero(failed))
        nbr = idx[start:stop]
        for j, (c, m) in enumerate(zip(codes, n_cats, strict=True)):
            simpson = _simpson(P, c[nbr], m)
            simpson[failed] = -1.0  # R's sentinel for a degenerate bisection
            out[start:stop, j] = simpson
    return out, n_failed


def _neighbour_weights(
    D: np.ndarray, perplexity: float, tol: float = _TOL, max_iter: int = _MAX_ITER
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated Gaussian weights: R's bisection, vectorised over cells.

    Each cell starts at ``beta = 1`` with open bounds; while
    ``|H - log(perplexity)| > tol`` (at most ``max_iter`` times) ``beta`` is
    doubled / halved until a bound is known on that side, then bisected.
    Cells drop out of the active set as they converge, so every cell takes
    exactly the steps it would take in R's per-cell loop.

    Parameters
    ----------
    D : numpy.ndarray of float64, shape (n_cells, n_neighbors)
        Distances to the neighbours.
    perplexity : float
    tol : float, default 1e-5
    max_iter : int, default 50

    Returns
    -------
    P : numpy.ndarray of float64, shape (n_cells, n_neighbors)
        Normalised weights (rows sum to 1, or all zero for failed cells).
    failed : numpy.ndarray of bool, shape (n_cells,)
        Cells whose final entropy is exactly 0 (R gives them Simpson -1).
    """
    n = D.shape[0]
    log_u = math.log(perplexity)
    beta = np.ones(n)
    beta_lo = np.full(n, -np.inf)
    beta_hi = np.full(n, np.inf)

    P, H = _entropy(D, beta)
    active = np.flatnonzero(np.abs(H - log_u) > tol)
    for _ in range(max_iter):
        if active.size == 0:
            break
        b, lo, hi = beta[active], beta_lo[active], beta_hi[active]
        up = H[active] > log_u  # entropy too high -> sharper kernel
        lo = np.where(up, b, lo)
        hi = np.where(up, hi, b)
        b = np.where(
            up,
            np.where(np.isfinite(hi), (b + hi) / 2, b * 2),
            np.where(np.isfinite(lo), (b + lo) / 2, b / 2),
        )
        beta[active], beta_lo[active], beta_hi[active] = b, lo, hi
        P_a, H_a = _entropy(D[active], b)
        P[active] = P_a
        H[active] = H_a
        active = active[np.abs(H_a - log_u) > tol]
    return P, H == 0


def _entropy(D: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R's ``Hbeta`` for many cells: normalised weights and their entropy.

    ``H = log(sum P) + beta * sum(D * P) / sum(P)`` with ``P = exp(-beta * D)``;
    a row whose weights all underflow gets ``H = 0`` and ``P = 0`` as in R.
    """
    P = np.exp(-D * beta[:, None])
    sum_p = P.sum(axis=1)
    zero = sum_p == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        H = np.log(sum_p) + beta * np.einsum("ij,ij->i", D, P) / sum_p
        P /= sum_p[:, None]
    if zero.any():
        H[zero] = 0.0
        P[zero] = 0.0
    return P, H


def _simpson(P: np.ndarray, nbr_codes: np.ndarray, n_categories: int) -> np.ndarray:
    """Sum over categories of the squared category weight, per cell."""
    n, k = P.shape
    if n_categories <= 64:
        flat = (np.arange(n)[:, None] * n_categories + nbr_codes).ravel()
        sums = np.bincount(flat, weights=P.ravel(), minlength=n * n_categories)
        sums = sums.reshape(n, n_categories)
        return (sums * sums).sum(axis=1)
    # Many categories: sort each row's labels and sum the runs instead of
    # materialising an n x n_categories table.
    order = np.argsort(nbr_codes, axis=1, kind="stable")
    lab = np.take_along_axis(nbr_codes, order, axis=1)
    w = np.take_along_axis(P, order, axis=1)
    starts = np.ones((n, k), dtype=bool)
    starts[:, 1:] = lab[:, 1:] != lab[:, :-1]
    run_id = np.cumsum(starts.ravel()) - 1
    sums = np.bincount(run_id, weights=w.ravel())
    sq = sums * sums
    row_of_run = np.repeat(np.arange(n), starts.sum(axis=1))
    return np.bincount(row_of_run, weights=sq, minlength=n)
