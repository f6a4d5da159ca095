"""Sums over cells: the one place where they become global.

Every quantity Harmony shares between cells — O and the cluster sizes, the
online update's per-block batch sums, the centroid sums, the objective's
terms, the ridge regressions' normal equations — is a sum over cells. The
engine computes each over the cells it holds and hands it to a
:class:`Reduction`:

* :data:`LOCAL` (one process holds every cell): the sum is already global,
  nothing happens, nothing is copied;
* :class:`GroupReduction` (``torch.distributed``, one shard of cells per
  rank): the sum is all-reduced over the process group, so every rank holds
  the same global value, bit for bit.

So a distributed run is the same engine with a different reduction, not a
second copy of the algorithm.

Also here: :func:`index_sum_`, a scatter-add that gives the same bits on
every run (``index_add_`` on CUDA adds with atomics, in an order that changes
from run to run).
"""

from __future__ import annotations

from typing import Any

import torch


def index_sum_(
    out: torch.Tensor, index: torch.Tensor, values: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """``out[index[i]] += alpha * values[i]``, reproducibly; returns ``out``.

    On the CPU this is ``index_add_`` (its order is fixed). On CUDA
    ``index_add_`` accumulates with atomic adds, whose order varies between
    runs, so the same seed gave results differing in the last bits (seen on an
    H200: 39 % of Z_corr's entries differed by up to 2e-6). ``index_put_``
    with ``accumulate=True`` sorts the indices first and sums each target's
    rows in a fixed order.
    """
    if out.device.type == "cpu" or index.numel() == 0:
        return out.index_add_(0, index, values, alpha=alpha)
    if alpha != 1.0:
        values = values * alpha
    return out.index_put_((index,), values, accumulate=True)


class Reduction:
    """Sums over the cells of one process: already global (single process).

    Attributes
    ----------
    rank, world_size : int
        This process's place in the group (0 and 1 here).
    distributed : bool
    backend : str
        The process group's backend (``"gloo"``, ``"nccl"``); ``"none"`` here.
    """

    rank = 0
    world_size = 1
    distributed = False
    backend = "none"

    def sum_(self, *tensors: torch.Tensor | None) -> None:
        """Make each tensor (in place) the sum of its values over all processes."""

    def all_gather(self, obj: Any) -> list:
        """Every process's ``obj``, in rank order (picklable objects)."""
        return [obj]

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``tensor`` as held by rank ``src``, in place."""
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process."""
        return bool(flag)

    def bytes_sent(self) -> int:
        """Bytes handed to the all-reduce so far (0 in a single process)."""
        return 0


#: The reduction of a single-process run.
LOCAL = Reduction()


class GroupReduction(Reduction):
    """Sums over a ``torch.distributed`` process group, by all-reduce.

    Parameters
    ----------
    group : process group, optional
        Default: the default (world) group. Any backend: gloo for CPU tensors,
        NCCL for CUDA tensors.
    """

    distributed = True

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "distributed=True needs an initialised torch.distributed process group: "
                "call torch.distributed.init_process_group(...) on every rank first "
                "(or launch with `harmonypy run ... --nproc N`, or torchrun)"
            )
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self._bytes = 0

    def sum_(self, *tensors: torch.Tensor | None) -> None:
        # Several small tensors go as one message: one round trip instead of many.
        present = [t for t in tensors if t is not None]
        if not present:
            return
        if len(present) == 1 and present[0].is_contiguous():
            self._all_reduce(present[0])
            return
        by_kind: dict = {}
        for t in present:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for group in by_kind.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            self._all_reduce(flat)
            start = 0
            for t in group:
                t.copy_(flat[start : start + t.numel()].view_as(t))
                start += t.numel()

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        self._bytes += tensor.numel() * tensor.element_size()
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self.group)

    def all_gather(self, obj: Any) -> list:
        out = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._dist.broadcast(
            tensor,
            src=self._dist.get_global_rank(self.group, src) if self.group is not None else src,
            group=self.group,
        )
        return tensor

    def any(self, flag: bool) -> bool:
        return any(self.all_gather(bool(flag)))

    def bytes_sent(self) -> int:
        return self._bytes


def communicated_bytes(
    *,
    algorithm: str,
    rounds: int,
    iterations: int,
    n_blocks: int,
    n_levels: int,
    n_clusters: int,
    n_features: int,
    word: int = 4,
) -> int:
    """Bytes each process hands to all-reduce in a distributed run (one batch variable).

    Per clustering round: every block's batch sums and the next round's
    removals, ``2 n_blocks B K`` float64 numbers, the objective's three terms
    and, for Harmony 1, the centroid sums (``K d`` numbers of the run's dtype,
    ``word`` bytes). Per iteration: the ridge systems, ``K B (d + 1)`` float64
    numbers; then Harmony 1 recomputes the centroid sums and Harmony2 (from
    its second iteration) sums the removals of a fresh assignment. Once: the
    first objective, O, and the first round's removals. A ring all-reduce
    puts about ``2 (P - 1) / P`` times this on each process's link. (The
    k-means start gathers its 20,000-cell sample once, ``20000 d word``
    bytes in all, not counted here.)
    """
    blocks = 8 * n_blocks * n_levels * n_clusters
    per_round = 2 * blocks + 8 * 3
    if algorithm == "harmony1":
        per_round += word * n_clusters * n_features
    per_iteration = 8 * n_clusters * n_levels * (n_features + 1)
    once = 8 * (3 + n_levels * n_clusters) + blocks
    total = rounds * per_round + iterations * per_iteration + once
    if algorithm == "harmony1":
        return total + iterations * word * n_clusters * n_features
    return total + (iterations - 1) * blocks


def process_seed(seed: int, rank: int) -> int:
    """Seed of a process's generator: ``seed`` itself on rank 0 (a single
    process), a distinct well-mixed one on each other rank."""
    if rank == 0:
        return seed
    mixed = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9) % (1 << 64)
    return mixed >> 1  # manual_seed takes up to 2**63 - 1 on every platform
