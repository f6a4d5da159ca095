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

from harmonypy._reduce import index_sum_


def _kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator,
                     n_seedings: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on rows of ``x`` (n x d).

    ``n_seedings`` independent seedings advance together, so each of the k
    steps costs a handful of batched operations instead of a Python loop per
    seeding.

    Returns
    -------
    centers : (n_seedings, k, d) tensor.
    inertia : (n_seedings,) float64 tensor, each seeding's sum of squared
        distances to its nearest centre (the seeding tracks them anyway).
    """
    n, d = x.shape
    runs = torch.arange(n_seedings)
    # All random numbers up front, from the caller's generator only.
    first = torch.randint(n, (n_seedings,), generator=generator)
    uniform = torch.rand((n_seedings, k), generator=generator, dtype=torch.float64)
    fallback = torch.randint(n, (n_seedings, k), generator=generator)
    centers = torch.empty((n_seedings, k, d), dtype=x.dtype, device=x.device)
    sq_norms = (x * x).sum(1)
    picks = first.to(x.device)
    centers[:, 0] = x[picks]
    closest = (sq_norms[None, :] - 2 * centers[:, 0] @ x.T
               + sq_norms[picks][:, None]).clamp_min_(0)
    for j in range(1, k):
        # D^2 sampling by inverting the cumulative weights: far cheaper than
        # torch.multinomial on long vectors.
        cumulative = torch.cumsum(closest.double(), 1)
        total = cumulative[:, -1]
        target = (uniform[:, j].to(x.device) * total)[:, None]
        picks = torch.searchsorted(cumulative, target, right=True)[:, 0].clamp_max_(n - 1)
        # Fewer distinct points than clusters: any point will do.
        picks = torch.where(total > 0, picks, fallback[:, j].to(x.device))
        centers[runs, j] = x[picks]
        dist = (sq_norms[None, :] - 2 * centers[:, j] @ x.T
                + sq_norms[picks][:, None]).clamp_min_(0)
        torch.minimum(closest, dist, out=closest)
    return centers, closest.double().sum(1)


def _lloyd(x: torch.Tensor, centers: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Lloyd iterations from ``centers``; returns the centroids."""
    k = centers.shape[0]
    labels = None
    for _ in range(max_iter):
        # argmin ||x - c||^2 == argmax (x.c - |c|^2 / 2)
        score = torch.addmm(-0.5 * (centers * centers).sum(1), x, centers.T)
        new_labels = score.argmax(1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = index_sum_(torch.zeros_like(centers), labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        filled = counts > 0
        # An empty cluster keeps its previous centroid instead of becoming NaN.
        centers = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], centers)
    return centers


def kmeans_centroids(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    n_init: int = 10,
    max_iter: int = 25,
    sample_size: int = 20_000,
    norms: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """k-means on the rows of ``x``: best of ``n_init`` k-means++ seedings, then Lloyd.

    Parameters
    ----------
    x : Tensor of shape (n_cells, d)
    k : int
        Number of clusters.
    generator : torch.Generator
        CPU generator that makes the seeding reproducible.
    norms : (n_cells,) tensor, optional
        Divide each row of ``x`` by its entry first (the engine passes Z_corr
        and its norms: k-means then runs on the unit-length cells, and only
        the sampled ones are ever normalised).
    order : (n_cells,) int64 tensor, optional
        A permutation of the rows: the seeding and the sample see ``x[order]``
        (the engine passes the cells sorted by batch, the order earlier
        versions stored them in, so a seed gives the same start as there).

    Returns
    -------
    Tensor of shape (k, d)
        Centroids (not normalised).
    """
    n = x.shape[0]
    rows = None
    if n > sample_size:
        rows = torch.randperm(n, generator=generator)[:sample_size].to(x.device)
        if order is not None:
            rows = order.index_select(0, rows)
    elif order is not None:
        rows = order
    if rows is not None:
        x = x.index_select(0, rows)
        if norms is not None:
            x = x.div_(norms.index_select(0, rows)[:, None])
    elif norms is not None:
        x = x / norms[:, None]
    # Restarts compete on the k-means++ seeding's own inertia; Lloyd then runs
    # once, from the best seeding. Harmony refines the centroids anyway, and
    # this keeps the initialisation a small part of the run at any size.
    seedings, inertias = _kmeans_plusplus(x, k, generator, n_seedings=n_init)
    best = seedings[int(torch.argmin(inertias))]
    return _lloyd(x, best, max_iter)
