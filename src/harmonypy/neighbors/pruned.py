"""Exact search that skips far lists: k-means lists and Voronoi lower bounds.

Used where brute force is too costly but the neighbours must be exact:
label transfer above 2^26 query x reference pairs, and LISI's
``neighbors="exact"`` above 20,000 cells (:func:`knn_pruned`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harmonypy.neighbors._common import CHUNK_BYTES, SLACK, refine
from harmonypy.neighbors._partition import nearest_centroid, sample_kmeans

#: Data cells per list (about), and the most lists.
LIST_SIZE = 256
MAX_LISTS = 1024
#: Data cells the first, upper-bounding candidates of a group hold at least.
FIRST_CELLS = 4096
#: Query x data values held at once (32 MB of float32).
ELEMENTS = 2**23
#: Query cells :func:`knn_pruned` searches at once (grouped by nearest list).
QUERY_CHUNK = 2**16


class PrunedIndex:
    """Exact k nearest data cells of query cells, skipping far data lists.

    The data are partitioned into lists by a few k-means rounds
    (:func:`~harmonypy.neighbors._partition.sample_kmeans`) and every data
    cell is put in the list of its nearest centroid. A query cell ``q`` whose
    nearest centroid is ``c_a`` is compared first with the cells of the lists
    nearest to ``c_a`` (at least k cells): the k-th best of them bounds its
    k-th neighbour's distance ``D``. A cell ``x`` of list ``b`` is at least
    ``max((|q - c_b|^2 - |q - c_a|^2) / (2 |c_a - c_b|), |q - c_b| -
    radius_b)`` from ``q`` (``x`` lies on ``c_b``'s side of the plane halfway
    between the centroids, and within ``radius_b`` of ``c_b``); lists whose
    bound exceeds ``D`` for every query cell of the group are skipped, the
    others are compared. The bounds are widened by the rounding error of the
    float type, so the neighbours found are those of comparing every pair.

    Query cells are handled in groups of the same nearest list, so each group
    compares a block of query cells with one gathered block of data cells.

    Parameters
    ----------
    data : torch.Tensor, shape (n, d)
        Cells to search among (any float type and device; kept as given).
    k : int
        Neighbours per query cell (at most ``n``).
    list_size, max_lists, first_cells : int
        Cells per list, most lists, and the fewest cells of the first lists
        compared (defaults :data:`LIST_SIZE`, :data:`MAX_LISTS`,
        :data:`FIRST_CELLS`).
    """

    def __init__(
        self,
        data: torch.Tensor,
        *,
        k: int,
        list_size: int = LIST_SIZE,
        max_lists: int = MAX_LISTS,
        first_cells: int = FIRST_CELLS,
    ) -> None:
        self.k = k
        dtype, device = data.dtype, data.device
        n_ref, d = data.shape
        self.mean = data.to(torch.float64).mean(0).to(dtype)
        data = data - self.mean
        n_lists = max(1, min(max_lists, n_ref // list_size))
        generator = torch.Generator().manual_seed(0)
        centroids = sample_kmeans(data.float().cpu(), n_lists, generator=generator)
        centroids = centroids.to(device, dtype)
        lists = nearest_centroid(data, centroids)
        order = torch.argsort(lists, stable=True)
        self.index = order  # row of each sorted cell in ``data``
        self.data = data.index_select(0, order)
        self.sq = (self.data * self.data).sum(1)
        self.counts = torch.bincount(lists, minlength=n_lists)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.centroids = centroids
        self.centroid_sq = (centroids * centroids).sum(1)
        self._bounds(lists.index_select(0, order), k=k, first_cells=first_cells)
        # Rounding error of |q|^2 + |r|^2 - 2 q.r, as a multiple of |q|^2 + |r|^2.
        self.ref_scale = float(self.sq.max()) if n_ref else 0.0
        self.unit = 4 * (d + 4) * torch.finfo(dtype).eps

    def _bounds(self, sorted_lists: torch.Tensor, *, k: int, first_cells: int) -> None:
        """Each list's radius, the centroid gaps and each list's first lists."""
        dtype = self.data.dtype
        c64 = self.centroids.to(torch.float64)
        spread = torch.linalg.vector_norm(
            self.data.to(torch.float64) - c64.index_select(0, sorted_lists), dim=1
        )
        self.radius = (
            torch.zeros(c64.shape[0], dtype=torch.float64, device=c64.device)
            .scatter_reduce_(0, sorted_lists, spread, "amax")
            .mul_(1 + 1e-6)
            .to(dtype)
        )
        gaps = torch.cdist(c64, c64)
        self.gaps = gaps.to(dtype)
        # Lists in order of centroid distance from each list (itself first); the
        # first ones that hold k cells give the first, upper-bounding candidates.
        gaps.fill_diagonal_(-1.0)
        self.near = torch.argsort(gaps, dim=1, stable=True)
        reach = torch.cumsum(self.counts[self.near], dim=1)
        self.n_first = (reach < max(k, first_cells)).sum(1) + 1

    def search(self, q: torch.Tensor, *, elements: int = ELEMENTS) -> torch.Tensor:
        """Rows of ``data`` of each query cell's k nearest, nearest first.

        Parameters
        ----------
        q : torch.Tensor, shape (m, d), the data's dtype and device
        elements : int
            Query x data values compared at once (default :data:`ELEMENTS`).

        Returns
        -------
        torch.Tensor of int64, shape (m, k)
        """
        k = self.k
        q = q - self.mean
        n = q.shape[0]
        out = torch.empty((n, k), dtype=torch.int64, device=q.device)
        if n == 0:
            return out
        lists = nearest_centroid(q, self.centroids)
        q_sq = (q * q).sum(1)
        err = self.unit * (float(q_sq.max()) + self.ref_scale)
        order = torch.argsort(lists, stable=True)
        group_sizes = torch.bincount(lists, minlength=self.counts.numel())
        starts = (torch.cumsum(group_sizes, 0) - group_sizes).tolist()
        for a in torch.nonzero(group_sizes).flatten().tolist():
            rows = order[starts[a] : starts[a] + int(group_sizes[a])]
            first = self.near[a, : int(self.n_first[a])]
            cand = self._cells_of(first)
            step = max(1, elements // max(1, cand.numel()))
            for r0 in range(0, rows.numel(), step):
                part = rows[r0 : r0 + step]
                out[part] = self._group(
                    q.index_select(0, part),
                    q_sq.index_select(0, part),
                    a=a,
                    first=first,
                    cand=cand,
                    err=err,
                )
        return self.index[out]

    def _group(self, qg, qg_sq, *, a, first, cand, err):
        """Sorted positions (m, k) of the k nearest of query cells whose nearest list is ``a``."""
        values, found = self._best(qg, cand)
        # k-th squared distance so far (an upper bound), widened by rounding.
        bound = (values[:, -1] + qg_sq + 2 * err).clamp_min(0).sqrt()
        dq2 = torch.addmm(self.centroid_sq + qg_sq[:, None], qg, self.centroids.T, alpha=-2.0)
        gaps = self.gaps[a]
        plane = (dq2 - dq2[:, a : a + 1] - 4 * err) / (2 * gaps)
        plane.masked_fill_(~(gaps > 0), -math.inf)  # the list itself, coincident centroids
        ball = (dq2 - err).clamp_min(0).sqrt() - self.radius
        need = (torch.maximum(plane, ball) <= bound[:, None]).any(0)
        need[first] = False
        need &= self.counts > 0
        if bool(need.any()):
            more = self._cells_of(torch.nonzero(need).flatten())
            values2, found2 = self._within(qg, more, values[:, -1:])
            if values2.shape[1]:
                values, pos = torch.topk(
                    torch.cat([values, values2], 1), self.k, dim=1, largest=False, sorted=True
                )
                found = torch.cat([found, found2], 1).gather(1, pos)
        return found

    def _within(self, qg, more, threshold):
        """Positions ``more`` at most ``threshold`` from each query, padded with inf.

        Only cells at most as far as the current k-th can enter the top k, so
        a threshold replaces a top k over every column.
        """
        block = torch.addmm(
            self.sq.index_select(0, more)[None, :],
            qg,
            self.data.index_select(0, more).T,
            alpha=-2.0,
        )
        row, col = torch.nonzero(block <= threshold, as_tuple=True)
        m = qg.shape[0]
        if row.numel() == 0:
            return block.new_empty((m, 0)), more.new_empty((m, 0))
        per_row = torch.bincount(row, minlength=m)
        slot = torch.arange(row.numel(), device=row.device) - (
            torch.cumsum(per_row, 0) - per_row
        ).index_select(0, row)
        width = int(per_row.max())
        values = torch.full((m, width), math.inf, dtype=block.dtype, device=block.device)
        values[row, slot] = block[row, col]
        found = torch.zeros((m, width), dtype=more.dtype, device=more.device)
        found[row, slot] = more.index_select(0, col)
        return values, found

    def _best(self, qg, cand):
        """The k least ``|r|^2 - 2 q.r`` over sorted-data positions ``cand``, sorted."""
        block = torch.addmm(
            self.sq.index_select(0, cand)[None, :],
            qg,
            self.data.index_select(0, cand).T,
            alpha=-2.0,
        )
        values, pos = torch.topk(
            block, min(self.k, cand.numel()), dim=1, largest=False, sorted=True
        )
        return values, cand[pos]

    def _cells_of(self, lists):
        """Sorted-data positions of the cells of ``lists``, list after list."""
        lengths = self.counts.index_select(0, lists)
        total = int(lengths.sum())
        begin = torch.repeat_interleave(
            self.offsets.index_select(0, lists) - (torch.cumsum(lengths, 0) - lengths),
            lengths,
            output_size=total,
        )
        return torch.arange(total, device=lengths.device) + begin


def knn_pruned(
    Xc: np.ndarray, n_neighbors: int, *, list_size: int = LIST_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN of every cell (self excluded) with a :class:`PrunedIndex`.

    Candidates are ranked in float32 with :data:`SLACK` spares (the cell
    itself is one of them), then re-ranked with float64 distances, so the
    neighbours and distances are those of a float64 brute force up to ties.

    Parameters
    ----------
    Xc : numpy.ndarray of float64, shape (n_cells, n_dims)
        Centred embedding.
    n_neighbors : int
    list_size : int
        Cells per list of the index (default :data:`LIST_SIZE`).

    Returns
    -------
    dist, idx : numpy.ndarray, shape (n_cells, n_neighbors)
        Float64 distances, ascending, and rows of ``Xc``.
    """
    n = Xc.shape[0]
    n_sel = min(n, n_neighbors + 1 + SLACK)
    T = torch.from_numpy(Xc).to(torch.float32)
    index = PrunedIndex(T, k=n_sel, list_size=list_size)
    dist = np.empty((n, n_neighbors), dtype=np.float64)
    idx = np.empty((n, n_neighbors), dtype=np.int64)
    rows = int(max(1, CHUNK_BYTES // (8 * n_sel * Xc.shape[1])))  # float64 re-ranking
    for start in range(0, n, QUERY_CHUNK):
        cand = index.search(T[start : start + QUERY_CHUNK]).numpy()
        for r0 in range(0, cand.shape[0], rows):
            sel = np.arange(start + r0, start + min(cand.shape[0], r0 + rows))
            out = slice(sel[0], sel[-1] + 1)
            dist[out], idx[out] = refine(Xc, sel, cand[r0 : r0 + rows], n_neighbors)
    return dist, idx
