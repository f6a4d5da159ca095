"""Writers, one per kind of output, the format from the file's name.

Each writes straight to the path it is given: the command gives it a
temporary path from :meth:`harmonypy.io.outputs.OutputFiles.stage`, which is
renamed into place only when every output is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from harmonypy._optional import require_pyarrow
from harmonypy.io.formats import TABLE_FORMATS_HELP, file_format
from harmonypy.io.tables import Table

__all__ = ["save_figure", "write_array", "write_h5ad", "write_h5ad_copy", "write_table"]


def write_table(table: Table, path: str | Path) -> None:
    """Write ``table`` to ``path``, the format from its extension.

    Tables keep the cell names (``table.has_names``) as their first column;
    ``.npy`` keeps only the numbers (n_cells, n_columns), in their dtype.
    Writes straight to ``path``: give it a path from :meth:`OutputFiles.stage`.
    """
    fmt = file_format(path)
    frame = table.frame
    if fmt == "npy":
        np.save(path, frame.to_numpy())
    elif fmt == "parquet":
        require_pyarrow()
        frame.to_parquet(path, index=table.has_names)
    elif fmt in ("tsv", "csv"):
        frame.to_csv(path, sep="," if fmt == "csv" else "\t", index=table.has_names)
    else:
        raise ValueError(f"cannot write a table to {str(path)!r}; use {TABLE_FORMATS_HELP}")


def write_array(
    path: str | Path, shape: tuple[int, int], dtype, fill: Callable[[np.ndarray], Any]
) -> None:
    """Write an ``.npy`` array of ``shape`` and ``dtype`` that ``fill(out)`` fills in place.

    The file is memory-mapped (``np.lib.format.open_memmap``), so an array as
    large as the corrected embedding of an atlas is written chunk by chunk
    (:meth:`harmonypy.Harmony.result` with ``out=``) without a copy of it in
    memory. Writes straight to ``path``: give it a path from
    :meth:`OutputFiles.stage`.
    """
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        fill(out)
        out.flush()
    finally:
        del out


def write_h5ad(adata: Any, path: str | Path) -> None:
    """Write an AnnData object to ``path`` (give it a path from :meth:`OutputFiles.stage`)."""
    adata.write_h5ad(path)


def write_h5ad_copy(
    source: str | Path, path: str | Path, *, obsm: dict | None = None, uns: dict | None = None
) -> None:
    """Write to ``path`` a copy of the ``.h5ad`` file ``source`` with entries of
    ``obsm`` and ``uns`` added or replaced.

    The file is copied as it is, then the entries are written into the copy
    with anndata's element writer, so ``X``, layers and everything else are
    never loaded into memory and stay byte for byte as they were. Give it a
    path from :meth:`OutputFiles.stage`.
    """
    import shutil

    import h5py

    try:  # anndata >= 0.11; before, the same function lived in experimental
        from anndata.io import write_elem
    except ImportError:  # pragma: no cover - older anndata
        from anndata.experimental import write_elem

    shutil.copyfile(source, path)
    with h5py.File(path, "r+") as f:
        for group, entries in (("obsm", obsm or {}), ("uns", uns or {})):
            parent = f.require_group(group)
            for key, value in entries.items():
                if key in parent:
                    del parent[key]
                write_elem(parent, key, value)


def save_figure(fig: Any, path: str | Path, dpi: int = 90) -> None:
    """Save a matplotlib Figure, the format from the extension of ``path``."""
    fig.savefig(path, dpi=dpi, format=Path(path).suffix.lstrip(".").lower() or None)
