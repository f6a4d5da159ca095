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
  its PCs (:class:`~harmonypy.mapping.projection.GeneProjection`: the PCA loadings,
  the genes, the per-gene scaling), and the ``obsm`` keys it used.

:meth:`Reference.save` writes a versioned ``.npz`` file (arrays only, never a
pickle) whose layout ``docs/mapping.md`` lists key by key;
:func:`harmonypy.mapping.reference_file.load_reference` reads it back, checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from harmonypy import __version__
from harmonypy.engine import clustering as clu
from harmonypy.engine import validation as val
from harmonypy.engine.cellnames import align_metadata
from harmonypy.engine.device import resolve_device, resolve_dtype
from harmonypy.engine.harmony import Harmony
from harmonypy.engine.kmeans import kmeans_centroids, start_for
from harmonypy.engine.options import default_clusters
from harmonypy.io.outputs import OutputFiles
from harmonypy.mapping.projection import GeneProjection
from harmonypy.mapping.reference_cells import (
    kept_cell_names,
    label_frame,
    metadata_rows,
    run_metadata,
)
from harmonypy.mapping.statistics import cluster_statistics

__all__ = ["Reference", "build_reference", "label_names", "reference_digest"]

logger = logging.getLogger(__name__)

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

    Examples
    --------
    >>> import harmonypy as hm
    >>> hm.build_reference(*hm.datasets.load_pbmcs_small()).cluster_cov.shape  # (K, d, d)
    (40, 20, 20)
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
        if source is None:  # every Harmony2 reference keeps its intercepts
            raise ValueError("this harmony2 reference has no ridge intercepts")
        norms = np.linalg.norm(source, axis=1, keepdims=True)
        return source / np.maximum(norms, np.finfo(np.float64).tiny)

    @property
    def batch_levels(self) -> list[str]:
        """Names of the reference's batch levels, ``variable=level``."""
        return [
            f"{v}={lv}" for v, lvls in zip(self.variables, self.levels, strict=True) for lv in lvls
        ]

    @property
    def label_columns(self) -> list[str]:
        return [] if self.labels is None else list(self.labels.columns)

    def __repr__(self) -> str:
        kept = (
            f"{self.n_cells} cells kept"
            if self.cells is not None
            else f"{self.n_cells} cells, not kept"
        )
        labels = f", labels={self.label_columns}" if self.label_columns else ""
        genes = f", genes={self.projection.n_genes}" if self.projection is not None else ""
        return (
            f"Reference(algorithm={self.algorithm!r}, K={self.K}, d={self.d}, {kept}, "
            f"variables={self.variables}{labels}{genes})"
        )

    # ---------------------------------------------------------------- file
    def save(self, path: str | Path) -> Path:
        """Write the reference to ``path`` (an ``.npz`` file; see ``docs/mapping.md``).

        Parameters
        ----------
        path : str or Path
            The file, written as a temporary file in its folder renamed into
            place: an interrupted save leaves an existing file intact, a
            finished one replaces it. Only arrays are written (no pickle).

        Returns
        -------
        Path
            ``path``, for :func:`load_reference`.

        Raises
        ------
        IsADirectoryError
            ``path`` is a folder: a file name is needed (no name is guessed).
        FileNotFoundError
            The folder of ``path`` does not exist.

        Examples
        --------
        >>> import harmonypy as hm
        >>> ref = hm.build_reference(*hm.datasets.load_pbmcs_small())
        >>> hm.load_reference(ref.save("pbmcs.npz")).K
        40
        """
        arrays = _to_arrays(self)
        with OutputFiles() as files:
            _write_arrays(arrays, files.stage(path))
            files.commit()
        return Path(path)

    def write(self, path: str | Path) -> None:
        """Write the file straight to ``path`` (no temporary file; the command line
        gives it the temporary path of :class:`~harmonypy.io.outputs.OutputFiles`)."""
        _write_arrays(_to_arrays(self), path)


def _write_arrays(arrays: dict[str, np.ndarray], path: str | Path) -> None:
    # A file object: np.savez would append ".npz" to a name without it.
    with open(path, "wb") as handle:
        # numpy's stub reads **arrays as possibly naming savez's allow_pickle flag.
        np.savez(handle, **arrays)  # type: ignore[arg-type]


# ====================================================================== build
def build_reference(
    source,
    meta_data=None,
    labels: str | Sequence[str] | None = None,
    keep_cells: bool = True,
    *,
    nclust: int | None = None,
    sigma=None,
    random_state=None,
    device=None,
    dtype=None,
) -> Reference:
    """Build a :class:`Reference` from a finished Harmony run or a one-batch embedding.

    The array layer of :func:`harmonypy.build_reference`, which also takes
    AnnData (and whose docstring describes every parameter): here ``source``
    is a :class:`~harmonypy.Harmony` run (either algorithm) or an embedding
    of cells with one batch (cells x PCs), then clustered as Symphony's
    ``buildReference(vars = NULL)`` does (the package's k-means start on the
    unit-length cells, then :data:`ONE_BATCH_ROUNDS` soft k-means rounds, no
    correction).

    Parameters
    ----------
    source : Harmony, or array-like / DataFrame (N, d)
        The run or the embedding.
    meta_data : DataFrame, optional
        One row per reference cell, holding the ``labels`` columns; paired
        with the cells by name when both sides name them, else by position.
    labels : str or list of str, optional
        Columns of ``meta_data`` kept as label columns; needs ``keep_cells``.
    keep_cells : bool, default True
        Keep the corrected cells (float32), their batches and labels.
    nclust, sigma, random_state, device, dtype
        Embedding only: number of clusters (default ``min(round(N / 30),
        100)``), bandwidth (default 0.1), seed of the k-means start (default
        0), and where and in which float type to cluster.

    Returns
    -------
    Reference
    """
    keep_cells = val.check_flag("keep_cells", keep_cells)
    names = label_names(labels)
    if names and not keep_cells:
        raise ValueError(
            f"labels={names} needs keep_cells=True: labels are kept per reference cell"
        )
    if names and meta_data is None:
        raise ValueError(
            f"labels={names} names columns of meta_data, but meta_data "
            f"is None; pass the reference cells' metadata"
        )
    if isinstance(source, Harmony):
        given = {
            name: value
            for name, value in [
                ("nclust", nclust),
                ("sigma", sigma),
                ("random_state", random_state),
                ("device", device),
                ("dtype", dtype),
            ]
            if value is not None
        }
        if given:
            raise TypeError(
                f"{', '.join(given)} only apply to a reference built from an "
                f"embedding; a Harmony run already has its clusters"
            )
        return _from_harmony(source, meta_data, names, keep_cells)
    clustering = OneBatchClustering(
        nclust=nclust,
        sigma=0.1 if sigma is None else sigma,
        random_state=0 if random_state is None else random_state,
        device=device,
        dtype=dtype,
    )
    return _from_embedding(source, meta_data, names, keep_cells, clustering=clustering)


def label_names(labels) -> list:
    """``labels`` (a column name or a list of them) as a list of distinct names."""
    if labels is None:
        return []
    if isinstance(labels, str):
        return [labels]
    if isinstance(labels, (Sequence, np.ndarray, pd.Index)) and not isinstance(labels, bytes):
        names = list(labels)
        if len(set(map(str, names))) != len(names):
            raise ValueError(f"labels names a column more than once: {names}")
        return names
    raise TypeError(
        f"labels must be a column name or a list of column names, not {type(labels).__name__}"
    )


def reference_digest(ref: Reference) -> str:
    """A short fingerprint of a reference's clusters (SHA-256 of ``Nr`` and ``C``,
    16 hex digits): the same for a reference and its saved and loaded copy,
    different for another reference."""
    digest = hashlib.sha256()
    for array in (ref.Nr, ref.C):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


def _from_harmony(ho, meta_data, label_names, keep_cells) -> Reference:
    if ho.n_iter < 1:
        raise ValueError(
            "the Harmony object has not been run (no iteration): build the "
            "reference from the result of run_harmony"
        )
    frame = run_metadata(ho, meta_data)
    assignments = ho.R.T  # (N, K), caller's order
    z_corr = ho.Z_corr.T
    stats = cluster_statistics(assignments, z_corr, ho.Z_orig.T)
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
        algorithm=ho.algorithm,
        sigma=np.asarray(ho.sigma, dtype=np.float64),
        intercept=(np.asarray(ho.W_intercept.T, dtype=np.float64) if harmony2 else None),
        parameters=parameters,
        variables=[str(v) for v in ho.design.variables],
        levels=[list(lv) for lv in ho.design.levels],
        n_cells=int(ho.N),
        dtype=dtype,
        **stats,
    )
    if keep_cells:
        ref.cells = np.ascontiguousarray(z_corr, dtype=np.float32)
        ref.batch_codes = np.ascontiguousarray(ho.design.codes, dtype=np.int32)
        ref.labels = label_frame(frame, label_names)
        names = getattr(ho, "cell_names", None)
        ref.cell_names = (
            kept_cell_names(None, frame)
            if names is None
            else pd.Index(names).astype(str).to_numpy(dtype=str)
        )
    return ref


@dataclass(frozen=True)
class OneBatchClustering:
    """How a one-batch reference is clustered (``build_reference(pcs, ...)``'s
    ``nclust``, ``sigma``, ``random_state``, ``device``, ``dtype``; ``nclust``
    None: the default number of clusters)."""

    nclust: int | None
    sigma: Any
    random_state: Any
    device: Any
    dtype: Any


def _from_embedding(
    data_mat, meta_data, label_names, keep_cells, *, clustering: OneBatchClustering
) -> Reference:
    nclust, sigma, random_state = clustering.nclust, clustering.sigma, clustering.random_state
    torch_device = resolve_device(clustering.device)
    torch_dtype = resolve_dtype(clustering.dtype, torch_device)
    val.check_random_state(random_state)
    meta_data, cells = _one_batch_cells(data_mat, meta_data, torch_dtype)
    n_clusters = (
        default_clusters(cells.shape[0])
        if nclust is None
        else val.check_int("nclust", nclust, 1, cells.shape[0], maximum_is="the number of cells")
    )
    sigma_clusters = val.check_sigma(sigma, n_clusters, dtype=torch_dtype)
    seed = val.resolve_seed(random_state)

    assignments = _soft_kmeans(
        cells, n_clusters, sigma_clusters, seed=seed, device=torch_device, dtype=torch_dtype
    )
    stats = cluster_statistics(assignments, cells, cells)
    parameters = {
        "nclust": n_clusters,
        "random_state": int(seed),
        "soft_kmeans_rounds": ONE_BATCH_ROUNDS,
    }
    ref = Reference(
        algorithm=ONE_BATCH,
        sigma=np.asarray(sigma_clusters, dtype=np.float64),
        parameters=parameters,
        n_cells=int(cells.shape[0]),
        dtype="float64" if torch_dtype == torch.float64 else "float32",
        **stats,
    )
    if keep_cells:
        frame = metadata_rows(meta_data, cells.shape[0], "data_mat's cells")
        ref.cells = np.ascontiguousarray(cells, dtype=np.float32)
        ref.labels = label_frame(frame, label_names)
        ref.cell_names = kept_cell_names(data_mat, frame)
    return ref


def _one_batch_cells(data_mat, meta_data, torch_dtype) -> tuple[pd.DataFrame | None, np.ndarray]:
    """``(meta_data, cells)`` of a one-batch reference: the metadata aligned to
    ``data_mat``'s cells and the cells x PCs array, both checked."""
    if meta_data is not None:
        meta_data = align_metadata(data_mat, meta_data)
        if not isinstance(meta_data, pd.DataFrame):
            raise TypeError(f"meta_data must be a pandas DataFrame, not {type(meta_data).__name__}")
        n_cells = len(meta_data)
    else:
        shape = getattr(data_mat, "shape", None) or np.shape(data_mat)
        if len(shape) != 2:
            raise ValueError(f"data_mat must be 2-D (cells x PCs), got shape {tuple(shape)}")
        n_cells = int(shape[0])  # without metadata: cells in rows
    cells = val.as_cells_by_features(
        data_mat, n_cells, meta_shape=None if meta_data is None else meta_data.shape
    )
    val.check_cell_lengths(cells, torch_dtype)
    val.warn_if_not_reduced(cells)
    return meta_data, cells


def _soft_kmeans(
    cells: np.ndarray, n_clusters: int, sigma, *, seed: int, device, dtype
) -> np.ndarray:
    """Soft assignments (N x K) of ``cells`` (N x d) as symphony's one-batch reference
    clusters them: Harmony 1's default k-means start, then ``soft_kmeans_cpp``'s
    R from Y, Y from R, :data:`ONE_BATCH_ROUNDS` times."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    with torch.no_grad():
        z = torch.from_numpy(np.ascontiguousarray(cells, dtype=np_dtype)).to(device)
        z_cos = clu.normalize_rows(z)
        del z
        generator = torch.Generator(device="cpu").manual_seed(seed)
        start = start_for("harmony1", "greedy", n_clusters)
        centroids = clu.normalize_rows(
            kmeans_centroids(z_cos, n_clusters, generator=generator, start=start)
        )
        sigma_t = torch.as_tensor(sigma, device=device)
        assignments: torch.Tensor | None = None
        for _ in range(ONE_BATCH_ROUNDS):
            assignments, _ = clu.soft_assign(z_cos, centroids, sigma_t, out=assignments)
            centroids = clu.compute_centroids(assignments, z_cos)
        del z_cos
        assert assignments is not None  # ONE_BATCH_ROUNDS >= 1
        return assignments.cpu().numpy()


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
    for i, (name, column) in enumerate(() if ref.labels is None else ref.labels.items()):
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
            "scaling": projection.scaling,
            "n_genes": projection.n_genes,
            "clip": None if projection.clip is None else [float(v) for v in projection.clip],
        }
    if ref.basis is not None:
        metadata["basis"] = str(ref.basis)
    if ref.adjusted_basis is not None:
        metadata["adjusted_basis"] = str(ref.adjusted_basis)
    text = json.dumps(metadata, sort_keys=True, allow_nan=False).encode("utf-8")
    arrays[METADATA_KEY] = np.frombuffer(text, dtype=np.uint8)
    return arrays


def _projection_arrays(projection: GeneProjection) -> dict[str, np.ndarray]:
    """The float64 arrays of a gene projection, by their key in the file."""
    return {
        "loadings": projection.loadings,
        "gene_mean": projection.mean,
        "gene_std": projection.std,
        "gene_scaled_mean": projection.scaled_mean,
        "pc_mean": projection.pc_mean,
    }
