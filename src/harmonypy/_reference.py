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
with a :class:`ReferenceFileError` that names the file and the field or array.
It checks the file before reading any array (every metadata field; each
array's declared dtype and shape, from its ``.npy`` header, against what the
metadata implies; each member's declared size against its bytes, through
``harmonypy._npzfile``), so that a small corrupt file cannot make it allocate
more than a valid file of that metadata would.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from harmonypy import __version__
from harmonypy import _clustering as clu
from harmonypy import _memory
from harmonypy import _validation as val
from harmonypy._cellnames import align_metadata, align_to_names, carries_names
from harmonypy._design import check_columns
from harmonypy._device import resolve_device, resolve_dtype
from harmonypy._harmony import Harmony, _default_clusters
from harmonypy._io import OutputFiles
from harmonypy._kmeans import kmeans_centroids, start_for
from harmonypy._npzfile import NpzArchive
from harmonypy._projection import SCALINGS, GeneProjection

__all__ = ["Reference", "ReferenceFileError", "build_reference", "label_names",
           "load_reference", "reference_digest"]

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
        intact (an existing file at ``path`` is replaced). Only arrays are
        written (no pickle). Returns the path written.

        Raises
        ------
        IsADirectoryError
            ``path`` is a folder: a file name is needed (no name is guessed).
        FileNotFoundError
            The folder of ``path`` does not exist.
        """
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
                    random_state=None, device=None, dtype=None) -> Reference:
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
        raise ValueError(f"labels={names} needs keep_cells=True: labels are kept per "
                         f"reference cell")
    if names and meta_data is None:
        raise ValueError(f"labels={names} names columns of meta_data, but meta_data "
                         f"is None; pass the reference cells' metadata")
    if isinstance(source, Harmony):
        given = {name: value for name, value in [("nclust", nclust), ("sigma", sigma),
                 ("random_state", random_state), ("device", device), ("dtype", dtype)]
                 if value is not None}
        if given:
            raise TypeError(f"{', '.join(given)} only apply to a reference built from an "
                            f"embedding; a Harmony run already has its clusters")
        return _from_harmony(source, meta_data, names, keep_cells)
    clustering = OneBatchClustering(nclust=nclust, sigma=0.1 if sigma is None else sigma,
                                    random_state=0 if random_state is None else random_state,
                                    device=device, dtype=dtype)
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
    raise TypeError(f"labels must be a column name or a list of column names, not "
                    f"{type(labels).__name__}")


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
        raise ValueError("the Harmony object has not been run (no iteration): build the "
                         "reference from the result of run_harmony")
    frame = _run_metadata(ho, meta_data)
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
        names = getattr(ho, "cell_names", None)
        ref.cell_names = (_cell_names(None, frame) if names is None
                          else pd.Index(names).astype(str).to_numpy(dtype=str))
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


def _from_embedding(data_mat, meta_data, label_names, keep_cells, *,
                    clustering: OneBatchClustering) -> Reference:
    nclust, sigma, random_state = clustering.nclust, clustering.sigma, clustering.random_state
    torch_device = resolve_device(clustering.device)
    torch_dtype = resolve_dtype(clustering.dtype, torch_device)
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
        # As Harmony 1's default start, then symphony's soft_kmeans_cpp: R from
        # Y, Y from R, 20 times.
        start = start_for("harmony1", "greedy", n_clusters)
        centroids = clu.normalize_rows(
            kmeans_centroids(z_cos, n_clusters, generator=generator, start=start))
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


#: What to do when a Harmony run's cells and ``meta_data`` name different cells.
_RUN_REMEDY = ("Pass the metadata of the run's cells (e.g. meta.loc[ho.cell_names]), make "
               "the names unique, run Harmony on inputs named as this metadata is (e.g. "
               "run_harmony(pcs.set_axis(meta.index), meta, ...)), or drop the metadata's "
               "names to pair its rows with the run's cells by position "
               "(meta.reset_index(drop=True))")


def _run_metadata(ho, meta_data) -> pd.DataFrame | None:
    """``meta_data``'s rows in the order of the Harmony run's cells.

    Paired by name when both sides name their cells (``ho.cell_names``, set
    by :func:`run_harmony`; ``meta_data``'s index or name column, as
    ``harmonypy._cellnames.metadata_names`` finds it): the same names in
    another order are reordered, as :func:`run_harmony` does with its own
    inputs, and names that disagree are refused. Otherwise rows pair by
    position, which is logged at INFO: nothing can check that pairing.
    """
    if meta_data is None:
        return None
    if not isinstance(meta_data, pd.DataFrame):
        raise TypeError(f"meta_data must be a pandas DataFrame, not {type(meta_data).__name__}")
    names = getattr(ho, "cell_names", None)
    by_name = False
    if names is not None:
        meta_data, by_name = align_to_names(
            pd.Index(names), meta_data, cells_from="the Harmony run's cell names (ho.cell_names)",
            remedy=_RUN_REMEDY)
    if not by_name:
        unnamed = [what for what, named in [
            ("the Harmony run's inputs", names is not None),
            ("meta_data", carries_names(meta_data.index))] if not named]
        logger.info("build_reference: meta_data's rows are paired with the Harmony run's cells "
                    "by position (%s named no cells)", " and ".join(unnamed))
    return _metadata_rows(meta_data, ho.N, "the Harmony run's cells")


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
    check_columns(frame.columns, names, what="labels names column(s)", where="meta_data")
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


class ReferenceFileError(ValueError):
    """A reference file that cannot be loaded, with the file in ``path``.

    Raised for a file that is not a readable ``.npz``, not a harmonypy
    reference, or corrupt: a metadata field of the wrong type or range, an
    array whose declared dtype or shape disagrees with the metadata, a member
    larger than its data can hold, non-finite or out-of-range values. The
    message names the file, then the field or array and what was expected.
    """

    def __init__(self, path: str | Path, message: str):
        super().__init__(f"reference file {str(path)!r} {message}")
        self.path = Path(path)


#: Largest metadata entry read (JSON text; a reference's is a few kB).
_MAX_METADATA_BYTES = 64 * 2**20
#: Kinds of NumPy dtype a label column's categories may have.
_CATEGORY_KINDS = "Uiufbmm"


def load_reference(path: str | Path) -> Reference:
    """Read a reference written by :meth:`Reference.save`.

    The file is checked before any array is read: its metadata field by
    field (type, shape, range), then each array's ``.npy`` header against
    the dtype and shape the metadata implies, each member's declared size
    against its bytes in the file (a compressed member is inflated only up
    to its declared size), and the total against the memory available.
    The values are checked once read: finite, in range, counts consistent.
    Only arrays are read, never a pickle: loading a file cannot run code.

    Raises
    ------
    FileNotFoundError
        No such file.
    IsADirectoryError
        ``path`` is a folder.
    ReferenceFileError
        (a ``ValueError``) A file that is not a readable ``.npz`` (truncated,
        corrupt, another format), an ``.npz`` that is not a harmonypy
        reference, a reference written by a newer format version, or a
        corrupt one. Its ``path`` is the file; the message names the file
        and the metadata field or array.
    MemoryError
        The arrays the file declares (consistently) exceed the memory
        available; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference file {str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"reference file {str(path)!r} is a folder; expected a .npz "
                                f"file written by Reference.save")
    problem = functools.partial(ReferenceFileError, path)
    with open(path, "rb") as handle:
        if handle.read(6) == b"\x93NUMPY":
            raise problem("is a single .npy array, not a .npz harmonypy reference")
    with NpzArchive(path, problem) as archive:
        metadata = _read_metadata(archive, problem)
        headers = _checked_headers(archive, metadata, problem)
        _check_memory(path, sum(header.nbytes for header in headers.values()))
        arrays = {key: archive.read(header) for key, header in headers.items()}
    _check_values(arrays, metadata, problem)
    return _from_arrays(arrays, metadata)


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _read_metadata(archive, problem) -> dict:
    """The JSON metadata, every field checked (:func:`_check_metadata`)."""
    if METADATA_KEY not in archive.keys:
        raise problem(f"is not a harmonypy reference: it has no {METADATA_KEY!r} entry "
                      f"(entries: {sorted(archive.keys)[:8]})")
    header = archive.header(METADATA_KEY)
    if header.dtype != np.uint8 or len(header.shape) != 1:
        raise problem(f"is not a harmonypy reference: its {METADATA_KEY!r} entry is "
                      f"{header.dtype} {header.shape}, not UTF-8 bytes")
    if header.nbytes > _MAX_METADATA_BYTES:
        raise problem(f"has {header.nbytes:,} bytes of metadata, more than a reference's "
                      f"(at most {_MAX_METADATA_BYTES:,} are read); the file is corrupt")
    raw = archive.read(header)
    try:
        metadata = json.loads(raw.tobytes().decode("utf-8"), parse_float=_finite_float,
                              parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise problem(f"has unreadable metadata ({_reason(err)}); the file is corrupt") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise problem(f"is not a harmonypy reference (format {found!r}, expected "
                      f"{FORMAT_NAME!r})")
    version = metadata.get("format_version")
    if not _is_int(version) or version < 1:
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
    _check_metadata(metadata, problem)
    return metadata


# ------------------------------------------------------------ metadata checks
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite JSON number (not a boolean)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _numbers(value) -> bool:
    """A list of numbers, non-finite ones written as text (as :func:`_json_value` does)."""
    return isinstance(value, list) and all(
        _is_number(v) or v in ("inf", "-inf") for v in value)


def _field(problem, name: str, value, expected: str) -> Exception:
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return problem(f"has an invalid metadata field {name!r}: {text}; expected {expected}")


#: Each known run parameter: (check, what is expected). Unknown ones are kept as they are.
_PARAMETERS = {
    "theta": (_numbers, "a list of numbers"),
    "lamb": (_numbers, "a list of numbers"),
    "lamb_estimated": (lambda v: isinstance(v, bool), "true or false"),
    "converged": (lambda v: isinstance(v, bool), "true or false"),
    "alpha": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "batch_prop_cutoff": (lambda v: v is None or (_is_number(v) and 0 <= v <= 1),
                          "null or a number in [0, 1]"),
    "block_size": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "epsilon_cluster": (lambda v: _is_number(v) or v == "-inf", "a number or \"-inf\""),
    "epsilon_harmony": (lambda v: _is_number(v) or v == "-inf", "a number or \"-inf\""),
    "nclust": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_iter_kmeans": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "soft_kmeans_rounds": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "n_iter": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "random_state": (_is_int, "an integer"),
}


def _check_metadata(metadata: dict, problem) -> None:
    """Every field of the metadata: type, range, and agreement with the others."""
    if metadata["algorithm"] not in ALGORITHMS:
        raise problem(f"names an unknown algorithm {metadata['algorithm']!r}; expected one "
                      f"of {ALGORITHMS}")
    for name in ("n_clusters", "n_dims", "n_cells"):
        if not _is_int(metadata[name]) or metadata[name] < 1:
            raise _field(problem, name, metadata[name], "an integer >= 1")
    if metadata["n_clusters"] > metadata["n_cells"]:
        raise _field(problem, "n_clusters", metadata["n_clusters"],
                     f"at most n_cells = {metadata['n_cells']} (clusters of the reference cells)")
    if metadata["dtype"] not in ("float32", "float64"):
        raise _field(problem, "dtype", metadata["dtype"], "'float32' or 'float64'")
    for name in ("harmonypy_version", "basis", "adjusted_basis"):
        if name in metadata and not isinstance(metadata[name], str):
            raise _field(problem, name, metadata[name], "text")
    arrays = metadata["arrays"]
    if (not isinstance(arrays, list) or not all(isinstance(a, str) for a in arrays)
            or len(set(arrays)) != len(arrays)):
        raise _field(problem, "arrays", arrays, "a list of distinct array names")
    _check_batches(metadata, problem)
    _check_parameters(metadata, problem)
    columns = metadata["label_columns"]
    if not isinstance(columns, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str)
            and isinstance(c.get("ordered", False), bool) for c in columns):
        raise _field(problem, "label_columns", columns,
                     'a list of {"name": text, "ordered": true or false}')
    names = [c["name"] for c in columns]
    if len(set(names)) != len(names):
        raise _field(problem, "label_columns", names, "distinct column names")
    _check_projection_metadata(metadata.get("projection"), problem)


def _check_batches(metadata: dict, problem) -> None:
    """``variables`` and ``levels``: one list of distinct levels per distinct variable."""
    variables, levels = metadata["variables"], metadata["levels"]
    if (not isinstance(variables, list) or not all(isinstance(v, str) for v in variables)
            or len(set(variables)) != len(variables)):
        raise _field(problem, "variables", variables, "a list of distinct variable names")
    if (metadata["algorithm"] == ONE_BATCH) != (not variables):
        raise _field(problem, "variables", variables,
                     "[] for a one-batch reference (algorithm 'none'), at least one variable "
                     "for a Harmony reference")
    if not isinstance(levels, list) or len(levels) != len(variables):
        raise _field(problem, "levels", levels,
                     f"a list of {len(variables)} list(s) of levels, one per variable")
    for i, values in enumerate(levels):
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, (str, int, float)) for v in values)
                or len({str(v) for v in values}) != len(values)):
            raise _field(problem, f"levels[{i}]", values,
                         f"the levels of variable {variables[i]!r}: a non-empty list of "
                         f"distinct texts, numbers or booleans")


def _check_parameters(metadata: dict, problem) -> None:
    """The run's parameters that are known, by :data:`_PARAMETERS`; lengths of the
    per-level ``theta`` (B) and ``lamb`` (B + 1)."""
    parameters = metadata["parameters"]
    if not isinstance(parameters, dict):
        raise _field(problem, "parameters", parameters, "a JSON object")
    for name, (check, expected) in _PARAMETERS.items():
        if name in parameters and not check(parameters[name]):
            raise _field(problem, f"parameters.{name}", parameters[name], expected)
    if metadata["algorithm"] == "harmony2" and not _is_number(
            parameters.get("batch_prop_cutoff")):
        raise _field(problem, "parameters.batch_prop_cutoff",
                     parameters.get("batch_prop_cutoff"),
                     "a number in [0, 1] (a Harmony2 reference's mapping uses it)")
    n_levels = sum(len(values) for values in metadata["levels"])
    for name, size, what in (("theta", n_levels, "one per batch level"),
                             ("lamb", n_levels + 1, "the intercept's, then one per level")):
        if metadata["variables"] and name in parameters and len(parameters[name]) != size:
            raise _field(problem, f"parameters.{name}", parameters[name], f"{size} numbers ({what})")
    if "nclust" in parameters and parameters["nclust"] != metadata["n_clusters"]:
        raise _field(problem, "parameters.nclust", parameters["nclust"],
                     f"n_clusters = {metadata['n_clusters']}")


def _check_projection_metadata(info, problem) -> None:
    if info is None:
        return
    if not isinstance(info, dict) or info.get("scaling") not in SCALINGS:
        raise _field(problem, "projection", info,
                     f'{{"scaling": one of {sorted(SCALINGS)}, "n_genes": ..., "clip": ...}}')
    if not _is_int(info.get("n_genes")) or info["n_genes"] < 1:
        raise _field(problem, "projection.n_genes", info.get("n_genes"), "an integer >= 1")
    clip = info.get("clip")
    if clip is not None and (not isinstance(clip, list) or len(clip) != 2
                             or not all(_is_number(v) for v in clip) or clip[0] > clip[1]):
        raise _field(problem, "projection.clip", clip, "null or [low, high], low <= high")


# ------------------------------------------------------------- array checks
def _array_specs(metadata: dict) -> tuple[dict, dict]:
    """``(required, optional)``: for each array key, its dtype (or the kinds of
    dtype allowed) and its shape (None: any length), as the metadata implies."""
    k, d, n = metadata["n_clusters"], metadata["n_dims"], metadata["n_cells"]
    f64, i32 = np.dtype(np.float64), np.dtype(np.int32)
    required = {"Nr": (f64, (k,)), "C": (f64, (k, d)), "Y": (f64, (d, k)),
                "sigma": (f64, (k,)), "cluster_center": (f64, (k, d)),
                "cluster_cov": (f64, (k, d, d))}
    if metadata["algorithm"] == "harmony2":
        required["intercept"] = (f64, (k, d))
    for i in range(len(metadata["label_columns"])):
        required[f"label_{i}_codes"] = (i32, (n,))
        required[f"label_{i}_categories"] = (_CATEGORY_KINDS, (None,))
    projection = metadata.get("projection")
    if projection is not None:
        g = projection["n_genes"]
        required.update({"genes": ("U", (g,)), "loadings": (f64, (g, d)),
                         "gene_mean": (f64, (g,)), "gene_std": (f64, (g,)),
                         "gene_scaled_mean": (f64, (g,)), "pc_mean": (f64, (d,))})
    optional = {"cells": (np.dtype(np.float32), (n, d)),
                "batch_codes": (i32, (n, len(metadata["variables"]))),
                "cell_names": ("U", (n,))}
    return required, optional


def _checked_headers(archive, metadata: dict, problem) -> dict:
    """The ``.npy`` header of every array the metadata implies, each checked against
    its expected dtype and shape; no array data is read. Arrays the metadata
    lists but this version does not know are left unread."""
    required, optional = _array_specs(metadata)
    listed = set(metadata["arrays"])
    specs = {**required, **{key: spec for key, spec in optional.items() if key in listed}}
    headers = {}
    for key, (dtype, shape) in specs.items():
        if key not in archive.keys:
            raise problem(f"lacks the array {key!r}"
                          + (" its metadata lists" if key in listed else ""))
        header = archive.header(key)
        kind_ok = (header.dtype == dtype if isinstance(dtype, np.dtype)
                   else header.dtype.kind in dtype and header.dtype.isnative)
        shape_ok = len(header.shape) == len(shape) and all(
            e is None or e == a for e, a in zip(shape, header.shape))
        if not (kind_ok and shape_ok):
            want = dtype if isinstance(dtype, np.dtype) else (
                "text" if dtype == "U" else "numbers or text")
            dims = ", ".join("n" if e is None else str(e) for e in shape)
            raise problem(f"has an array {key!r} of {header.dtype} {header.shape}; expected "
                          f"{want} ({dims}{',' if len(shape) == 1 else ''}) from its metadata")
        headers[key] = header
    return headers


def _check_memory(path: Path, nbytes: int) -> None:
    """Refuse, naming the file, arrays that would not fit in the memory available."""
    available = _memory.host_available()
    if available is not None and nbytes > available:
        raise MemoryError(f"reference file {str(path)!r} holds {nbytes / 2**30:.2f} GiB of "
                          f"arrays, more than the {available / 2**30:.2f} GiB of memory "
                          f"available")


def _array(problem, key: str, message: str) -> Exception:
    return problem(f"has an invalid array {key!r}: {message}")


def _check_values(arrays: dict, metadata: dict, problem) -> None:
    """Values of the arrays once read: finite, in range, consistent with the metadata."""
    for key, array in arrays.items():
        if array.dtype.kind == "f":
            bad = array.size - int(np.count_nonzero(np.isfinite(array)))
            if bad:
                raise _array(problem, key, f"{bad:,} non-finite value(s) (NaN or inf)")
    n, sizes = metadata["n_cells"], arrays["Nr"]
    if (sizes <= 0).any() or abs(sizes.sum() - n) > 1e-3 * n:
        raise _array(problem, "Nr", f"cluster sizes from {sizes.min():.4g} to "
                                    f"{sizes.max():.4g} summing to {sizes.sum():.6g}; expected "
                                    f"sizes > 0 summing to n_cells = {n} (each cell's "
                                    f"assignments sum to 1)")
    try:  # the bounds of the reference run's own check
        val.check_sigma(arrays["sigma"], metadata["n_clusters"], dtype=metadata["dtype"])
    except ValueError as err:
        raise _array(problem, "sigma", str(err)) from None
    _check_cluster_terms(arrays, metadata, problem)
    _check_covariances(arrays["cluster_cov"], problem)
    if "batch_codes" in arrays:
        codes = arrays["batch_codes"]
        for v, (name, levels) in enumerate(zip(metadata["variables"], metadata["levels"])):
            column = codes[:, v]
            if column.size and (column.min() < 0 or column.max() >= len(levels)):
                raise _array(problem, "batch_codes",
                             f"codes of variable {name!r} from {column.min()} to "
                             f"{column.max()}; expected 0 to {len(levels) - 1} (its levels)")
    for i, column in enumerate(metadata["label_columns"]):
        codes, categories = arrays[f"label_{i}_codes"], arrays[f"label_{i}_categories"]
        if codes.size and (codes.min() < -1 or codes.max() >= categories.size):
            raise _array(problem, f"label_{i}_codes",
                         f"codes of label column {column['name']!r} from {codes.min()} to "
                         f"{codes.max()}; expected -1 (missing) to {categories.size - 1}")
        if not pd.Index(categories).is_unique:
            raise _array(problem, f"label_{i}_categories",
                         f"categories of label column {column['name']!r} repeat")
    if "genes" in arrays:
        if not pd.Index(arrays["genes"]).is_unique:
            raise _array(problem, "genes", "gene names repeat; queries are matched by gene name")
        if (arrays["gene_std"] <= 0).any():
            raise _array(problem, "gene_std", "values <= 0; expected per-gene scales > 0")


def _check_cluster_terms(arrays: dict, metadata: dict, problem) -> None:
    """Centroids ``Y`` of unit length, and cluster means (``C / Nr``, the centres)
    no longer than a cell of the reference run's dtype can be (the bound of
    :func:`run_harmony`'s input check)."""
    with np.errstate(over="ignore"):  # huge values give inf lengths, refused below
        norms = np.linalg.norm(arrays["Y"], axis=0)
        means = arrays["C"] / arrays["Nr"][:, None]
        lengths = {"C": np.linalg.norm(means, axis=1).max(),
                   "cluster_center": np.linalg.norm(arrays["cluster_center"], axis=1).max()}
    off = np.flatnonzero((np.abs(norms - 1) > 1e-6) & (norms != 0))
    if off.size:
        raise _array(problem, "Y", f"centroid {int(off[0])} has length {norms[off[0]]:.6g}; "
                                   f"expected unit-length columns (the rows of C scaled)")
    d = metadata["n_dims"]
    longest = math.sqrt(float(np.finfo(metadata["dtype"]).max) / d)
    for key, length in lengths.items():
        if not length <= longest:
            raise _array(problem, key, f"a cluster mean of length {length:.3g}, beyond what a "
                                       f"{metadata['dtype']} cell can be ({longest:.1e})")


def _check_covariances(cov: np.ndarray, problem) -> None:
    """Each cluster's covariance symmetric, positive semi-definite up to rounding,
    and not zero (mapping scores whiten by it)."""
    scale = np.abs(cov).max(axis=(1, 2))
    asymmetric = np.abs(cov - cov.transpose(0, 2, 1)).max(axis=(1, 2)) > 1e-9 * scale
    if asymmetric.any():
        raise _array(problem, "cluster_cov", f"cluster {int(np.flatnonzero(asymmetric)[0])}'s "
                                             f"covariance is not symmetric")
    try:
        eigenvalues = np.linalg.eigvalsh(cov)
    except np.linalg.LinAlgError as err:
        raise _array(problem, "cluster_cov", f"not covariances ({_reason(err)})") from None
    negative = eigenvalues[:, 0] < -1e-6 * np.maximum(eigenvalues[:, -1], 0)
    if negative.any():
        k = int(np.flatnonzero(negative)[0])
        raise _array(problem, "cluster_cov", f"cluster {k}'s covariance has a negative "
                                             f"eigenvalue ({eigenvalues[k, 0]:.3g}); expected "
                                             f"covariances (positive semi-definite)")
    spread = np.trace(cov, axis1=1, axis2=2)
    flat = np.flatnonzero(spread <= 1e-12 * spread.max(initial=0))
    if flat.size:
        raise _array(problem, "cluster_cov", f"cluster {int(flat[0])}'s covariance has (almost) "
                                             f"no variance (trace {spread[flat[0]]:.3g}); "
                                             f"expected the spread of its cells")


def _from_arrays(arrays: dict, metadata: dict) -> Reference:
    """The :class:`Reference` of arrays and metadata already checked."""
    labels = {}
    for i, column in enumerate(metadata["label_columns"]):
        labels[column["name"]] = pd.Categorical.from_codes(
            arrays[f"label_{i}_codes"], categories=pd.Index(arrays[f"label_{i}_categories"]),
            ordered=bool(column.get("ordered")))
    projection = None
    info = metadata.get("projection")
    if info is not None:
        clip = info.get("clip")
        projection = GeneProjection(
            genes=arrays["genes"], loadings=arrays["loadings"], mean=arrays["gene_mean"],
            std=arrays["gene_std"], scaled_mean=arrays["gene_scaled_mean"],
            pc_mean=arrays["pc_mean"], clip=None if clip is None else tuple(map(float, clip)),
            scaling=info["scaling"])
    return Reference(
        algorithm=metadata["algorithm"], Nr=arrays["Nr"], C=arrays["C"], Y=arrays["Y"],
        sigma=arrays["sigma"], cluster_center=arrays["cluster_center"],
        cluster_cov=arrays["cluster_cov"], intercept=arrays.get("intercept"),
        parameters=metadata["parameters"], variables=list(metadata["variables"]),
        levels=[list(values) for values in metadata["levels"]],
        n_cells=int(metadata["n_cells"]), dtype=metadata["dtype"], cells=arrays.get("cells"),
        batch_codes=arrays.get("batch_codes"),
        labels=pd.DataFrame(labels) if labels else None,
        cell_names=arrays.get("cell_names"), projection=projection,
        basis=metadata.get("basis"), adjusted_basis=metadata.get("adjusted_basis"))
