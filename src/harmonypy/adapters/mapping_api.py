"""The public mapping functions: :func:`build_reference`, :func:`map_query` and
:func:`transfer_labels`, on arrays or on AnnData.

This is the adapter layer's front: an AnnData argument goes to
:mod:`harmonypy.adapters.anndata` (which reads and writes ``obs``/``obsm``/``uns`` and
projects genes), anything else to the array layer
(:mod:`harmonypy.mapping.reference`, :mod:`harmonypy.mapping.query`), which knows nothing
of AnnData. The array layer never calls back up here, so the two import each
other in one direction only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from numpy.typing import ArrayLike

from harmonypy._typing import (
    AnnDataLike,
    DeviceLike,
    DtypeLike,
    MatrixLike,
    MetadataLike,
    RandomStateLike,
)
from harmonypy.adapters import anndata as _anndata
from harmonypy.engine.harmony import Harmony
from harmonypy.mapping import query as _mapping
from harmonypy.mapping import reference as _reference
from harmonypy.mapping import transfer as _transfer
from harmonypy.mapping.query import MappedQuery
from harmonypy.mapping.reference import Reference

__all__ = ["build_reference", "map_query", "transfer_labels"]


def is_anndata(source: Any) -> bool:
    """AnnData or a look-alike (``obs`` and ``obsm``), as :func:`~harmonypy.integrate` accepts."""
    return hasattr(source, "obsm") and hasattr(source, "obs")


def _refuse_anndata_only(given: dict[str, Any], message: str, *, extra: Sequence[str] = ()) -> None:
    """TypeError naming the AnnData-only arguments given (not None), and ``extra`` names."""
    named = [name for name, value in given.items() if value is not None] + list(extra)
    if named:
        raise TypeError(f"{', '.join(named)}: {message}")


def build_reference(
    source: Harmony | MatrixLike | AnnDataLike,
    meta_data: MetadataLike | str | Sequence[str] | None = None,
    labels: str | Sequence[str] | None = None,
    keep_cells: bool = True,
    *,
    nclust: int | None = None,
    sigma: float | ArrayLike | None = None,
    random_state: RandomStateLike = None,
    device: DeviceLike = None,
    dtype: DtypeLike = None,
    basis: str | None = None,
    adjusted_basis: str | None = None,
    loadings: str | None = "PCs",
    layer: str | None = None,
    **run_harmony_kwargs: Any,
) -> Reference:
    """Build a :class:`Reference` to map query cells onto.

    Three sources: ``build_reference(ho, meta_data, labels)`` from a finished
    run, ``build_reference(pcs, meta_data, labels)`` from an embedding of one
    batch, and ``build_reference(adata, key, labels=..., **run_harmony_kwargs)``
    from AnnData, which runs Harmony itself and keeps the gene projection.

    Parameters
    ----------
    source : Harmony, AnnData, or array-like / DataFrame (N, d)
        A finished :class:`~harmonypy.Harmony` run (either algorithm); an
        embedding of cells with one batch (cells x PCs), which is then clustered
        as Symphony's ``buildReference(vars = NULL)`` does: the package's
        k-means start on the unit-length cells, then 20 soft k-means rounds
        (assignments by :func:`soft_assign` with bandwidth ``sigma``, centroids
        from them), and no correction (``Z_corr`` is the embedding); or an
        AnnData object (see below).
    meta_data : DataFrame, optional; for AnnData, ``key``
        One row per reference cell: where the ``labels`` columns are read.
        Paired with the cells by name when both sides name them (for a
        Harmony run, the names it remembers in ``ho.cell_names``; for an
        embedding, its index), as :func:`run_harmony` pairs its inputs: the
        same names in another order are reordered, names that disagree are
        refused with a ``ValueError`` giving counts and a few names of each
        side. When either side names no cells, rows pair by position (logged
        at INFO). The cell names kept with the cells are the run's (or the
        embedding's), else ``meta_data``'s index.
        For AnnData: the ``adata.obs`` batch column(s) to integrate over
        (``key``, as :func:`integrate`'s); None: the cells are one batch,
        clustered without a Harmony run.
    labels : str or list of str, optional
        Columns of ``meta_data`` (``adata.obs``) kept as label columns (for
        :func:`transfer_labels`). Needs ``keep_cells=True``.
    keep_cells : bool, default True
        Keep the corrected reference cells (float32), their batches and labels.
        ``False`` keeps only the O(K d^2) terms mapping needs.
    nclust, sigma, random_state, device, dtype : optional
        For an embedding: number of clusters (default ``min(round(N / 30),
        100)``), bandwidth (default 0.1), seed of the k-means start (default
        0), and where and in which float type to cluster. For AnnData with a
        ``key``: passed to :func:`run_harmony` with ``run_harmony_kwargs``.
    basis : str, default "X_pca"
        AnnData only: ``obsm`` key of the PCs.
    adjusted_basis : str, default "X_pca_harmony"
        AnnData only: ``obsm`` key where the corrected PCs are written (for a
        one-batch reference, a copy of ``obsm[basis]``); :func:`map_query`
        writes a query's under the same key.
    loadings : str or None, default "PCs"
        AnnData only: ``varm`` key of the PCA loadings (genes x PCs). The
        reference keeps them, the gene names and the per-gene scaling, so
        that :func:`map_query` can project a query's genes (see Notes).
        None keeps no gene projection: queries must then be given in the
        reference's PC space (``map_query(..., basis=...)``).
    layer : str, optional
        AnnData only: read the expression matrix the PCA was computed from in
        ``adata.layers[layer]`` instead of ``adata.X``.
    **run_harmony_kwargs
        AnnData only: passed to :func:`run_harmony` through :func:`integrate`
        (``theta``, ``lamb``, ``algorithm``, ...).

    Returns
    -------
    Reference
        The compressed reference (and, with ``keep_cells``, its corrected
        cells and labels); write it with :meth:`Reference.save`.

    Raises
    ------
    TypeError
        ``source`` is none of the three kinds, or an argument of the wrong type.
    ValueError
        ``labels`` without ``keep_cells``; cell names of ``meta_data`` that
        disagree with the run's; a ``labels`` or ``key`` column that does not
        exist (a ``ColumnNotFoundError``, also a ``KeyError``); for AnnData,
        the refusals listed in Notes; for an embedding or a ``key``, what
        :func:`run_harmony` refuses.

    See Also
    --------
    map_query : Maps query cells onto the reference.
    load_reference : Reads a reference that :meth:`Reference.save` wrote.

    Notes
    -----
    **AnnData.** Harmony runs through :func:`integrate`, which writes
    ``adata.obsm[adjusted_basis]`` and ``adata.uns["harmony"]``. With
    ``loadings``, the reference keeps (``Reference.projection``):

    * the loadings ``adata.varm["PCs"]`` of the genes whose row is not all
      zeros (scanpy's PCA on highly variable genes writes zero rows for the
      others), and those genes' names (``adata.var_names``);
    * the scaling: ``adata.var["mean"]`` and ``adata.var["std"]`` when
      present: ``sc.pp.scale`` writes them (its ``std`` is the standard
      deviation with ``ddof=1``, as Symphony's ``rowSDs``, and 1 for a
      constant gene); a query is scaled ``(x - mean) / std``, or ``x / std`` when
      the scaled reference has no negative value (``sc.pp.scale(zero_center=
      False)``, which records the mean without subtracting it), then clipped
      to the range of the reference's scaled values (which reproduces
      ``max_value=`` on the reference's own cells; Symphony clips at +-10).
      Without these columns the PCA was run on the expression as it is
      (e.g. log-normalised, ``sc.pp.scale`` skipped): no scaling and no
      clipping. ``adata.var["means"]`` (plural, from
      ``sc.pp.highly_variable_genes``) is not a scaling and is not used;
    * the mean of the reference's scaled values and of its PCs, so that its
      own cells project exactly onto ``obsm[basis]``.

    The expression matrix (``X`` or ``layers[layer]``) must be the one the
    PCA was computed from (after ``sc.pp.scale``, which scales ``X`` in place);
    this is checked by projecting up to 2,000 reference cells. Refused, before
    Harmony runs, with a message naming what is missing: no
    ``varm["PCs"]`` (or loadings of another shape), only one of
    ``var["mean"]`` / ``var["std"]``, an expression matrix with negative
    values but no ``var["mean"]`` / ``var["std"]`` (scaled by a tool that
    did not record how), and a matrix that does not project onto
    ``obsm[basis]``.

    Examples
    --------
    A reference from two of the bundled donors (the third is mapped onto it in
    :func:`map_query`'s example):

    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> is_ref = meta["donor"] != "5p"
    >>> ho = hm.run_harmony(pcs[is_ref], meta[is_ref], "donor", verbose=False)
    >>> ref = hm.build_reference(ho, meta[is_ref], labels="cell_type")
    >>> ref  # doctest: +ELLIPSIS
    Reference(algorithm='harmony1', K=26, d=20, 770 cells kept, ...)
    """
    if is_anndata(source):
        return _anndata.reference_from_anndata(
            source,
            meta_data,
            labels=labels,
            keep_cells=keep_cells,
            keys=_anndata.ObsmKeys(basis, adjusted_basis, layer, loadings),
            options={
                "nclust": nclust,
                "sigma": sigma,
                "random_state": random_state,
                "device": device,
                "dtype": dtype,
            },
            run_harmony_kwargs=run_harmony_kwargs,
        )
    _refuse_anndata_only(
        {
            "basis": basis,
            "adjusted_basis": adjusted_basis,
            "layer": layer,
            "loadings": None if loadings == "PCs" else loadings,
        },
        "only for build_reference(adata, key, ...) on an AnnData object; to build from your "
        "own Harmony run, pass its result (run_harmony(...))",
        extra=list(run_harmony_kwargs),
    )
    return _reference.build_reference(
        source,
        meta_data,
        labels,
        keep_cells,
        nclust=nclust,
        sigma=sigma,
        random_state=random_state,
        device=device,
        dtype=dtype,
    )


def map_query(
    data_mat: MatrixLike | AnnDataLike,
    meta_data: MetadataLike | Reference | None = None,
    ref: Reference | str | Sequence[str] | None = None,
    vars_use: str | Sequence[str] | None = None,
    sigma: float | ArrayLike | None = None,
    lamb: float | ArrayLike | None = None,
    device: DeviceLike = None,
    dtype: DtypeLike = None,
    *,
    confidence: bool = True,
    iterations: int = 1,
    key: str | Sequence[str] | None = None,
    basis: str | None = None,
    adjusted_basis: str | None = None,
    layer: str | None = None,
    labels: str | Sequence[str] | None = None,
    k: int | None = None,
    min_probability: float | None = None,
    overwrite: bool = False,
) -> MappedQuery:
    """Map query cells onto a reference (Symphony's ``mapQuery``).

    ``map_query(pcs, meta_data, ref, vars_use)`` for cells already in the
    reference's PC space; ``map_query(adata_query, ref, key)`` for AnnData,
    whose genes are projected through the reference's loadings (see below).

    Parameters
    ----------
    data_mat : array-like, DataFrame, tensor or AnnData
        Query cells in the reference's PC space (the reference's loadings and
        scaling applied), (N_q, d) or (d, N_q), ``d`` equal to the reference's.
        Orientation as in :func:`run_harmony` (from ``len(meta_data)``;
        without metadata, the axis of length ``d`` holds the PCs). Or an
        AnnData query (see Notes).
    meta_data : DataFrame, Series or None
        One row per query cell, holding the ``vars_use`` columns. Paired with
        ``data_mat``'s cells by name when both name them. For an AnnData
        query: the reference (``map_query(adata_query, ref, key)``).
    ref : Reference
        From :func:`build_reference` or :func:`load_reference`. For an AnnData
        query given as the second argument, a third positional argument is
        the ``key``.
    vars_use : str or list of str, optional
        The query's batch columns; none (default): the query is one batch, as
        Symphony's ``vars = NULL``. A variable with one level in the query is
        a row of ones, as in Symphony.
    sigma : float or array (K,), optional
        Bandwidth of the soft assignment; default the reference's.
    lamb : float, one per query variable or per query level, or -1; optional
        Ridge penalty of the query's batch terms, > 0. Default: 1 (Symphony's
        fixed identity) for a Harmony 1 or one-batch reference, estimated per
        cluster (``-1``) for a reference whose run estimated it (Harmony2's
        default): ``lamb_kb = alpha * E_kb`` with ``E`` counted over reference
        and query together (see ``docs/mapping.md``). Without ``vars_use``
        the query is one batch, as Symphony's ``vars = NULL`` (a batch row of
        ones beside the intercept): ``lamb`` is then one value, that term's
        penalty (the larger, the less the query is moved).
    device, dtype : optional
        Where and in which float type to compute, as in :func:`run_harmony`.
    confidence : bool, default True
        Compute the per-cell mapping score (d^2 per (cell, cluster) pair whose R
        can matter, to a relative 1e-5 in float32 and 1e-13 in float64).
    iterations : int, default 1
        Rounds of assignment and correction. 1 is Symphony's ``mapQuery``:
        the query is assigned once, from its uncorrected cells. Each further
        round assigns the corrected cells to the centroids again and redoes
        the correction from the uncorrected cells (Harmony's alternation, with
        no diversity penalty); it costs one more N x d copy. The mapping score
        always uses the first round's assignment (uncorrected space). Mapping
        the bundled PBMCs onto their own Harmony 1 reference, the per-PC r
        with Harmony's coordinates is at least 0.988 with one round and 0.992
        with three (``docs/mapping.md``, "Self-consistency").
    key : str or list of str, optional
        AnnData only: the query's batch column(s) in ``adata_query.obs``
        (``vars_use`` is accepted as a synonym).
    basis : str, optional
        AnnData only: ``obsm`` key of query PCs already in the reference's PC
        space (e.g. projected elsewhere); default: project the genes.
    adjusted_basis : str, optional
        AnnData only: ``obsm`` key for the corrected query; default the
        reference's (``Reference.adjusted_basis``), else ``"X_pca_harmony"``.
    layer : str, optional
        AnnData only: project ``adata_query.layers[layer]`` instead of ``X``.
    labels : str or list of str, optional
        AnnData only: reference label columns to transfer
        (:func:`transfer_labels`) into ``obs``.
    k, min_probability : optional
        AnnData only: :func:`transfer_labels`'s (default 5 and 0.5).
    overwrite : bool, default False
        AnnData only: replace ``obsm``/``obs`` entries that the mapping
        writes but that no earlier mapping of this query wrote (recorded in
        ``uns["harmony_mapping"]``), e.g. ``obsm["X_pca_harmony"]`` of a query
        integrated on its own. By default they are refused, before any work,
        so that nothing is lost without being asked; an earlier mapping's own
        outputs are replaced by mapping again.

    Returns
    -------
    MappedQuery
        The corrected query cells (``Z_corr``, ``result()``), their cluster
        assignments and mapping scores. For AnnData the same, after writing
        into ``adata_query`` (see Notes).

    Raises
    ------
    TypeError
        An argument of the wrong kind (a non-numeric ``data_mat``, no
        :class:`Reference`, an AnnData-only argument for an embedding, ...).
    ValueError
        A query whose number of PCs differs from the reference's, NaN or
        infinite values, a ``vars_use`` column that does not exist, a value
        out of range; for AnnData, ``obsm``/``obs`` entries that would be
        replaced without ``overwrite``, or a reference without a gene
        projection and no ``basis``.

    See Also
    --------
    transfer_labels : Labels for the mapped cells.

    Notes
    -----
    **AnnData query.** Without ``basis``, the query's expression
    (``adata_query.X`` or ``layers[layer]``, dense or sparse; expression as
    the reference's was *before* scaling, e.g. log-normalised) is projected
    with the reference's :class:`~harmonypy.mapping.projection.GeneProjection`,
    a chunk of cells at a time: genes matched by name, each scaled with the
    reference's mean and standard deviation and clipped to the range of the
    reference's scaled values, then multiplied by the loadings. Reference
    genes the query lacks are set to the reference's mean (they add nothing;
    Symphony fills them with 0 after scaling), with a warning that says how
    many of how many are missing. Written into ``adata_query`` (after all is
    computed): ``obsm["X_pca_reference"]`` (the projected, uncorrected
    query; not with ``basis``), ``obsm[adjusted_basis]`` (the corrected
    query), ``obs["mapping_score"]`` (with ``confidence``),
    ``obs["<label>_predicted"]`` and ``obs["<label>_probability"]`` per
    transferred label, and ``uns["harmony_mapping"]`` (what was done).

    Examples
    --------
    The third donor of the bundled PBMCs mapped onto a reference of the other
    two:

    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> is_ref = meta["donor"] != "5p"
    >>> ho = hm.run_harmony(pcs[is_ref], meta[is_ref], "donor", verbose=False)
    >>> ref = hm.build_reference(ho, meta[is_ref], labels="cell_type")
    >>> query = hm.map_query(pcs[~is_ref], ref=ref)
    >>> query.result().shape, query.confidence.shape  # cells x PCs, one score per cell
    ((430, 20), (430,))
    """
    if is_anndata(data_mat):
        ref, key = _anndata_arguments(meta_data, ref, key, vars_use)
        return _anndata.map_anndata(
            data_mat,
            ref,
            key,
            keys=_anndata.ObsmKeys(basis, adjusted_basis, layer),
            transfer=_anndata.LabelRequest(labels, k, min_probability),
            overwrite=overwrite,
            map_options={
                "sigma": sigma,
                "lamb": lamb,
                "device": device,
                "dtype": dtype,
                "confidence": confidence,
                "iterations": iterations,
            },
        )
    _refuse_anndata_only(
        {
            "key": key,
            "basis": basis,
            "adjusted_basis": adjusted_basis,
            "layer": layer,
            "labels": labels,
            "k": k,
            "min_probability": min_probability,
            "overwrite": overwrite or None,
        },
        "only for an AnnData query (map_query(adata_query, ref, ...)); for an embedding use "
        "vars_use and transfer_labels",
    )
    return _mapping.map_query(
        data_mat,
        meta_data,
        ref,
        vars_use,
        sigma,
        lamb,
        device,
        dtype,
        confidence=confidence,
        iterations=iterations,
    )


def _anndata_arguments(second: Any, third: Any, key: Any, vars_use: Any) -> tuple[Any, Any]:
    """``(ref, key)`` of ``map_query(adata_query, ref, key)``, however they were passed."""
    if vars_use is not None:
        if key is not None:
            raise TypeError("key and vars_use are the same argument for an AnnData query; give one")
        key = vars_use
    if isinstance(second, Reference):
        if third is not None and not isinstance(third, Reference):
            if key is not None:
                raise TypeError(f"key given twice: {third!r} (third argument) and {key!r}")
            key = third
        elif third is not None:
            raise TypeError("two references given: map_query(adata_query, ref, key=...)")
        return second, key
    if second is None:
        return third, key
    raise TypeError(
        f"map_query(adata_query, ref, key=None, ...): the second argument must be "
        f"the Reference, not {type(second).__name__} (an AnnData query's batch "
        f"columns are adata_query.obs columns named by key)"
    )


def transfer_labels(
    query: MappedQuery | MatrixLike | AnnDataLike,
    ref: Reference,
    label: str,
    k: int = 5,
    min_probability: float = 0.5,
    *,
    device: DeviceLike = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Label query cells by a vote of their k nearest reference cells.

    Symphony's ``knnPredict`` (``class::knn``): Euclidean distances in the
    corrected space between the mapped query cells and the reference cells
    kept in ``ref``; the label most frequent among the ``k`` nearest wins, its
    share of the ``k`` votes is its probability. Ties go to the label of the
    nearer neighbour (``class::knn`` breaks them at random). Reference cells
    without a label take no part. Exact search in torch, in chunks of query
    and reference cells; above 2^26 query x reference pairs the reference is
    split into k-means lists and the lists that cannot hold a neighbour are
    skipped (same neighbours as comparing every pair, up to rounding ties).

    Parameters
    ----------
    query : MappedQuery, array (N_q, d) of corrected query cells, or AnnData
        An AnnData query must have been mapped with ``map_query(adata_query,
        ref)``: its corrected cells are read from ``obsm`` (the key recorded
        in ``uns["harmony_mapping"]``), and the labels are written into
        ``obs["<label>_predicted"]`` and ``obs["<label>_probability"]``, as
        ``map_query(adata_query, ref, labels=label)`` writes them (and
        recorded in ``uns["harmony_mapping"]``: ``labels``, ``k``,
        ``min_probability``, one entry per label). A query mapped onto another
        reference is refused.
    ref : Reference
        Built with ``keep_cells=True`` and ``labels`` including ``label``.
    label : str
        A label column of ``ref``.
    k : int, default 5
        Symphony's default; on leave-one-batch-out splits of the bundled data
        k = 3-10 labelled best and k = 30 up to 4.6 points worse
        (benchmarks/results/label_transfer.md).
    min_probability : float in [0, 1], default 0.5
        Below this share of the votes the label is ``"unknown"``.
    device : optional
        Where to search (default: CUDA, then MPS, then the CPU).
    overwrite : bool, default False
        AnnData only: replace the two ``obs`` columns when no earlier mapping
        of this query wrote them (someone else's columns); refused by default.

    Returns
    -------
    pandas.DataFrame
        Columns ``label`` (categorical) and ``probability``, one row per query
        cell (indexed by the query's cell names when it has them; for AnnData,
        by ``obs_names``).

    Raises
    ------
    TypeError
        ``ref`` is not a :class:`Reference`, or ``label`` is not one name.
    ValueError
        A query mapped onto another reference; a reference that keeps no
        cells (``keep_cells=False``) or has no ``label`` column; ``k`` out of
        range (1 to the labelled reference cells) or ``min_probability``
        outside [0, 1]; for AnnData, ``obs`` columns that would be replaced
        without ``overwrite``.

    Examples
    --------
    Cell types for the third donor of the bundled PBMCs from a reference of the
    other two:

    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> is_ref = meta["donor"] != "5p"
    >>> ho = hm.run_harmony(pcs[is_ref], meta[is_ref], "donor", verbose=False)
    >>> ref = hm.build_reference(ho, meta[is_ref], labels="cell_type")
    >>> query = hm.map_query(pcs[~is_ref], ref=ref)
    >>> predicted = hm.transfer_labels(query, ref, "cell_type")
    >>> list(predicted.columns), len(predicted)
    (['label', 'probability'], 430)
    >>> agreement = (predicted["label"].astype(str) == meta.loc[~is_ref, "cell_type"]).mean()
    >>> bool(agreement > 0.8)
    True
    """
    if not isinstance(ref, Reference):
        raise TypeError(f"ref must be a harmonypy Reference, not {type(ref).__name__}")
    if is_anndata(query):
        return _anndata.transfer_anndata(
            query,
            ref,
            label,
            k=k,
            min_probability=min_probability,
            device=device,
            overwrite=overwrite,
        )
    if overwrite:
        raise TypeError(
            "overwrite: only for an AnnData query, whose obs columns label "
            "transfer writes; for an array the labels are only returned"
        )
    return _transfer.transfer_labels(query, ref, label, k, min_probability, device=device)
