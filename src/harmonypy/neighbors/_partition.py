"""Partition of cells into lists: nearest centroid and a quick k-means.

Both indexes of this package (the pruned exact search and the IVF search)
only need *a* partition, not a good clustering: the pruned search stays exact
whatever the centroids, and the IVF's recall is set by the lists it probes.
So the k-means here is a few Lloyd steps on a random subsample from random
cells.  The engine's ``kmeans_centroids`` is not used: its k-means++ seeding
takes one pass over the cells per centre (thousands of lists here) and its
Lloyd step holds a cells x centres block at once (64,000 x 4,000 float32 =
1 GB for the IVF of 1,000,000 cells), where this needs neither: for the
1,265 lists of 100,000 cells it took 12.3 s against 2.5 s here (same run).
"""

from __future__ import annotations

import torch

#: Distances (query rows x centroids) held at once by :func:`nearest_centroid`
#: (32 MB of float32).
NEAREST_ELEMENTS = 2**23
#: Cells per cluster in :func:`sample_kmeans`'s subsample, and its Lloyd steps.
KMEANS_SAMPLE = 16
KMEANS_STEPS = 4


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest centroid, in ``x``'s float type, chunked.

    Parameters
    ----------
    x : torch.Tensor, shape (n, d)
    centroids : torch.Tensor, shape (k, d), same dtype and device as ``x``

    Returns
    -------
    torch.Tensor of int64, shape (n,), on ``x``'s device
    """
    c_sq = (centroids * centroids).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    step = max(1, NEAREST_ELEMENTS // max(1, centroids.shape[0]))
    for start in range(0, x.shape[0], step):
        dist = torch.addmm(c_sq[None, :], x[start : start + step], centroids.T, alpha=-2.0)
        out[start : start + step] = dist.argmin(1)
    return out


def sample_kmeans(
    x: torch.Tensor, n_clusters: int, *, generator: torch.Generator, n_iter: int = KMEANS_STEPS
) -> torch.Tensor:
    """Lloyd's k-means on a random subsample from random cells; the centroids.

    A subsample of ~:data:`KMEANS_SAMPLE` cells per cluster and a few steps
    suffice for a partition.  An empty cluster keeps its previous centroid.

    Parameters
    ----------
    x : torch.Tensor of float32, shape (n_cells, n_dims), on the CPU
    n_clusters : int
    generator : torch.Generator
        Local generator (the global RNG is not used).
    n_iter : int

    Returns
    -------
    torch.Tensor of float32, shape (n_clusters, n_dims)
    """
    n = x.shape[0]
    m = min(n, max(n_clusters, KMEANS_SAMPLE * n_clusters))
    S = x[torch.randperm(n, generator=generator)[:m]]
    cent = S[:n_clusters].clone()  # random distinct cells as the first centroids
    for _ in range(n_iter):
        assign = nearest_centroid(S, cent)
        counts = torch.bincount(assign, minlength=n_clusters)
        sums = torch.zeros_like(cent).index_add_(0, assign, S)
        filled = counts > 0
        cent[filled] = sums[filled] / counts[filled].unsqueeze(1).to(sums.dtype)
    return cent
