"""The objective's distance and entropy terms, summed while the assignments are in hand.

Both are sums over cells of R times something a softmax already holds (its
logits and log-sum-exp), so they are taken piece by piece by whatever
computes R (:func:`harmonypy.engine.clustering.soft_assign`, the online
update, its fused CPU kernels) instead of in a pass of logarithms over R.
"""

from __future__ import annotations

import torch

from harmonypy.engine.reduce import LOCAL, Reduction


class ObjectiveSums:
    """Running sums for the objective's distance and entropy terms.

    With ``logits = penalty - dist / sigma`` and ``R = softmax(logits)`` per
    cell, ``log R = logits - lse``, so

    * entropy ``sum_k sigma_k sum_i R log R = sigma . (sum R logits - sum_i lse_i R_i)``
    * distance ``sum R dist = sigma . (sum R penalty - sum R logits)``

    and no pass of logarithms is needed. The sums are kept on the device
    (scalars when sigma is the same for every cluster, else one per cluster).
    """

    def __init__(self, sigma: torch.Tensor, acc_dtype: torch.dtype):
        self.sigma = sigma.to(acc_dtype)
        self.uniform = bool((sigma == sigma[0]).all())
        shape = () if self.uniform else sigma.shape
        self.r_logits = torch.zeros(shape, dtype=acc_dtype, device=sigma.device)
        self.r_lse = torch.zeros_like(self.r_logits)
        self.r_penalty = torch.zeros_like(self.r_logits)

    def add_piece(
        self, r: torch.Tensor, logits: torch.Tensor, penalty: torch.Tensor | None = None
    ) -> None:
        """Add cells' assignments ``r`` (n, K), their ``logits`` and, unless it
        comes per level (:meth:`add_level_penalty`), their ``penalty``."""
        dtype = self.r_logits.dtype
        # The row's largest R sits at its largest logit: lse = max - log(max R).
        lse = logits.amax(1) - r.amax(1).log()
        if self.uniform:
            self.r_logits += torch.dot(r.view(-1), logits.view(-1)).to(dtype)
            self.r_lse += lse.sum().to(dtype)
            if penalty is not None:
                self.r_penalty += torch.dot(r.view(-1), penalty.view(-1)).to(dtype)
        else:
            self.r_logits += (r * logits).sum(0).to(dtype)
            self.r_lse += (lse @ r).to(dtype)
            if penalty is not None:
                self.r_penalty += (r * penalty).sum(0).to(dtype)

    def add_cluster_sums(
        self, r_logits: torch.Tensor, r_lse: torch.Tensor, r_penalty: torch.Tensor
    ) -> None:
        """Add sums taken elsewhere (the fused kernels), each (K,) float64 per
        cluster, or (1,) summed over the clusters: ``sum_i R_ik logits_ik``,
        ``sum_i lse_i R_ik`` and ``sum_i R_ik penalty_ik``."""
        for total, part in (
            (self.r_logits, r_logits),
            (self.r_lse, r_lse),
            (self.r_penalty, r_penalty),
        ):
            total += part.sum() if self.uniform else part

    def add_level_penalty(self, level_sums: torch.Tensor, log_penalty: torch.Tensor) -> None:
        """One batch variable: ``sum_i R_ik penalty_ik = sum_b level_sums_bk log_penalty_bk``."""
        by_cluster = (level_sums * log_penalty.to(level_sums.dtype)).sum(0)
        self.r_penalty += by_cluster.sum() if self.uniform else by_cluster

    def terms(self, reduction: Reduction = LOCAL) -> tuple[float, float]:
        """``(sum R * dist, sum_k sigma_k sum_i R log R)``, over every process's
        cells (``reduction``)."""
        reduction.sum_(self.r_logits, self.r_lse, self.r_penalty)
        if self.uniform:
            sigma = self.sigma[0]
            return (
                float(sigma * (self.r_penalty - self.r_logits)),
                float(sigma * (self.r_logits - self.r_lse)),
            )
        return (
            float((self.r_penalty - self.r_logits) @ self.sigma),
            float((self.r_logits - self.r_lse) @ self.sigma),
        )
