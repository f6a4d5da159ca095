"""Approximate search: an inverted file (IVF) in PyTorch, no extra dependency.

The cells are partitioned by a few Lloyd iterations of k-means (fitted on a
random subsample) into lists.  The cells of one list are compared with all
cells of the lists whose centroids are nearest to that list's centroid
(itself included; :data:`IVF_PROBE_FRACTION` of all lists, at least
:data:`IVF_PROBES`) by one float32 matrix product; ``torch.topk`` keeps a few
spare candidates, whose distances are then recomputed in float64 and
re-ranked, so returned distances are exact for the neighbours found.  A true
neighbour is missed only if it lies in none of the probed lists.  Recall of
the exact neighbours >= 0.99 on simulated cells x 30 dims from 20,000 to
1,000,000 cells (``docs/lisi.md``).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np
import torch

from harmonypy._numba import KERNEL_LOCK, choose, engine_threads
from harmonypy.neighbors._common import CHUNK_BYTES, SLACK, augment, refine_torch
from harmonypy.neighbors._partition import nearest_centroid, sample_kmeans
from harmonypy.neighbors._result import Neighbors

logger = logging.getLogger(__name__)

#: The numba kernel that selects and re-ranks each query's candidates
#: (``harmonypy[fast]``), and the cells from which it runs by default.
KERNELS = "harmonypy.neighbors._ivf_kernels"
KERNELS_MIN_CELLS = 50_000

# Lists per sqrt(n_cells).
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


class _Lists(NamedTuple):
    """Where each list's cells lie in a list-sorted array."""

    counts: torch.Tensor  # int64, (n_lists,)
    offsets: torch.Tensor  # int64, (n_lists,)


def ivf_n_lists(n_cells: int) -> int:
    """Default number of inverted lists: about ``4 * sqrt(n)``, >= ~16 cells each.

    The search costs ~``n * n_probe * n / n_lists`` distance evaluations and
    the assignment ``n * n_lists``; with ~20 probes the two balance near
    ``4 * sqrt(n)`` lists.
    """
    return int(max(1, min(n_cells // 16, round(_IVF_LISTS_PER_SQRT * math.sqrt(n_cells)))))


def ivf_n_probe(n_lists: int) -> int:
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


def knn_ivf(
    X: np.ndarray,
    n_neighbors: int,
    *,
    n_probe: int | None = None,
    n_lists: int | None = None,
    seed: int = 0,
    cells: np.ndarray | None = None,
) -> Neighbors:
    """Approximate kNN (self excluded) with an inverted file.

    Lists of similar size are processed together (padded, one batched
    product) so that the Python and threading overhead per list stays small;
    a list whose block alone exceeds the memory budget is processed in slices
    of its query cells.

    Parameters
    ----------
    X : numpy.ndarray of float64, shape (n_cells, n_dims)
    n_neighbors : int
        Neighbours per cell, not counting the cell itself.
    n_probe : int, optional
        Lists searched per list of query cells (default :func:`ivf_n_probe`:
        :data:`IVF_PROBE_FRACTION` of the lists, at least :data:`IVF_PROBES`).
        More is slower and more accurate; ``n_probe >= n_lists`` is exact.
        It is raised if needed so that every cell has enough candidates.
    n_lists : int, optional
        Number of lists (default :func:`ivf_n_lists`).
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
    Neighbors
        One row per cell of ``X`` (or of ``cells``, in its order).
    """
    n = X.shape[0]
    kernels, why = choose(KERNELS, work=n, min_work=KERNELS_MIN_CELLS, unit="cells")
    logger.info("IVF search: %s (%s)", "numba kernel" if kernels else "torch operations", why)
    Xc = X - X.mean(axis=0)  # centring keeps the float32 norms small
    n_lists = max(1, min(n, n_lists or ivf_n_lists(n)))
    n_sel = min(n, n_neighbors + 1 + SLACK)  # + self + spare candidates
    n_out = n if cells is None else len(cells)
    dist = np.empty((n_out, n_neighbors), dtype=np.float64)
    idx = np.empty((n_out, n_neighbors), dtype=np.int64)
    with torch.no_grad():
        T = torch.from_numpy(Xc).to(torch.float32)
        cent = sample_kmeans(T, n_lists, generator=torch.Generator().manual_seed(seed))
        assign = nearest_centroid(T, cent)
        # Sort the cells by list so that each list is a contiguous slice.
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=n_lists)
        lists = _Lists(counts, torch.cumsum(counts, 0) - counts)
        queries, data = augment(T[order])
        # padding candidate: q . (0, ..., 0, inf) = inf for every query
        sentinel = torch.zeros(1, data.shape[1])
        sentinel[0, -1] = math.inf
        data = torch.cat([data, sentinel])
        probes = _probe_lists(cent, counts, n_probe or ivf_n_probe(n_lists), n_sel)
        q_pos, q_row, q_lists = _query_layout(cells, order=order, assign=assign, n_lists=n_lists)
        if cells is not None:
            queries = queries[q_pos]
        X64 = torch.from_numpy(Xc)[order]  # float64, list order, for the re-ranking
        search = _GroupSearch(
            queries=queries, data=data, probes=probes, n_sel=n_sel, q_lists=q_lists, lists=lists
        )
        groups = _group_lists(q_lists.counts, counts, probes, data.shape[1])
        layout = (q_pos, q_row, order)
        if kernels is None:
            _refine_groups(groups, search, X64=X64, layout=layout, out=(dist, idx))
        else:
            _select_groups(kernels, groups, search, X64=X64, layout=layout, out=(dist, idx))
    return Neighbors(indices=idx, distances=dist)


def _query_layout(
    cells: np.ndarray | None, *, order: torch.Tensor, assign: torch.Tensor, n_lists: int
) -> tuple[torch.Tensor, torch.Tensor, _Lists]:
    """The query cells as positions in list order (still grouped by list).

    Returns each query's position among the list-sorted cells, the output row
    of each position, and the query cells' lists.
    """
    n = order.shape[0]
    if cells is None:
        q_counts = torch.bincount(assign, minlength=n_lists)
        return torch.arange(n), order, _Lists(q_counts, torch.cumsum(q_counts, 0) - q_counts)
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n)
    q_pos, by_pos = torch.sort(rank[torch.as_tensor(cells, dtype=torch.int64)])
    q_row = torch.empty(n, dtype=torch.int64)
    q_row[q_pos] = by_pos
    q_counts = torch.bincount(assign[order[q_pos]], minlength=n_lists)
    return q_pos, q_row, _Lists(q_counts, torch.cumsum(q_counts, 0) - q_counts)


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
    block and the gathered candidate rows) would exceed :data:`CHUNK_BYTES`.
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
    groups: list[torch.Tensor] = []
    current: list[int] = []
    max_q, max_c = 0, 0
    for a in torch.argsort(q_counts, descending=True, stable=True).tolist():
        if sizes[a] == 0:
            break
        q, c = max(max_q, sizes[a]), max(max_c, n_cand[a])
        if current and 4 * (len(current) + 1) * (q + width) * c > CHUNK_BYTES:
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


def _refine_groups(groups, search: _GroupSearch, *, X64, layout, out) -> None:
    """The PyTorch path: each group's candidates by ``torch.topk``, then
    re-ranked in float64 (:func:`refine_torch`) into ``out = (dist, idx)``.

    ``layout = (q_pos, q_row, order)``: the position of each query row, the
    output row of each position, the cell of each position."""
    q_pos, q_row, order = layout
    dist_t, idx_t = (torch.from_numpy(a) for a in out)
    # the float64 re-ranking gathers rows x n_sel x n_dims values
    rows = int(max(1, CHUNK_BYTES // (8 * search.n_sel * X64.shape[1])))
    for group in groups:
        found = [search.top_candidates(*block) for block in search.blocks(group)]
        sel = torch.cat([f[0] for f in found])
        # candidates in position order: ties are ranked as on the numba path
        cand = torch.cat([f[1] for f in found]).sort(dim=1).values
        sel = q_pos[sel]  # positions of the query cells among all cells
        for r0 in range(0, sel.shape[0], rows):
            s, c = sel[r0 : r0 + rows], cand[r0 : r0 + rows]
            d, i = refine_torch(X64, s, c, out[0].shape[1])
            target = q_row[s]
            dist_t[target] = d
            idx_t[target] = order[i]


def _select_groups(kernels, groups, search: _GroupSearch, *, X64, layout, out) -> None:
    """The numba path: after each block's BLAS scores, one kernel keeps each
    query row's best candidates, re-ranks them in float64 and writes its
    neighbours into ``out = (dist, idx)`` (``layout`` as for
    :func:`_refine_groups`)."""
    q_pos, q_row, order = layout
    cells = (X64.numpy(), order.numpy(), q_row.numpy())
    counts = (search.n_sel, out[0].shape[1])
    with engine_threads():
        for group in groups:
            for scores, cpos, rows, valid in search.blocks(group):
                queries = (q_pos[rows].numpy(), valid.numpy())
                with KERNEL_LOCK:
                    kernels.select_and_refine(
                        scores.numpy(), cpos.numpy(), queries, cells, counts, out
                    )


class _GroupSearch:
    """The float32 scores of a batch of lists' query cells against their
    candidates.

    Parameters
    ----------
    queries : torch.Tensor of float32, shape (n_query, n_dims + 1)
        :func:`augment` queries, grouped by list (``q_lists.counts`` per list).
    data : torch.Tensor of float32, shape (n_cells + 1, n_dims + 1)
        :func:`augment` of the list-sorted cells, plus a last row whose
        product with any query is ``+inf`` (the padding candidate).
    probes : torch.Tensor of int64, shape (n_lists, n_probe)
    n_sel : int
        Candidates to keep per query cell.
    q_lists : _Lists
        Query cells of each list and where they start in ``queries``.
    lists : _Lists
        The same for the cells in ``data``.
    """

    def __init__(self, *, queries, data, probes, n_sel: int, q_lists: _Lists, lists: _Lists):
        self.queries, self.data, self.probes = queries, data, probes
        self.n_sel, self.q_lists, self.lists = n_sel, q_lists, lists

    def blocks(self, group: torch.Tensor):
        """Yield ``(scores, cpos, rows, valid)`` for slices of the query cells
        of the lists ``group``: scores (n_group, n_rows, n_cand) float32 of
        the query rows ``rows`` ((n_group, n_rows) rows of ``queries``; padding
        where ``valid`` is False) against the candidates at positions ``cpos``
        ((n_group, n_cand) rows of ``data``; padding: its last row)."""
        n = self.data.shape[0] - 1
        q_lists, lists = self.q_lists, self.lists
        qpos, qvalid = _ragged_positions(
            q_lists.offsets[group, None], q_lists.counts[group, None], 0
        )
        p = self.probes[group]
        cpos, _ = _ragged_positions(lists.offsets[p], lists.counts[p], n)  # padding -> +inf row
        cdata = self.data[cpos].transpose(1, 2)
        # Query rows per product: the whole group, unless a single list's block
        # is over the budget (many probes of large lists, e.g. 10**7 cells).
        step = int(max(1, CHUNK_BYTES // (4 * cpos.shape[0] * cpos.shape[1])))
        for r0 in range(0, qpos.shape[1], step):
            rows = qpos[:, r0 : r0 + step]
            yield torch.bmm(self.queries[rows], cdata), cpos, rows, qvalid[:, r0 : r0 + step]

    def top_candidates(self, scores, cpos, rows, valid) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sel, cand)``: the valid query rows of a block ((n_found,) rows
        of ``queries``) and the positions of their ``n_sel`` best-scored
        candidates ((n_found, n_sel), rows of ``data``, in no order)."""
        pos = torch.topk(scores, self.n_sel, dim=2, largest=False, sorted=False).indices
        cand = torch.gather(cpos.unsqueeze(1).expand(-1, pos.shape[1], -1), 2, pos)
        return rows[valid], cand[valid]
