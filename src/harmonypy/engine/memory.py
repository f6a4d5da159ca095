"""Peak-memory estimate of a run, and the guard that refuses a run that cannot fit.

:func:`run_harmony` calls :func:`check_memory` after validating its arguments
and before any heavy work: when :func:`estimate_memory` exceeds what
:func:`available_memory` reports, the run is refused with a
:class:`MemoryError` that gives the estimate, the available memory and the
term that dominates. ``check_memory=False`` lifts the guard. When the available
memory cannot be read, the guard does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from harmonypy.engine.kmeans import SAMPLE_SIZE, restart_cells

#: Rows of R and Z gathered at once by the correction (``_LevelReader``).
_READ_CHUNK = 16384
#: Memory touched by the first calls into torch's kernels (thread pools, BLAS
#: workspaces, allocator caches): about 16 MB measured on the CPU, doubled.
_FIXED_OVERHEAD = 32 * 2**20
#: Margin on the sum of the terms: allocator fragmentation, and what the terms
#: round off (measured peaks reach 0.9-1.0 of the sum).
SLACK = 1.1

#: The steps of a run; they do not overlap, so the peak is the largest of them
#: plus what is alive throughout ("always").
PHASES = (
    "initialisation",
    "clustering",
    "correction (building the systems)",
    "correction (solving)",
)
_BUILD, _SOLVE = PHASES[2], PHASES[3]


@dataclass(frozen=True)
class Term:
    """One part of the estimate.

    key : short name; what : what it holds; formula : its size;
    sizes : bytes by step (``"always"``: alive for the whole run);
    where : ``"host"`` or ``"device"``.
    """

    key: str
    what: str
    formula: str
    sizes: tuple  # ((phase, bytes), ...)
    where: str

    @property
    def nbytes(self) -> int:
        """Its largest size."""
        return max(size for _, size in self.sizes)

    def at(self, phase: str) -> int:
        return sum(size for p, size in self.sizes if p in (phase, "always"))

    @property
    def phases(self) -> str:
        return ", ".join(p for p, _ in self.sizes)


@dataclass(frozen=True)
class MemoryEstimate:
    """Terms of the estimate and the peaks they add up to.

    The peak of a memory is the largest, over the steps of the run, of the sum
    of the terms alive during that step, times :data:`SLACK` (1.1).
    """

    terms: tuple
    device: str

    def peak(self, where: str = "host") -> int:
        mine = [t for t in self.terms if t.where == where]
        if not mine:
            return 0
        return int(SLACK * max(sum(t.at(p) for t in mine) for p in PHASES))

    def dominant(self, where: str = "host") -> Term:
        """The largest term in that memory."""
        return max((t for t in self.terms if t.where == where), key=lambda t: t.nbytes)

    def table(self) -> str:
        """The terms, one per line, largest first."""
        return "\n".join(
            f"{format_size(t.nbytes):>9}  {t.what}: {t.formula} ({t.phases}; {t.where})"
            for t in sorted(self.terms, key=lambda t: -t.nbytes)
        )


def _kmeans_bytes(n: int, d: int, k: int, s: int) -> int:
    """Bytes of the k-means start (``kmeans_centroids``) at its largest setting.

    Ten runs side by side on at most ``restart_cells(k)`` cells (each cell's scores
    against every run's centroids, labels, and the greedy seeding's candidate
    distances, 2 + ln 100 = 6 per centre, with a float64 copy), then the winner
    refined on the sample (scores and labels), which is a copy above
    ``SAMPLE_SIZE`` cells.
    """
    sample = min(n, SAMPLE_SIZE)
    runs, trials = 10, 6
    restart = min(sample, restart_cells(k)) * runs * (k * s + 24 + trials * (s + 8) + s + 8)
    refine = sample * (k * s + 24)
    copy = sample * d * s if n > SAMPLE_SIZE else 0
    return restart + refine + copy


@dataclass(frozen=True)
class RunSize:
    """The sizes a run's memory depends on.

    n_cells, n_dims, n_clusters : int, N, d and K.
    level_counts : sequence of int, the number of levels of each batch variable.
    n_blocks : int, the online update's blocks, ``min(ceil(1 / block_size), N)``.
    """

    n_cells: int
    n_dims: int
    n_clusters: int
    level_counts: Sequence[int]
    n_blocks: int = 20


class _Terms(list):
    """The terms of an estimate as they are added; ``on``: the memory they
    live in unless a term names another."""

    def __init__(self, on: str):
        super().__init__()
        self.on = on

    def add(self, key, what, formula, sizes, where=None) -> None:
        if isinstance(sizes, (int, float)):
            sizes = {"always": sizes}
        self.append(
            Term(key, what, formula, tuple((p, int(v)) for p, v in sizes.items()), where or self.on)
        )


def estimate_memory(
    size: RunSize,
    *,
    dtype: torch.dtype = torch.float32,
    algorithm: str = "harmony1",
    device: torch.device | str = "cpu",
    copies_input: bool = True,
) -> MemoryEstimate:
    """Peak memory of a run, by term, beyond the inputs the caller holds.

    With N cells, d dimensions, K clusters, V batch variables of B_1 .. B_V
    levels (B in all, B_max the largest, ``m = 1 + B - B_max``), ``s`` the
    bytes of the working dtype (4 for float32, 8 for float64), ``a`` those of
    the statistics (8; 4 on MPS) and ``n_blocks = min(ceil(1 / block_size), N)``,
    the terms are (sizes in bytes):

    ===========  ===============================================  =========================
    term         size                                             alive
    ===========  ===============================================  =========================
    embedding    Z_corr and its row norms: N (d + 1) s, and a     always
                 converted copy of the input, N d s, unless it
                 is used as it is (``copies_input=False``)
    assignments  R: N K s                                         always
    indices      cell orders, level codes: 8 N (7 + 3V)           always
    block sums   the online update's per-block batch sums:        s: always;
                 n_blocks B K (2s + a)                            2s + a: clustering
    statistics   O, E, penalties: 8 B K a                         always
    overhead     torch's kernels and caches: 32 MB                always
    k-means      n = min(N, 20000): n (10 (2s + 16) + K s + 8),   initialisation
                 + n d s for the subsample when N > 20000
    pieces       scratch of the block update: 2^19 (V + 1) s      clustering
    ridge        per-level right-hand sides and coefficients:     K B d a building,
                 K B d (3a + s), + 16384 (K + d) 2s + 8 N         all of it solving
    pair sums    V > 1: cells shared by two variables' levels:    building
                 K max(B_v B_w) (s + 2a)
    border       V > 1: the systems' rows of the largest          K B_max m a building,
                 variable: K B_max m a, 2 copies (3: harmony2)    all copies solving
    systems      V > 1: the per-cluster ridge systems over the    K m^2 a building,
                 other variables: K m^2 a, 3 copies               3 copies solving
    ===========  ===============================================  =========================

    One batch variable has no pair sums, border or systems: its systems are
    solved in closed form (m = 1), so nothing is quadratic in B, and with
    several variables only the smaller variables' levels enter quadratically.
    The input is used as it is (no copy, ``copies_input=False``) when it is
    a C-contiguous NumPy array of the run's dtype on the CPU; the unit-length
    cells are never stored (each step divides the rows it reads by their
    norms). The peak is the largest, over the steps, of the sum of the terms
    alive then, plus 10% (:data:`SLACK`). On CUDA
    the same terms live on the GPU, except the level codes and orders kept on
    the host (8 N (2 + V)), the staging chunks of the input and the
    overhead; the input is always copied to the GPU.

    Parameters
    ----------
    size : RunSize
        N, d, K, the levels of each batch variable and the number of blocks.
    """
    device = torch.device(device)
    s = torch.empty((), dtype=dtype).element_size()
    a = 4 if device.type == "mps" else 8
    terms = _Terms("device" if device.type == "cuda" else "host")
    _add_cell_terms(terms, size, s=s, a=a, copies_input=copies_input)
    _add_ridge_terms(terms, size, s=s, a=a, algorithm=algorithm)
    return MemoryEstimate(tuple(terms), str(device))


def _add_cell_terms(terms: _Terms, size: RunSize, *, s: int, a: int, copies_input: bool) -> None:
    """The terms of :func:`estimate_memory` that hold cells, the clustering's
    sums and scratch, and the fixed costs (``s``, ``a``: bytes of the working
    and the statistics dtype)."""
    n, d, k = int(size.n_cells), int(size.n_dims), int(size.n_clusters)
    counts = [int(c) for c in size.level_counts]
    n_vars, b = len(counts), sum(counts)
    add, on = terms.add, terms.on
    if copies_input or on == "device":
        add(
            "embedding",
            "Z_corr, its row norms and the converted input (Z_orig)",
            "N x (2d + 1)",
            n * (2 * d + 1) * s,
        )
    else:
        add(
            "embedding",
            "Z_corr and its row norms (the input is used as it is)",
            "N x (d + 1)",
            n * (d + 1) * s,
        )
    add("assignments", "soft assignments R", "N x K", n * k * s)
    if on == "device":
        add(
            "indices",
            "cell orders and level codes on the GPU",
            "N x (6 + 3V) int64",
            8 * n * (6 + 3 * n_vars),
        )
        add(
            "host",
            "level codes and orders kept on the host",
            "N x (2 + V) int64",
            8 * n * (2 + n_vars),
            "host",
        )
    else:
        add(
            "indices", "cell orders and level codes", "N x (7 + 3V) int64", 8 * n * (7 + 3 * n_vars)
        )
    block_sums = int(size.n_blocks) * b * k
    add(
        "block sums",
        "per-block batch sums of the online update",
        "n_blocks x B x K, 3 copies",
        {"always": block_sums * s, PHASES[1]: block_sums * (s + a)},
    )
    add("statistics", "batch-by-cluster statistics (O, E, penalties)", "8 x B x K", 8 * b * k * a)
    add("overhead", "torch's kernels and caches", "fixed", _FIXED_OVERHEAD, "host")
    add(
        "k-means",
        "k-means initialisation",
        "min(N, 50 K) x 10 runs x (K + 6 candidates) + min(N, 20000) x (K + d)",
        {PHASES[0]: _kmeans_bytes(n, d, k, s)},
    )
    add(
        "pieces",
        "scratch of the online update",
        "2 x 2^18 x (V + 1)",
        {PHASES[1]: 2 * 2**18 * (n_vars + 1) * s},
    )


def _add_ridge_terms(terms: _Terms, size: RunSize, *, s: int, a: int, algorithm: str) -> None:
    """The terms of :func:`estimate_memory` that the correction's systems hold."""
    n, d, k = int(size.n_cells), int(size.n_dims), int(size.n_clusters)
    counts = [int(c) for c in size.level_counts]
    n_vars, b = len(counts), sum(counts)
    add = terms.add
    scratch = _READ_CHUNK * (k + d) * 2 * s + 8 * n
    add(
        "ridge",
        "per-level right-hand sides and coefficients of the ridge regressions",
        "K x B x d, 4 copies",
        {_BUILD: k * b * d * a + scratch, _SOLVE: k * b * d * (3 * a + s) + scratch},
    )
    if algorithm == "harmony2":
        add("filter", "Harmony2's batch filter", "K x B", {_SOLVE: k * b * (a + 1)})
    if n_vars > 1:
        biggest = max(counts)
        head = 1 + b - biggest
        widest = max(counts[v] * counts[w] for v in range(n_vars) for w in range(v + 1, n_vars))
        add(
            "pair sums",
            "cells shared by the levels of two variables",
            "K x max(B_v x B_w)",
            {_BUILD: k * widest * (s + 2 * a)},
        )
        border = k * biggest * head * a
        copies = 3 if algorithm == "harmony2" else 2
        add(
            "border",
            "rows of the several-variable ridge systems for the largest variable",
            f"K x B_max x (1 + B - B_max), {copies} copies",
            {_BUILD: border, _SOLVE: copies * border},
        )
        add(
            "systems",
            "per-cluster ridge systems over the intercept and the other variables",
            "K x (1 + B - B_max)^2, 3 copies",
            {_BUILD: k * head * head * a, _SOLVE: 3 * k * head * head * a},
        )


# ------------------------------------------------------------ available memory
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """Room left under this process's cgroup memory limit (v2 or v1), if any."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # cgroup v2
            for base in ((root / rel) if rel else root, root):
                limit = _read_int(base / "memory.max")
                if limit is not None:
                    used = _read_int(base / "memory.current") or 0
                    cache = _stat(base / "memory.stat", "inactive_file")
                    found.append(limit - used + cache)
                    break
        elif "memory" in controllers.split(","):  # cgroup v1
            for base in ((root / "memory" / rel) if rel else root / "memory", root / "memory"):
                limit = _read_int(base / "memory.limit_in_bytes")
                if limit is not None and limit < 2**60:
                    used = _read_int(base / "memory.usage_in_bytes") or 0
                    cache = _stat(base / "memory.stat", "total_inactive_file")
                    found.append(limit - used + cache)
                    break
    return min(found) if found else None


def host_available() -> int | None:
    """Bytes this process can still allocate on the host, or None if unknown.

    Linux: ``MemAvailable`` of ``/proc/meminfo``, or the room left under the
    cgroup memory limit (``memory.max`` less ``memory.current``, counting
    reclaimable file cache as free) when that is lower. Elsewhere
    ``os.sysconf`` free pages where the system reports them.
    """
    candidates = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return None
    return max(0, min(candidates))


def available_memory(device: torch.device | str = "cpu") -> dict:
    """Available bytes by memory: ``{"host": ..., "device": ...}`` (None: unknown).

    The device entry is the free memory of a CUDA device
    (``torch.cuda.mem_get_info``); on the CPU and on MPS (unified memory)
    there is only the host.
    """
    device = torch.device(device)
    out = {"host": host_available()}
    if device.type == "cuda":
        try:
            out["device"] = int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - any failure: unknown, no guard
            out["device"] = None
    return out


# ------------------------------------------------------------------- guard
_HINTS = {
    "embedding": "fewer cells or dimensions, or dtype='float32'",
    "assignments": "fewer clusters (nclust) or cells",
    "indices": "fewer cells",
    "block sums": "a larger block_size or fewer batch levels",
    "ridge": "fewer batch levels or clusters (nclust)",
    "pair sums": "fewer batch levels or clusters (nclust)",
    "border": "fewer batch levels or clusters (nclust)",
    "systems": "fewer batch levels in the variables other than the largest, or fewer "
    "clusters (nclust)",
}


def format_size(nbytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1024 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"  # pragma: no cover


def check_memory(estimate: MemoryEstimate, available: dict, *, context: str = "") -> None:
    """Raise :class:`MemoryError` when the estimate exceeds the available memory.

    ``available`` is :func:`available_memory`'s dict; an unknown amount (None)
    is not checked. ``context`` describes the problem (sizes) for the message.
    """
    for where in ("device", "host"):
        room = available.get(where)
        if room is None or not any(t.where == where for t in estimate.terms):
            continue
        need = estimate.peak(where)
        if need <= room:
            continue
        top = estimate.dominant(where)
        name = "GPU memory" if where == "device" else "memory"
        hint = _HINTS.get(top.key, "a smaller problem")
        raise MemoryError(
            f"run_harmony would need about {format_size(need)} of {name} at its peak (estimate) "
            f"but {format_size(room)} is available{context}; the largest part is the "
            f"{top.what}: {top.formula} = {format_size(top.nbytes)}. Use {hint}, or pass "
            f"check_memory=False to run anyway"
        )


def check_memory_fits(size, *, dtype, algorithm: str, device, copies_input: bool = True) -> None:
    """Refuse a run whose estimated peak memory exceeds the available memory.

    ``size`` is a :class:`RunSize` (N, d, K, the levels of
    each batch variable, the blocks). Raises :class:`MemoryError` with the
    estimate, the available memory and the term that dominates (see
    :func:`estimate_memory` for the terms). Nothing is
    checked where the available memory is unknown.
    """
    estimate = estimate_memory(
        size, dtype=dtype, algorithm=algorithm, device=device, copies_input=copies_input
    )
    n_levels, n_variables = sum(size.level_counts), len(size.level_counts)
    levels = (
        f"{n_levels:,} batch level(s) in {n_variables} variable(s)"
        if n_variables > 1
        else f"{n_levels:,} batch levels"
    )
    context = (
        f" (N={size.n_cells:,} cells, d={size.n_dims}, K={size.n_clusters} clusters, "
        f"{levels}, {size.n_blocks:,} blocks, {str(dtype).replace('torch.', '')} on "
        f"{device})"
    )
    check_memory(estimate, available_memory(device), context=context)
