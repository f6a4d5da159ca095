"""The Harmony object: the state and steps of one run.

:class:`Harmony` follows the R package's C++ object: its methods are the steps
of the algorithm (``init_cluster``, ``cluster``, ``update_R``,
``compute_objective``, ``moe_correct_ridge``, ``check_convergence``,
``harmonize``), and the numerical kernels they call live in
``engine/clustering.py`` (soft k-means with the diversity penalty) and
``engine/correction.py`` (mixture of ridge regressions). What it shows the
caller (the attributes in R's orientation, ``result``, ``plot_convergence``)
is read from this state by :class:`HarmonyResults`
(``engine/harmony_results.py``), which it inherits. :func:`run_harmony`,
which checks the inputs and builds this object, is in ``engine/run.py``.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch

from harmonypy.engine import clustering as clu
from harmonypy.engine import fused, online
from harmonypy.engine import validation as val
from harmonypy.engine.arrays import all_finite, input_tensor, numerical_failure
from harmonypy.engine.convergence import (
    Callback,
    EmbeddingChange,
    callback_stops,
    check_callback,
    objective_converged,
    warn_if_not_converged,
)
from harmonypy.engine.correction import LevelIndex, RidgeSettings, ridge_correct
from harmonypy.engine.design import BatchDesign
from harmonypy.engine.harmony_results import HarmonyResults
from harmonypy.engine.kmeans import kmeans_centroids, start_for
from harmonypy.engine.objective import ObjectiveSums
from harmonypy.engine.progress import Progress
from harmonypy.engine.reduce import LOCAL, Reduction, process_seed
from harmonypy.engine.threads import AutoThreads

logger = logging.getLogger(__name__)

WINDOW_SIZE = 3  # clustering rounds compared by the convergence check


class Harmony(HarmonyResults):
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
    objective_kmeans, objective_kmeans_dist : list of float
    objective_kmeans_entropy, objective_kmeans_cross : list of float
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
    batch_levels : list of str
        Names of the B levels, ``variable=level``, in row order of ``Phi``.
    lamb_estimated : ndarray (K, B + 1) or None
        With ``lamb=-1``: the penalties ``alpha * E`` the last correction used.
    W_intercept : ndarray (d, K) or None
        Ridge intercepts of the last correction (Harmony2's centroids).
    kept_levels : ndarray (K, B) of bool or None
        Harmony2: the levels each cluster's last correction used.
    numpy_dtype : numpy.dtype
        Float type of the per-cell results (float32 or float64).
    n_threads : int
        CPU threads the run used (``ncores`` of :func:`run_harmony`).

    Examples
    --------
    >>> import harmonypy as hm
    >>> ho = hm.run_harmony(*hm.datasets.load_pbmcs_small(), "donor", verbose=False)
    >>> ho.Z_corr.shape, ho.R.shape, ho.O.shape  # (d, N), (K, N), (K, B)
    ((20, 1200), (40, 1200), (40, 3))
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
    ) -> None:
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
        stat = functools.partial(torch.as_tensor, dtype=self._stat_dtype, device=device)
        # Cells stay in the caller's order. The input is used as it is when it
        # already has the run's dtype and layout on the CPU (no copy: it is only
        # read), else converted once. Z_corr is the one embedding the engine
        # writes; the unit-length cells (Z_cos) are never stored: each step
        # divides the rows it reads by their norms (N numbers).
        self._z_orig = input_tensor(z, dtype, device)
        self._z_corr = self._z_orig  # until the first correction: no copy needed
        self._z_corr_partial = False
        self._norms = clu.row_norms(self._z_orig)
        self._codes = torch.from_numpy(np.ascontiguousarray(design.codes)).to(device)
        # The cells sorted by their level of the first variable. An online
        # update that starts from a fresh R (rows = cells) reads its shuffle
        # through this order, so that a random_state draws the same blocks as
        # in the releases that stored the cells sorted this way (CHANGELOG),
        # and gives the same result up to rounding (sums run in the caller's
        # order): a seed's results stay reproducible.
        base = np.argsort(design.codes[:, 0], kind="stable")
        self._shuffle_base = torch.from_numpy(base).to(device)
        self._levels = LevelIndex.from_codes(self._codes, design.offsets)
        self._proportions = stat(design.proportions)
        self._theta = stat(theta)
        self._sigma = stat(sigma)
        self._lamb = None if lamb is None else stat(lamb)
        self._counts = stat(design.counts)
        # One generator per process: the shuffles of this process's cells (and,
        # distributed, its share of the k-means sample). Rank 0 of a group draws
        # exactly what a single process with this seed draws.
        own_seed = process_seed(seed, reduction.rank)
        self._generator = torch.Generator(device="cpu").manual_seed(own_seed)
        self._bounds = clu.block_bounds(
            self.N,
            block_size,
            n_blocks=clu.n_blocks_of(self.N_total, block_size) if reduction.distributed else None,
        )
        diversity, self._cross = clu.penalty_terms(algorithm, self.N_total, self._stat_dtype)
        self._online = online.OnlineSettings(
            self._proportions,
            self._theta,
            self._sigma,
            diversity,
            first_levels=int(design.offsets[1]),
            reduction=reduction,
            fused=fused.use_fused(self.device, n_elements=self.N_total * self.K, dtype=self.dtype),
        )

        self._assignments: torch.Tensor | None = None
        self._cache = online.UpdateCache()
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
        self._embedding_change = None
        if epsilon_embedding is not None:
            self._embedding_change = EmbeddingChange(self.N, device=device, reduction=reduction)
        self._iteration = 0  # for error messages
        self.cell_names = None  # set by run_harmony when the inputs name the cells

    # ------------------------------------------------------------------ steps
    def init_cluster(self) -> None:
        """Initial centroids by k-means, then R, O, E and the first objective.

        The first step of a run; on a finished run it starts the clustering
        over from the current ``Z_corr`` (with the generator's next draws).

        Examples
        --------
        >>> import harmonypy as hm
        >>> ho = hm.run_harmony(*hm.datasets.load_pbmcs_small(), "donor", verbose=False)
        >>> before = len(ho.objective_harmony)
        >>> ho.init_cluster()
        >>> len(ho.objective_harmony) - before
        1
        """
        start = start_for(self.algorithm, self.kmeans_init, self.K)
        if self._reduction.distributed:
            # Imported here, not at the top: the engine sits below distributed/,
            # and a single-process run never needs the group's k-means start.
            from harmonypy.distributed.start import distributed_kmeans

            centers = distributed_kmeans(
                online.CellRows(self._corrected(), self._norms, self._codes),
                order=self._shuffle_base,
                n_clusters=self.K,
                start=start,
                generator=self._generator,
                seed=self.random_state,
                n_total=self.N_total,
                reduction=self._reduction,
            )
        else:
            centers = kmeans_centroids(
                self._corrected(),
                self.K,
                generator=self._generator,
                start=start,
                norms=self._norms,
                order=self._shuffle_base,
            )
        self._centroids = clu.normalize_rows(centers)
        terms = self._reassign(objective=True)
        assert terms is not None  # soft_assign returns them with objective=True
        dist_term, entropy_term = terms
        self.compute_objective(dist_term, entropy_term, step="initialisation")
        self.objective_harmony.append(self.objective_kmeans[-1])
        if self._embedding_change is not None:
            self._embedding_change.update(self._corrected())

    def cluster(self) -> int:
        """One clustering step: rounds of centroid and assignment updates.

        Rounds of :meth:`update_R` until :meth:`check_convergence` (0) passes
        or ``max_iter_kmeans`` rounds ran.

        Returns
        -------
        int
            The number of rounds run (also appended to ``kmeans_rounds``).

        Examples
        --------
        >>> import harmonypy as hm
        >>> ho = hm.run_harmony(*hm.datasets.load_pbmcs_small(), "donor", verbose=False)
        >>> rounds = ho.cluster()
        >>> 1 <= rounds <= ho.max_iter_kmeans, ho.kmeans_rounds[-1] == rounds
        (True, True)
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
        sequence, as drawing each one at the start of its own update. An update
        stopped part-way (Ctrl-C, an error) drops R, O and E, whose rows it left
        half updated: ``init_cluster()`` starts the clustering again.

        Returns
        -------
        dist_term : float
            The objective's distance part, unscaled.
        entropy_term : float
            Its entropy part, unscaled (both for :meth:`compute_objective`).

        Examples
        --------
        >>> import harmonypy as hm
        >>> ho = hm.run_harmony(*hm.datasets.load_pbmcs_small(), "donor", verbose=False)
        >>> dist_term, entropy_term = ho.update_R()
        >>> type(dist_term).__name__, ho.R.shape
        ('float', (40, 1200))
        """
        assignments = self._started(self._assignments, "assignments")
        centroids = self._started(self._centroids, "centroids")
        stats = self._started(self._stats, "counts")
        cells = online.CellRows(self._corrected(), self._norms, self._codes)
        cache = self._cache
        order = cache.next_order
        if order is None:
            order = torch.randperm(self.N, generator=self._generator).to(self.device)
        cache.next_order = torch.randperm(self.N, generator=self._generator).to(self.device)
        if cache.rows is None:  # R's rows are the cells: see _shuffle_base
            order = self._shuffle_base.index_select(0, order)
        if self.algorithm == "harmony1":
            if cache.centroid_sums is None:
                cache.centroid_sums = torch.empty_like(centroids)
            cache.centroid_sums.zero_()
        plan = cache.plan(order, self._bounds, take=fused.take if self._online.fused else None)
        del order  # the plan holds what the update needs
        try:
            result = online.online_update(
                assignments,
                cells=cells,
                centroids=centroids,
                stats=stats,
                settings=self._online,
                plan=plan,
                centroid_sums_out=cache.centroid_sums,
            )
        except BaseException:  # R's rows in two orders, O half updated: dropped
            self._assignments, self._stats, self._cache = None, None, online.UpdateCache()
            raise
        cache.updated(result)
        return result.dist_term, result.entropy_term

    def compute_objective(
        self, dist_term: float, entropy_term: float, step: str = "clustering"
    ) -> None:
        """Append the objective (scaled by 2000 / N) and its parts.

        Parameters
        ----------
        dist_term, entropy_term : float
            From :meth:`update_R`; the diversity part is computed here.
        step : str, default "clustering"
            The step that an error names.

        Raises
        ------
        FloatingPointError
            A part of the objective is not finite.

        Examples
        --------
        >>> import harmonypy as hm
        >>> ho = hm.run_harmony(*hm.datasets.load_pbmcs_small(), "donor", verbose=False)
        >>> before = len(ho.objective_kmeans)
        >>> ho.compute_objective(*ho.update_R())
        >>> len(ho.objective_kmeans) - before
        1
        """
        stats = self._started(self._stats, "counts")
        cross = clu.cross_term(stats, self._proportions, self._theta, self._sigma, self._cross)
        scale = 2000.0 / self.N_total
        parts = (dist_term * scale, entropy_term * scale, cross * scale)
        if not all(math.isfinite(p) for p in parts):
            raise numerical_failure(step=step, what="the objective", iteration=self._iteration)
        self.objective_kmeans_dist.append(parts[0])
        self.objective_kmeans_entropy.append(parts[1])
        self.objective_kmeans_cross.append(parts[2])
        self.objective_kmeans.append(sum(parts))

    def moe_correct_ridge(self) -> None:
        """Correction: subtract the batch part of per-cluster ridge regressions.

        Recomputes ``Z_corr`` from ``Z_orig`` and ``R``, over the previous
        one (a view of ``Z_corr`` taken before changes too). Stopped part-way
        (Ctrl-C, an error), it leaves Z_corr half written: reading it or
        clustering raises until a correction completes.

        Raises
        ------
        FloatingPointError
            The corrected embedding is not finite.

        Examples
        --------
        >>> import harmonypy as hm
        >>> ho = hm.run_harmony(*hm.datasets.load_pbmcs_small(), "donor", verbose=False)
        >>> ho.moe_correct_ridge()
        >>> ho.Z_corr.shape
        (20, 1200)
        """
        harmony2 = self.algorithm == "harmony2"
        assignments = self._started(self._assignments, "assignments")
        # The correction starts again from Z_orig; the new Z_corr overwrites
        # the previous one, so only one copy is alive.
        self._cache.centroid_sums_current = False
        settings = RidgeSettings(
            self._lamb,
            self.alpha,
            self._proportions,
            self._stat_dtype,
            batch_prop_cutoff=self.batch_prop_cutoff if harmony2 else None,
            counts=self._counts,
            reduction=self._reduction,
        )
        # Z_corr and its norms are written in place: a stop before both are done
        # leaves them half written (_corrected). The first one writes a new array.
        in_place = self._z_corr is not self._z_orig
        self._z_corr_partial = in_place
        result = ridge_correct(
            self._z_orig,
            assignments,
            codes=self._codes,
            levels=self._levels,
            settings=settings,
            rows=self._cache.rows,
            out=self._z_corr if in_place else None,
        )
        if self._reduction.any(not all_finite(result.z_corr)):
            raise numerical_failure(step="correction", what="Z_corr", iteration=self._iteration)
        self._z_corr_partial = True
        self._z_corr = result.z_corr
        self._norms = clu.row_norms(self._z_corr, out=self._norms)
        self._z_corr_partial = False
        self._intercept = result.intercept
        self._kept_levels = result.keep
        if harmony2:
            # Harmony2's centroids are the regressions' intercepts, unit length.
            self._centroids = clu.normalize_rows(result.intercept)

    def check_convergence(self, kind: int) -> bool:
        """Whether R's relative convergence test passes now.

        Parameters
        ----------
        kind : {0, 1}
            0: the clustering rounds (windows of ``window_size`` objectives,
            against ``epsilon_cluster``); 1: the Harmony iterations (the last
            two ``objective_harmony`` values, against ``epsilon_harmony``).

        Returns
        -------
        bool
            Whether the relative change is below its epsilon.

        Examples
        --------
        >>> import harmonypy as hm
        >>> ho = hm.run_harmony(*hm.datasets.load_pbmcs_small(), "donor", verbose=False)
        >>> ho.check_convergence(1) == ho.converged
        True
        """
        if kind == 0:  # Harmony2 stops on any small change, up or down
            return objective_converged(
                self.objective_kmeans,
                window=self.window_size,
                epsilon=self.epsilon_cluster,
                two_sided=self.algorithm == "harmony2",
            )
        return objective_converged(self.objective_harmony, window=1, epsilon=self.epsilon_harmony)

    def harmonize(self, max_iter_harmony: int = 10, *, callback: Callback | None = None) -> Harmony:
        """Run up to ``max_iter_harmony`` more Harmony iterations, from where the run stands.

        Continues a finished run: ``run_harmony(..., max_iter_harmony=3)``
        then ``ho.harmonize(2)`` gives, bit for bit, what
        ``max_iter_harmony=5`` gives (same device; the continuation keeps the
        thread count the run ended with, as BLAS may round differently with
        another). The run's own stopping tests apply, and ``callback`` as in
        :func:`run_harmony`; ``converged`` and ``stop_reason`` describe this
        call.

        Parameters
        ----------
        max_iter_harmony : int, default 10
            Most further iterations (at least 1).
        callback : callable, optional
            Called after every iteration with an :class:`IterationReport`;
            returning True stops the run.

        Returns
        -------
        Harmony
            ``self``.

        Raises
        ------
        ValueError
            ``max_iter_harmony`` below 1.
        TypeError
            ``max_iter_harmony`` not an integer, or ``callback`` not callable.
        RuntimeError
            The object never ran (build it with :func:`run_harmony`).

        Warns
        -----
        ConvergenceWarning
            The iterations ran out before a convergence test passed.

        Examples
        --------
        >>> import warnings
        >>> import harmonypy as hm
        >>> pcs, meta = hm.datasets.load_pbmcs_small()
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", hm.ConvergenceWarning)
        ...     ho = hm.run_harmony(pcs, meta, "donor", max_iter_harmony=1, verbose=False)
        ...     _ = ho.harmonize(2)
        >>> ho.n_iter
        3
        """
        max_iter_harmony = val.check_int("max_iter_harmony", max_iter_harmony, 1)
        check_callback(callback)
        if not self.objective_harmony:
            raise RuntimeError("harmonize() continues a run: start it with run_harmony()")
        threads = AutoThreads(getattr(self, "n_threads", None), self.N * self.K, self.device)
        with threads, torch.no_grad():
            self._iterate(max_iter_harmony, callback)
        warn_if_not_converged(self, max_iter_harmony)
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
            if callback is not None and callback_stops(callback, self._report(rounds, reason)):
                reason = reason or "callback"
            if reason is not None:
                self.converged = reason in ("objective", "embedding")
                self.stop_reason = reason
                break

    def _stop_test(self) -> str | None:
        """'objective' (R's test) or 'embedding' (``epsilon_embedding``) when one passes."""
        if self._embedding_change is not None and self.epsilon_embedding is not None:
            self.embedding_change.append(self._embedding_change.update(self._corrected()))
            if self.embedding_change[-1] < self.epsilon_embedding:
                return "embedding"
        if self.check_convergence(1):
            return "objective"
        return None

    # -------------------------------------------------------------- internals
    def _update_centroids(self) -> None:
        """Harmony 1's centroid step: the R-weighted sums of the unit-length cells.

        The last online update summed them for its new R; after a correction
        (new Z_cos) or a reassignment they are recomputed from R and Z_cos.
        """
        sums = self._cache.centroid_sums
        if self._cache.centroid_sums_current and sums is not None:
            self._centroids = clu.normalize_rows(sums)
        else:
            self._centroids = clu.compute_centroids(
                self._started(self._assignments, "assignments"),
                self._corrected(),
                self._cache.rows,
                norms=self._norms,
                reduction=self._reduction,
            )

    def _reassign(
        self, objective: bool = False, recount: bool = True
    ) -> tuple[float, float] | None:
        """R as a plain softmax of -dist / sigma from the centroids, and O and E
        from it (or, without ``recount``, by the next online update). With
        ``objective``, returns the objective's distance and entropy terms."""
        if self._online.fused:
            return self._reassign_fused(objective)
        # The old R's row order goes first (N int64), and the new R overwrites
        # the old one: one N x K matrix at a time.
        self._cache.reassigned(counted=recount)
        self._assignments, terms = clu.soft_assign(
            self._corrected(),
            self._started(self._centroids, "centroids"),
            self._sigma,
            objective,
            out=self._assignments,
            norms=self._norms,
            reduction=self._reduction,
        )
        if recount:
            self._recount()
        return terms

    def _reassign_fused(self, objective: bool) -> tuple[float, float] | None:
        """:meth:`_reassign` through the fused kernels, which also count O and
        sum the next online update's removals in the same pass over R (the
        torch path takes a pass for each). The next update's order is drawn
        here if no update drew it: the draw :meth:`update_R` would make."""
        cache = self._cache
        next_order = cache.next_order
        if next_order is None:
            next_order = torch.randperm(self.N, generator=self._generator)
        cache.reassigned(counted=True)  # the old row order goes before the new R comes
        cache.next_order = next_order
        sums = ObjectiveSums(self._sigma, self._sigma.dtype) if objective else None
        if self._assignments is None:
            self._assignments = torch.empty((self.N, self.K), dtype=self.dtype)
        level_sums, removals = fused.reassign(
            (self._corrected(), self._norms, self._codes),
            centroids=self._started(self._centroids, "centroids"),
            sigma=self._sigma,
            out=self._assignments,
            objective=sums,
            next_update=(self._shuffle_base, next_order, self._bounds, self.B),
        )
        self._reduction.sum_(level_sums, removals)
        self._set_counts(level_sums)
        cache.next_removals = removals.to(self._stat_dtype).view(len(self._bounds), self.B, -1)
        return None if sums is None else sums.terms(self._reduction)

    def _recount(self) -> None:
        """O and the cluster sizes recomputed from R (no running-sum drift)."""
        rows = self._cache.rows
        codes = self._codes if rows is None else self._codes.index_select(0, rows)
        assignments = self._started(self._assignments, "assignments")
        observed = clu.level_sums(assignments, codes, self.B, self._stat_dtype)
        self._reduction.sum_(observed)
        self._set_counts(observed)

    def _set_counts(self, observed: torch.Tensor) -> None:
        """O (B, K), summed over every process, and the cluster sizes from it."""
        first = self._online.first_levels
        self._stats = clu.ClusterStats.from_observed(observed.to(self._stat_dtype), first)
