"""Nearest-neighbour searches shared by LISI, label transfer and the mapping score.

One file per backend, one result type (:class:`Neighbors`), as scib-metrics'
``nearest_neighbors`` serves all its metrics:

* :mod:`~harmonypy.neighbors.exact`: brute force in chunks (:func:`exact_topk`,
  the one exact top-k kernel) and the exact kNN of cells (:func:`knn_exact`,
  :func:`knn_of_cells`);
* :mod:`~harmonypy.neighbors.pruned`: the exact search that skips far k-means
  lists (:class:`PrunedIndex`), for large exact searches;
* :mod:`~harmonypy.neighbors.ivf`: the approximate inverted-file search
  (:func:`knn_ivf`);
* :mod:`~harmonypy.neighbors.nndescent`: pynndescent's graph
  (:func:`knn_pynndescent`, optional dependency);
* :mod:`~harmonypy.neighbors.faiss_backend`: the exact search by faiss's
  flat index (:func:`knn_faiss`, optional dependency), which ``"auto"``
  uses where it measured faster than the PyTorch brute force.

:func:`knn` picks one by name, as ``compute_lisi(neighbors=...)`` does.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np

from harmonypy._optional import ANN_HINT
from harmonypy.neighbors._partition import nearest_centroid, sample_kmeans
from harmonypy.neighbors._result import Neighbors
from harmonypy.neighbors.exact import FLOAT64_MAX_CELLS, exact_topk, knn_exact, knn_of_cells
from harmonypy.neighbors.faiss_backend import faiss_available, knn_faiss, require_faiss
from harmonypy.neighbors.ivf import (
    IVF_PROBE_FRACTION,
    IVF_PROBES,
    ivf_n_lists,
    ivf_n_probe,
    knn_ivf,
)
from harmonypy.neighbors.nndescent import knn_pynndescent
from harmonypy.neighbors.pruned import PrunedIndex, knn_pruned

logger = logging.getLogger(__name__)

__all__ = [
    "EXACT_MAX_CELLS",
    "FAISS_MIN_CELLS",
    "FLOAT64_MAX_CELLS",
    "IVF_PROBES",
    "IVF_PROBE_FRACTION",
    "METHODS",
    "Neighbors",
    "PrunedIndex",
    "exact_topk",
    "faiss_available",
    "ivf_n_lists",
    "ivf_n_probe",
    "knn",
    "knn_exact",
    "knn_faiss",
    "knn_ivf",
    "knn_of_cells",
    "knn_pruned",
    "knn_pynndescent",
    "nearest_centroid",
    "resolve_method",
    "sample_kmeans",
]

#: ``method="auto"`` uses the exact search up to this many cells and the
#: inverted-file search (``"ivf"``) above.  Up to here the exact search is a
#: float64 brute force (a few seconds at 20,000 cells), so LISI agrees with
#: R's ``lisi`` to rounding; beyond it its cost grows about quadratically
#: while the IVF search grows about as ``n**1.5`` (``docs/lisi.md``).
EXACT_MAX_CELLS = 20_000

#: From this many cells up to :data:`EXACT_MAX_CELLS`, ``method="auto"``
#: runs the exact search with faiss (:func:`knn_faiss`) when faiss is
#: installed: there its float32 flat search (certified, re-ranked in float64)
#: measured 1.1-1.5x (5,000 cells) and 1.7x (20,000 cells) faster than the
#: PyTorch float64 brute force, with the same neighbours and distances; below,
#: the two tie.  Above 20,000 cells the pruned PyTorch search skips most pairs
#: and was 2.6x faster than faiss's brute force at 100,000 cells on a quiet
#: machine (``docs/lisi.md``), so faiss is not chosen there.
FAISS_MIN_CELLS = 5_000

#: The names :func:`knn` accepts (``"approx"`` is ``"ivf"``).
METHODS = ("auto", "exact", "ivf", "approx", "pynndescent", "faiss")


def resolve_method(method: str, n_cells: int) -> str:
    """Map a method name to ``"exact"``, ``"faiss"``, ``"ivf"`` or ``"pynndescent"``.

    ``"auto"``: ``"exact"`` up to :data:`EXACT_MAX_CELLS` cells (``"faiss"``
    from :data:`FAISS_MIN_CELLS` cells when faiss is installed), ``"ivf"``
    above.

    Raises
    ------
    ValueError
        On a name not in :data:`METHODS`.
    ImportError
        For ``"pynndescent"`` or ``"faiss"`` when it is not installed (checked
        before any work).
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"neighbors must be one of {list(METHODS)}, got {method!r}")
    if method == "auto":
        if n_cells > EXACT_MAX_CELLS:
            return "ivf"
        return "faiss" if n_cells >= FAISS_MIN_CELLS and faiss_available() else "exact"
    if method == "approx":
        return "ivf"
    if method == "faiss":
        require_faiss()
        return method
    if method == "pynndescent" and importlib.util.find_spec("pynndescent") is None:
        raise ImportError(
            f"neighbors='pynndescent' needs the optional package pynndescent: {ANN_HINT} "
            "(or use neighbors='ivf', which needs nothing extra)"
        )
    return method


def knn(
    X: np.ndarray, n_neighbors: int, *, method: str = "auto", n_jobs: int | None = None
) -> Neighbors:
    """Nearest neighbours of every cell among all cells, the cell itself excluded.

    Parameters
    ----------
    X : numpy.ndarray of float64, shape (n_cells, n_dims)
        Finite coordinates.
    n_neighbors : int
        Neighbours per cell, not counting the cell itself (< n_cells).
    method : {"auto", "exact", "ivf", "approx", "pynndescent", "faiss"}, default "auto"
        See :func:`resolve_method`.
    n_jobs : int or None
        Threads for pynndescent (the others use PyTorch's thread setting;
        faiss's is set to it for the search and restored after).

    Returns
    -------
    Neighbors
        Euclidean distances ascending along each row, float64.
    """
    backend = resolve_method(method, X.shape[0])
    logger.debug("%s neighbour search, k=%d", backend, n_neighbors)
    if backend == "exact":
        return knn_exact(X, n_neighbors)
    if backend == "ivf":
        return knn_ivf(X, n_neighbors)
    if backend == "faiss":
        return knn_faiss(X, n_neighbors)
    return knn_pynndescent(X, n_neighbors, n_jobs=n_jobs)
