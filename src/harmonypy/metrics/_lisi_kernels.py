"""numba kernel of LISI's scores (imported only when numba is).

:func:`simpson_indices` runs R's ``compute_simpson_index`` cell by cell, as R
does: the bisection on ``beta`` (the same steps, the same stopping rule) with
the entropy of the Gaussian weights, then each label's Simpson index from the
calibrated weights. The cells are split between numba's threads; each cell is
worked on by one thread from start to end, so the result does not depend on
the thread count.

Where every weight of a step is a normal number, the exponentials come from
the engine's vectorised polynomial (``_numba_kernels._exp_nonpositive``,
relative error below 2 ulp) and the row's sums are vectorised; where some
weight is subnormal or zero, from the C library's ``exp``, so that a row whose
weights all underflow gives R's -1 exactly when R does. The scores agree with
the numpy path (and R's) to ~1e-14.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from harmonypy.engine._numba_kernels import _exp_nonpositive, _scalars, exp_constants

__all__ = ["simpson_indices"]


def simpson_indices(dist, idx, codes, n_categories, bisection, out) -> int:
    """Simpson index of every cell for every label into ``out`` (-1 where R
    gives -1); returns the number of cells whose final entropy is 0.

    Parameters
    ----------
    dist : numpy.ndarray of float64, shape (n_cells, n_neighbors)
        Distances to the neighbours (self excluded).
    idx : numpy.ndarray of int64, shape (n_cells, n_neighbors)
        The neighbours' rows.
    codes : numpy.ndarray of int64, shape (n_labels, n_cells)
        Category codes 0..n_categories-1 of each label.
    n_categories : numpy.ndarray of int64, shape (n_labels,)
    bisection : tuple ``(log_perplexity, tol, max_iter)``
        R's bisection: it stops when ``|H - log_perplexity| <= tol`` or
        after ``max_iter`` steps.
    out : numpy.ndarray of float64, shape (n_cells, n_labels)
    """
    log_perplexity, tol, max_iter = bisection
    consts = exp_constants(np.float64)
    return int(
        _simpson_scores(
            dist, idx, codes, n_categories, (log_perplexity, tol, max_iter), consts, out
        )
    )


@njit(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _entropy_row(dist_row, beta, weights, farthest, consts):
    """R's ``Hbeta`` for one cell: the entropy of the weights
    ``exp(-beta * dist_row)``, left unnormalised in ``weights``, and their sum
    (entropy 0 when every weight underflows, as in R)."""
    n = dist_row.shape[0]
    consts = _scalars(consts)
    if -farthest * beta >= consts[3]:
        for j in range(n):
            weights[j] = _exp_nonpositive(-dist_row[j] * beta, consts)
    else:  # some weights (sub)normal or zero: the C library's exp
        for j in range(n):
            weights[j] = math.exp(-dist_row[j] * beta)
    total = 0.0
    weighted = 0.0
    for j in range(n):
        total += weights[j]
        weighted += dist_row[j] * weights[j]
    if total == 0.0:
        return 0.0, total
    return math.log(total) + beta * weighted / total, total


@njit(cache=True, inline="always")
def _calibrate_row(dist_row, log_perplexity, tol, max_iter, weights, consts):
    """R's bisection on ``beta`` for one cell; returns the final entropy and
    leaves the calibrated weights in ``weights``."""
    beta = 1.0
    beta_lo = -np.inf
    beta_hi = np.inf
    farthest = 0.0
    for j in range(dist_row.shape[0]):
        farthest = max(farthest, dist_row[j])
    entropy, total = _entropy_row(dist_row, beta, weights, farthest, consts)
    diff = entropy - log_perplexity
    tries = 0
    while abs(diff) > tol and tries < max_iter:
        if diff > 0:  # entropy too high: a sharper kernel
            beta_lo = beta
            beta = beta * 2 if not math.isfinite(beta_hi) else (beta + beta_hi) / 2
        else:
            beta_hi = beta
            beta = beta / 2 if not math.isfinite(beta_lo) else (beta + beta_lo) / 2
        entropy, total = _entropy_row(dist_row, beta, weights, farthest, consts)
        diff = entropy - log_perplexity
        tries += 1
    if total > 0.0:
        for j in range(weights.shape[0]):
            weights[j] /= total
    return entropy


@njit(cache=True, parallel=True)
def _simpson_scores(dist, idx, codes, n_categories, bisection, consts, out):
    """:func:`simpson_indices` on numba's threads; ``consts`` from
    ``exp_constants(float64)``."""
    log_perplexity, tol, max_iter = bisection
    n_cells, n_neighbors = dist.shape
    n_labels = codes.shape[0]
    most = 1
    for label in range(n_labels):
        most = max(most, n_categories[label])
    n_chunks = min(n_cells, 256)
    failed = np.zeros(n_chunks, dtype=np.int64)
    for chunk in prange(n_chunks):
        weights = np.empty(n_neighbors)
        category_sums = np.zeros(most)
        for cell in range(chunk * n_cells // n_chunks, (chunk + 1) * n_cells // n_chunks):
            entropy = _calibrate_row(dist[cell], log_perplexity, tol, max_iter, weights, consts)
            if entropy == 0.0:
                failed[chunk] += 1
                for label in range(n_labels):
                    out[cell, label] = -1.0
                continue
            for label in range(n_labels):
                for j in range(n_neighbors):
                    category_sums[codes[label, idx[cell, j]]] += weights[j]
                simpson = 0.0
                for j in range(n_neighbors):  # each category once; its sum reset
                    category = codes[label, idx[cell, j]]
                    total = category_sums[category]
                    simpson += total * total
                    category_sums[category] = 0.0
                out[cell, label] = simpson
    return failed.sum()
