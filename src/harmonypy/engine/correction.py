"""Correction step: a mixture of ridge regressions, one per cluster.

For cluster k, R harmony solves ``W_k = (Phi_moe diag(R_k) Phi_moe^T + diag(lambda))^-1
Phi_moe diag(R_k) Z^T`` and subtracts ``W_k^T Phi_moe diag(R_k)`` (intercept row
zeroed) from Z. Written per cluster, that is K passes with N-wide temporaries.
Here every quantity is grouped by batch level instead:

* ``Phi_Rk Z^T`` row b+1 is ``sum over cells of level b of R_ik z_i``: one
  (K x n_b) by (n_b x d) product per level, for all clusters at once;
* the (B+1) x (B+1) systems are solved batched over clusters, in float64 — in
  closed form when there is one batch variable (the matrix is then an arrowhead:
  a dense first row/column plus a diagonal). With several variables, the levels
  of the one with the most levels still form a diagonal block (they partition
  the cells); it is eliminated in closed form too, leaving a dense system only
  over the intercept and the other variables' levels. Memory and time are then
  linear in the largest variable's levels (see :func:`solve_bordered`);
* the correction of a cell of level b is ``sum_k R_ik W_k[b+1]``: one
  (n_b x K) by (K x d) product per level.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from harmonypy.engine.reduce import LOCAL, Reduction, index_sum_


@dataclass
class LevelIndex:
    """Cells of every batch level.

    Cells are in the caller's order. Levels whose cells are a contiguous run of
    rows (the first variable's, when the cells come sorted by it) are ``slice``
    objects (views, no copies); the others are index tensors, in increasing
    cell order.

    cells : list of ``slice`` or 1-D int64 tensor, one per global level.
    variable : list of int, the variable each level belongs to.
    """

    cells: list
    variable: list

    @classmethod
    def from_codes(cls, codes: torch.Tensor, offsets) -> LevelIndex:
        cells, variable = [], []
        for v in range(codes.shape[1]):
            all_counts = torch.bincount(codes[:, v], minlength=int(offsets[-1]))
            counts = all_counts[int(offsets[v]) : int(offsets[v + 1])].tolist()
            first = codes[:, v]
            if v == 0 and bool((first[1:] >= first[:-1]).all()):
                starts = [0]
                for c in counts:
                    starts.append(starts[-1] + c)
                pieces: list = [slice(a, b) for a, b in itertools.pairwise(starts)]
            else:
                pieces = list(torch.split(torch.argsort(first, stable=True), counts))
            for piece in pieces:
                cells.append(piece)
                variable.append(v)
        return cls(cells, variable)


#: Cells of one level read at once by the correction (the chunk of its sums).
LEVEL_CHUNK_ROWS = 16384


class _LevelReader:
    """Rows of R and Z for one level's cells, at most ``chunk`` cells at a time
    (:data:`LEVEL_CHUNK_ROWS` unless given).

    Gathered rows land in two scratch buffers reused for every level and chunk,
    so the correction allocates nothing per level (fresh level-sized copies cost
    page faults at a million cells). Rows of a level stored contiguously, with R
    in the same order, are plain views.
    """

    def __init__(
        self,
        assignments: torch.Tensor,
        z: torch.Tensor,
        position: torch.Tensor | None,
        chunk: int | None = None,
    ):
        chunk = LEVEL_CHUNK_ROWS if chunk is None else chunk
        self.assignments, self.z, self.position, self.chunk = assignments, z, position, chunk
        rows = min(chunk, assignments.shape[0])
        self._r_buffer = torch.empty(
            (rows, assignments.shape[1]), dtype=assignments.dtype, device=assignments.device
        )
        self._z_buffer = torch.empty((rows, z.shape[1]), dtype=z.dtype, device=z.device)

    def __call__(self, cells, z: bool = True):
        """Yield ``(cells_part, r_rows, z_rows)``; ``cells_part`` is a slice or an
        index; ``z_rows`` is None with ``z=False`` (not gathered)."""
        n = cells.stop - cells.start if isinstance(cells, slice) else cells.numel()
        for offset in range(0, n, self.chunk):
            size = min(self.chunk, n - offset)
            if isinstance(cells, slice):
                part = slice(cells.start + offset, cells.start + offset + size)
                z_rows = self.z[part] if z else None
            else:
                part = cells[offset : offset + size]
                z_rows = (
                    torch.index_select(self.z, 0, part, out=self._z_buffer[:size]) if z else None
                )
            if self.position is None and isinstance(part, slice):
                r_rows = self.assignments[part]
            else:
                where = part if self.position is None else self.position[part]
                r_rows = torch.index_select(self.assignments, 0, where, out=self._r_buffer[:size])
            yield part, r_rows, z_rows


def solve_arrowhead(
    total: torch.Tensor,
    observed: torch.Tensor,
    penalty: torch.Tensor,
    rhs0: torch.Tensor,
    rhs: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge coefficients of the one-variable systems, in closed form.

    The system for cluster k is ``[[a, o^T], [o, diag(o + l)]] [w0; w] = [r0; r]``
    with ``a = sum_i R_ki`` (the intercept is not penalised). Eliminating ``w``
    gives ``w0 = (r0 - sum_b o_b r_b / (o_b + l_b)) / (a - sum_b o_b^2 / (o_b + l_b))``
    and ``w_b = (r_b - o_b w0) / (o_b + l_b)``. With ``a = sum_b o_b`` the
    denominator is written as ``sum_b o_b l_b / (o_b + l_b)``, free of cancellation.
    Levels with ``keep == False`` are left out of the system (coefficient 0).

    Parameters
    ----------
    total : (K,) ``a``; observed, penalty : (K, B); rhs0 : (K, d); rhs : (K, B, d);
    keep : optional (K, B) bool.

    Returns
    -------
    intercept : (K, d) tensor, ``W[0]``.
    coef : (K, B, d) tensor, the batch rows ``W[1:]``.
    """
    if keep is not None:
        observed = observed * keep
    diag = (observed + penalty).clamp_min(torch.finfo(observed.dtype).tiny)
    weight = observed / diag
    schur = (weight * penalty).sum(1) + (total - observed.sum(1))
    # An empty cluster (a = 0) gets zero coefficients instead of 0 / 0.
    schur = schur.clamp_min(torch.finfo(observed.dtype).tiny)
    intercept = (rhs0 - torch.einsum("kb,kbd->kd", weight, rhs)) / schur[:, None]
    coef = (rhs - observed[:, :, None] * intercept[:, None, :]) / diag[:, :, None]
    if keep is not None:
        coef = coef * keep[:, :, None]
    return intercept, coef


def solve_dense(
    cov: torch.Tensor, rhs0: torch.Tensor, rhs: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched solve of the (B+1) x (B+1) systems ``cov [w0; w] = [r0; r]``.

    A level with ``keep == False`` has its row and column replaced by the
    identity and its right-hand side by zero: that pins its coefficient at 0
    and leaves the other unknowns as if it had been deleted from the system.
    """
    full_rhs = torch.cat([rhs0[:, None, :], rhs], dim=1)
    if keep is not None:
        drop = torch.cat([torch.zeros_like(keep[:, :1]), ~keep], dim=1)  # (K, B+1)
        cov = cov.masked_fill(drop[:, :, None] | drop[:, None, :], 0.0)
        idx = torch.arange(cov.shape[1], device=cov.device)
        cov[:, idx, idx] = torch.where(drop, torch.ones_like(cov[:, idx, idx]), cov[:, idx, idx])
        full_rhs = full_rhs.masked_fill(drop[:, :, None], 0.0)
    solution = torch.linalg.solve(cov, full_rhs)
    return solution[:, 0, :], solution[:, 1:, :]


def solve_bordered(
    head: torch.Tensor,
    border: torch.Tensor,
    observed: torch.Tensor,
    penalty: torch.Tensor,
    rhs_head: torch.Tensor,
    rhs_diag: torch.Tensor,
    keep_head: torch.Tensor | None = None,
    keep_diag: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched solve of ``[[H, C^T], [C, diag(o + l)]] [x_h; x_d] = [r_h; r_d]``.

    The several-variable ridge systems in this form: ``d`` indexes the n levels
    of one variable (its block is diagonal because its levels partition the
    cells), ``h`` the intercept (first) and the m - 1 levels of the other
    variables. With ``D = o + l``, eliminating ``x_d`` leaves the m x m Schur
    complement ``S = H - C^T D^-1 C``; then ``x_d = D^-1 (r_d - C x_h)``. That
    costs O(n m^2 + m^3) per cluster and O(n m) memory instead of O((n + m)^3)
    and O((n + m)^2). One variable (m = 1) is the arrowhead of
    :func:`solve_arrowhead`.

    The intercept's row and column of ``S`` are written without cancellation:
    column 0 of ``C`` is ``o``, so ``(C^T D^-1 C)[0, j] = sum_b C_bj - sum_b C_bj
    l_b / D_b``, and ``S[0, j] = (H[0, j] - sum_b C_bj) + sum_b C_bj l_b / D_b``.

    A level with ``keep == False`` is left out of the system (coefficient 0,
    the other unknowns as if it had been deleted), as in :func:`solve_dense`.

    Parameters
    ----------
    head : (K, m, m) ``H``; border : (K, n, m) ``C`` with ``C[:, :, 0] == observed``;
    observed, penalty : (K, n) ``o`` and ``l``; rhs_head : (K, m, d); rhs_diag : (K, n, d);
    keep_head : optional (K, m - 1) bool; keep_diag : optional (K, n) bool.

    Returns
    -------
    x_head : (K, m, d), the intercept first; x_diag : (K, n, d).
    """
    tiny = torch.finfo(observed.dtype).tiny
    if keep_diag is not None:
        mask = keep_diag.to(observed.dtype)
        observed = observed * mask
        border = border * mask[:, :, None]
        rhs_diag = rhs_diag * mask[:, :, None]
    diag = (observed + penalty).clamp_min(tiny)
    scaled = border / diag[:, :, None]  # D^-1 C
    schur = torch.baddbmm(head, border.transpose(1, 2), scaled, alpha=-1.0)
    first = head[:, 0, :] - border.sum(1) + torch.bmm((penalty / diag)[:, None, :], border)[:, 0, :]
    # An empty cluster (no cells) gets zero coefficients instead of 0 / 0.
    first[:, 0] = first[:, 0].clamp_min(tiny)
    schur[:, 0, :] = first
    schur[:, :, 0] = first
    rhs = torch.baddbmm(rhs_head, scaled.transpose(1, 2), rhs_diag, alpha=-1.0)
    del scaled
    if keep_head is not None:
        drop = torch.cat([torch.zeros_like(keep_head[:, :1]), ~keep_head], dim=1)  # (K, m)
        schur.masked_fill_(drop[:, :, None] | drop[:, None, :], 0.0)
        diagonal = schur.diagonal(dim1=1, dim2=2)
        diagonal.masked_fill_(drop, 1.0)
        rhs.masked_fill_(drop[:, :, None], 0.0)
    x_head = torch.linalg.solve(schur, rhs)
    x_diag = torch.baddbmm(rhs_diag, border, x_head, alpha=-1.0).div_(diag[:, :, None])
    return x_head, x_diag


def above_cutoff(observed: torch.Tensor, counts: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Levels holding more than ``cutoff`` of their cells in each cluster, (K, B) bool:
    ``O[k, b] / N_b > cutoff``."""
    return observed / counts[None, :] > cutoff


def batch_filter(
    observed: torch.Tensor, counts: torch.Tensor, level_variable: torch.Tensor, cutoff: float
) -> torch.Tensor:
    """Harmony2's choice of levels per cluster, (K, B) bool.

    Level b takes part in cluster k's regression when ``O[k, b] / N_b > cutoff``
    (:func:`above_cutoff`) and its variable keeps at least two such levels in
    that cluster.
    """
    keep = above_cutoff(observed, counts, cutoff)
    n_variables = int(level_variable.max()) + 1
    per_variable = torch.zeros(
        (observed.shape[0], n_variables), dtype=torch.int64, device=observed.device
    )
    per_variable.index_add_(1, level_variable, keep.to(torch.int64))
    return keep & (per_variable[:, level_variable] >= 2)


@dataclass
class Correction:
    """Result of the correction step.

    z_corr : (N, d) corrected embedding.
    intercept : (K, d) ridge intercepts ``W[0]`` (Harmony2 takes centroids from them).
    keep : (K, B) bool levels used per cluster, or None when all were used.
    penalty : (K, B) the ridge penalty each level got (``lambda``).
    """

    z_corr: torch.Tensor
    intercept: torch.Tensor
    keep: torch.Tensor | None
    penalty: torch.Tensor


@dataclass(frozen=True)
class RidgeAnchor:
    """A fitted reference's state that anchors the intercept of a query's systems.

    Symphony's ``moe_correct_ref``: the reference's cells enter the query's
    per-cluster systems only through the intercept's row, ``A[0, 0] += Nr[k]``
    and ``F[0] += C[k]``, so the query moves onto the reference and the
    reference stays where it is. With an anchor, Harmony2's filter keeps a
    level alone in its variable (the anchor keeps the intercept identifiable,
    :func:`above_cutoff`); the estimated penalties' ``RidgeSettings.proportions``
    are the caller's (Symphony counts them over both sets of cells).

    sizes : (K,) tensor ``Nr``, the reference's cells per cluster (sum of R).
    sums : (K, d) tensor ``C``, the R-weighted sums of the reference's
        uncorrected cells per cluster.
    """

    sizes: torch.Tensor
    sums: torch.Tensor


@dataclass(frozen=True)
class RidgeSettings:
    """What stays the same across a run's corrections.

    lamb : (B,) tensor of ridge penalties per level, or None to estimate them
        per cluster as ``alpha * E[k, b]``.
    alpha : float, the scale of the estimated penalties.
    proportions : (B,) tensor ``Pr_b``.
    stat_dtype : torch.dtype the systems are built and solved in (float64;
        float32 on MPS).
    batch_prop_cutoff, counts : Harmony2 batch filtering (see :func:`batch_filter`);
        ``counts`` is ``N_b``, (B,). None turns filtering off (Harmony 1).
    reduction : Reduction
        Sums the normal equations (``Phi_Rk Phi_moe^T`` and ``Phi_Rk Z^T``, all
        sums over cells) over every process's cells in a distributed run, so
        every process solves the same systems; each then corrects its own cells.
    """

    lamb: torch.Tensor | None
    alpha: float
    proportions: torch.Tensor
    stat_dtype: torch.dtype
    batch_prop_cutoff: float | None = None
    counts: torch.Tensor | None = None
    reduction: Reduction = LOCAL


@dataclass(frozen=True)
class RidgeSystem:
    """The per-cluster normal equations, grouped by batch level.

    total : (K,) ``sum_i R_ki``; observed : (K, B) ``O``; penalty : (K, B) ``lambda``;
    rhs0 : (K, d) ``sum_i R_ki z_i``; rhs : (K, B, d) the same per level;
    keep : optional (K, B) bool, the levels used per cluster (Harmony2).
    """

    total: torch.Tensor
    observed: torch.Tensor
    penalty: torch.Tensor
    rhs0: torch.Tensor
    rhs: torch.Tensor
    keep: torch.Tensor | None = None


def ridge_correct(
    z_orig: torch.Tensor,
    assignments: torch.Tensor,
    *,
    codes: torch.Tensor,
    levels: LevelIndex,
    settings: RidgeSettings,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    anchor: RidgeAnchor | None = None,
) -> Correction:
    """Correct ``Z_orig`` (N x d) with the per-cluster ridge regressions on R.

    The fit's correction step, and with ``anchor`` the same kernel mapping
    query cells onto a fitted reference (fitted state in, query out: the
    reference's ``Nr`` and ``C`` join the intercept's row, nothing else of it
    is read).

    Parameters
    ----------
    z_orig : (N, d) tensor.
    assignments : (N, K) tensor, R transposed.
    codes : (N, V) int64 tensor of global level indices.
    levels : LevelIndex of the same codes.
    settings : RidgeSettings, the penalties, the dtype and the reduction.
    rows : optional (N,) int64 tensor, the cell held by each row of
        ``assignments`` (None: row i is cell i).
    out : optional (N, d) tensor that receives the corrected embedding (the
        previous one's memory: no fresh allocation, no page faults). It may
        be ``z_orig`` itself: every cell is read before its row is written.
    anchor : optional RidgeAnchor, a fitted reference's ``Nr`` and ``C``.

    Returns
    -------
    Correction, with the (K, B) penalties used.
    """
    position = None
    if rows is not None:  # row p of assignments holds cell rows[p]
        position = torch.empty_like(rows)
        position[rows] = torch.arange(rows.numel(), device=rows.device)
    read = _LevelReader(assignments, z_orig, position)
    system = _normal_equations(read, levels=levels, settings=settings, anchor=anchor)
    if codes.shape[1] == 1:
        intercept, coef = solve_arrowhead(
            system.total, system.observed, system.penalty, system.rhs0, system.rhs, system.keep
        )
    else:
        row_codes = codes if rows is None else codes.index_select(0, rows)
        intercept, coef = _solve_several(
            system,
            codes=row_codes,
            assignments=assignments,
            levels=levels,
            reduction=settings.reduction,
        )
    coef = coef.to(z_orig.device, z_orig.dtype)
    z_corr = torch.empty_like(z_orig) if out is None else out
    _subtract_batch_parts(read, coef, levels=levels, out=z_corr)
    return Correction(
        z_corr, intercept.to(z_orig.device, z_orig.dtype), system.keep, system.penalty
    )


def _normal_equations(
    read: _LevelReader,
    *,
    levels: LevelIndex,
    settings: RidgeSettings,
    anchor: RidgeAnchor | None = None,
) -> RidgeSystem:
    """The level sums of R and of R-weighted cells, over every process's cells,
    and the penalties and kept levels they give (on the CPU for an MPS run);
    with ``anchor``, a reference's state added to the intercept's row."""
    assignments, z_orig = read.assignments, read.z
    solve_device = torch.device("cpu") if z_orig.device.type == "mps" else z_orig.device
    stat_dtype = settings.stat_dtype
    n_clusters, n_levels, d = assignments.shape[1], len(levels.cells), z_orig.shape[1]
    rhs = torch.zeros((n_clusters, n_levels, d), dtype=stat_dtype, device=solve_device)
    observed = torch.zeros((n_clusters, n_levels), dtype=stat_dtype, device=solve_device)
    for b, cells in enumerate(levels.cells):
        for _, r_rows, z_rows in read(cells):
            rhs[:, b, :] += (r_rows.T @ z_rows).to(solve_device, stat_dtype)
            observed[:, b] += r_rows.sum(0).to(solve_device, stat_dtype)
    settings.reduction.sum_(rhs, observed)
    # The first variable's levels partition the cells: their sums are the
    # intercept's row of the system.
    first = levels.variable.count(0)
    rhs0 = rhs[:, :first, :].sum(1)
    total = observed[:, :first].sum(1)
    if anchor is not None:
        total = anchor.sizes.to(solve_device, stat_dtype) + total
        rhs0 = anchor.sums.to(solve_device, stat_dtype) + rhs0
    if settings.lamb is None:
        penalty = (
            settings.alpha
            * total[:, None]
            * settings.proportions.to(solve_device, stat_dtype)[None, :]
        )
    else:
        penalty = settings.lamb.to(solve_device, stat_dtype)[None, :].expand(n_clusters, n_levels)
    return RidgeSystem(
        total,
        observed,
        penalty,
        rhs0,
        rhs,
        _kept_levels(observed, levels=levels, settings=settings, anchored=anchor is not None),
    )


def _kept_levels(
    observed: torch.Tensor, *, levels: LevelIndex, settings: RidgeSettings, anchored: bool
) -> torch.Tensor | None:
    """Harmony2's levels per cluster (None: all); an anchored system keeps a
    level alone in its variable, its intercept being fixed by the anchor."""
    if settings.batch_prop_cutoff is None:
        return None
    if settings.counts is None:
        raise ValueError("RidgeSettings: batch_prop_cutoff needs the level sizes (counts)")
    counts = settings.counts.to(observed.device, observed.dtype)
    if anchored:
        return above_cutoff(observed, counts, settings.batch_prop_cutoff)
    level_variable = torch.as_tensor(levels.variable, device=observed.device)
    return batch_filter(observed, counts, level_variable, settings.batch_prop_cutoff)


def _subtract_batch_parts(
    read: _LevelReader, coef: torch.Tensor, *, levels: LevelIndex, out: torch.Tensor
) -> None:
    """Write ``Z_orig`` less each cell's ``sum_k R_ik W_k[b+1]`` into ``out``.

    The first variable's levels partition the cells: each of its chunks
    writes its rows of Z_corr once, Z_orig less the correction; further
    variables' levels subtract their parts from those rows. Z_orig is only
    read, so it can be the caller's array, in the caller's order.
    """
    z_orig, z_corr = read.z, out
    first = levels.variable.count(0)
    corrected = torch.empty(
        (min(read.chunk, z_orig.shape[0]), z_orig.shape[1]),
        dtype=z_orig.dtype,
        device=z_orig.device,
    )
    for b, cells in enumerate(levels.cells):
        for part, r_rows, z_rows in read(cells, z=b < first):
            if b >= first:
                if isinstance(part, slice):
                    z_corr[part].addmm_(r_rows, coef[:, b, :], alpha=-1.0)
                else:
                    z_corr.index_add_(0, part, r_rows @ coef[:, b, :], alpha=-1.0)
            elif isinstance(part, slice):
                torch.addmm(z_rows, r_rows, coef[:, b, :], alpha=-1.0, out=z_corr[part])
            else:
                rows = torch.addmm(
                    z_rows, r_rows, coef[:, b, :], alpha=-1.0, out=corrected[: r_rows.shape[0]]
                )
                z_corr.index_copy_(0, part, rows)


def _solve_several(
    system: RidgeSystem,
    *,
    codes: torch.Tensor,
    assignments: torch.Tensor,
    levels: LevelIndex,
    reduction: Reduction = LOCAL,
):
    """Ridge coefficients of the several-variable systems by :func:`solve_bordered`.

    The variable with the most levels is eliminated in closed form; the other
    variables' levels and the intercept form the dense head. ``codes`` are the
    level codes of the rows of ``assignments``, in their order. Returns
    ``(intercept (K, d), coef (K, B, d))`` like :func:`solve_dense`, in the
    dtype and on the device of ``system.observed``.
    """
    observed, penalty, rhs, keep = system.observed, system.penalty, system.rhs, system.keep
    device, dtype = observed.device, observed.dtype
    n_clusters, n_levels = observed.shape
    bounds = _variable_bounds(levels)
    sizes = [end - start for start, end in bounds]
    big = max(range(len(sizes)), key=sizes.__getitem__)
    g0, g1 = bounds[big]
    others = [v for v in range(len(bounds)) if v != big]
    rest = torch.cat([torch.arange(*bounds[v], device=device) for v in others])
    at = {}  # first row of each other variable in the head
    row = 1
    for v in others:
        at[v] = row
        row += sizes[v]
    m = row
    head = torch.zeros((n_clusters, m, m), dtype=dtype, device=device)
    head[:, 0, 0] = system.total
    head[:, 0, 1:] = observed[:, rest]
    head[:, 1:, 0] = observed[:, rest]
    inner = torch.arange(1, m, device=device)
    head[:, inner, inner] = observed[:, rest] + penalty[:, rest]
    border = torch.empty((n_clusters, g1 - g0, m), dtype=dtype, device=device)
    border[:, :, 0] = observed[:, g0:g1]
    # Levels of two different variables overlap in the cells they share.
    for v in range(len(bounds)):
        for w in range(v + 1, len(bounds)):
            block = _pair_sums(codes, assignments, bounds, v, w, device, dtype)
            reduction.sum_(block)
            if big in (v, w):
                other = w if v == big else v
                block = block if v == big else block.transpose(1, 2)
                border[:, :, at[other] : at[other] + sizes[other]] = block
            else:
                head[:, at[v] : at[v] + sizes[v], at[w] : at[w] + sizes[w]] = block
                head[:, at[w] : at[w] + sizes[w], at[v] : at[v] + sizes[v]] = block.transpose(1, 2)
            del block
    rhs_head = torch.cat([system.rhs0[:, None, :], rhs[:, rest]], dim=1)
    keep_head = keep_diag = None
    if keep is not None:
        keep_head, keep_diag = keep[:, rest], keep[:, g0:g1]
    x_head, x_diag = solve_bordered(
        head,
        border,
        observed[:, g0:g1],
        penalty[:, g0:g1],
        rhs_head,
        rhs[:, g0:g1],
        keep_head,
        keep_diag,
    )
    coef = torch.empty((n_clusters, n_levels, rhs.shape[2]), dtype=dtype, device=device)
    coef[:, g0:g1] = x_diag
    coef[:, rest] = x_head[:, 1:]
    return x_head[:, 0], coef


def _pair_sums(codes, assignments, bounds, v, w, device, dtype) -> torch.Tensor:
    """``sum_i R_ik`` over the cells of each (level of v, level of w): (K, B_v, B_w).

    ``codes`` are the level codes of the rows of ``assignments``, in their order.
    """
    n_clusters = assignments.shape[1]
    (v0, v1), (w0, w1) = bounds[v], bounds[w]
    width = w1 - w0
    pair = (codes[:, v] - v0) * width + (codes[:, w] - w0)
    sums = torch.zeros(
        ((v1 - v0) * width, n_clusters), dtype=assignments.dtype, device=assignments.device
    )
    index_sum_(sums, pair, assignments)
    return sums.to(device, dtype).T.reshape(n_clusters, v1 - v0, width)


def _dense_system(total, observed, penalty, codes, assignments, levels, device, dtype):
    """``Phi_moe diag(R_k) Phi_moe^T + diag(lambda)`` for all clusters: (K, B+1, B+1).

    ``codes`` are the level codes of the rows of ``assignments``, in their order.
    Quadratic in B: the engine solves the same systems by :func:`solve_bordered`;
    this dense form is the reference the tests compare it with.
    """
    n_clusters, n_levels = observed.shape
    cov = torch.zeros((n_clusters, n_levels + 1, n_levels + 1), dtype=dtype, device=device)
    # An empty cluster would make the system singular; it gets zero coefficients.
    cov[:, 0, 0] = total.clamp_min(torch.finfo(dtype).tiny)
    cov[:, 0, 1:] = observed
    cov[:, 1:, 0] = observed
    idx = torch.arange(n_levels, device=device)
    cov[:, idx + 1, idx + 1] = observed + penalty
    bounds = _variable_bounds(levels)
    for v in range(codes.shape[1]):
        for w in range(v + 1, codes.shape[1]):
            (v0, v1), (w0, w1) = bounds[v], bounds[w]
            block = _pair_sums(codes, assignments, bounds, v, w, device, dtype)
            cov[:, 1 + v0 : 1 + v1, 1 + w0 : 1 + w1] = block
            cov[:, 1 + w0 : 1 + w1, 1 + v0 : 1 + v1] = block.transpose(1, 2)
    return cov


def _variable_bounds(levels: LevelIndex) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for v in sorted(set(levels.variable)):
        count = levels.variable.count(v)
        bounds.append((start, start + count))
        start += count
    return bounds
