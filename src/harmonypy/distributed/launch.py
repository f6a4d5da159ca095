"""Run one Harmony over several local processes (``harmonypy run --nproc N``).

The launcher splits the cells into N contiguous shards, starts N fresh Python
processes, joins them in a ``torch.distributed`` group on the loopback
interface (gloo on CPUs, NCCL when every process has a GPU of its own) and
has each run ``run_harmony(..., distributed=True)`` on its shard. The
embedding and the result live in shared memory that no file name points to
(``memfd_create``, or an unlinked temporary file): the processes read their
rows of the input and write their rows of the output in place, so nothing is
pickled per cell and nothing is left in ``/dev/shm`` whatever happens.

The processes are started as ``python -c`` importing this module, not through
:mod:`multiprocessing`: they never import the caller's ``__main__`` again, so
a script that calls ``integrate(adata, key, nproc=2)`` at its top level runs
once (no ``if __name__ == "__main__":`` guard is needed), and no
``multiprocessing`` helper process (resource tracker) is started.

Stopping: the children start with SIGINT blocked, so a Ctrl-C in the
terminal (sent to the whole process group) reaches only the launcher, which
polls its children every 0.1 s. Ctrl-C, any exception in the launcher (the
CLI turns SIGTERM into one), or one child failing stops every other child:
SIGTERM, then SIGKILL after 2 s. Each child also dies with the launcher
(``PR_SET_PDEATHSIG`` on Linux, else a watchdog thread), and gives up forming
the group after ``start_timeout`` seconds (default 60,
``HARMONYPY_START_TIMEOUT``), so a sibling that died while importing never
leaves it waiting for the 30 minutes of ``torch.distributed``'s default.

For several machines, launch :mod:`harmonypy.shard` with ``torchrun`` instead
(see ``docs/distributed.md``).
"""

from __future__ import annotations

import builtins
import io
import itertools
import json
import math
import os
import pickle
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from harmonypy.distributed.shared_memory import shared_array
from harmonypy.engine import memory as _memory
from harmonypy.engine.arrays import COPY_CHUNK_ROWS
from harmonypy.engine.clustering import n_blocks_of
from harmonypy.engine.convergence import ConvergenceWarning
from harmonypy.engine.design import ColumnNotFoundError
from harmonypy.engine.options import default_clusters

#: Seconds a process waits for the others to join the group (and the default
#: of ``start_timeout``); ``HARMONYPY_START_TIMEOUT`` overrides it.
START_TIMEOUT = 60.0
_POLL_SECONDS = 0.1
#: After one process failed, how long the others may take to stop on their own
#: (a refused shard stops every rank with its own message), and how long a
#: stopped process gets between SIGTERM and SIGKILL.
_GRACE_SECONDS = 2.0

# What each child runs: SIGTERM back to its default action (ends the process;
# an ignored SIGTERM is inherited) and unblocked (the launcher blocks it, with
# SIGINT, while it starts the child), then the launcher's sys.path, then the
# child's side of the group (harmonypy.distributed.child).
_BOOT = (
    "import json, signal, sys; signal.signal(signal.SIGTERM, signal.SIG_DFL); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM]); "
    "sys.path[:] = json.loads(sys.argv[1]); "
    "from harmonypy.distributed.child import child_main; sys.exit(child_main(sys.argv[2:]))"
)


@dataclass
class GatheredRun:
    """What the processes of a launched run return, gathered in the parent.

    Mirrors the parts of :class:`harmonypy.Harmony` that callers of a whole
    run read: the corrected cells (all of them, in the input's order; also
    as ``Z_corr``, features x cells, and through :meth:`result`) and the
    run's global state, taken from rank 0. The per-cell state of the
    clustering (``R``, ``Z_cos``, ...) stays in the processes and is not
    gathered.
    """

    corrected: np.ndarray  # (N, d)
    n_iter: int
    converged: bool
    objective_harmony: list
    kmeans_rounds: list
    K: int
    algorithm: str
    world_size: int
    backend: str
    bytes_per_process: int
    batch_levels: list
    seconds: float  # rank 0's run_harmony call, without starting the processes

    @property
    def N(self) -> int:  # noqa: N802 - the Harmony object's name
        return self.corrected.shape[0]

    @property
    def d(self) -> int:
        return self.corrected.shape[1]

    @property
    def Z_corr(self) -> np.ndarray:  # noqa: N802 - the Harmony object's name
        """The corrected embedding, features x cells (d, N): a view of ``corrected``."""
        return self.corrected.T

    @property
    def numpy_dtype(self) -> np.dtype:
        return self.corrected.dtype

    def result(self, out: np.ndarray | None = None, dtype=None) -> np.ndarray:
        """The corrected cells x features, into ``out`` or as ``dtype`` when given."""
        if out is None:
            if dtype is None or np.dtype(dtype) == self.corrected.dtype:
                return self.corrected
            return self.corrected.astype(dtype)
        out[...] = self.corrected
        return out


def shard_bounds(n_cells: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous row ranges of nearly equal size, in order."""
    edges = np.linspace(0, n_cells, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_timeout_seconds(value=None) -> float:
    """``value`` (seconds), else ``HARMONYPY_START_TIMEOUT``, else :data:`START_TIMEOUT`.

    Raises
    ------
    ValueError
        Not a positive finite number (naming where it came from).
    """
    source = "start_timeout"
    if value is None:
        value = os.environ.get("HARMONYPY_START_TIMEOUT")
        source = "HARMONYPY_START_TIMEOUT"
    if value is None:
        return START_TIMEOUT
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{source} must be a positive number of seconds, got {value!r}")
    return seconds


def run_in_processes(
    data_mat: np.ndarray,
    meta_data: pd.DataFrame,
    vars_use,
    nproc: int,
    *,
    start_timeout: float | None = None,
    **options,
) -> GatheredRun:
    """``run_harmony`` over ``nproc`` local processes; returns the gathered run.

    Parameters
    ----------
    data_mat : ndarray (N, d), cells x features
    meta_data : DataFrame with N rows, in the same order; its index (cell
        names) names the cells in the processes' errors
    vars_use : batch columns
    nproc : int >= 1
    start_timeout : float, optional
        Seconds a process waits for the others to join the group (default
        ``HARMONYPY_START_TIMEOUT`` or 60).
    **options : run_harmony's keyword arguments (``ncores`` is per process;
        default: the CPUs divided among the processes).

    Raises
    ------
    RuntimeError or the refused rank's error type
        When any process fails; the message names the rank. The other
        processes are stopped first. On ``KeyboardInterrupt`` (or any other
        exception while waiting) every process is stopped before it propagates.
    """
    _check_launchable(options)
    seconds = start_timeout_seconds(start_timeout)
    data_mat = _checked_matrix(data_mat, meta_data, nproc)
    options, backend = _backend_options(nproc, options)
    dtype = np.float64 if options.get("dtype") in ("float64", torch.float64) else np.float32
    if options.get("check_memory", True) is not False:
        _check_group_memory(data_mat.shape, meta_data, vars_use, nproc, dtype, backend, options)
    options["ncores"] = options.get("ncores") or max(1, (os.cpu_count() or 1) // nproc)
    options.setdefault("verbose", True)
    bounds = shard_bounds(data_mat.shape[0], nproc)
    cells_fd, cells = shared_array(data_mat.shape, dtype)
    try:
        out_fd, corrected = shared_array(data_mat.shape, dtype)
    except BaseException:
        os.close(cells_fd)
        raise
    try:
        chunk = COPY_CHUNK_ROWS  # a memory-mapped input is read in chunks, never whole
        for start in range(0, data_mat.shape[0], chunk):
            cells[start : start + chunk] = data_mat[start : start + chunk]
        common = dict(
            world_size=nproc,
            port=_free_port(),
            backend=backend,
            bounds=bounds,
            shape=data_mat.shape,
            dtype=np.dtype(dtype).str,
            vars_use=vars_use,
            options=options,
            start_timeout=seconds,
        )
        payloads = [
            dict(common, rank=rank, meta=_meta_rows(meta_data, vars_use, *bounds[rank]))
            for rank in range(nproc)
        ]
        summary = _run_group(payloads, (cells_fd, out_fd))
    finally:
        os.close(cells_fd)
        os.close(out_fd)
    if summary["stop_reason"] == "max_iter_harmony":
        warnings.warn(
            f"Harmony did not converge in {summary['n_iter']} iteration(s); raise max_iter_harmony",
            ConvergenceWarning,
            stacklevel=2,
        )
    return GatheredRun(
        corrected=corrected,
        n_iter=summary["n_iter"],
        converged=summary["converged"],
        objective_harmony=summary["objective_harmony"],
        kmeans_rounds=summary["kmeans_rounds"],
        K=summary["K"],
        algorithm=summary["algorithm"],
        world_size=nproc,
        backend=backend,
        bytes_per_process=summary["bytes"],
        seconds=summary["seconds"],
        batch_levels=summary["batch_levels"],
    )


def _check_launchable(options: dict) -> None:
    """Refuse a launch this platform, this PyTorch or these options cannot do."""
    if not torch.distributed.is_available():
        raise RuntimeError("--nproc needs torch.distributed, which this PyTorch build lacks")
    if os.name != "posix" or getattr(sys, "frozen", False) or not sys.executable:
        raise RuntimeError(
            "--nproc starts Python processes with inherited shared memory, "
            "which needs Linux or macOS and a Python interpreter (not a "
            "frozen executable)"
        )
    if options.get("callback") is not None:
        raise ValueError(
            "callback: not with nproc > 1 (the iterations run in other "
            "processes, which cannot call a function of this one)"
        )


def _checked_matrix(data_mat, meta_data, nproc: int) -> np.ndarray:
    """``data_mat`` as a 2-D real array (a memmap stays one) matching ``meta_data``."""
    data_mat = np.asarray(data_mat)
    if data_mat.dtype.kind not in "fiu":
        raise TypeError(
            f"data_mat must hold real numbers, got dtype {data_mat.dtype}; "
            f"expected a float or integer matrix (cells x PCs)"
        )
    if data_mat.ndim != 2 or data_mat.size == 0:
        raise ValueError(
            f"data_mat must be a non-empty 2-D matrix (cells x PCs), got shape {data_mat.shape}"
        )
    n_cells = data_mat.shape[0]
    if len(meta_data) != n_cells:
        raise ValueError(
            f"meta_data has {len(meta_data):,} rows but data_mat has {n_cells:,} "
            f"cells (rows); expected one metadata row per cell"
        )
    if nproc > n_cells:
        raise ValueError(f"nproc={nproc} is more processes than cells ({n_cells})")
    return data_mat


def _backend_options(nproc: int, options: dict) -> tuple[dict, str]:
    """The group's backend (NCCL only with a GPU per process) and the options for it."""
    device = options.get("device")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpu = device is None and gpus > 0 or str(device).startswith("cuda")
    backend = "nccl" if on_gpu and gpus >= nproc else "gloo"
    if backend == "gloo" and on_gpu:
        if device is not None:
            raise ValueError(
                f"device={device!r} with {nproc} processes needs a GPU per "
                f"process (NCCL); this machine has {gpus}: use nproc <= {gpus} "
                f"or device='cpu'"
            )
        options = dict(options, device="cpu")  # more processes than GPUs: the CPUs
    return dict(options), backend


def _meta_rows(meta_data, vars_use, start: int, stop: int):
    """Rows ``start:stop`` of the batch columns (all columns when one is missing,
    so that the process's error lists them), with their index (the cell names)."""
    keys = [vars_use] if isinstance(vars_use, str) else list(vars_use or [])
    columns = getattr(meta_data, "columns", None)
    if columns is not None and keys and all(k in columns for k in keys):
        meta_data = meta_data[keys]
    return meta_data.iloc[start:stop] if hasattr(meta_data, "iloc") else meta_data[start:stop]


# ----------------------------------------------------------- the parent side
def _run_group(payloads: list, shared_fds: tuple) -> dict:
    """Start one process per payload, wait for all; rank 0's summary.

    Whatever ends the wait (a failure, Ctrl-C, an exception raised by a
    signal handler), every process is stopped and reaped before this returns
    or raises.
    """
    procs: list[subprocess.Popen] = []
    readers: list[int] = []
    try:
        for payload in payloads:
            _spawn(payload, shared_fds, procs, readers)
        return _wait(procs, readers)
    finally:
        _stop(procs)
        for descriptor in readers:
            os.close(descriptor)


def _spawn(payload: dict, shared_fds: tuple, procs: list, readers: list) -> None:
    """Start the process of ``payload`` and append it and its report pipe.

    SIGINT and SIGTERM are blocked in this thread while the process starts
    and is recorded: the child inherits SIGINT blocked (a Ctrl-C in the
    terminal is the launcher's to handle), and a signal arriving meanwhile is
    delivered once the process is in ``procs``, where the cleanup finds it.
    """
    with tempfile.TemporaryFile() as handoff:
        pickle.dump(payload, handoff, protocol=pickle.HIGHEST_PROTOCOL)
        handoff.flush()
        handoff.seek(0)
        reader, writer = os.pipe()
        readers.append(reader)
        fds = (handoff.fileno(), writer, *shared_fds)
        argv = [
            sys.executable,
            "-c",
            _BOOT,
            json.dumps([str(p) for p in sys.path]),
            str(os.getpid()),
            *map(str, fds),
        ]
        held = _block_signals()
        try:
            procs.append(subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL))
        finally:
            os.close(writer)
            _unblock_signals(held)


def _block_signals():
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - POSIX has it
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _unblock_signals(previous) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _wait(procs: list, readers: list) -> dict:
    """Poll the processes and read their reports until all are done, or one
    failed and the others stopped too (or had ``_GRACE_SECONDS``)."""
    reports = [bytearray() for _ in procs]
    failed: list[int] = []  # ranks, in the order their failure was seen
    failed_at: float | None = None
    with selectors.DefaultSelector() as selector:
        for rank, reader in enumerate(readers):
            selector.register(reader, selectors.EVENT_READ, rank)
        while True:
            for key, _ in selector.select(timeout=_POLL_SECONDS):
                chunk = os.read(key.fd, 1 << 16)
                reports[key.data] += chunk
                if not chunk:
                    selector.unregister(key.fd)
            codes = [proc.poll() for proc in procs]
            failed += [
                rank
                for rank, code in enumerate(codes)
                if code not in (None, 0) and rank not in failed
            ]
            settled = all(code is not None for code in codes) and not selector.get_map()
            if failed and failed_at is None:
                failed_at = time.monotonic()
            if settled or failed_at is not None and time.monotonic() - failed_at > _GRACE_SECONDS:
                break
    messages = [_messages(report) for report in reports]
    if failed:
        raise _group_error(failed, codes, messages)
    done = [m[1] for m in messages[0] if m[0] == "done"]
    if not done:  # pragma: no cover - rank 0 exits 0 only after sending it
        raise RuntimeError(f"rank 0 of {len(procs)} ended without reporting its result")
    return done[0]


def _messages(report: bytes | bytearray) -> list[tuple]:
    """The messages a process sent, in order (a cut-off last one is dropped)."""
    handle, out = io.BytesIO(bytes(report)), []
    while handle.tell() < len(report):
        try:
            out.append(pickle.load(handle))
        except Exception:  # noqa: BLE001 - a process killed while writing
            break
    return out


def _stop(procs: list) -> None:
    """Stop every process still running: SIGTERM, then SIGKILL after the grace
    period (also at once if this is interrupted); reap them all."""
    try:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + _GRACE_SECONDS
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _group_error(failed: list, codes: list, messages: list) -> Exception:
    """The error for a group whose ranks ``failed`` (first failure first).

    A process killed by a signal (the OOM killer, a user) is the cause of
    the others' failures (their peer vanished), so it is named first,
    described by how it ended and whether it had joined the group. Else the
    first rank that failed with an error of its own gives the message (and,
    for a refused input, the error type: :func:`_child_error`); else the
    first that exited without a word (e.g. while importing).
    """
    world = len(codes)
    killed = [rank for rank in failed if codes[rank] is not None and codes[rank] < 0]
    for rank in [] if killed else failed:
        errors = [m for m in messages[rank] if m[0] == "error"]
        if errors:
            _, kind, message, trace = errors[-1]
            error = _child_error(f"{kind}: {message}")
            error.__cause__ = _ChildTraceback(f"rank {rank} of {world}:\n{trace}")
            return error
    rank = (killed or failed)[0]
    code = codes[rank]
    how = (
        f"was killed by signal {_signal_name(-code)}"
        if code is not None and code < 0
        else f"exited with status {code}"
    )
    joined = any(m[0] == "joined" for m in messages[rank])
    when = "during the run" if joined else "while starting (before it joined the group)"
    hint = " (the system may have run out of memory)" if code == -signal.SIGKILL else ""
    return RuntimeError(
        f"rank {rank} of {world} {how} {when}{hint}, without reporting an "
        f"error; the other processes were stopped. Anything it printed is "
        f"above"
    )


class _ChildTraceback(Exception):
    """A process's traceback, chained to the error raised in the launcher."""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


#: Errors of the package a child may report, by name (the builtins are found by name).
_PACKAGE_ERRORS = {"ColumnNotFoundError": ColumnNotFoundError}


def _child_error(text: str) -> Exception:
    """The error to raise in the parent for a child's traceback ``text``.

    Its last line is the child's exception (``Kind: message``). When a rank
    refused its input, every rank's message names it and the kind of its
    error (``rank 1 of 2 refused its input: ValueError: ...``): that kind is
    raised here too, so a bad input stays a ``ValueError`` (the CLI's exit 2)
    whichever rank's failure the launcher noticed first.
    """
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else text
    kind, _, message = last.partition(": ")
    if not message:
        kind, message = "RuntimeError", last
    refused = re.search(r"refused its input(?: \(and rank\(s\) [\d, ]+\))?: (\w+): ", message)
    name = refused.group(1) if refused else kind
    # The package's own error types are raised as themselves too (their
    # builtin bases keep `except ValueError` working in the caller).
    error = getattr(builtins, name, None) or _PACKAGE_ERRORS.get(name)
    if isinstance(error, type) and issubclass(error, Exception):
        try:
            return error(message)
        except Exception:  # noqa: BLE001 - a type that takes other arguments
            pass
    return RuntimeError(message)


#: What importing PyTorch and starting a process costs each process (measured
#: 0.25-0.3 GB on the CPU).
_PROCESS_OVERHEAD = 320 * 2**20


def _check_group_memory(shape, meta_data, vars_use, nproc, dtype, backend, options) -> None:
    """Refuse a launch whose processes would not fit in this machine's memory together.

    Each process checks its own share against the available memory, but they
    share the machine: the whole run's estimate (the same terms as one
    process over all cells), the input and output in shared memory and each
    process's start-up cost must fit at once.
    """
    n_cells, n_dims = shape
    keys = [vars_use] if isinstance(vars_use, str) else list(vars_use)
    counts = [int(meta_data[k].nunique()) for k in keys if k in meta_data.columns]
    n_clusters = options.get("nclust") or default_clusters(n_cells)
    word = np.dtype(dtype).itemsize
    size = _memory.RunSize(
        n_cells,
        n_dims,
        int(n_clusters),
        counts or [2],
        n_blocks=n_blocks_of(n_cells, options.get("block_size", 0.05)),
    )
    estimate = _memory.estimate_memory(
        size,
        dtype=torch.float64 if word == 8 else torch.float32,
        algorithm=options.get("algorithm", "harmony1"),
        device="cpu",
        copies_input=False,
    )
    engine = 0 if backend == "nccl" else estimate.peak("host")
    shared = 2 * n_cells * n_dims * word
    need = engine + shared + nproc * _PROCESS_OVERHEAD
    available = _memory.available_memory("cpu").get("host")
    if available is not None and need > available:
        raise MemoryError(
            f"{nproc} processes over {n_cells:,} cells x {n_dims} PCs need about "
            f"{_memory.format_size(need)} of memory on this machine (the engine "
            f"{_memory.format_size(engine)}, input and output in shared memory "
            f"{_memory.format_size(shared)}, {nproc} x "
            f"{_memory.format_size(_PROCESS_OVERHEAD)} to start the processes), "
            f"{_memory.format_size(available)} is available: use fewer cells per "
            f"machine (torchrun over several machines), or check_memory=False "
            f"(--no-memory-check) to try anyway"
        )
