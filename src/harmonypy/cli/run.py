"""``harmonypy run``: integrate an embedding and write the corrected one."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from harmonypy.adapters.anndata import check_distinct_bases
from harmonypy.cli.inputs import (
    check_columns,
    check_plot_pcs,
    note_position,
    read_tables,
    refuse_name_options,
)
from harmonypy.cli.options import (
    EMBEDDING_HELP,
    HARMONY_OPTION_NAMES,
    PROG,
    TABLE_OUTPUTS,
    HelpFormatter,
    add_common,
    add_force,
    add_harmony_options,
    add_name_options,
    add_quiet,
    convergence_noted,
    harmony_kwargs,
    meta_help,
    name_list,
    note,
    pc_pair,
)
from harmonypy.cli.results import embedding_figure, outcome, replaced
from harmonypy.io.formats import FORMATS_HELP, file_format
from harmonypy.io.outputs import OutputSpec, check_outputs, write_outputs
from harmonypy.io.readers import read_h5ad
from harmonypy.io.tables import Table
from harmonypy.io.writers import save_figure, write_array, write_h5ad_copy, write_table

#: Library parameter names in messages, as the options of run that set them.
OPTION_NAMES = HARMONY_OPTION_NAMES


def add_run(commands) -> None:
    """Add ``run`` to the subcommands: integrate an embedding."""
    p = commands.add_parser(
        "run",
        formatter_class=HelpFormatter,
        help="integrate an embedding",
        description=f"Integrate EMBEDDING (cells x PCs) over the batch columns of META and "
        f"write the corrected embedding to OUT. Formats: {FORMATS_HELP}, from "
        f"the extension. With an .h5ad input, META is not needed: the embedding "
        f"is obsm[--basis] and the batch columns come from obs.",
        epilog=f"example: {PROG} run pcs.tsv.gz meta.tsv.gz --vars donor -o pcs_harmony.tsv.gz",
    )
    _add_run_files(p)
    _add_run_plot_options(p)
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="run as N processes of one torch.distributed group on this machine, "
        "each on a contiguous shard of the cells (gloo on CPUs, NCCL when "
        "every process has a GPU); --threads is then per process (default: "
        "the CPUs divided among them). For several machines see "
        "docs/distributed.md (default: 1)",
    )
    add_force(p)
    add_quiet(p)
    add_name_options(p)
    add_harmony_options(p)
    add_common(p)
    p.set_defaults(handler=command_run)


def _add_run_files(p: argparse.ArgumentParser) -> None:
    """``run``'s inputs and output: the embedding, its metadata, the batch columns, the
    output file and, for .h5ad, the obsm keys."""
    p.add_argument("embedding", metavar="EMBEDDING", help=EMBEDDING_HELP)
    p.add_argument(
        "meta", metavar="META", nargs="?", help=meta_help("EMBEDDING", "not needed for .h5ad")
    )
    p.add_argument(
        "--vars",
        dest="vars_use",
        type=name_list,
        required=True,
        metavar="COL[,COL...]",
        help="batch column(s) to integrate over",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="output file; .h5ad input may be written to .h5ad or a table. "
        "Written to a temporary file in the same folder and renamed into "
        "place when complete",
    )
    p.add_argument(
        "--basis", default="X_pca", metavar="KEY", help=".h5ad input: obsm key of the embedding"
    )
    p.add_argument(
        "--adjusted-basis",
        default="X_pca_harmony",
        metavar="KEY",
        help=".h5ad input: obsm key for the corrected embedding (must differ from --basis)",
    )


def _add_run_plot_options(p: argparse.ArgumentParser) -> None:
    """``run``'s before/after plot: its file, colours and PCs."""
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the embedding before and after Harmony (any format "
        "matplotlib writes: .png, .pdf, .svg, ...)",
    )
    p.add_argument(
        "--color",
        type=name_list,
        metavar="COL[,COL...]",
        help="columns to colour the --plot by (default: the --vars columns)",
    )
    p.add_argument(
        "--plot-pcs",
        type=pc_pair,
        default=(1, 2),
        metavar="I,J",
        help="PCs on the axes of --plot (1-based; batch effects often show "
        "in later PCs, e.g. 1,4) (default: 1,2)",
    )


def command_run(args: argparse.Namespace) -> int:
    """``harmonypy run``: integrate a file and write the result."""
    if args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if file_format(args.embedding) == "h5ad":
        return _run_h5ad(args)
    if args.meta is None:
        raise ValueError("META (the metadata table) is required unless EMBEDDING is .h5ad")
    check_outputs(
        [
            OutputSpec("-o/--output", args.output, TABLE_OUTPUTS),
            OutputSpec("--plot", args.plot, None),
        ],
        {"EMBEDDING": args.embedding, "META": args.meta},
        force=args.force,
    )
    embedding, meta = read_tables(args)
    source = f"the metadata {args.meta}"
    check_columns(meta, args.vars_use, "--vars", source)
    check_columns(meta, args.color or [], "--color", source)
    check_plot_pcs(args, embedding.frame.shape[1])
    start = time.perf_counter()
    ho = _integrate(args, embedding.frame.to_numpy(), meta)
    elapsed = time.perf_counter() - start
    write_output, figure = _result_writer(args, ho, embedding, meta)
    files = write_outputs(
        [(args.output, write_output), (args.plot, lambda path: save_figure(figure, path))]
    )
    note(
        args,
        f"wrote {args.output}{replaced(files, args.output)}: {ho.N:,} cells x "
        f"{ho.d} PCs; {outcome(ho)} in {elapsed:.1f} s",
    )
    if args.plot:
        note(args, f"wrote {args.plot}{replaced(files, args.plot)}")
    note_position(args)
    return 0


def _result_writer(args: argparse.Namespace, ho: Any, embedding: Table, meta: pd.DataFrame):
    """``(write_output, figure)``: what writes ``run``'s result to a path, and the
    before/after figure (None without ``--plot``)."""
    if file_format(args.output) == "npy" and not args.plot:
        # Numbers only: written straight from the engine into the memory-mapped
        # file, chunk by chunk, without a full copy of the result in memory.
        def write_output(path):
            write_array(path, (ho.N, ho.d), ho.numpy_dtype, lambda out: ho.result(out=out))

        figure = None
    else:
        corrected = Table(
            pd.DataFrame(
                ho.result(),
                index=embedding.frame.index,
                columns=[f"{c}_harmony" for c in embedding.frame.columns],
            ),
            embedding.has_names,
        )

        def write_output(path):
            write_table(corrected, path)

        figure = (
            embedding_figure(
                embedding.frame, corrected.frame, meta, args.color or args.vars_use, args.plot_pcs
            )
            if args.plot
            else None
        )
    return write_output, figure


def _integrate(args: argparse.Namespace, cells, meta: pd.DataFrame) -> Any:
    """Harmony over ``cells`` (cells x PCs) in this process, or in ``--nproc``
    processes; returns the run (a ``Harmony`` or the launcher's gathered run)."""
    from harmonypy.engine.run import run_harmony

    ho: Any  # a Harmony, or the launcher's GatheredRun (the same attributes here)
    if args.nproc > 1:
        from harmonypy.distributed.launch import run_in_processes

        with convergence_noted(args):
            ho = run_in_processes(
                cells,
                meta,
                args.vars_use,
                args.nproc,
                verbose=not args.quiet,
                **harmony_kwargs(args),
            )
        note(
            args,
            f"{args.nproc} processes ({ho.backend}), {ho.bytes_per_process:,} bytes "
            f"all-reduced by each",
        )
    else:
        with convergence_noted(args):
            ho = run_harmony(
                cells,
                meta,
                args.vars_use,
                verbose=not args.quiet,
                **harmony_kwargs(args),
            )
    return ho


def _run_h5ad(args: argparse.Namespace) -> int:
    if args.meta is not None:
        raise ValueError("META is not used with .h5ad input: the batch columns come from adata.obs")
    refuse_name_options(args)
    check_distinct_bases(args.basis, args.adjusted_basis, names=("--basis", "--adjusted-basis"))
    check_outputs(
        [
            OutputSpec("-o/--output", args.output, ("h5ad",) + TABLE_OUTPUTS),
            OutputSpec("--plot", args.plot, None),
        ],
        {"EMBEDDING": args.embedding},
        force=args.force,
    )
    # Backed: X and the layers stay on disk (an atlas's expression matrix is
    # far larger than its PCs); an .h5ad output is a copy of the input file
    # with the new obsm entry written into it.
    adata = read_h5ad(args.embedding, backed=True)
    try:
        return _run_backed_h5ad(args, adata)
    finally:
        adata.file.close()


def _run_backed_h5ad(args: argparse.Namespace, adata) -> int:
    from harmonypy.adapters.anndata import get_basis, integrate

    source = f"adata.obs of {args.embedding}"
    check_columns(adata.obs, args.vars_use, "--vars", source)
    check_columns(adata.obs, args.color or [], "--color", source)
    before = get_basis(adata, args.basis)
    check_plot_pcs(args, before.shape[1])

    start = time.perf_counter()
    with convergence_noted(args):
        ho = integrate(
            adata,
            args.vars_use,
            basis=args.basis,
            adjusted_basis=args.adjusted_basis,
            nproc=args.nproc,
            verbose=not args.quiet,
            **harmony_kwargs(args),
        )
    elapsed = time.perf_counter() - start
    corrected = adata.obsm[args.adjusted_basis]
    if file_format(args.output) == "h5ad":
        entries = dict(obsm={args.adjusted_basis: corrected}, uns={"harmony": adata.uns["harmony"]})
        write_output: Callable[[Path], None] = (  # noqa: E731
            lambda path: write_h5ad_copy(args.embedding, path, **entries)
        )
    else:
        columns = [f"PC{i + 1}_harmony" for i in range(corrected.shape[1])]
        table = Table(pd.DataFrame(corrected, index=adata.obs_names, columns=columns), True)
        write_output = lambda path: write_table(table, path)  # noqa: E731
    figure = (
        embedding_figure(before, corrected, adata.obs, args.color or args.vars_use, args.plot_pcs)
        if args.plot
        else None
    )
    files = write_outputs(
        [(args.output, write_output), (args.plot, lambda path: save_figure(figure, path))]
    )
    note(
        args,
        f"wrote {args.output}{replaced(files, args.output)} "
        f"(obsm[{args.adjusted_basis!r}]): {ho.N:,} cells x {ho.d} PCs; "
        f"{outcome(ho)} in {elapsed:.1f} s",
    )
    if args.plot:
        note(args, f"wrote {args.plot}{replaced(files, args.plot)}")
    return 0
