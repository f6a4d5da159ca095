"""Summary integration scores (iLISI / cLISI) of an embedding."""

from __future__ import annotations

import logging
import numbers
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from harmonypy.metrics.lisi import _compute_lisi

logger = logging.getLogger(__name__)

__all__ = ["IntegrationScores", "evaluate"]


@dataclass(frozen=True)
class IntegrationScores:
    """Median LISI scores of an embedding, raw and scaled to [0, 1].

    Attributes
    ----------
    n_cells : int
        Cells scored (the medians are over these cells).
    n_batches : int
        Categories of the batch column.
    ilisi_median : float
        Median over cells of iLISI (LISI over batches), in [1, n_batches].
    ilisi_scaled : float
        ``(ilisi_median - 1) / (n_batches - 1)``: 0 = no mixing, 1 = all
        batches equally represented in every neighbourhood.  Higher is better.
    n_labels : int or None
        Categories of the label column (``None`` without ``label_key``).
    clisi_median : float or None
        Median over cells of cLISI (LISI over cell labels), in [1, n_labels].
    clisi_scaled : float or None
        ``(n_labels - clisi_median) / (n_labels - 1)``: 1 = every
        neighbourhood holds a single label, 0 = labels fully mixed.  Higher is
        better.
    perplexity : float
        Perplexity the scores were computed with.
    n_cells_total : int or None
        Cells in the embedding; every cell's neighbours were searched among
        all of them.  Larger than ``n_cells`` when ``evaluate(n_query=...)``
        scored a random sample.  ``None`` only when constructed by hand.

    Examples
    --------
    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> scores = hm.evaluate(pcs, meta, "donor", "cell_type")
    >>> scores  # doctest: +ELLIPSIS
    IntegrationScores(n_cells=1200, iLISI=... (scaled ..., 3 batches), cLISI=...)
    >>> scores.n_batches, scores.n_labels
    (3, 9)
    """

    n_cells: int
    n_batches: int
    ilisi_median: float
    ilisi_scaled: float
    n_labels: int | None = None
    clisi_median: float | None = None
    clisi_scaled: float | None = None
    perplexity: float = 30.0
    n_cells_total: int | None = None

    def to_frame(self) -> pd.DataFrame:
        """One-row DataFrame with one column per attribute.

        Returns
        -------
        pandas.DataFrame
            One row; columns ``n_cells``, ``n_batches``, ``ilisi_median``,
            ``ilisi_scaled``, ``n_labels``, ``clisi_median``, ``clisi_scaled``,
            ``perplexity``, ``n_cells_total`` (rows of several runs stack
            with ``pandas.concat``).

        Examples
        --------
        >>> import harmonypy as hm
        >>> pcs, meta = hm.datasets.load_pbmcs_small()
        >>> table = hm.evaluate(pcs, meta, "donor").to_frame()
        >>> table.shape, list(table.columns[:2])
        ((1, 9), ['n_cells', 'n_batches'])
        """
        return pd.DataFrame([asdict(self)])

    def __repr__(self) -> str:
        cells = f"n_cells={self.n_cells}"
        if self.n_cells_total is not None and self.n_cells_total > self.n_cells:
            cells += f" (random sample of {self.n_cells_total})"
        parts = [
            cells,
            f"iLISI={self.ilisi_median:.3f} (scaled {self.ilisi_scaled:.3f}, "
            f"{self.n_batches} batches)",
        ]
        if self.clisi_median is not None:
            parts.append(
                f"cLISI={self.clisi_median:.3f} (scaled {self.clisi_scaled:.3f}, "
                f"{self.n_labels} labels)"
            )
        parts.append(f"perplexity={self.perplexity:g}")
        return "IntegrationScores(" + ", ".join(parts) + ")"


def evaluate(
    embedding: Any,
    metadata: pd.DataFrame,
    batch_key: str,
    label_key: str | None = None,
    perplexity: float = 30,
    *,
    n_query: int | None = None,
    seed: int = 0,
    **lisi_kwargs: Any,
) -> IntegrationScores:
    """Score how well an embedding mixes batches and keeps cell labels apart.

    Computes per-cell LISI with :func:`compute_lisi` and summarises it by the
    median over cells, raw and scaled to [0, 1] (higher = better for both).

    Parameters
    ----------
    embedding : array-like or pandas.DataFrame, shape (n_cells, n_dims)
        Cells in rows (e.g. ``Harmony.Z_corr.T`` or ``adata.obsm["X_pca_harmony"]``).
    metadata : pandas.DataFrame, shape (n_cells, n_columns)
        One row per cell, same order as ``embedding``.
    batch_key : str
        Batch column; needs at least 2 batches.
    label_key : str or None, default None
        Cell-type column for cLISI; needs at least 2 labels.  ``None`` skips
        cLISI.
    perplexity : float, default 30
        Passed to :func:`compute_lisi`.
    n_query : int or None, default None
        Score a random sample of this many cells instead of every cell (for
        very large embeddings).  The sampled cells' neighbours are still
        searched among *all* cells, by exact search, so each sampled score is
        exact and only the median carries sampling error (about
        ``1.25 * sd / sqrt(n_query)``; 10,000 cells are plenty for two or
        three decimals).  Costs ``n_query * n_cells`` distances: about 10 s
        for 10,000 of 1,000,000 cells on 2 cores.  ``None``, or at least the
        number of cells: every cell is scored.  The result's ``n_cells`` and
        ``n_cells_total`` say which.  Needs ``neighbors`` ``"auto"`` or
        ``"exact"``.
    seed : int, default 0
        Seed of the local generator that draws the ``n_query`` sample (the
        global numpy and torch RNGs are not touched).
    **lisi_kwargs
        Further keyword arguments for :func:`compute_lisi` (``neighbors``,
        ``n_jobs``).

    Returns
    -------
    IntegrationScores
        Frozen dataclass; ``.to_frame()`` gives a one-row DataFrame.

    Raises
    ------
    ValueError
        If the batch column has a single batch or the label column a single
        label (the scaled score would be 0/0), if ``seed`` is negative, or if
        ``n_query`` is below 1 or given with ``neighbors`` other than
        ``"auto"`` / ``"exact"``; besides the errors of :func:`compute_lisi`.
    TypeError
        If ``batch_key`` or ``label_key`` is not a string, or ``n_query`` /
        ``seed`` is not an integer.

    Notes
    -----
    Cells whose LISI is undefined (R's -1 sentinel for a failed weight
    calibration, see :func:`compute_lisi`) are left out of the medians.

    Examples
    --------
    Harmony mixes the donors (iLISI up) and keeps the cell types apart
    (cLISI stays near 1, its scaled score near 1):

    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> before = hm.evaluate(pcs, meta, "donor", "cell_type")
    >>> ho = hm.run_harmony(pcs, meta, "donor", verbose=False)
    >>> after = hm.evaluate(ho.result(), meta, "donor", "cell_type")
    >>> after.ilisi_scaled > before.ilisi_scaled, after.clisi_scaled > 0.9
    (True, True)
    """
    keys = {"batch_key": batch_key, "label_key": label_key}
    for name, key in keys.items():
        if key is not None and not isinstance(key, str):
            raise TypeError(f"{name} must be a column name (str), got {type(key).__name__}")
    if batch_key is None:
        raise TypeError("batch_key must be a column name (str), got None")
    columns = [batch_key] if label_key is None else [batch_key, label_key]
    if not isinstance(metadata, pd.DataFrame):
        raise TypeError(f"metadata must be a pandas DataFrame, got {type(metadata).__name__}")
    for key in columns:
        if key not in metadata.columns:
            raise ValueError(
                f"column {key!r} not in metadata; available columns: {list(metadata.columns)}"
            )
    n_batches = _n_categories(metadata[batch_key], batch_key, "batch", "iLISI")
    n_labels = (
        None
        if label_key is None
        else _n_categories(metadata[label_key], label_key, "label", "cLISI")
    )
    _check_sample(n_query, seed, lisi_kwargs.get("neighbors", "auto"))

    lisi, n_total = _compute_lisi(
        embedding, metadata, columns, perplexity, n_query=n_query, seed=seed, **lisi_kwargs
    )
    ilisi = _median(lisi[:, 0])
    scores: dict[str, Any] = {
        "n_cells": int(lisi.shape[0]),
        "n_batches": n_batches,
        "ilisi_median": ilisi,
        "ilisi_scaled": (ilisi - 1.0) / (n_batches - 1),
        "perplexity": float(perplexity),
        "n_cells_total": int(n_total),
    }
    if n_labels is not None:  # a label_key was given
        clisi = _median(lisi[:, 1])
        scores.update(
            n_labels=n_labels,
            clisi_median=clisi,
            clisi_scaled=(n_labels - clisi) / (n_labels - 1),
        )
    return IntegrationScores(**scores)


def _check_sample(n_query: Any, seed: Any, neighbors: Any) -> None:
    """``n_query``: None or a positive integer, with an exact search; ``seed``: an integer."""
    for name, value in (("n_query", n_query), ("seed", seed)):
        if value is None and name == "n_query":
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if n_query is None:
        return
    if n_query < 1:
        raise ValueError(f"n_query must be a positive number of cells to score, got {n_query}")
    if neighbors not in ("auto", "exact"):
        raise ValueError(
            "n_query scores sampled cells with the exact search among all cells; "
            f"neighbors={neighbors!r} cannot be combined with it (use neighbors='auto' "
            "or 'exact', or n_query=None to score every cell with that search)"
        )


def _n_categories(values: pd.Series, key: str, what: str, score: str) -> int:
    n = int(values.nunique(dropna=True))
    if n < 2:
        raise ValueError(
            f"{score} needs at least 2 {what} categories in column {key!r}, found {n}; "
            "the scaled score (x - 1) / (n - 1) is undefined"
            + (" (pass label_key=None to skip cLISI)" if what == "label" else "")
        )
    return n


def _median(values: np.ndarray) -> float:
    valid = values[values > 0]  # -1 marks an undefined LISI (as in R)
    if valid.size < values.size:
        logger.warning(
            "evaluate: %d cell(s) with undefined LISI left out of the median",
            values.size - valid.size,
        )
    return float(np.median(valid)) if valid.size else float("nan")
