"""Initial centroids: k-means on the cosine-normalised cells, on the device.

The R package seeds Harmony 1 with ``stats::kmeans(centers = K, nstart = 10,
iter.max = 25)``: ten complete k-means runs, the one with the lowest final
within-cluster sum of squares kept. Harmony2 (R 2.0) runs one k-means++ seeding
and 10 Lloyd iterations. This module does both jobs with k-means++ seeding and
Lloyd iterations written as batched matrix products: the restarts advance side
by side, so ten cost a few times one, not ten. Above ``sample_size`` cells the
restarts run on a random subsample: the starting centroids only need to be
good, and Harmony's own clustering rounds refine them on every cell straight
away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harmonypy.engine.reduce import index_sum_

#: Cells the k-means start works on at most.
SAMPLE_SIZE = 20_000
#: Cells per cluster the restarts compete on (at least 5,000 cells); the winner is
#: then refined on the whole sample. Ten runs on 5,000 cells cost about what one
#: run on 20,000 does; with 25 per cluster a simulation with overlapping types
#: moved more with the seed (worst pair 0.959 against 0.996).
RESTART_CELLS_PER_CLUSTER = 50
RESTART_MIN_CELLS = 5_000
#: Lloyd steps of the refinement, which starts from a converged run.
REFINE_STEPS = 10
#: The greedy start screens its ten runs after this many Lloyd steps and runs
#: only the best few to convergence: on the bundled data and a simulation with
#: overlapping types the seed-to-seed spread equals that of ten complete runs,
#: for 110 run-steps instead of 250 (benchmarks/results/seed_spread.md).
SCREEN_STEPS = 5
SCREEN_SURVIVORS = 3
#: The starts ``run_harmony(kmeans_init=...)`` offers.
KMEANS_INITS = ("greedy", "r")


@dataclass(frozen=True)
class KMeansStart:
    """How the initial k-means runs.

    Attributes
    ----------
    n_init : int
        Independent runs; the lowest final within-cluster sum of squares wins.
    max_iter : int
        Lloyd steps per run at most (a run stops earlier when no cell moves).
    local_trials : int
        k-means++ candidates per centre (1: plain k-means++).
    screen_steps : int
        0: every run goes to convergence (or ``max_iter``), as R's
        ``kmeans(nstart = 10)``. Otherwise all runs take this many Lloyd steps,
        and only the ``survivors`` with the lowest inertia then continue.
    survivors : int
        Runs that continue after the screen.
    """

    n_init: int
    max_iter: int
    local_trials: int = 1
    screen_steps: int = 0
    survivors: int = 1


def start_for(algorithm: str, kmeans_init: str, k: int) -> KMeansStart:
    """The k-means start of ``algorithm`` for ``run_harmony(kmeans_init=...)``.

    ``"r"`` is what the R package does: Harmony 1 (R 1.2.4) ten k-means runs
    of at most 25 steps, the best kept (``kmeans(nstart = 10, iter.max = 25)``;
    R seeds each run with random cells, here with k-means++); Harmony2 (R 2.0)
    one k-means++ seeding and 10 Lloyd steps. ``"greedy"`` (the default) runs
    ten k-means runs from greedy k-means++ seedings (2 + ln k candidates per
    centre, as scikit-learn), screened after ``SCREEN_STEPS`` Lloyd steps, the
    best ``SCREEN_SURVIVORS`` run to convergence: measured on the bundled data
    it moves the least with the seed (benchmarks/bench_seed_spread.py).
    """
    if kmeans_init == "greedy":
        return KMeansStart(
            n_init=10,
            max_iter=25,
            local_trials=2 + int(math.log(k)),
            screen_steps=SCREEN_STEPS,
            survivors=SCREEN_SURVIVORS,
        )
    if algorithm == "harmony2":
        return KMeansStart(n_init=1, max_iter=10)
    return KMeansStart(n_init=10, max_iter=25)


def _sq_distances(x: torch.Tensor, sq_norms: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared distances (m, n) from each of m centres (m, d) to the rows of ``x``."""
    c_norms = (centers * centers).sum(-1)
    return (
        torch.addmm(sq_norms[None, :], centers, x.T, alpha=-2).add_(c_norms[:, None]).clamp_min_(0)
    )


def _kmeans_plusplus(
    x: torch.Tensor, k: int, *, generator: torch.Generator, n_seedings: int, local_trials: int
) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on rows of ``x`` (n x d).

    ``n_seedings`` independent seedings advance together, so each of the k
    steps costs a handful of batched operations instead of a Python loop per
    seeding. With ``local_trials`` > 1 each step draws that many candidates
    by D^2 sampling and keeps the one that lowers the seeding's total squared
    distance most ("greedy" k-means++, as scikit-learn does with
    2 + ln k trials): fewer poor starts, so less dependence on the seed.

    Returns
    -------
    centers : (n_seedings, k, d) tensor.
    """
    n, d = x.shape
    runs = torch.arange(n_seedings, device=x.device)
    # All random numbers up front, from the caller's generator only.
    first = torch.randint(n, (n_seedings,), generator=generator)
    uniform = torch.rand((n_seedings, k, local_trials), generator=generator, dtype=torch.float64)
    fallback = torch.randint(n, (n_seedings, k, local_trials), generator=generator)
    centers = torch.empty((n_seedings, k, d), dtype=x.dtype, device=x.device)
    sq_norms = (x * x).sum(1)
    centers[:, 0] = x[first.to(x.device)]
    closest = _sq_distances(x, sq_norms, centers[:, 0])  # (n_seedings, n)
    for j in range(1, k):
        # D^2 sampling by inverting the cumulative weights: far cheaper than
        # torch.multinomial on long vectors.
        cumulative = torch.cumsum(closest.double(), 1)
        total = cumulative[:, -1:]
        target = uniform[:, j].to(x.device) * total  # (n_seedings, trials)
        picks = torch.searchsorted(cumulative, target, right=True).clamp_max_(n - 1)
        # Fewer distinct points than clusters: any point will do.
        picks = torch.where(total > 0, picks, fallback[:, j].to(x.device))
        candidates = x[picks.reshape(-1)]  # (n_seedings * trials, d)
        dist = _sq_distances(x, sq_norms, candidates).view(n_seedings, local_trials, n)
        torch.minimum(dist, closest[:, None, :], out=dist)
        if local_trials > 1:
            best = dist.double().sum(2).argmin(1)
        else:
            best = torch.zeros(n_seedings, dtype=torch.long, device=x.device)
        centers[runs, j] = x[picks[runs, best]]
        closest = dist[runs, best]
    return centers


def _lloyd(
    x: torch.Tensor, centers: torch.Tensor, *, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations of several k-means runs side by side.

    Every step scores each cell against every centroid of every run still
    moving in one matrix product (n x runs*k), then sums each run's clusters
    in a fixed order; a run stops on its own when no cell changes cluster
    (or after ``max_iter`` steps) and drops out of the product.

    Parameters
    ----------
    x : (n, d) tensor
    centers : (runs, k, d) tensor
        Starting centroids of each run.

    Returns
    -------
    centers : (runs, k, d) tensor
        Final centroids; an empty cluster keeps its previous centroid.
    inertia : (runs,) float64 tensor
        Each run's within-cluster sum of squared distances at its final
        centroids.
    """
    runs, k, d = centers.shape
    n = x.shape[0]
    centers = centers.clone()
    labels = torch.full((runs, n), -1, dtype=torch.long, device=x.device)
    active = torch.arange(runs, device=x.device)
    for _ in range(max_iter):
        new_labels = _nearest(x, centers[active]).T  # (active, n)
        moving = (new_labels != labels[active]).any(1)
        labels[active] = new_labels
        active, new_labels = active[moving], new_labels[moving]
        if len(active) == 0:
            break
        sums = torch.stack([_cluster_sums(x, run_labels, k) for run_labels in new_labels])
        counts = torch.stack([torch.bincount(run_labels, minlength=k) for run_labels in new_labels])
        counts = counts.to(x.dtype)[..., None]
        # An empty cluster keeps its previous centroid instead of becoming NaN.
        centers[active] = torch.where(counts > 0, sums / counts.clamp_min(1), centers[active])
    sq_norms = (x * x).sum(1, dtype=torch.float64)
    best = _scores(x, centers).view(n, runs, k).max(2).values.double()
    inertia = (sq_norms[:, None] - 2 * best).clamp_min(0).sum(0)
    return centers, inertia


def _scores(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """x.c - |c|^2 / 2 for every cell and every centroid of every run: (n, runs * k).

    The nearest centroid maximises it (||x - c||^2 = |x|^2 - 2 (x.c - |c|^2 / 2)).
    """
    flat = centers.reshape(-1, centers.shape[-1])
    return torch.addmm((flat * flat).sum(1).mul_(-0.5)[None, :], x, flat.T)


def _nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Each cell's nearest centroid in each run: (n, runs) int64."""
    runs, k, _ = centers.shape
    # max(...).indices: about twice as fast as argmax on the CPU.
    return _scores(x, centers).view(x.shape[0], runs, k).max(2).indices


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the rows of ``x`` (n, d) in each of ``k`` clusters: (k, d).

    On the CPU ``scatter_add_`` sums in row order and is ~5x faster than
    ``index_add_`` here; elsewhere ``index_sum_`` keeps the order fixed.
    """
    out = torch.zeros((k, x.shape[1]), dtype=x.dtype, device=x.device)
    if x.device.type == "cpu":
        return out.scatter_add_(0, labels[:, None].expand(-1, x.shape[1]), x)
    return index_sum_(out, labels, x)


def kmeans_centroids(
    x: torch.Tensor,
    k: int,
    *,
    generator: torch.Generator,
    start: KMeansStart,
    sample_size: int = SAMPLE_SIZE,
    norms: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """k-means on the rows of ``x``: complete runs side by side, the lowest final inertia kept.

    Parameters
    ----------
    x : Tensor of shape (n_cells, d)
    k : int
        Number of clusters.
    generator : torch.Generator
        CPU generator that makes the start reproducible.
    start : KMeansStart
        Runs, their Lloyd steps and the seeding's candidates per centre. With
        several runs they compete on at most :func:`restart_cells` of the
        cells (50 per cluster), and the winner is refined on all of them
        (up to ``REFINE_STEPS`` Lloyd steps).
    sample_size : int
        Above this many cells k-means sees a random sample of them.
    norms : (n_cells,) tensor, optional
        Divide each row of ``x`` by its entry first (the engine passes Z_corr
        and its norms: k-means then runs on the unit-length cells, and only
        the sampled ones are ever normalised).
    order : (n_cells,) int64 tensor, optional
        A permutation of the rows: the seeding and the sample see ``x[order]``
        (the engine passes the cells sorted by batch, so a seed gives the same
        start whatever order the cells came in).

    Returns
    -------
    Tensor of shape (k, d)
        Centroids of the best run (not normalised).
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
    restart_rows = None
    restart_size = restart_cells(k)
    if start.n_init > 1 and x.shape[0] > restart_size:
        restart_rows = torch.randperm(x.shape[0], generator=generator)[:restart_size].to(x.device)
    candidates = x if restart_rows is None else x.index_select(0, restart_rows)
    seedings = _kmeans_plusplus(
        candidates, k, generator=generator, n_seedings=start.n_init, local_trials=start.local_trials
    )
    centers, inertia = _screened_lloyd(candidates, seedings, start)
    best = centers[int(torch.argmin(inertia))]
    if restart_rows is None:
        return best
    return _lloyd(x, best[None], max_iter=REFINE_STEPS)[0][0]


def _screened_lloyd(
    x: torch.Tensor, seedings: torch.Tensor, start: KMeansStart
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd runs from ``seedings``; with a screen, only the best few go on.

    The screen ranks runs by their inertia after ``start.screen_steps`` steps
    (ties: the earlier run); the survivors, in their original order, continue for the
    remaining steps.
    A run that had already converged stops after one unchanged step.
    """
    n_runs = seedings.shape[0]
    if not start.screen_steps or n_runs <= start.survivors:
        return _lloyd(x, seedings, max_iter=start.max_iter)
    centers, inertia = _lloyd(x, seedings, max_iter=start.screen_steps)
    # Survivors keep their order, so a final tie still goes to the earlier run.
    keep = torch.argsort(inertia, stable=True)[: start.survivors].sort().values.to(x.device)
    return _lloyd(x, centers[keep], max_iter=start.max_iter - start.screen_steps)


def restart_cells(k: int) -> int:
    """Cells the restarts of a ``k``-cluster start compete on, at most."""
    return max(RESTART_MIN_CELLS, RESTART_CELLS_PER_CLUSTER * k)
