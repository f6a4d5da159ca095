"""A reference for mapping: what is kept of an integrated atlas, and its file.

:func:`build_reference` keeps, from a finished :class:`~harmonypy.Harmony` run
(or from an embedding with one batch, clustered here), what Symphony (Kang et
al., *Nat Commun* 2021) needs to map new cells without touching the reference
cells again:

* the compression terms of ``compute_ref_cache`` (symphony ``src/utils.cpp``):
  ``Nr = R.sum(1)`` (K) and ``C = R Z_corr^T`` (K x d);
* the centroids ``Y``: the rows of ``C`` scaled to unit length, as d x K
  (``t(cosine_normalize_cpp(R %*% t(Z_corr), 1))`` in
  ``R/buildReferenceFromHarmonyObj.R``);
* per cluster, the R-weighted centre and covariance of the *uncorrected*
  reference cells (``cov.wt(t(Z_orig), wt = R[k, ])`` in
  ``R/confidenceScores.R``, its default ``Z_orig = TRUE``), from which the
  per-cell mapping score is computed; the cells themselves are not needed for it;
* optionally the corrected reference cells, their batches and label columns,
  for label transfer and plots;
* for a reference built from AnnData, what projects a query's genes into
  its PCs (:class:`~harmonypy._projection.GeneProjection`: the PCA loadings,
  the genes, the per-gene scaling), and the ``obsm`` keys it used.

:meth:`Reference.save` writes a versioned ``.npz`` file (arrays only, never a
pickle) whose layout ``docs/mapping.md`` lists key by key;
:func:`load_reference` reads it back bit for bit and refuses anything else
with a message that names the file and the problem.
"""

from __future__ import annotations

import json
import math
import numbers
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from harmonypy import _clustering as clu
from harmonypy import _validation as val
from harmonypy._cellnames import align_metadata, carries_names
from harmonypy._device import resolve_device, resolve_dtype
from harmonypy._kmeans import kmeans_centroids
from harmonypy._projection import SCALINGS, GeneProjection

__all__ = ["Reference", "build_reference", "load_reference"]

FORMAT_NAME = "harmonypy-reference"
FORMAT_VERSION = 1
#: Name of the npz entry that holds the JSON metadata (UTF-8 bytes as uint8).
METADATA_KEY = "__metadata__"
#: Algorithm recorded for a reference clustered from one batch (no integration).
ONE_BATCH = "none"
ALGORITHMS = ("harmony1", "harmony2", ONE_BATCH)
#: Soft k-means rounds of a one-batch reference: ``soft_kmeans(max_iter = 20)``
#: in symphony's ``R/utils.R``.
ONE_BATCH_ROUNDS = 20

#: Cells handled at once by the reference statistics (the outer products of a
#: chunk take rows x d^2 float64 values).
_STAT_ELEMENTS = 2**22


@dataclass(eq=False)
class Reference:
    """An integrated reference, ready to map query cells onto.

    Build it with :func:`build_reference`; write it with :meth:`save` and read
    it with :func:`load_reference`. Arrays follow the R package's orientation
    where Symphony's do (``Y`` is d x K); per-cell tables have cells in rows.

    Attributes
    ----------
    algorithm : str
        ``'harmony1'``, ``'harmony2'``, or ``'none'`` for a reference built
        from an embedding with one batch.
    Nr : ndarray (K,), float64
        Cluster sizes ``R.sum(1)`` (Symphony's first compression term).
    C : ndarray (K, d), float64
        ``R @ Z_corr.T`` (the second compression term).
    Y : ndarray (d, K), float64
        Rows of ``C`` scaled to unit length, transposed (Symphony's centroids).
    sigma : ndarray (K,), float64
        Soft-clustering bandwidth per cluster, as in the reference run.
    cluster_center : ndarray (K, d), float64
        R-weighted mean of the uncorrected reference cells per cluster.
    cluster_cov : ndarray (K, d, d), float64
        R-weighted covariance (``cov.wt``: unbiased, weights R[k]) of the
        uncorrected reference cells per cluster.
    intercept : ndarray (K, d), float64, or None
        Harmony2 only: the ridge intercepts of the reference's last correction
        (``ho.W_intercept.T``), whose unit-length rows are Harmony2's centroids.
    parameters : dict
        The reference run's parameters (``lamb``, ``theta``, ``alpha``,
        ``batch_prop_cutoff``, ...), JSON values.
    variables : list of str
        The reference's batch variables (empty for a one-batch reference).
    levels : list of list
        Levels of each variable, in the order of ``Phi``'s rows.
    n_cells : int
        Reference cells.
    dtype : str
        Float type of the reference run (``'float32'`` or ``'float64'``).
    cells : ndarray (N, d), float32, or None
        Corrected reference cells (``Z_corr.T``), kept with ``keep_cells=True``.
    batch_codes : ndarray (N, V), int32, or None
        Global level index of each kept cell for each batch variable.
    labels : DataFrame or None
        Label columns of the kept cells, as categorical columns.
    cell_names : ndarray (N,) of str, or None
        Names of the kept cells, when the inputs named them.
    projection : GeneProjection or None
        Built from AnnData: the genes, PCA loadings and per-gene scaling that
        put a query's expression into the reference's PCs (``docs/mapping.md``).
    basis, adjusted_basis : str or None
        Built from AnnData: the ``obsm`` keys of the reference's PCs and of its
        corrected PCs (:func:`map_query` writes the query's under ``adjusted_basis``).
    """

    algorithm: str
    Nr: np.ndarray
    C: np.ndarray
    Y: np.ndarray
    sigma: np.ndarray
    cluster_center: np.ndarray
    cluster_cov: np.ndarray
    intercept: np.ndarray | None = None
    parameters: dict = field(default_factory=dict)
    variables: list = field(default_factory=list)
    levels: list = field(default_factory=list)
    n_cells: int = 0
    dtype: str = "float32"
    cells: np.ndarray | None = None
    batch_codes: np.ndarray | None = None
    labels: pd.DataFrame | None = None
    cell_names: np.ndarray | None = None
    projection: GeneProjection | None = None
    basis: str | None = None
    adjusted_basis: str | None = None

    # ------------------------------------------------------------ shapes
    @property
    def K(self) -> int:
        """Number of clusters."""
        return int(self.Nr.shape[0])

    @property
    def d(self) -> int:
        """Number of embedding dimensions (PCs)."""
        return int(self.C.shape[1])

    @property
    def Z_corr(self) -> np.ndarray | None:
        """The kept corrected reference cells as d x N (``Harmony.Z_corr``'s orientation)."""
        return None if self.cells is None else self.cells.T

    @property
    def centroids(self) -> np.ndarray:
        """Unit-length centroids the query is assigned to, (K, d).

        ``Y.T`` (Symphony) for a Harmony 1 or one-batch reference; for a
        Harmony2 reference, the unit-length ridge intercepts, which are the
        centroids Harmony2 itself assigns cells to (see ``docs/mapping.md``).
        """
        source = self.intercept if self.algorithm == "harmony2" else self.Y.T
        norms = np.linalg.norm(source, axis=1, keepdims=True)
        return source / np.maximum(norms, np.finfo(np.float64).tiny)

    @property
    def batch_levels(self) -> list[str]:
        """Names of the reference's batch levels, ``variable=level``."""
        return [f"{v}={lv}" for v, lvls in zip(self.variables, self.levels) for lv in lvls]

    @property
    def label_columns(self) -> list[str]:
        return [] if self.labels is None else list(self.labels.columns)

    def __repr__(self) -> str:
        kept = (f"{self.n_cells} cells kept" if self.cells is not None
                else f"{self.n_cells} cells, not kept")
        labels = f", labels={self.label_columns}" if self.label_columns else ""
        genes = (f", genes={self.projection.n_genes}" if self.projection is not None else "")
        return (f"Reference(algorithm={self.algorithm!r}, K={self.K}, d={self.d}, {kept}, "
                f"variables={self.variables}{labels}{genes})")

    # ---------------------------------------------------------------- file
    def save(self, path: str | Path) -> Path:
        """Write the reference to ``path`` (an ``.npz`` file; see ``docs/mapping.md``).

        The file is written to a temporary file in the destination folder and
        renamed into place, so an interrupted save leaves any previous file
        intact. Only arrays are written (no pickle). Returns the path written.
        """
        from harmonypy._io import OutputFiles

        arrays = _to_arrays(self)
        with OutputFiles() as files:
            _write_arrays(arrays, files.stage(path))
            files.commit()
        return Path(path)

    def write(self, path: str | Path) -> None:
        """Write the file straight to ``path`` (no temporary file; the command line
        gives it the temporary path of :class:`~harmonypy._io.OutputFiles`)."""
        _write_arrays(_to_arrays(self), path)


def _write_arrays(arrays: dict[str, np.ndarray], path: str | Path) -> None:
    # A file object: np.savez would append ".npz" to a name without it.
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


# ====================================================================== build
def build_reference(source, meta_data=None, labels: str | Sequence[str] | None = None,
                    keep_cells: bool = True, *, nclust: int | None = None, sigma=None,
                    random_state=None, device=None, dtype=None, basis: str | None = None,
                    adjusted_basis: str | None = None, loadings: str | None = "PCs",
                    layer: str | None = None, **run_harmony_kwargs) -> Reference:
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
        One row per reference cell, in the order of the cells of ``source``:
        where the ``labels`` columns are read. Its index (or the embedding's,
        when it names cells) gives the cell names kept with the cells.
        For AnnData: the ``adata.obs`` batch column(s) to integrate over
        (``key``, as :func:`integrate`'s); None: the cells are one batch,
        clustered without a Harmony run.
    labels : str or list of str, optional
        Columns of ``meta_data`` (``adata.obs``) kept as label columns (for
        :func:`transfer_labels`). Needs ``keep_cells=True``.
    keep_cells : bool, default True
        Keep the corrected reference cells (float32), their batches and labels.
        ``False`` keeps only the O(K d^2) terms mapping needs.
    nclust, sigma, random_state, device, dtype
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
    """
    from harmonypy._harmony import Harmony

    if _is_anndata(source):
        from harmonypy._anndata import reference_from_anndata

        return reference_from_anndata(
            source, meta_data, labels=labels, keep_cells=keep_cells, basis=basis,
            adjusted_basis=adjusted_basis, loadings=loadings, layer=layer,
            options={"nclust": nclust, "sigma": sigma, "random_state": random_state,
                     "device": device, "dtype": dtype},
            run_harmony_kwargs=run_harmony_kwargs)
    anndata_only = {name: value for name, value in [
        ("basis", basis), ("adjusted_basis", adjusted_basis), ("layer", layer),
        ("loadings", None if loadings == "PCs" else loadings)] if value is not None}
    anndata_only.update(run_harmony_kwargs)
    if anndata_only:
        raise TypeError(f"{', '.join(anndata_only)}: only for build_reference(adata, key, ...) "
                        f"on an AnnData object; to build from your own Harmony run, pass "
                        f"its result (run_harmony(...))")
    keep_cells = val.check_flag("keep_cells", keep_cells)
    label_names = _label_names(labels)
    if label_names and not keep_cells:
        raise ValueError(f"labels={label_names} needs keep_cells=True: labels are kept per "
                         f"reference cell")
    if label_names and meta_data is None:
        raise ValueError(f"labels={label_names} names columns of meta_data, but meta_data "
                         f"is None; pass the reference cells' metadata")
    if isinstance(source, Harmony):
        given = {name: value for name, value in [("nclust", nclust), ("sigma", sigma),
                 ("random_state", random_state), ("device", device), ("dtype", dtype)]
                 if value is not None}
        if given:
            raise TypeError(f"{', '.join(given)} only apply to a reference built from an "
                            f"embedding; a Harmony run already has its clusters")
        return _from_harmony(source, meta_data, label_names, keep_cells)
    return _from_embedding(source, meta_data, label_names, keep_cells, nclust=nclust,
                           sigma=0.1 if sigma is None else sigma,
                           random_state=0 if random_state is None else random_state,
                           device=device, dtype=dtype)


def _is_anndata(source) -> bool:
    """AnnData or a look-alike (``obs`` and ``obsm``), as :func:`integrate` accepts."""
    return hasattr(source, "obsm") and hasattr(source, "obs")


def _label_names(labels) -> list:
    if labels is None:
        return []
    if isinstance(labels, str):
        return [labels]
    if isinstance(labels, (Sequence, np.ndarray, pd.Index)) and not isinstance(labels, bytes):
        names = list(labels)
        if len(set(map(str, names))) != len(names):
            raise ValueError(f"labels names a column more than once: {names}")
        return names
    raise TypeError(f"labels must be a column name or a list of column names, not "
                    f"{type(labels).__name__}")


def _from_harmony(ho, meta_data, label_names, keep_cells) -> Reference:
    if ho.n_iter < 1:
        raise ValueError("the Harmony object has not been run (no iteration): build the "
                         "reference from the result of run_harmony")
    frame = _metadata_rows(meta_data, ho.N, "the Harmony run's cells")
    assignments = ho.R.T  # (N, K), caller's order
    z_corr = ho.Z_corr.T
    stats = _cluster_statistics(assignments, z_corr, ho.Z_orig.T)
    harmony2 = ho.algorithm == "harmony2"
    parameters = {
        "theta": ho.theta.tolist(),
        "lamb": ho.lamb.tolist(),
        "lamb_estimated": ho.lamb_estimated is not None,
        "alpha": float(ho.alpha),
        "batch_prop_cutoff": float(ho.batch_prop_cutoff) if harmony2 else None,
        "nclust": int(ho.K),
        "block_size": float(ho.block_size),
        "max_iter_kmeans": int(ho.max_iter_kmeans),
        "epsilon_cluster": float(ho.epsilon_cluster),
        "epsilon_harmony": float(ho.epsilon_harmony),
        "random_state": int(ho.random_state),
        "n_iter": int(ho.n_iter),
        "converged": bool(ho.converged),
    }
    dtype = "float64" if ho.dtype == torch.float64 else "float32"
    ref = Reference(
        algorithm=ho.algorithm, sigma=np.asarray(ho.sigma, dtype=np.float64),
        intercept=(np.asarray(ho.W_intercept.T, dtype=np.float64) if harmony2 else None),
        parameters=parameters, variables=[str(v) for v in ho.design.variables],
        levels=[list(lv) for lv in ho.design.levels], n_cells=int(ho.N), dtype=dtype,
        **stats)
    if keep_cells:
        ref.cells = np.ascontiguousarray(z_corr, dtype=np.float32)
        ref.batch_codes = np.ascontiguousarray(ho.design.codes, dtype=np.int32)
        ref.labels = _label_frame(frame, label_names)
        ref.cell_names = _cell_names(None, frame)
    return ref


def _from_embedding(data_mat, meta_data, label_names, keep_cells, *, nclust, sigma,
                    random_state, device, dtype) -> Reference:
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    val.check_random_state(random_state)
    if meta_data is not None:
        meta_data = align_metadata(data_mat, meta_data)
        if not isinstance(meta_data, pd.DataFrame):
            raise TypeError(f"meta_data must be a pandas DataFrame, not "
                            f"{type(meta_data).__name__}")
        n_cells = len(meta_data)
    else:
        shape = getattr(data_mat, "shape", None) or np.shape(data_mat)
        if len(shape) != 2:
            raise ValueError(f"data_mat must be 2-D (cells x PCs), got shape {tuple(shape)}")
        n_cells = int(shape[0])  # without metadata: cells in rows
    cells = val.as_cells_by_features(data_mat, n_cells,
                                     meta_shape=None if meta_data is None else meta_data.shape)
    val.check_cell_lengths(cells, torch_dtype)
    val.warn_if_not_reduced(cells)
    from harmonypy._harmony import _default_clusters

    n_clusters = (_default_clusters(cells.shape[0]) if nclust is None
                  else val.check_int("nclust", nclust, 1, cells.shape[0],
                                     maximum_is="the number of cells"))
    sigma_clusters = val.check_sigma(sigma, n_clusters, dtype=torch_dtype)
    seed = val.resolve_seed(random_state)

    np_dtype = np.float64 if torch_dtype == torch.float64 else np.float32
    with torch.no_grad():
        z = torch.from_numpy(np.ascontiguousarray(cells, dtype=np_dtype)).to(torch_device)
        z_cos = clu.normalize_rows(z)
        del z
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # As Harmony 1's init_cluster (R's kmeans(nstart = 10, iter.max = 25)),
        # then symphony's soft_kmeans_cpp: R from Y, Y from R, 20 times.
        centroids = clu.normalize_rows(kmeans_centroids(z_cos, n_clusters, generator))
        sigma_t = torch.as_tensor(sigma_clusters, device=torch_device)
        assignments = None
        for _ in range(ONE_BATCH_ROUNDS):
            assignments, _ = clu.soft_assign(z_cos, centroids, sigma_t, out=assignments)
            centroids = clu.compute_centroids(assignments, z_cos)
        del z_cos
        assignments = assignments.cpu().numpy()
    stats = _cluster_statistics(assignments, cells, cells)
    parameters = {"nclust": n_clusters, "random_state": int(seed),
                  "soft_kmeans_rounds": ONE_BATCH_ROUNDS}
    ref = Reference(algorithm=ONE_BATCH, sigma=np.asarray(sigma_clusters, dtype=np.float64),
                    parameters=parameters, n_cells=int(cells.shape[0]),
                    dtype="float64" if torch_dtype == torch.float64 else "float32", **stats)
    if keep_cells:
        frame = _metadata_rows(meta_data, cells.shape[0], "data_mat's cells")
        ref.cells = np.ascontiguousarray(cells, dtype=np.float32)
        ref.labels = _label_frame(frame, label_names)
        ref.cell_names = _cell_names(data_mat, frame)
    return ref


def _metadata_rows(meta_data, n_cells: int, what: str) -> pd.DataFrame | None:
    if meta_data is None:
        return None
    if not isinstance(meta_data, pd.DataFrame):
        raise TypeError(f"meta_data must be a pandas DataFrame, not {type(meta_data).__name__}")
    if len(meta_data) != n_cells:
        raise ValueError(f"meta_data has {len(meta_data)} rows but there are {n_cells} "
                         f"reference cells ({what}); expected one row per cell, in their order")
    return meta_data


def _label_frame(frame: pd.DataFrame | None, names: list) -> pd.DataFrame | None:
    """The label columns as categorical columns (category order: the column's
    own for a categorical, else sorted), with a default index."""
    if not names:
        return None
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise ValueError(f"labels names column(s) {missing} not found in meta_data; "
                         f"available columns: {list(map(str, frame.columns))}")
    out = {}
    for name in names:
        column = frame[name]
        if isinstance(column, pd.DataFrame):
            raise ValueError(f"meta_data has {column.shape[1]} columns named {name!r}")
        if not isinstance(column.dtype, pd.CategoricalDtype):
            try:
                column = column.astype(pd.CategoricalDtype(sorted(column.dropna().unique())))
            except TypeError:  # labels of mixed types: compared as text
                column = column.map(lambda v: v if pd.isna(v) else str(v)).astype("category")
        categories = column.cat.categories
        if categories.dtype == object:  # mixed or non-string objects: kept as text
            text = pd.Index([str(c) for c in categories])
            if text.has_duplicates:
                raise ValueError(f"label column {name!r} has categories that are equal as "
                                 f"text ({list(categories[:5])}); expected distinct labels")
            column = column.cat.rename_categories(text)
        out[str(name)] = column.reset_index(drop=True)
    return pd.DataFrame(out)


def _cell_names(data_mat, frame: pd.DataFrame | None) -> np.ndarray | None:
    if frame is not None and carries_names(frame.index):
        return frame.index.astype(str).to_numpy(dtype=str)
    if isinstance(data_mat, pd.DataFrame) and carries_names(data_mat.index):
        return data_mat.index.astype(str).to_numpy(dtype=str)
    return None


def _cluster_statistics(assignments: np.ndarray, z_corr: np.ndarray,
                        z_orig: np.ndarray) -> dict[str, np.ndarray]:
    """``Nr``, ``C``, ``Y`` and the per-cluster centre and covariance, float64.

    Sums run over chunks of cells in float64 (torch, CPU). The covariance is
    ``cov.wt``'s: with ``w = R[k] / Nr[k]`` and centre ``c = sum_i w_i x_i``,
    ``sum_i w_i (x_i - c)(x_i - c)^T / (1 - sum_i w_i^2)``. Its second moments
    are summed about the mean of all cells ``m`` (not about 0), which keeps
    the subtraction ``S / Nr - (c - m)(c - m)^T`` free of cancellation for
    embeddings far from the origin.

    Parameters
    ----------
    assignments : (N, K) array, R transposed.
    z_corr, z_orig : (N, d) arrays, corrected and uncorrected cells.
    """
    n_cells, n_clusters = assignments.shape
    d = z_corr.shape[1]
    f64 = torch.float64
    mean = torch.zeros(d, dtype=f64)
    chunk = max(1, min(65536, _STAT_ELEMENTS // max(1, d * d)))
    for start in range(0, n_cells, chunk):
        mean += torch.as_tensor(np.asarray(z_orig[start:start + chunk]), dtype=f64).sum(0)
    mean /= n_cells
    sizes = torch.zeros(n_clusters, dtype=f64)
    squares = torch.zeros(n_clusters, dtype=f64)
    sums_corr = torch.zeros((n_clusters, d), dtype=f64)
    sums_orig = torch.zeros((n_clusters, d), dtype=f64)
    moments = torch.zeros((n_clusters, d * d), dtype=f64)
    for start in range(0, n_cells, chunk):
        r = torch.as_tensor(np.asarray(assignments[start:start + chunk]), dtype=f64)
        zc = torch.as_tensor(np.asarray(z_corr[start:start + chunk]), dtype=f64)
        zo = torch.as_tensor(np.asarray(z_orig[start:start + chunk]), dtype=f64) - mean
        sizes += r.sum(0)
        squares += (r * r).sum(0)
        sums_corr.addmm_(r.T, zc)
        sums_orig.addmm_(r.T, zo)
        moments.addmm_(r.T, (zo[:, :, None] * zo[:, None, :]).reshape(zo.shape[0], d * d))
    tiny = torch.finfo(f64).tiny
    safe_sizes = sizes.clamp_min(tiny)
    offset = sums_orig / safe_sizes[:, None]  # c - m
    second = moments.view(n_clusters, d, d) / safe_sizes[:, None, None]
    unbiased = (1 - squares / safe_sizes ** 2).clamp_min(tiny)
    cov = (second - offset[:, :, None] * offset[:, None, :]) / unbiased[:, None, None]
    cov = (cov + cov.transpose(1, 2)) / 2
    centers = offset + mean
    return {
        "Nr": sizes.numpy(),
        "C": sums_corr.numpy(),
        "Y": clu.normalize_rows(sums_corr).T.contiguous().numpy(),
        "cluster_center": centers.numpy(),
        "cluster_cov": cov.numpy(),
    }


# ======================================================================= file
def _json_value(value: Any) -> Any:
    """A JSON-safe copy: NumPy scalars as Python ones, non-finite floats as text."""
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, bool, numbers.Integral, float)):
        return value
    return str(value)


def _to_arrays(ref: Reference) -> dict[str, np.ndarray]:
    """Every array of the file, the JSON metadata included (see ``docs/mapping.md``)."""
    from harmonypy import __version__

    arrays = {
        "Nr": np.asarray(ref.Nr, dtype=np.float64),
        "C": np.asarray(ref.C, dtype=np.float64),
        "Y": np.asarray(ref.Y, dtype=np.float64),
        "sigma": np.asarray(ref.sigma, dtype=np.float64),
        "cluster_center": np.asarray(ref.cluster_center, dtype=np.float64),
        "cluster_cov": np.asarray(ref.cluster_cov, dtype=np.float64),
    }
    if ref.intercept is not None:
        arrays["intercept"] = np.asarray(ref.intercept, dtype=np.float64)
    if ref.cells is not None:
        arrays["cells"] = np.asarray(ref.cells, dtype=np.float32)
    if ref.batch_codes is not None:
        arrays["batch_codes"] = np.asarray(ref.batch_codes, dtype=np.int32)
    if ref.cell_names is not None:
        arrays["cell_names"] = np.asarray(ref.cell_names, dtype=str)
    label_columns = []
    for i, name in enumerate(ref.label_columns):
        column = ref.labels[name]
        categories = np.asarray(column.cat.categories)
        if categories.dtype == object:
            categories = categories.astype(str)
        arrays[f"label_{i}_categories"] = categories
        arrays[f"label_{i}_codes"] = column.cat.codes.to_numpy().astype(np.int32)
        label_columns.append({"name": name, "ordered": bool(column.cat.ordered)})
    projection = ref.projection
    if projection is not None:
        arrays["genes"] = np.asarray(projection.genes, dtype=str)
        for key, values in _projection_arrays(projection).items():
            arrays[key] = np.asarray(values, dtype=np.float64)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "harmonypy_version": __version__,
        "algorithm": ref.algorithm,
        "n_clusters": ref.K,
        "n_dims": ref.d,
        "n_cells": int(ref.n_cells),
        "dtype": ref.dtype,
        "parameters": _json_value(ref.parameters),
        "variables": _json_value(ref.variables),
        "levels": _json_value(ref.levels),
        "label_columns": label_columns,
        "arrays": sorted(arrays),
    }
    # Optional keys (format version 1 files without them are references
    # without a gene projection).
    if projection is not None:
        metadata["projection"] = {
            "scaling": projection.scaling, "n_genes": projection.n_genes,
            "clip": None if projection.clip is None else [float(v) for v in projection.clip]}
    if ref.basis is not None:
        metadata["basis"] = str(ref.basis)
    if ref.adjusted_basis is not None:
        metadata["adjusted_basis"] = str(ref.adjusted_basis)
    text = json.dumps(metadata, sort_keys=True, allow_nan=False).encode("utf-8")
    arrays[METADATA_KEY] = np.frombuffer(text, dtype=np.uint8)
    return arrays


def _projection_arrays(projection: GeneProjection) -> dict[str, np.ndarray]:
    """The float64 arrays of a gene projection, by their key in the file."""
    return {"loadings": projection.loadings, "gene_mean": projection.mean,
            "gene_std": projection.std, "gene_scaled_mean": projection.scaled_mean,
            "pc_mean": projection.pc_mean}


def load_reference(path: str | Path) -> Reference:
    """Read a reference written by :meth:`Reference.save`.

    Only arrays are read (``allow_pickle=False``): loading a file cannot run code.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        A file that is not a readable ``.npz`` (truncated, corrupt, another
        format), an ``.npz`` that is not a harmonypy reference, a reference
        written by a newer format version, or arrays whose shapes or values do
        not fit together. The message names the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference file {str(path)!r} does not exist")
    problem = _FileProblem(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise problem(f"cannot be read as a .npz archive ({_reason(err)}); it is truncated, "
                      f"corrupt, or not a reference file") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a plain .npy file
        raise problem("is a single .npy array, not a .npz harmonypy reference")
    with archive:
        if METADATA_KEY not in archive.files:
            raise problem(f"is not a harmonypy reference: it has no {METADATA_KEY!r} entry "
                          f"(entries: {sorted(archive.files)[:8]})")
        metadata = _read_metadata(archive, problem)
        arrays = {}
        for key in metadata["arrays"]:
            if key not in archive.files:
                raise problem(f"lacks the array {key!r} its metadata lists")
            try:
                arrays[key] = archive[key]
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
                raise problem(f"array {key!r} cannot be read ({_reason(err)}); the file is "
                              f"truncated or corrupt") from None
    return _from_arrays(arrays, metadata, problem)


class _FileProblem:
    """Builds the ValueError for a file, its name first."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, message: str) -> ValueError:
        return ValueError(f"reference file {str(self.path)!r} {message}")


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _read_metadata(archive, problem) -> dict:
    try:
        raw = archive[METADATA_KEY]
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise problem(f"metadata cannot be read ({_reason(err)}); the file is truncated or "
                      f"corrupt") from None
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise problem(f"is not a harmonypy reference: its {METADATA_KEY!r} entry is "
                      f"{raw.dtype} {raw.shape}, not UTF-8 bytes")
    try:
        metadata = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise problem(f"has unreadable metadata ({_reason(err)}); the file is corrupt") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise problem(f"is not a harmonypy reference (format {found!r}, expected "
                      f"{FORMAT_NAME!r})")
    version = metadata.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise problem(f"has an invalid format_version {version!r}; expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise problem(f"was written in format version {version} (harmonypy "
                      f"{metadata.get('harmonypy_version', '?')}), newer than this harmonypy "
                      f"reads (up to version {FORMAT_VERSION}): upgrade harmonypy to load it")
    required = ("algorithm", "n_clusters", "n_dims", "n_cells", "dtype", "parameters",
                "variables", "levels", "label_columns", "arrays")
    missing = [key for key in required if key not in metadata]
    if missing:
        raise problem(f"has incomplete metadata: missing {missing}")
    if metadata["algorithm"] not in ALGORITHMS:
        raise problem(f"names an unknown algorithm {metadata['algorithm']!r}; expected one "
                      f"of {ALGORITHMS}")
    return metadata


def _from_arrays(arrays: dict, metadata: dict, problem) -> Reference:
    k, d, n = metadata["n_clusters"], metadata["n_dims"], metadata["n_cells"]
    expected = {"Nr": (k,), "C": (k, d), "Y": (d, k), "sigma": (k,),
                "cluster_center": (k, d), "cluster_cov": (k, d, d)}
    if metadata["algorithm"] == "harmony2":
        expected["intercept"] = (k, d)
    for key, shape in expected.items():
        if key not in arrays:
            raise problem(f"lacks the array {key!r}")
        array = arrays[key]
        if array.dtype != np.float64 or array.shape != shape:
            raise problem(f"has {key!r} of {array.dtype} {array.shape}; expected float64 "
                          f"{shape}")
        if not np.isfinite(array).all():
            raise problem(f"has non-finite values in {key!r}")
    if (arrays["sigma"] <= 0).any():
        raise problem("has a sigma <= 0")
    n_variables = len(metadata["variables"])
    optional = {"cells": (np.float32, (n, d)), "batch_codes": (np.int32, (n, n_variables))}
    for key, (dtype, shape) in optional.items():
        if key in arrays and (arrays[key].dtype != dtype or arrays[key].shape != shape):
            raise problem(f"has {key!r} of {arrays[key].dtype} {arrays[key].shape}; "
                          f"expected {np.dtype(dtype)} {shape}")
    if "cell_names" in arrays and (arrays["cell_names"].dtype.kind != "U"
                                   or arrays["cell_names"].shape != (n,)):
        raise problem(f"has 'cell_names' of {arrays['cell_names'].dtype} "
                      f"{arrays['cell_names'].shape}; expected {n} strings")
    labels = {}
    for i, column in enumerate(metadata["label_columns"]):
        codes = arrays.get(f"label_{i}_codes")
        categories = arrays.get(f"label_{i}_categories")
        if codes is None or categories is None:
            raise problem(f"lacks the arrays of label column {column.get('name')!r}")
        if codes.dtype != np.int32 or codes.shape != (n,) or categories.ndim != 1 or \
                codes.min(initial=0) < -1 or codes.max(initial=-1) >= categories.size:
            raise problem(f"has invalid codes for label column {column.get('name')!r}")
        labels[column["name"]] = pd.Categorical.from_codes(
            codes, categories=pd.Index(categories), ordered=bool(column.get("ordered")))
    for key in ("basis", "adjusted_basis"):
        if not isinstance(metadata.get(key, ""), str):
            raise problem(f"has a {key!r} that is not text: {metadata[key]!r}")
    return Reference(
        algorithm=metadata["algorithm"], Nr=arrays["Nr"], C=arrays["C"], Y=arrays["Y"],
        sigma=arrays["sigma"], cluster_center=arrays["cluster_center"],
        cluster_cov=arrays["cluster_cov"], intercept=arrays.get("intercept"),
        parameters=metadata["parameters"], variables=list(metadata["variables"]),
        levels=[list(lv) for lv in metadata["levels"]], n_cells=int(n),
        dtype=metadata["dtype"], cells=arrays.get("cells"),
        batch_codes=arrays.get("batch_codes"),
        labels=pd.DataFrame(labels) if labels else None,
        cell_names=arrays.get("cell_names"),
        projection=_read_projection(arrays, metadata, d, problem),
        basis=metadata.get("basis"), adjusted_basis=metadata.get("adjusted_basis"))


def _read_projection(arrays: dict, metadata: dict, d: int, problem) -> GeneProjection | None:
    """The gene projection of a reference built from AnnData; None when the file has none."""
    info = metadata.get("projection")
    if info is None:
        return None
    if not isinstance(info, dict) or info.get("scaling") not in SCALINGS:
        raise problem(f"has an invalid 'projection' entry {info!r}; expected a scaling of "
                      f"{sorted(SCALINGS)}")
    n_genes = info.get("n_genes")
    genes = arrays.get("genes")
    if genes is None or genes.dtype.kind != "U" or genes.shape != (n_genes,):
        raise problem(f"has no valid 'genes' array for its gene projection (expected "
                      f"{n_genes} strings)")
    shapes = {"loadings": (n_genes, d), "gene_mean": (n_genes,), "gene_std": (n_genes,),
              "gene_scaled_mean": (n_genes,), "pc_mean": (d,)}
    for key, shape in shapes.items():
        array = arrays.get(key)
        if array is None or array.dtype != np.float64 or array.shape != shape:
            found = "missing" if array is None else f"{array.dtype} {array.shape}"
            raise problem(f"has {key!r} {found}; expected float64 {shape}")
        if not np.isfinite(array).all():
            raise problem(f"has non-finite values in {key!r}")
    if (arrays["gene_std"] <= 0).any():
        raise problem("has a gene_std <= 0")
    clip = info.get("clip")
    if clip is not None:
        if (not isinstance(clip, list) or len(clip) != 2
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in clip)
                or clip[0] > clip[1]):
            raise problem(f"has an invalid projection clip {clip!r}; expected [low, high]")
        clip = (float(clip[0]), float(clip[1]))
    return GeneProjection(
        genes=genes, loadings=arrays["loadings"], mean=arrays["gene_mean"],
        std=arrays["gene_std"], scaled_mean=arrays["gene_scaled_mean"],
        pc_mean=arrays["pc_mean"], clip=clip, scaling=info["scaling"])
