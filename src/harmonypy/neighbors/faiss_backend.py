"""Exact search with faiss's flat index (optional: ``pip install harmonypy[faiss]``).

faiss's ``IndexFlatL2`` compares every query with every cell, one BLAS
product per block, in float32, and keeps a top k per query in a heap.  Here
it picks :data:`~harmonypy.neighbors._common.SLACK` spare candidates beyond
the ``n_neighbors + 1`` needed (the cell itself is one), whose distances are
then recomputed in float64 and re-ranked, as the torch searches do.  A row
is *certified* when its float32 values leave room for the rounding error: a
true neighbour can be missed only if the last candidate's float32 squared
distance is within twice the error bound of the ``(n_neighbors + 1)``-th;
such rows (rare: ties and near-ties) are searched again by float64 brute
force (:func:`~harmonypy.neighbors.exact.exact_topk`).  So the neighbours
and distances are those of a float64 brute force, up to the order of equal
distances, whatever the input's float type (float32 input is widened to
float64 first, as every search here does).

faiss's OpenMP thread count is process-wide state of the caller: it is set
to PyTorch's current thread count (the setting every search of this package
uses) for the search and restored afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import torch

from harmonypy._optional import FAISS_HINT, import_optional
from harmonypy.neighbors._common import CHUNK_BYTES, SLACK, refine
from harmonypy.neighbors._result import Neighbors
from harmonypy.neighbors.exact import exact_topk

logger = logging.getLogger(__name__)

#: Query cells per faiss search call (bounds the candidate arrays).
QUERY_CHUNK = 2**14


def faiss_available() -> bool:
    """Whether the optional package faiss (``faiss-cpu``) can be imported."""
    return importlib.util.find_spec("faiss") is not None


def require_faiss() -> ModuleType:
    """Import and return faiss, or raise ImportError naming the install command."""
    return import_optional(
        "faiss",
        f"neighbors='faiss' needs the optional package faiss-cpu: {FAISS_HINT} "
        "(or use neighbors='exact', which needs nothing extra)",
    )


@contextlib.contextmanager
def faiss_threads(faiss: ModuleType, n_threads: int) -> Iterator[None]:
    """Run faiss on ``n_threads`` OpenMP threads, restoring the caller's count after."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, int(n_threads)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def knn_faiss(X: np.ndarray, n_neighbors: int, *, cells: np.ndarray | None = None) -> Neighbors:
    """Exact kNN of every cell among all cells (self excluded), by faiss's flat index.

    Parameters
    ----------
    X : numpy.ndarray of float64, shape (n_cells, n_dims)
        Finite coordinates.
    n_neighbors : int
        Neighbours per cell, not counting the cell itself (< n_cells).
    cells : numpy.ndarray of int64, shape (n_query,), optional
        Distinct rows of the query cells (default: every cell); each gets the
        row a search of all cells gives it.

    Returns
    -------
    Neighbors
        One row per query cell, float64 distances ascending; the neighbours of
        a float64 brute force (equal distances in either order).

    Raises
    ------
    ImportError
        If faiss is not installed.
    """
    faiss = require_faiss()
    # Centring leaves distances unchanged and shrinks the norms, and with them
    # the rounding error of |q|^2 + |r|^2 - 2 q.r in float32.
    Xc = np.ascontiguousarray(X - X.mean(axis=0), dtype=np.float64)
    n, d = Xc.shape
    cells = np.arange(n) if cells is None else np.asarray(cells, dtype=np.int64)
    n_sel = min(n, n_neighbors + 1 + SLACK)
    X32 = np.ascontiguousarray(Xc, dtype=np.float32)
    sq = np.einsum("ij,ij->i", Xc, Xc)
    dist = np.empty((cells.size, n_neighbors), dtype=np.float64)
    idx = np.empty((cells.size, n_neighbors), dtype=np.int64)
    with faiss_threads(faiss, torch.get_num_threads()):
        index = faiss.IndexFlatL2(d)
        index.add(X32)
        for start in range(0, cells.size, QUERY_CHUNK):
            part = slice(start, start + QUERY_CHUNK)
            sel = cells[part]
            values, cand = index.search(X32[sel], n_sel)
            dist[part], idx[part] = _refine_rows(Xc, sel, cand, n_neighbors)
            _recheck(Xc, sq, sel, values, dist=dist[part], idx=idx[part])
    return Neighbors(indices=idx, distances=dist)


def _refine_rows(
    Xc: np.ndarray, sel: np.ndarray, cand: np.ndarray, n_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 re-ranking of the candidates of query cells ``sel``, in memory-sized blocks."""
    rows = int(max(1, CHUNK_BYTES // (8 * cand.shape[1] * Xc.shape[1])))
    dist = np.empty((sel.size, n_neighbors), dtype=np.float64)
    idx = np.empty((sel.size, n_neighbors), dtype=np.int64)
    for r0 in range(0, sel.size, rows):
        out = slice(r0, r0 + rows)
        dist[out], idx[out] = refine(Xc, sel[out], cand[out], n_neighbors)
    return dist, idx


def _recheck(
    Xc: np.ndarray,
    sq: np.ndarray,
    sel: np.ndarray,
    values: np.ndarray,
    *,
    dist: np.ndarray,
    idx: np.ndarray,
) -> None:
    """Search again, by float64 brute force, the rows float32 rounding could have misled.

    ``values`` are faiss's float32 squared distances of the candidates of
    query cells ``sel`` (``sq``: every cell's squared norm).  A true
    neighbour missing from the candidates has a float32 value of at least the
    last candidate's, yet at most the ``(n_neighbors + 1)``-th candidate's
    plus twice the rounding error, so a row whose gap exceeds that is
    complete.  ``dist`` and ``idx`` (rows of ``sel``) are updated in place.
    """
    n, d = Xc.shape
    n_neighbors = dist.shape[1]
    if values.shape[1] <= n_neighbors + 1 or values.shape[1] >= n:
        return  # no spare candidates, or every cell is a candidate
    err = 4 * (d + 4) * float(np.finfo(np.float32).eps) * (sq[sel] + sq.max())
    doubt = np.flatnonzero(values[:, -1] - values[:, n_neighbors] <= 2 * err)
    logger.debug("faiss search: %d of %d rows re-searched in float64", doubt.size, sel.size)
    if doubt.size == 0:
        return
    data = torch.from_numpy(Xc)
    data_sq = torch.from_numpy(sq)
    step = int(max(1, CHUNK_BYTES // (8 * n)))
    for r0 in range(0, doubt.size, step):
        rows = doubt[r0 : r0 + step]
        _, cand = exact_topk(
            data[torch.from_numpy(sel[rows])], data, data_sq=data_sq, k=n_neighbors + 1, chunk=n
        )
        dist[rows], idx[rows] = refine(Xc, sel[rows], cand.numpy(), n_neighbors)
