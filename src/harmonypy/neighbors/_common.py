"""Pieces the searches share: memory budget, operands, float64 re-ranking."""

from __future__ import annotations

import math

import numpy as np
import torch

#: Memory budget (bytes) of one block of distances or gathered coordinates.
CHUNK_BYTES = 64 * 2**20
#: Spare candidates kept when candidates are ranked in float32, so that
#: rounding cannot push a true neighbour out before the float64 re-ranking.
SLACK = 8


def augment(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Operands whose product is ``|y|^2 - 2 q.y`` (squared distance minus ``|q|^2``).

    Folding the norm into an extra column turns a distance block into one
    plain (batched) matrix product, with no broadcast pass over the result,
    and lets a padding row of ``(0, ..., 0, inf)`` score ``+inf`` against
    every query.

    Parameters
    ----------
    T : torch.Tensor, shape (n_cells, n_dims)

    Returns
    -------
    queries, data : torch.Tensor, shape (n_cells, n_dims + 1)
    """
    sq = (T * T).sum(dim=1, keepdim=True)
    queries = torch.cat([T, torch.ones_like(sq)], dim=1)
    data = torch.cat([-2.0 * T, sq], dim=1)
    return queries, data


def refine(
    Xc: np.ndarray, sel: np.ndarray, cand: np.ndarray, n_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 distances from cells ``sel`` to their candidates; drop self; keep nearest.

    Parameters
    ----------
    Xc : numpy.ndarray of float64, shape (n_cells, n_dims)
    sel : numpy.ndarray of int64, shape (m,)
        Query cells (rows of ``Xc``).
    cand : numpy.ndarray of int64, shape (m, n_candidates)
        Candidate rows of each query; may hold the query itself, which is
        moved to the end so it is never kept.
    n_neighbors : int

    Returns
    -------
    dist, idx : numpy.ndarray, shape (m, n_neighbors)
        Ascending float64 distances (ties in candidate order) and rows.
    """
    diff = Xc[cand] - Xc[sel][:, None, :]
    d = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
    d[cand == sel[:, None]] = np.inf  # don't count yourself
    order = np.argsort(d, axis=1, kind="stable")[:, :n_neighbors]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(cand, order, axis=1)


def refine_torch(
    X64: torch.Tensor, sel: torch.Tensor, cand: torch.Tensor, n_neighbors: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`refine` in PyTorch (multithreaded gathers; same float64 distances).

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
