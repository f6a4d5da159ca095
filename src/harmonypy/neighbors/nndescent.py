"""Approximate search with pynndescent (optional: ``pip install harmonypy[ann]``)."""

from __future__ import annotations

import numpy as np

from harmonypy._optional import ANN_HINT, import_optional
from harmonypy.neighbors._common import CHUNK_BYTES
from harmonypy.neighbors._result import Neighbors


def knn_pynndescent(X: np.ndarray, n_neighbors: int, *, n_jobs: int | None = None) -> Neighbors:
    """Approximate kNN of every cell (self excluded) from pynndescent's graph.

    Parameters
    ----------
    X : numpy.ndarray of float64, shape (n_cells, n_dims)
    n_neighbors : int
        Neighbours per cell, not counting the cell itself.
    n_jobs : int or None
        Threads for pynndescent (``None``: all cores).

    Returns
    -------
    Neighbors
        Float64 distances recomputed for the neighbours found.

    Raises
    ------
    ImportError
        If pynndescent is not installed.
    """
    pynndescent = import_optional(
        "pynndescent", f"approximate neighbour search needs pynndescent: {ANN_HINT}"
    )
    n = X.shape[0]
    k = min(n, n_neighbors + 1)  # the graph includes each cell itself
    # A fixed seed keeps results reproducible without touching numpy's global RNG.
    index = pynndescent.NNDescent(
        X.astype(np.float32),
        n_neighbors=k,
        metric="euclidean",
        random_state=0,
        n_jobs=-1 if n_jobs is None else n_jobs,
        low_memory=True,
        compressed=True,
    )
    graph_idx, _ = index.neighbor_graph
    dist, idx = drop_self_and_refine(X, np.asarray(graph_idx, dtype=np.int64), n_neighbors)
    return Neighbors(indices=idx, distances=dist)


def drop_self_and_refine(
    X: np.ndarray, graph_idx: np.ndarray, n_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each cell from its own list (or the farthest entry if absent).

    Distances are recomputed in float64 so that they are exact for the chosen
    neighbours; unfilled slots (-1) of an approximate graph get distance inf
    and therefore zero weight.  Rows are processed in chunks of
    :data:`CHUNK_BYTES` of gathered coordinates (unchunked, 1,000,000 cells
    x 90 neighbours x 30 dims would need 22 GB at once).

    Parameters
    ----------
    X : numpy.ndarray of float64, shape (n_cells, n_dims)
    graph_idx : numpy.ndarray of int64, shape (n_cells, k)
        Each cell's approximate neighbours, itself usually among them.
    n_neighbors : int
        At most ``k - 1``.

    Returns
    -------
    dist, idx : numpy.ndarray, shape (n_cells, n_neighbors)
    """
    n, k = graph_idx.shape
    dist = np.empty((n, n_neighbors), dtype=np.float64)
    idx = np.empty((n, n_neighbors), dtype=np.int64)
    step = int(max(1, CHUNK_BYTES // (8 * k * X.shape[1])))
    for s in range(0, n, step):
        g = graph_idx[s : s + step]
        rows = np.arange(s, s + g.shape[0])[:, None]
        valid = g >= 0
        safe = np.where(valid, g, 0)
        diff = X[safe] - X[s : s + g.shape[0], None, :]
        d = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
        d[~valid] = np.inf
        is_self = safe == rows
        d[is_self] = -1.0  # sorts self first so it is the one dropped
        # a row without itself drops its farthest entry instead (keeps its nearest)
        skip = is_self.any(axis=1, keepdims=True).astype(np.int64)
        order = np.argsort(d, axis=1, kind="stable")
        order = np.take_along_axis(order, skip + np.arange(n_neighbors), axis=1)
        dist[s : s + g.shape[0]] = np.maximum(np.take_along_axis(d, order, axis=1), 0.0)
        idx[s : s + g.shape[0]] = np.take_along_axis(safe, order, axis=1)
    return dist, idx
