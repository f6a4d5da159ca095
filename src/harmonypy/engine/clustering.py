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

And one keeps the time near a single pass over R per clustering round: inside
a block, cells are independent (O and E change once per block), so a block is
processed in cache-sized pieces, and everything that needs the new rows — the
batch sums, the objective's terms, Harmony 1's next centroid sums and the next
round's removals — is taken from each piece while it is in cache.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from harmonypy.engine import threads as _threads
from harmonypy.engine.reduce import LOCAL, Reduction, index_sum_


@dataclass
class ClusterStats:
    """Running batch-by-cluster counts, kept in float64 (float32 on MPS).

    observed : (B, K) tensor, ``O`` transposed: sum of R over the cells of each level.
    cluster_sizes : (K,) tensor, sum of R over all cells; ``E = Pr_b x cluster_sizes``.
    """

    observed: torch.Tensor
    cluster_sizes: torch.Tensor

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


def soft_assign(
    z_cos: torch.Tensor,
    centroids: torch.Tensor,
    sigma: torch.Tensor,
    objective: bool = False,
    out: torch.Tensor | None = None,
    chunk: int = 8192,
    norms: torch.Tensor | None = None,
    reduction: Reduction = LOCAL,
) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """R transposed (N x K) as a softmax over clusters of ``-dist / sigma``.

    ``out`` (N, K), if given, receives the assignments: reusing the previous
    R's memory spares the page faults of a fresh allocation. ``z_cos`` holds
    unit-length cells, or, with ``norms`` (N,), cells divided by ``norms``
    chunk by chunk as they are read.

    Returns
    -------
    assignments : (N, K) tensor.
    terms : ``(sum R * dist, sum_k sigma_k sum_i R_ki log R_ki)`` for these
        assignments with ``objective=True`` (from the logits in hand, see
        :class:`_ObjectiveSums`), else None; summed over every process's
        cells by ``reduction``.
    """
    if out is None:
        out = torch.empty(
            (z_cos.shape[0], centroids.shape[0]), dtype=z_cos.dtype, device=z_cos.device
        )
    inv_sigma = 1.0 / sigma.to(z_cos.dtype)
    sums = _ObjectiveSums(sigma, sigma.dtype) if objective else None
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
        if norms is not None:
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


def _block_of_rows(order: torch.Tensor, bounds) -> torch.Tensor:
    """(N,) block index of each row of R, for an update in ``order``."""
    sizes = torch.tensor([end - start for start, end in bounds], device=order.device)
    block_of = torch.empty_like(order)
    block_of[order[: int(sizes.sum())]] = torch.repeat_interleave(
        torch.arange(len(bounds), device=order.device), sizes
    )
    return block_of


def _block_level_sums(
    assignments, codes, order, bounds, n_levels, acc_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Sum of R per (block, level) for the blocks of this update: (n_blocks, B, K)."""
    n_blocks = len(bounds)
    block_of = _block_of_rows(order, bounds)
    # A (block, level) pair is just a level of a finer design.
    sums = level_sums(
        assignments, block_of[:, None] * n_levels + codes, n_blocks * n_levels, acc_dtype
    )
    return sums.view(n_blocks, n_levels, -1)


@dataclass(frozen=True)
class CellRows:
    """The cells as the clustering step reads them: ``z`` (N, d), the cells
    (Z_corr); ``norms`` (N,), ``z[i] / norms[i]`` is cell i of Z_cos; ``codes``
    (N, V) int64, their global level indices."""

    z: torch.Tensor
    norms: torch.Tensor
    codes: torch.Tensor


@dataclass(frozen=True)
class OnlineSettings:
    """What stays the same across a run's online updates.

    proportions, theta : (B,) tensors (statistics dtype).
    sigma : (K,) tensor (statistics dtype).
    diversity_fn : callable (O, E) -> ratio, both (B, K).
    first_levels : int
        Number of levels of the first batch variable; they partition the cells,
        so their level sums also give the cluster sizes.
    reduction : Reduction
        Where sums over cells become global (:mod:`harmonypy.engine.reduce`): in a
        distributed run every process runs the same blocks on its shard, and the
        removals, block batch sums, centroid sums and objective terms are summed
        over the processes, so O and E stay global and identical everywhere.
    """

    proportions: torch.Tensor
    theta: torch.Tensor
    sigma: torch.Tensor
    diversity_fn: Callable
    first_levels: int
    reduction: Reduction = LOCAL


@dataclass(frozen=True)
class BlockPlan:
    """The blocks of one online update, and what the previous one left for it.

    order : (N,) int64 permutation of the rows of ``assignments``.
    bounds : list of (start, end) positions in ``order``.
    rows : optional (N,) int64 tensor
        The cell held by each row of ``assignments`` (None: row i is cell i).
    removals : optional (n_blocks, B, K) tensor
        What each block takes out of O: the sums of the current R over each
        block's cells by level, when the previous update already summed them.
        None: summed here, in one pass over R.
    recount : bool
        Set ``stats`` from ``assignments`` first (fresh assignments whose counts
        are not known yet); the pass that sums each block's removals gives them.
    next_order, next_bounds : optional
        The next update's permutation of R's rows (as they will be after this
        update) and its blocks (default: ``bounds``). Each piece then also adds
        its new rows to the next update's removals while it is in cache, which
        spares the next update its pass over R.
    """

    order: torch.Tensor
    bounds: list
    rows: torch.Tensor | None = None
    removals: torch.Tensor | None = None
    recount: bool = False
    next_order: torch.Tensor | None = None
    next_bounds: list | None = None


class OnlineResult(NamedTuple):
    """What :func:`online_update` returns: the objective's first two parts over
    all cells with the new assignments (``sum R * dist`` and ``sum_k sigma_k
    sum_i R_ki log R_ki``), the cell held by each row of R after the update
    ((N,) int64), and the next update's removals ((n_blocks, B, K); None
    without ``plan.next_order``)."""

    dist_term: float
    entropy_term: float
    rows: torch.Tensor
    next_removals: torch.Tensor | None


def online_update(
    assignments: torch.Tensor,
    *,
    cells: CellRows,
    centroids: torch.Tensor,
    stats: ClusterStats,
    settings: OnlineSettings,
    plan: BlockPlan,
    centroid_sums_out: torch.Tensor | None = None,
) -> OnlineResult:
    """Update R in place, block by block, as R harmony's ``update_R`` does.

    For each block of cells (in the shuffled ``plan.order``): take the block out
    of O and E, recompute its assignments as
    ``softmax_k(-dist / sigma_k + sum_b theta_b log(ratio_kb) Phi_bi)``, which
    equals R's ``scale_dist * (ratio^theta Phi)`` followed by an L1 normalisation
    when there is one batch variable, then put the block back.

    The new rows are written contiguously in block order — row p of
    ``assignments`` then holds the cell ``rows[order[p]]`` — because a scatter
    back to each cell's old row is several times slower, and the old rows are
    not needed once every block's outgoing sums are known.

    Parameters
    ----------
    assignments : (N, K) tensor, updated in place.
    cells : CellRows, the cells and their level codes.
    centroids : (K, d) tensor, unit-length centroids ``Y``.
    stats : ClusterStats, updated in place.
    settings : OnlineSettings, the run's penalty and where sums become global.
    plan : BlockPlan, this update's blocks (and the next one's order).
    centroid_sums_out : optional (K, d) tensor, zeroed
        Receives ``sum_i R_ki z_i`` over the new assignments (Harmony 1's next
        centroids before normalising), summed piece by piece while each piece
        is in cache instead of in a separate pass over R and Z_cos.

    Returns
    -------
    OnlineResult
        The objective's two terms, the new row order and the next removals.
    """
    n_levels = stats.observed.shape[0]
    reduction = settings.reduction
    removals = plan.removals
    if removals is None or plan.recount:
        # A block's cells keep their old assignments until the block's turn, so
        # what each block takes out of O can be summed up front in one
        # sequential pass over R, instead of gathering the old rows block by block.
        row_codes = cells.codes if plan.rows is None else cells.codes.index_select(0, plan.rows)
        removals = _block_level_sums(
            assignments, row_codes, plan.order, plan.bounds, n_levels, stats.observed.dtype
        )
        reduction.sum_(removals)
    if plan.recount:
        stats.observed = removals.sum(0).to(stats.observed.dtype)
        stats.cluster_sizes = stats.observed[: settings.first_levels].sum(0)
    cells_in_order = plan.order if plan.rows is None else plan.rows.index_select(0, plan.order)
    next_bounds = plan.bounds if plan.next_bounds is None else plan.next_bounds
    next_removals = next_block_of = None
    if plan.next_order is not None:
        next_block_of = _block_of_rows(plan.next_order, next_bounds)
        next_removals = torch.zeros(
            (len(next_bounds) * n_levels, assignments.shape[1]),
            dtype=stats.observed.dtype,
            device=assignments.device,
        )
    sums = _NewRowSums(
        assignments,
        n_levels=n_levels,
        acc_dtype=stats.observed.dtype,
        next_block_of=next_block_of,
        next_removals=next_removals,
        centroid_sums=centroid_sums_out,
    )
    largest_block = max(end - start for start, end in plan.bounds) * assignments.shape[1]
    with serial_if_small(largest_block, assignments.device):
        dist_term, entropy_term = _update_blocks(
            assignments,
            cells=cells,
            centroids=centroids,
            stats=stats,
            settings=settings,
            plan=replace(plan, order=cells_in_order, rows=None, removals=removals),
            sums=sums,
        )
    reduction.sum_(centroid_sums_out, next_removals)
    if next_removals is not None:
        next_removals = next_removals.view(len(next_bounds), n_levels, -1)
    return OnlineResult(dist_term, entropy_term, cells_in_order, next_removals)


# Cells x clusters handled at once inside a block: about 1 MB of float32, so the
# steps of one piece (penalty, product, softmax, sums) run in cache.
PIECE_ELEMENTS = 2**18
MIN_PIECE_ROWS = 64
#: Cells whose batch sums are added up in the working dtype before they join
#: the float64 totals (see _NewRowSums).
FLUSH_ROWS = 8192


class _NewRowSums:
    """Sums over the new rows of R, taken from each piece while it is in cache.

    The batch sums of the new rows (the current block's, and the next update's
    removals) run in the working dtype over at most ``flush_rows`` cells and
    are then added to float64 totals: a float32 sum over a whole block or
    level would drop R's small entries once the sums grow (atlas sizes).
    Harmony 1's next centroid sums (``centroid_sums``) are added piece by piece.
    """

    def __init__(
        self,
        like: torch.Tensor,
        *,
        n_levels: int,
        acc_dtype: torch.dtype,
        next_block_of: torch.Tensor | None,
        next_removals: torch.Tensor | None,
        centroid_sums: torch.Tensor | None,
    ):
        dtype, device, n_clusters = like.dtype, like.device, like.shape[1]
        self.n_levels, self.n_clusters = n_levels, n_clusters
        self.next_block_of, self.next_removals = next_block_of, next_removals
        self.centroid_sums = centroid_sums
        self.added = torch.zeros((n_levels, n_clusters), dtype=dtype, device=device)
        self.next_block_sums = (
            None
            if next_removals is None
            else torch.zeros(next_removals.shape, dtype=dtype, device=device)
        )
        # Many levels: flush less often, so adding the sums stays a small part
        # of the work (a flush touches every entry; a piece of n rows does n K work).
        sum_entries = self.added.numel() + (
            0 if self.next_block_sums is None else self.next_block_sums.numel()
        )
        self.flush_rows = max(FLUSH_ROWS, 16 * sum_entries // n_clusters)
        # With the next update's removals summed here, a level's sums over the
        # new rows are those removals summed over the next blocks: one
        # scatter-add per piece instead of two (the second cost 8% of a run at 1M cells).
        self.derived = self.next_block_sums is not None
        # The current block's totals by level, in float64 (``acc_dtype``).
        self.block_added = torch.zeros((n_levels, n_clusters), dtype=acc_dtype, device=device)
        self.unflushed = 0

    def add_piece(
        self, new: torch.Tensor, piece_codes: torch.Tensor, unit_cells: torch.Tensor, span: slice
    ) -> None:
        """Add a piece's new rows ``new`` (n, K) at positions ``span``, with their
        level codes (n, V) and unit-length cells (n, d)."""
        for v in range(piece_codes.shape[1]):
            if not self.derived:
                index_sum_(self.added, piece_codes[:, v], new)
            else:  # (next block, level) pairs
                index_sum_(
                    self.next_block_sums,
                    self.next_block_of[span] * self.n_levels + piece_codes[:, v],
                    new,
                )
        if self.centroid_sums is not None:  # Harmony 1's next centroids, from the cache
            self.centroid_sums.addmm_(new.T, unit_cells)
        self.unflushed += new.shape[0]
        if self.unflushed >= self.flush_rows:
            self.flush()
            self.unflushed = 0

    def flush(self) -> None:
        """Move the working-dtype sums into the float64 totals."""
        if self.derived:  # into the reused buffer: no fresh temporary per flush
            torch.sum(
                self.next_block_sums.view(-1, self.n_levels, self.n_clusters), 0, out=self.added
            )
            self.next_removals.add_(self.next_block_sums)
            self.next_block_sums.zero_()
        self.block_added += self.added
        self.added.zero_()

    def end_block(self) -> torch.Tensor:
        """The block's new rows summed by level, (B, K) in float64; the next
        block starts from zero."""
        self.flush()
        done, self.block_added = self.block_added, torch.zeros_like(self.block_added)
        self.unflushed = 0
        return done


@dataclass(frozen=True)
class _PieceScratch:
    """What every piece of an update reuses: the scaled centroids and scratch
    buffers (fresh temporaries would cost page faults on every block once they
    outgrow malloc's caches)."""

    rows: int  # cells per piece
    two_over_sigma: torch.Tensor  # (K,) in the working dtype
    scaled_centroids_t: torch.Tensor  # (d, K): 2 Y^T / sigma
    logits: torch.Tensor  # (rows, K)
    unit_cells: torch.Tensor  # (rows, d)

    @classmethod
    def for_update(
        cls,
        assignments: torch.Tensor,
        *,
        centroids: torch.Tensor,
        sigma: torch.Tensor,
        bounds: list,
    ) -> "_PieceScratch":
        dtype, device, n_clusters = assignments.dtype, assignments.device, assignments.shape[1]
        two_over_sigma = (2.0 / sigma).to(dtype)
        piece = max(MIN_PIECE_ROWS, PIECE_ELEMENTS // n_clusters)
        largest = min(piece, max(end - start for start, end in bounds))
        return cls(
            piece,
            two_over_sigma,
            (centroids * two_over_sigma[:, None]).T,
            torch.empty((largest, n_clusters), dtype=dtype, device=device),
            torch.empty((largest, centroids.shape[1]), dtype=dtype, device=device),
        )


def _update_blocks(
    assignments: torch.Tensor,
    *,
    cells: CellRows,
    centroids: torch.Tensor,
    stats: ClusterStats,
    settings: OnlineSettings,
    plan: BlockPlan,
    sums: _NewRowSums,
) -> tuple[float, float]:
    """The per-block loop of :func:`online_update`; returns the two objective terms.
    ``plan`` names the cells in its order (no ``rows``) and has its removals.

    O and E change once per block; within a block the cells are independent,
    so they are processed in cache-sized pieces (:func:`_update_piece`).
    """
    dtype = assignments.dtype
    acc_dtype = stats.observed.dtype
    first_levels = settings.first_levels
    removals = plan.removals.to(acc_dtype)
    scratch = _PieceScratch.for_update(
        assignments, centroids=centroids, sigma=settings.sigma, bounds=plan.bounds
    )
    objective = _ObjectiveSums(settings.sigma, acc_dtype)
    for j, (start, end) in enumerate(plan.bounds):
        stats.observed -= removals[j]
        stats.cluster_sizes -= removals[j, :first_levels].sum(0)
        ratio = settings.diversity_fn(stats.observed, stats.expected(settings.proportions))
        log_penalty = torch.xlogy(settings.theta[:, None], ratio).to(dtype)  # theta = 0 gives 0
        penalty = (log_penalty, log_penalty - scratch.two_over_sigma)
        for lo in range(start, end, scratch.rows):
            _update_piece(
                assignments,
                slice(lo, min(end, lo + scratch.rows)),
                cells=cells,
                order=plan.order,
                penalty=penalty,
                scratch=scratch,
                sums=sums,
                objective=objective,
            )
        block_added = sums.end_block()
        if cells.codes.shape[1] == 1:  # this process's cells: the objective is summed at the end
            objective.add_level_penalty(block_added, log_penalty)
        settings.reduction.sum_(block_added)  # every process's share of block j
        stats.observed += block_added
        stats.cluster_sizes += block_added[:first_levels].sum(0)
    return objective.terms(settings.reduction)


def _update_piece(
    assignments: torch.Tensor,
    span: slice,
    *,
    cells: CellRows,
    order: torch.Tensor,
    penalty: tuple,
    scratch: _PieceScratch,
    sums: _NewRowSums,
    objective: "_ObjectiveSums",
) -> None:
    """New assignments of the cells at positions ``span`` of ``order``, written
    to those rows of ``assignments``; their sums go to ``sums`` and ``objective``.
    ``penalty``: the block's ``theta_b log(ratio_kb)`` (B, K), and the same less
    ``2 / sigma``."""
    log_penalty, shifted_penalty = penalty
    rows = order[span]
    piece_codes = cells.codes.index_select(0, rows)
    n_variables = piece_codes.shape[1]
    # -dist / sigma = (2 Y^T z - 2) / sigma: one matrix product with the
    # scaled centroids, added in place to the penalty less 2 / sigma.
    logits = scratch.logits[: rows.shape[0]]
    several = None
    if n_variables == 1:
        torch.index_select(shifted_penalty, 0, piece_codes[:, 0], out=logits)
    else:
        # Several variables: R multiplies by (ratio^theta) Phi, a sum over
        # the cell's levels, so their logs combine with logsumexp.
        several = torch.logsumexp(
            torch.stack([F.embedding(piece_codes[:, v], log_penalty) for v in range(n_variables)]),
            dim=0,
        )
        torch.sub(several, scratch.two_over_sigma, out=logits)
    unit_cells = unit_rows(
        cells.z, cells.norms, rows, out=scratch.unit_cells[: rows.shape[0]]
    )  # rows of Z_cos
    logits.addmm_(unit_cells, scratch.scaled_centroids_t)
    # The block's old rows are no longer needed (its removals are known).
    new = torch.softmax(logits, dim=1, out=assignments[span])
    sums.add_piece(new, piece_codes, unit_cells, span)
    objective.add_piece(new, logits, several)


class _ObjectiveSums:
    """Running sums for the objective's distance and entropy terms.

    With ``logits = penalty - dist / sigma`` and ``R = softmax(logits)`` per
    cell, ``log R = logits - lse``, so

    * entropy ``sum_k sigma_k sum_i R log R = sigma . (sum R logits - sum_i lse_i R_i)``
    * distance ``sum R dist = sigma . (sum R penalty - sum R logits)``

    and no pass of logarithms is needed. The sums are kept on the device
    (scalars when sigma is the same for every cluster, else one per cluster).
    """

    def __init__(self, sigma: torch.Tensor, acc_dtype: torch.dtype):
        self.sigma = sigma.to(acc_dtype)
        self.uniform = bool((sigma == sigma[0]).all())
        shape = () if self.uniform else sigma.shape
        zeros = dict(dtype=acc_dtype, device=sigma.device)
        self.r_logits = torch.zeros(shape, **zeros)
        self.r_lse = torch.zeros(shape, **zeros)
        self.r_penalty = torch.zeros(shape, **zeros)

    def add_piece(
        self, r: torch.Tensor, logits: torch.Tensor, penalty: torch.Tensor | None = None
    ) -> None:
        """Add cells' assignments ``r`` (n, K), their ``logits`` and, unless it
        comes per level (:meth:`add_level_penalty`), their ``penalty``."""
        dtype = self.r_logits.dtype
        # The row's largest R sits at its largest logit: lse = max - log(max R).
        lse = logits.amax(1) - r.amax(1).log()
        if self.uniform:
            self.r_logits += torch.dot(r.view(-1), logits.view(-1)).to(dtype)
            self.r_lse += lse.sum().to(dtype)
            if penalty is not None:
                self.r_penalty += torch.dot(r.view(-1), penalty.view(-1)).to(dtype)
        else:
            self.r_logits += (r * logits).sum(0).to(dtype)
            self.r_lse += (lse @ r).to(dtype)
            if penalty is not None:
                self.r_penalty += (r * penalty).sum(0).to(dtype)

    def add_level_penalty(self, level_sums: torch.Tensor, log_penalty: torch.Tensor) -> None:
        """One batch variable: ``sum_i R_ik penalty_ik = sum_b level_sums_bk log_penalty_bk``."""
        by_cluster = (level_sums * log_penalty.to(level_sums.dtype)).sum(0)
        self.r_penalty += by_cluster.sum() if self.uniform else by_cluster

    def terms(self, reduction: Reduction = LOCAL) -> tuple[float, float]:
        """``(sum R * dist, sum_k sigma_k sum_i R log R)``, over every process's
        cells (``reduction``)."""
        reduction.sum_(self.r_logits, self.r_lse, self.r_penalty)
        if self.uniform:
            sigma = self.sigma[0]
            return (
                float(sigma * (self.r_penalty - self.r_logits)),
                float(sigma * (self.r_logits - self.r_lse)),
            )
        return (
            float((self.r_penalty - self.r_logits) @ self.sigma),
            float((self.r_logits - self.r_lse) @ self.sigma),
        )


# Blocks below this many elements (cells x clusters) are updated on one thread.
SERIAL_BLOCK_ELEMENTS = 2**14


@contextlib.contextmanager
def serial_if_small(n_elements: int, device: torch.device):
    """Run the per-block work of tiny problems on one CPU thread, restoring the
    setting after; also where the default thread policy re-checks the load.

    A block update is about fifteen short operations, each ending in a thread
    barrier. Below ~16k elements (a few thousand cells) the barriers cost as
    much as the work; above, the threads pay off (100k cells, 2 idle cores:
    25% faster than one thread). The thread count changes the results by
    rounding at most (a matrix product may split its sums by thread).
    Called once per clustering round, so a run with ``ncores=None`` follows
    other processes' load round by round (:mod:`harmonypy.engine.threads`).
    """
    if device.type == "cpu":
        _threads.checkpoint()
    with _threads.serial(n_elements, SERIAL_BLOCK_ELEMENTS, device):
        yield
