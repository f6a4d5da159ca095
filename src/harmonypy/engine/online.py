"""The online update of R: R harmony's ``update_R``, block by block.

Layout: the engine keeps cells in rows. ``assignments`` is R transposed
(N x K), ``observed`` is O transposed (B x K).

One fact keeps the time near a single pass over R per clustering round:
inside a block, cells are independent (O and E change once per block), so a
block is processed in cache-sized pieces, and everything that needs the new
rows — the batch sums, the objective's terms, Harmony 1's next centroid sums
and the next round's removals — is taken from each piece while it is in
cache. On the CPU, with numba, each piece's work after the distances may run
as one fused kernel (:mod:`harmonypy.engine.fused`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from harmonypy import _numba
from harmonypy.engine import threads as _threads
from harmonypy.engine.clustering import ClusterStats, level_sums, unit_rows
from harmonypy.engine.fused import FusedPieces, blocks_of_cells
from harmonypy.engine.objective import ObjectiveSums
from harmonypy.engine.reduce import LOCAL, Reduction, index_sum_


def block_of_rows(order: torch.Tensor, bounds) -> torch.Tensor:
    """(N,) block index of each row of R (of each element of ``order``), for
    an update in ``order``."""
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
    block_of = block_of_rows(order, bounds)
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
    fused : bool
        Run each piece through the fused CPU kernels
        (:mod:`harmonypy.engine.fused`) instead of torch operations.
    """

    proportions: torch.Tensor
    theta: torch.Tensor
    sigma: torch.Tensor
    diversity_fn: Callable
    first_levels: int
    reduction: Reduction = LOCAL
    fused: bool = False


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


@dataclass
class UpdateCache:
    """What one online update leaves for the next, and what replacing R or
    correcting Z_corr invalidates.

    rows : (N,) int64 tensor or None
        The online update leaves R's rows in its last block order: row p holds
        cell ``rows[p]`` (None: row i is cell i).
    next_order, next_removals : tensor or None
        The next online update's cell order, drawn by the previous update, and
        its blocks' removals from the current R (None once R is replaced).
    stale_counts : bool
        R reassigned, O and E not yet counted: the next online update counts them.
    centroid_sums : (K, d) tensor or None
        Harmony 1 only: ``sum_i R_ki z_i`` summed by the online update for its
        new R, reused as the next centroids while ``centroid_sums_current``
        (neither Z_cos nor R has changed since).
    """

    rows: torch.Tensor | None = None
    next_order: torch.Tensor | None = None
    next_removals: torch.Tensor | None = None
    stale_counts: bool = False
    centroid_sums: torch.Tensor | None = None
    centroid_sums_current: bool = False

    def plan(self, order: torch.Tensor, bounds: list, *, take: Callable | None = None) -> BlockPlan:
        """The blocks of the next online update, in ``order`` (positions of R's rows).

        When R's rows are not the cells and the removals are known (every
        update after the first), the update's cells are named here
        (``take(rows, order)``, default ``index_select``) and the plan holds
        them instead of ``rows`` and ``order``: R's old row order (N int64) is
        let go before the update, and ``rows`` names the order the update
        writes R in. A caller that drops its own ``order`` then holds two
        N-sized arrays fewer during the update (160 MB at 10M cells)."""
        if self.rows is not None and self.next_removals is not None and not self.stale_counts:
            cells = self.rows.index_select(0, order) if take is None else take(self.rows, order)
            self.rows = cells
            return BlockPlan(cells, bounds, removals=self.next_removals, next_order=self.next_order)
        return BlockPlan(
            order,
            bounds,
            rows=self.rows,
            removals=self.next_removals,
            recount=self.stale_counts,
            next_order=self.next_order,
        )

    def updated(self, result: OnlineResult) -> None:
        """After an online update: R's new row order, the next update's
        removals, and the centroid sums of the new R."""
        self.rows, self.next_removals = result.rows, result.next_removals
        self.stale_counts = False
        self.centroid_sums_current = self.centroid_sums is not None

    def reassigned(self, *, counted: bool) -> None:
        """After R was replaced by a fresh assignment, rows in cell order
        (``counted``: O and E were recounted from it)."""
        self.rows = None
        self.next_removals = None  # summed from the previous R
        self.stale_counts = not counted
        self.centroid_sums_current = False


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
        counted = ClusterStats.from_observed(
            removals.sum(0).to(stats.observed.dtype), settings.first_levels
        )
        stats.observed, stats.cluster_sizes = counted.observed, counted.cluster_sizes
    cells_in_order = plan.order if plan.rows is None else plan.rows.index_select(0, plan.order)
    next_bounds = plan.bounds if plan.next_bounds is None else plan.next_bounds
    next_block_of, next_removals = _next_update(
        plan.next_order, next_bounds, like=assignments, stats=stats, fused=settings.fused
    )
    sums: FusedPieces | _NewRowSums
    if settings.fused:
        sums = FusedPieces(
            assignments,
            cells=cells,
            order=cells_in_order,
            sigma=settings.sigma,
            n_levels=n_levels,
            next_update=None if next_removals is None else (next_block_of, next_removals),
            centroid_sums=centroid_sums_out,
        )
    else:
        sums = _NewRowSums(
            assignments,
            n_levels=n_levels,
            acc_dtype=stats.observed.dtype,
            next_block_of=next_block_of,
            next_removals=next_removals,
            centroid_sums=centroid_sums_out,
        )
    largest_block = max(end - start for start, end in plan.bounds) * assignments.shape[1]
    # The fused kernels run on the engine's threads (one for tiny blocks), and
    # numba's setting is the caller's again after, also when the update stops.
    kernel_threads = _numba.engine_threads() if settings.fused else contextlib.nullcontext()
    with serial_if_small(largest_block, assignments.device), kernel_threads:
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


def _next_update(next_order, next_bounds, *, like, stats, fused):
    """``(next_block_of, next_removals)`` for an update that sums the next
    one's removals: each row's block in the next update ((N,) int64; a numba
    loop on the fused path) and zeroed removals ((n_blocks * B, K), the
    statistics' dtype); ``(None, None)`` without a next order."""
    if next_order is None:
        return None, None
    if fused:
        next_block_of = blocks_of_cells(None, next_order, next_bounds)
    else:
        next_block_of = block_of_rows(next_order, next_bounds)
    shape = (len(next_bounds) * stats.observed.shape[0], like.shape[1])
    return next_block_of, torch.zeros(shape, dtype=stats.observed.dtype, device=like.device)


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
        self.centroid_sums = centroid_sums
        self.added = torch.zeros((n_levels, n_clusters), dtype=dtype, device=device)
        # With the next update's removals summed here, a level's sums over the
        # new rows are those removals summed over the next blocks: one
        # scatter-add per piece instead of two (the second cost 8% of a run at 1M cells).
        # Then ``next``: the next block of each position, the removals' float64
        # totals, and their working-dtype sums since the last flush.
        self.next: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if next_block_of is not None and next_removals is not None:
            working = torch.zeros(next_removals.shape, dtype=dtype, device=device)
            self.next = (next_block_of, next_removals, working)
        # Many levels: flush less often, so adding the sums stays a small part
        # of the work (a flush touches every entry; a piece of n rows does n K work).
        sum_entries = self.added.numel() + (0 if self.next is None else self.next[2].numel())
        self.flush_rows = max(FLUSH_ROWS, 16 * sum_entries // n_clusters)
        # The current block's totals by level, in float64 (``acc_dtype``).
        self.block_added = torch.zeros((n_levels, n_clusters), dtype=acc_dtype, device=device)
        self.unflushed = 0

    def add_piece(
        self, new: torch.Tensor, piece_codes: torch.Tensor, unit_cells: torch.Tensor, span: slice
    ) -> None:
        """Add a piece's new rows ``new`` (n, K) at positions ``span``, with their
        level codes (n, V) and unit-length cells (n, d)."""
        for v in range(piece_codes.shape[1]):
            if self.next is None:
                index_sum_(self.added, piece_codes[:, v], new)
            else:  # (next block, level) pairs
                next_block_of, _, working = self.next
                index_sum_(working, next_block_of[span] * self.n_levels + piece_codes[:, v], new)
        if self.centroid_sums is not None:  # Harmony 1's next centroids, from the cache
            self.centroid_sums.addmm_(new.T, unit_cells)
        self.unflushed += new.shape[0]
        if self.unflushed >= self.flush_rows:
            self.flush()
            self.unflushed = 0

    def update_piece(self, assignments: torch.Tensor, span: slice, **piece) -> None:
        """The torch path's work for one piece (:func:`_update_piece`), its
        sums into this object."""
        _update_piece(assignments, span, sums=self, **piece)

    def finish(self, objective: ObjectiveSums) -> None:
        """Nothing left to hand over: the pieces added their sums as they went."""

    def flush(self) -> None:
        """Move the working-dtype sums into the float64 totals."""
        if self.next is not None:  # into the reused buffer: no fresh temporary per flush
            _, next_removals, working = self.next
            torch.sum(working.view(-1, self.n_levels, self.n_clusters), 0, out=self.added)
            next_removals.add_(working)
            working.zero_()
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
    ) -> _PieceScratch:
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
    sums: _NewRowSums | FusedPieces,
) -> tuple[float, float]:
    """The per-block loop of :func:`online_update`; returns the two objective terms.
    ``plan`` names the cells in its order (no ``rows``) and has its removals.

    O and E change once per block; within a block the cells are independent,
    so they are processed in cache-sized pieces (:func:`_update_piece`).
    """
    dtype = assignments.dtype
    acc_dtype = stats.observed.dtype
    first_levels = settings.first_levels
    assert plan.removals is not None  # online_update sums them before this loop
    removals = plan.removals.to(acc_dtype)
    scratch = _PieceScratch.for_update(
        assignments, centroids=centroids, sigma=settings.sigma, bounds=plan.bounds
    )
    objective = ObjectiveSums(settings.sigma, acc_dtype)
    for j, (start, end) in enumerate(plan.bounds):
        stats.observed -= removals[j]
        stats.cluster_sizes -= removals[j, :first_levels].sum(0)
        ratio = settings.diversity_fn(stats.observed, stats.expected(settings.proportions))
        log_penalty = torch.xlogy(settings.theta[:, None], ratio).to(dtype)  # theta = 0 gives 0
        penalty = (log_penalty, log_penalty - scratch.two_over_sigma)
        for lo in range(start, end, scratch.rows):
            sums.update_piece(
                assignments,
                slice(lo, min(end, lo + scratch.rows)),
                cells=cells,
                order=plan.order,
                penalty=penalty,
                scratch=scratch,
                objective=objective,
            )
        block_added = sums.end_block()
        if cells.codes.shape[1] == 1:  # this process's cells: the objective is summed at the end
            objective.add_level_penalty(block_added, log_penalty)
        settings.reduction.sum_(block_added)  # every process's share of block j
        stats.observed += block_added
        stats.cluster_sizes += block_added[:first_levels].sum(0)
    sums.finish(objective)
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
    objective: ObjectiveSums,
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
