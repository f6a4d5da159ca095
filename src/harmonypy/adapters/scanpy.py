"""scanpy's ``harmony_integrate`` signature on this package's engine.

scanpy 1.13 ships its own NumPy Harmony as ``sc.pp.harmony_integrate``.
:func:`harmony_integrate` takes the same arguments with the same defaults, so
that a notebook switches by replacing ``sc.pp.harmony_integrate(`` with
``hm.harmony_integrate(``. It is a translation, not a second implementation:
every scanpy argument is renamed onto :func:`harmonypy.run_harmony` through
:data:`SCANPY_TO_RUN_HARMONY` (the same table is printed in
``docs/migrating.md``) and the result is written where scanpy writes it.

Where the two implementations differ in their formulas (scanpy's
``flavor="harmony1"`` uses harmony-pytorch's penalty rather than R's, its
``tau`` discount squares the exponential rather than the ratio), this
package follows the R package; ``docs/migrating.md`` lists each difference.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from harmonypy.adapters.anndata import (
    _as_keys,
    _check_adata,
    _check_obs_columns,
    check_distinct_bases,
)
from harmonypy.engine.run import run_harmony

logger = logging.getLogger(__name__)

__all__ = ["SCANPY_TO_RUN_HARMONY", "harmony_integrate", "scanpy_default_clusters"]

#: scanpy argument -> (``run_harmony`` argument, how the value is carried over).
#: Arguments absent here have no counterpart and are handled in the function
#: (``basis``, ``adjusted_basis``, ``flavor``, ``correction_method``).
SCANPY_TO_RUN_HARMONY: dict[str, tuple[str, str]] = {
    "key": ("vars_use", "as is: one obs column or a list of them"),
    "dtype": ("dtype", "float32 or float64; the output has this dtype, as in scanpy"),
    "n_clusters": ("nclust", "None becomes scanpy's max(2, int(min(100, N / 30)))"),
    "max_iter_harmony": ("max_iter_harmony", "as is"),
    "max_iter_clustering": ("max_iter_kmeans", "as is"),
    "tol_harmony": ("epsilon_harmony", "as is"),
    "tol_clustering": ("epsilon_cluster", "as is"),
    "sigma": ("sigma", "as is"),
    "theta": ("theta", "as is: one value, one per key, or one per batch level"),
    "tau": ("tau", "as is (R's discount formula, see docs/migrating.md)"),
    "ridge_lambda": ("lamb", "harmony1 only; harmony2 estimates lambda (lamb=-1)"),
    "alpha": ("alpha", "harmony2 only"),
    "batch_prune_threshold": ("batch_prop_cutoff", "harmony2 only; None becomes 0 (no pruning)"),
    "block_proportion": ("block_size", "as is"),
    "rng": (
        "random_state",
        "an int as is; a Generator, BitGenerator, SeedSequence or "
        "sequence of ints is drawn from once; None draws fresh entropy",
    ),
}

_FLAVORS = {"harmony1": "harmony1", "harmony2": "harmony2"}


def scanpy_default_clusters(n_cells: int) -> int:
    """scanpy's default number of clusters: ``max(2, int(min(100, N / 30)))``.

    R (and :func:`run_harmony`) round ``N / 30`` instead of truncating it; the
    scanpy rule is kept here so that a switched notebook gets the same K.
    """
    return max(2, int(min(100, n_cells / 30)))


def _seed_from_rng(rng: Any) -> Any:
    """What ``run_harmony(random_state=...)`` gets for scanpy's ``rng``.

    scanpy passes ``rng`` to ``np.random.default_rng``; an int stays an int (so
    ``rng=0`` equals ``run_harmony(random_state=0)``), ``None`` stays ``None``
    (fresh entropy, as in scanpy) and anything else ``default_rng`` takes
    becomes a Generator that ``run_harmony`` draws its seed from. A Generator
    or BitGenerator the caller passed is advanced, as scanpy advances it.
    """
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (bool, np.bool_)):
        raise TypeError(f"rng must be None, an int or a numpy Generator, got {rng!r}")
    if isinstance(rng, numbers.Integral):
        if rng < 0:
            raise ValueError(f"rng must be >= 0 when it is an int, got {rng}")
        return int(rng)
    if isinstance(rng, np.random.RandomState):
        return rng
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"rng must be None, an int, a sequence of ints, a numpy SeedSequence, "
            f"BitGenerator or Generator, got {type(rng).__name__}: {err}"
        ) from err


def _embedding(adata: Any, basis: str) -> np.ndarray:
    """``adata.obsm[basis]`` as an array, or scanpy's ValueError naming what is there."""
    obsm_keys = list(adata.obsm.keys())
    if basis not in obsm_keys:
        raise ValueError(
            f"The specified basis {basis!r} is not available in `adata.obsm`. "
            f"Available bases: {obsm_keys}"
            + (" (run scanpy.pp.pca first)" if basis == "X_pca" else "")
        )
    embedding = adata.obsm[basis]
    if hasattr(embedding, "toarray"):  # sparse obsm entries are refused downstream
        return embedding
    return np.asarray(embedding)


def _dtype(dtype: Any) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(
            f"dtype must be a NumPy float dtype (np.float32 or np.float64), got {dtype!r}"
        ) from err
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be np.float32 or np.float64, got {resolved}")
    return resolved


def harmony_integrate(
    adata: Any,
    key: str | Sequence[str],
    *,
    basis: str = "X_pca",
    adjusted_basis: str = "X_pca_harmony",
    dtype: Any = np.float64,
    flavor: str = "harmony2",
    n_clusters: int | None = None,
    max_iter_harmony: int = 10,
    max_iter_clustering: int = 200,
    tol_harmony: float = 1e-4,
    tol_clustering: float = 1e-5,
    sigma: float = 0.1,
    theta: float | Sequence[float] = 2.0,
    tau: int = 0,
    ridge_lambda: float = 1.0,
    alpha: float = 0.2,
    batch_prune_threshold: float | None = 1e-5,
    correction_method: str = "fast",
    block_proportion: float = 0.05,
    rng: Any = None,
    device: Any = None,
    verbose: bool = True,
    ncores: int | None = None,
    callback: Any = None,
) -> None:
    """Integrate ``adata.obsm[basis]`` over batches, with scanpy's arguments.

    A drop-in for ``scanpy.pp.harmony_integrate`` (scanpy 1.13): the same
    parameters, defaults and output, computed by this package's engine. Every
    scanpy parameter is renamed onto :func:`harmonypy.run_harmony` through
    :data:`SCANPY_TO_RUN_HARMONY`; the parameters after ``rng`` are this
    package's own.

    Parameters
    ----------
    adata : AnnData
        ``adata.obsm[basis]`` holds the (n_obs, n_pcs) embedding and
        ``adata.obs`` the batch columns. Modified in place.
    key : str or list of str
        ``adata.obs`` column(s) with the batch labels; several keys are
        separate batch variables.
    basis, adjusted_basis : str
        Input and output keys of ``adata.obsm``. They must differ (this
        package refuses to overwrite the only copy of the uncorrected PCs;
        scanpy would overwrite it).
    dtype : np.float64 (default) or np.float32
        Precision of the computation and of the stored result. ``np.float32``
        is this package's own default elsewhere and about twice as fast.
    flavor : {"harmony2", "harmony1"}
        ``"harmony2"``: R harmony 2.0's algorithm (stabilised diversity term,
        lambda estimated per cluster and batch as ``alpha * E``, pruning of
        batch-cluster pairs). ``"harmony1"``: R harmony 1.2's algorithm with a
        fixed ridge penalty ``ridge_lambda``.
    n_clusters : int, optional
        Number of clusters; default ``max(2, int(min(100, n_obs / 30)))``.
    max_iter_harmony, max_iter_clustering : int
        Most Harmony iterations, and most clustering rounds per iteration.
    tol_harmony, tol_clustering : float
        Relative objective changes below which they stop.
    sigma : float
        Soft-clustering bandwidth.
    theta : float or sequence of float
        Diversity penalty: one value, one per key, or one per batch level.
    tau : float
        Discount of ``theta`` for small batches (0: none).
    ridge_lambda : float
        Ridge penalty; used only with ``flavor="harmony1"`` (a warning otherwise).
    alpha : float
        Scale of the estimated ridge penalty; ``flavor="harmony2"`` only.
    batch_prune_threshold : float or None
        A batch takes part in a cluster's correction only if more than this
        fraction of its cells is in the cluster; ``None`` prunes nothing.
        ``flavor="harmony2"`` only.
    correction_method : "fast"
        The only value scanpy accepts. This package solves one batch variable
        in closed form and several with the largest one eliminated exactly.
    block_proportion : float
        Fraction of cells updated at once in the clustering rounds.
    rng : None, int, sequence of int, SeedSequence, BitGenerator or Generator
        Seed of the k-means start and the cell shuffles. An int gives the
        same result as ``run_harmony(random_state=rng)``; ``None`` is not
        reproducible (as in scanpy).
    device : None, "cpu", "cuda", "mps" or torch.device
        Where to compute (None: CUDA, then MPS, then the CPU).
    verbose : bool, default True
        Progress on stderr (see :func:`run_harmony`).
    ncores : int, optional
        CPU threads (default: the package's thread policy).
    callback : callable, optional
        Called after every Harmony iteration, as ``run_harmony(callback=...)``;
        returning True stops the run.

    Returns
    -------
    None
        As scanpy: ``adata.obsm[adjusted_basis]`` holds the corrected
        (n_obs, n_pcs) embedding in ``dtype``. Nothing else is written.

    Raises
    ------
    ValueError
        Unknown ``flavor`` or ``correction_method``; ``basis`` missing from
        ``obsm`` (the message lists the available keys, as scanpy's does);
        ``adjusted_basis == basis``; any value :func:`run_harmony` refuses.
    KeyError
        A ``key`` column missing from ``obs`` (the message lists the columns).
    TypeError
        An argument this function does not have (as for any Python function).

    Examples
    --------
    Where scanpy's code reads ``sc.pp.harmony_integrate(adata, "donor")``:

    >>> import anndata as ad
    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> adata = ad.AnnData(obs=meta.set_index("cell_id"), obsm={"X_pca": pcs.to_numpy()})
    >>> hm.harmony_integrate(adata, "donor", rng=0, verbose=False)
    >>> adata.obsm["X_pca_harmony"].shape, adata.obsm["X_pca_harmony"].dtype
    ((1200, 20), dtype('float64'))
    """
    if flavor not in _FLAVORS:
        raise ValueError(f"flavor must be 'harmony1' or 'harmony2', got {flavor!r}.")
    if correction_method != "fast":
        raise ValueError(f"correction_method must be 'fast', got {correction_method!r}.")
    harmony2 = flavor == "harmony2"
    # scanpy's warnings for arguments the chosen flavor ignores, word for word in meaning.
    if harmony2 and ridge_lambda != 1.0:
        warnings.warn(
            "ridge_lambda is ignored when flavor='harmony2'; "
            "use alpha to control regularization strength.",
            UserWarning,
            stacklevel=2,
        )
    if not harmony2:
        if alpha != 0.2:
            warnings.warn(
                "alpha is ignored when flavor='harmony1'; use ridge_lambda instead.",
                UserWarning,
                stacklevel=2,
            )
        if batch_prune_threshold != 1e-5:
            warnings.warn(
                "batch_prune_threshold is ignored when flavor='harmony1'.",
                UserWarning,
                stacklevel=2,
            )

    _check_adata(adata, caller="harmony_integrate()")
    check_distinct_bases(basis, adjusted_basis)
    keys = _as_keys(key)
    embedding = _embedding(adata, basis)
    _check_obs_columns(adata, keys)
    out_dtype = _dtype(dtype)

    kwargs: dict[str, Any] = dict(
        nclust=scanpy_default_clusters(len(adata.obs)) if n_clusters is None else n_clusters,
        max_iter_harmony=max_iter_harmony,
        max_iter_kmeans=max_iter_clustering,
        epsilon_harmony=tol_harmony,
        epsilon_cluster=tol_clustering,
        sigma=sigma,
        theta=theta,
        tau=tau,
        block_size=block_proportion,
        random_state=_seed_from_rng(rng),
        device=device,
        dtype=str(out_dtype),
        verbose=verbose,
        ncores=ncores,
        algorithm=_FLAVORS[flavor],
        callback=callback,
    )
    if harmony2:
        kwargs.update(
            lamb=-1,
            alpha=alpha,
            batch_prop_cutoff=0.0 if batch_prune_threshold is None else batch_prune_threshold,
        )
    else:
        kwargs.update(lamb=ridge_lambda)

    ho = run_harmony(embedding, adata.obs, keys, **kwargs)
    adata.obsm[adjusted_basis] = ho.result(dtype=out_dtype)  # no copy when it can be avoided
    logger.info(
        "stored the corrected embedding in obsm[%r] (%s, %s)", adjusted_basis, flavor, out_dtype
    )
