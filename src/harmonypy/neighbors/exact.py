"""Exact search: brute force in chunks (torch), and the exact kNN of cells.

One kernel, :func:`exact_topk`, compares query cells with data cells one
block at a time and keeps a running top k; LISI's self-excluded kNN
(:func:`knn_exact`, :func:`knn_of_cells`) and label transfer's vote both use
it.  Above :data:`FLOAT64_MAX_CELLS` cells :func:`knn_exact` uses the pruned
exact index instead (:mod:`harmonypy.neighbors.pruned`).
"""

from __future__ import annotations

import numpy as np
import torch

from harmonypy.neighbors._common import CHUNK_BYTES, SLACK, refine
from harmonypy.neighbors._result import Neighbors
from harmonypy.neighbors.pruned import knn_pruned

#: Up to this many cells the exact kNN runs in float64 throughout (cheap, and
#: the neighbour *selection* then cannot differ from R's because of
#: rounding); above, candidates are chosen in float32 with :data:`SLACK`
#: spares and re-ranked with float64 distances.
FLOAT64_MAX_CELLS = 20_000


def exact_topk(
    q: torch.Tensor, data: torch.Tensor, *, data_sq: torch.Tensor, k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` data cells of least ``|r|^2 - 2 q.r`` for each query, nearest first.

    The query's own ``|q|^2`` does not change the order, so it is left out.
    Data cells are compared ``chunk`` at a time and merged into a running
    top k, so memory stays at ``len(q) x chunk`` whatever the data size.

    Parameters
    ----------
    q : torch.Tensor, shape (m, d)
    data : torch.Tensor, shape (n, d), same dtype and device
    data_sq : torch.Tensor, shape (n,)
        ``|r|^2`` of each data cell.
    k : int
        At most ``n``.
    chunk : int
        Data cells per block.

    Returns
    -------
    values : torch.Tensor, shape (m, k)
        ``|r|^2 - 2 q.r``, ascending.
    indices : torch.Tensor of int64, shape (m, k)
        Rows of ``data``.
    """
    near_d: torch.Tensor | None = None
    near_i: torch.Tensor | None = None
    for r0 in range(0, data.shape[0], chunk):
        block = data[r0 : r0 + chunk]
        dist = torch.addmm(data_sq[None, r0 : r0 + chunk], q, block.T, alpha=-2.0)
        found_d, found_i = torch.topk(
            dist, min(k, dist.shape[1]), dim=1, largest=False, sorted=True
        )
        found_i += r0
        if near_d is not None and near_i is not None:  # merge with the earlier blocks' best
            both = torch.cat([near_d, found_d], 1)
            found_d, pos = torch.topk(
                both, min(k, both.shape[1]), dim=1, largest=False, sorted=True
            )
            found_i = torch.cat([near_i, found_i], 1).gather(1, pos)
        near_d, near_i = found_d, found_i
    if near_d is None or near_i is None:
        raise ValueError("exact search over no reference rows (data has 0 rows)")
    return near_d, near_i


def knn_exact(X: np.ndarray, n_neighbors: int) -> Neighbors:
    """Exact kNN of every cell among all cells, the cell itself excluded.

    Up to :data:`FLOAT64_MAX_CELLS` cells brute force in float64; above, the
    pruned exact index (:func:`harmonypy.neighbors.pruned.knn_pruned`).

    Parameters
    ----------
    X : numpy.ndarray of float64, shape (n_cells, n_dims)
    n_neighbors : int
        Neighbours per cell, not counting the cell itself (< n_cells).

    Returns
    -------
    Neighbors
        One row per cell, float64 distances.
    """
    # Centring leaves distances unchanged but shrinks the norms, which is what
    # the |x|^2 + |y|^2 - 2 x.y trick loses precision to.
    Xc = X - X.mean(axis=0)
    with torch.no_grad():
        if X.shape[0] <= FLOAT64_MAX_CELLS:
            dist, idx = _knn_brute(Xc, n_neighbors, dtype=torch.float64)
        else:
            dist, idx = knn_pruned(Xc, n_neighbors)
    return Neighbors(indices=idx, distances=dist)


def knn_of_cells(X: np.ndarray, cells: np.ndarray, n_neighbors: int) -> Neighbors:
    """Exact neighbours (self excluded) of some cells among all cells.

    Brute force costs ``len(cells) * n_cells`` distances, so a sample of a
    few thousand query cells is cheap even among millions of cells.  Up to
    :data:`FLOAT64_MAX_CELLS` cells the distances are float64 throughout
    (as in :func:`knn_exact`); above, candidates are chosen in float32 with
    spares and re-ranked in float64.

    Parameters
    ----------
    X : numpy.ndarray of float64, shape (n_cells, n_dims)
    cells : numpy.ndarray of int64, shape (n_query,)
        Distinct row indices of the query cells.
    n_neighbors : int

    Returns
    -------
    Neighbors
        One row per query cell (``indices`` index ``X``).
    """
    Xc = X - X.mean(axis=0)
    dtype = torch.float64 if X.shape[0] <= FLOAT64_MAX_CELLS else torch.float32
    with torch.no_grad():
        dist, idx = _knn_brute(Xc, n_neighbors, dtype=dtype, cells=cells)
    return Neighbors(indices=idx, distances=dist)


def _knn_brute(
    Xc: np.ndarray, n_neighbors: int, *, dtype: torch.dtype, cells: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over all cells, chunked over query cells, self excluded.

    Parameters
    ----------
    Xc : numpy.ndarray of float64, shape (n_cells, n_dims)
        Centred embedding.
    n_neighbors : int
    dtype : torch.dtype
        Precision of the candidate ranking (float32 keeps :data:`SLACK`
        spare candidates for the float64 re-ranking).
    cells : numpy.ndarray of int64, shape (n_query,), optional
        Query cells (rows of ``Xc``); default every cell.

    Returns
    -------
    dist, idx : numpy.ndarray, shape (n_query, n_neighbors)
    """
    n = Xc.shape[0]
    cells = np.arange(n) if cells is None else cells
    data = torch.from_numpy(Xc).to(dtype)
    data_sq = (data * data).sum(1)
    slack = 0 if dtype == torch.float64 else SLACK
    n_sel = min(n, n_neighbors + 1 + slack)  # + the cell itself, dropped in refine
    rows = int(max(1, min(n, CHUNK_BYTES // (data.element_size() * n))))
    dist = np.empty((cells.size, n_neighbors), dtype=np.float64)
    idx = np.empty((cells.size, n_neighbors), dtype=np.int64)
    for start in range(0, cells.size, rows):
        sel = cells[start : start + rows]
        _, cand = exact_topk(data[torch.from_numpy(sel)], data, data_sq=data_sq, k=n_sel, chunk=n)
        out = slice(start, start + sel.size)
        dist[out], idx[out] = refine(Xc, sel, cand.numpy(), n_neighbors)
    return dist, idx
