"""What a Harmony run shows its caller: the results, read-only.

:class:`HarmonyResults` is the part of :class:`~harmonypy.Harmony` that reads
the run's state and changes nothing: the attributes in the R package's
orientation (``Z_corr``, ``R``, ``Y``, ``O``, ``E``, ``Phi``, ...),
:meth:`~HarmonyResults.result`, :meth:`~HarmonyResults.plot_convergence` and
the ``repr``, and the report a ``callback`` is shown after each iteration.
The state and the steps that write it are in
``engine/harmony.py``; keeping the two apart leaves that module to the
algorithm.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch
from numpy.typing import DTypeLike

from harmonypy.engine.arrays import write_rows
from harmonypy.engine.clustering import ClusterStats
from harmonypy.engine.convergence import IterationReport, read_only_view
from harmonypy.engine.design import BatchDesign
from harmonypy.engine.online import UpdateCache

T = TypeVar("T")


class HarmonyResults:
    """Read-only views of a run's state, for :class:`~harmonypy.Harmony` to inherit.

    The attributes declared here are the state these views read; ``Harmony``
    sets them (``__init__``, then its steps). Per-cell results come back as
    NumPy arrays with the cells in the caller's order, on the CPU as views of
    the engine's tensors where no reordering is needed.
    """

    algorithm: str
    device: torch.device
    dtype: torch.dtype
    design: BatchDesign
    N: int
    d: int
    K: int
    B: int
    alpha: float
    n_iter: int
    converged: bool
    objective_harmony: list[float]
    objective_kmeans_dist: list[float]
    objective_kmeans_entropy: list[float]
    objective_kmeans_cross: list[float]
    # Set by run_harmony after the run (the threads it used; the bytes this process
    # all-reduced, 0 in one process).
    n_threads: int | None
    bytes_reduced: int
    _z_orig: torch.Tensor  # (N, d) the input, cells in rows
    _z_corr: torch.Tensor  # (N, d) the corrected cells (``_z_orig`` until corrected)
    _norms: torch.Tensor  # (N,) row norms of ``_z_corr``
    _proportions: torch.Tensor  # (B,)
    _theta: torch.Tensor  # (B,)
    _sigma: torch.Tensor  # (K,)
    _lamb: torch.Tensor | None  # (B,); None: estimated per cluster
    _cache: UpdateCache  # its ``rows``: the cell in each row of ``_assignments``
    # None until init_cluster: see _started.
    _assignments: torch.Tensor | None  # (N, K) R transposed
    _centroids: torch.Tensor | None  # (K, d) Y transposed
    _stats: ClusterStats | None  # O and the cluster sizes
    # None until the first correction.
    _intercept: torch.Tensor | None  # (K, d)
    _kept_levels: torch.Tensor | None  # (K, B) bool, Harmony2
    # True while a correction runs: one stopped part-way leaves it set.
    _z_corr_partial: bool

    def _corrected(self) -> torch.Tensor:
        """``_z_corr``, unless the last correction stopped part-way.

        The correction writes Z_corr (and its row norms) in place, so one
        stopped part-way (Ctrl-C, an error) leaves some rows corrected and
        others not: reading them, or clustering on them, gets this error.
        """
        if self._z_corr_partial:
            raise RuntimeError(
                "the last correction (moe_correct_ridge) stopped part-way, so Z_corr "
                "may be half written: call moe_correct_ridge() again (it recomputes "
                "Z_corr from Z_orig and R)"
            )
        return self._z_corr

    @staticmethod
    def _started(value: T | None, what: str) -> T:
        """``value``, the run state named ``what``, once the clustering has started.

        The assignments, centroids and counts exist from ``init_cluster`` on; a
        ``Harmony`` built by hand and read (or stepped) before it gets an error
        that says so instead of a failure deep inside a kernel.
        """
        if value is None:
            raise RuntimeError(
                f"Harmony has no {what} yet: call init_cluster() first "
                "(run_harmony() builds the object and runs it)"
            )
        return value

    # ------------------------------------------------------------ attributes
    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    def _cells(self, t: torch.Tensor, rows: torch.Tensor | None = None) -> np.ndarray:
        """A per-cell tensor (N, ...) as NumPy, rows in the caller's order.

        Without ``rows`` the rows already are the cells in order, and on the
        CPU the result is a view of ``t`` (no copy). ``rows`` (N,) names the
        cell in each row of ``t`` when they are not (R after an online
        update); the result is then a gathered copy.
        """
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
        return self._cells(self._corrected()).T

    @property
    def Z_orig(self) -> np.ndarray:
        """Input embedding, (d, N): on the CPU a view of the caller's array
        when it was float32 (float64 runs: float64) and C-contiguous, else of
        the engine's converted copy."""
        return self._cells(self._z_orig).T

    @property
    def Z_cos(self) -> np.ndarray:
        """Unit-length corrected cells, (d, N); computed when read (a new array)."""
        return self._np(self._corrected() / self._norms[:, None]).T

    @property
    def R(self) -> np.ndarray:
        """Soft cluster assignments, (K, N); columns sum to 1."""
        return self._cells(self._started(self._assignments, "assignments"), self._cache.rows).T

    @property
    def Y(self) -> np.ndarray:
        """Cluster centroids, (d, K)."""
        return self._np(self._started(self._centroids, "centroids")).T

    @property
    def O(self) -> np.ndarray:  # noqa: E743 - the R package's name
        """Observed batch-by-cluster counts, (K, B)."""
        return self._np(self._started(self._stats, "counts").observed).T

    @property
    def E(self) -> np.ndarray:
        """Expected batch-by-cluster counts, (K, B)."""
        return self._np(self._started(self._stats, "counts").expected(self._proportions)).T

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
        """Ridge intercepts of the last correction, (d, K) (Harmony2's centroids before
        normalising)."""
        return None if self._intercept is None else self._np(self._intercept).T

    @property
    def kept_levels(self) -> np.ndarray | None:
        """Harmony2: levels used in each cluster's last correction, (K, B) bool."""
        return None if self._kept_levels is None else self._np(self._kept_levels)

    @property
    def batch_levels(self) -> list[str]:
        """Names of the B levels, ``variable=level``, in row order of ``Phi``."""
        return self.design.level_names

    def plot_convergence(self, ax: Any = None) -> Any:
        """Objective per clustering round, coloured by Harmony iteration (needs matplotlib).

        Parameters
        ----------
        ax : matplotlib.axes.Axes, optional
            Where to draw; default a new figure.

        Returns
        -------
        matplotlib.axes.Axes
            The axes drawn on.

        Raises
        ------
        ImportError
            matplotlib is not installed (the message names ``harmonypy[plot]``).

        Examples
        --------
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import harmonypy as hm
        >>> ho = hm.run_harmony(*hm.datasets.load_pbmcs_small(), "donor", verbose=False)
        >>> ax = ho.plot_convergence()
        >>> type(ax).__name__
        'Axes'
        """
        # Imported when called: plotting needs matplotlib, an optional dependency
        # that a run without plots never loads.
        from harmonypy.plotting import plot_convergence

        return plot_convergence(self, ax=ax)

    @property
    def numpy_dtype(self) -> np.dtype:
        """NumPy dtype of the per-cell results (float32 or float64)."""
        return np.dtype(np.float64 if self.dtype == torch.float64 else np.float32)

    def result(self, out: np.ndarray | None = None, dtype: DTypeLike | None = None) -> np.ndarray:
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
            The corrected cells, one row per cell in the run's order (``out``
            when given).

        Raises
        ------
        TypeError
            Both ``out`` and ``dtype`` given.

        Examples
        --------
        >>> import numpy as np
        >>> import harmonypy as hm
        >>> ho = hm.run_harmony(*hm.datasets.load_pbmcs_small(), "donor", verbose=False)
        >>> cells = ho.result()
        >>> cells.shape, cells.dtype, np.shares_memory(cells, ho.Z_corr)
        ((1200, 20), dtype('float32'), True)
        >>> ho.result(dtype=np.float64).dtype
        dtype('float64')
        """
        if out is None:
            if dtype is not None and np.dtype(dtype) != self.numpy_dtype:
                return self.result(out=np.empty((self.N, self.d), dtype=dtype))
            if self._corrected() is self._z_orig:  # never corrected: not the caller's array
                return self._cells(self._z_orig).copy()
            return self._cells(self._z_corr)
        if dtype is not None:
            raise TypeError("pass either out or dtype, not both")
        return write_rows(out, self._corrected())

    def __repr__(self) -> str:
        state = ("converged" if self.converged else "not converged") if self.n_iter else "not run"
        return (
            f"Harmony(algorithm={self.algorithm!r}, N={self.N}, d={self.d}, K={self.K}, "
            f"B={self.B}, iterations={self.n_iter}, {state}, device={str(self.device)!r})"
        )

    def _report(self, rounds: int, reason: str | None) -> IterationReport:
        """What a callback is shown after an iteration that ran ``rounds``
        clustering rounds (``reason``: the stopping test that passed, or None)."""
        parts = (
            self.objective_kmeans_dist[-1],
            self.objective_kmeans_entropy[-1],
            self.objective_kmeans_cross[-1],
        )
        return IterationReport(
            iteration=self.n_iter,
            objective=self.objective_harmony[-1],
            objective_parts=parts,
            kmeans_rounds=rounds,
            converged=reason is not None,
            Z_corr=read_only_view(self._corrected()),
        )
