"""Harmony on AnnData objects (scanpy's data structure).

:func:`integrate` reads an embedding from ``adata.obsm``, the batch columns
from ``adata.obs``, runs :func:`harmonypy.run_harmony` and writes the corrected
embedding back to ``adata.obsm``. It only touches ``obsm``, ``obs`` and ``uns``,
so anndata itself is not imported: any object with those three attributes
works (handy in tests and for AnnData look-alikes such as MuData modalities).
Reading and writing ``.h5ad`` files does need anndata; :func:`require_anndata`
gives the installation hint.
"""

from __future__ import annotations

import logging
import numbers
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["integrate", "require_anndata"]

_INSTALL_HINT = "pip install harmonypy[anndata]"


def require_anndata():
    """Import and return the ``anndata`` module, or raise an ImportError with the install hint."""
    try:
        import anndata
    except ImportError as err:
        raise ImportError(
            f"reading or writing .h5ad files needs the anndata package: {_INSTALL_HINT}"
        ) from err
    return anndata


def integrate(
    adata: Any,
    key: str | Sequence[str],
    basis: str = "X_pca",
    adjusted_basis: str = "X_pca_harmony",
    **run_harmony_kwargs: Any,
):
    """Run Harmony on an embedding stored in an AnnData object.

    Parameters
    ----------
    adata : AnnData (or any object with ``obsm``, ``obs`` and ``uns``)
        ``adata.obsm[basis]`` holds the (n_obs, n_pcs) embedding and
        ``adata.obs`` the batch columns. Modified in place.
    key : str or list of str
        Column(s) of ``adata.obs`` to integrate over (``vars_use``).
    basis : str, default "X_pca"
        Key of the input embedding in ``adata.obsm``.
    adjusted_basis : str, default "X_pca_harmony"
        Key under which the corrected embedding is stored in ``adata.obsm``.
    **run_harmony_kwargs
        Passed on to :func:`harmonypy.run_harmony` (``theta``, ``lamb``,
        ``nclust``, ``random_state``, ``algorithm``, ``device``, ...).

    Returns
    -------
    Harmony
        The fitted object (``ho.Z_corr.T`` equals ``adata.obsm[adjusted_basis]``
        up to the float32 cast).

    Notes
    -----
    Writes ``adata.obsm[adjusted_basis]``: float32 array, (n_obs, n_pcs), and
    ``adata.uns["harmony"]``: a dict with ``key``, ``basis``,
    ``adjusted_basis``, ``params`` (the keyword arguments passed),
    ``algorithm``, ``n_iter``, ``converged``, ``objective_harmony``,
    ``kmeans_rounds``, ``n_clusters``, ``batch_levels`` and ``version``
    (all storable in an ``.h5ad`` file).

    Raises
    ------
    TypeError
        If ``adata`` lacks ``obsm``/``obs``/``uns`` or ``key`` is not a string
        or list of strings.
    ValueError
        If ``adjusted_basis`` equals ``basis`` (the input would be overwritten).
    KeyError
        If ``basis`` is not in ``adata.obsm`` or a ``key`` column is not in
        ``adata.obs`` (the message lists what is available).

    Examples
    --------
    >>> import scanpy as sc, harmonypy as hm                    # doctest: +SKIP
    >>> sc.pp.pca(adata)                                        # doctest: +SKIP
    >>> hm.integrate(adata, "donor")                            # doctest: +SKIP
    >>> sc.pp.neighbors(adata, use_rep="X_pca_harmony")         # doctest: +SKIP
    """
    from harmonypy import __version__
    from harmonypy._harmony import run_harmony

    _check_adata(adata)
    if adjusted_basis == basis:
        raise ValueError(
            f"adjusted_basis must differ from basis ({basis!r}): writing the corrected "
            f"embedding there would replace the only copy of the uncorrected one; use e.g. "
            f"adjusted_basis={basis + '_harmony'!r}")
    keys = _as_keys(key)
    embedding = _get_basis(adata, basis)
    _check_obs_columns(adata, keys)

    ho = run_harmony(embedding, adata.obs, keys, **run_harmony_kwargs)
    # The attribute is a transposed view; store a compact C-ordered float32 copy
    # (the usual dtype of X_pca and what scanpy's own wrapper stores).
    adata.obsm[adjusted_basis] = np.ascontiguousarray(ho.Z_corr.T, dtype=np.float32)
    adata.uns["harmony"] = {
        "key": keys,
        "basis": basis,
        "adjusted_basis": adjusted_basis,
        "params": _storable_params(run_harmony_kwargs),
        "algorithm": ho.algorithm,
        "n_iter": int(ho.n_iter),
        "converged": bool(ho.converged),
        "objective_harmony": np.asarray(ho.objective_harmony, dtype=np.float64),
        "kmeans_rounds": np.asarray(ho.kmeans_rounds, dtype=np.int64),
        "n_clusters": int(ho.K),
        "batch_levels": [str(level) for level in ho.batch_levels],
        "version": __version__,
    }
    logger.info("stored the corrected embedding in obsm[%r]", adjusted_basis)
    return ho


# --------------------------------------------------------------------- helpers
def _check_adata(adata: Any) -> None:
    missing = [name for name in ("obsm", "obs", "uns") if not hasattr(adata, name)]
    if missing:
        raise TypeError(
            f"integrate() needs an AnnData object (with .obsm, .obs and .uns); "
            f"got {type(adata).__name__} without {', '.join('.' + m for m in missing)}")


def _as_keys(key: Any) -> list[str]:
    keys = [key] if isinstance(key, str) else list(key) if isinstance(key, (list, tuple)) else None
    if not keys or not all(isinstance(k, str) for k in keys):
        raise TypeError(f"key must be an obs column name or a list of them, got {key!r}")
    return keys


def _get_basis(adata: Any, basis: str) -> np.ndarray:
    obsm_keys = list(adata.obsm.keys())
    if basis not in obsm_keys:
        available = ", ".join(repr(k) for k in obsm_keys) or "none"
        hint = " (run scanpy.pp.pca first)" if basis == "X_pca" else ""
        raise KeyError(f"basis {basis!r} not found in adata.obsm{hint}; available obsm keys: "
                       f"{available}")
    embedding = adata.obsm[basis]
    # obsm may hold a DataFrame or a sparse matrix; Harmony wants dense numbers.
    if hasattr(embedding, "toarray"):
        embedding = embedding.toarray()
    return np.asarray(embedding)


def _check_obs_columns(adata: Any, keys: list[str]) -> None:
    columns = [str(c) for c in adata.obs.columns]
    missing = [k for k in keys if k not in columns]
    if missing:
        raise KeyError(
            f"batch column(s) {', '.join(repr(m) for m in missing)} not found in adata.obs; "
            f"available obs columns: {', '.join(repr(c) for c in columns) or 'none'}")


def _storable(value: Any) -> Any:
    """A value that ``AnnData.write_h5ad`` can store (it rejects None and objects)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (numbers.Integral, numbers.Real, str)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    if isinstance(value, (list, tuple)):
        items = [_storable(v) for v in value]
        if all(isinstance(v, (numbers.Real, np.number)) for v in items):
            return np.asarray(items)
        return [str(v) for v in items]
    return str(value)


def _storable_params(params: dict[str, Any]) -> dict[str, Any]:
    # None means "the default" for every run_harmony argument; leaving it out
    # keeps the record writable to .h5ad without changing its meaning.
    return {name: _storable(value) for name, value in params.items() if value is not None}
