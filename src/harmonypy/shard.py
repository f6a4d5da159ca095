"""One rank of a multi-machine Harmony run, for ``torchrun``.

Each rank reads its own range of rows of the embedding (an ``.npy`` file,
memory-mapped, or ``obsm[--basis]`` of an ``.h5ad``: only those rows are read)
and of the metadata (a table, or the ``.h5ad``'s ``obs``), joins the
group that ``torchrun`` set up (NCCL when this rank has a GPU, else gloo),
runs ``run_harmony(..., distributed=True)`` and writes its rows of the
corrected embedding to ``OUTDIR/part-RANK-of-WORLD.npy`` (through a temporary
file renamed into place). Rank 0 also writes ``OUTDIR/manifest.json`` (world
size, every part's file, rows, size and SHA-256, the total cells, ``d`` and
dtype) and ``OUTDIR/summary.json`` (iterations, convergence, objectives).

An OUTDIR that already holds parts, a manifest or a summary is refused
before any work (every rank checks what it sees), unless ``--force``: that
removes them first, parts of any world size included, so a run never leaves
its parts beside an earlier run's.

Example, two machines with four processes each (run on both, with HOST the
first machine's address reachable from the second)::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m harmonypy.shard \\
        pcs.npy meta.tsv --vars donor -o corrected/ --algorithm harmony2

The inputs must be readable at the same path on every machine (a shared
filesystem, or copies). :func:`read_parts` reads the parts back, in the
input's row order, checked against the manifest::

    from harmonypy.shard import read_parts
    corrected = read_parts("corrected/")     # (n_cells, d)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
_FORMAT = "harmonypy shard parts"
_PART = re.compile(r"part-(\d+)-of-(\d+)\.npy")


def _parser() -> argparse.ArgumentParser:
    from harmonypy.cli.options import add_harmony_options, name_list

    p = argparse.ArgumentParser(
        prog="python -m harmonypy.shard",
        description="One rank of a distributed Harmony run (launch with torchrun).",
    )
    p.add_argument(
        "embedding",
        metavar="EMBEDDING",
        help="cells x PCs, .npy; or an .h5ad (obsm[--basis], batch columns in obs)",
    )
    p.add_argument(
        "meta",
        metavar="META",
        nargs="?",
        help="metadata table, one row per cell, same order (not for .h5ad)",
    )
    p.add_argument(
        "--basis",
        default="X_pca",
        metavar="KEY",
        help=".h5ad input: obsm key of the embedding (default: X_pca)",
    )
    p.add_argument(
        "--vars",
        dest="vars_use",
        type=name_list,
        required=True,
        metavar="COL[,COL...]",
        help="batch column(s)",
    )
    p.add_argument(
        "-o",
        "--outdir",
        required=True,
        metavar="OUTDIR",
        help="folder for part-RANK-of-WORLD.npy, manifest.json and summary.json; "
        "refused when it holds those of an earlier run (see --force)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="first remove an earlier run's parts (of any world size), manifest "
        "and summary from OUTDIR",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "gloo", "nccl"),
        default="auto",
        help="auto: NCCL when every process on each machine has a GPU of its "
        "own (--nproc-per-node <= GPUs), else gloo on the CPUs",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress (rank 0)")
    add_harmony_options(p)
    return p


def _npy_rows(path, meta_path, world: int, rank: int):
    """The row ranges of every rank, and this rank's rows of an ``.npy``
    (memory-mapped) and of the metadata table."""
    from harmonypy.distributed.launch import shard_bounds
    from harmonypy.io.readers import read_meta

    cells = np.load(path, mmap_mode="r", allow_pickle=False)
    bounds = shard_bounds(cells.shape[0], world)
    start, stop = bounds[rank]
    meta = read_meta(meta_path).frame
    if len(meta) != cells.shape[0]:
        raise ValueError(
            f"{meta_path} has {len(meta):,} rows, {path} {cells.shape[0]:,}: "
            f"expected one metadata row per cell"
        )
    return bounds, np.ascontiguousarray(cells[start:stop]), meta.iloc[start:stop]


def _h5ad_rows(path, basis: str, world: int, rank: int):
    """This rank's rows of ``obsm[basis]`` (read from the file, not the whole
    matrix) and of ``obs`` of an ``.h5ad``."""
    from harmonypy._optional import require_anndata
    from harmonypy.distributed.launch import shard_bounds

    require_anndata()
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        obsm = f.get("obsm")
        if obsm is None or basis not in obsm or not isinstance(obsm[basis], h5py.Dataset):
            available = ", ".join(repr(k) for k in (obsm or {}).keys()) or "none"
            raise KeyError(f"{path}: no dense obsm[{basis!r}]; available obsm keys: {available}")
        node = obsm[basis]
        bounds = shard_bounds(node.shape[0], world)
        start, stop = bounds[rank]
        cells = node[start:stop]
        obs = read_elem(f["obs"])
    return bounds, np.ascontiguousarray(cells), obs.iloc[start:stop]


def main(argv=None) -> int:
    import torch.distributed as dist

    from harmonypy.cli.options import harmony_kwargs
    from harmonypy.engine.run import run_harmony
    from harmonypy.io.formats import file_format

    args = _parser().parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit(
            "harmonypy.shard: RANK and WORLD_SIZE are not set: launch it with "
            "torchrun (see the module's help)"
        )
    fmt = file_format(args.embedding)
    if fmt not in ("npy", "h5ad"):
        raise SystemExit(
            f"harmonypy.shard: EMBEDDING must be an .npy or .h5ad file (each "
            f"rank reads only its rows), got {args.embedding}"
        )
    if (fmt == "npy") != (args.meta is not None):
        raise SystemExit(
            "harmonypy.shard: META is needed with an .npy embedding and not "
            "used with .h5ad (the batch columns come from obs)"
        )
    on_gpu = _place_process(args)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        outdir = Path(args.outdir)
        _prepare_outdir(outdir, force=args.force, rank=rank, world=world)
        if fmt == "npy":
            bounds, cells, meta = _npy_rows(args.embedding, args.meta, world, rank)
        else:
            bounds, cells, meta = _h5ad_rows(args.embedding, args.basis, world, rank)
        ho = run_harmony(
            cells,
            meta,
            args.vars_use,
            distributed=True,
            verbose=not args.quiet,
            **harmony_kwargs(args),
        )
        _write_parts(
            outdir, ho, rank=rank, world=world, bounds=bounds, backend=str(dist.get_backend())
        )
    finally:
        dist.destroy_process_group()
    return 0


def _place_process(args: argparse.Namespace) -> bool:
    """Whether this process runs on its machine's GPU ``LOCAL_RANK`` (NCCL) or on
    the CPU (gloo); sets ``args.device`` to match.

    One backend for the whole group: NCCL only when every process of this
    machine has a GPU of its own (and, as torchrun runs the same command on
    every machine, on the others too); a mix of backends would hang.
    """
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wants_gpu = args.device is None or str(args.device).startswith("cuda")
    if args.backend == "nccl" and local_world > gpus:
        raise SystemExit(
            f"harmonypy.shard: --backend nccl needs a GPU per process: "
            f"{local_world} processes on this machine, {gpus} GPU(s)"
        )
    on_gpu = args.backend == "nccl" or (
        args.backend == "auto" and wants_gpu and 0 < local_world <= gpus
    )
    if on_gpu:
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    elif args.device is None:
        args.device = "cpu"
    elif str(args.device).startswith("cuda"):
        raise SystemExit(
            f"harmonypy.shard: --device {args.device} with gloo: {local_world} "
            f"processes on this machine but {gpus} GPU(s); run at most one "
            f"process per GPU (--nproc-per-node), or --device cpu"
        )
    return on_gpu


def _part_name(rank: int, world: int) -> str:
    return f"part-{rank:05d}-of-{world:05d}.npy"


def _earlier_outputs(outdir: Path) -> list[str]:
    """The files of an earlier run in ``outdir`` (parts of any world size,
    manifest, summary, and temporary files a killed run left)."""
    if not outdir.is_dir():
        return []
    return sorted(
        p.name
        for p in outdir.iterdir()
        if _PART.fullmatch(p.name)
        or p.name in (MANIFEST, "summary.json")
        or re.fullmatch(
            r"\.(part-\d+-of-\d+\.npy|manifest\.json|summary\.json)"
            r"\..*\.tmp.*",
            p.name,
        )
    )


def _all_ok(verdict, *, rank: int, world: int) -> list:
    """Gather every rank's ``("ok", value)`` or ``("error", message)``; raise on
    every rank when any failed (naming it), else return the values in rank order."""
    import torch.distributed as dist

    verdicts: list[Any] = [None] * world
    dist.all_gather_object(verdicts, verdict)
    failed = [(r, v[1]) for r, v in enumerate(verdicts) if v[0] == "error"]
    if failed:
        r, message = failed[0]
        raise SystemExit(f"harmonypy.shard: rank {r} of {world}: {message}")
    return [v[1] for v in verdicts]


def _prepare_outdir(outdir: Path, *, force: bool, rank: int, world: int) -> None:
    """Refuse (every rank) an OUTDIR holding an earlier run's outputs, or with
    ``force`` remove them, before any work; then all ranks wait for each other,
    so no rank removes what another has written."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        earlier = _earlier_outputs(outdir)
        if earlier and not force:
            raise FileExistsError(
                f"{outdir} already holds an earlier run's outputs ({', '.join(earlier[:4])}"
                f"{', ...' if len(earlier) > 4 else ''}; {len(earlier)} in all): choose "
                f"another --outdir, or pass --force to remove them first"
            )
        for name in earlier:
            (outdir / name).unlink(missing_ok=True)  # another rank may share the folder
        verdict: tuple[str, Any] = ("ok", None)
    except Exception as err:  # noqa: BLE001 - every rank raises it below
        verdict = ("error", str(err))
    _all_ok(verdict, rank=rank, world=world)


def _write_parts(outdir: Path, ho, *, rank: int, world: int, bounds: list, backend: str) -> None:
    """Write this rank's part; rank 0 then writes the manifest and the summary,
    once every rank's part is in place (a failed rank stops every rank)."""
    from harmonypy.io.outputs import OutputFiles
    from harmonypy.io.writers import write_array

    try:
        part = outdir / _part_name(rank, world)
        with OutputFiles() as files:
            staged = files.stage(part)
            write_array(staged, (ho.N, ho.d), ho.numpy_dtype, lambda out: ho.result(out=out))
            entry = dict(
                file=part.name,
                rank=rank,
                rows=list(bounds[rank]),
                bytes=staged.stat().st_size,
                sha256=_sha256(staged),
            )
            files.commit()
        verdict: tuple[str, Any] = ("ok", entry)
    except Exception as err:  # noqa: BLE001 - every rank raises it below
        verdict = ("error", f"could not write {part}: {type(err).__name__}: {err}")
    entries = _all_ok(verdict, rank=rank, world=world)
    if rank != 0:
        return
    manifest = dict(
        format=_FORMAT,
        version=1,
        world_size=world,
        n_cells=bounds[-1][1],
        d=ho.d,
        dtype=np.dtype(ho.numpy_dtype).name,
        parts=entries,
    )
    summary = dict(
        world_size=world,
        backend=backend,
        rows=[list(b) for b in bounds],
        n_cells=bounds[-1][1],
        n_iter=ho.n_iter,
        converged=ho.converged,
        objective_harmony=list(ho.objective_harmony),
        kmeans_rounds=list(ho.kmeans_rounds),
        bytes_reduced_per_rank=ho.bytes_reduced,
    )
    with OutputFiles() as files:
        files.stage(outdir / "summary.json").write_text(json.dumps(summary, indent=1))
        files.stage(outdir / MANIFEST).write_text(json.dumps(manifest, indent=1))
        files.commit()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_parts(folder, *, verify: bool = True) -> np.ndarray:
    """The corrected embedding a ``torchrun -m harmonypy.shard`` run wrote to ``folder``.

    Reads ``folder/manifest.json`` and the parts it lists, in rank order
    (the input's row order), after checking them against it: every part
    present, no other ``part-*.npy`` beside them, each part's rows, ``d``,
    dtype, size and (``verify``) SHA-256 as recorded. So parts of an earlier
    run, a missing or truncated part, or a part rewritten since, are refused
    instead of being concatenated into a wrong result.

    Parameters
    ----------
    folder : str or Path
        The run's ``--outdir``.
    verify : bool, default True
        Check each part's SHA-256 (reads every part twice; sizes, shapes and
        dtypes are always checked).

    Returns
    -------
    ndarray (n_cells, d)

    Raises
    ------
    FileNotFoundError
        No manifest (a run that did not finish, or an older harmonypy), or a
        part it lists is missing; the message names the folder and the file.
    ValueError
        An unreadable manifest, a part that does not match it (rows, size,
        digest, shape, dtype), or a part the manifest does not list.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    listed = {entry["file"] for entry in manifest["parts"]}
    extra = sorted(
        p.name for p in folder.iterdir() if _PART.fullmatch(p.name) and p.name not in listed
    )
    if extra:
        raise ValueError(
            f"{folder}: part(s) {', '.join(extra)} are not in {MANIFEST} "
            f"(a run of {manifest['world_size']} process(es)): left by another "
            f"run? Remove them, or rerun with --force"
        )
    out = np.empty((manifest["n_cells"], manifest["d"]), dtype=np.dtype(manifest["dtype"]))
    for entry in manifest["parts"]:
        start, stop = entry["rows"]
        out[start:stop] = _checked_part(folder, entry, manifest, verify=verify)
    return out


def _read_manifest(folder: Path) -> dict:
    """``folder``'s manifest, its fields checked; errors name the folder."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (the --outdir of a harmonypy.shard run)")
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir() if _PART.fullmatch(p.name))
        raise FileNotFoundError(
            f"{folder}: no {MANIFEST}, so its parts ({', '.join(found[:4]) or 'none'}"
            f"{', ...' if len(found) > 4 else ''}) cannot be checked: the run did not "
            f"finish (rank 0 writes it last), or an older harmonypy wrote them"
        )
    try:
        manifest = json.loads(path.read_text())
        parts = manifest["parts"]
        ok = (
            manifest.get("format") == _FORMAT
            and isinstance(parts, list)
            and len(parts) == manifest["world_size"]
            and manifest["n_cells"] >= 0
            and manifest["d"] >= 1
            and np.dtype(manifest["dtype"]).kind == "f"
            and [p["rank"] for p in parts] == list(range(len(parts)))
            and all(_PART.fullmatch(p["file"]) for p in parts)
        )
        rows = [tuple(p["rows"]) for p in parts]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a readable harmonypy.shard manifest ({err})") from None
    edges = [0] + [stop for _, stop in rows]
    if not ok or [start for start, _ in rows] != edges[:-1] or edges[-1] != manifest["n_cells"]:
        raise ValueError(
            f"{path}: not a valid harmonypy.shard manifest (format, world size, "
            f"ranks, part names, or row ranges that do not cover 0..n_cells in "
            f"order)"
        )
    return manifest


def _checked_part(folder: Path, entry: dict, manifest: dict, *, verify: bool) -> np.ndarray:
    """One part, memory-mapped, after checking it against its manifest entry."""
    path = folder / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}: part {entry['file']} (rank {entry['rank']} of "
            f"{manifest['world_size']}) is missing"
        )
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ValueError(
            f"{folder}: part {entry['file']} has {size:,} bytes, the manifest "
            f"says {entry['bytes']:,}: truncated or replaced since the run"
        )
    if verify and _sha256(path) != entry["sha256"]:
        raise ValueError(
            f"{folder}: part {entry['file']} does not match the SHA-256 in "
            f"{MANIFEST}: rewritten since the run (by another run?)"
        )
    try:
        part = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: part {entry['file']} is not a readable .npy ({err})") from None
    start, stop = entry["rows"]
    expected = (stop - start, manifest["d"])
    if part.shape != expected or part.dtype != np.dtype(manifest["dtype"]):
        raise ValueError(
            f"{folder}: part {entry['file']} holds {part.shape} {part.dtype}, the "
            f"manifest says {expected} {manifest['dtype']}"
        )
    return part


if __name__ == "__main__":
    sys.exit(main())
