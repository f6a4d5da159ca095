"""The per-cell mapping score of a mapped query (Symphony's ``calcPerCellMappingMetric``).

``sum_k R_ik ||L_k^-1 (z_i - c_k)||``: each query cell's R-weighted
Mahalanobis distance to the reference clusters' centres, with ``L_k L_k^T``
the covariance of the *uncorrected* reference cells of cluster ``k``
(``R/confidenceScores.R``). :func:`score_terms` prepares what the score needs
of the reference once per call; :func:`mapping_scores` scores one chunk of
cells, computing only the (cell, cluster) pairs whose weight can matter to a
stated relative tolerance. Memory stays bounded by
:data:`_SCORE_PAIR_ELEMENTS` values whatever the chunk.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from harmonypy.engine.reduce import index_sum_
from harmonypy.mapping.reference import Reference

logger = logging.getLogger(__name__)

__all__ = ["mapping_scores", "score_terms"]

#: (cell, cluster) pairs x dims in one batched product of the score (bounds
#: its two buffers whatever the chunk: 32 MB each in float32).
_SCORE_PAIR_ELEMENTS = 2**23
#: The mapping score leaves out (cell, cluster) pairs whose R is too small to
#: matter: at most this relative error of each cell's score, per float type.
_SCORE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-13}
#: Pairs computed first: R >= this x the cell's largest R.
_SCORE_FIRST = 1e-2
#: (cell, cluster) pairs per tile of the batched per-cluster product.
_SCORE_TILE = 256


def score_terms(ref: Reference, dtype, device):
    """What the mapping score needs of the reference, computed once per call.

    Returns ``(whiten_t, centers, spectral, offsets, mean, rtol)``: per
    cluster the transposed ``L_k^-1`` (K, d, d), with ``L_k L_k^T`` the
    covariance, so that ``(z - c_k) @ whiten_t[k]`` has the Mahalanobis
    distance as its length; the centres ``c_k`` (K, d); the spectral norm of
    ``L_k^-1`` (K,), i.e. ``1 / sqrt`` of the covariance's smallest
    eigenvalue; ``|c_k - m|`` (K,) with ``m`` the mean of the centres; ``m``
    (d,); and the relative tolerance of the score (:data:`_SCORE_RTOL`).

    A covariance that is not positive definite (a cluster of fewer effective
    cells than dimensions, where R's ``mahalanobis`` would stop with an error)
    gets a ridge of 1e-10, then 1e-8, ... times its mean variance until the
    Cholesky factorisation succeeds.
    """
    cov = torch.as_tensor(ref.cluster_cov, dtype=torch.float64)
    d = cov.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(cov)
    scale = cov.diagonal(dim1=1, dim2=2).mean(1).clamp_min(torch.finfo(torch.float64).tiny)
    ridge = 1e-10
    while bool((info > 0).any()):
        failed = info > 0
        if ridge > 1:
            raise FloatingPointError("the reference's cluster covariances cannot be factorised")
        logger.debug(
            "%d cluster covariance(s) not positive definite: ridge %.0e", int(failed.sum()), ridge
        )
        fixed, fixed_info = torch.linalg.cholesky_ex(
            cov[failed] + (ridge * scale[failed])[:, None, None] * eye
        )
        factor[failed] = fixed
        info = info.clone()
        info[failed] = fixed_info
        ridge *= 100
    whiten = torch.linalg.solve_triangular(factor, eye.expand_as(cov), upper=False)
    # |L^-1 x| <= ||L^-1||_2 |x|, ||L^-1||_2^2 the largest eigenvalue of
    # L^-T L^-1 (computed to its own relative precision); a margin on top.
    precision = whiten.transpose(1, 2) @ whiten
    spectral = torch.linalg.eigvalsh(precision)[:, -1].clamp_min(0).sqrt() * (1 + 1e-3)
    centers = torch.as_tensor(ref.cluster_center, dtype=torch.float64)
    mean = centers.mean(0)
    offsets = torch.linalg.vector_norm(centers - mean, dim=1)

    def put(t):
        return t.to(device, dtype)

    return (
        put(whiten.transpose(1, 2).contiguous()),
        put(centers),
        put(spectral),
        put(offsets),
        put(mean),
        _SCORE_RTOL[dtype],
    )


def mapping_scores(z, assignments, whiten_t, centers, spectral, offsets, mean, rtol):
    """``sum_k R_ik ||L_k^-1 (z_i - c_k)||``: the R-weighted Mahalanobis distances, (n,).

    Only the pairs whose weight can matter are computed, to a relative
    ``rtol`` of the full sum over the K clusters (1e-5 in float32, 1e-13 in
    float64). Every distance is at most ``u_ik = ||L_k^-1||_2 (|z_i - m| +
    |c_k - m|)`` (triangle inequality), so leaving out a set of pairs lowers
    a cell's score by at most ``sum_left R_ik u_ik``. First the pairs with
    ``R_ik >= _SCORE_FIRST * max_k R_ik`` are computed: their sum ``S1`` is a
    lower bound of the score. Of the other pairs, those of smallest
    ``R_ik u_ik`` are left out as long as their bounds add up to at most
    ``rtol * S1``, and the rest are computed.
    """
    top = assignments.amax(1, keepdim=True)
    first = assignments >= top * _SCORE_FIRST
    scores = _pair_distances(z, assignments, first, whiten_t, centers)
    reach = torch.linalg.vector_norm(z - mean, dim=1)
    bound = assignments * (reach[:, None] + offsets) * spectral
    bound.masked_fill_(first, math.inf)
    ranked, order = _sort_rows(bound)
    left_out = torch.cumsum(ranked, dim=1) <= rtol * scores[:, None]
    second = torch.ones_like(first).scatter_(1, order, ~left_out)
    second &= ~first
    if bool(second.any()):
        scores += _pair_distances(z, assignments, second, whiten_t, centers)
    return scores


def _sort_rows(values):
    """``torch.sort(values, dim=1)``; on the CPU through NumPy, ~10x faster on short rows."""
    if values.device.type != "cpu":
        return torch.sort(values, dim=1)
    order = np.argsort(values.numpy(), axis=1)
    return torch.from_numpy(np.take_along_axis(values.numpy(), order, axis=1)), torch.from_numpy(
        order
    )


def _pair_distances(z, assignments, pairs, whiten_t, centers):
    """``sum_k pairs_ik R_ik ||(z_i - c_k) @ whiten_t[k]||`` per cell, (n,).

    Batched over clusters without an (n, K, d) temporary: the pairs, ordered
    by cluster, are laid out in tiles of :data:`_SCORE_TILE` rows, each tile
    holding one cluster's pairs (its last tile padded with any cell, whose
    result is not read), and the tiles go through batched products with
    their cluster's matrix, at most :data:`_SCORE_PAIR_ELEMENTS` values at a
    time. Only 1-D gathers and scatters are used.
    """
    n, d = z.shape
    out = torch.zeros(n, dtype=z.dtype, device=z.device)
    cluster, cell = pairs.T.nonzero(as_tuple=True)  # ordered by cluster, then cell
    step = max(1, _SCORE_PAIR_ELEMENTS // d)
    for start in range(0, cell.numel(), step):
        _add_pair_distances(
            out,
            z,
            assignments,
            cluster[start : start + step],
            cell[start : start + step],
            whiten_t,
            centers,
        )
    return out


def _add_pair_distances(out, z, assignments, cluster, cell, whiten_t, centers):
    """Adds ``R_ik ||(z_i - c_k) @ whiten_t[k]||`` of the pairs (cluster sorted) to ``out``."""
    n_pairs, d = cell.numel(), z.shape[1]
    n_clusters = assignments.shape[1]
    device = z.device
    tile = _SCORE_TILE
    counts = torch.bincount(cluster, minlength=n_clusters)
    tiles = torch.div(counts + (tile - 1), tile, rounding_mode="floor")
    # Flat slot of each pair: its cluster's first tile, then its rank in the cluster.
    shift = (torch.cumsum(tiles, 0) - tiles) * tile - (torch.cumsum(counts, 0) - counts)
    slot = torch.arange(n_pairs, device=device) + shift.index_select(0, cluster)
    tile_cluster = torch.repeat_interleave(torch.arange(n_clusters, device=device), tiles)
    source = torch.zeros(tile_cluster.numel() * tile, dtype=cell.dtype, device=device)
    source.index_copy_(0, slot, cell)
    buffer = z.index_select(0, source).view(-1, tile, d)
    buffer -= centers.index_select(0, tile_cluster).unsqueeze(1)
    whitened = torch.bmm(buffer, whiten_t.index_select(0, tile_cluster))
    del buffer
    distances = torch.linalg.vector_norm(whitened, dim=2).view(-1).index_select(0, slot)
    del whitened
    weights = assignments.reshape(-1).index_select(0, cell * n_clusters + cluster)
    index_sum_(out, cell, distances * weights)
