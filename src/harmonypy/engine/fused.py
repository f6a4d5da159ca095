"""Fused CPU work for a clustering round (numba), and the choice of path.

The online update (:mod:`harmonypy.engine.online`) handles each piece of a
block in about fifteen short torch operations (gather, penalty, product,
softmax, scatter-adds, objective sums), each a pass over the piece with its
own overhead. Here a piece takes three steps: the rows of Z_cos are gathered
(one numba loop), the distances come from BLAS (``torch.mm``: hand-written
loops were slower), and one numba kernel adds the penalty, takes the
softmax, writes R and adds the new rows to the batch sums, the next
update's removals and the objective's sums (float64).

Results equal the torch path's up to rounding: the sums are taken in float64
and in another order, and the exponential is a polynomial
(:mod:`harmonypy.engine._numba_kernels`). A seed still gives the same bits on
every run, whatever the number of threads: the rows of a piece are split
into a fixed number of lanes (:data:`LANES`), each adding to its own sums in
row order, and the lanes are added in lane order.

Which path runs, by the environment variable ``HARMONYPY_FUSED``: unset (or
``auto``, or ``1``), the fused kernels on the CPU when numba imports (``pip
install harmonypy[fast]``) and the run has at least :data:`MIN_ELEMENTS`
cells x clusters (:data:`MIN_ELEMENTS_FLOAT64` in float64), the torch path
otherwise; ``always``, the fused kernels at
any size (tests, benchmarks); ``0``, the torch path. Below that size the
kernels would not pay for themselves: a fresh process spends about 0.6 s
importing numba and loading the compiled kernels from numba's cache (the
first use ever compiles them: several seconds per dtype), more than they save
in a float32 run of a few hundred thousand cells (float64 rounds cost the
torch path more, so they pay from fewer cells). CUDA and MPS always take the torch
path. :func:`use_fused` logs the choice and why at INFO.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from harmonypy import _numba
from harmonypy.engine.clustering import SOFT_ASSIGN_CHUNK

logger = logging.getLogger(__name__)

#: The environment variable that chooses the path (shared with the other
#: numba kernels): unset, ``auto`` or ``1`` (fused from :data:`MIN_ELEMENTS`,
#: when numba imports), ``always`` or ``0``.
ENV_VARIABLE = _numba.ENV_VARIABLE

#: Cells x clusters (of the whole run) from which the fused kernels run by
#: default in float32: about 671,000 cells at K = 100, where a run's rounds
#: save more than loading numba costs (docs/performance.md).
MIN_ELEMENTS = 2**26
#: The same in float64 (``harmony_integrate``'s default dtype): about 84,000
#: cells at K = 100. A float64 round costs the torch path about twice what
#: it costs the kernels (fresh processes, ``harmony_integrate`` defaults:
#: 50,000 cells even, 100,000 cells 2.24-2.44 s fused vs 2.57-2.81 s,
#: 300,000 cells 6.0 s vs 8.8-9.2 s).
MIN_ELEMENTS_FLOAT64 = 2**23

_KERNELS = "harmonypy.engine._numba_kernels"


def fused_choice(
    device: torch.device, *, n_elements: int, dtype: torch.dtype = torch.float32
) -> tuple[bool, str]:
    """Whether a run of ``n_elements`` cells x clusters in ``dtype`` on
    ``device`` uses the fused kernels, and why (one phrase)."""
    if _numba.setting() != "0" and device.type != "cpu":
        return False, f"{device.type} device: the torch path runs there"
    float64 = dtype == torch.float64
    kernels, why = _numba.choose(
        _KERNELS,
        work=n_elements,
        min_work=MIN_ELEMENTS_FLOAT64 if float64 else MIN_ELEMENTS,
        unit="cells x clusters in float64" if float64 else "cells x clusters",
    )
    return kernels is not None, why


def _kernels():
    """The numba kernels' module; ImportError without numba (imported on
    first use: importing numba takes about a second)."""
    return _numba.load(_KERNELS)


def use_fused(device: torch.device, *, n_elements: int, dtype: torch.dtype) -> bool:
    """:func:`fused_choice`, logged at INFO (once per run)."""
    fused, reason = fused_choice(device, n_elements=n_elements, dtype=dtype)
    path = "fused numba kernels" if fused else "torch operations"
    logger.info("clustering rounds: %s (%s)", path, reason)
    return fused


#: Lanes a piece's rows are split into (see ``_numba_kernels.update_piece``):
#: a fixed number, so that the sums do not depend on the thread count.
LANES = 16
#: The most memory the lanes' float64 sums may take together; with many
#: levels there are fewer lanes.
LANE_BYTES = 64 * 2**20


def _lane_buffers(n_sums: int, sigma: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed float64 ``(lane_sums, lane_objective)`` for ``update_piece``:
    (L, n_sums, K) and (L, 3, K), or (L, 3, 1) when sigma is the same for
    every cluster; L lanes, fewer than :data:`LANES` when the sums are large."""
    n_clusters = sigma.shape[0]
    lanes = max(1, min(LANES, LANE_BYTES // (8 * n_sums * n_clusters)))
    uniform = bool((sigma == sigma[0]).all())
    objective = np.zeros((lanes, 3, 1 if uniform else n_clusters))
    return np.zeros((lanes, n_sums, n_clusters)), objective


def _constants(kernels, dtype: torch.dtype) -> np.ndarray:
    """The kernels' exponential constants in ``dtype``."""
    return kernels.exp_constants(torch.empty((), dtype=dtype).numpy().dtype)


class FusedPieces:
    """One online update's pieces through the fused kernels.

    Stands in for the torch path's per-piece work and its batch sums
    (``online._NewRowSums``): :meth:`update_piece` for each piece,
    :meth:`end_block` after each block, :meth:`finish` once at the end.

    Parameters
    ----------
    assignments : (N, K) CPU tensor, R transposed, written piece by piece.
    cells : the run's ``CellRows`` (z, norms, codes).
    order : (N,) int64, the cell of each position of the update.
    sigma : (K,) the clusters' bandwidths.
    n_levels : int, B.
    next_update : None, or ``(next_block_of, next_removals)``: the next
        update's block of each position ((N,) int64) and its removals
        ((n_next_blocks * B, K) float64), to which each piece's rows are added.
    centroid_sums : (K, d) or None, Harmony 1's next centroid sums.
    """

    def __init__(self, assignments, *, cells, order, sigma, n_levels, next_update, centroid_sums):
        self._kernels = kernels = _kernels()
        n_clusters, dtype = assignments.shape[1], assignments.dtype
        self.n_levels = n_levels
        next_block_of, next_removals = next_update or (None, None)
        self.next_removals, self.centroid_sums = next_removals, centroid_sums
        extra = 0 if next_removals is None else next_removals.shape[0]
        self.lane_sums, self.lane_objective = _lane_buffers(n_levels + extra, sigma)
        self._np = {
            "r": assignments.numpy(),
            "z": cells.z.numpy(),
            "norms": cells.norms.numpy(),
            "codes": cells.codes.numpy(),
            "order": order.numpy(),
            "next": np.empty(0, np.int64) if next_block_of is None else next_block_of.numpy(),
        }
        self._consts = _constants(kernels, dtype)
        self._no_row_penalty = np.empty((0, n_clusters), dtype=self._consts.dtype)
        # The block's bound (see _bound) and the penalty it was computed from.
        self._bound_of: torch.Tensor | None = None
        self._bound_value = np.empty(1, dtype=self._consts.dtype)
        self._scratch_arrays: tuple | None = None

    def update_piece(self, assignments, span, *, cells, order, penalty, scratch, objective):
        """New rows of R for the positions ``span`` of ``order`` (as
        ``online._update_piece``, whose arguments it takes)."""
        arrays = self._np
        rows = arrays["order"][span]
        unit_cells = scratch.unit_cells[: rows.shape[0]]
        with _numba.KERNEL_LOCK:  # runs in several Python threads take turns piece by piece
            self._run_piece(span, rows, unit_cells, penalty, scratch)
        if self.centroid_sums is not None:  # a matrix product: BLAS
            self.centroid_sums.addmm_(assignments[span].T, unit_cells)

    def _run_piece(self, span, rows, unit_cells, penalty, scratch):
        kernels, arrays, n = self._kernels, self._np, rows.shape[0]
        unit, logits, shift = self._scratch(scratch)
        codes = self._codes[:n]
        kernels.gather_rows(
            (arrays["z"], arrays["norms"], arrays["codes"]), rows, (unit[:n], codes)
        )
        torch.mm(unit_cells, scratch.scaled_centroids_t, out=scratch.logits[:n])
        log_penalty = penalty[0]
        row_penalty = self._no_row_penalty
        n_variables = arrays["codes"].shape[1]
        if n_variables > 1:  # the logsumexp over the cell's levels, as on the torch path
            by_variable = torch.from_numpy(codes)
            stacked = torch.stack([log_penalty[by_variable[:, v]] for v in range(n_variables)])
            row_penalty = torch.logsumexp(stacked, dim=0).numpy()
        next_block = arrays["next"][span] if arrays["next"].shape[0] else arrays["next"]
        kernels.update_piece(
            logits[:n],
            (log_penalty.numpy(), row_penalty, shift, self._bound(log_penalty, n_variables)),
            (arrays["r"][span], codes, next_block),
            (self.lane_sums, self.lane_objective),
            self._consts,
        )

    def _scratch(self, scratch):
        """The update's scratch buffers as numpy arrays (made at the first piece)."""
        if self._scratch_arrays is None:
            self._scratch_arrays = (
                scratch.unit_cells.numpy(),
                scratch.logits.numpy(),
                scratch.two_over_sigma.numpy(),
            )
            shape = (scratch.logits.shape[0], self._np["codes"].shape[1])
            self._codes = np.empty(shape, dtype=np.int64)
        return self._scratch_arrays

    def _bound(self, log_penalty: torch.Tensor, n_variables: int) -> np.ndarray:
        """(1,) an upper bound of every penalised logit of the block: the
        distance part ``2 (z.Y - 1) / sigma`` is at most 0 and a row's
        penalty at most ``max(log_penalty) + log(V)`` (a logsumexp of V)."""
        if self._bound_of is not log_penalty:
            top = float(log_penalty.max()) + math.log(n_variables) + 1e-3
            self._bound_of, self._bound_value = log_penalty, np.array([top], self._consts.dtype)
        return self._bound_value

    def end_block(self) -> torch.Tensor:
        """The block's new rows summed by level, (B, K) float64 (the lanes
        added in lane order); the next block starts from 0."""
        block = self.lane_sums[:, : self.n_levels]
        done = _sum_lanes(block)
        block[...] = 0
        return torch.from_numpy(done)

    def finish(self, objective) -> None:
        """Hand the objective's sums to ``objective`` (``ObjectiveSums``) and
        the next update's removals to ``next_removals``."""
        objective.add_cluster_sums(*torch.from_numpy(_sum_lanes(self.lane_objective)))
        if self.next_removals is not None:
            removals = _sum_lanes(self.lane_sums[:, self.n_levels :])
            self.next_removals.copy_(torch.from_numpy(removals))


def _sum_lanes(lanes: np.ndarray) -> np.ndarray:
    """``lanes`` (L, ...) added lane by lane, in lane order."""
    total = lanes[0].copy()
    for lane in lanes[1:]:
        total += lane
    return total


def blocks_of_cells(base: torch.Tensor | None, order: torch.Tensor, bounds) -> torch.Tensor:
    """(N,) int64, each cell's block in an update that visits the cells
    ``base[order]`` (``order`` itself with ``base`` None) in the blocks
    ``bounds``: ``online.block_of_rows(base[order], bounds)`` in one numba
    loop, without the N-sized ``base[order]``."""
    starts = np.array([start for start, _ in bounds] + [bounds[-1][1]], dtype=np.int64)
    out = np.empty(order.shape[0], dtype=np.int64)
    no_base = np.empty(0, dtype=np.int64)
    base_np = no_base if base is None else base.numpy()
    _kernels().blocks_of_cells(base_np, order.numpy(), starts, out)
    return torch.from_numpy(out)


def take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for int64 CPU tensors, on numba's threads (a 1-D
    int64 ``index_select`` runs on one)."""
    out = np.empty(index.shape[0], dtype=np.int64)
    _kernels().take(values.numpy(), index.numpy(), out)
    return torch.from_numpy(out)


def reassign(cells, *, centroids, sigma, out, objective, next_update):
    """R as a plain softmax of ``-dist / sigma`` (``clustering.soft_assign``)
    through the fused kernel, with the counts the next online update needs,
    taken in the same pass: returns ``(level_sums, removals)``, R's level
    sums ((B, K) float64: O) and the next update's removals ((n_blocks * B,
    K) float64, rows ``B * block + level``), over this process's cells.

    Each chunk of cells is scaled to unit length, its distances come from
    BLAS, and :func:`update_piece` takes the softmax with no penalty and the
    sums.

    cells : ``(z, norms, codes)``: (N, d) CPU tensor, ``z[i] / norms[i]`` is
        cell i of Z_cos; their global levels ((N, V) int64). R's rows are the
        cells.
    centroids : (K, d); sigma : (K,).
    out : (N, K), receives R.
    objective : ``ObjectiveSums`` or None, receives the sums.
    next_update : ``(base, order, bounds, n_levels)``: the update visits the
        cells ``base[order]`` in the blocks ``bounds``; B levels.
    """
    kernels = _kernels()
    z, norms, codes_t = cells
    base, order, bounds, n_levels = next_update
    block_of = blocks_of_cells(base, order, bounds).numpy()
    codes = codes_t.numpy()
    n_cells, n_clusters, dtype = z.shape[0], centroids.shape[0], z.dtype
    consts = _constants(kernels, dtype)
    two_over_sigma = (2.0 / sigma).to(dtype)
    scaled_centroids_t = (centroids * two_over_sigma[:, None]).T.contiguous()
    rows = min(SOFT_ASSIGN_CHUNK, n_cells)
    logits = torch.empty((rows, n_clusters), dtype=dtype)
    unit = torch.empty((rows, z.shape[1]), dtype=dtype)
    # No penalty: a zero row for every level (the kernel reads row codes[i, 0]).
    no_penalty = np.zeros((n_levels, n_clusters), dtype=consts.dtype)
    no_row_penalty = np.empty((0, n_clusters), dtype=consts.dtype)
    bound = np.array([1e-3], dtype=consts.dtype)  # logits are at most 0 here
    lane_sums, lane_objective = _lane_buffers(n_levels * (1 + len(bounds)), sigma)
    r = out.numpy()
    with _numba.KERNEL_LOCK, _numba.engine_threads():
        for start in range(0, n_cells, rows):
            part = slice(start, min(n_cells, start + rows))
            n = part.stop - start
            cells_part = z[part]
            if norms is not None:
                cells_part = torch.div(cells_part, norms[part, None], out=unit[:n])
            torch.mm(cells_part, scaled_centroids_t, out=logits[:n])
            kernels.update_piece(
                logits[:n].numpy(),
                (no_penalty, no_row_penalty, two_over_sigma.numpy(), bound),
                (r[part], codes[part], block_of[part]),
                (lane_sums, lane_objective),
                consts,
            )
    if objective is not None:
        objective.add_cluster_sums(*torch.from_numpy(_sum_lanes(lane_objective)))
    sums = torch.from_numpy(_sum_lanes(lane_sums))
    return sums[:n_levels], sums[n_levels:]
