"""The k-means start of a distributed run: one sample of all the processes' cells.

A function of the run's state rather than a ``Harmony`` method, so that the
engine holds no collective calls of its own beyond its ``Reduction``:
``Harmony.init_cluster`` calls it only when the run is distributed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harmonypy.engine import clustering as clu
from harmonypy.engine.kmeans import SAMPLE_SIZE, KMeansStart, kmeans_centroids
from harmonypy.engine.online import CellRows
from harmonypy.engine.reduce import Reduction


def distributed_kmeans(
    cells: CellRows,
    *,
    order: torch.Tensor,
    n_clusters: int,
    start: KMeansStart,
    generator: torch.Generator,
    seed: int,
    n_total: int,
    reduction: Reduction,
) -> torch.Tensor:
    """The initial centroids (K, d) of a distributed run, the same on every process.

    Each process draws its share of the sample (``SAMPLE_SIZE`` cells in
    all, in proportion to the cells it holds; all of them when the run has
    fewer) from its own ``generator``; the unit-length rows are gathered in
    rank order and every process runs the same k-means on them, with the
    generator of rank 0 (each process replays rank 0's draw from ``seed`` to
    reach the same state); rank 0's centroids are broadcast. So the start is
    deterministic for a given seed and world size, and a group of one
    process draws exactly what a single-process run draws.

    ``cells``: this process's cells (Z_corr and its row norms); ``order``:
    the cells sorted by their first batch variable's level, the order a
    single-process run samples them in; ``n_total``: the cells of all processes.
    """
    n_local = cells.z.shape[0]
    sampled = n_total > SAMPLE_SIZE
    if sampled:
        share = min(n_local, math.ceil(SAMPLE_SIZE * n_local / n_total))
        rows = torch.randperm(n_local, generator=generator)[:share]
    else:
        rows = torch.arange(n_local)
    rows = order.index_select(0, rows.to(cells.z.device))
    local = clu.unit_rows(cells.z, cells.norms, rows).cpu().numpy()
    gathered = reduction.all_gather((n_local, local))
    sample = torch.from_numpy(np.concatenate([part for _, part in gathered]))
    if reduction.rank != 0:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        if sampled:  # rank 0 drew its share of the sample first
            torch.randperm(gathered[0][0], generator=generator)
    centers = kmeans_centroids(
        sample.to(cells.z.device),
        n_clusters,
        generator=generator,
        start=start,
        sample_size=sample.shape[0],
    )
    return reduction.broadcast_(centers.contiguous(), src=0)
