"""numba kernels of the fused clustering round (imported only when numba is).

One piece of cells is worked on in three steps: :func:`gather_rows` (the
piece's rows of Z_cos and their levels), a BLAS matrix product done by the
caller (the distances stay in BLAS: hand-written loops were slower), and
:func:`update_piece`, which adds the diversity penalty, takes the softmax,
writes R and adds the new rows to the batch and objective sums in one pass
over the piece while it is in cache.

Why the sums give the same bits on every run, whatever the thread count:
:func:`update_piece` splits a piece's rows into a fixed number of lanes, each
adding to its own sums in row order, and the caller adds the lanes in lane
order, so every sum is taken in one fixed order.

There is no SVML on a stock numba install, so ``math.exp`` stays a scalar call
in a loop; :func:`_exp_nonpositive` is a polynomial the compiler can
vectorise (Cody-Waite reduction, a Taylor polynomial of degree 7 in float32
and 13 in float64, the power of two built from its exponent bits): relative
error below 2 ulp in float32 and float64 for the arguments a softmax gives it
(at most 0).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, set_num_threads, types
from numba.extending import intrinsic


def get_threads() -> int:
    """numba's thread setting for the calling thread."""
    return get_num_threads()


def set_threads(n: int) -> None:
    """Use ``n`` threads (at most ``NUMBA_NUM_THREADS``) in the calling thread."""
    set_num_threads(n)


#: Reassociation lets the row maxima and sums vectorise; no ``nnan``/``ninf``:
#: a non-finite value must still reach the engine's checks.
_FAST = {"reassoc", "contract", "nsz", "arcp"}


@intrinsic
def _pow2(typingctx, n):
    """``2 ** n`` for a whole-number float ``n`` inside the normal range,
    built from the exponent bits (one integer add and shift: vectorises)."""
    if not isinstance(n, types.Float):
        return None

    def codegen(context, builder, signature, args):
        if n.bitwidth == 32:
            int_type, bias, shift, float_type = ir.IntType(32), 127, 23, ir.FloatType()
        else:
            int_type, bias, shift, float_type = ir.IntType(64), 1023, 52, ir.DoubleType()
        bits = builder.add(builder.fptosi(args[0], int_type), ir.Constant(int_type, bias))
        return builder.bitcast(builder.shl(bits, ir.Constant(int_type, shift)), float_type)

    return n(n), codegen


@intrinsic
def _single_precision(typingctx, x):
    """True for a float32 ``x``: a constant the compiler folds, so each dtype
    compiles only its own branch."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        return ir.Constant(ir.IntType(1), int(x.bitwidth == 32))

    return types.boolean(x), codegen


def exp_constants(dtype) -> np.ndarray:
    """The constants of :func:`_exp_nonpositive` in ``dtype`` (float32 or
    float64), so that no literal turns a float32 computation into float64:
    log2(e), ln 2 split in two, the underflow cut-off, 0.5, 1, 0, 1/k! for
    k = 2..13, and the smallest softmax sum :func:`_softmax_row` accepts
    before it redoes a row with its maximum."""
    if np.dtype(dtype) == np.float32:
        head = [1.4426950408889634, 0.693359375, -2.12194440e-4, -87.0]
    else:
        head = [1.4426950408889634, 6.93147180369123816490e-01, 1.90821492927058770002e-10, -708.0]
    factorials = [1.0 / float(np.prod(np.arange(1, k + 1), dtype=np.float64)) for k in range(2, 14)]
    smallest_sum = 1e-20 if np.dtype(dtype) == np.float32 else 1e-150
    return np.array(head + [0.5, 1.0, 0.0] + factorials + [smallest_sum], dtype=dtype)


# No reassociation here: it would undo the two-step reduction by ln 2 (an
# error of |x| ulp); compiled on its own, the compiler still inlines it.
@njit(fastmath={"contract", "nsz", "arcp"}, cache=True)
def _exp_nonpositive(x, c):
    """``exp(x)`` for ``x <= 0`` (0 below the cut-off ``c[3]``, NaN for NaN);
    ``c`` from :func:`exp_constants` in x's dtype."""
    small = x < c[3]
    t = np.floor(x * c[0] + c[4])
    t = c[6] if small else t  # keeps the exponent bits in range
    r = (x - t * c[1]) - t * c[2]
    # |r| <= ln(2) / 2: the Taylor terms up to r^7 / 7! leave a relative error
    # of 6e-9 (float32's unit roundoff is 6e-8); float64 needs them to r^13 / 13!.
    if _single_precision(x):  # type: ignore[call-arg]
        p = c[12]
    else:
        p = c[18]
        p = p * r + c[17]
        p = p * r + c[16]
        p = p * r + c[15]
        p = p * r + c[14]
        p = p * r + c[13]
        p = p * r + c[12]
    p = p * r + c[11]
    p = p * r + c[10]
    p = p * r + c[9]
    p = p * r + c[8]
    p = p * r + c[7]
    # numba passes the typing context to an intrinsic; its stubs want it from the caller.
    value = ((p * r) * r + r + c[5]) * _pow2(t)  # type: ignore[call-arg]
    return c[6] if small else value


@njit(parallel=True, cache=True)
def gather_rows(cells, rows, out):
    """Rows of the cells ``rows`` of ``cells = (z, norms, codes)``: ``out =
    (unit, row_codes)`` receives ``z[rows[i]] / norms[rows[i]]`` (rows of
    Z_cos) and ``codes[rows[i]]``."""
    z, norms, codes = cells
    unit, row_codes = out
    for i in prange(rows.shape[0]):
        cell = rows[i]
        scale = norms[cell]
        for j in range(z.shape[1]):
            unit[i, j] = z[cell, j] / scale
        for v in range(codes.shape[1]):
            row_codes[i, v] = codes[cell, v]


@njit(cache=True)
def blocks_of_cells(base, order, starts, out):
    """``out[base[order[p]]]`` = the block of position ``p``, whose blocks
    start at ``starts`` (increasing, one more than the blocks: the last is
    the end): each cell's block in an update that visits the cells
    ``base[order]`` (no N-sized temporary for ``base[order]``). An empty
    ``base`` stands for the identity: ``out[order[p]]``."""
    block = 0
    identity = base.shape[0] == 0
    for p in range(order.shape[0]):
        while p >= starts[block + 1]:
            block += 1
        out[order[p] if identity else base[order[p]]] = block


@njit(parallel=True, cache=True)
def take(values, index, out):
    """``out[i] = values[index[i]]`` (int64), on the threads."""
    for i in prange(index.shape[0]):
        out[i] = values[index[i]]


@njit(inline="always", cache=True)
def _scalars(c):
    """The constants as a tuple of scalars: read once, they stay in
    registers (an array the loop also writes to might alias them)."""
    return (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12],
            c[13], c[14], c[15], c[16], c[17], c[18], c[19])  # fmt: skip


@njit(inline="always", fastmath=_FAST, cache=True)
def _exp_row(arrays, row, bound, c):
    """The softmax's numerators for one row. ``arrays = (logits, penalty,
    shift, out)``, ``row = (i, p)``: row ``i`` of ``logits`` becomes ``logits
    + penalty[p] - shift`` (the penalised logits) and row ``i`` of ``out``
    their exponentials less a shift; returns ``(total, shift)``, so that
    ``out[i] / total`` is the softmax and ``shift + log(total)`` the
    log-sum-exp.

    Rows are indexed in place, not taken as views: a view per row costs two
    reference-count updates, more than the row's arithmetic.

    ``bound`` is at least the row's largest logit (see :func:`update_piece`):
    shifting by it instead of the maximum saves a pass that does not
    vectorise (a max reduction needs ``nnan``). Should the bound be so far
    above that the sum falls below ``c[19]`` (where the smallest terms would
    be lost), the row is done again with its maximum."""
    logits, penalty, shift, out = arrays
    i, p = row
    n_clusters = out.shape[1]
    total = c[6]
    for k in range(n_clusters):
        value = logits[i, k] + penalty[p, k] - shift[k]
        logits[i, k] = value
        e = _exp_nonpositive(value - bound, c)
        out[i, k] = e
        total += e
    if total < c[19]:
        bound = logits[i, 0]
        for k in range(n_clusters):
            bound = max(bound, logits[i, k])
        total = c[6]
        for k in range(n_clusters):
            e = _exp_nonpositive(logits[i, k] - bound, c)
            out[i, k] = e
            total += e
    return total, bound


@njit(inline="always", fastmath=_FAST, cache=True)
def _softmax_row(arrays, row, bound, c):
    """Softmax of one row (:func:`_exp_row`'s ``arrays`` and ``row``, then
    normalised). Returns the row's ``sum_k R_k logits_k``, ``sum_k R_k
    penalty_k``, ``sum_k R_k`` and ``lse``, the log-sum-exp of the penalised
    logits (the objective's terms: see
    :class:`harmonypy.engine.objective.ObjectiveSums`)."""
    logits, penalty, _, out = arrays
    i, p = row
    total, bound = _exp_row(arrays, row, bound, c)
    inverse = c[5] / total
    r_sum, r_logits, r_penalty = c[6], c[6], c[6]
    for k in range(out.shape[1]):
        r = out[i, k] * inverse
        out[i, k] = r
        r_sum += r
        r_logits += r * logits[i, k]
        r_penalty += r * penalty[p, k]
    return r_logits, r_penalty, r_sum, bound + np.log(total)


@njit(inline="always", fastmath=_FAST, cache=True)
def _softmax_row_into_sums(arrays, row, bound, c):
    """:func:`_softmax_row` for the common case (one batch variable, one
    sigma). ``arrays = (logits, penalty, shift, out, sums)`` and ``row = (i,
    level, pair)``: row ``i``, with the penalty row ``penalty[level]``; the
    new row is added to rows ``level`` and ``pair`` (-1: none) of ``sums``
    (float64) in the same pass. Returns the row's ``sum_k R_k logits_k`` and
    ``lse sum_k R_k``."""
    logits, penalty, shift, out, sums = arrays
    i, level, pair = row
    total, bound = _exp_row((logits, penalty, shift, out), (i, level), bound, c)
    inverse = c[5] / total
    r_sum, r_logits = c[6], c[6]
    for k in range(out.shape[1]):
        r = out[i, k] * inverse
        out[i, k] = r
        r_sum += r
        r_logits += r * logits[i, k]
        sums[level, k] += r
        if pair >= 0:  # the same every k: the compiler takes it out of the loop
            sums[pair, k] += r
    return r_logits, (bound + np.log(total)) * r_sum


@njit(fastmath=_FAST, cache=True)
def _add_row(total, row):
    """``total += row``, into float64."""
    for k in range(row.shape[0]):
        total[k] += row[k]


@njit(fastmath=_FAST, cache=True)
def _add_products(total, row, other):
    """``total += row * other``, into float64."""
    for k in range(row.shape[0]):
        total[k] += np.float64(row[k]) * other[k]


@njit(fastmath=_FAST, cache=True)
def _add_row_scaled(total, row, scale):
    """``total += row * scale``, into float64 (``scale`` a float64)."""
    for k in range(row.shape[0]):
        total[k] += row[k] * scale


@njit(inline="always", cache=True)
def _lane_bounds(lane, n_lanes, n):
    """The rows ``[start, stop)`` of lane ``lane`` of ``n_lanes`` in a piece of ``n``."""
    return lane * n // n_lanes, (lane + 1) * n // n_lanes


@njit(parallel=True, fastmath=_FAST, cache=True)
def update_piece(logits, penalty, rows, outputs, consts):
    """Penalty, softmax, R and every sum over the new rows, for one piece.

    logits : (n, K) ``2 z.Y / sigma`` in, the penalised logits out.
    penalty : ``(log_penalty, row_penalty, shift, bound)``. One batch
        variable: ``log_penalty`` (B, K) is the block's ``theta_b
        log(ratio_kb)``, and row i's penalty is its row ``codes[i, 0]``;
        ``row_penalty`` is then (0, K). Several: ``row_penalty`` (n, K) holds
        each row's penalty. ``shift`` (K,) is ``2 / sigma``; ``bound`` (1,) at
        least every penalised logit (``z.Y <= 1`` for unit vectors, so
        ``max(log_penalty) + log(V)`` is one).
    rows : ``(new, codes, next_block)``: (n, K) receives R; (n, V) int64 the
        rows' global levels; (n,) int64 each row's block in the next update,
        or (0,) when the next update's removals are not summed here.
    outputs : ``(lane_sums, lane_objective)``, float64, added to in place.
        ``lane_sums`` (L, S, K): row i joins rows ``codes[i, v]`` of its
        lane's sums and, with ``next_block``, rows ``B (1 + next_block[i]) +
        codes[i, v]`` (B = ``n_levels``, the first B rows being the block's
        level sums). ``lane_objective`` (L, 3, K): per cluster ``sum R
        logits``, ``sum lse R``, ``sum R penalty`` (the last only with
        ``row_penalty``), or (L, 3, 1) their sums over the clusters when
        sigma is the same for every cluster.
    consts : :func:`exp_constants` of the dtype.

    The rows are split into L lanes (a number that does not depend on the
    thread count), each adding to its own sums in row order; the caller adds
    the lanes in lane order. So every sum is taken in one fixed order: a
    seed gives the same bits whatever the number of threads.
    """
    log_penalty, row_penalty, shift, bound = penalty
    new, codes, next_block = rows
    lane_sums, lane_objective = outputs
    n, n_clusters = new.shape
    n_lanes, n_levels = lane_sums.shape[0], log_penalty.shape[0]
    by_level = row_penalty.shape[0] != n
    with_next = next_block.shape[0] == n
    per_cluster = lane_objective.shape[2] == n_clusters and n_clusters > 1
    c = _scalars(consts)
    top = bound[0]
    common = by_level and not per_cluster and codes.shape[1] == 1
    for lane in prange(n_lanes):
        start, stop = _lane_bounds(lane, n_lanes, n)
        sums, objective = lane_sums[lane], lane_objective[lane]
        if common:  # one pass per row: softmax, R, both sums
            for i in range(start, stop):
                level = codes[i, 0]
                pair = n_levels * (1 + next_block[i]) + level if with_next else -1
                r_logits, r_lse = _softmax_row_into_sums(
                    (logits, log_penalty, shift, new, sums), (i, level, pair), top, c
                )
                objective[0, 0] += r_logits
                objective[1, 0] += r_lse
            continue
        penalties = log_penalty if by_level else row_penalty
        for i in range(start, stop):
            own = codes[i, 0] if by_level else i
            r_logits, r_penalty, r_sum, lse = _softmax_row(
                (logits, penalties, shift, new), (i, own), top, c
            )
            if per_cluster:
                _add_products(objective[0], new[i], logits[i])
                _add_row_scaled(objective[1], new[i], np.float64(lse))
                if not by_level:
                    _add_products(objective[2], new[i], row_penalty[i])
            else:
                objective[0, 0] += r_logits
                objective[1, 0] += lse * r_sum
                if not by_level:
                    objective[2, 0] += r_penalty
            for v in range(codes.shape[1]):
                level = codes[i, v]
                _add_row(sums[level], new[i])
                if with_next:
                    _add_row(sums[n_levels * (1 + next_block[i]) + level], new[i])
