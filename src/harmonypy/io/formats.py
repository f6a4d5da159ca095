"""File formats, told from a file's name.

:func:`file_format` reads the extension (skipping a compression suffix) and
is the one place that knows which formats exist; the readers, the writers and
the output checks all ask it. The help strings list the formats for messages
and ``--help``.
"""

from __future__ import annotations

from pathlib import Path

from harmonypy._optional import PLOT_HINT, import_optional

__all__ = [
    "COMPRESSIONS",
    "FORMATS_HELP",
    "TABLE_FORMATS_HELP",
    "TABLE_SEPARATORS",
    "file_format",
    "format_suffix",
    "in_zarr_store",
    "plot_formats",
]

TABLE_SEPARATORS = {".tsv": "\t", ".txt": "\t", ".csv": ","}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TABLE_FORMATS_HELP = "TSV/CSV (.tsv, .txt, .csv, optionally .gz), Parquet (.parquet)"
FORMATS_HELP = (
    f"{TABLE_FORMATS_HELP}, NumPy (.npy), a Zarr array (.zarr, input only) or AnnData (.h5ad)"
)


def file_format(path: str | Path) -> str:
    """The format of ``path`` from its extension.

    Returns
    -------
    str
        ``'tsv'`` (.tsv, .txt), ``'csv'``, ``'parquet'``, ``'npy'``,
        ``'h5ad'``, ``'npz'`` (a reference file, ``harmonypy reference
        build``) or ``'zarr'`` (a Zarr array: a ``.zarr`` folder, or a path
        inside one such as ``adata.zarr/obsm/X_pca``); a trailing compression
        suffix (.gz, .bz2, .xz, .zst) is skipped.

    Raises
    ------
    ValueError
        For any other extension (the message lists the supported ones).
    """
    if in_zarr_store(path):
        return "zarr"
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in TABLE_SEPARATORS:
        return "csv" if last == ".csv" else "tsv"
    if last in (".parquet", ".npy", ".h5ad", ".npz"):
        return last[1:]
    raise ValueError(
        f"cannot tell the format of {str(path)!r} from its extension; use {FORMATS_HELP}"
    )


def in_zarr_store(path: str | Path) -> bool:
    """``x.zarr`` or a path inside it (``x.zarr/obsm/X_pca``)."""
    return any(part.lower().endswith(".zarr") for part in Path(path).parts)


def plot_formats() -> dict[str, str]:
    """Extensions matplotlib can save a figure to (``{'png': 'Portable Network Graphics'}``).

    Raises
    ------
    ImportError
        With the install hint, when matplotlib is missing.
    """
    message = f"plotting needs matplotlib: {PLOT_HINT}"
    backends = import_optional("matplotlib.backend_bases", message)
    return dict(backends.FigureCanvasBase.get_supported_filetypes())


def format_suffix(path: Path) -> str:
    """The suffixes a writer reads the format from: ``.tsv.gz``, ``.npy``, ``.png``."""
    suffixes = path.suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in COMPRESSIONS:
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""
