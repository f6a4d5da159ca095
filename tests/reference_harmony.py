"""A slow, literal Harmony in NumPy float64, for checking the fast engine.

Every step is written as the R package's C++ writes it (dense ``Phi``,
``_scale_dist`` for all cells, a Python loop over clusters in the correction,
``inv()`` of each (B+1) x (B+1) system). Only the sources of randomness are
taken from outside: the initial centroids and the cell order of each online
update, so that a run can be replayed exactly.
"""

from __future__ import annotations

import numpy as np


def normalise_columns(x):
    return x / np.linalg.norm(x, axis=0, keepdims=True)


class ReferenceHarmony:
    """State in the R package's orientation: Z (d x N), R (K x N), Phi (B x N)."""

    def __init__(
        self,
        z,
        phi,
        theta,
        lamb,
        sigma,
        block_size,
        alpha=0.2,
        lambda_estimation=False,
        harmony2=False,
        level_variable=None,
        batch_prop_cutoff=1e-5,
    ):
        self.Z_orig = np.asarray(z, dtype=np.float64)
        self.Z_corr = self.Z_orig.copy()
        self.Z_cos = normalise_columns(self.Z_orig)
        self.Phi = np.asarray(phi, dtype=np.float64)
        self.B, self.N = self.Phi.shape
        self.Phi_moe = np.vstack([np.ones((1, self.N)), self.Phi])
        self.Pr_b = self.Phi.sum(1) / self.N
        self.theta = np.asarray(theta, dtype=np.float64)
        self.lamb = (
            np.concatenate([[0.0], np.asarray(lamb, dtype=np.float64)])
            if lamb is not None
            else None
        )
        self.sigma = np.asarray(sigma, dtype=np.float64)
        self.K = self.sigma.size
        self.block_size = block_size
        self.alpha = alpha
        self.lambda_estimation = lambda_estimation
        self.objective_kmeans = []
        self.parts = []
        self.harmony2 = harmony2
        self.level_variable = (
            np.zeros(self.B, dtype=int) if level_variable is None else np.asarray(level_variable)
        )
        self.batch_prop_cutoff = batch_prop_cutoff

    def diversity(self):
        if self.harmony2:
            return (2 * self.E + 1) / (self.O + self.E + 1)
        return self.E / (self.O + self.E)

    def cross_log(self):
        if self.harmony2:
            return np.log((self.O + self.E + 1) / (2 * self.E + 1))
        return np.log((self.O + self.E) / self.E)

    def init_cluster(self, y):
        self.Y = normalise_columns(np.asarray(y, dtype=np.float64))
        self.soft_assign()
        self.compute_objective()

    def soft_assign(self):
        self.dist_mat = 2 * (1 - self.Y.T @ self.Z_cos)
        r = np.exp(-self.dist_mat / self.sigma[:, None])
        self.R = r / r.sum(0)
        self.E = np.outer(self.R.sum(1), self.Pr_b)
        self.O = self.R @ self.Phi.T

    def compute_objective(self):
        norm = 2000.0 / self.N
        kmeans_error = np.sum(self.R * self.dist_mat)
        with np.errstate(divide="ignore", invalid="ignore"):
            rlogr = np.where(self.R > 0, self.R * np.log(self.R), 0.0)
        entropy = np.sum(rlogr * self.sigma[:, None])
        cross = np.sum(
            (self.R * self.sigma[:, None])
            * ((np.tile(self.theta, (self.K, 1)) * self.cross_log()) @ self.Phi)
        )
        self.parts.append((kmeans_error * norm, entropy * norm, cross * norm))
        self.objective_kmeans.append((kmeans_error + entropy + cross) * norm)

    def update_R(self, order):
        scale = np.exp(-self.dist_mat / self.sigma[:, None])
        scale = scale / scale.sum(0)
        n_blocks = int(np.ceil(1.0 / self.block_size - 1e-9))
        per_block = max(1, int(self.N * self.block_size))
        for i in range(n_blocks):
            lo = i * per_block
            hi = self.N if i == n_blocks - 1 else min(self.N, (i + 1) * per_block)
            if lo >= hi:
                continue
            cells = order[lo:hi]
            self.E -= np.outer(self.R[:, cells].sum(1), self.Pr_b)
            self.O -= self.R[:, cells] @ self.Phi[:, cells].T
            penalty = self.diversity() ** self.theta[None, :]
            r = scale[:, cells] * (penalty @ self.Phi[:, cells])
            self.R[:, cells] = r / r.sum(0)
            self.E += np.outer(self.R[:, cells].sum(1), self.Pr_b)
            self.O += self.R[:, cells] @ self.Phi[:, cells].T

    def cluster_round(self, order):
        if not self.harmony2:  # Harmony2 keeps the centroids from the correction
            self.Y = normalise_columns(self.Z_cos @ self.R.T)
        self.dist_mat = 2 * (1 - self.Y.T @ self.Z_cos)
        self.update_R(order)
        self.compute_objective()

    def moe_correct_ridge(self):
        self.Z_corr = self.Z_orig.copy()
        intercepts = []
        for k in range(self.K):
            if self.lambda_estimation:
                lam = np.concatenate([[0.0], self.alpha * self.E[k]])
            else:
                lam = self.lamb
            rows = np.arange(self.B + 1)
            if self.harmony2:
                rows = np.concatenate([[0], 1 + np.flatnonzero(self.kept_levels(k))])
            phi_moe = self.Phi_moe[rows]
            phi_rk = phi_moe * self.R[k][None, :]
            inv_cov = np.linalg.inv(phi_rk @ phi_moe.T + np.diag(lam[rows]))
            w = inv_cov @ phi_rk @ self.Z_orig.T
            intercepts.append(w[0].copy())
            w[0, :] = 0
            self.Z_corr -= w.T @ phi_rk
        self.Z_cos = normalise_columns(self.Z_corr)
        if self.harmony2:
            self.Y = normalise_columns(np.array(intercepts).T)

    def kept_levels(self, k):
        """Harmony2: levels with O_kb / N_b above the cutoff, in variables keeping >= 2."""
        observed = self.R[k] @ self.Phi.T
        keep = observed / self.Phi.sum(1) > self.batch_prop_cutoff
        for v in np.unique(self.level_variable):
            in_v = self.level_variable == v
            if keep[in_v].sum() < 2:
                keep[in_v] = False
        return keep
