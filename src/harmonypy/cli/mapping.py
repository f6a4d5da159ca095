"""``harmonypy map``: map query cells onto a saved reference, transfer its labels.

(The module is ``mapping``, not ``map``, so that it does not hide the
built-in ``map`` in the package's namespace.)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import pandas as pd

from harmonypy.cli.inputs import (
    check_columns,
    note_position,
    paired,
    refuse_h5ad_options,
    refuse_name_options,
    subset_mask,
    take_rows,
)
from harmonypy.cli.options import (
    EMBEDDING_HELP,
    PROG,
    TABLE_OUTPUTS,
    HelpFormatter,
    add_common,
    add_force,
    add_name_options,
    add_quiet,
    add_subset_option,
    meta_help,
    name_list,
    note,
    number,
    number_list,
    warnings_as_notes,
)
from harmonypy.cli.reference import describe_reference
from harmonypy.cli.results import replaced
from harmonypy.io.formats import file_format
from harmonypy.io.outputs import OutputSpec, check_outputs, write_outputs
from harmonypy.io.readers import read_embedding, read_h5ad
from harmonypy.io.tables import Table, close_match
from harmonypy.io.writers import write_h5ad, write_table

#: Library parameter names in messages, as the options of map that set them.
OPTION_NAMES = {
    "vars_use": "--vars",
    "meta_data": "the metadata",
    "data_mat": "the query",
    "min_probability": "--min-probability",
    "adjusted_basis": "--adjusted-basis",
    "basis=KEY": "--basis KEY",
    "layer=KEY": "--layer KEY",
    "lamb": "--lamb",
    "overwrite=True": "--force",
    "basis": "--basis",
    "layer": "--layer",
}


def add_map(commands) -> None:
    """Add ``map`` to the subcommands: map query cells onto a reference file."""
    p = commands.add_parser(
        "map",
        formatter_class=HelpFormatter,
        help="map new cells onto a reference and transfer its labels",
        description=f"Map QUERY onto the reference built by '{PROG} reference build' "
        f"(Symphony's mapping: the query moves into the reference's corrected "
        f"space, the reference does not move) and write the corrected PCs, with "
        f"the per-cell mapping score and, with --labels, the reference's labels "
        f"transferred by the nearest reference cells. QUERY is a table or .npy "
        f"in the reference's PC space, or an .h5ad whose genes are projected "
        f"through the reference's PCA loadings (a reference built from .h5ad), or "
        f"whose obsm[--basis] holds such PCs.",
        epilog=f"example: {PROG} map query_pcs.tsv.gz query_meta.tsv.gz --reference ref.npz "
        f"--labels cell_type -o mapped.tsv.gz",
    )
    _add_map_files(p)
    _add_map_h5ad_options(p)
    _add_map_settings(p)
    add_force(p)
    add_quiet(p)
    add_name_options(p)
    add_common(p)
    p.set_defaults(handler=command_map)


def _add_map_files(p: argparse.ArgumentParser) -> None:
    """``map``'s inputs, labels and output: the query, its metadata, the reference
    file, the batch and label columns, the subset, the label vote and the output."""
    p.add_argument("query", metavar="QUERY", help=EMBEDDING_HELP)
    p.add_argument(
        "meta",
        metavar="META",
        nargs="?",
        help=meta_help("QUERY", "needed with --vars; not for .h5ad"),
    )
    p.add_argument(
        "--reference",
        required=True,
        metavar="REF.npz",
        help="reference file from 'harmonypy reference build'",
    )
    p.add_argument(
        "--vars",
        dest="vars_use",
        type=name_list,
        metavar="COL[,COL...]",
        help="the query's batch column(s) (default: the query is one batch)",
    )
    p.add_argument(
        "--labels",
        type=name_list,
        metavar="COL[,COL...]",
        help="reference label column(s) to transfer: adds <label>_predicted and "
        "<label>_probability columns",
    )
    add_subset_option(p, "the query (needs META for a table)")
    p.add_argument(
        "--min-probability",
        type=number,
        default=0.5,
        metavar="P",
        help="below this share of the neighbours' votes the label is 'unknown'",
    )
    p.add_argument(
        "--neighbors",
        type=int,
        default=5,
        metavar="K",
        help="reference cells that vote on each query cell's label (5: Symphony's choice)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="output file: a table (corrected PCs, labels, mapping_score), .npy "
        "(corrected PCs only) or, for .h5ad input, .h5ad. Written to a "
        "temporary file in the same folder and renamed into place",
    )


def _add_map_h5ad_options(p: argparse.ArgumentParser) -> None:
    """``map``'s options for an .h5ad query: where its PCs are read from and written to."""
    p.add_argument(
        "--basis",
        metavar="KEY",
        help=".h5ad input: obsm key of query PCs already in the reference's PC "
        "space (default: project the genes through the reference's loadings)",
    )
    p.add_argument(
        "--adjusted-basis",
        metavar="KEY",
        help=".h5ad input: obsm key for the corrected PCs (default: the "
        "reference's, else X_pca_harmony). An obsm key or obs column the "
        "mapping writes that the query already has, and that no earlier "
        "mapping wrote (e.g. its own Harmony correction), is refused unless "
        "--force",
    )
    p.add_argument("--layer", metavar="KEY", help=".h5ad input: layer to project instead of X")


def _add_map_settings(p: argparse.ArgumentParser) -> None:
    """``map``'s mapping settings: the ridge penalty, the rounds, the device and precision."""
    p.add_argument(
        "--lamb",
        type=number_list,
        metavar="L[,L...]",
        help="ridge penalty of the query's batch terms; -1 estimates it (default: 1; "
        "a harmony2 reference: estimated)",
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=1,
        metavar="N",
        help="rounds of assignment and correction (1: Symphony's mapping)",
    )
    p.add_argument(
        "--device",
        metavar="DEVICE",
        help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="floating-point precision",
    )


def command_map(args: argparse.Namespace) -> int:
    """``harmonypy map``: map query cells onto a saved reference."""
    from harmonypy import load_reference

    h5ad = file_format(args.query) == "h5ad"
    check_outputs(
        [OutputSpec("-o/--output", args.output, (("h5ad",) if h5ad else ()) + TABLE_OUTPUTS)],
        {"QUERY": args.query, "META": args.meta, "--reference": args.reference},
        force=args.force,
    )
    if args.labels and file_format(args.output) == "npy":
        raise ValueError(
            "--labels: a .npy output holds the corrected PCs only; write a table "
            "(.tsv, .csv, .parquet) or .h5ad to keep the labels"
        )
    if not 0 <= args.min_probability <= 1:
        raise ValueError(f"--min-probability must be in [0, 1], got {args.min_probability}")
    if args.neighbors < 1:
        raise ValueError(f"--neighbors must be >= 1, got {args.neighbors}")
    if args.iterations < 1:
        raise ValueError(f"--iterations must be at least 1, got {args.iterations}")
    ref = load_reference(args.reference)
    _check_reference_labels(ref, args.labels or [], args.reference, args.neighbors)
    start = time.perf_counter()
    with warnings_as_notes():
        if h5ad:
            q, write_output = _map_h5ad(args, ref)
        else:
            q, write_output = _map_table(args, ref)
    elapsed = time.perf_counter() - start
    files = write_outputs([(args.output, write_output)])
    note(
        args,
        f"wrote {args.output}{replaced(files, args.output)}: {q.N:,} cells x {q.d} PCs "
        f"mapped onto {describe_reference(ref)} in {elapsed:.1f} s",
    )
    note_position(args)
    return 0


def _check_reference_labels(ref, labels: Sequence[str], path: str, neighbors: int) -> None:
    missing = [label for label in labels if label not in ref.label_columns]
    if missing:
        hints = [close_match(m, ref.label_columns) for m in missing]
        hint = "".join(f" (did you mean {h!r}?)" for h in hints if h)
        raise KeyError(
            f"--labels: {', '.join(map(repr, missing))} not a label column of the "
            f"reference {path}{hint}; its label columns: "
            f"{', '.join(ref.label_columns) or 'none (build it with --labels)'}"
        )
    if labels and ref.cells is None:
        raise ValueError(
            f"--labels: the reference {path} keeps no cells (built with "
            f"--no-cells), and label transfer needs them"
        )
    for label in labels:
        labelled = int((ref.labels[label].cat.codes >= 0).sum())
        if labelled == 0:
            raise ValueError(
                f"--labels: no cell of the reference {path} has a {label!r} "
                f"label (all missing), so none can vote"
            )
        if neighbors > labelled:
            raise ValueError(
                f"--neighbors {neighbors}: the reference {path} has "
                f"{labelled:,} reference cells labelled in {label!r}, the most "
                f"that can vote; give --neighbors {labelled} or fewer"
            )


def _map_table(args: argparse.Namespace, ref):
    """Map a table or .npy query: ``(MappedQuery, writer of the output)``."""
    from harmonypy import map_query, transfer_labels

    refuse_h5ad_options(
        args,
        [
            ("--basis", args.basis),
            ("--adjusted-basis", args.adjusted_basis),
            ("--layer", args.layer),
        ],
    )
    if (args.vars_use or args.subset) and args.meta is None:
        option = "--vars" if args.vars_use else "--subset"
        raise ValueError(
            f"{option} names columns of META, the query's metadata table, which was not given"
        )
    embedding = read_embedding(args.query, names=args.names)
    meta = None
    if args.meta is not None:
        embedding, meta = paired(args, embedding, args.query, args.meta)
        check_columns(meta, args.vars_use or [], "--vars", f"the metadata {args.meta}")
        embedding, meta = take_rows(
            embedding, meta, subset_mask(meta, args.subset, f"the metadata {args.meta}")
        )
    n_pcs = embedding.frame.shape[1]
    if n_pcs != ref.d:
        raise ValueError(
            f"the query {args.query} has {n_pcs} PC columns but the reference "
            f"{args.reference} was built on {ref.d}: map cells in the reference's "
            f"PC space"
        )
    q = map_query(
        embedding.frame.to_numpy(),
        meta,
        ref,
        vars_use=args.vars_use,
        lamb=args.lamb,
        device=args.device,
        dtype=args.dtype,
        iterations=args.iterations,
    )
    frame = pd.DataFrame(
        q.result(),
        index=embedding.frame.index,
        columns=[f"{c}_harmony" for c in embedding.frame.columns],
    )
    if file_format(args.output) != "npy":
        for label in args.labels or []:
            predicted = transfer_labels(
                q, ref, label, k=args.neighbors, min_probability=args.min_probability
            )
            frame[f"{label}_predicted"] = predicted["label"].to_numpy()
            frame[f"{label}_probability"] = predicted["probability"].to_numpy()
        frame["mapping_score"] = q.confidence
    table = Table(frame, embedding.has_names)
    return q, lambda path: write_table(table, path)


def _map_h5ad(args: argparse.Namespace, ref):
    """Map an .h5ad query (genes projected, or obsm[--basis]): ``(MappedQuery, writer)``."""
    from harmonypy import map_query
    from harmonypy.adapters.mapping_record import SCORE_COLUMN

    if args.meta is not None:
        raise ValueError("META is not used with .h5ad input: the batch columns come from adata.obs")
    refuse_name_options(args)
    adata = read_h5ad(args.query)
    source = f"adata.obs of {args.query}"
    check_columns(adata.obs, args.vars_use or [], "--vars", source)
    mask = subset_mask(adata.obs, args.subset, source)
    if mask is not None:
        adata = adata[mask].copy()
    q = map_query(
        adata,
        ref,
        key=args.vars_use,
        basis=args.basis,
        adjusted_basis=args.adjusted_basis,
        layer=args.layer,
        labels=args.labels,
        k=args.neighbors,
        min_probability=args.min_probability,
        lamb=args.lamb,
        device=args.device,
        dtype=args.dtype,
        iterations=args.iterations,
        overwrite=args.force,
    )
    if file_format(args.output) == "h5ad":
        return q, lambda path: write_h5ad(adata, path)
    corrected = adata.obsm[adata.uns["harmony_mapping"]["adjusted_basis"]]
    frame = pd.DataFrame(
        corrected,
        index=adata.obs_names,
        columns=[f"PC{i + 1}_harmony" for i in range(corrected.shape[1])],
    )
    if file_format(args.output) != "npy":
        for label in args.labels or []:
            for column in (f"{label}_predicted", f"{label}_probability"):
                frame[column] = adata.obs[column].to_numpy()
        frame["mapping_score"] = adata.obs[SCORE_COLUMN].to_numpy()
    table = Table(frame, True)
    return q, lambda path: write_table(table, path)
