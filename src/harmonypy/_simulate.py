"""Simulated PCA embeddings with batch effects, for tests and benchmarks.

The generator mimics what Harmony usually receives: the top principal
components of a single-cell experiment in which several batches (samples,
donors, ...) share a set of cell types in different proportions and each
batch adds its own technical shift.  Everything is drawn from one
:class:`numpy.random.Generator` so a seed fully determines the output, and
the work is vectorised so a million cells take a few seconds.
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

__all__ = ["simulate"]


def _check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as ``int`` or raise if it is not an integer >= minimum."""
    # bool is an Integral but simulate(n_batches=True) is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_scale(name: str, value: object) -> float:
    """Return ``value`` as ``float`` or raise if it is not finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def _pc_profile(n_pcs: int) -> np.ndarray:
    """Standard-deviation profile along PCs, largest first (like a PCA scree)."""
    return (1.0 + np.arange(n_pcs)) ** -0.5


def _presence_mask(
    rng: np.random.Generator, n_batches: int, n_types: int, absent_fraction: float
) -> np.ndarray:
    """Boolean (batches x types) mask of which cell types each batch contains.

    Each entry is dropped with probability ``absent_fraction``; afterwards
    every type is put back into one random batch if it vanished everywhere,
    and every batch gets one random type back if it lost them all, so the
    design stays valid for integration.
    """
    present = rng.random((n_batches, n_types)) >= absent_fraction
    for t in np.flatnonzero(~present.any(axis=0)):
        present[rng.integers(n_batches), t] = True
    for b in np.flatnonzero(~present.any(axis=1)):
        present[b, rng.integers(n_types)] = True
    return present


def _cell_counts(rng: np.random.Generator, n_cells: int, present: np.ndarray) -> np.ndarray:
    """Integer (batches x types) cell counts summing to ``n_cells``.

    Batch sizes and per-batch type proportions are Dirichlet draws, so the
    composition differs between batches.  One cell is reserved for every
    batch and for every type first, which guarantees that no batch is empty
    and that every type occurs somewhere, whatever the multinomial draws.
    """
    n_batches, n_types = present.shape
    counts = np.zeros((n_batches, n_types), dtype=np.int64)
    for b in range(n_batches):  # one cell per batch, in a type it contains
        counts[b, rng.choice(np.flatnonzero(present[b]))] += 1
    for t in range(n_types):  # one cell per type, in a batch that has it
        counts[rng.choice(np.flatnonzero(present[:, t])), t] += 1

    remaining = n_cells - int(counts.sum())
    batch_sizes = rng.multinomial(remaining, rng.dirichlet(np.full(n_batches, 5.0)))
    # alpha = 1 gives visibly unequal, but not degenerate, compositions.
    props = rng.dirichlet(np.ones(n_types), size=n_batches) * present
    props /= props.sum(axis=1, keepdims=True)
    for b in range(n_batches):
        counts[b] += rng.multinomial(batch_sizes[b], props[b])
    return counts


def simulate(
    n_cells: int = 10000,
    n_pcs: int = 50,
    n_batches: int = 8,
    n_cell_types: int = 10,
    seed: int = 0,
    *,
    second_batch: int | None = None,
    absent_fraction: float = 0.2,
    batch_shift: float = 2.0,
    type_shift: float = 0.5,
    type_spread: float = 6.0,
    batch2_shift: float = 1.5,
    noise: float = 1.0,
    dtype: type | np.dtype = np.float32,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Simulate a batch-affected PCA embedding of single cells.

    Cell types are Gaussian clusters whose centres are spread over PC space
    with a standard deviation that decays along the components
    (``(k + 1) ** -0.5`` for PC ``k``), like the scree of a real PCA.  Each
    batch draws its own cell-type proportions from a Dirichlet distribution
    and lacks some cell types entirely (each (batch, type) pair is absent with
    probability ``absent_fraction``, while every type stays present in at
    least one batch and no batch is empty).  Batch effects are a global shift
    per batch plus a smaller shift per (batch, cell type) pair, both scaled
    by the same PC profile; an optional second batch variable (for instance
    a sequencing technology, crossed with but not nested in the first) adds
    its own shift.  The embedding is centred, as PCA scores are.

    Parameters
    ----------
    n_cells : int, default 10000
        Number of cells N; must be at least ``n_batches + n_cell_types``.
    n_pcs : int, default 50
        Number of principal components d (>= 2).
    n_batches : int, default 8
        Number of levels B of the batch variable (>= 1).
    n_cell_types : int, default 10
        Number of cell types T (>= 1).
    seed : int, default 0
        Seed for :func:`numpy.random.default_rng`; the global NumPy random
        state is never used or modified.
    second_batch : int or None, default None
        If given, the number of levels (>= 1) of a second batch variable,
        reported in the ``"batch2"`` column.
    absent_fraction : float, default 0.2
        Probability in [0, 1) that a cell type is absent from a batch.
    batch_shift : float, default 2.0
        Scale of the global per-batch shift, relative to the within-type
        noise on PC 1.
    type_shift : float, default 0.5
        Scale of the additional cell-type-specific per-batch shift.
    type_spread : float, default 6.0
        Scale of the spread of cell-type centres.
    batch2_shift : float, default 1.5
        Scale of the shift per level of the second batch variable.
    noise : float, default 1.0
        Within-type standard deviation on PC 1 (each type also gets a random
        factor in [0.7, 1.3] so clusters differ in tightness).
    dtype : numpy dtype, default numpy.float32
        Floating dtype of the returned embedding (float32 or float64).

    Returns
    -------
    X : numpy.ndarray, shape (n_cells, n_pcs)
        Cells x PCs embedding, C-contiguous, of the requested ``dtype``.
    meta : pandas.DataFrame, shape (n_cells, 2) or (n_cells, 3)
        One row per cell with columns ``"batch"`` (categorical with string
        levels ``"b0"``, ``"b1"``, ...), ``"cell_type"`` (strings ``"t0"``,
        ``"t1"``, ...) and, when ``second_batch`` is given, ``"batch2"``
        (categorical with levels ``"tech0"``, ``"tech1"``, ...).  Cells are
        in random order.

    Raises
    ------
    TypeError
        If a count or scale has the wrong type.
    ValueError
        If a count or scale is out of range or ``dtype`` is not float32 or
        float64.

    Examples
    --------
    >>> from harmonypy.datasets import simulate
    >>> X, meta = simulate(n_cells=2000, n_pcs=20, n_batches=3, seed=1)
    >>> X.shape, list(meta.columns)
    ((2000, 20), ['batch', 'cell_type'])
    """
    n_cells = _check_int("n_cells", n_cells, 1)
    n_pcs = _check_int("n_pcs", n_pcs, 2)
    n_batches = _check_int("n_batches", n_batches, 1)
    n_cell_types = _check_int("n_cell_types", n_cell_types, 1)
    if n_cells < n_batches + n_cell_types:
        raise ValueError(
            f"n_cells ({n_cells}) must be >= n_batches + n_cell_types "
            f"({n_batches + n_cell_types}) so every batch and type gets a cell"
        )
    if second_batch is not None:
        second_batch = _check_int("second_batch", second_batch, 1)
    absent_fraction = _check_scale("absent_fraction", absent_fraction)
    if absent_fraction >= 1:
        raise ValueError(f"absent_fraction must be < 1, got {absent_fraction}")
    scales = {
        name: _check_scale(name, value)
        for name, value in [
            ("batch_shift", batch_shift),
            ("type_shift", type_shift),
            ("type_spread", type_spread),
            ("batch2_shift", batch2_shift),
            ("noise", noise),
        ]
    }
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")

    rng = np.random.default_rng(seed)
    profile = _pc_profile(n_pcs)

    present = _presence_mask(rng, n_batches, n_cell_types, absent_fraction)
    counts = _cell_counts(rng, n_cells, present)

    # Per-(batch, type) mean = type centre + batch shift + interaction shift.
    centres = rng.normal(size=(n_cell_types, n_pcs)) * (scales["type_spread"] * profile)
    b_shift = rng.normal(size=(n_batches, n_pcs)) * (scales["batch_shift"] * profile)
    bt_shift = rng.normal(size=(n_batches, n_cell_types, n_pcs)) * (scales["type_shift"] * profile)
    means = centres[None, :, :] + b_shift[:, None, :] + bt_shift
    # Later PCs of real data are mostly noise, so noise decays more slowly.
    noise_sd = scales["noise"] * (0.5 + 0.5 * profile)
    type_tightness = rng.uniform(0.7, 1.3, size=n_cell_types)

    # Expand block counts to per-cell labels, then shuffle the cell order.
    batch_idx = np.repeat(np.repeat(np.arange(n_batches), n_cell_types), counts.ravel())
    type_idx = np.repeat(np.tile(np.arange(n_cell_types), n_batches), counts.ravel())
    order = rng.permutation(n_cells)
    batch_idx, type_idx = batch_idx[order], type_idx[order]

    # Work in the output dtype: float32 halves memory and time at 1M cells.
    X = rng.standard_normal((n_cells, n_pcs), dtype=dtype)
    X *= (type_tightness[type_idx, None] * noise_sd[None, :]).astype(dtype, copy=False)
    X += means.astype(dtype)[batch_idx, type_idx]

    meta = pd.DataFrame(
        {
            # pandas-stubs type codes as Sequence[int]; pandas takes the int array as is.
            "batch": pd.Categorical.from_codes(
                batch_idx,  # type: ignore[arg-type]
                categories=pd.Index([f"b{b}" for b in range(n_batches)]),
            ),
            "cell_type": np.array([f"t{t}" for t in range(n_cell_types)], dtype=object)[type_idx],
        }
    )

    if second_batch is not None:
        # Crossed with "batch": each batch mixes levels in its own proportions.
        level_probs = rng.dirichlet(np.full(second_batch, 2.0), size=n_batches)
        cum = np.cumsum(level_probs, axis=1)[batch_idx]
        u = rng.random(n_cells)[:, None]
        batch2_idx = np.minimum((u > cum).sum(axis=1), second_batch - 1)
        b2_shift = rng.normal(size=(second_batch, n_pcs)) * (scales["batch2_shift"] * profile)
        X += b2_shift.astype(dtype)[batch2_idx]
        meta["batch2"] = pd.Categorical.from_codes(
            batch2_idx, categories=pd.Index([f"tech{k}" for k in range(second_batch)])
        )

    X -= X.mean(axis=0, dtype=np.float64).astype(dtype)
    return np.ascontiguousarray(X), meta
