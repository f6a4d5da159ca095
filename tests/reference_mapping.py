"""A slow, literal reference mapping in NumPy float64, for checking the fast one.

Every formula is written as R symphony writes it (immunogenomics/symphony,
``src/utils.cpp`` and ``R/*.R``): dense matrices in the R orientation
(features or clusters in rows, cells in columns), a Python loop over clusters
and ``inv()`` of each (B+1) x (B+1) system, as ``moe_correct_ref`` does. The
Harmony2 variant changes only what ``docs/mapping.md`` derives: the centroids,
the per-cluster penalty and the levels left out of a cluster.
"""

from __future__ import annotations

import numpy as np


def cosine_normalize_columns(x):
    """``cosine_normalize_cpp(x, 2)``: every column scaled to unit length."""
    return x / np.linalg.norm(x, axis=0, keepdims=True)


def compute_ref_cache(R, Z_corr):
    """``compute_ref_cache`` (utils.cpp): ``Nr = rowSums(R)`` (K), ``C = R Z_corr^T`` (K x d)."""
    return R.sum(1), R @ Z_corr.T


def reference_centroids(C):
    """``t(cosine_normalize_cpp(R %*% t(Z_corr), 1))`` (buildReferenceFromHarmonyObj.R): d x K."""
    return (C / np.linalg.norm(C, axis=1, keepdims=True)).T


def soft_cluster(Y, Zq, sigma):
    """``soft_cluster`` (utils.cpp): ``softmax_k(-2 (1 - Y_cos^T Z_cos) / sigma)``, K x m.

    ``sigma`` is a scalar as in Symphony, or one value per cluster (K,).
    """
    Y_cos = cosine_normalize_columns(Y)
    Z_cos = cosine_normalize_columns(Zq)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (Y.shape[1],))
    R = -2 * (1 - Y_cos.T @ Z_cos) / sigma[:, None]
    R = R - R.max(0, keepdims=True)
    R = np.exp(R)
    return R / R.sum(0, keepdims=True)


def query_design(meta, variables):
    """``Xq`` of mapQuery.R, ((1 + levels) x m): a row of ones (intercept), then
    the one-hot rows of each variable's levels in sorted order
    (``model.matrix(~0 + x)``; a variable with one level is a row of ones).
    No variables: ``rbind(1, 1)``, the query as one batch."""
    m = len(meta)
    rows = [np.ones(m)]
    if not variables:
        rows.append(np.ones(m))
    for name in variables or []:
        values = meta[name].astype(str).to_numpy()
        for level in sorted(set(values)):
            rows.append((values == level).astype(np.float64))
    return np.vstack(rows)


def moe_correct_ref(Zq, Xq, Rq, Nr, C, lamb=1.0, keep=None):
    """``moe_correct_ref`` (utils.cpp) with the ridge penalty as a parameter.

    ``lamb`` is a scalar, one value per batch row of ``Xq`` (B,), or one per
    cluster and row (K, B): Symphony itself adds the identity (``lamb = 1``).
    ``keep`` (K, B) bool leaves rows out of a cluster's regression (Harmony2).
    Returns ``(Zq_corr (d x m), intercepts (K x d))``.
    """
    K = Rq.shape[0]
    n_rows = Xq.shape[0]
    lamb = np.broadcast_to(np.asarray(lamb, dtype=np.float64), (K, n_rows - 1))
    Zq_corr = Zq.copy()
    intercepts = np.zeros((K, Zq.shape[0]))
    for k in range(K):
        rows = np.arange(n_rows)
        if keep is not None:
            rows = np.concatenate([[0], 1 + np.flatnonzero(keep[k])])
        X = Xq[rows]
        Xq_Rk = X * Rq[k][None, :]
        mat1 = Xq_Rk @ X.T
        mat1[0, 0] += Nr[k]
        lambda_I = np.diag(np.concatenate([[0.0], lamb[k]])[rows])
        mat1 += lambda_I
        mat2 = Xq_Rk @ Zq.T
        mat2[0] += C[k]
        beta = np.linalg.inv(mat1) @ mat2
        intercepts[k] = beta[0]
        beta[0] = 0
        Zq_corr -= beta.T @ Xq_Rk
    return Zq_corr, intercepts


def harmony2_penalty(Rq, Xq, Nr, alpha):
    """Harmony2's estimated penalty for the query's rows, (K, B).

    ``lambda_kb = alpha * E_kb`` with ``E_kb = N_k Pr_b`` counted over the
    reference and the query together, as a Harmony2 run on both would: the
    cluster size ``N_k = Nr_k + sum_i Rq_ki`` and the share of level b among
    all cells, ``Pr_b = N_qb / (N_r + N_q)``.
    """
    n_ref = Nr.sum()
    counts = Xq[1:].sum(1)
    sizes = Nr + Rq.sum(1)
    return alpha * np.outer(sizes, counts / (n_ref + Xq.shape[1]))


def harmony2_keep(Rq, Xq, cutoff):
    """Harmony2's ``batch_prop_cutoff`` on the query's rows: ``O_kb / N_b > cutoff``, (K, B)."""
    observed = Rq @ Xq[1:].T
    return observed / Xq[1:].sum(1)[None, :] > cutoff


def weighted_cov(Z, weights):
    """``cov.wt(t(Z), wt = weights)`` (R's stats): weights scaled to sum 1,
    centre ``sum w x``, covariance ``sum w (x - c)(x - c)^T / (1 - sum w^2)``.
    ``Z`` is d x N; returns ``(centre (d,), covariance (d, d))``."""
    w = weights / weights.sum()
    center = Z @ w
    centred = (Z - center[:, None]) * np.sqrt(w)[None, :]
    return center, centred @ centred.T / (1 - np.sum(w**2))


def per_cell_mapping_metric(Z_ref, R_ref, Zq_pca, Rq):
    """``calcPerCellMappingMetric`` (confidenceScores.R), with ``Z_orig = TRUE``.

    Per reference cluster, the :func:`weighted_cov` of the uncorrected
    reference cells with weights ``R[k, ]``; then ``sqrt(mahalanobis(query,
    centre, cov))`` per cluster, averaged with the query's R.
    """
    moments = [weighted_cov(Z_ref, R_ref[k]) for k in range(R_ref.shape[0])]
    return mapping_metric(
        np.array([c for c, _ in moments]), np.array([cov for _, cov in moments]), Zq_pca, Rq
    )


def mapping_metric(centers, covariances, Zq_pca, Rq):
    """The second half of :func:`per_cell_mapping_metric`, from given cluster
    centres (K x d) and covariances (K x d x d): ``sqrt(mahalanobis(...))``
    per cluster (``inv()`` of each covariance, as R's ``mahalanobis``),
    averaged with the query's R."""
    distances = np.zeros((Zq_pca.shape[1], len(centers)))
    for k, (center, cov) in enumerate(zip(centers, covariances, strict=True)):
        diff = Zq_pca - center[:, None]
        distances[:, k] = np.sqrt(np.sum(diff * (np.linalg.inv(cov) @ diff), axis=0))
    return np.sum(distances * Rq.T, axis=1)


def knn_predict(Z_ref, labels, Zq, k):
    """``class::knn`` on Euclidean distances (knnPredict, utils.R): the most
    frequent label among the k nearest reference cells and its share of the
    votes. Ties go to the label of the nearer neighbour (``class::knn`` breaks
    them at random)."""
    labels = np.asarray(labels)
    out_labels, out_prob = [], []
    for j in range(Zq.shape[1]):
        d2 = np.sum((Z_ref - Zq[:, [j]]) ** 2, axis=0)
        nearest = np.argsort(d2, kind="stable")[:k]
        votes = {}
        for rank, i in enumerate(nearest):
            count, first = votes.get(labels[i], (0, rank))
            votes[labels[i]] = (count + 1, first)
        best = max(votes, key=lambda lab: (votes[lab][0], -votes[lab][1]))
        out_labels.append(best)
        out_prob.append(votes[best][0] / k)
    return np.array(out_labels), np.array(out_prob)
