"""The checks of :func:`~harmonypy.run_harmony`'s options, all before any heavy work.

:func:`local_inputs` checks what one process's inputs decide;
:func:`design_dependent_inputs` what needs the batch design (all processes'
levels in a distributed run). :class:`RunOptions` is the one internal list of
the options. The single-process front end (``engine/run.py``) and the
distributed checks (``distributed/checks.py``) both call these, which is why
they live apart from ``run_harmony``: the distributed layer imports them
without importing the front end that calls back into it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from harmonypy.engine import clustering as clu
from harmonypy.engine import validation as val
from harmonypy.engine.arrays import input_used_as_is
from harmonypy.engine.cellnames import align_metadata, run_cell_names
from harmonypy.engine.design import BatchDesign
from harmonypy.engine.device import resolve_device, resolve_dtype
from harmonypy.engine.kmeans import KMEANS_INITS
from harmonypy.engine.memory import RunSize, check_memory_fits

#: Field metadata of a :class:`RunOptions` field that each process of a
#: distributed run sets for itself (its device, threads, seed source, output).
_PER_PROCESS = {"per_process": True}


@dataclass(frozen=True)
class RunOptions:
    """:func:`run_harmony`'s options as the caller passed them (after Harmony2's
    defaults), before the checks of :func:`local_inputs`.

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
    def from_arguments(cls, arguments: dict) -> RunOptions:
        """The options among ``arguments`` (``run_harmony``'s ``locals()``)."""
        return cls(**{f.name: arguments[f.name] for f in fields(cls)})

    def shared_settings(self) -> dict:
        """``repr`` of each option every process must pass alike, by name."""
        return {
            f.name: repr(getattr(self, f.name))
            for f in fields(self)
            if not f.metadata.get("per_process")
        }


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


def local_inputs(
    data_mat,
    meta_data,
    vars_use,
    *,
    options: RunOptions,
    first_row: int = 0,
    min_cells: int = val.MIN_CELLS,
) -> dict:
    """The checks of :func:`run_harmony` that need only this process's inputs.

    ``first_row``: the global number of this process's first cell (messages
    name cells by it); ``min_cells``: the fewest cells this process may hold.
    """
    # Scalars first (cheap), then the tables, then what depends on both. The
    # caller's Generator is drawn from last, so a refused call leaves it as it was.
    o = options
    checked = dict(
        theta=o.theta,
        lamb=o.lamb,
        sigma=o.sigma,
        nclust=o.nclust,
        algorithm=o.algorithm,
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
        epsilon_embedding=(
            None
            if o.epsilon_embedding is None
            else val.check_positive("epsilon_embedding", o.epsilon_embedding)
        ),
    )
    checked["device"] = torch_device = resolve_device(o.device)
    checked["dtype"] = resolve_dtype(o.dtype, torch_device)
    val.check_random_state(o.random_state)
    checked["random_state"] = o.random_state
    checked["threads"] = _threads(o.ncores)
    # Cells are paired with their metadata by name when both sides name them.
    meta_data = align_metadata(data_mat, meta_data)
    checked["rows"] = rows = val.cell_rows_of(meta_data, first=first_row, min_cells=min_cells)
    checked["frame"], checked["names"] = frame, _ = val.as_metadata(meta_data, vars_use, rows=rows)
    checked["cells"] = val.as_cells_by_features(
        data_mat, len(frame), meta_shape=frame.shape, rows=rows
    )
    checked["cell_names"] = run_cell_names(data_mat, meta_data)
    return checked


def design_dependent_inputs(local: dict, design: BatchDesign, depth: int = 1) -> dict:
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
    n_clusters = (
        default_clusters(n_cells)
        if nclust is None
        else val.check_int("nclust", nclust, 1, n_cells, maximum_is="the number of cells")
    )
    theta_levels = val.per_level("theta", local["theta"], design, 2.0, minimum=0.0)
    if local["tau"] > 0:
        with np.errstate(over="ignore"):  # huge ratios give exp(-inf) = 0: no shrinkage
            theta_levels = theta_levels * (
                1 - np.exp(-((design.counts / (n_clusters * local["tau"])) ** 2))
            )
    lamb_levels = _resolve_lamb(
        local["lamb"], design, default_estimate=local["algorithm"] == "harmony2"
    )
    sigma_clusters = val.check_sigma(local["sigma"], n_clusters, dtype=torch_dtype)
    block_size = 0.2 if n_cells < 40 else local["block_size"]
    if local["check_memory"]:
        size = RunSize(
            cells.shape[0],
            cells.shape[1],
            n_clusters,
            np.diff(design.offsets).tolist(),
            n_blocks=clu.n_blocks_of(cells.shape[0], block_size),
        )
        check_memory_fits(
            size,
            dtype=torch_dtype,
            algorithm=local["algorithm"],
            device=torch_device,
            copies_input=not input_used_as_is(cells, torch_dtype, torch_device),
        )
    return dict(
        local,
        design=design,
        n_clusters=n_clusters,
        theta=theta_levels,
        lamb=lamb_levels,
        sigma=sigma_clusters,
        block_size=block_size,
        seed=val.resolve_seed(local["random_state"]),
    )
