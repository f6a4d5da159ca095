"""Harmony on AnnData objects (scanpy's data structure).

:func:`integrate` reads an embedding from ``adata.obsm``, the batch columns
from ``adata.obs``, runs :func:`harmonypy.run_harmony` and writes the corrected
embedding back to ``adata.obsm``. It only touches ``obsm``, ``obs`` and ``uns``,
so anndata itself is not imported: any object with those three attributes
works (handy in tests and for AnnData look-alikes such as MuData modalities).
Reading and writing ``.h5ad`` files does need anndata
(:func:`harmonypy._optional.require_anndata` gives the installation hint).

Reference mapping on AnnData goes through here too, called by the public
functions of :mod:`harmonypy.adapters.mapping_api` when given AnnData:
:func:`reference_from_anndata` (``build_reference(adata, key, ...)``),
:func:`map_anndata` (``map_query(adata_query, ref, ...)``) and
:func:`transfer_anndata` (``transfer_labels(adata_query, ref, label)`` on a
mapped query). They read and write ``obs``/``obsm``/``uns`` and call the array
layer (:mod:`harmonypy.mapping.reference`, :mod:`harmonypy.mapping.query`,
:mod:`harmonypy.mapping.transfer`), which never imports this module. The gene
projection they keep and apply is :mod:`harmonypy.mapping.projection`'s; the
AnnData it needs (loadings, gene table, expression matrix) is read here
(:func:`gene_projection`, :func:`read_expression`).
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from harmonypy import __version__
from harmonypy.adapters.mapping_record import (
    MAPPING_KEY,
    PROJECTED_BASIS,
    SCORE_COLUMN,
    check_replaceable,
    label_columns,
    mapping_record,
    write_transfer,
)
from harmonypy.distributed.launch import GatheredRun, run_in_processes
from harmonypy.engine import validation as val
from harmonypy.engine.design import check_columns
from harmonypy.engine.device import resolve_device, resolve_dtype
from harmonypy.engine.harmony import Harmony
from harmonypy.engine.run import run_harmony
from harmonypy.mapping import query as _mapping
from harmonypy.mapping import reference as _reference
from harmonypy.mapping import transfer as _transfer
from harmonypy.mapping.projection import (
    Expression,
    GeneProjection,
    fit_projection,
    gene_scaling,
    kept_genes,
    project,
)
from harmonypy.mapping.reference import Reference, reference_digest

logger = logging.getLogger(__name__)

__all__ = [
    "LabelRequest",
    "ObsmKeys",
    "check_distinct_bases",
    "gene_projection",
    "get_basis",
    "integrate",
    "map_anndata",
    "read_expression",
    "reference_from_anndata",
    "transfer_anndata",
]


def integrate(
    adata: Any,
    key: str | Sequence[str],
    basis: str = "X_pca",
    adjusted_basis: str = "X_pca_harmony",
    *,
    nproc: int = 1,
    **run_harmony_kwargs: Any,
) -> Harmony | GatheredRun:
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
    nproc : int, default 1
        Run as that many local processes of one ``torch.distributed`` group,
        each on a contiguous shard of the cells (what ``harmonypy run
        --nproc`` does; see ``docs/distributed.md``). The processes
        are fresh interpreters that never import the calling script, so a
        script needs no ``if __name__ == "__main__":`` guard (it does no
        harm). Ctrl-C, or any failure of one process, stops them all within
        seconds; errors name cells by their number in ``adata`` (and their
        ``obs_names``), not by their row within a process's shard.
    **run_harmony_kwargs
        Passed on to :func:`harmonypy.run_harmony` (``theta``, ``lamb``,
        ``nclust``, ``random_state``, ``algorithm``, ``device``, ...).

    Returns
    -------
    Harmony, or GatheredRun when ``nproc > 1``
        The fitted object (``ho.Z_corr.T`` equals ``adata.obsm[adjusted_basis]``
        up to the float32 cast). With ``nproc > 1`` a
        ``harmonypy.distributed.launch.GatheredRun``: ``Z_corr`` (d x N), ``result()``,
        ``N``, ``d`` and the run's global state (``n_iter``, ``converged``,
        ``objective_harmony``, ``kmeans_rounds``, ``K``, ``algorithm``,
        ``batch_levels``) as a Harmony object has them, plus ``world_size``
        and ``backend``; the per-cell clustering state (``R``, ``Z_cos``, ...)
        stays in the processes and is not returned.

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

    Notes
    -----
    Writes ``adata.obsm[adjusted_basis]``: float32 array, (n_obs, n_pcs), and
    ``adata.uns["harmony"]``: a dict with ``key``, ``basis``,
    ``adjusted_basis``, ``params`` (the keyword arguments passed),
    ``algorithm``, ``n_iter``, ``converged``, ``objective_harmony``,
    ``kmeans_rounds``, ``n_clusters``, ``batch_levels`` and ``version``
    (all storable in an ``.h5ad`` file).

    Examples
    --------
    The bundled PBMCs as AnnData (after ``sc.pp.pca(adata)`` the PCs are in
    ``obsm["X_pca"]`` too); scanpy's neighbours then use the corrected PCs
    with ``sc.pp.neighbors(adata, use_rep="X_pca_harmony")``:

    >>> import anndata as ad
    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> adata = ad.AnnData(obs=meta.set_index("cell_id"), obsm={"X_pca": pcs.to_numpy()})
    >>> ho = hm.integrate(adata, "donor", verbose=False)
    >>> adata.obsm["X_pca_harmony"].shape, adata.uns["harmony"]["converged"]
    ((1200, 20), True)
    """
    _check_adata(adata)
    check_distinct_bases(basis, adjusted_basis)
    keys = _as_keys(key)
    embedding = get_basis(adata, basis)
    _check_obs_columns(adata, keys)

    nproc = _check_nproc(nproc, len(adata.obs))
    ho: Harmony | GatheredRun
    if nproc > 1:
        ho = run_in_processes(np.asarray(embedding), adata.obs, keys, nproc, **run_harmony_kwargs)
    else:
        ho = run_harmony(embedding, adata.obs, keys, **run_harmony_kwargs)
    # float32 (the usual dtype of X_pca and what scanpy's own wrapper stores):
    # the engine's own array when the run was float32 on the CPU (no copy),
    # else filled chunk by chunk (no float64 copy on the way).
    adata.obsm[adjusted_basis] = ho.result(dtype=np.float32)
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
def _check_adata(adata: Any, caller: str = "integrate()") -> None:
    missing = [name for name in ("obsm", "obs", "uns") if not hasattr(adata, name)]
    if missing:
        raise TypeError(
            f"{caller} needs an AnnData object (with .obsm, .obs and .uns); "
            f"got {type(adata).__name__} without {', '.join('.' + m for m in missing)}"
        )


def check_distinct_bases(
    basis: str, adjusted_basis: str, *, names: tuple[str, str] = ("basis", "adjusted_basis")
) -> None:
    """Refuse to write the corrected embedding over the only uncorrected copy.

    Every writer of a corrected embedding into ``obsm`` checks this (the
    functions here, scanpy's wrapper and the command line, which passes its
    option names as ``names``), so the message is the same everywhere.
    """
    if adjusted_basis == basis:
        basis_name, adjusted_name = names
        assign = " " if adjusted_name.startswith("-") else "="
        raise ValueError(
            f"{adjusted_name} must differ from {basis_name} ({basis!r}): writing the corrected "
            f"embedding there would replace the only copy of the uncorrected one; use e.g. "
            f"{adjusted_name}{assign}{basis + '_harmony'!r}"
        )


def _as_keys(key: Any) -> list[str]:
    keys = [key] if isinstance(key, str) else list(key) if isinstance(key, (list, tuple)) else None
    if not keys or not all(isinstance(k, str) for k in keys):
        raise TypeError(f"key must be an obs column name or a list of them, got {key!r}")
    return keys


def get_basis(adata: Any, basis: str) -> np.ndarray:
    """``adata.obsm[basis]`` as a dense array; a KeyError listing the ``obsm`` keys
    (and, for ``X_pca``, that ``scanpy.pp.pca`` makes it) when it is missing."""
    obsm_keys = list(adata.obsm.keys())
    if basis not in obsm_keys:
        available = ", ".join(repr(k) for k in obsm_keys) or "none"
        hint = " (run scanpy.pp.pca first)" if basis == "X_pca" else ""
        raise KeyError(
            f"basis {basis!r} not found in adata.obsm{hint}; available obsm keys: {available}"
        )
    embedding = adata.obsm[basis]
    # obsm may hold a DataFrame or a sparse matrix; Harmony wants dense numbers.
    if hasattr(embedding, "toarray"):
        embedding = embedding.toarray()
    return np.asarray(embedding)


def read_expression(adata: Any, layer: str | None, what: str) -> Expression:
    """``adata.X`` or ``adata.layers[layer]`` with its gene and cell names, as
    the array layer's :class:`~harmonypy.mapping.projection.Expression`;
    refused when absent or not (n_obs, n_vars). ``what`` names ``adata`` in messages."""
    if layer is not None:
        layers = getattr(adata, "layers", None)
        if layers is None or layer not in layers.keys():
            available = ", ".join(repr(k) for k in (layers.keys() if layers is not None else []))
            raise KeyError(
                f"layer {layer!r} not found in {what}.layers; available layers: "
                f"{available or 'none'}"
            )
        matrix, name = layers[layer], f"{what}.layers[{layer!r}]"
    else:
        matrix, name = getattr(adata, "X", None), f"{what}.X"
    if matrix is None:
        raise ValueError(
            f"{name} is empty (None): the expression matrix is needed to "
            f"project cells through the PCA loadings"
        )
    shape = getattr(matrix, "shape", None)
    n_obs, n_vars = len(adata.obs), len(adata.var_names)
    if shape is None or len(shape) != 2 or tuple(shape) != (n_obs, n_vars):
        raise ValueError(
            f"{name} has shape {shape}; expected (n_obs, n_vars) = ({n_obs}, {n_vars})"
        )
    return Expression(
        matrix=matrix,
        source=name,
        genes=pd.Index(adata.var_names).astype(str),
        cells=pd.Index(adata.obs_names),
    )


def gene_projection(
    adata: Any, basis: str, pcs: np.ndarray, *, loadings: str = "PCs", layer: str | None = None
) -> GeneProjection:
    """The :class:`~harmonypy.mapping.projection.GeneProjection` of an AnnData
    reference, checked on its own cells (:func:`~harmonypy.mapping.projection.fit_projection`).

    Reads ``adata.varm[loadings]`` (n_vars x d, the PCA's loadings), the
    scaling in ``adata.var["mean"]``/``["std"]`` when it was scaled, and the
    matrix the PCA was computed from in ``X`` (or ``layers[layer]``);
    ``pcs`` is ``adata.obsm[basis]``. Checks run in that order, each message
    naming what is missing and how to provide it (KeyError for a missing
    ``varm`` key or layer, ValueError otherwise).
    """
    varm = getattr(adata, "varm", None)
    if varm is None or loadings not in varm.keys():
        available = ", ".join(repr(k) for k in (varm.keys() if varm is not None else []))
        raise KeyError(
            f"adata.varm has no {loadings!r} (the PCA loadings, genes x PCs, which "
            f"sc.pp.pca writes): without them query cells cannot be projected from genes; "
            f"run sc.pp.pca on the reference, or pass loadings=None to keep no gene projection "
            f"(queries must then be given in the reference's PC space, map_query(..., "
            f"basis=...)); available varm keys: {available or 'none'}"
        )
    weights = varm[loadings]
    weights = np.asarray(weights.toarray() if hasattr(weights, "toarray") else weights)
    kept = kept_genes(
        weights,
        genes=pd.Index(adata.var_names).astype(str),
        d=pcs.shape[1],
        basis=basis,
        loadings=loadings,
    )
    scaling = gene_scaling(adata.var, kept)
    return fit_projection(
        read_expression(adata, layer, "adata"),
        pcs=pcs,
        weights=weights,
        kept=kept,
        scaling=scaling,
        keys=(basis, loadings),
    )


def _check_obs_columns(adata: Any, keys: list[str]) -> None:
    check_columns(
        [str(c) for c in adata.obs.columns],
        keys,
        what="batch column(s)",
        where="adata.obs",
        as_list=False,
    )


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


# ========================================================== reference mapping
@dataclass(frozen=True)
class ObsmKeys:
    """Where a mapping on AnnData reads and writes; None: the call's default.

    ``basis``/``adjusted_basis``: ``obsm`` keys of the PCs and of the corrected
    PCs; ``layer``: the expression matrix in ``layers`` (default ``X``);
    ``loadings``: the ``varm`` key of the PCA loadings (references only).
    """

    basis: str | None = None
    adjusted_basis: str | None = None
    layer: str | None = None
    loadings: str | None = None


@dataclass(frozen=True)
class LabelRequest:
    """Reference label columns to transfer into a mapped query's ``obs``, and the
    vote's ``k`` and ``min_probability`` (None: 5 and 0.5)."""

    labels: Any = None
    k: int | None = None
    min_probability: float | None = None


def reference_from_anndata(
    adata: Any,
    key,
    *,
    labels,
    keep_cells,
    keys: ObsmKeys,
    options: dict[str, Any],
    run_harmony_kwargs: dict[str, Any],
):
    """``build_reference(adata, key, ...)``: Harmony through :func:`integrate`, plus
    the gene projection (see :func:`harmonypy.build_reference`).

    Everything is checked (obs columns, labels, the gene projection on the
    reference's own cells) before Harmony runs. ``options`` are the one-batch
    clustering's (``nclust``, ``sigma``, ...), also passed to Harmony.
    """
    _check_adata(adata, "build_reference(adata, ...)")
    basis = "X_pca" if keys.basis is None else keys.basis
    adjusted_basis = "X_pca_harmony" if keys.adjusted_basis is None else keys.adjusted_basis
    check_distinct_bases(basis, adjusted_basis)
    batch_keys = None if key is None else _as_keys(key)
    embedding = get_basis(adata, basis)
    if batch_keys:
        _check_obs_columns(adata, batch_keys)
    keep_cells = val.check_flag("keep_cells", keep_cells)
    label_names = _reference.label_names(labels)
    if label_names and not keep_cells:
        raise ValueError(
            f"labels={label_names} needs keep_cells=True: labels are kept per reference cell"
        )
    check_columns(
        adata.obs.columns, label_names, what="label column(s)", where="adata.obs", as_list=False
    )
    projection = (
        None
        if keys.loadings is None
        else gene_projection(adata, basis, embedding, loadings=keys.loadings, layer=keys.layer)
    )
    if batch_keys:
        kwargs = {**{k: v for k, v in options.items() if v is not None}, **run_harmony_kwargs}
        kwargs.setdefault("verbose", False)
        ho = integrate(adata, batch_keys, basis=basis, adjusted_basis=adjusted_basis, **kwargs)
        ref = _reference.build_reference(ho, adata.obs, labels=label_names, keep_cells=keep_cells)
    else:
        run_harmony_kwargs = {k: v for k, v in run_harmony_kwargs.items() if k != "verbose"}
        if run_harmony_kwargs:
            raise TypeError(
                f"{', '.join(run_harmony_kwargs)}: Harmony parameters, but key is "
                f"None (one batch: the cells are clustered, not integrated)"
            )
        ref = _reference.build_reference(
            embedding, adata.obs, labels=label_names, keep_cells=keep_cells, **options
        )
        # The cells are their own corrected embedding: stored under adjusted_basis
        # so that reference and mapped query share one key.
        adata.obsm[adjusted_basis] = np.ascontiguousarray(embedding, dtype=np.float32)
    ref.projection, ref.basis, ref.adjusted_basis = projection, basis, adjusted_basis
    return ref


def map_anndata(
    adata: Any,
    ref,
    key,
    *,
    keys: ObsmKeys,
    transfer: LabelRequest,
    map_options: dict[str, Any],
    overwrite: bool = False,
):
    """``map_query(adata_query, ref, key, ...)``: project (or read) the query's
    PCs, map them, and write the results into ``adata``.

    Everything is computed before ``adata`` is modified, so an error leaves it
    as it was. Entries that no earlier mapping wrote are not replaced unless
    ``overwrite`` (:func:`~harmonypy.adapters.mapping_record.check_replaceable`).
    ``map_options`` are :func:`harmonypy.mapping.query.map_query`'s keyword arguments.
    """
    batch_keys, adjusted = _check_map_target(adata, ref, key, keys)
    basis = keys.basis
    label_names = _reference.label_names(transfer.labels)
    k, min_probability = _transfer_options(ref, label_names, transfer.k, transfer.min_probability)
    confidence = val.check_flag("confidence", map_options.get("confidence", True))
    cells = None if basis is None else get_basis(adata, basis)
    check_replaceable(
        adata,
        ([PROJECTED_BASIS] if basis is None else []) + [adjusted],
        ([SCORE_COLUMN] if confidence else []) + label_columns(label_names),
        overwrite=overwrite,
        adjusted_basis=adjusted,
    )

    n_missing = None
    if basis is None:
        device = resolve_device(map_options.get("device"))
        dtype = resolve_dtype(map_options.get("dtype"), device)
        cells, n_missing = project(
            ref.projection,
            read_expression(adata, keys.layer, "adata_query"),
            device=device,
            dtype=dtype,
        )
    source = (
        f"adata_query.obsm[{basis!r}]"
        if basis is not None
        else "the query projected from its genes"
    )
    with _named_cells(source):
        q = _mapping.map_query(cells, adata.obs, ref, vars_use=batch_keys, **map_options)
    transfers = {
        name: _transfer.transfer_labels(q, ref, name, k=k, min_probability=min_probability)
        for name in label_names
    }

    if basis is None:
        adata.obsm[PROJECTED_BASIS] = np.ascontiguousarray(cells, dtype=np.float32)
    adata.obsm[adjusted] = np.ascontiguousarray(q.result(), dtype=np.float32)
    if q.confidence is not None:
        adata.obs[SCORE_COLUMN] = np.asarray(q.confidence, dtype=np.float64)
    record = mapping_record(
        q, ref, basis=basis, adjusted=adjusted, keys=batch_keys, n_missing=n_missing
    )
    for name, table in transfers.items():
        write_transfer(adata, record, name, table, k, float(min_probability))
    adata.uns[MAPPING_KEY] = record
    return q


def _check_map_target(adata: Any, ref, key, keys: ObsmKeys) -> tuple[list[str] | None, str]:
    """The query's batch columns and the ``obsm`` key of the corrected query, after
    checking the query, the reference and where the cells come from."""
    _check_adata(adata, "map_query(adata_query, ...)")
    if len(adata.obs) == 0:
        raise ValueError(
            "adata_query has no cells (0 rows in obs); expected at least one cell to map"
        )
    if not isinstance(ref, Reference):
        raise TypeError(
            f"ref must be a harmonypy Reference (build_reference or "
            f"load_reference), not {type(ref).__name__}"
        )
    batch_keys = None if key is None else _as_keys(key)
    if batch_keys:
        _check_obs_columns(adata, batch_keys)
    basis, layer = keys.basis, keys.layer
    adjusted = keys.adjusted_basis or ref.adjusted_basis or "X_pca_harmony"
    if basis is not None:
        check_distinct_bases(basis, adjusted)
    if basis is None:
        if ref.projection is None:
            raise ValueError(
                "the reference keeps no gene projection (it was built from an embedding or a "
                "Harmony run, or with loadings=None), so the query cannot be projected from "
                "its genes: give the query's cells in the reference's PC space with basis=KEY "
                "(an obsm key)"
            )
        if adjusted == PROJECTED_BASIS:
            raise ValueError(
                f"adjusted_basis {adjusted!r} is where the projected, uncorrected "
                f"query goes; choose another key"
            )
    elif layer is not None:
        raise ValueError(
            f"layer={layer!r} is for a query projected from genes; with "
            f"basis={basis!r} the cells are read from obsm"
        )
    return batch_keys, adjusted


def _transfer_options(ref, label_names, k, min_probability) -> tuple[int, float]:
    """``(k, min_probability)`` of the labels to transfer, checked before the mapping:
    each a label column of ``ref`` with at least ``k`` labelled cells."""
    for name in label_names:
        if name not in ref.label_columns:
            raise ValueError(
                f"label {name!r} is not a label column of the reference; it has "
                f"{ref.label_columns or 'none'} (build_reference(..., labels=[...]))"
            )
    if label_names and ref.cells is None:
        raise ValueError(
            "the reference keeps no cells (built with keep_cells=False): label "
            "transfer needs them; rebuild it with keep_cells=True"
        )
    k = 5 if k is None else val.check_int("k", k, 1)
    for name in label_names:
        labelled = int((ref.labels[name].cat.codes >= 0).sum())
        if labelled == 0:
            raise ValueError(f"no reference cell has a {name!r} label")
        val.check_int("k", k, 1, labelled, maximum_is=f"the reference cells labelled in {name!r}")
    min_probability = (
        0.5 if min_probability is None else val.check_real("min_probability", min_probability)
    )
    if not 0 <= min_probability <= 1:
        raise ValueError(f"min_probability must be in [0, 1], got {min_probability}")
    return k, min_probability


@contextlib.contextmanager
def _named_cells(source: str):
    """Errors about map_query's ``data_mat`` name where an AnnData query's cells
    came from (``adata_query.obsm['X_pca']``): the caller never passed a data_mat."""
    try:
        yield
    except ValueError as err:
        text = str(err)
        if not text.startswith("data_mat "):
            raise
        raise ValueError(source + text[len("data_mat") :]) from err


def transfer_anndata(
    adata: Any, ref, label, *, k: int, min_probability: float, device, overwrite: bool = False
):
    """``transfer_labels(adata_query, ref, label)``: labels for a query mapped by
    ``map_query(adata_query, ref)``, from its ``obsm[adjusted_basis]`` (as
    recorded in ``uns["harmony_mapping"]``), written into ``obs`` as
    ``map_query(..., labels=label)`` writes them. Everything is checked and
    computed before ``adata`` is modified; columns that no earlier mapping wrote
    are not replaced unless ``overwrite``.
    """
    _check_adata(adata, "transfer_labels(adata_query, ...)")
    record = adata.uns.get(MAPPING_KEY)
    if not isinstance(record, dict) or "adjusted_basis" not in record:
        raise ValueError(
            f"adata_query has no uns[{MAPPING_KEY!r}]: it has not been mapped. Map it first "
            f"with map_query(adata_query, ref) (labels=... transfers labels in the same "
            f"call), or pass its corrected embedding as an array"
        )
    adjusted = str(record["adjusted_basis"])
    if adjusted not in adata.obsm:
        raise KeyError(
            f"adata_query.obsm has no {adjusted!r}, where uns[{MAPPING_KEY!r}] "
            f"says map_query wrote the corrected query; map it again with "
            f"map_query(adata_query, ref)"
        )
    digest = record.get("reference_digest")
    if digest is not None and str(digest) != reference_digest(ref):
        raise ValueError(
            f"adata_query was mapped onto another reference (uns[{MAPPING_KEY!r}] records "
            f"reference_digest {str(digest)!r}, this reference's is {reference_digest(ref)!r}): "
            f"transfer labels from the reference it was mapped onto, or map it onto this "
            f"one with map_query(adata_query, ref)"
        )
    check_replaceable(
        adata, [], label_columns([label]) if isinstance(label, str) else [], overwrite=overwrite
    )
    cells = np.asarray(adata.obsm[adjusted])
    if cells.ndim != 2 or cells.shape[1] != ref.d:
        raise ValueError(
            f"adata_query.obsm[{adjusted!r}] has shape {cells.shape}, but the "
            f"reference has {ref.d} PCs: map it onto this reference with "
            f"map_query(adata_query, ref)"
        )
    with _named_cells(f"adata_query.obsm[{adjusted!r}]"):
        table = _transfer.transfer_labels(
            cells, ref, label, k=k, min_probability=min_probability, device=device
        )
    table.index = adata.obs_names if hasattr(adata, "obs_names") else adata.obs.index
    write_transfer(adata, record, label, table, k, float(min_probability))
    adata.uns[MAPPING_KEY] = record
    return table


def _check_nproc(nproc, n_cells: int) -> int:
    if isinstance(nproc, bool) or not isinstance(nproc, (int, np.integer)) or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
    return int(nproc)
