"""Soft k-means with a diversity penalty: the clustering step of Harmony.

Layout: the engine keeps cells in rows. ``assignments`` is R transposed
(N x K), ``observed`` is O transposed (B x K); the public attributes turn them
back into the R package's orientation.

Two facts keep the memory at one N x K matrix:

* R's ``_scale_dist`` (softmax of -dist / sigma) depends on one cell only, so it
  is computed block by block, inside the online update, from the centroids.
* The objective's distance and entropy terms are sums over the cells of a block
  and are accumulated while that block is in hand; the cross-entropy term only
  needs O and E (sum_i R_ki Phi_bi = O_kb), never an N-wide pass.

The online update itself (R's ``update_R``, block by block) is in
:mod:`harmonypy.engine.online`; this module holds what it and the rest of the
engine share: the counts, the diversity terms, the row norms, the centroids,
the level sums, the plain soft assignment and R's blocks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from harmonypy.engine.objective import ObjectiveSums
from harmonypy.engine.reduce import LOCAL, Reduction, index_sum_


@dataclass
class ClusterStats:
    """Running batch-by-cluster counts, kept in float64 (float32 on MPS).

    observed : (B, K) tensor, ``O`` transposed: sum of R over the cells of each level.
    cluster_sizes : (K,) tensor, sum of R over all cells; ``E = Pr_b x cluster_sizes``.
    """

    observed: torch.Tensor
    cluster_sizes: torch.Tensor

    @classmethod
    def from_observed(cls, observed: torch.Tensor, first_levels: int) -> ClusterStats:
        """From O (B, K) alone: the first ``first_levels`` levels (the first
        variable's) partition the cells, so their sums are the cluster sizes."""
        return cls(observed=observed, cluster_sizes=observed[:first_levels].sum(0))

    def expected(self, proportions: torch.Tensor) -> torch.Tensor:
        """``E`` transposed, (B, K)."""
        return proportions[:, None] * self.cluster_sizes[None, :]


# Diversity terms: (O, E) -> ratio whose power theta scales a cell's assignment.
def diversity_harmony1(
    observed: torch.Tensor, expected: torch.Tensor, delta: float = 0.0
) -> torch.Tensor:
    """``E / (O + E)`` (R harmony 1.x).

    The running sums O and E of a cluster whose cells are all in the block being
    updated come back as rounding noise around 0 (exactly 0 with
    ``block_size=1``), where the ratio is 0/0. They are clamped at 0 and a
    ``delta`` far below any real count (a few ulps of N) is added to both
    sides, so such a cluster gets no penalty instead of NaN; elsewhere the
    ratio changes by about 1e-13.
    """
    observed = observed.clamp_min(0)
    expected = expected.clamp_min(0)
    return (expected + delta) / (observed + expected + delta)


def diversity_harmony2(observed: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """``(2E + 1) / (O + E + 1)`` (R harmony 2.x)."""
    return (2 * expected + 1) / (observed + expected + 1)


def cross_entropy_harmony1(observed, expected):
    """Per (level, cluster) factor of the objective's cross term, harmony 1.x."""
    observed = observed.clamp_min(0)
    expected = expected.clamp_min(torch.finfo(expected.dtype).tiny)
    return torch.xlogy(observed, (observed + expected) / expected)


def cross_entropy_harmony2(observed, expected):
    return torch.xlogy(observed, (observed + expected + 1) / (2 * expected + 1))


def penalty_terms(
    algorithm: str, n_total: int, stat_dtype: torch.dtype
) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """The algorithm's ``(diversity, cross_entropy)`` functions of (O, E).

    Harmony 1's ratio gets the guard ``delta`` (64 ulp of the run's N cells,
    see :func:`diversity_harmony1`)."""
    if algorithm == "harmony2":
        return diversity_harmony2, cross_entropy_harmony2
    delta = 64 * torch.finfo(stat_dtype).eps * n_total
    return functools.partial(diversity_harmony1, delta=delta), cross_entropy_harmony1


def normalize_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scale each row to unit L2 norm (a zero row stays zero), into ``out`` if given."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return torch.div(x, norms.clamp_min(torch.finfo(x.dtype).tiny), out=out)


#: Rows whose norms are taken and clamped at once by :func:`row_norms`: the
#: pass then reads each row once and the clamp runs on numbers still in cache.
NORM_CHUNK_ROWS = 65536


def row_norms(
    x: torch.Tensor, out: torch.Tensor | None = None, chunk: int = NORM_CHUNK_ROWS
) -> torch.Tensor:
    """(N,) L2 norms of the rows of ``x``, at least the dtype's ``tiny``, into ``out``.

    Dividing a row by its entry gives the row of :func:`normalize_rows` exactly
    (same norm, same clamp, same division), so the engine keeps these N
    numbers instead of a unit-length copy of the embedding.
    """
    if out is None:
        out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    tiny = torch.finfo(x.dtype).tiny
    for start in range(0, x.shape[0], chunk):
        part = out[start : start + chunk]
        torch.linalg.vector_norm(x[start : start + chunk], dim=1, out=part)
        part.clamp_min_(tiny)
    return out


def unit_rows(
    z: torch.Tensor, norms: torch.Tensor, cells=None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``cells`` (an index tensor or a slice; all by default) of ``z``
    divided by their ``norms``: those rows of the unit-length embedding."""
    if cells is None or isinstance(cells, slice):
        rows = z if cells is None else z[cells]
        scale = norms if cells is None else norms[cells]
    else:
        rows = torch.index_select(z, 0, cells, out=out)
        scale = norms.index_select(0, cells)
        return rows.div_(scale[:, None])
    return torch.div(rows, scale[:, None], out=out)


def compute_centroids(
    assignments: torch.Tensor,
    z: torch.Tensor,
    rows: torch.Tensor | None = None,
    chunk: int = 16384,
    norms: torch.Tensor | None = None,
    reduction: Reduction = LOCAL,
) -> torch.Tensor:
    """``Y`` transposed (K x d): R-weighted means of the cells, unit length.

    ``z`` holds unit-length cells, or, with ``norms`` (N,), cells whose rows
    are divided by ``norms`` as they are read. ``rows`` (N,) gives the cell
    (row of ``z``) held by each row of ``assignments`` when they are not in
    the same order. ``reduction`` adds the sums of the other processes'
    cells (a distributed run) before they are normalised.
    """
    if rows is None and norms is None:
        sums = assignments.T @ z
        reduction.sum_(sums)
        return normalize_rows(sums)
    sums = torch.zeros((assignments.shape[1], z.shape[1]), dtype=z.dtype, device=z.device)
    buffer = torch.empty((min(chunk, z.shape[0]), z.shape[1]), dtype=z.dtype, device=z.device)
    for start in range(0, assignments.shape[0], chunk):
        part = slice(start, start + chunk)
        n = assignments[part].shape[0]
        cells = part if rows is None else rows[part]
        if norms is None:
            assert isinstance(cells, torch.Tensor)  # rows given: both None returned above
            block = torch.index_select(z, 0, cells, out=buffer[:n])
        else:
            block = unit_rows(z, norms, cells, out=buffer[:n])
        sums.addmm_(assignments[part].T, block)
    reduction.sum_(sums)
    return normalize_rows(sums)


def level_sums(
    values: torch.Tensor,
    codes: torch.Tensor,
    n_levels: int,
    acc_dtype: torch.dtype | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """Sum the rows of ``values`` (n x K) per level; ``codes`` is (n, V).

    With ``acc_dtype`` (float64) each ``chunk`` of rows is summed in the
    values' dtype and the chunk's sums are added to totals in ``acc_dtype``:
    a float32 running sum over the 150,000 cells of a level at 10M cells drops
    the small entries of R below its rounding step and comes out 1.6e-4 too
    low (5e-6 at 1M cells; 2.7e-3 for 2 million cells in one level); chunked,
    the error stays that of 4,096 cells (5e-7) whatever the size, at the speed
    of the float32 sum.
    """
    dtype = values.dtype if acc_dtype is None else acc_dtype
    out = torch.zeros((n_levels, values.shape[1]), dtype=dtype, device=values.device)
    chunk = max(chunk, 16 * n_levels)  # adding the chunk sums stays a small part
    if dtype == values.dtype or values.shape[0] <= chunk:
        part = out if dtype == values.dtype else torch.zeros_like(out, dtype=values.dtype)
        for v in range(codes.shape[1]):
            index_sum_(part, codes[:, v], values)
        return out if part is out else out.add_(part)
    part = torch.empty((n_levels, values.shape[1]), dtype=values.dtype, device=values.device)
    for start in range(0, values.shape[0], chunk):
        part.zero_()
        for v in range(codes.shape[1]):
            index_sum_(part, codes[start : start + chunk, v], values[start : start + chunk])
        out += part
    return out


#: Cells per chunk of a fresh soft assignment.
SOFT_ASSIGN_CHUNK = 8192


def soft_assign(
    z_cos: torch.Tensor,
    centroids: torch.Tensor,
    sigma: torch.Tensor,
    objective: bool = False,
    out: torch.Tensor | None = None,
    chunk: int = SOFT_ASSIGN_CHUNK,
    norms: torch.Tensor | None = None,
    reduction: Reduction = LOCAL,
) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """R transposed (N x K) as a softmax over clusters of ``-dist / sigma``.

    ``out`` (N, K), if given, receives the assignments: reusing the previous
    R's memory spares the page faults of a fresh allocation. ``z_cos`` holds
    unit-length cells, or, with ``norms`` (N,), cells divided by ``norms``
    chunk by chunk as they are read. (The fused CPU path has its own:
    :func:`harmonypy.engine.fused.reassign`.)

    Returns
    -------
    assignments : (N, K) tensor.
    terms : ``(sum R * dist, sum_k sigma_k sum_i R_ki log R_ki)`` for these
        assignments with ``objective=True`` (from the logits in hand, see
        :class:`ObjectiveSums`), else None; summed over every process's
        cells by ``reduction``.
    """
    if out is None:
        out = torch.empty(
            (z_cos.shape[0], centroids.shape[0]), dtype=z_cos.dtype, device=z_cos.device
        )
    inv_sigma = 1.0 / sigma.to(z_cos.dtype)
    sums = ObjectiveSums(sigma, sigma.dtype) if objective else None
    # -dist / sigma = (2 z.Y - 2) / sigma, into one reused chunk buffer.
    scaled_centroids_t = (centroids * (2 * inv_sigma)[:, None]).T
    buffer = torch.empty(
        (min(chunk, z_cos.shape[0]), centroids.shape[0]), dtype=z_cos.dtype, device=z_cos.device
    )
    z_buffer = (
        None
        if norms is None
        else torch.empty(
            (min(chunk, z_cos.shape[0]), z_cos.shape[1]), dtype=z_cos.dtype, device=z_cos.device
        )
    )
    for start in range(0, z_cos.shape[0], chunk):
        z_part = z_cos[start : start + chunk]
        if norms is not None and z_buffer is not None:  # z_buffer: allocated with norms
            z_part = unit_rows(
                z_cos, norms, slice(start, start + chunk), out=z_buffer[: z_part.shape[0]]
            )
        logits = buffer[: z_part.shape[0]]
        torch.addmm(-2 * inv_sigma, z_part, scaled_centroids_t, out=logits)
        r = torch.softmax(logits, dim=1, out=out[start : start + chunk])
        if sums is not None:  # no penalty here: its sums stay 0
            sums.add_piece(r, logits)
    return out, None if sums is None else sums.terms(reduction)


def n_blocks_of(n_cells: int, block_size: float) -> int:
    """Number of blocks R's ``update_R`` runs: ``ceil(1 / block_size)``, at most N.

    A block holds at least one cell, so beyond N blocks the rest would be empty:
    any ``block_size`` below ``1 / N`` gives the N one-cell blocks of
    ``1 / N`` (and costs no more: nothing loops over the empty ones).
    """
    inverse = 1.0 / block_size  # inf for a subnormal block_size: fine below
    # The small tolerance keeps 1 / 0.05 at 20 blocks despite rounding.
    if inverse - 1e-9 >= n_cells:
        return max(1, n_cells)
    return max(1, math.ceil(inverse - 1e-9))


def block_bounds(
    n_cells: int, block_size: float, n_blocks: int | None = None
) -> list[tuple[int, int]]:
    """R's blocks: ceil(1 / block_size) blocks of floor(N * block_size) cells.

    The last block takes the remaining cells; with very small N a block holds at
    least one cell and empty blocks are dropped (so there are at most N blocks,
    whatever ``block_size``: see :func:`n_blocks_of`).

    ``n_blocks`` (a distributed run: the blocks of all the cells, this process
    holding ``n_cells`` of them) gives exactly that many blocks, each of
    ``floor(n_cells * block_size)`` of this process's cells, the last taking
    the rest; some may be empty. Every process then runs the same blocks, and
    block j of the whole run is the union of every process's block j.
    """
    if n_blocks is not None:
        per_block = int(n_cells * block_size)
        bounds = [
            (min(j * per_block, n_cells), min((j + 1) * per_block, n_cells))
            for j in range(n_blocks)
        ]
        bounds[-1] = (bounds[-1][0], n_cells)
        return bounds
    n_blocks = n_blocks_of(n_cells, block_size)
    per_block = max(1, int(n_cells * block_size))
    starts = range(0, min(n_blocks * per_block, n_cells), per_block)
    bounds = [(start, start + per_block) for start in starts]
    if bounds:  # the last block takes the remaining cells
        bounds[-1] = (bounds[-1][0], n_cells)
    return bounds


def cross_term(stats: ClusterStats, proportions, theta, sigma, cross_fn: Callable) -> float:
    """``sum_k sigma_k sum_b theta_b O_kb log(...)`` from the counts alone."""
    per_cell = cross_fn(stats.observed, stats.expected(proportions))
    return float((per_cell * theta[:, None] * sigma[None, :]).sum())
