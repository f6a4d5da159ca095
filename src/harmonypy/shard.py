"""One rank of a multi-machine Harmony run, for ``torchrun``.

Each rank reads its own range of rows of the embedding (an ``.npy`` file,
memory-mapped, or ``obsm[--basis]`` of an ``.h5ad``: only those rows are read)
and of the metadata (a table, or the ``.h5ad``'s ``obs``), joins the
group that ``torchrun`` set up (NCCL when this rank has a GPU, else gloo),
runs ``run_harmony(..., distributed=True)`` and writes its rows of the
corrected embedding to ``OUTDIR/part-RANK-of-WORLD.npy`` (through a temporary
file renamed into place). Rank 0 also writes ``OUTDIR/summary.json``: the
row range of every part, iterations, convergence and objectives.

Example, two machines with four processes each (run on both, with HOST the
first machine's address reachable from the second)::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m harmonypy.shard \\
        pcs.npy meta.tsv --vars donor -o corrected/ --algorithm harmony2

The inputs must be readable at the same path on every machine (a shared
filesystem, or copies). ``np.concatenate`` of the parts in rank order gives
the corrected embedding in the input's row order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def _parser() -> argparse.ArgumentParser:
    from harmonypy.cli import _add_harmony_options, _names

    p = argparse.ArgumentParser(
        prog="python -m harmonypy.shard",
        description="One rank of a distributed Harmony run (launch with torchrun).")
    p.add_argument("embedding", metavar="EMBEDDING",
                   help="cells x PCs, .npy; or an .h5ad (obsm[--basis], batch columns in obs)")
    p.add_argument("meta", metavar="META", nargs="?",
                   help="metadata table, one row per cell, same order (not for .h5ad)")
    p.add_argument("--basis", default="X_pca", metavar="KEY",
                   help=".h5ad input: obsm key of the embedding (default: X_pca)")
    p.add_argument("--vars", dest="vars_use", type=_names, required=True,
                   metavar="COL[,COL...]", help="batch column(s)")
    p.add_argument("-o", "--outdir", required=True, metavar="OUTDIR",
                   help="folder for part-RANK-of-WORLD.npy and summary.json")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="auto: NCCL when every process on each machine has a GPU of its "
                        "own (--nproc-per-node <= GPUs), else gloo on the CPUs")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress (rank 0)")
    _add_harmony_options(p)
    return p


def _npy_rows(path, meta_path, world: int, rank: int):
    """The row ranges of every rank, and this rank's rows of an ``.npy``
    (memory-mapped) and of the metadata table."""
    from harmonypy._io import read_meta
    from harmonypy._launch import shard_bounds

    cells = np.load(path, mmap_mode="r", allow_pickle=False)
    bounds = shard_bounds(cells.shape[0], world)
    start, stop = bounds[rank]
    meta = read_meta(meta_path).frame
    if len(meta) != cells.shape[0]:
        raise ValueError(f"{meta_path} has {len(meta):,} rows, {path} {cells.shape[0]:,}: "
                         f"expected one metadata row per cell")
    return bounds, np.ascontiguousarray(cells[start:stop]), meta.iloc[start:stop]


def _h5ad_rows(path, basis: str, world: int, rank: int):
    """This rank's rows of ``obsm[basis]`` (read from the file, not the whole
    matrix) and of ``obs`` of an ``.h5ad``."""
    from harmonypy._anndata import require_anndata
    from harmonypy._launch import shard_bounds

    require_anndata()
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        obsm = f.get("obsm")
        if obsm is None or basis not in obsm or not isinstance(obsm[basis], h5py.Dataset):
            available = ", ".join(repr(k) for k in (obsm or {}).keys()) or "none"
            raise KeyError(f"{path}: no dense obsm[{basis!r}]; available obsm keys: "
                           f"{available}")
        node = obsm[basis]
        bounds = shard_bounds(node.shape[0], world)
        start, stop = bounds[rank]
        cells = node[start:stop]
        obs = read_elem(f["obs"])
    return bounds, np.ascontiguousarray(cells), obs.iloc[start:stop]


def main(argv=None) -> int:
    import torch
    import torch.distributed as dist

    from harmonypy._harmony import run_harmony
    from harmonypy._io import OutputFiles, file_format, write_array
    from harmonypy.cli import harmony_kwargs

    args = _parser().parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("harmonypy.shard: RANK and WORLD_SIZE are not set: launch it with "
                         "torchrun (see the module's help)")
    fmt = file_format(args.embedding)
    if fmt not in ("npy", "h5ad"):
        raise SystemExit(f"harmonypy.shard: EMBEDDING must be an .npy or .h5ad file (each "
                         f"rank reads only its rows), got {args.embedding}")
    if (fmt == "npy") != (args.meta is not None):
        raise SystemExit("harmonypy.shard: META is needed with an .npy embedding and not "
                         "used with .h5ad (the batch columns come from obs)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # One backend for the whole group: NCCL only when every process of this
    # machine has a GPU of its own (and, as torchrun runs the same command on
    # every machine, on the others too); a mix of backends would hang.
    wants_gpu = args.device is None or str(args.device).startswith("cuda")
    if args.backend == "nccl" and local_world > gpus:
        raise SystemExit(f"harmonypy.shard: --backend nccl needs a GPU per process: "
                         f"{local_world} processes on this machine, {gpus} GPU(s)")
    on_gpu = (args.backend == "nccl" or
              (args.backend == "auto" and wants_gpu and 0 < local_world <= gpus))
    if on_gpu:
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    elif args.device is None:
        args.device = "cpu"
    elif str(args.device).startswith("cuda"):
        raise SystemExit(f"harmonypy.shard: --device {args.device} with gloo: {local_world} "
                         f"processes on this machine but {gpus} GPU(s); run at most one "
                         f"process per GPU (--nproc-per-node), or --device cpu")
    dist.init_process_group("nccl" if on_gpu else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if fmt == "npy":
            bounds, cells, meta = _npy_rows(args.embedding, args.meta, world, rank)
        else:
            bounds, cells, meta = _h5ad_rows(args.embedding, args.basis, world, rank)
        ho = run_harmony(cells, meta, args.vars_use, distributed=True,
                         verbose=not args.quiet, **harmony_kwargs(args))
        outdir = Path(args.outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        part = outdir / f"part-{rank:05d}-of-{world:05d}.npy"
        with OutputFiles() as files:
            write_array(files.stage(part), (ho.N, ho.d), ho.numpy_dtype,
                        lambda out: ho.result(out=out))
            if rank == 0:
                summary = dict(world_size=world, backend=str(dist.get_backend()),
                               rows=[list(b) for b in bounds], n_cells=bounds[-1][1],
                               n_iter=ho.n_iter, converged=ho.converged,
                               objective_harmony=list(ho.objective_harmony),
                               kmeans_rounds=list(ho.kmeans_rounds),
                               bytes_reduced_per_rank=ho.bytes_reduced)
                files.stage(outdir / "summary.json").write_text(json.dumps(summary, indent=1))
            files.commit()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
