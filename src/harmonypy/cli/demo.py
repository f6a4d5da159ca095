"""``harmonypy demo`` and ``harmonypy example-data``: the bundled examples."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from harmonypy.cli.options import PROG, HelpFormatter, add_common, add_force
from harmonypy.cli.results import embedding_figure, outcome, replaced
from harmonypy.io.outputs import OutputSpec, check_outputs, write_outputs
from harmonypy.io.writers import save_figure


def add_demo(commands) -> None:
    """Add ``demo`` to the subcommands: the PBMC example, compared with R's result."""
    p = commands.add_parser(
        "demo",
        formatter_class=HelpFormatter,
        help="run Harmony on the bundled PBMC example and report",
        description="Integrate the 3,500-cell PBMC example of the R package (three donors, "
        "30 PCs), compare with the R package's result and score the mixing.",
    )
    p.add_argument(
        "--algorithm", choices=("harmony1", "harmony2"), default="harmony1", help="Harmony formulas"
    )
    p.add_argument(
        "--device",
        metavar="DEVICE",
        help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.add_argument("--plot", metavar="FILE.png", help="draw the embedding before and after")
    add_force(p)
    p.add_argument("--verbose", action="store_true", help="show Harmony's progress messages")
    add_common(p)
    p.set_defaults(handler=command_demo)


def command_demo(args: argparse.Namespace) -> int:
    """``harmonypy demo``: the PBMC example with a short report on stdout."""
    from harmonypy import __version__, datasets
    from harmonypy.engine.run import run_harmony

    check_outputs([OutputSpec("--plot", args.plot, None)], {}, force=args.force)
    pcs, meta, reference = datasets.load_pbmc_3500()
    r_version = "1.2.4"
    if args.algorithm == "harmony2":
        reference, r_version = datasets.load_pbmc_3500_harmony2_reference(), "2.0.4"
    start = time.perf_counter()
    ho = run_harmony(
        pcs,
        meta,
        "donor",
        verbose=args.verbose,
        algorithm=args.algorithm,
        device=args.device,
        random_state=args.seed,
    )
    elapsed = time.perf_counter() - start
    corrected = ho.Z_corr.T

    lines = [f"harmonypy {__version__} demo: PBMC example of the R package harmony", ""]
    lines += _rows(
        [
            ("cells", f"{ho.N:,}"),
            ("PCs", f"{ho.d}"),
            ("batches", _level_counts(meta["donor"])),
            (
                "run",
                f"{ho.algorithm} on {ho.device} ({str(ho.dtype).replace('torch.', '')}), "
                f"K = {ho.K} clusters, seed {args.seed}",
            ),
            ("result", f"{outcome(ho)} in {elapsed:.2f} s"),
            ("R agreement", _agreement(corrected, reference, r_version)),
        ]
    )
    lines += _rows(_mixing_rows(pcs.to_numpy(), corrected, meta))
    print("\n".join(lines))
    if args.plot:
        # In this data set the donor effect lies mostly along PC4.
        figure = embedding_figure(
            pcs, pd.DataFrame(corrected, columns=list(pcs.columns)), meta, ["donor"], pcs=(1, 4)
        )
        files = write_outputs([(args.plot, lambda path: save_figure(figure, path))])
        print(f"\nwrote {args.plot}{replaced(files, args.plot)}")
    return 0


def _rows(pairs: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(name) for name, _ in pairs)
    return [f"  {name:<{width}}  {value}" for name, value in pairs]


def _level_counts(column: pd.Series) -> str:
    counts = column.value_counts().sort_index()
    levels = ", ".join(f"{level} ({n:,})" for level, n in counts.items())
    return f"{column.name}: {len(counts)} levels, {levels}"


def _agreement(corrected: np.ndarray, reference: pd.DataFrame, r_version: str) -> str:
    """Per-PC Pearson correlation with the R package's corrected PCs."""
    ref = reference.to_numpy(dtype=float)
    ours = np.asarray(corrected, dtype=float)
    ours_c, ref_c = ours - ours.mean(0), ref - ref.mean(0)
    r = (ours_c * ref_c).sum(0) / np.sqrt((ours_c**2).sum(0) * (ref_c**2).sum(0))
    worst = int(np.argmin(r))
    return (
        f"per-PC Pearson r with R harmony {r_version}: median {np.median(r):.4f}, "
        f"min {r[worst]:.4f} ({reference.columns[worst]})"
    )


def _mixing_rows(
    before: np.ndarray, after: np.ndarray, meta: pd.DataFrame
) -> list[tuple[str, str]]:
    from harmonypy import evaluate

    scores = [evaluate(x, meta, "donor") for x in (before, after)]
    return [
        (
            "iLISI donor",
            f"median {scores[0].ilisi_median:.2f} before -> "
            f"{scores[1].ilisi_median:.2f} after "
            f"(1 = separated, {scores[0].n_batches} = fully mixed)",
        )
    ]


def add_example_data(commands) -> None:
    """Add ``example-data`` to the subcommands: the bundled example as two files."""
    p = commands.add_parser(
        "example-data",
        formatter_class=HelpFormatter,
        help="write the bundled 1,200-PBMC example as pcs.tsv.gz and meta.tsv.gz",
        description="Write the bundled example (1,200 PBMCs, 20 PCs; batch column 'donor' = "
        "the 10x chemistry, 'cell_type') as pcs.tsv.gz and meta.tsv.gz, both "
        "starting with a cell_id column, to try the other commands on.",
        epilog=f"example: {PROG} example-data . && {PROG} run pcs.tsv.gz meta.tsv.gz "
        f"--vars donor -o pcs_harmony.tsv.gz",
    )
    p.add_argument(
        "folder",
        metavar="FOLDER",
        nargs="?",
        default=".",
        help="existing folder to write into (default: the current folder)",
    )
    add_force(p)
    add_common(p)
    p.set_defaults(handler=command_example_data)


def command_example_data(args: argparse.Namespace) -> int:
    """``harmonypy example-data``: the bundled example as two files."""
    from harmonypy import datasets

    if not Path(args.folder).is_dir():
        raise FileNotFoundError(f"folder not found: {args.folder}")
    existing = [
        str(Path(args.folder) / f"{key}.tsv.gz")
        for key in ("pcs", "meta")
        if (Path(args.folder) / f"{key}.tsv.gz").exists()
    ]
    if existing and not args.force:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --force to replace")
    paths = datasets.save_example(args.folder, overwrite=args.force)
    print("\n".join(str(path) for path in paths.values()))
    return 0
