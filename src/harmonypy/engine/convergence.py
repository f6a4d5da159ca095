"""When a Harmony run stops: the objective test, an embedding test, a callback.

R's rule (the default) compares the objective of two Harmony iterations:
``(old - new) / |old| < epsilon_harmony``. Where the objective itself falls
towards zero (seen at 10 million simulated cells: 403 -> 6.2) that ratio
stays large while the embedding has stopped moving, so an opt-in second rule
looks at the corrected embedding itself. A callback sees every iteration and
may stop the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from harmonypy.engine.reduce import Reduction

#: Why a run stopped (``Harmony.stop_reason``).
STOP_REASONS = ("objective", "embedding", "callback", "max_iter_harmony")
#: Cells whose corrected coordinates the embedding test follows, at most.
EMBEDDING_SAMPLE = 20_000


class ConvergenceWarning(UserWarning):
    """A Harmony run reached ``max_iter_harmony`` before its convergence test passed."""


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
