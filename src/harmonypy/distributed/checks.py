"""The input checks of a distributed run: every process agrees, or every process stops.

:func:`distributed_inputs` runs the front end's checks (``engine/run.py``) on
each process's shard, then exchanges verdicts, settings and batch levels, so a
refused shard stops every process with an error naming the rank instead of
leaving the others waiting in a collective call.
"""

from __future__ import annotations

from harmonypy.engine import validation as val
from harmonypy.engine.design import encode_local_levels, merge_local_levels
from harmonypy.engine.options import RunOptions, design_dependent_inputs, local_inputs
from harmonypy.engine.reduce import GroupReduction, Reduction


def distributed_inputs(
    data_mat, meta_data, vars_use, options: RunOptions, reduction: GroupReduction
) -> dict:
    """:func:`~harmonypy.run_harmony`'s checks in a process group, in two rounds.

    Each process checks its own shard and encodes its batch columns; the
    processes then exchange verdicts, settings and batch levels in one
    gather. A refused shard (or settings that differ from rank 0's) stops
    every process with an error naming the rank, instead of leaving the
    others waiting in a collective call. Every process builds the same
    global design from the gathered levels; the checks that depend on it
    (and the memory check, which depends on each machine) are then
    exchanged once more. Returns what the single-process checks return,
    with rank 0's seed.
    """
    # Messages name cells as the caller counts them (rank order is the
    # gathered order): this process's first cell follows the lower ranks' cells.
    sizes = reduction.all_gather(_row_count(meta_data))
    first_row = sum(n or 0 for n in sizes[: reduction.rank])

    def check_shard():
        local = local_inputs(
            data_mat, meta_data, vars_use, options=options, first_row=first_row, min_cells=1
        )
        if reduction.backend == "nccl" and local["device"].type != "cuda":
            raise ValueError(
                f"the process group's backend is NCCL, which sums CUDA tensors, but "
                f"device={str(local['device'])!r}: pass device='cuda:N' (this process's "
                f"GPU, after torch.cuda.set_device(N)), or use a gloo group for the CPU"
            )
        levels, codes, counts = encode_local_levels(local["frame"], local["names"])
        settings = dict(
            d=int(local["cells"].shape[1]),
            dtype=str(local["dtype"]),
            device=local["device"].type,
            vars_use=list(map(str, local["names"])),
            **options.shared_settings(),
        )
        return (local, levels, codes), (settings, levels, counts)

    (local, levels, codes), shared = _checked_together(reduction, check_shard)
    reference = shared[0][0]
    for rank, (settings, _, _) in enumerate(shared[1:], start=1):
        differing = [k for k in reference if reference[k] != settings.get(k)]
        if differing:
            raise RuntimeError(
                f"distributed Harmony stopped: rank {rank} of {reduction.world_size} differs "
                f"from rank 0 in {', '.join(differing)} ("
                + "; ".join(
                    f"{k}: rank 0 {reference[k]}, rank {rank} {settings.get(k)}"
                    for k in differing[:3]
                )
                + "): every process must pass the same arguments and features"
            )
    # Deterministic on every process: the same gathered levels give the same design.
    design = merge_local_levels(
        local["names"],
        levels,
        codes,
        [lv for _, lv, _ in shared],
        [counts for _, _, counts in shared],
    )
    if design.n_total < val.MIN_CELLS:  # the same verdict on every process
        raise ValueError(
            f"Harmony needs at least {val.MIN_CELLS} cells, the {reduction.world_size} "
            f"processes hold {design.n_total} in all ("
            + ", ".join(f"rank {r}: {n}" for r, n in enumerate(sizes))
            + ")"
        )

    def check_with_design():
        checked = design_dependent_inputs(local, design, depth=4)
        return checked, checked["seed"]

    checked, seeds = _checked_together(reduction, check_with_design)
    checked["seed"] = seeds[0]  # rank 0's: None or a Generator draws one per process
    return checked


def _row_count(meta_data) -> int | None:
    """``len(meta_data)``, or None for what has no length (refused by the checks)."""
    try:
        return len(meta_data)
    except TypeError:
        return None


def _checked_together(reduction: Reduction, check):
    """Run ``check()`` (returning ``(result, shared)``) on every process and
    gather each one's ``shared`` part, in rank order. When ``check`` raises on
    any process, every process raises, naming the rank(s)
    (:func:`_raise_if_refused`), instead of the others waiting in the next
    collective call."""
    verdict: tuple
    try:
        result, shared = check()
        verdict, failure = ("ok", shared), None
    except Exception as err:  # noqa: BLE001 - raised on every process below
        result, verdict, failure = None, ("error", type(err).__name__, str(err)), err
    verdicts = reduction.all_gather(verdict)
    _raise_if_refused(verdicts, failure, reduction)
    return result, [v[1] for v in verdicts]


def _raise_if_refused(verdicts: list, failure, reduction: Reduction) -> None:
    """Raise on every process when any verdict is an error, naming the rank(s)."""
    failed = [(rank, v) for rank, v in enumerate(verdicts) if v[0] == "error"]
    if not failed:
        return
    rank, (_, kind, message) = failed[0]
    also = f" (and rank(s) {', '.join(str(r) for r, _ in failed[1:])})" if failed[1:] else ""
    text = (
        f"distributed Harmony stopped: rank {rank} of {reduction.world_size} refused "
        f"its input{also}: {kind}: {message}"
    )
    if failure is not None and rank == reduction.rank:
        try:  # the failing process keeps its error's type (ValueError, TypeError, ...)
            error = type(failure)(text)
        except Exception:  # noqa: BLE001 - a type that takes other arguments
            error = RuntimeError(text)
        raise error from failure
    raise RuntimeError(text)
