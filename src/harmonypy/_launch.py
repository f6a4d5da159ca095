"""Run one Harmony over several local processes (``harmonypy run --nproc N``).

The launcher splits the cells into N contiguous shards, starts N processes
(spawned, so nothing of the parent's state is shared by accident), joins them
in a ``torch.distributed`` group on the loopback interface (gloo on CPUs,
NCCL when every process has a GPU of its own) and has each run
``run_harmony(..., distributed=True)`` on its shard. The embedding and the
result live in shared memory: the processes read their rows of the input and
write their rows of the output in place, so nothing is pickled per cell.

For several machines, launch :mod:`harmonypy.shard` with ``torchrun`` instead
(see the README, "Beyond one machine").
"""

from __future__ import annotations

import builtins
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import pandas as pd
import torch


@dataclass
class GatheredRun:
    """What the processes of a launched run return, gathered in the parent.

    Mirrors the parts of :class:`harmonypy.Harmony` that callers of a whole
    run read: the corrected cells (all of them, in the input's order) and the
    run's global state, taken from rank 0.
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
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, cells, corrected, meta, vars_use, bounds,
            options, results):
    import torch.distributed as dist

    from harmonypy._harmony import run_harmony

    torch.set_num_threads(options["ncores"])  # the process's share of the CPUs
    if backend == "nccl":
        torch.cuda.set_device(rank)
        options = dict(options, device=f"cuda:{rank}")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(minutes=30))
    try:
        start, stop = bounds[rank]
        began = time.perf_counter()
        ho = run_harmony(cells[start:stop].numpy(), meta.iloc[start:stop], vars_use,
                         distributed=True, **options)
        ho.result(out=corrected[start:stop].numpy())
        if rank == 0:
            results.put(dict(n_iter=ho.n_iter, converged=ho.converged,
                             objective_harmony=list(ho.objective_harmony),
                             kmeans_rounds=list(ho.kmeans_rounds), K=ho.K,
                             algorithm=ho.algorithm, bytes=ho.bytes_reduced,
                             batch_levels=list(ho.batch_levels),
                             seconds=time.perf_counter() - began))
    finally:
        dist.destroy_process_group()


def run_in_processes(data_mat: np.ndarray, meta_data: pd.DataFrame, vars_use, nproc: int,
                     **options) -> GatheredRun:
    """``run_harmony`` over ``nproc`` local processes; returns the gathered run.

    Parameters
    ----------
    data_mat : ndarray (N, d), cells x features
    meta_data : DataFrame with N rows, in the same order
    vars_use : batch columns
    nproc : int >= 1
    **options : run_harmony's keyword arguments (``ncores`` is per process;
        default: the CPUs divided among the processes).

    Raises
    ------
    RuntimeError or the refused rank's error type
        When any process fails; the message names the rank.
    """
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        raise RuntimeError("--nproc needs torch.distributed, which this PyTorch build lacks")
    n_cells = data_mat.shape[0]
    if nproc > n_cells:
        raise ValueError(f"nproc={nproc} is more processes than cells ({n_cells})")
    device = options.get("device")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpu = device is None and gpus > 0 or str(device).startswith("cuda")
    backend = "nccl" if on_gpu and gpus >= nproc else "gloo"
    if backend == "gloo" and on_gpu:
        if device is not None:
            raise ValueError(f"device={device!r} with {nproc} processes needs a GPU per "
                             f"process (NCCL); this machine has {gpus}: use nproc <= {gpus} "
                             f"or device='cpu'")
        options = dict(options, device="cpu")  # more processes than GPUs: the CPUs
    dtype = np.float64 if options.get("dtype") in ("float64", torch.float64) else np.float32
    if options.get("check_memory", True) is not False:
        _check_group_memory(data_mat.shape, meta_data, vars_use, nproc, dtype, backend, options)
    torch_dtype = torch.float64 if dtype is np.float64 else torch.float32
    cells = torch.empty(data_mat.shape, dtype=torch_dtype).share_memory_()
    chunk = 65536  # a memory-mapped input is read in chunks, never whole
    for start in range(0, n_cells, chunk):
        cells[start:start + chunk] = torch.from_numpy(
            np.ascontiguousarray(data_mat[start:start + chunk], dtype=dtype))
    corrected = torch.empty(cells.shape, dtype=cells.dtype).share_memory_()
    options["ncores"] = options.get("ncores") or max(1, (os.cpu_count() or 1) // nproc)
    options.setdefault("verbose", True)
    bounds = shard_bounds(n_cells, nproc)
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = _free_port()
    try:
        mp.start_processes(_worker, args=(nproc, port, backend, cells, corrected,
                                          meta_data.reset_index(drop=True), vars_use, bounds,
                                          options, results),
                           nprocs=nproc, join=True, start_method="spawn")
    except mp.ProcessRaisedException as err:
        raise _child_error(str(err)) from None
    summary = results.get()
    return GatheredRun(corrected=corrected.numpy(), n_iter=summary["n_iter"],
                       converged=summary["converged"],
                       objective_harmony=summary["objective_harmony"],
                       kmeans_rounds=summary["kmeans_rounds"], K=summary["K"],
                       algorithm=summary["algorithm"], world_size=nproc, backend=backend,
                       bytes_per_process=summary["bytes"], seconds=summary["seconds"],
                       batch_levels=summary["batch_levels"])


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
    from harmonypy import _memory
    from harmonypy._clustering import n_blocks_of
    from harmonypy._harmony import _default_clusters

    n_cells, n_dims = shape
    keys = [vars_use] if isinstance(vars_use, str) else list(vars_use)
    counts = [int(meta_data[k].nunique()) for k in keys if k in meta_data.columns]
    n_clusters = options.get("nclust") or _default_clusters(n_cells)
    word = np.dtype(dtype).itemsize
    estimate = _memory.estimate_memory(
        n_cells, n_dims, int(n_clusters), counts or [2],
        dtype=torch.float64 if word == 8 else torch.float32,
        algorithm=options.get("algorithm", "harmony1"), device="cpu",
        n_blocks=n_blocks_of(n_cells, options.get("block_size", 0.05)), copies_input=False)
    engine = 0 if backend == "nccl" else estimate.peak("host")
    shared = 2 * n_cells * n_dims * word
    need = engine + shared + nproc * _PROCESS_OVERHEAD
    available = _memory.available_memory("cpu").get("host")
    if available is not None and need > available:
        raise MemoryError(
            f"{nproc} processes over {n_cells:,} cells x {n_dims} PCs need about "
            f"{_memory._size(need)} of memory on this machine (the engine "
            f"{_memory._size(engine)}, input and output in shared memory "
            f"{_memory._size(shared)}, {nproc} x {_memory._size(_PROCESS_OVERHEAD)} to start "
            f"the processes), {_memory._size(available)} is available: use fewer cells per "
            f"machine (torchrun over several machines), or check_memory=False "
            f"(--no-memory-check) to try anyway")


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
    error = getattr(builtins, name, None)
    if isinstance(error, type) and issubclass(error, Exception):
        try:
            return error(message)
        except Exception:  # noqa: BLE001 - a type that takes other arguments
            pass
    return RuntimeError(message)

