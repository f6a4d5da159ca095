"""Reading embeddings, metadata tables and ``.h5ad`` files.

Every library call that reads a file happens inside one wrapper: a truncated
``.gz``, a file that is not what its extension says, text that is not UTF-8,
a malformed table, a bad ``.npy``, ``.parquet``, ``.zarr`` or ``.h5ad`` all
become ``ValueError("cannot read PATH (...)")`` naming the file, instead of a
bare ``EOFError`` or ``zlib.error``. The messages name command-line options
(``--names``) where they are the remedy: this module serves the command line.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import signal
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harmonypy._optional import require_anndata, require_pyarrow, require_zarr
from harmonypy.engine.cellnames import identifier_header
from harmonypy.io.formats import TABLE_FORMATS_HELP, file_format, in_zarr_store
from harmonypy.io.tables import (
    SHOWN,
    Table,
    column_list,
    did_you_mean,
    is_numeric,
    row_numbers,
)

logger = logging.getLogger(__name__)

__all__ = ["read_embedding", "read_h5ad", "read_meta"]


def _check_exists(path: str | Path, what: str) -> None:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if path.is_dir() and not in_zarr_store(path):  # a Zarr store is a folder
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")


def _read_failure(err: BaseException) -> str:
    """A short reason for a failed read, with the original error's type and text."""
    detail = f"{type(err).__name__}: {' '.join(str(err).split())}".rstrip(": ")
    if isinstance(err, EOFError):
        return f"the compressed data ends early; is the file complete? ({detail})"
    if isinstance(err, gzip.BadGzipFile):
        return f"not a valid gzip file ({detail})"
    if isinstance(err, zlib.error):
        return f"corrupt compressed data ({detail})"
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text ({detail})"
    if isinstance(err, pd.errors.EmptyDataError):
        return f"the file is empty or has no header ({detail})"
    if isinstance(err, pd.errors.ParserError):
        return f"malformed table ({detail})"
    return detail


@contextlib.contextmanager
def _reading(path: str | Path, what: str) -> Iterator[None]:
    """Turn any failure of a format library into ``ValueError("cannot read PATH ...")``.

    Only the library call goes inside, so this module's own messages pass
    through unchanged. ImportError (install hints) and MemoryError are not
    about the file and are re-raised as they are.
    """
    with _interrupts_noted() as interrupted:
        try:
            yield
        except (ImportError, MemoryError):
            raise
        except Exception as err:  # noqa: BLE001 - every format library has its own errors
            if interrupted:
                # pandas' C reader turns a Ctrl-C inside its read() callback into
                # a ParserError ("Calling read(nbytes) on source failed"): it was
                # an interrupt, not a bad file.
                raise KeyboardInterrupt from err
            raise ValueError(f"cannot read {path} ({what}): {_read_failure(err)}") from err


@contextlib.contextmanager
def _interrupts_noted() -> Iterator[list[int]]:
    """Note every Ctrl-C (SIGINT) that arrives in the block, and handle it as before.

    Yields the list of signals received, so that an error raised while
    unwinding from the interrupt can be told apart from a real failure. Only
    the main thread can handle signals; elsewhere the list stays empty.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.getsignal(signal.SIGINT)

    def note(signum, frame):
        received.append(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _read_frame(path: str | Path, what: str) -> Table:
    """Read a TSV/CSV/Parquet table; row names (R's or pandas') become the index.

    R's ``write.table`` writes a header one field shorter than the rows
    (pandas then takes the first column as the index); pandas' own
    ``to_csv(index=True)`` writes an unnamed first column (``"Unnamed: 0"``).
    """
    _check_exists(path, what)
    fmt = file_format(path)
    if fmt == "parquet":
        require_pyarrow()
        with _reading(path, what):
            frame = pd.read_parquet(path)
        has_names = not isinstance(frame.index, pd.RangeIndex)
        return Table(frame, has_names, "row names" if has_names else None)
    if fmt not in ("tsv", "csv"):
        raise ValueError(f"the {what} must be a table ({TABLE_FORMATS_HELP}), got {str(path)!r}")
    with _reading(path, what):
        frame = pd.read_csv(path, sep="," if fmt == "csv" else "\t")
    if not isinstance(frame.index, pd.RangeIndex):
        return Table(frame, True, "row names")
    if len(frame.columns) and str(frame.columns[0]).startswith("Unnamed: 0"):
        frame = frame.set_index(frame.columns[0])
        frame.index.name = None
        return Table(frame, True, "row names")
    return Table(frame, False)


def _names_column(frame: pd.DataFrame, column: Any) -> bool:
    """Whether the embedding's ``column`` holds cell names rather than a PC.

    Text, an integer column with an identifier header (``cell_id``,
    ``barcode``, ``index``, ...) and an integer column that numbers the rows
    0..N-1 or 1..N (in any order) hold names; a PC is never like that.
    """
    values = frame[column]
    if not is_numeric(values):
        return True
    if not pd.api.types.is_integer_dtype(values.dtype):
        return False
    return identifier_header(column) or (values.is_unique and row_numbers(values, any_order=True))


def read_embedding(path: str | Path, names: str | None = None) -> Table:
    """Read a cells x PCs embedding from a table or an ``.npy`` file.

    Parameters
    ----------
    path : str or Path
        TSV/CSV/Parquet table or ``.npy`` array (cells x PCs).
    names : str, optional
        The table column holding the cell names (``--names``). Default: the
        row names if the file has them, else the first column when it holds
        names rather than a PC: text, integers under an identifier header
        (``cell``, ``cell_id``, ``barcode``, ``index``, ``id``, ``name``, ...),
        or integers numbering the rows 0..N-1 or 1..N.

    Returns
    -------
    Table
        ``frame`` (n_cells, n_pcs) holds only numeric PC columns; the names,
        if any, are its index.

    Raises
    ------
    ValueError
        Unreadable file, a non-numeric column other than the names, no PC
        column, an ``.npy`` that is not 2-D, ``names`` not a column.
    """
    _check_exists(path, "embedding")
    if file_format(path) in ("zarr", "npy"):
        return _read_array_embedding(path, names)
    table = _read_frame(path, "embedding")
    frame = table.frame
    if len(frame) == 0:  # its columns would all look like text
        raise ValueError(f"embedding {path} has no cells (only a header)")
    columns = [str(c) for c in frame.columns]
    if names is not None:
        if names not in columns:
            raise KeyError(
                f"--names: column {names!r} not found in the embedding "
                f"{path}{did_you_mean(names, columns)}; available: "
                f"{column_list(columns)}"
            )
        column = frame.columns[columns.index(names)]
        table = Table(frame.set_index(column), True, f"column {names!r}")
    elif len(frame.columns) and _names_column(frame, frame.columns[0]):
        first = frame.columns[0]
        if table.has_names and not row_numbers(frame.index):
            raise ValueError(
                f"embedding {path}: has row names and its first column {str(first)!r} also "
                f"looks like cell names; give --names {first} to use that column"
            )
        table = Table(frame.set_index(first), True, f"column {str(first)!r}")
    frame = table.frame
    not_numeric = [str(c) for c in frame.columns if not is_numeric(frame[c])]
    if not_numeric:
        raise ValueError(
            f"embedding {path}: column(s) {', '.join(map(repr, not_numeric[:SHOWN]))}"
            f" are not numeric (only one column may hold cell names; choose it "
            f"with --names)"
        )
    if frame.shape[1] == 0:
        raise ValueError(f"embedding {path} has no PC columns (only cell names)")
    if table.has_names:
        logger.info("embedding %s: cell names from its %s", path, table.names_from)
    return table


def _read_array_embedding(path: str | Path, names: str | None) -> Table:
    """The embedding in a Zarr or ``.npy`` array (no columns, no cell names)."""
    if file_format(path) == "zarr":
        if names is not None:
            raise ValueError(
                f"--names {names!r}: the embedding {path} is a Zarr array "
                f"without columns or cell names"
            )
        values = _read_zarr_array(path)
        columns = [f"PC{i + 1}" for i in range(values.shape[1])]
        return Table(pd.DataFrame(values, columns=columns, copy=False), False)
    if names is not None:
        raise ValueError(
            f"--names {names!r}: the embedding {path} is a NumPy array "
            f"without columns or cell names"
        )
    with _reading(path, "embedding"):
        # Memory-mapped: the engine copies the cells into its own (sorted)
        # buffer in chunks, so the file is never held in memory twice.
        values = np.load(path, allow_pickle=False, mmap_mode="r")
    if values.ndim != 2:
        raise ValueError(
            f"the embedding in {path} must be 2-D (cells x PCs), got shape {values.shape}"
        )
    columns = [f"PC{i + 1}" for i in range(values.shape[1])]
    return Table(pd.DataFrame(values, columns=columns), False)


def _read_zarr_array(path: str | Path) -> np.ndarray:
    """A 2-D Zarr array read into memory in its own dtype, once.

    A Zarr array is compressed in chunks, so unlike an ``.npy`` it cannot be
    used in place; it is decompressed into one array, which the engine then
    uses as it is (no second copy when it is float32). ``path`` may point
    inside a store (``adata.zarr/obsm/X_pca``).
    """
    zarr = require_zarr(f"reading {path}")
    with _reading(path, "embedding"):
        node = zarr.open(str(path), mode="r")
    if not hasattr(node, "shape"):  # a group: say which arrays it holds
        # 2-D arrays only (an embedding is cells x PCs); an AnnData store's
        # embeddings (obsm/...) before X, the layers and the rest.
        names = sorted(
            (not name.startswith("obsm/"), name) for name, ndim in _zarr_arrays(node) if ndim == 2
        )
        shown = ", ".join(f"{path}/{name}" for _, name in names[:SHOWN])
        raise ValueError(
            f"{path} is a Zarr group, not an array: give the path of the "
            f"embedding inside it" + (f", e.g. {shown}" if shown else "")
        )
    if len(node.shape) != 2:
        raise ValueError(
            f"the embedding in {path} must be 2-D (cells x PCs), got shape {tuple(node.shape)}"
        )
    with _reading(path, "embedding"):
        return node[...]


def _zarr_arrays(group) -> list[tuple[str, int]]:
    """``(path inside group, ndim)`` of every array below a Zarr group (zarr 3 or 2)."""
    if hasattr(group, "members"):
        return [
            (name, len(item.shape))
            for name, item in group.members(max_depth=None)
            if hasattr(item, "shape")
        ]
    found: list[tuple[str, int]] = []
    prefix = f"{group.path}/" if group.path else ""
    group.visitvalues(
        lambda item: (
            found.append((item.path[len(prefix) :], len(item.shape)))
            if hasattr(item, "shape")
            else None
        )
    )
    return found


def read_meta(path: str | Path) -> Table:
    """Read the metadata table (one row per cell); row names become the index.

    Which column (if any) names the cells is decided by :func:`match_cells`,
    which knows the embedding's names.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing or unreadable file, or not a table format.
    """
    return _read_frame(path, "metadata")


def read_h5ad(path: str | Path, backed: bool = False):
    """Read an ``.h5ad`` file (needs anndata).

    With ``backed=True`` the file is opened read-only in anndata's backed
    mode: ``X`` (and layers) stay on disk and are never loaded, ``obs`` and
    ``obsm`` are read. For commands that only need an embedding and its
    metadata, so an atlas's expression matrix costs no memory. The caller
    closes it (``adata.file.close()``).

    Raises
    ------
    ImportError
        With the install hint when anndata is missing.
    ValueError
        When the file is not a readable ``.h5ad`` file.
    """
    anndata = require_anndata()
    _check_exists(path, "input")
    with _reading(path, "AnnData input"):
        return anndata.read_h5ad(path, backed="r" if backed else None)
