"""Summary integration scores (iLISI / cLISI) of an embedding."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from harmonypy._lisi import compute_lisi

logger = logging.getLogger(__name__)

__all__ = ["IntegrationScores", "evaluate"]


@dataclass(frozen=True)
class IntegrationScores:
    """Median LISI scores of an embedding, raw and scaled to [0, 1].

    Attributes
    ----------
    n_cells : int
        Cells scored.
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
    """

    n_cells: int
    n_batches: int
    ilisi_median: float
    ilisi_scaled: float
    n_labels: int | None = None
    clisi_median: float | None = None
    clisi_scaled: float | None = None
    perplexity: float = 30.0

    def to_frame(self) -> pd.DataFrame:
        """One-row DataFrame with one column per attribute."""
        return pd.DataFrame([asdict(self)])

    def __repr__(self) -> str:
        parts = [
            f"n_cells={self.n_cells}",
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
        label (the scaled score would be 0/0), besides the errors of
        :func:`compute_lisi`.
    TypeError
        If ``batch_key`` or ``label_key`` is not a string.

    Notes
    -----
    Cells whose LISI is undefined (R's -1 sentinel for a failed weight
    calibration, see :func:`compute_lisi`) are left out of the medians.
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

    lisi = compute_lisi(embedding, metadata, columns, perplexity, **lisi_kwargs)
    ilisi = _median(lisi[:, 0])
    scores: dict[str, Any] = {
        "n_cells": int(lisi.shape[0]),
        "n_batches": n_batches,
        "ilisi_median": ilisi,
        "ilisi_scaled": (ilisi - 1.0) / (n_batches - 1),
        "perplexity": float(perplexity),
    }
    if label_key is not None:
        clisi = _median(lisi[:, 1])
        scores.update(
            n_labels=n_labels,
            clisi_median=clisi,
            clisi_scaled=(n_labels - clisi) / (n_labels - 1),
        )
    return IntegrationScores(**scores)


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
