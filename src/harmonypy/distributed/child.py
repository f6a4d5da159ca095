"""One process of a group started by :func:`harmonypy.distributed.launch.run_in_processes`.

The launcher starts each process as ``python -c`` running :func:`child_main`
with the descriptors of its payload (a pickled dict), a report pipe, and the
input and output arrays in shared memory
(:mod:`harmonypy.distributed.shared_memory`). The process dies with the
launcher, joins the ``torch.distributed`` group (:func:`join_group`), runs
``run_harmony(..., distributed=True)`` on its shard, writes its rows of the
result in place and reports back through the pipe.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
import traceback
import warnings

import numpy as np
import torch

from harmonypy.distributed.shared_memory import mapped
from harmonypy.engine.convergence import ConvergenceWarning
from harmonypy.engine.run import run_harmony

__all__ = ["child_main", "join_group"]


def child_main(argv: list) -> int:
    """One process of the group (the launcher's ``python -c`` line runs it); its exit status.

    ``argv``: the launcher's pid and the descriptors of the payload, the
    report pipe, the input and the output. Reports ``("joined",)`` once in
    the group, then ``("done", summary)`` or ``("error", kind, message,
    traceback)``.
    """
    parent, payload_fd, report_fd, cells_fd, out_fd = map(int, argv)
    _die_with(parent)
    with os.fdopen(report_fd, "wb") as report:
        try:
            with os.fdopen(payload_fd, "rb") as handoff:
                payload = pickle.load(handoff)
            summary = _run_rank(payload, cells_fd=cells_fd, out_fd=out_fd, report=report)
        except BaseException as err:  # noqa: BLE001 - reported to the launcher
            _send(report, ("error", type(err).__name__, str(err), traceback.format_exc()))
            return 1
        _send(report, ("done", summary))
    return 0


def _send(report, message: tuple) -> None:
    pickle.dump(message, report, protocol=pickle.HIGHEST_PROTOCOL)
    report.flush()


def _die_with(parent: int) -> None:
    """End this process when the launcher ``parent`` ends, however it ends."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            if libc.prctl(pr_set_pdeathsig, signal.SIGKILL) == 0:
                if os.getppid() != parent:  # it ended before the request took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):  # pragma: no cover - no prctl
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="harmonypy-parent-watch", daemon=True).start()


def _run_rank(payload: dict, *, cells_fd: int, out_fd: int, report) -> dict | None:
    """Join the group, run this rank's shard, write its rows; rank 0's summary."""
    import torch.distributed as dist

    rank, options = payload["rank"], payload["options"]
    torch.set_num_threads(options["ncores"])  # the process's share of the CPUs
    if payload["backend"] == "nccl":
        torch.cuda.set_device(rank)
        options = dict(options, device=f"cuda:{rank}")
    shape, dtype = payload["shape"], np.dtype(payload["dtype"])
    cells = mapped(cells_fd, shape, dtype, writable=False)
    corrected = mapped(out_fd, shape, dtype)
    join_group(
        rank=rank,
        world_size=payload["world_size"],
        port=payload["port"],
        backend=payload["backend"],
        timeout=payload["start_timeout"],
    )
    _send(report, ("joined",))
    try:
        start, stop = payload["bounds"][rank]
        began = time.perf_counter()
        with warnings.catch_warnings():  # the launcher warns once, in the caller's process
            warnings.simplefilter("ignore", ConvergenceWarning)
            ho = run_harmony(
                cells[start:stop], payload["meta"], payload["vars_use"], distributed=True, **options
            )
        ho.result(out=corrected[start:stop])
        return (
            None
            if rank
            else dict(
                n_iter=ho.n_iter,
                converged=ho.converged,
                stop_reason=ho.stop_reason,
                objective_harmony=list(ho.objective_harmony),
                kmeans_rounds=list(ho.kmeans_rounds),
                K=ho.K,
                algorithm=ho.algorithm,
                bytes=ho.bytes_reduced,
                batch_levels=list(ho.batch_levels),
                seconds=time.perf_counter() - began,
            )
        )
    finally:
        dist.destroy_process_group()


def join_group(*, rank: int, world_size: int, port: int, backend: str, timeout: float) -> None:
    """Join (rank 0: host) the group on ``127.0.0.1:port``, waiting at most
    ``timeout`` seconds for the others to arrive.

    The store's timeout bounds the forming; the collectives keep
    ``torch.distributed``'s 30 minutes (a slow step on one rank is not a
    failure).

    Raises
    ------
    RuntimeError
        The group did not form in time: names the rank, the port and the timeout.
    """
    from datetime import timedelta

    import torch.distributed as dist

    try:
        store = dist.TCPStore(
            "127.0.0.1", port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout)
        )
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(minutes=30)
        )
    except RuntimeError as err:  # torch's DistStoreError and timeouts are RuntimeErrors
        raise RuntimeError(
            f"rank {rank} of {world_size} could not form the process group on "
            f"127.0.0.1:{port} within {timeout:g} s (another process did not start or "
            f"stopped, or the port was taken; HARMONYPY_START_TIMEOUT sets the wait): "
            f"{' '.join(str(err).split())[:300]}"
        ) from err
