"""``run_harmony``: the front end that checks the inputs and runs a :class:`Harmony`.

All checks run before any heavy work (``engine/options.py``:
``local_inputs``, what one process's inputs decide, then
``design_dependent_inputs``, what needs the batch design). A distributed run
checks through ``harmonypy.distributed.checks`` instead, which calls both on
every process and makes the processes agree. Then the progress lines, the
:class:`Harmony` object's initialisation and iterations, and the convergence
warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from numpy.typing import ArrayLike

from harmonypy._typing import DeviceLike, DtypeLike, MatrixLike, MetadataLike, RandomStateLike
from harmonypy.engine import validation as val
from harmonypy.engine.convergence import Callback, check_callback, warn_if_not_converged
from harmonypy.engine.design import build_design
from harmonypy.engine.harmony import Harmony
from harmonypy.engine.kmeans import SAMPLE_SIZE as _KMEANS_SAMPLE
from harmonypy.engine.options import RunOptions, design_dependent_inputs, local_inputs
from harmonypy.engine.progress import Progress
from harmonypy.engine.reduce import LOCAL, GroupReduction, Reduction
from harmonypy.engine.threads import AutoThreads

logger = logging.getLogger(__name__)

ALGORITHMS = ("harmony1", "harmony2")


class _DefaultInt(int):
    """An int default that remembers the caller did not pass it."""


class _DefaultFloat(float):
    """A float default that remembers the caller did not pass it."""


# Defaults that Harmony2 replaces with its own when the caller leaves them.
_HARMONY2_DEFAULTS: dict[str, Any] = {
    "max_iter_kmeans": 4,
    "epsilon_cluster": 1e-3,
    "epsilon_harmony": 1e-2,
}


def _outcome(ho: Harmony) -> str:
    """The last progress line of a run, by its ``stop_reason``."""
    if ho.stop_reason == "objective":
        return f"converged after {ho.n_iter} iteration(s)"
    if ho.stop_reason == "embedding":
        return (
            f"converged after {ho.n_iter} iteration(s) (the corrected embedding moved "
            f"{ho.embedding_change[-1]:.2g} < epsilon_embedding)"
        )
    if ho.stop_reason == "callback":
        return f"stopped by the callback after {ho.n_iter} iteration(s)"
    return f"reached max_iter_harmony={ho.n_iter} without converging"


def run_harmony(
    data_mat: MatrixLike,
    meta_data: MetadataLike,
    vars_use: str | Sequence[str] | None = None,
    theta: float | ArrayLike | None = None,
    lamb: float | ArrayLike | None = None,
    sigma: float | ArrayLike = 0.1,
    nclust: int | None = None,
    tau: float = 0,
    block_size: float = 0.05,
    max_iter_harmony: int = 10,
    max_iter_kmeans: int = _DefaultInt(20),
    epsilon_cluster: float = _DefaultFloat(1e-5),
    epsilon_harmony: float = _DefaultFloat(1e-4),
    alpha: float = 0.2,
    verbose: bool = True,
    random_state: RandomStateLike = 0,
    device: DeviceLike = None,
    *,
    dtype: DtypeLike = None,
    algorithm: str = "harmony1",
    batch_prop_cutoff: float = 1e-5,
    ncores: int | None = None,
    check_memory: bool = True,
    plot_convergence: bool = False,
    distributed: bool = False,
    process_group: torch.distributed.ProcessGroup | None = None,
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
        The cells' batch variables (rows in the order of ``data_mat``'s cells,
        or paired with them by name when both name the cells).
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
        Float type of the computation and of the results.
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
    check_memory : bool, default True
        Before any heavy work, estimate the run's peak memory from N, d, K, the
        batch levels, dtype, algorithm and device (see
        ``harmonypy.engine.memory.estimate_memory``) and raise ``MemoryError`` when it
        exceeds the available memory (Linux ``MemAvailable`` or the cgroup
        limit; free GPU memory on CUDA). ``False`` skips the check. Where the
        available memory is unknown there is no check.
    plot_convergence : bool, default False
        Draw the objective after the run (needs matplotlib).
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
    kmeans_init : 'greedy' (default) or 'r'
        How the initial centroids are found. 'r' does what the R package
        does: for Harmony 1 ten k-means runs of at most 25 steps, the lowest
        final within-cluster sum of squares kept (``kmeans(nstart = 10,
        iter.max = 25)``), for Harmony2 one k-means++ seeding and 10 Lloyd
        steps. 'greedy' runs ten complete k-means runs from greedy k-means++
        seedings (2 + ln K candidates per centre): the result then moves the
        least with ``random_state`` (measured on the bundled data, see
        docs/convergence.md), as close to R's results.

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

    Returns
    -------
    Harmony
        ``ho.Z_corr.T`` is the corrected (N, d) embedding.

    Raises
    ------
    TypeError
        An argument of the wrong kind (e.g. a non-numeric embedding, a sparse
        matrix); the message names the argument and what it got.
    ValueError
        A value out of range, a shape that does not match ``meta_data``, NaN or
        infinite values, a batch column that does not exist (a
        ``ColumnNotFoundError``, also a ``KeyError``), ...: every refused input
        is listed in ``docs/input-validation.md``. All are raised before the
        run starts.
    MemoryError
        With ``check_memory``: the run's estimated peak memory exceeds the
        memory available.
    FloatingPointError
        The run produced non-finite values (the message names the step, the
        iteration and a remedy).

    Warns
    -----
    ConvergenceWarning
        ``max_iter_harmony`` iterations ran before a convergence test passed.

    Examples
    --------
    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> pcs.shape, meta["donor"].nunique()
    ((1200, 20), 3)
    >>> ho = hm.run_harmony(pcs, meta, "donor", random_state=0, verbose=False)
    >>> ho.Z_corr.T.shape  # the corrected cells x PCs
    (1200, 20)
    >>> ho.converged, ho.stop_reason
    (True, 'objective')
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
    check_callback(callback)
    if distributed:
        # Imported here, not at the top: distributed/ sits above the engine (it
        # calls this module's checks), and a single-process run needs none of it.
        from harmonypy.distributed.checks import distributed_inputs

        group = GroupReduction(process_group)
        reduction: Reduction = group
        checked = distributed_inputs(data_mat, meta_data, vars_use, options, group)
    else:
        reduction = LOCAL
        local = local_inputs(data_mat, meta_data, vars_use, options=options)
        design = build_design(local["frame"], local["names"])
        checked = design_dependent_inputs(local, design)
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
                + (
                    f"; {reduction.world_size} process{'es' if reduction.world_size != 1 else ''} "
                    f"({reduction.backend})"
                    if reduction.distributed
                    else ""
                )
            )
            ho = Harmony(
                cells,
                design,
                theta=checked["theta"],
                lamb=checked["lamb"],
                sigma=checked["sigma"],
                n_clusters=n_clusters,
                block_size=checked["block_size"],
                max_iter_kmeans=checked["max_iter_kmeans"],
                epsilon_cluster=checked["epsilon_cluster"],
                epsilon_harmony=checked["epsilon_harmony"],
                alpha=checked["alpha"],
                seed=checked["seed"],
                device=torch_device,
                dtype=torch_dtype,
                algorithm=algorithm,
                batch_prop_cutoff=checked["batch_prop_cutoff"],
                progress=progress,
                reduction=reduction,
                n_total=n_cells,
                kmeans_init=checked["kmeans_init"],
                epsilon_embedding=checked["epsilon_embedding"],
            )
            sample = min(n_cells, _KMEANS_SAMPLE)
            progress.message(
                f"initial centroids: k-means on {sample:,} sampled cells, then a first "
                f"assignment of all {n_cells:,}"
                if sample < n_cells
                else f"initial centroids: k-means on all {n_cells:,} cells"
            )
            ho.init_cluster()
            progress.message(f"initialised in {progress.elapsed():.1f} s")
            ho._iterate(max_iter_harmony, callback)
            progress.message(f"{_outcome(ho)} in {progress.elapsed():.1f} s")
    ho.n_threads = cpu_threads.threads
    ho.bytes_reduced = reduction.bytes_sent()
    ho.cell_names = checked["cell_names"]
    ho._progress = None
    warn_if_not_converged(ho, max_iter_harmony)
    if checked["plot_convergence"]:
        ho.plot_convergence()
    return ho
