"""When a Harmony run stops: the objective test, an embedding test, a callback.

R's rule (the default) compares the objective of two Harmony iterations:
``(old - new) / |old| < epsilon_harmony``. Where the objective itself falls
towards zero (seen at 10 million simulated cells: 403 -> 6.2) that ratio
stays large while the embedding has stopped moving, so an opt-in second rule
looks at the corrected embedding itself. A callback sees every iteration and
may stop the run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harmonypy.engine.reduce import Reduction

#: Why a run stopped (``Harmony.stop_reason``).
STOP_REASONS = ("objective", "embedding", "callback", "max_iter_harmony")
#: Cells whose corrected coordinates the embedding test follows, at most.
EMBEDDING_SAMPLE = 20_000


class ConvergenceWarning(UserWarning):
    """A Harmony run reached ``max_iter_harmony`` before its convergence test passed.

    Issued by :func:`run_harmony` and :meth:`Harmony.harmonize` when the
    iterations ran out (``stop_reason == 'max_iter_harmony'``): the result is
    usable, but another iteration would still have moved it. Raise
    ``max_iter_harmony`` or continue the run with ``ho.harmonize(n)``; silence
    it with ``warnings.filterwarnings("ignore", category=hm.ConvergenceWarning)``.

    Examples
    --------
    >>> import warnings
    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always", hm.ConvergenceWarning)
    ...     ho = hm.run_harmony(pcs, meta, "donor", max_iter_harmony=1, verbose=False)
    >>> [w.category.__name__ for w in caught if issubclass(w.category, hm.ConvergenceWarning)]
    ['ConvergenceWarning']
    >>> ho.stop_reason
    'max_iter_harmony'
    """


@dataclass(frozen=True)
class IterationReport:
    """What ``run_harmony(callback=...)`` receives after each Harmony iteration.

    Attributes
    ----------
    iteration : int
        Harmony iterations run so far (1 after the first).
    objective : float
        The objective after this iteration (``objective_harmony[-1]``).
    objective_parts : tuple of float
        Its three parts: distances, entropy, diversity (cross) term.
    kmeans_rounds : int
        Clustering rounds this iteration ran.
    converged : bool
        Whether the run's own test (objective, or the embedding test when
        ``epsilon_embedding`` is set) passed at this iteration.
    Z_corr : ndarray (d, N), read-only
        The corrected embedding after this iteration, in the seed's
        orientation (``Z_corr.T`` is cells x features). A view of the run's
        own array on the CPU (valid until the next iteration changes it:
        copy it to keep it), a copy from other devices.

    Examples
    --------
    A callback that records each iteration's objective and stops the run
    after two iterations (returning True stops it):

    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> reports = []
    >>> def record(report):
    ...     reports.append(report)
    ...     return report.iteration == 2
    >>> ho = hm.run_harmony(pcs, meta, "donor", callback=record, verbose=False)
    >>> [r.iteration for r in reports], ho.stop_reason
    ([1, 2], 'callback')
    >>> reports[-1].Z_corr.shape  # (d, N)
    (20, 1200)
    """

    iteration: int
    objective: float
    objective_parts: tuple[float, float, float]
    kmeans_rounds: int
    converged: bool
    Z_corr: np.ndarray


Callback = Callable[[IterationReport], object]


def read_only_view(z_corr: torch.Tensor) -> np.ndarray:
    """(d, N) read-only NumPy view of the (N, d) tensor (a copy off the CPU)."""
    array = z_corr.detach().cpu().numpy().T
    array.flags.writeable = False
    return array


class EmbeddingChange:
    """Relative change of the corrected embedding between two iterations.

    ``||Z_new - Z_old|| / ||Z_old||`` (Frobenius norms) over at most
    ``EMBEDDING_SAMPLE`` evenly spaced cells of each process, so following it
    costs a few MB whatever N; the sample draws no random numbers, so the
    run is the same bits with and without the test. The two sums of a
    distributed run go through the one reduction point.
    """

    def __init__(self, n_cells: int, *, device: torch.device, reduction: Reduction):
        count = min(n_cells, EMBEDDING_SAMPLE)
        self._rows = torch.linspace(0, n_cells - 1, count, device=device).round().long()
        self._reduction = reduction
        self._previous: torch.Tensor | None = None

    def update(self, z_corr: torch.Tensor) -> float:
        """Record this iteration's coordinates; the change since the last call (inf at first)."""
        current = z_corr.index_select(0, self._rows).double()
        previous, self._previous = self._previous, current
        if previous is None:
            return float("inf")
        sums = torch.stack([(current - previous).pow(2).sum(), previous.pow(2).sum()])
        self._reduction.sum_(sums)
        return float(sums[0].sqrt() / sums[1].sqrt().clamp_min(1e-300))


def check_callback(callback: object) -> None:
    """Refuse a ``callback`` that cannot be called, before the run starts."""
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback must be a function of one argument (an IterationReport) or "
            f"None, got {type(callback).__name__}"
        )


def callback_stops(callback: Callback, report: IterationReport) -> bool:
    """Call ``callback``; True stops the run, None or False continue."""
    answer = callback(report)
    if answer is None or isinstance(answer, (bool, np.bool_)):
        return bool(answer)
    raise TypeError(
        f"callback must return True (stop), False or None (continue), got "
        f"{answer!r} ({type(answer).__name__}) at iteration {report.iteration}"
    )


def warn_if_not_converged(ho: Any, max_iter_harmony: int, stacklevel: int = 3) -> None:
    """R warns when the iterations run out before convergence; so does this package."""
    if ho.stop_reason != "max_iter_harmony":
        return
    test = (
        "the corrected embedding's relative change"
        f" {ho.embedding_change[-1]:.3g} >= epsilon_embedding={ho.epsilon_embedding:g}"
        if ho.epsilon_embedding is not None and ho.embedding_change
        else f"the objective's relative change >= epsilon_harmony={ho.epsilon_harmony:g}"
    )
    warnings.warn(
        f"Harmony did not converge in {max_iter_harmony} iteration(s) ({test} at the last "
        f"one); raise max_iter_harmony, or continue this run with ho.harmonize(n)",
        ConvergenceWarning,
        stacklevel=stacklevel,
    )


def objective_converged(
    objectives: list[float], *, window: int, epsilon: float, two_sided: bool = False
) -> bool:
    """R's convergence test on an objective trace: the sum of the last
    ``window`` values against the sum of the ``window`` values one step
    earlier, relative to the earlier sum (:func:`relative_change_below`).

    ``two_sided``: any change counts (Harmony2's clustering), not only a
    decrease.
    """
    old = sum(objectives[-2 - i] for i in range(window))
    new = sum(objectives[-1 - i] for i in range(window))
    change = abs(old - new) if two_sided else old - new
    return relative_change_below(change, old, epsilon)


def relative_change_below(change: float, old: float, epsilon: float) -> bool:
    """``change / |old| < epsilon``, where an objective of exactly 0 (identical
    cells, one cluster, theta = 0) counts as converged unless it rose."""
    if old == 0:
        return change <= 0 and epsilon > -math.inf
    return change / abs(old) < epsilon
