"""numba kernel of the IVF search (imported only when numba is).

:func:`select_and_refine` takes a block of float32 candidate scores, which
BLAS computed (``torch.bmm``), and does the rest of the search for each query
row in one pass on numba's threads: it keeps the ``n_sel`` best-scored
candidates (a max-heap: one comparison per candidate for most of them, where
``torch.topk`` sorts), recomputes their distances in float64, drops the query
itself and writes the ``n_neighbors`` nearest to the output rows. Ties are
broken by candidate position, in the selection and in the ranking, so the
result does not depend on the thread count.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _larger(keys, slots, a, b):
    """Whether entry ``a`` of the heap ranks after entry ``b`` (score, then slot)."""
    return keys[a] > keys[b] or (keys[a] == keys[b] and slots[a] > slots[b])


@njit(cache=True, inline="always")
def _sift_down(keys, slots, start, size):
    """Restore the max-heap below ``start``."""
    i = start
    while True:
        child = 2 * i + 1
        if child >= size:
            return
        if child + 1 < size and _larger(keys, slots, child + 1, child):
            child += 1
        if not _larger(keys, slots, child, i):
            return
        keys[i], keys[child] = keys[child], keys[i]
        slots[i], slots[child] = slots[child], slots[i]
        i = child


@njit(cache=True, inline="always")
def _select(scores, keys, slots):
    """The ``len(keys)`` smallest ``(score, slot)`` of a row into the heap
    ``keys`` / ``slots`` (in heap order)."""
    size = keys.shape[0]
    for j in range(size):
        keys[j] = scores[j]
        slots[j] = j
    for start in range(size // 2 - 1, -1, -1):
        _sift_down(keys, slots, start, size)
    for j in range(size, scores.shape[0]):
        if scores[j] < keys[0]:  # later slots lose ties
            keys[0] = scores[j]
            slots[0] = j
            _sift_down(keys, slots, 0, size)


@njit(cache=True, parallel=True)
def select_and_refine(scores, candidates, queries, cells, counts, outputs):
    """The nearest candidates of a block of query rows, in float64.

    Parameters
    ----------
    scores : float32 array, shape (n_lists, n_rows, n_candidates)
        ``|y|^2 - 2 q.y`` of each query row and candidate (the ranking of the
        squared distances; +inf for padding).
    candidates : int64 array, shape (n_lists, n_candidates)
        Each list's candidate positions (rows of ``cells[0]``); the number of
        cells for padding.
    queries : tuple ``(positions, valid)``
        (n_lists, n_rows) int64 positions of the query rows and (n_lists,
        n_rows) bool, False on padding rows.
    cells : tuple ``(points, cell_of, out_row)``
        (n_cells, n_dims) float64 points in list order, (n_cells,) int64 the
        cell of each position, (n_cells,) int64 the output row of each
        position.
    counts : tuple ``(n_sel, n_neighbors)``
        Candidates kept by their float32 score (the neighbours and spares,
        as on the PyTorch path), neighbours written.
    outputs : tuple ``(distances, indices)``
        (n_out, n_neighbors) float64 and int64, rows written for the valid
        query rows: ascending distances (ties by candidate position), the
        cells.
    """
    positions, valid = queries
    points, cell_of, out_row = cells
    distances, indices = outputs
    n_lists, n_rows, n_candidates = scores.shape
    n_cells = points.shape[0]
    n_sel, n_neighbors = counts
    n_sel = min(n_sel, n_candidates)
    n_keep = min(n_neighbors, n_sel)
    n_flat = n_lists * n_rows
    n_chunks = min(n_flat, 256)
    for chunk in prange(n_chunks):
        keys = np.empty(n_sel, dtype=scores.dtype)
        slots = np.empty(n_sel, dtype=np.int64)
        exact = np.empty(n_sel)
        where = np.empty(n_sel, dtype=np.int64)
        for flat in range(chunk * n_flat // n_chunks, (chunk + 1) * n_flat // n_chunks):
            a = flat // n_rows
            r = flat - a * n_rows
            if valid[a, r]:
                query = positions[a, r]
                _select(scores[a, r], keys, slots)
                _refine_row(candidates[a], slots, (points, query), exact, where)
                row = out_row[query]
                for s in range(n_keep):
                    distances[row, s] = math.sqrt(exact[s])
                    indices[row, s] = cell_of[where[s]] if where[s] < n_cells else -1


@njit(cache=True, inline="always")
def _refine_row(candidates, slots, query_point, exact, where):
    """The kept candidates' float64 squared distances to the query (inf for
    the query itself and for padding), ascending, ties by position, into
    ``exact`` and their positions into ``where``."""
    points, query = query_point
    n_cells, n_dims = points.shape
    for s in range(slots.shape[0]):
        p = candidates[slots[s]]
        value = math.inf
        if p < n_cells and p != query:
            value = 0.0
            for t in range(n_dims):
                diff = points[p, t] - points[query, t]
                value += diff * diff
        # insertion by (distance, position): the same order on any thread count
        i = s
        while i > 0 and (exact[i - 1] > value or (exact[i - 1] == value and where[i - 1] > p)):
            exact[i] = exact[i - 1]
            where[i] = where[i - 1]
            i -= 1
        exact[i] = value
        where[i] = p
