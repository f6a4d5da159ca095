"""``harmonypy reference build``: integrate a reference and save it for mapping."""

from __future__ import annotations

import argparse
import time
from typing import Any

from harmonypy.adapters.anndata import check_distinct_bases
from harmonypy.cli.inputs import (
    check_columns,
    note_position,
    read_tables,
    refuse_h5ad_options,
    refuse_name_options,
    subset_mask,
    take_rows,
)
from harmonypy.cli.options import (
    EMBEDDING_HELP,
    HARMONY_OPTION_NAMES,
    PROG,
    HelpFormatter,
    add_common,
    add_force,
    add_harmony_options,
    add_name_options,
    add_quiet,
    add_subset_option,
    convergence_noted,
    harmony_kwargs,
    meta_help,
    name_list,
    note,
)
from harmonypy.cli.results import outcome, replaced
from harmonypy.io.formats import FORMATS_HELP, file_format
from harmonypy.io.outputs import OutputSpec, check_outputs, write_outputs
from harmonypy.io.readers import read_embedding, read_h5ad

#: Library parameter names in messages, as the options of reference build that set them.
OPTION_NAMES = {
    **HARMONY_OPTION_NAMES,
    "loadings=None": "--no-loadings",
    "layer=KEY": "--layer KEY",
    "adjusted_basis": "--adjusted-basis",
}
REFERENCE_OUTPUTS = ("npz",)


def add_reference(commands) -> None:
    """Add ``reference`` (with its action ``build``) to the subcommands."""
    p = commands.add_parser(
        "reference",
        formatter_class=HelpFormatter,
        help="build a reference to map new cells onto (reference build)",
        description="Reference mapping (Symphony): integrate once, keep the reference in a "
        "file, map new cells onto it with 'harmonypy map'.",
        epilog=f"example: {PROG} reference build pcs.tsv.gz meta.tsv.gz --vars donor "
        f"--labels cell_type -o ref.npz",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = actions.add_parser(
        "build",
        formatter_class=HelpFormatter,
        help="run Harmony on a reference and save it for mapping",
        description=f"Integrate EMBEDDING (cells x PCs) over the batch columns of META, as "
        f"'{PROG} run' does, and save what mapping needs as a reference file "
        f"(.npz, see docs/mapping.md). Without --vars the cells are one batch: "
        f"they are clustered (Symphony's buildReference(vars = NULL)) and not "
        f"corrected, and META is needed only for --labels and --subset. Formats: "
        f"{FORMATS_HELP}, from the extension. With an .h5ad input, META is not "
        f"needed (obs has the columns) and the PCA loadings and per-gene scaling "
        f"are kept too, so that queries can be mapped from their genes.",
        epilog=f"example: {PROG} reference build pcs.tsv.gz meta.tsv.gz --vars donor "
        f"--labels cell_type -o ref.npz",
    )
    _add_build_files(b)
    _add_build_h5ad_options(b)
    add_force(b)
    add_quiet(b)
    add_name_options(b)
    add_harmony_options(b)
    add_common(b)
    b.set_defaults(handler=command_reference_build)


def _add_build_files(b: argparse.ArgumentParser) -> None:
    """``reference build``'s inputs and output: the embedding, its metadata, the batch and
    label columns, the subset, whether cells are kept, the output file."""
    b.add_argument("embedding", metavar="EMBEDDING", help=EMBEDDING_HELP)
    b.add_argument(
        "meta", metavar="META", nargs="?", help=meta_help("EMBEDDING", "not needed for .h5ad")
    )
    b.add_argument(
        "--vars",
        dest="vars_use",
        type=name_list,
        metavar="COL[,COL...]",
        help="batch column(s) to integrate over (default: none, the cells are one "
        "batch; of the Harmony parameters only --nclust, --sigma, --seed, "
        "--device and --dtype apply then)",
    )
    b.add_argument(
        "--labels",
        type=name_list,
        metavar="COL[,COL...]",
        help="columns of META to keep with the reference cells, for label transfer "
        "('harmonypy map --labels')",
    )
    add_subset_option(b, "the reference")
    b.add_argument(
        "--no-cells",
        dest="keep_cells",
        action="store_false",
        help="keep only what mapping needs (a file of O(clusters x PCs^2)), not the "
        "corrected reference cells: no label transfer then",
    )
    b.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="REF.npz",
        help="reference file to write (.npz); written to a temporary file in the "
        "same folder and renamed into place when complete",
    )


def _add_build_h5ad_options(b: argparse.ArgumentParser) -> None:
    """``reference build``'s options for an .h5ad input: the obsm keys, the loadings and the
    layer."""
    b.add_argument(
        "--basis", default="X_pca", metavar="KEY", help=".h5ad input: obsm key of the PCs"
    )
    b.add_argument(
        "--adjusted-basis",
        default="X_pca_harmony",
        metavar="KEY",
        help=".h5ad input: obsm key the mapped queries' corrected PCs go to",
    )
    loadings = b.add_mutually_exclusive_group()
    loadings.add_argument(
        "--loadings", default="PCs", metavar="KEY", help=".h5ad input: varm key of the PCA loadings"
    )
    loadings.add_argument(
        "--no-loadings",
        action="store_true",
        help=".h5ad input: keep no gene projection (queries must then come "
        "in the reference's PC space)",
    )
    b.add_argument(
        "--layer",
        metavar="KEY",
        help=".h5ad input: layer holding the matrix the PCA was computed from (default: X)",
    )


def command_reference_build(args: argparse.Namespace) -> int:
    """``harmonypy reference build``: integrate a reference and save it for mapping."""
    from harmonypy import build_reference

    if args.labels and not args.keep_cells:
        raise ValueError("--labels: labels are kept with the reference cells; drop --no-cells")
    one_batch = None if args.vars_use else _one_batch_kwargs(args)
    if file_format(args.embedding) == "h5ad":
        return _reference_build_h5ad(args, one_batch)
    refuse_h5ad_options(args, [("--layer", args.layer), ("--no-loadings", args.no_loadings)])
    if one_batch is not None:
        return _build_one_batch(args, one_batch)
    if args.meta is None:
        raise ValueError(
            "--vars names columns of META, the metadata table, which was not "
            "given (without --vars the cells are one batch)"
        )
    check_outputs(
        [OutputSpec("-o/--output", args.output, REFERENCE_OUTPUTS)],
        {"EMBEDDING": args.embedding, "META": args.meta},
        force=args.force,
    )
    embedding, meta = read_tables(args)
    source = f"the metadata {args.meta}"
    check_columns(meta, args.vars_use, "--vars", source)
    check_columns(meta, args.labels or [], "--labels", source)
    embedding, meta = take_rows(embedding, meta, subset_mask(meta, args.subset, source))
    from harmonypy.engine.run import run_harmony

    start = time.perf_counter()
    with convergence_noted(args):
        ho = run_harmony(
            embedding.frame.to_numpy(),
            meta,
            args.vars_use,
            verbose=not args.quiet,
            **harmony_kwargs(args),
        )
    # The reference keeps the cells' names (from the embedding) with its cells.
    named = meta.set_axis(embedding.frame.index) if embedding.has_names else meta
    ref = build_reference(ho, named, labels=args.labels, keep_cells=args.keep_cells)
    elapsed = time.perf_counter() - start
    files = write_outputs([(args.output, ref.write)])
    note(
        args,
        f"wrote {args.output}{replaced(files, args.output)}: {describe_reference(ref)}; "
        f"{outcome(ho)} in {elapsed:.1f} s",
    )
    note_position(args)
    return 0


#: Harmony options that also apply to a one-batch reference (clustered, not
#: integrated): build_reference(pcs, ...)'s nclust, sigma, random_state, device, dtype.
_ONE_BATCH_OPTIONS = ("nclust", "sigma", "seed", "device", "dtype")


def _one_batch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """build_reference's keyword arguments for a one-batch reference (no --vars).

    Refuses the Harmony options that a one-batch reference would ignore, when
    set to anything but their default (the defaults are read from a parser of
    the same options, so they cannot drift).
    """
    scratch = argparse.ArgumentParser(add_help=False)
    add_harmony_options(scratch)
    defaults = vars(scratch.parse_args([]))
    given = [
        name
        for name, default in defaults.items()
        if name not in _ONE_BATCH_OPTIONS and getattr(args, name) != default
    ]
    if given:
        options = [
            "--no-memory-check" if name == "check_memory" else "--" + name.replace("_", "-")
            for name in given
        ]
        raise ValueError(
            f"{', '.join(options)}: Harmony parameters, but no --vars: a "
            f"one-batch reference is clustered, not integrated (of the Harmony "
            f"options only {', '.join('--' + o for o in _ONE_BATCH_OPTIONS)} "
            f"apply); give --vars to integrate over batch columns"
        )
    return {
        "nclust": args.nclust,
        "sigma": args.sigma,
        "random_state": args.seed,
        "device": args.device,
        "dtype": args.dtype,
    }


def _build_one_batch(args: argparse.Namespace, one_batch: dict[str, Any]) -> int:
    """``reference build`` of a table or .npy without --vars: one batch, no Harmony run."""
    from harmonypy import build_reference

    inputs = {"EMBEDDING": args.embedding}
    if args.meta is not None:
        inputs["META"] = args.meta
    else:
        needs_meta = [
            option
            for option, value in (("--labels", args.labels), ("--subset", args.subset))
            if value
        ]
        if needs_meta:
            raise ValueError(
                f"{', '.join(needs_meta)} names columns of META, the metadata "
                f"table, which was not given"
            )
    check_outputs(
        [OutputSpec("-o/--output", args.output, REFERENCE_OUTPUTS)], inputs, force=args.force
    )
    if args.meta is None:
        embedding, meta = read_embedding(args.embedding, names=args.names), None
    else:
        embedding, meta = read_tables(args)
        source = f"the metadata {args.meta}"
        check_columns(meta, args.labels or [], "--labels", source)
        embedding, meta = take_rows(embedding, meta, subset_mask(meta, args.subset, source))
    # The reference keeps the cells' names (from the embedding) with its cells.
    cells = embedding.frame if embedding.has_names else embedding.frame.to_numpy()
    named = (
        meta.set_axis(embedding.frame.index) if (meta is not None and embedding.has_names) else meta
    )
    start = time.perf_counter()
    ref = build_reference(cells, named, labels=args.labels, keep_cells=args.keep_cells, **one_batch)
    elapsed = time.perf_counter() - start
    files = write_outputs([(args.output, ref.write)])
    note(
        args,
        f"wrote {args.output}{replaced(files, args.output)}: {describe_reference(ref)}; "
        f"one batch, clustered in {elapsed:.1f} s",
    )
    note_position(args)
    return 0


def _reference_build_h5ad(args: argparse.Namespace, one_batch: dict[str, Any] | None) -> int:
    from harmonypy import build_reference

    if args.meta is not None:
        raise ValueError(
            "META is not used with .h5ad input: the batch and label columns come from adata.obs"
        )
    refuse_name_options(args)
    check_distinct_bases(args.basis, args.adjusted_basis, names=("--basis", "--adjusted-basis"))
    check_outputs(
        [OutputSpec("-o/--output", args.output, REFERENCE_OUTPUTS)],
        {"EMBEDDING": args.embedding},
        force=args.force,
    )
    adata = read_h5ad(args.embedding)
    source = f"adata.obs of {args.embedding}"
    check_columns(adata.obs, args.vars_use or [], "--vars", source)
    check_columns(adata.obs, args.labels or [], "--labels", source)
    mask = subset_mask(adata.obs, args.subset, source)
    if mask is not None:
        adata = adata[mask].copy()
    start = time.perf_counter()
    options = (
        one_batch if one_batch is not None else {"verbose": not args.quiet, **harmony_kwargs(args)}
    )
    ref = build_reference(
        adata,
        args.vars_use,
        labels=args.labels,
        keep_cells=args.keep_cells,
        basis=args.basis,
        adjusted_basis=args.adjusted_basis,
        loadings=None if args.no_loadings else args.loadings,
        layer=args.layer,
        **options,
    )
    elapsed = time.perf_counter() - start
    files = write_outputs([(args.output, ref.write)])
    genes = (
        f", projection from {ref.projection.n_genes:,} genes" if ref.projection is not None else ""
    )
    note(
        args,
        f"wrote {args.output}{replaced(files, args.output)}: "
        f"{describe_reference(ref)}{genes}; built in {elapsed:.1f} s",
    )
    return 0


def describe_reference(ref) -> str:
    """A reference in one phrase: cells, PCs, clusters, algorithm, labels."""
    labels = f", labels {', '.join(ref.label_columns)}" if ref.label_columns else ""
    cells = "" if ref.cells is not None else " (cells not kept)"
    return (
        f"reference of {ref.n_cells:,} cells{cells} x {ref.d} PCs, {ref.K} clusters "
        f"({ref.algorithm}){labels}"
    )
