"""Initial centroids: k-means on the cosine-normalised cells, on the device.

The R package seeds Harmony with ``stats::kmeans(centers = K, nstart = 10,
iter.max = 25)``. This module does the same job with k-means++ seeding and Lloyd
iterations written as matrix products, so it runs wherever the rest runs. Above
``sample_size`` cells the restarts run on a random subsample: the starting
centroids only need to be good, and Harmony's own clustering rounds refine them
on every cell straight away.
"""

from __future__ import annotations

import torch


def _kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on rows of ``x`` (n x d)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = torch.empty((k, x.shape[1]), dtype=x.dtype, device=x.device)
    centers[0] = x[first]
    sq_norms = (x * x).sum(1)
    closest = (sq_norms - 2 * x @ centers[0] + sq_norms[first]).clamp_min_(0)
    for j in range(1, k):
        # D^2 sampling by inverting the cumulative weights: far cheaper than
        # torch.multinomial on a long vector.
        cumulative = torch.cumsum(closest.double(), 0)
        total = float(cumulative[-1])
        if total <= 0:  # fewer distinct points than clusters: take any point
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            target = float(torch.rand((), generator=generator, dtype=torch.float64)) * total
            target_t = torch.tensor([target], dtype=torch.float64, device=cumulative.device)
            pick = min(int(torch.searchsorted(cumulative, target_t, right=True)), n - 1)
        centers[j] = x[pick]
        dist = (sq_norms - 2 * x @ centers[j] + sq_norms[pick]).clamp_min_(0)
        torch.minimum(closest, dist, out=closest)
    return centers


def _lloyd(x: torch.Tensor, centers: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, float]:
    """Lloyd iterations from ``centers``; returns the centroids and their inertia."""
    k = centers.shape[0]
    labels = None
    for _ in range(max_iter):
        # argmin ||x - c||^2 == argmax (x.c - |c|^2 / 2)
        score = x @ centers.T - 0.5 * (centers * centers).sum(1)
        new_labels = score.argmax(1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        filled = counts > 0
        # An empty cluster keeps its previous centroid instead of becoming NaN.
        centers = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], centers)
    return centers, _inertia(x, centers)


def _inertia(x: torch.Tensor, centers: torch.Tensor) -> float:
    score = x @ centers.T - 0.5 * (centers * centers).sum(1)
    return float(((x * x).sum(1) - 2 * score.max(1).values).sum())


def kmeans_centroids(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    n_init: int = 10,
    max_iter: int = 25,
    sample_size: int = 20_000,
) -> torch.Tensor:
    """k-means on the rows of ``x``: best of ``n_init`` k-means++ seedings, then Lloyd.

    Parameters
    ----------
    x : Tensor of shape (n_cells, d)
    k : int
        Number of clusters.
    generator : torch.Generator
        CPU generator that makes the seeding reproducible.

    Returns
    -------
    Tensor of shape (k, d)
        Centroids (not normalised).
    """
    n = x.shape[0]
    if n > sample_size:
        rows = torch.randperm(n, generator=generator)[:sample_size].to(x.device)
        x = x.index_select(0, rows)
    # Restarts compete on the k-means++ seeding's own inertia; Lloyd then runs
    # once, from the best seeding. Harmony refines the centroids anyway, and
    # this keeps the initialisation a small part of the run at any size.
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        centers = _kmeans_plusplus(x, k, generator)
        inertia = _inertia(x, centers)
        if inertia < best_inertia:
            best, best_inertia = centers, inertia
    centers, _ = _lloyd(x, best, max_iter)
    return centers
