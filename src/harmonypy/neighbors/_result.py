"""The one result type of every neighbour search."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Neighbors:
    """Each query cell's nearest cells, nearest first.

    Every search of this package (exact, IVF, pynndescent) returns this, so
    a metric can take any of them without knowing which ran.

    Attributes
    ----------
    indices : numpy.ndarray of int64, shape (n_query, n_neighbors)
        Rows of the searched cells, ascending distance along each row.
    distances : numpy.ndarray of float64, shape (n_query, n_neighbors)
        Euclidean (not squared) distances, computed in float64 for the
        neighbours kept, so they are exact whatever precision chose them.
    """

    indices: np.ndarray
    distances: np.ndarray

    def __post_init__(self) -> None:
        if self.indices.shape != self.distances.shape or self.indices.ndim != 2:
            raise ValueError(
                f"Neighbors needs indices and distances of one 2-d shape (n_query, "
                f"n_neighbors), got {self.indices.shape} and {self.distances.shape}"
            )

    @property
    def n_neighbors(self) -> int:
        """Neighbours per query cell."""
        return int(self.indices.shape[1])
