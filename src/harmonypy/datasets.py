"""Example data shipped with the package and a simulator of batch effects.

``load_pbmc_3500()`` returns the 3,500-cell PBMC example of the R package
(30 PCs, three donors) together with the R package's own corrected PCs, the
reference every Harmony implementation is compared with;
``load_pbmc_3500_harmony2_reference()`` the same corrected by R harmony 2.0.4;
``load_pbmcs_small()`` 1,200 PBMCs with cell-type labels;
``save_example(folder)`` writes that one as two files, to try the command line
or a read-your-own-files workflow on.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harmonypy import _simulate
from harmonypy.io.outputs import OutputFiles, OutputSpec, check_outputs
from harmonypy.io.tables import Table
from harmonypy.io.writers import write_table

__all__ = [
    "load_pbmc_3500",
    "load_pbmc_3500_harmony2_reference",
    "load_pbmcs_small",
    "save_example",
    "simulate",
]


def _read(name: str) -> pd.DataFrame:
    with resources.files("harmonypy").joinpath("data").joinpath(name).open("rb") as handle:
        return pd.read_csv(handle, sep="\t", compression="gzip")


def load_pbmc_3500() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The PBMC example: 3,500 cells from three donors.

    Returns
    -------
    pcs : DataFrame, (3500, 30)
        PCs ``PC1`` .. ``PC30`` before integration.
    meta : DataFrame, (3500, 2)
        Columns ``donor`` (A, B, C) and ``cell`` (barcode).
    reference : DataFrame, (3500, 30)
        The same PCs corrected by R harmony 1.2.4 with its defaults.

    Examples
    --------
    >>> import harmonypy as hm
    >>> pcs, meta, reference = hm.datasets.load_pbmc_3500()
    >>> pcs.shape, sorted(meta["donor"].unique()), reference.shape
    ((3500, 30), ['A', 'B', 'C'], (3500, 30))
    """
    return (
        _read("pbmc_3500_pcs.tsv.gz"),
        _read("pbmc_3500_meta.tsv.gz"),
        _read("pbmc_3500_pcs_harmonized.tsv.gz"),
    )


def load_pbmc_3500_harmony2_reference() -> pd.DataFrame:
    """The PBMC example's PCs corrected by R harmony 2.0.4 with its defaults.

    Returns
    -------
    DataFrame, (3500, 30)
        The PCs of :func:`load_pbmc_3500` corrected by R harmony 2.0.4, cells
        in the same order; compare ``run_harmony(..., algorithm="harmony2")``.

    Examples
    --------
    >>> import harmonypy as hm
    >>> hm.datasets.load_pbmc_3500_harmony2_reference().shape
    (3500, 30)
    """
    return _read("pbmc_3500_pcs_harmonized_harmony2.tsv.gz")


def load_pbmcs_small() -> tuple[pd.DataFrame, pd.DataFrame]:
    """1,200 PBMCs from three 10x chemistries, with cell types.

    Returns
    -------
    pcs : DataFrame, (1200, 20)
        The cells' first 20 PCs, ``PC1`` .. ``PC20``.
    meta : DataFrame, (1200, 7)
        Columns include ``cell_id`` (the cell names), ``donor`` (the
        chemistry: 3pv1, 3pv2, 5p), ``cell_type`` (9 types) and
        ``cell_type_broad``.

    Examples
    --------
    >>> import harmonypy as hm
    >>> pcs, meta = hm.datasets.load_pbmcs_small()
    >>> pcs.shape, meta["donor"].value_counts().sort_index().to_dict()
    ((1200, 20), {'3pv1': 290, '3pv2': 480, '5p': 430})
    """
    return _read("pbmcs_small_pcs.tsv.gz"), _read("pbmcs_small_meta.tsv.gz")


def save_example(folder: str | Path = ".", *, overwrite: bool = False) -> dict[str, Path]:
    """Write the 1,200-PBMC example as ``pcs.tsv.gz`` and ``meta.tsv.gz`` in ``folder``.

    Both tables start with a ``cell_id`` column of cell names, so a reader
    (or ``harmonypy run``) can match cells to metadata by name. ``meta.tsv.gz``
    has the batch column ``donor`` (the 10x chemistry: 3pv1, 3pv2, 5p) and
    ``cell_type``. The files are written through temporary files renamed into
    place, as every output of this package.

    Parameters
    ----------
    folder : str or Path, default "."
        An existing folder.
    overwrite : bool, default False
        Replace files of those names; otherwise they are an error.

    Returns
    -------
    dict
        ``{"pcs": path, "meta": path}``.

    Raises
    ------
    FileExistsError
        A file exists and ``overwrite`` is False.
    FileNotFoundError
        ``folder`` does not exist.

    Examples
    --------
    >>> import harmonypy as hm
    >>> paths = hm.datasets.save_example(".")
    >>> sorted(path.name for path in paths.values())
    ['meta.tsv.gz', 'pcs.tsv.gz']
    """
    folder = Path(folder)
    pcs, meta = load_pbmcs_small()
    names = pd.Index(meta["cell_id"], name="cell_id")
    tables = {
        "pcs": Table(pcs.set_axis(names), True),
        "meta": Table(meta.set_index("cell_id"), True),
    }
    paths = {key: folder / f"{key}.tsv.gz" for key in tables}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s) in {folder}; pass overwrite=True to replace"
        )
    check_outputs(
        [OutputSpec(f"save_example {key}", path, ("tsv",)) for key, path in paths.items()],
        {},
        force=True,
    )
    with OutputFiles() as files:
        for key, table in tables.items():
            write_table(table, files.stage(paths[key]))
        files.commit()
    return paths


# The simulator's own docstring and signature (``__wrapped__``), for help() and the API
# reference; the function stays defined here, in the public module.
@functools.wraps(_simulate.simulate, assigned=("__doc__",))
def simulate(*args: Any, **kwargs: Any) -> tuple[np.ndarray, pd.DataFrame]:
    return _simulate.simulate(*args, **kwargs)
