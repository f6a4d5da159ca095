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

Three neighbour searches are available (details and measurements in
``docs/lisi.md``):

* ``"exact"``: on the CPU with PyTorch, chunked over cells so that memory stays
  bounded: brute force in float64 up to 20,000 cells, above that a k-means
  partition with Voronoi lower bounds that skips clusters which cannot hold a
  neighbour (still exact).  The kept neighbours' distances are computed
  directly in float64, so values agree with R to ~1e-15.
* ``"ivf"`` (alias ``"approx"``): an inverted-file search in PyTorch, no extra
  dependency: k-means lists, each list searched against its
  nearest lists (:data:`IVF_PROBE_FRACTION` of all lists, at least
  :data:`IVF_PROBES`) with float32 matrix products, neighbours re-ranked with
  float64 distances.  Recall of the exact neighbours >= 0.99 on simulated
  cells x 30 dims from 20,000 to 1,000,000 cells.
* ``"pynndescent"``: the approximate nearest-neighbour graph of the optional
  package pynndescent (``pip install harmonypy[ann]``).

``"auto"`` (the default) uses the exact search up to :data:`EXACT_MAX_CELLS`
cells and the IVF search above.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import numbers
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from harmonypy._cellnames import align_metadata

logger = logging.getLogger(__name__)

__all__ = ["compute_lisi", "EXACT_MAX_CELLS", "IVF_PROBES", "IVF_PROBE_FRACTION"]

#: ``neighbors="auto"`` uses the exact search up to this many cells and the
#: inverted-file search (``"ivf"``) above.  Up to here the exact search is a
#: float64 brute force (a few seconds at 20,000 cells), so scores agree with R's
#: ``lisi`` to rounding; beyond it its cost grows about quadratically while the
#: IVF search grows about as ``n**1.5`` (see ``docs/lisi.md`` for timings and
#: recall).
EXACT_MAX_CELLS = 20_000

# R's compute_simpson_index: at most 50 bisection steps, |H - log(perplexity)| <= tol.
_MAX_ITER = 50
_TOL = 1e-5

# Memory budget (bytes) for one chunk of the N x N distance block in the exact
# search and for the per-chunk temporaries of the bisection.
_CHUNK_BYTES = 64 * 2**20

# Below this many cells the exact search runs entirely in float64 (cheap, and
# neighbour *selection* then cannot differ from R's because of rounding).
# Above it candidates are chosen in float32 with a few extra candidates
# ("slack") and re-ranked with float64 distances.
_FLOAT64_MAX_CELLS = 20_000
_SLACK = 8
# Pruned exact search: about this many cells per k-means cluster, and query
# cells per block (the block's candidate set is the union over its cells).
_CLUSTER_SIZE = 500
_QUERY_ROWS = 256

# Inverted-file search: lists per sqrt(n_cells), lists probed per query list,
# k-means subsample (cells per list) and Lloyd iterations.
_IVF_LISTS_PER_SQRT = 4
#: Fewest lists probed per list of query cells by the IVF search (the rule
#: for smaller inputs, up to ~1,280 lists, i.e. ~100,000 cells).
IVF_PROBES = 64
#: Share of all lists probed per list of query cells by the IVF search, when
#: that is more than :data:`IVF_PROBES`.  Recall depends on the share of the
#: lists probed, not on their number: on 30-dimensional simulations the
#: probes needed for a recall of 0.99 are 4.1-4.4 % of the lists at 100,000
#: cells and 3.5-3.6 % at 1,000,000 (docs/lisi.md), so a fixed count (64 of
#: 4,000 lists at 1,000,000 cells, recall 0.86) falls short as cells grow.
IVF_PROBE_FRACTION = 0.05
_IVF_KMEANS_SAMPLE = 16
_IVF_KMEANS_ITERS = 4

_NEIGHBOR_CHOICES = ("auto", "exact", "ivf", "approx", "pynndescent")


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
    neighbors : {"auto", "exact", "ivf", "approx", "pynndescent"}, default "auto"
        Nearest-neighbour search.  ``"exact"``: exact search (PyTorch, CPU).
        ``"ivf"`` (alias ``"approx"``): approximate inverted-file search
        (PyTorch, deterministic; recall >= 0.99 on simulated data, distances of
        the neighbours found are exact).  ``"pynndescent"``: approximate search
        with pynndescent (``pip install harmonypy[ann]``).  ``"auto"``: exact
        up to :data:`EXACT_MAX_CELLS` cells (so small data sets reproduce R),
        IVF above.
    n_jobs : int or None, default None
        Threads for pynndescent (``None``: its default).  The exact and IVF
        searches use PyTorch's current thread setting, which is not changed.

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
        If ``neighbors="pynndescent"`` and pynndescent is not installed.

    Examples
    --------
    >>> import numpy as np, pandas as pd
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
        (:func:`_knn_of_cells`, cost ``n_query * n_cells``), so each sampled
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
        dist, idx = _knn(X, n_neighbors, neighbors=neighbors, n_jobs=n_jobs)
    else:
        cells = np.sort(np.random.default_rng(seed).choice(n_cells, n_query, replace=False))
        logger.debug("compute_lisi: exact neighbours of %d sampled cells among %d",
                     n_query, n_cells)
        dist, idx = _knn_of_cells(X, cells, n_neighbors)
    return _lisi_from_knn(dist, idx, codes, float(perplexity)), n_cells


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #
def _as_embedding(X: Any) -> np.ndarray:
    """Return ``X`` as a C-contiguous float64 array of shape (n_cells, n_dims)."""
    if isinstance(X, pd.DataFrame):
        non_numeric = [c for c, t in X.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
        if non_numeric:
            raise TypeError(
                f"X must be numeric; non-numeric column(s): {non_numeric[:10]}"
            )
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
        raise ValueError(
            f"X must be 2-dimensional (cells x dims), got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"X must have at least one cell and one dimension, got shape {arr.shape}")
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if n_bad:
        raise ValueError(
            f"X contains {n_bad} non-finite value(s) (NaN or inf); "
            "LISI needs finite coordinates"
        )
    return np.ascontiguousarray(arr)


def _check_n_jobs(n_jobs: Any) -> None:
    """``n_jobs`` must be None, -1 (all cores) or a positive integer."""
    if n_jobs is None:
        return
    if isinstance(n_jobs, (bool, np.bool_)) or not isinstance(n_jobs, numbers.Integral):
        raise TypeError(f"n_jobs must be None, -1 or a positive integer, got {n_jobs!r} "
                        f"({type(n_jobs).__name__})")
    if n_jobs == 0 or n_jobs < -1:
        raise ValueError(f"n_jobs must be None, -1 (all cores) or a positive integer (threads "
                         f"for pynndescent), got {n_jobs}")


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
        raise TypeError(
            f"metadata must be a pandas DataFrame, got {type(metadata).__name__}"
        )
    if metadata.shape[0] != x_shape[0]:
        raise ValueError(
            "X and metadata must have one row per cell: X has shape "
            f"{x_shape}, metadata has shape {metadata.shape}"
        )
    missing = [name for name in labels if name not in metadata.columns]
    if missing:
        raise ValueError(
            f"column(s) {missing} not in metadata; available columns: "
            f"{list(metadata.columns)}"
        )


def _neighbourhood_size(perplexity: Any, n_cells: int) -> int:
    """Neighbours per cell *excluding* the cell itself (``floor(3p) - 1``)."""
    if isinstance(perplexity, bool) or not isinstance(perplexity, numbers.Real):
        raise TypeError(f"perplexity must be a number, got {type(perplexity).__name__}")
    if not math.isfinite(perplexity) or perplexity <= 0:
        raise ValueError(f"perplexity must be a positive finite number, got {perplexity}")
    k = int(math.floor(3 * perplexity))
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
# Nearest neighbours
# --------------------------------------------------------------------------- #
def _resolve_backend(neighbors: str, n_cells: int) -> str:
    """Map the user's ``neighbors`` choice to ``"exact"``, ``"ivf"`` or ``"pynndescent"``."""
    if not isinstance(neighbors, str) or neighbors not in _NEIGHBOR_CHOICES:
        raise ValueError(
            f"neighbors must be one of {list(_NEIGHBOR_CHOICES)}, got {neighbors!r}"
        )
    if neighbors == "auto":
        return "exact" if n_cells <= EXACT_MAX_CELLS else "ivf"
    if neighbors == "approx":
        return "ivf"
    if neighbors == "pynndescent" and importlib.util.find_spec("pynndescent") is None:
        raise ImportError(
            "neighbors='pynndescent' needs the optional package pynndescent: "
            "pip install harmonypy[ann] (or use neighbors='ivf', which needs nothing extra)"
        )
    return neighbors


def _knn(
    X: np.ndarray,
    n_neighbors: int,
    *,
    neighbors: str = "auto",
    n_jobs: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest neighbours of every cell, the cell itself excluded.

    Parameters
    ----------
    X : numpy.ndarray of float64, shape (n_cells, n_dims)
    n_neighbors : int
        Neighbours to return per cell, not counting the cell itself.
    neighbors, n_jobs
        As in :func:`compute_lisi`.

    Returns
    -------
    dist : numpy.ndarray of float64, shape (n_cells, n_neighbors)
        Euclidean distances, ascending along each row.
    idx : numpy.ndarray of int64, shape (n_cells, n_neighbors)
        Row indices of the neighbours in ``X``.
    """
    backend = _resolve_backend(neighbors, X.shape[0])
    logger.debug("compute_lisi: %s neighbour search, k=%d", backend, n_neighbors)
    if backend == "exact":
        return _knn_exact(X, n_neighbors)
    if backend == "ivf":
        return _knn_ivf(X, n_neighbors)
    return _knn_pynndescent(X, n_neighbors, n_jobs=n_jobs)


def _knn_exact(X: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN (self excluded); see :func:`_knn`.

    Small inputs are searched by brute force in float64.  Larger ones are
    partitioned by k-means and each block of query cells is compared only with
    the clusters that can hold one of its neighbours (a pruned but *exact*
    search): candidate distances are computed in float32 via matrix products
    with a few spare candidates, and the kept neighbours' distances are
    recomputed in float64.
    """
    # Centring leaves distances unchanged but shrinks the norms, which is what
    # the |x|^2 + |y|^2 - 2 x.y trick loses precision to.
    Xc = X - X.mean(axis=0)
    with torch.no_grad():
        if X.shape[0] <= _FLOAT64_MAX_CELLS:
            return _knn_brute(Xc, n_neighbors)
        return _knn_pruned(Xc, n_neighbors)


def _augment(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Operands whose product is ``|y|^2 - 2 q.y`` (squared distance minus ``|q|^2``).

    Folding the norm into an extra column turns the distance block into one
    plain matrix product, with no broadcast pass over the (large) result.
    """
    sq = (T * T).sum(dim=1, keepdim=True)
    queries = torch.cat([T, torch.ones_like(sq)], dim=1)
    data = torch.cat([-2.0 * T, sq], dim=1)
    return queries, data


def _knn_brute(
    Xc: np.ndarray,
    n_neighbors: int,
    dtype: torch.dtype = torch.float64,
    cells: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force, chunked over query cells.

    In float32 a few spare candidates are kept so that rounding in the
    matrix-product distances cannot push a true neighbour out before the
    float64 re-ranking in :func:`_refine`.

    Parameters
    ----------
    Xc : numpy.ndarray of float64, shape (n_cells, n_dims)
        Centred embedding.
    n_neighbors : int
    dtype : torch.dtype, default torch.float64
        Precision of the candidate distances.
    cells : numpy.ndarray of int64, shape (n_query,), optional
        Query cells (rows of ``Xc``); their neighbours are searched among all
        cells.  Default: every cell.

    Returns
    -------
    dist, idx : numpy.ndarray, shape (n_query, n_neighbors)
        As in :func:`_knn`, one row per query cell.
    """
    n = Xc.shape[0]
    cells = np.arange(n) if cells is None else cells
    queries, data = _augment(torch.from_numpy(Xc).to(dtype))
    slack = 0 if dtype == torch.float64 else _SLACK
    n_sel = min(n, n_neighbors + 1 + slack)  # + the cell itself, dropped in _refine
    itemsize = 8 if dtype == torch.float64 else 4
    rows = int(max(1, min(n, _CHUNK_BYTES // (itemsize * n))))
    dist = np.empty((cells.size, n_neighbors), dtype=np.float64)
    idx = np.empty((cells.size, n_neighbors), dtype=np.int64)
    for start in range(0, cells.size, rows):
        sel = cells[start : start + rows]
        block = queries[torch.from_numpy(sel)] @ data.T
        cand = torch.topk(block, n_sel, dim=1, largest=False, sorted=False).indices
        out = slice(start, start + sel.size)
        dist[out], idx[out] = _refine(Xc, sel, cand.numpy(), n_neighbors)
    return dist, idx


def _knn_of_cells(
    X: np.ndarray, cells: np.ndarray, n_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact neighbours (self excluded) of some cells among all cells.

    Brute force costs ``len(cells) * n_cells`` distances, so a sample of a
    few thousand query cells is cheap even among millions of cells.  Up to
    :data:`_FLOAT64_MAX_CELLS` cells the distances are float64 throughout
    (as in :func:`_knn_exact`); above, candidates are chosen in float32 with
    spares and re-ranked in float64.

    Parameters
    ----------
    X : numpy.ndarray of float64, shape (n_cells, n_dims)
    cells : numpy.ndarray of int64, shape (n_query,)
        Distinct row indices of the query cells.
    n_neighbors : int

    Returns
    -------
    dist, idx : numpy.ndarray, shape (n_query, n_neighbors)
        As in :func:`_knn`, one row per query cell (``idx`` indexes ``X``).
    """
    Xc = X - X.mean(axis=0)
    dtype = torch.float64 if X.shape[0] <= _FLOAT64_MAX_CELLS else torch.float32
    with torch.no_grad():
        return _knn_brute(Xc, n_neighbors, dtype, cells=cells)


def _knn_pruned(Xc: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN via a k-means partition and Voronoi lower bounds.

    For a query ``q`` in the cell of centroid ``a``, every point of the cell of
    centroid ``b`` lies on ``b``'s side of the bisecting hyperplane, hence at
    distance ``>= (|q - c_b|^2 - |q - c_a|^2) / (2 |c_a - c_b|)`` from ``q``
    (and ``>= |q - c_b| - radius_b``).  Once the nearest clusters give an upper
    bound on each query's k-th neighbour distance, every cluster whose lower
    bound exceeds it for all queries of the block is skipped.
    """
    n = Xc.shape[0]
    n_sel = min(n, n_neighbors + 1 + _SLACK)  # + self + spare candidates
    queries, data = _augment(torch.from_numpy(Xc).to(torch.float32))
    sq32 = (queries[:, :-1] ** 2).sum(dim=1).numpy().astype(np.float64)

    n_clusters = max(1, min(n // _CLUSTER_SIZE, 4096))
    centroids, assign = _kmeans(Xc, n_clusters)
    perm = np.argsort(assign, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=n_clusters))])
    members = [perm[bounds[c] : bounds[c + 1]] for c in range(n_clusters)]
    sizes = np.diff(bounds)
    cc = _sqdist(centroids, centroids)
    cdist = np.sqrt(cc)
    radius = np.zeros(n_clusters)
    for c in range(n_clusters):
        if sizes[c]:
            radius[c] = np.sqrt(_sqdist(Xc[members[c]], centroids[c : c + 1]).max())

    dist = np.empty((n, n_neighbors), dtype=np.float64)
    idx = np.empty((n, n_neighbors), dtype=np.int64)
    for a in range(n_clusters):
        # first guess: the clusters nearest to this one, enough points for k
        near = np.argsort(cc[a], kind="stable")
        n_first = int(np.searchsorted(np.cumsum(sizes[near]), n_sel)) + 1
        first = near[:n_first]
        first_pts = np.concatenate([members[c] for c in first])
        first_done = np.zeros(n_clusters, dtype=bool)
        first_done[first] = True
        for sel in np.array_split(members[a], max(1, -(-sizes[a] // _QUERY_ROWS))):
            if sel.size == 0:
                continue
            q = queries[torch.from_numpy(sel)]
            vals, cand = _topk_against(q, data, first_pts, n_sel)
            # k-th (excluding self) squared distance so far: an upper bound
            kth = vals[:, min(n_neighbors, vals.shape[1] - 1)] + sq32[sel]
            reach = np.sqrt(np.maximum(kth, 0.0)) * (1 + 1e-3) + 1e-6
            dq = _sqdist(Xc[sel], centroids)
            with np.errstate(divide="ignore", invalid="ignore"):
                plane = (dq - dq[:, a : a + 1]) / (2.0 * cdist[a])
            ball = np.sqrt(dq) - radius
            lower = np.fmax(plane, ball)  # a NaN plane bound (coincident centroids) is ignored
            need = (lower <= reach[:, None]).any(axis=0) & ~first_done & (sizes > 0)
            if need.any():
                more = np.concatenate([members[c] for c in np.flatnonzero(need)])
                # only cells within the current k-th distance can enter, so
                # filter by threshold instead of a top-k over every column
                thr = torch.from_numpy((reach * reach - sq32[sel]).astype(np.float32))
                v2, c2 = _within(q, data, more, thr)
                if v2.shape[1]:
                    vals, order = torch.topk(
                        torch.cat([torch.from_numpy(vals), v2], dim=1),
                        n_sel, dim=1, largest=False, sorted=True,
                    )
                    vals = vals.numpy()
                    cand = np.take_along_axis(
                        np.concatenate([cand, c2], axis=1), order.numpy(), axis=1
                    )
            dist[sel], idx[sel] = _refine(Xc, sel, cand, n_neighbors)
    return dist, idx


def _topk_against(
    q: torch.Tensor, data: torch.Tensor, cols: np.ndarray, n_sel: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n_sel`` smallest ``|y|^2 - 2 q.y`` over the cells ``cols``, sorted.

    Returns float64 values (shape (rows, min(n_sel, len(cols)))) and the
    global indices of those cells.
    """
    kk = min(n_sel, cols.size)
    block = q @ data[torch.from_numpy(cols)].T
    vals, pos = torch.topk(block, kk, dim=1, largest=False, sorted=True)
    return vals.numpy().astype(np.float64), cols[pos.numpy()]


def _within(
    q: torch.Tensor, data: torch.Tensor, cols: np.ndarray, thr: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray]:
    """Cells of ``cols`` with ``|y|^2 - 2 q.y <= thr`` for each query row.

    Returns a padded (rows, max hits) float64 value tensor (padding: inf) and
    the matching global cell indices (padding: 0, never selected because at
    least ``n_sel`` finite candidates already exist).
    """
    block = q @ data[torch.from_numpy(cols)].T
    rr, cc = torch.nonzero(block <= thr.unsqueeze(1), as_tuple=True)
    r = q.shape[0]
    if rr.numel() == 0:
        return torch.empty((r, 0), dtype=torch.float64), np.empty((r, 0), dtype=np.int64)
    counts = torch.bincount(rr, minlength=r)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rr.numel()) - starts[rr]  # nonzero is row-major
    width = int(counts.max())
    vals = torch.full((r, width), math.inf, dtype=torch.float64)
    vals[rr, pos] = block[rr, cc].to(torch.float64)
    idx = np.zeros((r, width), dtype=np.int64)
    idx[rr.numpy(), pos.numpy()] = cols[cc.numpy()]
    return vals, idx


def _sqdist(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, float64, clipped at 0; shape (len(A), len(B))."""
    d = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * (A @ B.T)
    return np.maximum(d, 0.0)


def _kmeans(X: np.ndarray, n_clusters: int, n_iter: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A few Lloyd iterations (local seeded RNG); final nearest-centroid labels.

    Only a partition is needed, not a good clustering: the search stays exact
    whatever the centroids, as long as every cell is labelled with its nearest
    centroid, which the last assignment step guarantees.
    """
    rng = np.random.default_rng(0)
    n = X.shape[0]
    cent = X[rng.choice(n, n_clusters, replace=False)].copy()
    T = torch.from_numpy(X)
    for it in range(n_iter + 1):
        assign = _nearest_centroid(T, torch.from_numpy(cent))
        if it == n_iter:
            break
        counts = np.bincount(assign, minlength=n_clusters)
        sums = np.zeros_like(cent)
        _scatter_sum(sums, assign, X)
        filled = counts > 0
        cent[filled] = sums[filled] / counts[filled, None]
    return cent, assign


def _scatter_sum(out: np.ndarray, labels: np.ndarray, X: np.ndarray) -> None:
    torch.from_numpy(out).index_add_(0, torch.from_numpy(labels), torch.from_numpy(X))


def _nearest_centroid(T: torch.Tensor, cent: torch.Tensor) -> np.ndarray:
    """Index of the nearest centroid of each row (float64, chunked)."""
    out = np.empty(T.shape[0], dtype=np.int64)
    csq = (cent * cent).sum(dim=1)
    rows = int(max(1, _CHUNK_BYTES // (8 * cent.shape[0])))
    for s in range(0, T.shape[0], rows):
        d = csq.unsqueeze(0) - 2.0 * (T[s : s + rows] @ cent.T)
        out[s : s + rows] = torch.argmin(d, dim=1).numpy()
    return out


def _refine(
    Xc: np.ndarray, sel: np.ndarray, cand: np.ndarray, n_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 distances from cells ``sel`` to their candidates; drop self; keep nearest.

    ``cand`` (shape (len(sel), n_candidates)) may contain the query cell
    itself, which is moved to the end so it is never kept.
    """
    diff = Xc[cand] - Xc[sel][:, None, :]
    d = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
    d[cand == sel[:, None]] = np.inf  # don't count yourself
    order = np.argsort(d, axis=1, kind="stable")[:, :n_neighbors]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(cand, order, axis=1)


def _refine_torch(
    X64: torch.Tensor, sel: torch.Tensor, cand: torch.Tensor, n_neighbors: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_refine` in PyTorch (multithreaded gathers; same float64 distances).

    ``X64`` is a float64 tensor of the cells; ``sel`` (shape (m,)) and
    ``cand`` (shape (m, n_candidates)) are row indices into it.  Returns the
    distances (float64) and indices of the ``n_neighbors`` nearest candidates
    other than the query itself, ascending (ties in candidate order).
    """
    m, c = cand.shape
    diff = X64.index_select(0, cand.reshape(-1)).view(m, c, -1)
    diff -= X64.index_select(0, sel).unsqueeze(1)
    diff.mul_(diff)
    d = diff.sum(dim=2)
    d.masked_fill_(cand == sel.unsqueeze(1), math.inf)  # don't count yourself
    d, order = torch.sort(d, dim=1, stable=True)
    return d[:, :n_neighbors].sqrt_(), torch.gather(cand, 1, order[:, :n_neighbors])


# --------------------------------------------------------------------------- #
# Approximate search: inverted file (IVF)
# --------------------------------------------------------------------------- #
def _ivf_n_lists(n_cells: int) -> int:
    """Default number of inverted lists: about ``4 * sqrt(n)``, >= ~16 cells each.

    The search costs ~``n * n_probe * n / n_lists`` distance evaluations and
    the assignment ``n * n_lists``; with ~20 probes the two balance near
    ``4 * sqrt(n)`` lists.
    """
    return int(max(1, min(n_cells // 16, round(_IVF_LISTS_PER_SQRT * math.sqrt(n_cells)))))


def _ivf_n_probe(n_lists: int) -> int:
    """Default lists probed per list: a share of them, at least :data:`IVF_PROBES`.

    The share is :data:`IVF_PROBE_FRACTION` (5 %): 64 probes up to 1,280
    lists (~100,000 cells), 200 of 4,000 lists at 1,000,000 cells.

    A query cell's neighbours spread over a *share* of the lists that shrinks
    only slowly as cells grow (its neighbourhood is a sizeable part of its
    cluster in 30 dimensions), so probing a fixed share keeps recall as cells
    grow, where a fixed count does not, at a search cost of about
    ``IVF_PROBE_FRACTION * n_cells**2`` distances.
    """
    share = math.ceil(round(IVF_PROBE_FRACTION * n_lists, 6))  # round: 0.05 * 4000 -> 200
    return int(min(n_lists, max(IVF_PROBES, share)))


def _knn_ivf(
    X: np.ndarray,
    n_neighbors: int,
    *,
    n_probe: int | None = None,
    n_lists: int | None = None,
    seed: int = 0,
    cells: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate kNN (self excluded) with an inverted file; see :func:`_knn`.

    The cells are partitioned by a few Lloyd iterations of k-means (fitted on
    a random subsample) into ``n_lists`` lists.  The cells of one list are
    compared with all cells of the ``n_probe`` lists whose centroids are
    nearest to that list's centroid (itself included; by default a fixed share
    of all lists, :func:`_ivf_n_probe`) by one float32 matrix product;
    ``torch.topk`` keeps a few spare candidates, whose distances are then
    recomputed in float64 and re-ranked (:func:`_refine_torch`), so returned
    distances are exact for the neighbours found.  A true neighbour is missed
    only if it lies in none of the probed lists.  Lists of similar size are
    processed together (padded, one batched product) so that the Python and
    threading overhead per list stays small; a list whose block alone exceeds
    the memory budget is processed in slices of its query cells.

    Parameters
    ----------
    X : numpy.ndarray of float64, shape (n_cells, n_dims)
    n_neighbors : int
        Neighbours per cell, not counting the cell itself.
    n_probe : int, optional
        Lists searched per list of query cells (default :func:`_ivf_n_probe`:
        :data:`IVF_PROBE_FRACTION` of the lists, at least :data:`IVF_PROBES`).
        More is slower and more accurate; ``n_probe >= n_lists`` is exact.
        It is raised if needed so that every cell has enough candidates.
    n_lists : int, optional
        Number of lists (default :func:`_ivf_n_lists`).
    seed : int, default 0
        Seed of the local generator for the k-means subsample (the global RNG
        is not used), so the result is deterministic.
    cells : numpy.ndarray of int64, shape (n_query,), optional
        Search the neighbours of these cells only (distinct rows of ``X``),
        among all cells.  The partition and each list's probes are the same
        as for a search of every cell, so each of these rows is what that
        search gives; used to measure recall on a sample at atlas size.

    Returns
    -------
    dist : numpy.ndarray of float64, shape (n_query, n_neighbors)
    idx : numpy.ndarray of int64, shape (n_query, n_neighbors)
        One row per cell of ``X`` (or of ``cells``, in its order).
    """
    n = X.shape[0]
    Xc = X - X.mean(axis=0)  # centring keeps the float32 norms small
    n_lists = max(1, min(n, n_lists or _ivf_n_lists(n)))
    n_sel = min(n, n_neighbors + 1 + _SLACK)  # + self + spare candidates
    n_out = n if cells is None else len(cells)
    dist = np.empty((n_out, n_neighbors), dtype=np.float64)
    idx = np.empty((n_out, n_neighbors), dtype=np.int64)
    with torch.no_grad():
        T = torch.from_numpy(Xc).to(torch.float32)
        cent = _kmeans_sample(T, n_lists, torch.Generator().manual_seed(seed))
        assign = _nearest_centroid32(T, cent)
        # Sort the cells by list so that each list is a contiguous slice.
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=n_lists)
        offsets = torch.cumsum(counts, 0) - counts
        queries, data = _augment(T[order])
        # padding candidate: q . (0, ..., 0, inf) = inf for every query
        sentinel = torch.zeros(1, data.shape[1])
        sentinel[0, -1] = math.inf
        data = torch.cat([data, sentinel])
        probes = _probe_lists(cent, counts, n_probe or _ivf_n_probe(n_lists), n_sel)
        # float64 coordinates in list order, for the re-ranking
        X64 = torch.from_numpy(Xc)[order]
        # Query cells as positions in list order (so still grouped by list),
        # and the output row of each.
        if cells is None:
            q_pos, q_row, q_counts = torch.arange(n), order, counts
        else:
            rank = torch.empty(n, dtype=torch.int64)
            rank[order] = torch.arange(n)
            q_pos, by_pos = torch.sort(rank[torch.as_tensor(cells, dtype=torch.int64)])
            q_row = torch.empty(n, dtype=torch.int64)
            q_row[q_pos] = by_pos
            q_counts = torch.bincount(assign[order[q_pos]], minlength=n_lists)
            queries = queries[q_pos]
        q_offsets = torch.cumsum(q_counts, 0) - q_counts
        dist_t = torch.from_numpy(dist)
        idx_t = torch.from_numpy(idx)
        # the float64 re-ranking gathers rows x n_sel x n_dims values
        rows = int(max(1, _CHUNK_BYTES // (8 * n_sel * X.shape[1])))
        for group in _group_lists(q_counts, counts, probes, data.shape[1]):
            sel, cand = _ivf_search_group(
                group, queries, data, probes, n_sel,
                q_counts=q_counts, q_offsets=q_offsets, counts=counts, offsets=offsets,
            )
            sel = q_pos[sel]  # positions of the query cells among all cells
            for r0 in range(0, sel.shape[0], rows):
                s, c = sel[r0 : r0 + rows], cand[r0 : r0 + rows]
                d, i = _refine_torch(X64, s, c, n_neighbors)
                out = q_row[s]
                dist_t[out] = d
                idx_t[out] = order[i]
    return dist, idx


def _probe_lists(
    cent: torch.Tensor, counts: torch.Tensor, n_probe: int, n_sel: int
) -> torch.Tensor:
    """The ``n_probe`` lists nearest to each list (by centroid), itself first.

    Parameters
    ----------
    cent : torch.Tensor of float32, shape (n_lists, n_dims)
    counts : torch.Tensor of int64, shape (n_lists,)
        Cells per list.
    n_probe : int
        Requested lists per list; raised (up to ``n_lists``) until every
        non-empty list's probes hold at least ``n_sel`` cells.
    n_sel : int

    Returns
    -------
    torch.Tensor of int64, shape (n_lists, n_probe_used)
    """
    n_lists = cent.shape[0]
    csq = (cent * cent).sum(dim=1)
    cc = torch.addmm(csq.unsqueeze(0) + csq.unsqueeze(1), cent, cent.T, alpha=-2.0)
    cc.fill_diagonal_(-1.0)  # a list always searches itself first
    m = max(1, min(n_lists, n_probe))
    while True:
        probes = torch.topk(cc, m, dim=1, largest=False, sorted=True).indices
        enough = counts[probes].sum(dim=1) >= n_sel
        if m == n_lists or bool(enough[counts > 0].all()):
            return probes
        m = min(n_lists, 2 * m)


def _group_lists(
    q_counts: torch.Tensor, counts: torch.Tensor, probes: torch.Tensor, width: int
) -> list[torch.Tensor]:
    """Batches of lists of similar size whose padded distance block fits the budget.

    Lists are taken largest first (by query cells), so padding each batch to
    its first list's size wastes little; a batch is closed when ``lists x max
    candidates x (max query cells + width)`` float32 values (the distance
    block and the gathered candidate rows) would exceed :data:`_CHUNK_BYTES`.
    A single list is always allowed; :func:`_ivf_search_group` then slices
    its query cells.

    Parameters
    ----------
    q_counts : torch.Tensor of int64, shape (n_lists,)
        Query cells per list (lists without any are skipped).
    counts : torch.Tensor of int64, shape (n_lists,)
        Cells per list.
    probes : torch.Tensor of int64, shape (n_lists, n_probe)
    width : int
        Values per candidate row (``n_dims + 1``).

    Returns
    -------
    list of torch.Tensor of int64
        The lists of each batch.
    """
    n_cand = counts[probes].sum(dim=1).tolist()
    sizes = q_counts.tolist()
    groups, current, max_q, max_c = [], [], 0, 0
    for a in torch.argsort(q_counts, descending=True, stable=True).tolist():
        if sizes[a] == 0:
            break
        q, c = max(max_q, sizes[a]), max(max_c, n_cand[a])
        if current and 4 * (len(current) + 1) * (q + width) * c > _CHUNK_BYTES:
            groups.append(torch.tensor(current))
            current, q, c = [], sizes[a], n_cand[a]
        current.append(a)
        max_q, max_c = q, c
    if current:
        groups.append(torch.tensor(current))
    return groups


def _ragged_positions(
    starts: torch.Tensor, lengths: torch.Tensor, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the ranges ``[starts, starts + lengths)`` of each row, padded.

    Parameters
    ----------
    starts, lengths : torch.Tensor of int64, shape (n_rows, n_ranges)
        Ranges to concatenate within each row.
    pad : int
        Value of the padding positions.

    Returns
    -------
    pos : torch.Tensor of int64, shape (n_rows, width)
        Concatenated positions of each row; ``width`` is the longest row.
    valid : torch.Tensor of bool, shape (n_rows, width)
        False on the padding.
    """
    n_rows = starts.shape[0]
    row_len = lengths.sum(dim=1)
    width = int(row_len.max())
    # Lay the rows out flat (padding included as one more range per row): the
    # position is then "flat index + a shift that is constant on each range",
    # and the shift is the cumulative sum of its jumps at range starts.
    flat_len = torch.cat([lengths, (width - row_len).unsqueeze(1)], dim=1).reshape(-1)
    flat_start = torch.cumsum(flat_len, 0) - flat_len
    shift = torch.cat([starts, torch.zeros_like(row_len).unsqueeze(1)], dim=1).reshape(-1)
    shift = shift - flat_start
    jumps = torch.diff(shift, prepend=shift.new_zeros(1))
    delta = torch.zeros(n_rows * width + 1, dtype=torch.int64)
    delta.index_add_(0, flat_start, jumps)  # empty ranges telescope away
    pos = (torch.cumsum(delta[:-1], 0) + torch.arange(n_rows * width)).view(n_rows, width)
    valid = torch.arange(width).unsqueeze(0) < row_len.unsqueeze(1)
    pos.masked_fill_(~valid, pad)
    return pos, valid


def _ivf_search_group(
    group: torch.Tensor,
    queries: torch.Tensor,
    data: torch.Tensor,
    probes: torch.Tensor,
    n_sel: int,
    *,
    q_counts: torch.Tensor,
    q_offsets: torch.Tensor,
    counts: torch.Tensor,
    offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of the query cells of a batch of lists.

    Parameters
    ----------
    group : torch.Tensor of int64, shape (n_group,)
        Lists whose query cells are searched.
    queries : torch.Tensor of float32, shape (n_query, n_dims + 1)
        :func:`_augment` queries, grouped by list (``q_counts`` per list).
    data : torch.Tensor of float32, shape (n_cells + 1, n_dims + 1)
        :func:`_augment` of the list-sorted cells, plus a last row whose
        product with any query is ``+inf`` (the padding candidate).
    probes : torch.Tensor of int64, shape (n_lists, n_probe)
    n_sel : int
        Candidates to keep per query cell.
    q_counts, q_offsets : torch.Tensor of int64, shape (n_lists,)
        Query cells of each list and where they start in ``queries``.
    counts, offsets : torch.Tensor of int64, shape (n_lists,)
        The same for the cells in ``data``.

    Returns
    -------
    sel : torch.Tensor of int64, shape (n_found,)
        Rows of ``queries`` searched.
    cand : torch.Tensor of int64, shape (n_found, n_sel)
        Positions (rows of ``data``) of their ``n_sel`` nearest candidates
        (float32 ranking).
    """
    n = data.shape[0] - 1
    qpos, qvalid = _ragged_positions(q_offsets[group, None], q_counts[group, None], 0)
    p = probes[group]
    cpos, _ = _ragged_positions(offsets[p], counts[p], n)  # padding -> the +inf row
    cdata = data[cpos].transpose(1, 2)
    # Query rows per product: the whole group, unless a single list's block
    # is over the budget (many probes of large lists, e.g. 10**7 cells).
    step = int(max(1, _CHUNK_BYTES // (4 * cpos.shape[0] * cpos.shape[1])))
    cand = torch.empty(qpos.shape + (n_sel,), dtype=torch.int64)
    for r0 in range(0, qpos.shape[1], step):
        block = torch.bmm(queries[qpos[:, r0 : r0 + step]], cdata)
        pos = torch.topk(block, n_sel, dim=2, largest=False, sorted=False).indices
        cand[:, r0 : r0 + step] = torch.gather(
            cpos.unsqueeze(1).expand(-1, pos.shape[1], -1), 2, pos
        )
    return qpos[qvalid], cand[qvalid]


def _kmeans_sample(
    T: torch.Tensor, n_clusters: int, gen: torch.Generator, n_iter: int = _IVF_KMEANS_ITERS
) -> torch.Tensor:
    """Lloyd's k-means on a random subsample, float32; returns the centroids.

    Only a reasonable partition is needed (recall is then set by ``n_probe``),
    so a subsample of ~:data:`_IVF_KMEANS_SAMPLE` cells per cluster and a few
    iterations suffice.  An empty cluster keeps its previous centroid.

    Parameters
    ----------
    T : torch.Tensor of float32, shape (n_cells, n_dims)
    n_clusters : int
    gen : torch.Generator
        Local generator (the global RNG is not used).
    n_iter : int

    Returns
    -------
    torch.Tensor of float32, shape (n_clusters, n_dims)
    """
    n = T.shape[0]
    m = min(n, max(n_clusters, _IVF_KMEANS_SAMPLE * n_clusters))
    S = T[torch.randperm(n, generator=gen)[:m]]
    cent = S[:n_clusters].clone()  # random distinct cells as the first centroids
    for _ in range(n_iter):
        assign = _nearest_centroid32(S, cent)
        counts = torch.bincount(assign, minlength=n_clusters)
        sums = torch.zeros_like(cent).index_add_(0, assign, S)
        filled = counts > 0
        cent[filled] = sums[filled] / counts[filled].unsqueeze(1).to(sums.dtype)
    return cent


def _nearest_centroid32(T: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each row (int64 tensor, chunked)."""
    out = torch.empty(T.shape[0], dtype=torch.int64)
    csq = (cent * cent).sum(dim=1)
    rows = int(max(1, _CHUNK_BYTES // (4 * cent.shape[0])))
    for s in range(0, T.shape[0], rows):
        d = torch.addmm(csq.unsqueeze(0), T[s : s + rows], cent.T, alpha=-2.0)
        out[s : s + rows] = torch.argmin(d, dim=1)
    return out


def _knn_pynndescent(
    X: np.ndarray, n_neighbors: int, *, n_jobs: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate kNN with pynndescent (self excluded); see :func:`_knn`."""
    try:
        from pynndescent import NNDescent
    except ImportError as err:  # pragma: no cover - guarded by _resolve_backend
        raise ImportError(
            "approximate neighbour search needs pynndescent: pip install harmonypy[ann]"
        ) from err
    n = X.shape[0]
    k = min(n, n_neighbors + 1)  # the graph includes each cell itself
    # A fixed seed keeps results reproducible without touching numpy's global RNG.
    index = NNDescent(
        X.astype(np.float32),
        n_neighbors=k,
        metric="euclidean",
        random_state=0,
        n_jobs=-1 if n_jobs is None else n_jobs,
        low_memory=True,
        compressed=True,
    )
    graph_idx, _ = index.neighbor_graph
    graph_idx = np.asarray(graph_idx, dtype=np.int64)
    return _drop_self_and_refine(X, graph_idx, n_neighbors)


def _drop_self_and_refine(
    X: np.ndarray, graph_idx: np.ndarray, n_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each cell from its own list (or the farthest entry if absent).

    Distances are recomputed in float64 so that they are exact for the chosen
    neighbours; unfilled slots (-1) of an approximate graph get distance inf
    and therefore zero weight.  Rows are processed in chunks of
    :data:`_CHUNK_BYTES` of gathered coordinates (unchunked, 1,000,000 cells
    x 90 neighbours x 30 dims would need 22 GB at once).
    """
    n, k = graph_idx.shape
    dist = np.empty((n, n_neighbors), dtype=np.float64)
    idx = np.empty((n, n_neighbors), dtype=np.int64)
    step = int(max(1, _CHUNK_BYTES // (8 * k * X.shape[1])))
    for s in range(0, n, step):
        g = graph_idx[s : s + step]
        rows = np.arange(s, s + g.shape[0])[:, None]
        valid = g >= 0
        safe = np.where(valid, g, 0)
        diff = X[safe] - X[s : s + g.shape[0], None, :]
        d = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
        d[~valid] = np.inf
        d[safe == rows] = -1.0  # sorts self first so it is the one dropped
        order = np.argsort(d, axis=1, kind="stable")[:, 1 : n_neighbors + 1]
        dist[s : s + g.shape[0]] = np.maximum(np.take_along_axis(d, order, axis=1), 0.0)
        idx[s : s + g.shape[0]] = np.take_along_axis(safe, order, axis=1)
    return dist, idx


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
        Output of :func:`_knn` (self excluded).
    codes : sequence of numpy.ndarray of int, each shape (n_cells,)
        Category codes 0..n_categories-1 of each label.
    perplexity : float

    Returns
    -------
    numpy.ndarray of float64, shape (n_cells, len(codes))
    """
    n, k = dist.shape
    n_cats = [int(c.max()) + 1 if c.size else 0 for c in codes]
    out = np.empty((n, len(codes)), dtype=np.float64)
    rows = int(max(1, min(n, _CHUNK_BYTES // (8 * 4 * max(k, 1)))))
    n_failed = 0
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        P, failed = _neighbour_weights(dist[start:stop], perplexity)
        n_failed += int(np.count_nonzero(failed))
        nbr = idx[start:stop]
        for j, (c, m) in enumerate(zip(codes, n_cats)):
            simpson = _simpson(P, c[nbr], m)
            simpson[failed] = -1.0  # R's sentinel for a degenerate bisection
            out[start:stop, j] = 1.0 / simpson
    if n_failed:
        logger.warning(
            "compute_lisi: the weight calibration failed for %d cell(s) (zero "
            "entropy, e.g. extremely large distances); their LISI is -1 as in R",
            n_failed,
        )
    return out


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
