"""What a reference keeps of its clusters: Symphony's compression terms and the
per-cluster statistics of the mapping score.

:func:`cluster_statistics` turns the soft assignments and the cells of an
integrated atlas into ``Nr``, ``C``, ``Y`` (``compute_ref_cache`` in symphony's
``src/utils.cpp``) and the R-weighted centre and covariance of each cluster
(``cov.wt`` in ``R/confidenceScores.R``), reading the cells in chunks so that
memory stays at K x d^2 whatever N.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch

from harmonypy.engine import clustering as clu

__all__ = ["ClusterStatistics", "cluster_statistics"]


class ClusterStatistics(TypedDict):
    """The float64 arrays :func:`cluster_statistics` returns, named as
    :class:`~harmonypy.Reference`'s fields."""

    Nr: np.ndarray  # (K,)
    C: np.ndarray  # (K, d)
    Y: np.ndarray  # (d, K)
    cluster_center: np.ndarray  # (K, d)
    cluster_cov: np.ndarray  # (K, d, d)


#: Cells handled at once by the reference statistics (the outer products of a
#: chunk take rows x d^2 float64 values).
_STAT_ELEMENTS = 2**22


def cluster_statistics(
    assignments: np.ndarray, z_corr: np.ndarray, z_orig: np.ndarray
) -> ClusterStatistics:
    """``Nr``, ``C``, ``Y`` and the per-cluster centre and covariance, float64.

    Sums run over chunks of cells in float64 (torch, CPU). The covariance is
    ``cov.wt``'s: with ``w = R[k] / Nr[k]`` and centre ``c = sum_i w_i x_i``,
    ``sum_i w_i (x_i - c)(x_i - c)^T / (1 - sum_i w_i^2)``. Its second moments
    are summed about the mean of all cells ``m`` (not about 0), which keeps
    the subtraction ``S / Nr - (c - m)(c - m)^T`` free of cancellation for
    embeddings far from the origin.

    Parameters
    ----------
    assignments : (N, K) array, R transposed.
    z_corr, z_orig : (N, d) arrays, corrected and uncorrected cells.
    """
    n_cells, n_clusters = assignments.shape
    d = z_corr.shape[1]
    f64 = torch.float64
    mean = torch.zeros(d, dtype=f64)
    chunk = max(1, min(65536, _STAT_ELEMENTS // max(1, d * d)))
    for start in range(0, n_cells, chunk):
        mean += torch.as_tensor(np.asarray(z_orig[start : start + chunk]), dtype=f64).sum(0)
    mean /= n_cells
    sizes = torch.zeros(n_clusters, dtype=f64)
    squares = torch.zeros(n_clusters, dtype=f64)
    sums_corr = torch.zeros((n_clusters, d), dtype=f64)
    sums_orig = torch.zeros((n_clusters, d), dtype=f64)
    moments = torch.zeros((n_clusters, d * d), dtype=f64)
    for start in range(0, n_cells, chunk):
        r = torch.as_tensor(np.asarray(assignments[start : start + chunk]), dtype=f64)
        zc = torch.as_tensor(np.asarray(z_corr[start : start + chunk]), dtype=f64)
        zo = torch.as_tensor(np.asarray(z_orig[start : start + chunk]), dtype=f64) - mean
        sizes += r.sum(0)
        squares += (r * r).sum(0)
        sums_corr.addmm_(r.T, zc)
        sums_orig.addmm_(r.T, zo)
        moments.addmm_(r.T, (zo[:, :, None] * zo[:, None, :]).reshape(zo.shape[0], d * d))
    tiny = torch.finfo(f64).tiny
    safe_sizes = sizes.clamp_min(tiny)
    offset = sums_orig / safe_sizes[:, None]  # c - m
    second = moments.view(n_clusters, d, d) / safe_sizes[:, None, None]
    unbiased = (1 - squares / safe_sizes**2).clamp_min(tiny)
    cov = (second - offset[:, :, None] * offset[:, None, :]) / unbiased[:, None, None]
    cov = (cov + cov.transpose(1, 2)) / 2
    centers = offset + mean
    return ClusterStatistics(
        Nr=sizes.numpy(),
        C=sums_corr.numpy(),
        Y=clu.normalize_rows(sums_corr).T.contiguous().numpy(),
        cluster_center=centers.numpy(),
        cluster_cov=cov.numpy(),
    )
