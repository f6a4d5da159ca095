"""From genes to a reference's PCs: what an AnnData reference keeps to project a query.

A reference built from AnnData (:func:`~harmonypy.build_reference` on an
``adata``) keeps a :class:`GeneProjection`, and :func:`~harmonypy.map_query`
on an ``adata_query`` uses it to put the query's expression into the
reference's PC space before mapping (Symphony's ``mapQuery``, step 1:
``Z_pca_query = t(loadings) %*% scaled query``, ``R/mapQuery.R``). For one
query cell ``x`` (one value per reference gene)::

    z = (clip((x - mean) / std, lo, hi) - scaled_mean) @ loadings + pc_mean

* ``mean``, ``std`` (G): the per-gene scaling the reference's expression went
  through before its PCA: ``adata.var["mean"]`` and ``adata.var["std"]``, as
  ``sc.pp.scale`` writes them (``mean`` 0 when it ran with
  ``zero_center=False``; 0 and 1 when there was no scaling);
* ``lo, hi``: the range of the reference's scaled values: clipping to it
  reproduces ``sc.pp.scale(max_value=...)`` on the reference's own cells
  (Symphony's ``scaleDataWithStats`` clips at +-10), and beyond that only
  touches query values outside the range of every reference value; no
  clipping without scaling;
* ``scaled_mean`` (G): the mean of the reference's scaled values, and
  ``pc_mean`` (d): the mean of its PCs. With them a reference cell projects
  exactly onto its own ``obsm[basis]``, whichever cells the PCA centred
  on, and a gene the query lacks is set to the reference's mean, so that it
  adds nothing (Symphony fills a missing gene with 0 *after* scaling, which
  is the reference's mean when the reference was centred on its own cells);
* ``loadings`` (G x d): ``adata.varm["PCs"]``, keeping the genes whose row is
  not all zeros (scanpy writes zero rows for genes its PCA left out, e.g.
  not highly variable).

:func:`fit_projection` derives these and checks them on the reference itself
(its cells must project onto ``obsm[basis]``) before any work is done;
:func:`project` applies them to a query in chunks of cells, so memory stays
O(chunk x G) beyond the (N x d) result. This module reads no AnnData: the
adapter layer (:func:`harmonypy.adapters.anndata.gene_projection`,
:func:`~harmonypy.adapters.anndata.read_expression`) hands it the loadings,
the gene table and the expression matrix as an :class:`Expression`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "Expression",
    "GeneProjection",
    "GeneScaling",
    "fit_projection",
    "gene_scaling",
    "kept_genes",
    "project",
]

#: Values of the expression matrix handled at once (cells x genes of a chunk).
_BLOCK_ELEMENTS = 2**22
#: Reference cells on which the projection is checked against ``obsm[basis]``.
_CHECK_CELLS = 2000
#: Largest relative difference (to the largest |PC| value) accepted by that check.
_CHECK_TOLERANCE = 1e-2
#: How each scaling is described in messages and in the reference file.
SCALINGS = {
    "scaled": "sc.pp.scale: (x - var['mean']) / var['std']",
    "scaled_uncentred": "sc.pp.scale(zero_center=False): x / var['std']",
    "none": "no scaling (PCA on the expression as it is)",
}
_SHOWN = 5


@dataclass(eq=False)
class GeneProjection:
    """How a query's expression is put into the reference's PC space.

    ``z = (clip((x - mean) / std, *clip) - scaled_mean) @ loadings + pc_mean``
    for a cell ``x`` over ``genes``; see the module docstring and
    ``docs/mapping.md``.

    Attributes
    ----------
    genes : ndarray (G,) of str
        Gene names (the reference's ``var_names`` with a non-zero loading row).
    loadings : ndarray (G, d), float64
        PCA loadings (``varm["PCs"]`` rows of those genes).
    mean, std : ndarray (G,), float64
        Per-gene scaling applied before the projection.
    scaled_mean : ndarray (G,), float64
        Mean of the reference's scaled values over its cells.
    pc_mean : ndarray (d,), float64
        Mean of the reference's PCs (``obsm[basis]``) over its cells.
    clip : tuple (lo, hi) or None
        Range the scaled values are clipped to; None: no clipping.
    scaling : str
        ``'scaled'``, ``'scaled_uncentred'`` or ``'none'`` (see :data:`SCALINGS`).
    """

    genes: np.ndarray
    loadings: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    scaled_mean: np.ndarray
    pc_mean: np.ndarray
    clip: tuple[float, float] | None
    scaling: str

    @property
    def n_genes(self) -> int:
        return int(self.genes.shape[0])

    @property
    def d(self) -> int:
        return int(self.loadings.shape[1])


# ====================================================================== build
@dataclass(frozen=True)
class Expression:
    """An expression matrix as the adapter layer read it, cells x genes.

    matrix : (n_cells, n_genes) NumPy array, SciPy sparse matrix or array, or
        an anndata backed dataset (read a block of rows at a time).
    source : str, how messages name it (``"adata.X"``, ``"adata_query.layers['raw']"``).
    genes : pandas.Index of str, the gene (column) names.
    cells : pandas.Index, the cell (row) names.
    """

    matrix: Any
    source: str
    genes: pd.Index
    cells: pd.Index


def kept_genes(
    weights: np.ndarray, *, genes: pd.Index, d: int, basis: str, loadings: str
) -> np.ndarray:
    """Rows of the loadings (G_all x d) that take part in the projection: not all zeros.

    Refuses loadings of the wrong shape, not finite or all zeros, and gene
    names repeated among the kept rows (query genes are matched by name).
    ``basis`` and ``loadings`` are the keys the messages name.
    """
    n_vars = len(genes)
    if weights.ndim != 2 or weights.shape != (n_vars, d):
        raise ValueError(
            f"adata.varm[{loadings!r}] has shape {weights.shape}; expected (n_vars, "
            f"PCs of obsm[{basis!r}]) = ({n_vars}, {d}): the loadings must belong "
            f"to the PCA that gave obsm[{basis!r}]"
        )
    if not np.issubdtype(weights.dtype, np.number) or not np.isfinite(weights).all():
        raise ValueError(f"adata.varm[{loadings!r}] must hold finite numbers")
    kept = np.flatnonzero(np.any(weights != 0, axis=1))
    if kept.size == 0:
        raise ValueError(f"adata.varm[{loadings!r}] is all zeros")
    if genes[kept].has_duplicates:
        repeated = genes[kept][genes[kept].duplicated()].unique()
        raise ValueError(
            f"adata.var_names repeats gene names ({_shown(repeated)}"
            f"): query genes are matched by name; call adata.var_names_make_unique() "
            f"before the PCA"
        )
    return kept


@dataclass(frozen=True)
class GeneScaling:
    """The kept genes' scaling before the PCA (see :func:`gene_scaling`).

    mean, std : (G,) float64; scaling : a key of :data:`SCALINGS`.
    """

    mean: np.ndarray
    std: np.ndarray
    scaling: str


def fit_projection(
    expression: Expression,
    *,
    pcs: np.ndarray,
    weights: np.ndarray,
    kept: np.ndarray,
    scaling: GeneScaling,
    keys: tuple[str, str],
) -> GeneProjection:
    """The :class:`GeneProjection` of a reference, checked on its own cells.

    Parameters
    ----------
    expression : Expression
        The matrix the reference's PCA was computed from.
    pcs : ndarray (n_obs, d)
        The reference's PCs (``obsm[basis]``).
    weights : ndarray (n_vars, d)
        The PCA loadings; ``kept`` (:func:`kept_genes`) their rows used.
    scaling : GeneScaling
        The kept genes' scaling (:func:`gene_scaling`).
    keys : (basis, loadings), the keys the messages name.

    Raises
    ------
    ValueError
        A negative expression matrix without a recorded scaling (scaled by
        something that did not record it), or cells that do not project onto
        ``pcs`` (the matrix is not the one the PCA saw). Each message names
        what is missing and how to provide it.
    """
    mean, std, kind = scaling.mean, scaling.std, scaling.scaling
    source = expression.source
    sample = np.unique(
        np.linspace(0, pcs.shape[0] - 1, min(pcs.shape[0], _CHECK_CELLS)).astype(np.int64)
    )
    kept_weights = weights[kept].astype(np.float64)
    sums, low, high, projected = _reference_pass(
        expression, kept=kept, weights=kept_weights, sample=sample, n_obs=pcs.shape[0]
    )
    if kind == "none" and low < 0:
        raise ValueError(
            f"{source} has negative values, so the PCA was not run on expression as it is "
            f"(log-normalised), but adata.var has no 'mean' and 'std' columns (which "
            f"sc.pp.scale writes): how each gene was scaled cannot be recovered, and a query "
            f"could not be scaled the same way. Store each gene's mean and standard deviation "
            f"in adata.var['mean'] and adata.var['std'], or pass loadings=None to keep no "
            f"gene projection"
        )
    if kind == "scaled" and low >= 0:
        # sc.pp.scale(zero_center=False) records the mean but does not subtract it.
        mean, kind = np.zeros_like(mean), "scaled_uncentred"
    scaled_mean = sums / pcs.shape[0]
    pc_mean = np.asarray(pcs, dtype=np.float64).mean(0)
    residual = projected - scaled_mean @ kept_weights + pc_mean - pcs[sample]
    scale = max(float(np.abs(pcs[sample]).max()), np.finfo(np.float64).tiny)
    difference = float(np.abs(residual).max()) / scale
    if not difference <= _CHECK_TOLERANCE:
        basis, loadings = keys
        raise ValueError(
            f"{source} projected through adata.varm[{loadings!r}] does not give "
            f"adata.obsm[{basis!r}] (largest difference {difference:.2g} of the largest PC "
            f"value, on {sample.size} cells): the expression matrix must be the one the PCA "
            f"was computed from (after sc.pp.scale when it was scaled; pass layer=KEY if it "
            f"is in a layer), and the loadings those of that PCA"
        )
    return GeneProjection(
        genes=expression.genes[kept].to_numpy(dtype=str),
        loadings=kept_weights,
        mean=mean,
        std=std,
        scaled_mean=scaled_mean,
        pc_mean=pc_mean,
        clip=None if kind == "none" else (low, high),
        scaling=kind,
    )


def _reference_pass(
    expression: Expression, *, kept: np.ndarray, weights: np.ndarray, sample: np.ndarray, n_obs: int
):
    """One pass over the reference: the sums and range of its (scaled) values
    over the kept genes, and the ``sample`` cells' projection without centring.

    Returns ``(sums (G,), low, high, projected (len(sample), d))``.
    """
    source = expression.source
    sums = np.zeros(kept.size)
    low, high = np.inf, -np.inf
    projected = np.empty((sample.size, weights.shape[1]))
    for start, block in _blocks(expression.matrix, kept, n_obs, source):
        if not np.isfinite(block).all():
            raise ValueError(f"{source} has non-finite values (NaN or inf)")
        sums += block.sum(0)
        low, high = min(low, float(block.min())), max(high, float(block.max()))
        rows = sample[(sample >= start) & (sample < start + block.shape[0])]
        if rows.size:
            projected[np.searchsorted(sample, rows)] = block[rows - start] @ weights
    return sums, low, high, projected


def gene_scaling(var: pd.DataFrame, genes_kept: np.ndarray) -> GeneScaling:
    """The kept genes' scaling from the gene table ``var`` (``adata.var``): its
    ``mean`` and ``std`` columns, or none (see the module docstring)."""
    present = [name for name in ("mean", "std") if name in var.columns]
    if len(present) == 1:
        missing = ({"mean", "std"} - set(present)).pop()
        raise ValueError(
            f"adata.var has a {present[0]!r} column but no {missing!r}: the "
            f"per-gene scaling needs both (sc.pp.scale writes both)"
        )
    n = genes_kept.size
    if not present:
        return GeneScaling(np.zeros(n), np.ones(n), "none")
    values = []
    for name in ("mean", "std"):
        column = pd.to_numeric(var[name].iloc[genes_kept], errors="coerce").to_numpy(np.float64)
        if not np.isfinite(column).all():
            raise ValueError(
                f"adata.var[{name!r}] has missing or non-numeric values for genes of the PCA"
            )
        values.append(column)
    mean, std = values
    if (std <= 0).any():
        raise ValueError(
            "adata.var['std'] has values <= 0 for genes of the PCA (sc.pp.scale "
            "stores 1 for a constant gene)"
        )
    return GeneScaling(mean, std, "scaled")


def _blocks(matrix, columns: np.ndarray, n_rows: int, source: str):
    """``(start, dense float64 block of those columns)`` over the rows, in chunks.

    Works for NumPy arrays, SciPy sparse matrices and arrays and anndata's
    backed datasets (which read only the rows asked for).
    """
    rows = max(1, _BLOCK_ELEMENTS // max(1, columns.size))
    for start in range(0, n_rows, rows):
        block = matrix[start : start + rows]
        if hasattr(block, "toarray"):  # sparse: select the columns before densifying
            block = block.tocsr()[:, columns].toarray()
        else:
            block = np.asarray(block)[:, columns]
        if not (
            np.issubdtype(block.dtype, np.floating)
            or np.issubdtype(block.dtype, np.integer)
            or block.dtype == bool
        ):
            raise TypeError(f"{source} must hold numbers, got dtype {block.dtype}")
        yield start, block.astype(np.float64, copy=False)


# ===================================================================== project
def project(
    projection: GeneProjection, expression: Expression, *, device, dtype, what: str = "adata_query"
) -> tuple[np.ndarray, int]:
    """The query's cells in the reference's PC space, (N_q, d), and the number of
    reference genes the query lacks.

    Genes are matched by name; a missing gene adds nothing (it is put at the
    reference's mean), with a warning that says how many of how many are
    missing. Computed in torch on ``device`` in ``dtype``, a chunk of cells at
    a time. ``what`` names the query in messages.
    """
    matrix, source, names = expression.matrix, expression.source, expression.genes
    position = _gene_positions(names, projection.genes, what)
    shared = position >= 0
    n_missing = int((~shared).sum())
    if not shared.any():
        raise ValueError(
            f"none of the reference's {projection.n_genes:,} genes is in {what}.var_names "
            f"(reference genes: {_shown(projection.genes)}, ...; query: {_shown(names)}, ...): "
            f"genes are matched by name"
        )
    if n_missing:
        missing = projection.genes[~shared]
        warnings.warn(
            f"{n_missing:,} of the reference's {projection.n_genes:,} genes are missing from "
            f"{what} (e.g. {_shown(missing)}); they are set to the "
            f"reference's mean and add nothing to the projection (Symphony fills them with 0 "
            f"after scaling)",
            UserWarning,
            stacklevel=4,
        )
    columns = position[shared]
    np_dtype = np.float64 if dtype == torch.float64 else np.float32

    def tensor(values):
        return torch.as_tensor(np.ascontiguousarray(values), dtype=dtype, device=device)

    mean, std = tensor(projection.mean[shared]), tensor(projection.std[shared])
    centre = tensor(projection.scaled_mean[shared])
    weights = tensor(projection.loadings[shared])
    pc_mean = tensor(projection.pc_mean)
    n_cells = matrix.shape[0]
    out = np.empty((n_cells, projection.d), dtype=np_dtype)
    bad = _NonFinite(source, expression.cells, names[columns])
    with torch.no_grad():
        for start, block in _blocks(matrix, columns, n_cells, source):
            if start == 0:
                _warn_if_not_expression(block, source)
            if bad.found(start, block):
                continue  # only counted from here on: the call fails below
            values = torch.as_tensor(block, device=device).to(dtype)
            if not bool(torch.isfinite(values).all()):
                raise ValueError(
                    f"{source} has values beyond the range of {dtype}; pass dtype='float64'"
                )
            values = (values - mean) / std
            if projection.clip is not None:
                values = values.clamp_(*projection.clip)
            values = torch.addmm(pc_mean, values - centre, weights)
            out[start : start + block.shape[0]] = values.cpu().numpy()
    bad.refuse()
    return out, n_missing


class _NonFinite:
    """NaN/inf in the query's expression (reference genes only), over all blocks,
    for one message naming a few cells and genes."""

    def __init__(self, source: str, cells: pd.Index, genes: pd.Index):
        self.source, self.cells, self.genes = source, cells, genes
        self.count = 0
        self.rows: set[int] = set()
        self.columns: set[int] = set()

    def found(self, start: int, block: np.ndarray) -> bool:
        """Note the block's non-finite values; True when it has any (or an earlier one did)."""
        rows, columns = np.nonzero(~np.isfinite(block))
        self.count += rows.size
        self.rows.update((start + rows).tolist())
        self.columns.update(columns.tolist())
        return self.count > 0

    def refuse(self) -> None:
        if not self.count:
            return
        rows, columns = sorted(self.rows), sorted(self.columns)
        raise ValueError(
            f"{self.source} has {self.count:,} non-finite value(s) (NaN or inf) in "
            f"{len(rows):,} cell(s) ({_shown(self.cells[rows])}) and {len(columns):,} of the "
            f"reference's genes ({_shown(self.genes[columns])}); expected finite expression: "
            f"remove or impute those cells"
        )


def _gene_positions(names: pd.Index, genes: np.ndarray, what: str) -> np.ndarray:
    """Column of each reference gene in the query, -1 when absent."""
    repeated = names[names.duplicated()].unique()
    if repeated.size:
        clash = repeated.intersection(pd.Index(genes))
        if clash.size:
            raise ValueError(
                f"{what}.var_names repeats reference genes "
                f"({_shown(clash)}): genes are matched by "
                f"name; call {what}.var_names_make_unique() first"
            )
        unique = ~names.duplicated(keep=False)
        found = names[unique].get_indexer(pd.Index(genes))
        return np.where(found >= 0, np.flatnonzero(unique)[found], -1)
    return names.get_indexer(pd.Index(genes))


def _shown(names) -> str:
    """The first few names, quoted: ``'g1', 'g2'``."""
    return ", ".join(repr(str(name)) for name in list(names[:_SHOWN]))


def _warn_if_not_expression(block: np.ndarray, source: str) -> None:
    """Warn when the query's first cells look scaled already, or like raw counts."""
    if block.size == 0:
        return
    if block.min() < 0:
        warnings.warn(
            f"{source} has negative values: it looks scaled already. map_query scales the "
            f"query with the reference's per-gene mean and standard deviation, so it expects "
            f"expression as the reference's was before scaling (e.g. log-normalised)",
            UserWarning,
            stacklevel=5,
        )
    elif block.max() > 20 and np.array_equal(block, np.round(block)):
        warnings.warn(
            f"{source} holds whole numbers up to {block.max():.0f}: it looks like raw counts. "
            f"map_query expects expression normalised as the reference's was (e.g. "
            f"sc.pp.normalize_total and sc.pp.log1p)",
            UserWarning,
            stacklevel=5,
        )
