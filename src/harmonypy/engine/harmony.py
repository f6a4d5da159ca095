"""The Harmony object and :func:`run_harmony`.

:class:`Harmony` follows the R package's C++ object: its methods are the steps
of the algorithm (``init_cluster``, ``cluster``, ``update_R``,
``compute_objective``, ``moe_correct_ridge``, ``check_convergence``,
``harmonize``), and the numerical kernels they call live in
``_clustering.py`` (soft k-means with the diversity penalty) and
``_correction.py`` (mixture of ridge regressions).
"""

from __future__ import annotations

import functools
import warnings
import logging
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np
import torch

from harmonypy.engine import clustering as clu
from harmonypy.engine import validation as val
from harmonypy.engine.cellnames import align_metadata, run_cell_names
from harmonypy.engine.correction import LevelIndex, RidgeSettings, ridge_correct
from harmonypy.engine.design import BatchDesign, build_design, encode_local_levels, merge_local_levels
from harmonypy.engine.device import resolve_device, resolve_dtype
from harmonypy.engine.kmeans import KMEANS_INITS, SAMPLE_SIZE as _KMEANS_SAMPLE, KMeansStart, kmeans_centroids, start_for
from harmonypy.engine.memory import RunSize
from harmonypy.engine.convergence import (
    Callback,
    ConvergenceWarning,
    EmbeddingChange,
    IterationReport,
    read_only_view,
)
from harmonypy.engine.progress import Progress
from harmonypy.engine.reduce import LOCAL, GroupReduction, Reduction
from harmonypy.engine.threads import AutoThreads

logger = logging.getLogger(__name__)

ALGORITHMS = ("harmony1", "harmony2")
WINDOW_SIZE = 3  # clustering rounds compared by the convergence check


class _DefaultInt(int):
    """An int default that remembers the caller did not pass it."""


class _DefaultFloat(float):
    """A float default that remembers the caller did not pass it."""


# Defaults that Harmony2 replaces with its own when the caller leaves them.
_HARMONY2_DEFAULTS = {
    "max_iter_kmeans": 4,
    "epsilon_cluster": 1e-3,
    "epsilon_harmony": 1e-2,
}

#: Field metadata of a :class:`RunOptions` field that each process of a
#: distributed run sets for itself (its device, threads, seed source, output).
_PER_PROCESS = {"per_process": True}


@dataclass(frozen=True)
class RunOptions:
    """:func:`run_harmony`'s options as the caller passed them (after Harmony2's
    defaults), before the checks of :func:`_local_inputs`.

    The one internal list of the options: the fields are named as
    :func:`run_harmony`'s parameters (see :meth:`from_arguments`), and a
    distributed run requires every process to pass the same value of each
    field not marked per process (:meth:`shared_settings`).
    """

    theta: Any
    lamb: Any
    sigma: Any
    nclust: Any
    tau: Any
    block_size: Any
    max_iter_harmony: Any
    max_iter_kmeans: Any
    epsilon_cluster: Any
    epsilon_harmony: Any
    alpha: Any
    verbose: Any = field(metadata=_PER_PROCESS)
    random_state: Any = field(metadata=_PER_PROCESS)
    device: Any = field(metadata=_PER_PROCESS)
    dtype: Any = field(metadata=_PER_PROCESS)
    algorithm: Any
    batch_prop_cutoff: Any
    ncores: Any = field(metadata=_PER_PROCESS)
    check_memory: Any = field(metadata=_PER_PROCESS)
    plot_convergence: Any
    kmeans_init: Any
    epsilon_embedding: Any

    @classmethod
    def from_arguments(cls, arguments: dict) -> "RunOptions":
        """The options among ``arguments`` (``run_harmony``'s ``locals()``)."""
        return cls(**{f.name: arguments[f.name] for f in fields(cls)})

    def shared_settings(self) -> dict:
        """``repr`` of each option every process must pass alike, by name."""
        return {f.name: repr(getattr(self, f.name)) for f in fields(self)
                if not f.metadata.get("per_process")}


@dataclass
class _UpdateCache:
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

    def plan(self, order: torch.Tensor, bounds: list) -> clu.BlockPlan:
        """The blocks of the next online update, in ``order``."""
        return clu.BlockPlan(order, bounds, rows=self.rows, removals=self.next_removals,
                             recount=self.stale_counts, next_order=self.next_order)

    def updated(self, result: clu.OnlineResult) -> None:
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


class Harmony:
    """State and steps of one Harmony run.

    Build it with :func:`run_harmony`. After the run, the attributes below are
    NumPy arrays in the R package's orientation (features or clusters in rows,
    cells in columns), so ``ho.Z_corr.T`` is the corrected cells x PCs matrix.

    Attributes
    ----------
    Z_corr : ndarray (d, N)
        Corrected embedding.
    Z_orig : ndarray (d, N)
        Input embedding.
    Z_cos : ndarray (d, N)
        Corrected embedding with each cell scaled to unit length (what is clustered).
    R : ndarray (K, N)
        Soft cluster assignments; every column sums to 1.
    Y : ndarray (d, K)
        Cluster centroids (unit length).
    O, E : ndarray (K, B)
        Observed and expected batch-by-cluster counts.
    Phi : ndarray (B, N)
        One-hot batch membership, all batch variables stacked.
    Phi_moe : ndarray (B + 1, N)
        ``Phi`` with a first row of ones (the intercept).
    Pr_b : ndarray (B,)
        Fraction of cells in each batch level.
    theta : ndarray (B,)
        Diversity penalty per level (after ``tau`` shrinkage).
    sigma : ndarray (K,)
        Soft-clustering bandwidth per cluster.
    lamb : ndarray (B + 1,)
        Ridge penalty; ``lamb[0] == 0`` (the intercept is not penalised). With
        ``lamb=-1`` (estimated per cluster) the batch entries are -1 and the
        values used are in ``lamb_estimated``.
    objective_harmony : list of float
        Objective after initialisation and after each Harmony iteration.
    objective_kmeans, objective_kmeans_dist, objective_kmeans_entropy, objective_kmeans_cross : list of float
        Objective and its three parts after every clustering round (scaled by 2000 / N).
    kmeans_rounds : list of int
        Clustering rounds run in each Harmony iteration.
    n_iter : int
        Harmony iterations run.
    converged : bool
        Whether the run stopped because a convergence test passed (the
        objective's, or the embedding's with ``epsilon_embedding``).
    stop_reason : str
        Why the last run (or ``harmonize`` call) stopped: 'objective' (R's
        test), 'embedding' (``epsilon_embedding``), 'callback', or
        'max_iter_harmony' (the iterations ran out; a
        :class:`ConvergenceWarning` was issued).
    embedding_change : list of float
        With ``epsilon_embedding``: the corrected embedding's relative change
        at each iteration.
    K, N, B, d : int
        Clusters, cells, batch levels, features.
    cell_names : pandas.Index (N,) or None
        Names of the cells, in the run's order, when the inputs named them
        (``data_mat``'s index, else ``meta_data``'s, else its ``cell_id``-like
        column; see ``harmonypy.engine.cellnames``). A table met later
        (:func:`build_reference`, ``plot_embedding``) is paired with the
        cells by these names; None (nothing named the cells, or the names
        repeat): by row position.
    """

    def __init__(
        self,
        z: np.ndarray,
        design: BatchDesign,
        *,
        theta: np.ndarray,
        lamb: np.ndarray | None,
        sigma: np.ndarray,
        n_clusters: int,
        block_size: float,
        max_iter_kmeans: int,
        epsilon_cluster: float,
        epsilon_harmony: float,
        alpha: float,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        algorithm: str = "harmony1",
        batch_prop_cutoff: float = 1e-5,
        progress: Progress | None = None,
        reduction: Reduction = LOCAL,
        n_total: int | None = None,
        kmeans_init: str = "greedy",
        epsilon_embedding: float | None = None,
    ):
        self.algorithm = algorithm
        self.kmeans_init = kmeans_init
        # Every sum over cells goes through this: a no-op in one process, an
        # all-reduce over the group in a distributed run (this process then
        # holds N of the run's N_total cells).
        self._reduction = reduction
        self.device = device
        self.dtype = dtype
        self.random_state = seed
        self.design = design
        self.N, self.d = z.shape
        self.N_total = self.N if n_total is None else int(n_total)
        self.rank, self.world_size = reduction.rank, reduction.world_size
        self.K = n_clusters
        self.B = design.n_levels
        self.block_size = block_size
        self.max_iter_kmeans = max_iter_kmeans
        self.epsilon_cluster = epsilon_cluster
        self.epsilon_harmony = epsilon_harmony
        self.alpha = alpha
        self.batch_prop_cutoff = batch_prop_cutoff
        self.window_size = WINDOW_SIZE
        self._progress = progress

        # Counts and small per-level vectors stay in float64 (MPS has none).
        self._stat_dtype = torch.float32 if device.type == "mps" else torch.float64
        stat = dict(dtype=self._stat_dtype, device=device)
        # Cells stay in the caller's order. The input is used as it is when it
        # already has the run's dtype and layout on the CPU (no copy: it is only
        # read), else converted once. Z_corr is the one embedding the engine
        # writes; the unit-length cells (Z_cos) are never stored: each step
        # divides the rows it reads by their norms (N numbers).
        self._z_orig = _input_tensor(z, dtype, device)
        self._z_corr = self._z_orig  # until the first correction: no copy needed
        self._norms = clu.row_norms(self._z_orig)
        self._codes = torch.from_numpy(np.ascontiguousarray(design.codes)).to(device)
        # The cells sorted by their level of the first variable: the order in
        # which earlier versions stored them. An online update that starts from
        # a fresh R (rows = cells) reads its shuffle through it, so the blocks
        # hold the same cells as there and a given random_state gives the same
        # result as before (up to rounding: sums now run in the caller's order).
        self._shuffle_base = torch.from_numpy(
            np.argsort(design.codes[:, 0], kind="stable")).to(device)
        self._levels = LevelIndex.from_codes(self._codes, design.offsets)
        self._proportions = torch.as_tensor(design.proportions, **stat)
        self._theta = torch.as_tensor(theta, **stat)
        self._sigma = torch.as_tensor(sigma, **stat)
        self._lamb = None if lamb is None else torch.as_tensor(lamb, **stat)
        self._counts = torch.as_tensor(design.counts, **stat)
        # One generator per process: the shuffles of this process's cells (and,
        # distributed, its share of the k-means sample). Rank 0 of a group draws
        # exactly what a single process with this seed draws.
        self._generator = torch.Generator(device="cpu").manual_seed(
            _process_seed(seed, reduction.rank))
        self._bounds = clu.block_bounds(
            self.N, block_size,
            n_blocks=clu.n_blocks_of(self.N_total, block_size) if reduction.distributed
            else None)
        if algorithm == "harmony2":
            diversity, self._cross = clu.diversity_harmony2, clu.cross_entropy_harmony2
        else:
            delta = 64 * torch.finfo(self._stat_dtype).eps * self.N_total
            diversity = functools.partial(clu.diversity_harmony1, delta=delta)
            self._cross = clu.cross_entropy_harmony1
        self._online = clu.OnlineSettings(self._proportions, self._theta, self._sigma, diversity,
                                          first_levels=int(design.offsets[1]),
                                          reduction=reduction)

        self._assignments: torch.Tensor | None = None
        self._cache = _UpdateCache()
        self._centroids: torch.Tensor | None = None
        self._stats: clu.ClusterStats | None = None
        self._intercept: torch.Tensor | None = None
        self._kept_levels: torch.Tensor | None = None
        self.objective_harmony: list[float] = []
        self.objective_kmeans: list[float] = []
        self.objective_kmeans_dist: list[float] = []
        self.objective_kmeans_entropy: list[float] = []
        self.objective_kmeans_cross: list[float] = []
        self.kmeans_rounds: list[int] = []
        self.n_iter = 0
        self.converged = False
        self.stop_reason: str | None = None
        self.epsilon_embedding = epsilon_embedding
        self.embedding_change: list[float] = []
        self._embedding_change = (None if epsilon_embedding is None else
                                  EmbeddingChange(self.N, device=device, reduction=reduction))
        self._iteration = 0  # for error messages
        self.cell_names = None  # set by run_harmony when the inputs name the cells

    # ------------------------------------------------------------------ steps
    def init_cluster(self) -> None:
        """Initial centroids by k-means, then R, O, E and the first objective."""
        start = start_for(self.algorithm, self.kmeans_init, self.K)
        if self._reduction.distributed:
            centers = self._distributed_kmeans(start)
        else:
            centers = kmeans_centroids(self._z_corr, self.K, generator=self._generator, start=start,
                                       norms=self._norms, order=self._shuffle_base)
        self._centroids = clu.normalize_rows(centers)
        dist_term, entropy_term = self._reassign(objective=True)
        self.compute_objective(dist_term, entropy_term, step="initialisation")
        self.objective_harmony.append(self.objective_kmeans[-1])
        if self._embedding_change is not None:
            self._embedding_change.update(self._z_corr)

    def cluster(self) -> int:
        """One clustering step: rounds of centroid and assignment updates.

        Returns the number of rounds run (also appended to ``kmeans_rounds``).
        """
        harmony2 = self.algorithm == "harmony2"
        if harmony2 and self._intercept is not None:
            # Harmony2 keeps the centroids from the correction and starts the
            # step from a fresh softmax assignment of the corrected cells; the
            # first online update counts O and E from it.
            self._reassign(recount=False)
        rounds = self.max_iter_kmeans
        for i in range(self.max_iter_kmeans):
            if not harmony2:
                self._update_centroids()
            dist_term, entropy_term = self.update_R()
            self.compute_objective(dist_term, entropy_term, step="clustering")
            if i > self.window_size and self.check_convergence(0):
                rounds = i + 1
                break
        self.kmeans_rounds.append(rounds)
        self.objective_harmony.append(self.objective_kmeans[-1])
        return rounds

    def update_R(self) -> tuple[float, float]:
        """Online update of R in shuffled blocks; returns the distance and entropy terms.

        Each update also draws the next update's cell order and sums what the
        next update's blocks will take out of O, while its new rows are in
        cache. The orders are the same random permutations, in the same
        sequence, as drawing each one at the start of its own update.
        """
        cache = self._cache
        order = cache.next_order
        if order is None:
            order = torch.randperm(self.N, generator=self._generator).to(self.device)
        cache.next_order = torch.randperm(self.N, generator=self._generator).to(self.device)
        if cache.rows is None:  # R's rows are the cells: see _shuffle_base
            order = self._shuffle_base.index_select(0, order)
        if self.algorithm == "harmony1":
            if cache.centroid_sums is None:
                cache.centroid_sums = torch.empty_like(self._centroids)
            cache.centroid_sums.zero_()
        result = clu.online_update(
            self._assignments, cells=clu.CellRows(self._z_corr, self._norms, self._codes),
            centroids=self._centroids, stats=self._stats, settings=self._online,
            plan=cache.plan(order, self._bounds), centroid_sums_out=cache.centroid_sums)
        cache.updated(result)
        return result.dist_term, result.entropy_term

    def compute_objective(self, dist_term: float, entropy_term: float,
                          step: str = "clustering") -> None:
        """Append the objective (scaled by 2000 / N) and its parts."""
        cross = clu.cross_term(self._stats, self._proportions, self._theta, self._sigma,
                               self._cross)
        scale = 2000.0 / self.N_total
        parts = (dist_term * scale, entropy_term * scale, cross * scale)
        if not all(math.isfinite(p) for p in parts):
            self._numerical_failure(step, "the objective")
        self.objective_kmeans_dist.append(parts[0])
        self.objective_kmeans_entropy.append(parts[1])
        self.objective_kmeans_cross.append(parts[2])
        self.objective_kmeans.append(sum(parts))

    def moe_correct_ridge(self) -> None:
        """Correction: subtract the batch part of per-cluster ridge regressions."""
        harmony2 = self.algorithm == "harmony2"
        # The correction starts again from Z_orig; the new Z_corr overwrites
        # the previous one, so only one copy is alive.
        self._cache.centroid_sums_current = False
        settings = RidgeSettings(
            self._lamb, self.alpha, self._proportions, self._stat_dtype,
            batch_prop_cutoff=self.batch_prop_cutoff if harmony2 else None,
            counts=self._counts, reduction=self._reduction)
        result = ridge_correct(
            self._z_orig, self._assignments, codes=self._codes, levels=self._levels,
            settings=settings, rows=self._cache.rows,
            out=None if self._z_corr is self._z_orig else self._z_corr)
        if self._reduction.any(not _all_finite(result.z_corr)):
            self._numerical_failure("correction", "Z_corr")
        self._z_corr = result.z_corr
        self._norms = clu.row_norms(self._z_corr, out=self._norms)
        self._intercept = result.intercept
        self._kept_levels = result.keep
        if harmony2:
            # Harmony2's centroids are the regressions' intercepts, unit length.
            self._centroids = clu.normalize_rows(result.intercept)

    def check_convergence(self, kind: int) -> bool:
        """0: clustering rounds (windows of 3 objectives); 1: Harmony iterations."""
        if kind == 0:
            objectives = self.objective_kmeans
            w = self.window_size
            old = sum(objectives[-2 - i] for i in range(w))
            new = sum(objectives[-1 - i] for i in range(w))
            change = old - new
            if self.algorithm == "harmony2":  # Harmony2 stops on any small change
                change = abs(change)
            return _relative_change_below(change, old, self.epsilon_cluster)
        old, new = self.objective_harmony[-2], self.objective_harmony[-1]
        return _relative_change_below(old - new, old, self.epsilon_harmony)

    def harmonize(self, max_iter_harmony: int = 10, *, callback: Callback | None = None
                  ) -> "Harmony":
        """Run up to ``max_iter_harmony`` more Harmony iterations, from where the run stands.

        Continues a finished run: ``run_harmony(..., max_iter_harmony=3)``
        then ``ho.harmonize(2)`` gives, bit for bit, what
        ``max_iter_harmony=5`` gives (same device; the continuation keeps the
        thread count the run ended with, as BLAS may round differently with
        another). The run's own stopping tests apply, and ``callback`` as in
        :func:`run_harmony`; ``converged`` and ``stop_reason`` describe this
        call. Warns (:class:`ConvergenceWarning`) when the iterations run out
        before a test passed.

        Returns
        -------
        Harmony
            ``self``.
        """
        max_iter_harmony = val.check_int("max_iter_harmony", max_iter_harmony, 1)
        _check_callback(callback)
        if not self.objective_harmony:
            raise RuntimeError("harmonize() continues a run: start it with run_harmony()")
        threads = AutoThreads(getattr(self, "n_threads", None), self.N * self.K, self.device)
        with threads, torch.no_grad():
            self._iterate(max_iter_harmony, callback)
        _warn_if_not_converged(self, max_iter_harmony)
        return self

    def _iterate(self, max_iter_harmony: int, callback: Callback | None) -> None:
        """Alternate clustering and correction until a stopping test passes."""
        progress = self._progress or Progress(False, max_iter_harmony)
        self.converged, self.stop_reason = False, "max_iter_harmony"
        first = self.n_iter + 1
        for i in range(first, first + max_iter_harmony):
            self._iteration = i
            rounds = self.cluster()
            self.moe_correct_ridge()
            self.n_iter = i
            progress.iteration(i - first + 1, self.objective_harmony[-1], rounds)
            reason = self._stop_test()
            if callback is not None and _callback_stops(callback, self._report(rounds, reason)):
                reason = reason or "callback"
            if reason is not None:
                self.converged = reason in ("objective", "embedding")
                self.stop_reason = reason
                break

    def _stop_test(self) -> str | None:
        """'objective' (R's test) or 'embedding' (``epsilon_embedding``) when one passes."""
        if self._embedding_change is not None:
            self.embedding_change.append(self._embedding_change.update(self._z_corr))
            if self.embedding_change[-1] < self.epsilon_embedding:
                return "embedding"
        if self.check_convergence(1):
            return "objective"
        return None

    def _report(self, rounds: int, reason: str | None) -> IterationReport:
        parts = (self.objective_kmeans_dist[-1], self.objective_kmeans_entropy[-1],
                 self.objective_kmeans_cross[-1])
        return IterationReport(iteration=self.n_iter, objective=self.objective_harmony[-1],
                               objective_parts=parts, kmeans_rounds=rounds,
                               converged=reason is not None, Z_corr=read_only_view(self._z_corr))

    # -------------------------------------------------------------- internals
    def _update_centroids(self) -> None:
        """Harmony 1's centroid step: the R-weighted sums of the unit-length cells.

        The last online update summed them for its new R; after a correction
        (new Z_cos) or a reassignment they are recomputed from R and Z_cos.
        """
        if self._cache.centroid_sums_current:
            self._centroids = clu.normalize_rows(self._cache.centroid_sums)
        else:
            self._centroids = clu.compute_centroids(self._assignments, self._z_corr,
                                                    self._cache.rows, norms=self._norms,
                                                    reduction=self._reduction)

    def _reassign(self, objective: bool = False, recount: bool = True
                  ) -> tuple[float, float] | None:
        """R as a plain softmax of -dist / sigma from the centroids, and O and E
        from it (or, without ``recount``, by the next online update). With
        ``objective``, returns the objective's distance and entropy terms."""
        # The new R overwrites the old one: one N x K matrix at a time.
        self._assignments, terms = clu.soft_assign(
            self._z_corr, self._centroids, self._sigma, objective, out=self._assignments,
            norms=self._norms, reduction=self._reduction)
        self._cache.reassigned(counted=recount)
        if recount:
            self._recount()
        return terms

    def _recount(self) -> None:
        """O and the cluster sizes recomputed from R (no running-sum drift)."""
        codes = self._codes if self._cache.rows is None else self._codes.index_select(0, self._cache.rows)
        observed = clu.level_sums(self._assignments, codes, self.B, self._stat_dtype)
        self._reduction.sum_(observed)
        # The first variable's levels partition the cells: their sums are the
        # cluster sizes.
        self._stats = clu.ClusterStats(
            observed=observed,
            cluster_sizes=observed[:int(self.design.offsets[1])].sum(0))

    def _distributed_kmeans(self, start: KMeansStart) -> torch.Tensor:
        """The k-means start of a distributed run: one sample of all the cells.

        Each process draws its share of the sample (``_KMEANS_SAMPLE`` cells in
        all, in proportion to the cells it holds; all of them when the run has
        fewer) from its own generator; the unit-length rows are gathered in
        rank order and every process runs the same k-means on them, with the
        generator of rank 0 (each process replays rank 0's draw to reach the
        same state); rank 0's centroids are broadcast. So the start is
        deterministic for a given seed and world size, and a group of one
        process draws exactly what a single-process run draws.
        """
        sampled = self.N_total > _KMEANS_SAMPLE
        if sampled:
            share = min(self.N, math.ceil(_KMEANS_SAMPLE * self.N / self.N_total))
            rows = torch.randperm(self.N, generator=self._generator)[:share]
        else:
            rows = torch.arange(self.N)
        rows = self._shuffle_base.index_select(0, rows.to(self.device))
        local = clu.unit_rows(self._z_corr, self._norms, rows).cpu().numpy()
        gathered = self._reduction.all_gather((self.N, local))
        sample = torch.from_numpy(np.concatenate([part for _, part in gathered]))
        if self.rank == 0:
            generator = self._generator
        else:
            generator = torch.Generator(device="cpu").manual_seed(self.random_state)
            if sampled:  # rank 0 drew its share of the sample first
                torch.randperm(gathered[0][0], generator=generator)
        centers = kmeans_centroids(sample.to(self.device), self.K, generator=generator,
                                   start=start, sample_size=sample.shape[0])
        return self._reduction.broadcast_(centers.contiguous(), src=0)

    def _numerical_failure(self, step: str, what: str) -> None:
        raise FloatingPointError(
            f"Harmony produced non-finite values in {what} during the {step} step "
            f"(iteration {self._iteration}). Usual causes: PCs on an extreme scale, "
            f"duplicated or near-identical cells dominating a cluster, sigma far too "
            f"small, or theta/lamb values far outside the usual range (theta ~ 0-4, "
            f"lamb ~ 0.1-10). Try dtype='float64' or check the input embedding."
        )

    # ------------------------------------------------------------ attributes
    @staticmethod
    def _np(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.detach().cpu().numpy()

    def _cells(self, t: torch.Tensor | None, rows: torch.Tensor | None = None
               ) -> np.ndarray | None:
        """A per-cell tensor (N, ...) as NumPy, rows in the caller's order.

        Without ``rows`` the rows already are the cells in order, and on the
        CPU the result is a view of ``t`` (no copy). ``rows`` (N,) names the
        cell in each row of ``t`` when they are not (R after an online
        update); the result is then a gathered copy.
        """
        if t is None:
            return None
        if rows is not None:
            position = torch.empty_like(rows)
            position[rows] = torch.arange(rows.numel(), device=rows.device)
            t = t.index_select(0, position)
        return t.detach().cpu().numpy()

    @property
    def Z_corr(self) -> np.ndarray:
        """Corrected embedding, (d, N).

        On the CPU a view of the engine's own array, not a copy (as the
        attribute of harmonypy 0.2): reading it costs no memory, and a further
        correction step (``moe_correct_ridge``) overwrites it in place. Copy it
        to keep a step's result.
        """
        return self._cells(self._z_corr).T

    @property
    def Z_orig(self) -> np.ndarray:
        """Input embedding, (d, N): on the CPU a view of the caller's array
        when it was float32 (float64 runs: float64) and C-contiguous, else of
        the engine's converted copy."""
        return self._cells(self._z_orig).T

    @property
    def Z_cos(self) -> np.ndarray:
        """Unit-length corrected cells, (d, N); computed when read (a new array)."""
        return self._np(self._z_corr / self._norms[:, None]).T

    @property
    def R(self) -> np.ndarray:
        """Soft cluster assignments, (K, N); columns sum to 1."""
        return self._cells(self._assignments, self._cache.rows).T

    @property
    def Y(self) -> np.ndarray:
        """Cluster centroids, (d, K)."""
        return self._np(self._centroids).T

    @property
    def O(self) -> np.ndarray:  # noqa: E743 - the R package's name
        """Observed batch-by-cluster counts, (K, B)."""
        return self._np(self._stats.observed).T

    @property
    def E(self) -> np.ndarray:
        """Expected batch-by-cluster counts, (K, B)."""
        return self._np(self._stats.expected(self._proportions)).T

    @property
    def Phi(self) -> np.ndarray:
        """One-hot batch membership, (B, N); built on request."""
        return self.design.one_hot(dtype=np.float64 if self.dtype == torch.float64 else np.float32)

    @property
    def Phi_moe(self) -> np.ndarray:
        """``Phi`` with a leading row of ones, (B + 1, N)."""
        phi = self.Phi
        return np.vstack([np.ones((1, self.N), dtype=phi.dtype), phi])

    @property
    def Pr_b(self) -> np.ndarray:
        """Batch-level proportions, (B,)."""
        return self._np(self._proportions)

    @property
    def theta(self) -> np.ndarray:
        """Diversity penalty per level, (B,)."""
        return self._np(self._theta)

    @property
    def sigma(self) -> np.ndarray:
        """Bandwidth per cluster, (K,)."""
        return self._np(self._sigma)

    @property
    def lamb(self) -> np.ndarray:
        """Ridge penalty, (B + 1,); batch entries are -1 when estimated."""
        batch = np.full(self.B, -1.0) if self._lamb is None else self._np(self._lamb)
        return np.concatenate([[0.0], batch])

    @property
    def lamb_estimated(self) -> np.ndarray | None:
        """Per-cluster penalties ``alpha * E`` used with ``lamb=-1``, (K, B + 1)."""
        if self._lamb is not None or self._stats is None:
            return None
        expected = self.E
        return np.hstack([np.zeros((self.K, 1)), self.alpha * expected])

    @property
    def W_intercept(self) -> np.ndarray | None:
        """Ridge intercepts of the last correction, (d, K) (Harmony2's centroids before normalising)."""
        return None if self._intercept is None else self._np(self._intercept).T

    @property
    def kept_levels(self) -> np.ndarray | None:
        """Harmony2: levels used in each cluster's last correction, (K, B) bool."""
        return self._np(self._kept_levels)

    @property
    def batch_levels(self) -> list[str]:
        """Names of the B levels, ``variable=level``, in row order of ``Phi``."""
        return self.design.level_names

    def plot_convergence(self, ax=None):
        """Objective per clustering round, coloured by Harmony iteration (needs matplotlib)."""
        from harmonypy.plotting import plot_convergence

        return plot_convergence(self, ax=ax)

    @property
    def numpy_dtype(self) -> np.dtype:
        """NumPy dtype of the per-cell results (float32 or float64)."""
        return np.dtype(np.float64 if self.dtype == torch.float64 else np.float32)

    def result(self, out: np.ndarray | None = None, dtype=None) -> np.ndarray:
        """Corrected embedding as cells x features (same as ``Z_corr.T``).

        Parameters
        ----------
        out : array of shape (N, d), optional
            Written in place, in chunks of 65,536 cells, and returned: a
            preallocated array, a ``np.memmap`` or ``np.lib.format.open_memmap``
            on disk, a slot of ``adata.obsm``. Its float dtype may differ from
            the run's (each chunk is cast). Without ``out`` the engine's own
            array is returned on the CPU (a view, no copy: it is ``Z_corr.T``),
            and a copy from other devices.
        dtype : NumPy float dtype, optional (not with ``out``)
            The dtype wanted: the engine's own array when it already has it,
            else a new array of that dtype filled chunk by chunk.

        Returns
        -------
        ndarray of shape (N, d)
        """
        if out is None:
            if dtype is not None and np.dtype(dtype) != self.numpy_dtype:
                return self.result(out=np.empty((self.N, self.d), dtype=dtype))
            if self._z_corr is self._z_orig:  # never corrected: not the caller's array
                return self._cells(self._z_orig).copy()
            return self._cells(self._z_corr)
        if dtype is not None:
            raise TypeError("pass either out or dtype, not both")
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a NumPy array (or np.memmap) of shape "
                            f"({self.N}, {self.d}), got {type(out).__name__}")
        if out.shape != (self.N, self.d):
            raise ValueError(f"out must have shape ({self.N}, {self.d}) (cells x features), "
                             f"got {out.shape}")
        if out.dtype.kind != "f":
            raise ValueError(f"out must have a float dtype, got {out.dtype}")
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        for start in range(0, self.N, COPY_CHUNK_ROWS):
            stop = min(self.N, start + COPY_CHUNK_ROWS)
            out[start:stop] = self._z_corr[start:stop].detach().cpu().numpy()
        return out

    def __repr__(self) -> str:
        state = ("converged" if self.converged else "not converged") if self.n_iter else "not run"
        return (f"Harmony(algorithm={self.algorithm!r}, N={self.N}, d={self.d}, K={self.K}, "
                f"B={self.B}, iterations={self.n_iter}, {state}, device={str(self.device)!r})")


#: Cells copied at once between a caller's array and the engine's (the input
#: converted to the run's dtype, :meth:`Harmony.result` filling ``out``), so
#: that no second full-size copy is ever made.
COPY_CHUNK_ROWS = 65536


def _input_used_as_is(z, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`_input_tensor` wraps ``z`` instead of copying it."""
    np_dtype = np.dtype(np.float64 if dtype == torch.float64 else np.float32)
    return (device.type == "cpu" and isinstance(z, np.ndarray) and z.dtype == np_dtype
            and z.flags.c_contiguous and z.dtype.isnative)


def _input_tensor(z: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (N, d) input as a tensor of ``dtype`` on ``device``, without a copy
    when it can be used as it is.

    On the CPU a C-contiguous array of the run's dtype (also a read-only one,
    such as a memory-mapped ``.npy``) is wrapped, not copied: the engine never
    writes to it. Anything else is converted in chunks of 65,536 rows, so a
    float64 input run in float32 never has a second float64 copy.
    """
    np_dtype = np.dtype(np.float64 if dtype == torch.float64 else np.float32)
    if _input_used_as_is(z, dtype, device):
        with warnings.catch_warnings():  # read-only input: fine, it is only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(z)
    out = torch.empty(z.shape, dtype=dtype, device=device)
    for start in range(0, z.shape[0], COPY_CHUNK_ROWS):
        stop = min(z.shape[0], start + COPY_CHUNK_ROWS)
        chunk = np.ascontiguousarray(z[start:stop], dtype=np_dtype)
        out[start:stop] = torch.from_numpy(chunk).to(device)
    return out


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite: a NaN or inf makes the sum non-finite, and
    the sum is one cheap pass; only an overflowing sum needs the full check."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _outcome(ho: Harmony) -> str:
    """The last progress line of a run, by its ``stop_reason``."""
    if ho.stop_reason == "objective":
        return f"converged after {ho.n_iter} iteration(s)"
    if ho.stop_reason == "embedding":
        return (f"converged after {ho.n_iter} iteration(s) (the corrected embedding moved "
                f"{ho.embedding_change[-1]:.2g} < epsilon_embedding)")
    if ho.stop_reason == "callback":
        return f"stopped by the callback after {ho.n_iter} iteration(s)"
    return f"reached max_iter_harmony={ho.n_iter} without converging"


def _check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function of one argument (an IterationReport) or "
                        f"None, got {type(callback).__name__}")


def _callback_stops(callback: Callback, report: IterationReport) -> bool:
    """Call ``callback``; True stops the run, None or False continue."""
    answer = callback(report)
    if answer is None or isinstance(answer, (bool, np.bool_)):
        return bool(answer)
    raise TypeError(f"callback must return True (stop), False or None (continue), got "
                    f"{answer!r} ({type(answer).__name__}) at iteration {report.iteration}")


def _warn_if_not_converged(ho: Harmony, max_iter_harmony: int, stacklevel: int = 3) -> None:
    """R warns when the iterations run out before convergence; so does this package."""
    if ho.stop_reason != "max_iter_harmony":
        return
    test = ("the corrected embedding's relative change"
            f" {ho.embedding_change[-1]:.3g} >= epsilon_embedding={ho.epsilon_embedding:g}"
            if ho.epsilon_embedding is not None and ho.embedding_change else
            f"the objective's relative change >= epsilon_harmony={ho.epsilon_harmony:g}")
    warnings.warn(
        f"Harmony did not converge in {max_iter_harmony} iteration(s) ({test} at the last "
        f"one); raise max_iter_harmony, or continue this run with ho.harmonize(n)",
        ConvergenceWarning, stacklevel=stacklevel)


def _relative_change_below(change: float, old: float, epsilon: float) -> bool:
    """``change / |old| < epsilon``, where an objective of exactly 0 (identical
    cells, one cluster, theta = 0) counts as converged unless it rose."""
    if old == 0:
        return change <= 0 and epsilon > -math.inf
    return change / abs(old) < epsilon


def _process_seed(seed: int, rank: int) -> int:
    """Seed of a process's generator: ``seed`` itself on rank 0 (a single
    process), a distinct well-mixed one on each other rank."""
    if rank == 0:
        return seed
    mixed = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9) % (1 << 64)
    return mixed >> 1  # manual_seed takes up to 2**63 - 1 on every platform


def default_clusters(n_cells: int) -> int:
    """R's default ``K = min(round(N / 30), 100)``, at least 1 (R would give 0 below 15 cells)."""
    return max(1, min(round(n_cells / 30), 100))


def _resolve_lamb(lamb, design, default_estimate: bool) -> np.ndarray | None:
    """Per-level ridge penalties (> 0), or None when they are estimated (``lamb=-1``).

    ``lamb=0`` is refused: with an intercept and every level of a variable in
    the regression the unpenalised system is singular.
    """
    if lamb is None:
        return None if default_estimate else np.ones(design.n_levels)
    if isinstance(lamb, np.ndarray) and lamb.ndim == 0:
        lamb = lamb.item()
    if np.isscalar(lamb) and not isinstance(lamb, (str, bytes, bool, np.bool_)) and lamb == -1:
        return None
    try:
        return val.per_level("lamb", lamb, design, 1.0, minimum=0.0, strict=True)
    except ValueError as err:
        raise ValueError(f"{err} (lamb=-1, a scalar, estimates it per cluster)") from None


def _threads(ncores) -> int | None:
    """Torch threads for the run: None lets the default policy decide; 0 means half the CPUs."""
    if ncores is None:
        return None
    n = val.check_int("ncores", ncores, 0)
    if n == 0:
        n = max(1, (os.cpu_count() or 2) // 2)
    return n


def run_harmony(
    data_mat,
    meta_data,
    vars_use: str | Sequence[str] | None = None,
    theta=None,
    lamb=None,
    sigma=0.1,
    nclust: int | None = None,
    tau: float = 0,
    block_size: float = 0.05,
    max_iter_harmony: int = 10,
    max_iter_kmeans: int = _DefaultInt(20),
    epsilon_cluster: float = _DefaultFloat(1e-5),
    epsilon_harmony: float = _DefaultFloat(1e-4),
    alpha: float = 0.2,
    verbose: bool = True,
    random_state=0,
    device=None,
    *,
    dtype=None,
    algorithm: str = "harmony1",
    batch_prop_cutoff: float = 1e-5,
    ncores: int | None = None,
    check_memory: bool = True,
    plot_convergence: bool = False,
    distributed: bool = False,
    process_group=None,
    kmeans_init: str = "greedy",
    callback: Callback | None = None,
    epsilon_embedding: float | None = None,
) -> Harmony:
    """Integrate an embedding across batches with Harmony.

    Parameters
    ----------
    data_mat : array-like or DataFrame, (N, d) or (d, N)
        The embedding, usually PCs. The orientation is taken from
        ``len(meta_data)``: cells x PCs when the first dimension equals the
        number of cells (also when both do), PCs x cells otherwise.
    meta_data : DataFrame with N rows, or a Series/array of N batch labels
    vars_use : str or list of str, optional
        Batch columns of ``meta_data`` to integrate over (required when it has
        several columns).
    theta : float, or one per variable, or one per batch level; default 2
        Diversity penalty: higher values push harder towards mixed clusters.
    lamb : float, or one per variable, or one per batch level; default 1
        Ridge penalty (> 0). ``-1`` estimates it per cluster as ``alpha * E``.
        Harmony2 estimates it unless given.
    sigma : float or array of length K, default 0.1
        Bandwidth of the soft clustering (> 0).
    nclust : int, optional
        Number of clusters K; default ``min(round(N / 30), 100)``.
    tau : float, default 0
        Protection of small batches: ``theta_b *= 1 - exp(-(N_b / (K tau))^2)``.
    block_size : float in (0, 1], default 0.05
        Fraction of cells updated at once in the online assignment update (0.2
        when there are fewer than 40 cells). Values below ``1 / N`` act as
        ``1 / N`` (one cell per block, N blocks).
    max_iter_harmony : int, default 10
        Maximum Harmony iterations (clustering + correction).
    max_iter_kmeans : int, default 20 (Harmony2: 4)
        Maximum clustering rounds per iteration.
    epsilon_cluster, epsilon_harmony : float, default 1e-5 and 1e-4 (Harmony2: 1e-3, 1e-2)
        Relative objective changes below which the clustering rounds and the
        Harmony iterations stop; ``-inf`` never stops early.
    alpha : float, default 0.2
        Scale of the estimated ridge penalty (``lamb=-1``).
    verbose : bool, default True
        Report progress on stderr (tqdm bar on a terminal when installed) unless
        logging already shows INFO records of ``harmonypy``; always logs at INFO.
    random_state : int, numpy Generator or None, default 0
        Seed of the k-means initialisation and the cell shuffles. The caller's
        global NumPy and torch random states are not touched.
    device : None, 'cpu', 'cuda', 'cuda:N', 'mps' or torch.device
        Where to compute; None picks CUDA, then Apple MPS, then the CPU.
    dtype : 'float32' (default) or 'float64'
    algorithm : 'harmony1' (default) or 'harmony2'
        'harmony1' uses the formulas of R harmony 1.2.4; 'harmony2' those of R
        harmony 2.0 (see the documentation), with its defaults for any of
        ``lamb``, ``max_iter_kmeans``, ``epsilon_cluster``, ``epsilon_harmony``
        not passed.
    batch_prop_cutoff : float, default 1e-5
        Harmony2 only: a level takes part in a cluster's correction only if
        ``O[k, b] / N_b`` exceeds this.
    ncores : int, optional
        CPU threads for the computation (0: half the CPUs). Default (None): at
        most torch's current setting; one thread for small problems (cells x
        clusters < 2**19); otherwise the cores that other processes leave idle,
        re-measured at every clustering round (Linux ``/proc/stat``; elsewhere
        the load average at the start). The choice is logged at INFO and kept
        as ``ho.n_threads``. The caller's torch setting is restored afterwards,
        also on errors and from several Python threads at once.
    plot_convergence : bool, default False
        Draw the objective after the run (needs matplotlib).
    check_memory : bool, default True
        Before any heavy work, estimate the run's peak memory from N, d, K, the
        batch levels, dtype, algorithm and device (see
        ``harmonypy.engine.memory.estimate_memory``) and raise ``MemoryError`` when it
        exceeds the available memory (Linux ``MemAvailable`` or the cgroup
        limit; free GPU memory on CUDA). ``False`` skips the check. Where the
        available memory is unknown there is no check.
    distributed : bool, default False
        Run as one process of a ``torch.distributed`` group (initialise it on
        every process first: gloo for CPUs, NCCL for GPUs with
        ``torch.cuda.set_device`` per process). Each process passes its own
        shard of cells (``data_mat`` and ``meta_data`` rows), with the same
        other arguments; shards may differ in size and in the batch levels
        they hold. Batch levels are the union over the processes (sorted as
        in a single run), counts and proportions are global, and every sum
        over cells (O/E, centroid sums, the objective, the ridge systems) is
        all-reduced, so ``Y``, ``O``, ``E``, the objectives, ``n_iter`` and
        ``converged`` are the same on every process, while ``Z_corr``, ``R``
        and the other per-cell attributes hold this process's cells in its
        order. A bad input on any process makes every process raise, naming
        it. Progress is shown by rank 0 only. See
        ``docs/distributed.md``.
    process_group : torch.distributed ProcessGroup, optional
        The group to run in (default: the default group).
    callback : callable, optional
        Called after every Harmony iteration with an :class:`IterationReport`
        (iteration, objective and its parts, clustering rounds, whether a
        convergence test passed, and ``Z_corr`` as a read-only (d, N) view).
        Returning True stops the run (``stop_reason == 'callback'``); None or
        False continue. A callback may record, plot or apply its own rule.
    epsilon_embedding : float, optional
        Opt-in second stopping test: stop when the corrected embedding's
        relative change between two iterations, ``||Z_new - Z_old|| /
        ||Z_old||`` over up to 20,000 evenly spaced cells, falls below it
        (for example 1e-3). For runs where R's objective test is
        ill-conditioned: when the objective falls towards zero its relative
        change stays large while the cells no longer move. R's test still
        applies; whichever passes first stops the run. Default None (R's
        test only).
    kmeans_init : 'greedy' (default) or 'r'
        How the initial centroids are found. 'r' does what the R package
        does: for Harmony 1 ten k-means runs of at most 25 steps, the lowest
        final within-cluster sum of squares kept (``kmeans(nstart = 10,
        iter.max = 25)``), for Harmony2 one k-means++ seeding and 10 Lloyd
        steps. 'greedy' runs ten complete k-means runs from greedy k-means++
        seedings (2 + ln K candidates per centre): the result then moves the
        least with ``random_state`` (measured on the bundled data, see
        docs/convergence.md), as close to R's results.

    Returns
    -------
    Harmony
        ``ho.Z_corr.T`` is the corrected (N, d) embedding.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    harmony2 = algorithm == "harmony2"
    if harmony2:
        if isinstance(max_iter_kmeans, _DefaultInt):
            max_iter_kmeans = _HARMONY2_DEFAULTS["max_iter_kmeans"]
        if isinstance(epsilon_cluster, _DefaultFloat):
            epsilon_cluster = _HARMONY2_DEFAULTS["epsilon_cluster"]
        if isinstance(epsilon_harmony, _DefaultFloat):
            epsilon_harmony = _HARMONY2_DEFAULTS["epsilon_harmony"]

    # ---- validation, all of it before any heavy work
    if process_group is not None and not distributed:
        raise ValueError("process_group is only used with distributed=True")
    distributed = val.check_flag("distributed", distributed)
    # The signature is the public list of the options, RunOptions the one
    # internal list: its fields are taken from the arguments by name.
    options = RunOptions.from_arguments(locals())
    _check_callback(callback)
    if distributed:
        reduction = GroupReduction(process_group)
        checked = _distributed_inputs(data_mat, meta_data, vars_use, options, reduction)
    else:
        reduction = LOCAL
        local = _local_inputs(data_mat, meta_data, vars_use, options=options)
        design = build_design(local["frame"], local["names"])
        checked = _design_dependent_inputs(local, design)
    cells, design, n_clusters = checked["cells"], checked["design"], checked["n_clusters"]
    torch_device, torch_dtype = checked["device"], checked["dtype"]
    max_iter_harmony = checked["max_iter_harmony"]
    n_cells = design.n_total

    progress = Progress(checked["verbose"] and reduction.rank == 0, max_iter_harmony)
    cpu_threads = AutoThreads(checked["threads"], cells.shape[0] * n_clusters, torch_device)
    with cpu_threads:
        with progress, torch.no_grad():
            progress.message(
                f"{n_cells} cells, {cells.shape[1]} dimensions, {design.n_levels} batch "
                f"levels in {', '.join(map(str, checked['names']))}; K={n_clusters} clusters; "
                f"{algorithm} on {torch_device} ({str(torch_dtype).replace('torch.', '')})"
                + (f"; {reduction.world_size} process{'es' if reduction.world_size != 1 else ''} "
                   f"({reduction.backend})" if reduction.distributed else ""))
            ho = Harmony(
                cells, design, theta=checked["theta"], lamb=checked["lamb"],
                sigma=checked["sigma"], n_clusters=n_clusters, block_size=checked["block_size"],
                max_iter_kmeans=checked["max_iter_kmeans"],
                epsilon_cluster=checked["epsilon_cluster"],
                epsilon_harmony=checked["epsilon_harmony"], alpha=checked["alpha"],
                seed=checked["seed"], device=torch_device, dtype=torch_dtype,
                algorithm=algorithm, batch_prop_cutoff=checked["batch_prop_cutoff"],
                progress=progress, reduction=reduction, n_total=n_cells,
                kmeans_init=checked["kmeans_init"],
                epsilon_embedding=checked["epsilon_embedding"])
            sample = min(n_cells, _KMEANS_SAMPLE)
            progress.message(
                f"initial centroids: k-means on {sample:,} sampled cells, then a first "
                f"assignment of all {n_cells:,}" if sample < n_cells else
                f"initial centroids: k-means on all {n_cells:,} cells")
            ho.init_cluster()
            progress.message(f"initialised in {progress.elapsed():.1f} s")
            ho._iterate(max_iter_harmony, callback)
            progress.message(f"{_outcome(ho)} in {progress.elapsed():.1f} s")
    ho.n_threads = cpu_threads.threads
    ho.bytes_reduced = reduction.bytes_sent()
    ho.cell_names = checked["cell_names"]
    ho._progress = None
    _warn_if_not_converged(ho, max_iter_harmony)
    if checked["plot_convergence"]:
        ho.plot_convergence()
    return ho


def _local_inputs(data_mat, meta_data, vars_use, *, options: RunOptions, first_row: int = 0,
                  min_cells: int = val.MIN_CELLS) -> dict:
    """The checks of :func:`run_harmony` that need only this process's inputs.

    ``first_row``: the global number of this process's first cell (messages
    name cells by it); ``min_cells``: the fewest cells this process may hold.
    """
    # Scalars first (cheap), then the tables, then what depends on both. The
    # caller's Generator is drawn from last, so a refused call leaves it as it was.
    o = options
    checked = dict(
        theta=o.theta, lamb=o.lamb, sigma=o.sigma, nclust=o.nclust, algorithm=o.algorithm,
        check_memory=o.check_memory,
        block_size=val.check_block_size(o.block_size),
        max_iter_harmony=val.check_int("max_iter_harmony", o.max_iter_harmony, 1),
        max_iter_kmeans=val.check_int("max_iter_kmeans", o.max_iter_kmeans, 1),
        epsilon_cluster=val.check_epsilon("epsilon_cluster", o.epsilon_cluster),
        epsilon_harmony=val.check_epsilon("epsilon_harmony", o.epsilon_harmony),
        alpha=val.check_positive("alpha", o.alpha),
        tau=val.check_nonnegative("tau", o.tau),
        batch_prop_cutoff=val.check_fraction("batch_prop_cutoff", o.batch_prop_cutoff),
        verbose=val.check_flag("verbose", o.verbose),
        plot_convergence=val.check_flag("plot_convergence", o.plot_convergence),
        kmeans_init=val.check_choice("kmeans_init", o.kmeans_init, KMEANS_INITS),
        epsilon_embedding=(None if o.epsilon_embedding is None
                           else val.check_positive("epsilon_embedding", o.epsilon_embedding)))
    checked["device"] = torch_device = resolve_device(o.device)
    checked["dtype"] = resolve_dtype(o.dtype, torch_device)
    val.check_random_state(o.random_state)
    checked["random_state"] = o.random_state
    checked["threads"] = _threads(o.ncores)
    # Cells are paired with their metadata by name when both sides name them.
    meta_data = align_metadata(data_mat, meta_data)
    checked["rows"] = rows = val.cell_rows_of(meta_data, first=first_row, min_cells=min_cells)
    checked["frame"], checked["names"] = frame, _ = val.as_metadata(meta_data, vars_use,
                                                                    rows=rows)
    checked["cells"] = val.as_cells_by_features(data_mat, len(frame), meta_shape=frame.shape,
                                                rows=rows)
    checked["cell_names"] = run_cell_names(data_mat, meta_data)
    return checked


def _design_dependent_inputs(local: dict, design: BatchDesign, depth: int = 1) -> dict:
    """The checks that need the batch design (of all processes' cells); returns
    ``local`` completed with the inputs in the engine's form (``design``,
    ``n_clusters``, per-level ``theta``/``lamb``, per-cluster ``sigma``,
    ``seed``). ``depth``: calls between the user's call of :func:`run_harmony`
    and this one (warnings point at the user's line)."""
    cells, torch_dtype, torch_device = local["cells"], local["dtype"], local["device"]
    n_cells = design.n_total  # all processes' cells in a distributed run
    val.check_cell_lengths(cells, torch_dtype, rows=local.get("rows"))
    val.warn_if_not_reduced(cells, stacklevel=3 + depth)
    nclust = local["nclust"]
    n_clusters = (default_clusters(n_cells) if nclust is None
                  else val.check_int("nclust", nclust, 1, n_cells,
                                     maximum_is="the number of cells"))
    theta_levels = val.per_level("theta", local["theta"], design, 2.0, minimum=0.0)
    if local["tau"] > 0:
        with np.errstate(over="ignore"):  # huge ratios give exp(-inf) = 0: no shrinkage
            theta_levels = theta_levels * (
                1 - np.exp(-(design.counts / (n_clusters * local["tau"])) ** 2))
    lamb_levels = _resolve_lamb(local["lamb"], design,
                                default_estimate=local["algorithm"] == "harmony2")
    sigma_clusters = val.check_sigma(local["sigma"], n_clusters, dtype=torch_dtype)
    block_size = 0.2 if n_cells < 40 else local["block_size"]
    if local["check_memory"]:
        size = RunSize(cells.shape[0], cells.shape[1], n_clusters,
                       np.diff(design.offsets).tolist(),
                       n_blocks=clu.n_blocks_of(cells.shape[0], block_size))
        val.check_memory_fits(size, dtype=torch_dtype, algorithm=local["algorithm"],
                              device=torch_device,
                              copies_input=not _input_used_as_is(cells, torch_dtype, torch_device))
    return dict(local, design=design, n_clusters=n_clusters, theta=theta_levels,
                lamb=lamb_levels, sigma=sigma_clusters, block_size=block_size,
                seed=val.resolve_seed(local["random_state"]))


def _distributed_inputs(data_mat, meta_data, vars_use, options: RunOptions,
                        reduction: Reduction) -> dict:
    """:func:`run_harmony`'s checks in a process group, in two rounds.

    Each process checks its own shard and encodes its batch columns; the
    processes then exchange verdicts, settings and batch levels in one
    gather. A refused shard (or settings that differ from rank 0's) stops
    every process with an error naming the rank, instead of leaving the
    others waiting in a collective call. Every process builds the same
    global design from the gathered levels; the checks that depend on it
    (and the memory check, which depends on each machine) are then
    exchanged once more. Returns what the single-process checks return,
    with rank 0's seed.
    """
    # Messages name cells as the caller counts them (rank order is the
    # gathered order): this process's first cell follows the lower ranks' cells.
    sizes = reduction.all_gather(_row_count(meta_data))
    first_row = sum(n or 0 for n in sizes[:reduction.rank])

    def check_shard():
        local = _local_inputs(data_mat, meta_data, vars_use, options=options,
                              first_row=first_row, min_cells=1)
        if reduction.backend == "nccl" and local["device"].type != "cuda":
            raise ValueError(
                f"the process group's backend is NCCL, which sums CUDA tensors, but "
                f"device={str(local['device'])!r}: pass device='cuda:N' (this process's "
                f"GPU, after torch.cuda.set_device(N)), or use a gloo group for the CPU")
        levels, codes, counts = encode_local_levels(local["frame"], local["names"])
        settings = dict(
            d=int(local["cells"].shape[1]), dtype=str(local["dtype"]),
            device=local["device"].type, vars_use=list(map(str, local["names"])),
            **options.shared_settings())
        return (local, levels, codes), (settings, levels, counts)

    (local, levels, codes), shared = _checked_together(reduction, check_shard)
    reference = shared[0][0]
    for rank, (settings, _, _) in enumerate(shared[1:], start=1):
        differing = [k for k in reference if reference[k] != settings.get(k)]
        if differing:
            raise RuntimeError(
                f"distributed Harmony stopped: rank {rank} of {reduction.world_size} differs "
                f"from rank 0 in {', '.join(differing)} ("
                + "; ".join(f"{k}: rank 0 {reference[k]}, rank {rank} {settings.get(k)}"
                            for k in differing[:3])
                + "): every process must pass the same arguments and features")
    # Deterministic on every process: the same gathered levels give the same design.
    design = merge_local_levels(local["names"], levels, codes, [lv for _, lv, _ in shared],
                                [counts for _, _, counts in shared])
    if design.n_total < val.MIN_CELLS:  # the same verdict on every process
        raise ValueError(
            f"Harmony needs at least {val.MIN_CELLS} cells, the {reduction.world_size} "
            f"processes hold {design.n_total} in all ("
            + ", ".join(f"rank {r}: {n}" for r, n in enumerate(sizes)) + ")")

    def check_with_design():
        checked = _design_dependent_inputs(local, design, depth=4)
        return checked, checked["seed"]

    checked, seeds = _checked_together(reduction, check_with_design)
    checked["seed"] = seeds[0]  # rank 0's: None or a Generator draws one per process
    return checked


def _row_count(meta_data) -> int | None:
    """``len(meta_data)``, or None for what has no length (refused by the checks)."""
    try:
        return len(meta_data)
    except TypeError:
        return None


def _checked_together(reduction: Reduction, check):
    """Run ``check()`` (returning ``(result, shared)``) on every process and
    gather each one's ``shared`` part, in rank order. When ``check`` raises on
    any process, every process raises, naming the rank(s)
    (:func:`_raise_if_refused`), instead of the others waiting in the next
    collective call."""
    try:
        result, shared = check()
        verdict, failure = ("ok", shared), None
    except Exception as err:  # noqa: BLE001 - raised on every process below
        result, verdict, failure = None, ("error", type(err).__name__, str(err)), err
    verdicts = reduction.all_gather(verdict)
    _raise_if_refused(verdicts, failure, reduction)
    return result, [v[1] for v in verdicts]


def _raise_if_refused(verdicts: list, failure, reduction: Reduction) -> None:
    """Raise on every process when any verdict is an error, naming the rank(s)."""
    failed = [(rank, v) for rank, v in enumerate(verdicts) if v[0] == "error"]
    if not failed:
        return
    rank, (_, kind, message) = failed[0]
    also = (f" (and rank(s) {', '.join(str(r) for r, _ in failed[1:])})"
            if failed[1:] else "")
    text = (f"distributed Harmony stopped: rank {rank} of {reduction.world_size} refused "
            f"its input{also}: {kind}: {message}")
    if failure is not None and rank == reduction.rank:
        try:  # the failing process keeps its error's type (ValueError, TypeError, ...)
            error = type(failure)(text)
        except Exception:  # noqa: BLE001 - a type that takes other arguments
            error = RuntimeError(text)
        raise error from failure
    raise RuntimeError(text)
