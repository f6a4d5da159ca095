"""File input and output of the command line.

Everything :mod:`harmonypy.cli` does with files lives here, so the commands
stay thin and every file goes through the same checks:

* **Formats** come from the file name's extension (:func:`file_format`).
* **Reading** (:func:`read_embedding`, :func:`read_meta`, :func:`read_h5ad`)
  happens in one wrapper: a truncated ``.gz``, a file that is not what its
  extension says, text that is not UTF-8, a malformed table, a bad ``.npy``,
  ``.parquet`` or ``.h5ad`` all become ``ValueError("cannot read PATH (...)")``
  instead of a bare ``EOFError`` or ``zlib.error`` without a file name.
* **Cell names** (:func:`match_cells`): when the embedding and the metadata
  both name their cells, they are paired by name; the same cells in another
  order are reordered, anything else (repeated names, cells on one side only,
  two sets of names with nothing in common) is an error that shows a few
  offending names. Row order is used only when one side has no names.
* **Outputs** are checked before the computation (:func:`check_outputs`:
  format, folder, not an input, not replaced without ``force``) and written
  through :class:`OutputFiles`: each to a temporary file in its destination
  folder, all renamed into place together once every one is complete. An
  error or Ctrl-C leaves the previous files untouched and no temporary file.

The messages name command-line options (``--force``, ``--no-names``) where
they are the remedy: this module serves the command line.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import signal
import stat
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from harmonypy.engine.cellnames import declared_names, identifier_header, match_order, text_names
from harmonypy._optional import require_anndata

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS_HELP", "TABLE_FORMATS_HELP", "CellMatch", "OutputFiles", "OutputSpec", "Table",
    "check_outputs", "close_match", "file_format", "match_cells", "plot_formats", "read_embedding",
    "read_h5ad", "read_meta", "save_figure", "write_h5ad", "write_h5ad_copy", "write_outputs",
    "write_table",
]

_TABLE_SEPARATORS = {".tsv": "\t", ".txt": "\t", ".csv": ","}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TABLE_FORMATS_HELP = "TSV/CSV (.tsv, .txt, .csv, optionally .gz), Parquet (.parquet)"
FORMATS_HELP = (f"{TABLE_FORMATS_HELP}, NumPy (.npy), a Zarr array (.zarr, input only) "
                f"or AnnData (.h5ad)")

#: Offending names or columns shown in a message.
_SHOWN = 5
#: Values of each metadata column looked up among the embedding's names to
#: find a name column cheaply (a name column shares names from its first rows).
_PROBE_VALUES = 1000


# =========================================================================== #
# Formats
# =========================================================================== #
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
    if _in_zarr_store(path):
        return "zarr"
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in _TABLE_SEPARATORS:
        return "csv" if last == ".csv" else "tsv"
    if last in (".parquet", ".npy", ".h5ad", ".npz"):
        return last[1:]
    raise ValueError(f"cannot tell the format of {str(path)!r} from its extension; "
                     f"use {FORMATS_HELP}")


def _in_zarr_store(path: str | Path) -> bool:
    """``x.zarr`` or a path inside it (``x.zarr/obsm/X_pca``)."""
    return any(part.lower().endswith(".zarr") for part in Path(path).parts)


def plot_formats() -> dict[str, str]:
    """Extensions matplotlib can save a figure to (``{'png': 'Portable Network Graphics'}``).

    Raises
    ------
    ImportError
        With the install hint, when matplotlib is missing.
    """
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install harmonypy[plot]") from err
    return dict(FigureCanvasBase.get_supported_filetypes())


def _format_suffix(path: Path) -> str:
    """The suffixes a writer reads the format from: ``.tsv.gz``, ``.npy``, ``.png``."""
    suffixes = path.suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in _COMPRESSIONS:
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


# =========================================================================== #
# Reading
# =========================================================================== #
@dataclass
class Table:
    """A cells x columns table read from a file.

    Attributes
    ----------
    frame : DataFrame, (n_cells, n_columns)
        The values; when ``has_names``, ``frame.index`` holds the cell names.
    has_names : bool
        Whether the rows carry cell names (worth matching on and writing back).
    names_from : str or None
        Where the names came from, for messages: ``"row names"`` or
        ``"column 'cell'"``.
    """

    frame: pd.DataFrame
    has_names: bool
    names_from: str | None = None

    @property
    def names(self) -> pd.Index | None:
        """The cell names, (n_cells,), or None."""
        return self.frame.index if self.has_names else None


def _check_exists(path: str | Path, what: str) -> None:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if path.is_dir() and not _in_zarr_store(path):  # a Zarr store is a folder
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


def _need_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError("Parquet files need pyarrow: pip install pyarrow") from None


def _read_frame(path: str | Path, what: str) -> Table:
    """Read a TSV/CSV/Parquet table; row names (R's or pandas') become the index.

    R's ``write.table`` writes a header one field shorter than the rows
    (pandas then takes the first column as the index); pandas' own
    ``to_csv(index=True)`` writes an unnamed first column (``"Unnamed: 0"``).
    """
    _check_exists(path, what)
    fmt = file_format(path)
    if fmt == "parquet":
        _need_pyarrow()
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


def _numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _row_numbers(values: pd.Index | pd.Series, *, any_order: bool = False) -> bool:
    """Whether ``values`` are 0..n-1 or 1..n (in order, or in any order if asked).

    Such values number rows (pandas' default index, R's default row names)
    rather than name cells. Text that spells integers counts too.
    """
    n = len(values)
    if n == 0:
        return False
    if pd.api.types.is_integer_dtype(values.dtype):
        numbers = np.asarray(values, dtype=np.int64)
    else:
        text = pd.Index(values).astype(str)
        if not text.str.fullmatch(r"\d{1,18}").all():
            return False
        numbers = text.astype(np.int64).to_numpy()
    if any_order:
        numbers = np.sort(numbers)
    return bool(numbers[0] in (0, 1) and np.array_equal(numbers, np.arange(n) + numbers[0]))


def _names_column(frame: pd.DataFrame, column: Any) -> bool:
    """Whether the embedding's ``column`` holds cell names rather than a PC.

    Text, an integer column with an identifier header (``cell_id``,
    ``barcode``, ``index``, ...) and an integer column that numbers the rows
    0..N-1 or 1..N (in any order) hold names; a PC is never like that.
    """
    values = frame[column]
    if not _numeric(values):
        return True
    if not pd.api.types.is_integer_dtype(values.dtype):
        return False
    return identifier_header(column) or (values.is_unique and _row_numbers(values, any_order=True))


def close_match(name: str, available: Sequence[str]) -> str | None:
    """The entry of ``available`` that ``name`` most likely meant (case, spaces, typos)."""
    import difflib

    same_case = [c for c in available if c.strip().lower() == name.strip().lower()]
    close = same_case or difflib.get_close_matches(name, list(available), n=1)
    return close[0] if close else None


def _did_you_mean(name: str, available: Sequence[str]) -> str:
    match = close_match(name, available)
    return f" (did you mean {match!r}?)" if match else ""


def _column_list(columns: Sequence[Any], limit: int = 20) -> str:
    names = [str(c) for c in columns]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"


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
    if file_format(path) == "zarr":
        if names is not None:
            raise ValueError(f"--names {names!r}: the embedding {path} is a Zarr array "
                             f"without columns or cell names")
        values = _read_zarr_array(path)
        columns = [f"PC{i + 1}" for i in range(values.shape[1])]
        return Table(pd.DataFrame(values, columns=columns, copy=False), False)
    if file_format(path) == "npy":
        if names is not None:
            raise ValueError(f"--names {names!r}: the embedding {path} is a NumPy array "
                             f"without columns or cell names")
        with _reading(path, "embedding"):
            # Memory-mapped: the engine copies the cells into its own (sorted)
            # buffer in chunks, so the file is never held in memory twice.
            values = np.load(path, allow_pickle=False, mmap_mode="r")
        if values.ndim != 2:
            raise ValueError(f"the embedding in {path} must be 2-D (cells x PCs), "
                             f"got shape {values.shape}")
        columns = [f"PC{i + 1}" for i in range(values.shape[1])]
        return Table(pd.DataFrame(values, columns=columns), False)

    table = _read_frame(path, "embedding")
    frame = table.frame
    if len(frame) == 0:  # its columns would all look like text
        raise ValueError(f"embedding {path} has no cells (only a header)")
    columns = [str(c) for c in frame.columns]
    if names is not None:
        if names not in columns:
            raise KeyError(f"--names: column {names!r} not found in the embedding "
                           f"{path}{_did_you_mean(names, columns)}; available: "
                           f"{_column_list(columns)}")
        column = frame.columns[columns.index(names)]
        table = Table(frame.set_index(column), True, f"column {names!r}")
    elif len(frame.columns) and _names_column(frame, frame.columns[0]):
        first = frame.columns[0]
        if table.has_names and not _row_numbers(frame.index):
            raise ValueError(
                f"embedding {path}: has row names and its first column {str(first)!r} also "
                f"looks like cell names; give --names {first} to use that column")
        table = Table(frame.set_index(first), True, f"column {str(first)!r}")
    frame = table.frame
    not_numeric = [str(c) for c in frame.columns if not _numeric(frame[c])]
    if not_numeric:
        raise ValueError(f"embedding {path}: column(s) {', '.join(map(repr, not_numeric[:_SHOWN]))}"
                         f" are not numeric (only one column may hold cell names; choose it "
                         f"with --names)")
    if frame.shape[1] == 0:
        raise ValueError(f"embedding {path} has no PC columns (only cell names)")
    if table.has_names:
        logger.info("embedding %s: cell names from its %s", path, table.names_from)
    return table


def _read_zarr_array(path: str | Path) -> np.ndarray:
    """A 2-D Zarr array read into memory in its own dtype, once.

    A Zarr array is compressed in chunks, so unlike an ``.npy`` it cannot be
    used in place; it is decompressed into one array, which the engine then
    uses as it is (no second copy when it is float32). ``path`` may point
    inside a store (``adata.zarr/obsm/X_pca``).
    """
    try:
        import zarr
    except ImportError as err:
        raise ImportError(f"reading {path} needs zarr: pip install zarr") from err
    with _reading(path, "embedding"):
        node = zarr.open(str(path), mode="r")
    if not hasattr(node, "shape"):  # a group: say which arrays it holds
        # 2-D arrays only (an embedding is cells x PCs); an AnnData store's
        # embeddings (obsm/...) before X, the layers and the rest.
        names = sorted((not name.startswith("obsm/"), name)
                       for name, ndim in _zarr_arrays(node) if ndim == 2)
        shown = ", ".join(f"{path}/{name}" for _, name in names[:_SHOWN])
        raise ValueError(f"{path} is a Zarr group, not an array: give the path of the "
                         f"embedding inside it" + (f", e.g. {shown}" if shown else ""))
    if len(node.shape) != 2:
        raise ValueError(f"the embedding in {path} must be 2-D (cells x PCs), got shape "
                         f"{tuple(node.shape)}")
    with _reading(path, "embedding"):
        return node[...]


def _zarr_arrays(group) -> list[tuple[str, int]]:
    """``(path inside group, ndim)`` of every array below a Zarr group (zarr 3 or 2)."""
    if hasattr(group, "members"):
        return [(name, len(item.shape)) for name, item in group.members(max_depth=None)
                if hasattr(item, "shape")]
    found: list[tuple[str, int]] = []
    prefix = f"{group.path}/" if group.path else ""
    group.visitvalues(lambda item: found.append((item.path[len(prefix):], len(item.shape)))
                      if hasattr(item, "shape") else None)
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


# =========================================================================== #
# Cell names
# =========================================================================== #
@dataclass
class CellMatch:
    """How the metadata rows were paired with the embedding's cells.

    Attributes
    ----------
    meta : DataFrame, (n_cells, n_columns)
        The metadata in the embedding's cell order, with a default index.
    by_name : bool
        True when paired by cell name, False when by row order.
    names_from : str or None
        Which metadata names were used (``"row names"``, ``"column 'cell'"``).
    reordered : bool
        Whether the metadata rows had to be reordered.
    names : Index (n_cells,) or None
        Paired by position with an embedding that names no cells: the
        metadata's own cell names (``names_from`` says where from), which
        then name the cells (outputs keep them). None otherwise.
    paths : tuple of str
        The embedding and metadata files, for :meth:`describe`.
    """

    meta: pd.DataFrame
    by_name: bool
    names_from: str | None = None
    reordered: bool = False
    names: pd.Index | None = None
    paths: tuple[str, str] = ("the embedding", "the metadata")

    def describe(self) -> str:
        """One line for the user, e.g. ``matched ... by cell name ... (reordered)``."""
        embedding, meta = self.paths
        if not self.by_name:
            text = f"metadata {meta} paired with the embedding's cells by position (row order)"
            if self.names is not None:
                text += (f": the embedding {embedding} has no cell names, so its cells are "
                         f"named by the metadata's {self.names_from}")
            return text
        how = "reordered to" if self.reordered else "in the same order as"
        return (f"metadata matched by cell name ({self.names_from}): {len(self.meta):,} rows, "
                f"{how} the embedding")


def _meta_name_candidates(meta: Table, cell_text: pd.Index,
                          integer_names: bool) -> list[tuple[str, pd.Index]]:
    """Metadata name sources that share at least one name with the embedding.

    The row names are always looked at; so are text and categorical columns.
    When the embedding's names are plain integers, only columns with an
    identifier header (``cell_id``, ``barcode``, ...) count, or every integer
    data column (counts, cluster numbers) would look like a partial match.
    """
    lookup = cell_text.unique()
    sources: list[tuple[str, pd.Index]] = []
    if meta.has_names:
        sources.append(("row names", meta.frame.index))
    for column in meta.frame.columns:
        values = meta.frame[column]
        text_like = not _numeric(values) and not pd.api.types.is_bool_dtype(values)
        if integer_names:
            usable = identifier_header(column) and (
                text_like or pd.api.types.is_integer_dtype(values.dtype))
        else:
            usable = text_like
        if usable:
            sources.append((f"column {str(column)!r}", pd.Index(values)))

    def shares_a_name(names: pd.Index) -> bool:
        if isinstance(names.dtype, pd.CategoricalDtype):  # the categories say it all
            names = pd.Index(names.categories)
        # A name column usually shares names within its first rows: try those
        # before looking up every value.
        head = pd.Index(names[:_PROBE_VALUES].astype(str))
        return bool((lookup.get_indexer(head) >= 0).any()
                    or (lookup.get_indexer(pd.Index(names.astype(str)).unique()) >= 0).any())

    return [(where, names) for where, names in sources if shares_a_name(names)]


def match_cells(embedding: Table, meta: Table, *, embedding_path: str | Path,
                meta_path: str | Path, meta_names: str | None = None,
                by_name: bool = True) -> CellMatch:
    """Put the metadata rows in the order of the embedding's cells.

    Parameters
    ----------
    embedding : Table
        The embedding, (n_cells, n_pcs); its names (if any) are the index.
    meta : Table
        The metadata, (n_rows, n_columns).
    embedding_path, meta_path : str or Path
        The files, for messages.
    meta_names : str, optional
        The metadata column holding the cell names (``--meta-names``).
        Default: the metadata's row names or the column that shares the most
        names with the embedding. When nothing is shared and the embedding's
        names are text, the metadata's text row names or a column under an
        identifier header (``cell_id``, ``barcode``, ...) still count as its
        names (and the pairing is refused); otherwise the metadata has none.
    by_name : bool, default True
        False pairs rows by position whatever the names (``--no-names``).

    Returns
    -------
    CellMatch
        The metadata in embedding order and how it was matched.

    Raises
    ------
    ValueError
        Both sides name cells but names repeat, or the two sets differ, even
        entirely (the message gives counts and up to five names of each
        kind); by row order, a different number of rows.
    KeyError
        ``meta_names`` is not a metadata column.

    Notes
    -----
    Two lists of row numbers (0..N-1 from pandas, 1..N from R) are not
    names: they are paired by row order. Nor are integer labels that share
    nothing with the other side (a filtered frame's index written by
    pandas): they are paired by row order with a warning.
    """
    n_cells = len(embedding.frame)
    cell_names = embedding.names
    if meta_names is not None:
        columns = [str(c) for c in meta.frame.columns]
        if meta_names not in columns:
            raise KeyError(f"--meta-names: column {meta_names!r} not found in the metadata "
                           f"{meta_path}{_did_you_mean(meta_names, columns)}; available: "
                           f"{_column_list(columns)}")
        if cell_names is None:
            raise ValueError(f"--meta-names {meta_names!r}: the embedding {embedding_path} has "
                             f"no cell names to match (choose its name column with --names)")
    if cell_names is None:
        return _by_row_order(meta, n_cells, embedding_path, meta_path, adopt_names=True)
    if not by_name:
        return _by_row_order(meta, n_cells, embedding_path, meta_path)

    cell_text = pd.Index(cell_names.astype(str))
    if meta_names is not None:
        column = meta.frame.columns[[str(c) for c in meta.frame.columns].index(meta_names)]
        where, names = f"column {meta_names!r}", pd.Index(meta.frame[column])
    else:
        integer_names = bool(cell_text.str.fullmatch(r"-?\d+").all())
        candidates = _meta_name_candidates(meta, cell_text, integer_names)
        if candidates:
            lookup = cell_text.unique()
            where, names = max(candidates, key=lambda c: int(
                (lookup.get_indexer(pd.Index(c[1].astype(str))) >= 0).sum()))
            if _row_numbers(cell_names) and _row_numbers(names):
                logger.info("both files number their rows (0..N-1 or 1..N); pairing by row "
                            "order")
                return _by_row_order(meta, n_cells, embedding_path, meta_path)
        else:
            # Nothing shared. Text names on both sides name other cells: refused
            # below (match_order), never paired by position (issue #11).
            declared = (declared_names(meta.frame, index=meta.has_names)
                        if text_names(cell_names) else None)
            if declared is None:
                if meta.has_names and not _row_numbers(meta.frame.index):
                    logger.warning("the metadata %s has row names but shares none with the "
                                   "embedding %s; taking integer labels for row numbers and "
                                   "pairing rows by position", meta_path, embedding_path)
                return _by_row_order(meta, n_cells, embedding_path, meta_path)
            column, names = declared
            where = "row names" if column is None else f"column {str(column)!r}"

    order = match_order(
        cell_names, names,
        cells_from=f"the embedding {embedding_path} ({embedding.names_from})",
        meta_from=f"the metadata {meta_path} ({where})",
        remedy="Give both files the same cells, make the names unique, choose the name "
               "columns with --names/--meta-names, or pass --no-names to pair rows by position")
    if order is None:
        order = np.arange(n_cells)
    reordered = not np.array_equal(order, np.arange(n_cells))
    frame = meta.frame.iloc[order] if reordered else meta.frame
    match = CellMatch(frame.reset_index(drop=True), True, where, reordered)
    logger.info("%s", match.describe())
    return match


def _by_row_order(meta: Table, n_cells: int, embedding_path: str | Path,
                  meta_path: str | Path, adopt_names: bool = False) -> CellMatch:
    """Pair by position; with ``adopt_names`` (the embedding names no cells),
    the metadata's own distinct cell names, if any, name the cells."""
    if len(meta.frame) != n_cells:
        raise ValueError(f"metadata {meta_path} has {len(meta.frame):,} rows but the embedding "
                         f"{embedding_path} has {n_cells:,} cells (paired by row order: "
                         f"the two files do not share cell names)")
    names = names_from = None
    if adopt_names:
        found = _own_names(meta)
        if found is not None:
            names_from, names = found
    match = CellMatch(meta.frame.reset_index(drop=True), False, names_from, names=names,
                      paths=(str(embedding_path), str(meta_path)))
    logger.info("%s", match.describe())
    return match


def _own_names(meta: Table) -> tuple[str, pd.Index] | None:
    """``(where, names)`` of the metadata's distinct cell names, or None.

    Its row names unless they only number the rows, else a column of distinct
    text names under an identifier header (``cell_id``, ``barcode``, ...).
    """
    index = meta.frame.index
    if meta.has_names and not _row_numbers(index) and index.is_unique:
        return "row names", pd.Index(index)
    declared = declared_names(meta.frame, index=False)
    if declared is None:
        return None
    return f"column {str(declared[0])!r}", declared[1]


# =========================================================================== #
# Output checks
# =========================================================================== #
@dataclass(frozen=True)
class OutputSpec:
    """An output the command will write, for :func:`check_outputs`.

    Attributes
    ----------
    option : str
        The option that names it, for messages (``"-o/--output"``, ``"--plot"``).
    path : str or Path
        The file to write.
    formats : tuple of str, or None
        Accepted :func:`file_format` values; None for a matplotlib figure
        (any extension matplotlib can save).
    """

    option: str
    path: str | Path
    formats: tuple[str, ...] | None


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Same file: same inode when both exist (hard links too), else the same real path."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def check_outputs(outputs: Sequence[OutputSpec], inputs: dict[str, str | Path | None], *,
                  force: bool) -> None:
    """Check that every output can be written, before any computation.

    So that a refused command writes nothing and an accepted one does not
    fail after a long run, each output is checked for: a supported format,
    a destination folder that exists and is writable, not being a folder,
    a device or another special file, not being one of the ``inputs`` (after
    resolving symlinks, or the same inode), not being another output, and
    not existing unless ``force``.

    Parameters
    ----------
    outputs : sequence of OutputSpec
        The files to be written; entries with ``path`` None are skipped.
    inputs : dict
        ``{"EMBEDDING": path, "META": path}``; None values are skipped.
    force : bool
        Whether existing outputs may be replaced (``--force``).

    Raises
    ------
    ValueError
        Unsupported format, an input or another output as destination.
    FileNotFoundError, NotADirectoryError, PermissionError
        Destination folder missing, not a folder, or not writable.
    IsADirectoryError
        The output is an existing folder.
    FileExistsError
        The output exists and ``force`` is False.
    """
    checked: list[OutputSpec] = []
    for spec in outputs:
        if spec.path is None:
            continue
        path = Path(spec.path)
        # First: writing over an input is the costliest mistake, say so whatever else is wrong.
        for what, source in inputs.items():
            if source is not None and _same_file(path, source):
                raise ValueError(f"{spec.option} {path} is the input {what} ({source}); "
                                 f"write the result to another file")
        for other in checked:
            if _same_file(path, other.path):
                raise ValueError(f"{spec.option} and {other.option} name the same file: {path}")
        if spec.formats is None:
            _check_plot_format(spec)
        else:
            fmt = file_format(path)
            if fmt not in spec.formats:
                raise ValueError(f"{spec.option} {str(path)!r}: format {fmt!r} not possible here; "
                                 f"use one of {', '.join(spec.formats)}")
        if path.is_dir():
            raise IsADirectoryError(f"{spec.option} {path} is a folder; give a file name")
        folder = Path(os.path.realpath(path)).parent
        if not folder.exists():
            raise FileNotFoundError(f"output folder does not exist: {path.parent} "
                                    f"({spec.option} {path})")
        if not folder.is_dir():
            raise NotADirectoryError(f"{spec.option} {path}: {path.parent} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{spec.option} {path}: no permission to write in {folder}")
        if path.exists():
            if not stat.S_ISREG(path.stat().st_mode):
                raise ValueError(f"{spec.option} {path} exists and is not a regular file")
            if not force:
                raise FileExistsError(f"{spec.option} {path} already exists; pass --force to "
                                      f"replace it")
        checked.append(spec)


def _check_plot_format(spec: OutputSpec) -> None:
    extension = Path(spec.path).suffix.lower().lstrip(".")
    supported = plot_formats()
    if extension not in supported:
        raise ValueError(f"{spec.option} {str(spec.path)!r}: matplotlib cannot write "
                         f"{'.' + extension if extension else 'a file without extension'}; "
                         f"use one of {', '.join(sorted(supported))}")


# =========================================================================== #
# Writing
# =========================================================================== #
@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM back until the block ends, then deliver them.

    Keeps short critical steps (registering a temporary file, renaming the
    outputs together, removing temporary files) from being cut in half.
    Only the main thread can handle signals; elsewhere this does nothing. A
    signal whose handler was not set from Python is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in held}
    try:
        yield
    finally:
        for s in held:
            signal.signal(s, previous[s])
        for signum in received[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL and signum == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)  # its default action, now that the step is done


def _new_file_mode(final: Path) -> int:
    """Permission bits for an output: the replaced file's, else 0o666 less the umask."""
    try:
        return stat.S_IMODE(final.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync(path: str | Path, directory: bool = False) -> None:
    flags = os.O_RDONLY if (directory or os.name != "nt") else os.O_RDWR
    try:
        descriptor = os.open(path, flags)
    except OSError:
        if directory:  # not possible on every system (Windows); the data is synced
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(descriptor)


class OutputFiles:
    """Outputs written to temporary files and renamed into place together.

    Each :meth:`stage` creates an empty temporary file beside its destination
    (same folder, hence same filesystem): ``.NAME.XXXXXXXX.tmp.EXT``, keeping
    the extension so that writers that read the format from the name (pandas'
    compression, ``np.save``, anndata, matplotlib) see the right one. When
    every writer has finished, :meth:`commit` flushes each file to disk
    (fsync) and renames all of them into place with ``os.replace``, holding
    Ctrl-C back during the renames. Leaving the ``with`` block without
    :meth:`commit` (an error, Ctrl-C) removes the temporary files, so the
    destinations keep their previous content, or stay absent.

    Examples
    --------
    >>> with OutputFiles() as files:                                # doctest: +SKIP
    ...     write_table(table, files.stage("out.tsv.gz"))
    ...     save_figure(fig, files.stage("before_after.png"))
    ...     files.commit()
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)
        self.replaced: list[Path] = []  # destinations that held a previous file

    def stage(self, path: str | Path) -> Path:
        """Create the temporary file for the output ``path`` and return its path.

        Symlinks are followed: the file a link points to is the one replaced.
        The temporary file of ``ref.npz`` is ``.ref.XXXXXXXX.tmp.npz``: the
        extension once, at the end, where writers read the format from.

        Raises
        ------
        IsADirectoryError
            ``path`` is a folder (a file name is needed).
        FileNotFoundError
            The folder of ``path`` does not exist.
        """
        final = Path(os.path.realpath(path))
        if final.is_dir():
            raise IsADirectoryError(f"cannot write {str(path)!r}: it is a folder; give a file's "
                                    f"path, e.g. a file name inside it")
        if not final.parent.is_dir():
            raise FileNotFoundError(f"cannot write {str(path)!r}: its folder "
                                    f"{str(final.parent)!r} does not exist")
        suffix = _format_suffix(final)
        name = final.name[:len(final.name) - len(suffix)] if suffix else final.name
        name = name[:100]  # room for the random part within NAME_MAX
        with _interrupts_held():
            descriptor, temporary = tempfile.mkstemp(
                prefix=f".{name}.", suffix=f".tmp{suffix}", dir=final.parent)
            self._staged.append((Path(temporary), final))
            os.close(descriptor)
        os.chmod(temporary, _new_file_mode(final))
        logger.debug("writing %s through %s", final, temporary)
        return Path(temporary)

    def commit(self) -> None:
        """Flush every staged file to disk and rename all of them into place.

        Raises
        ------
        RuntimeError
            If a rename fails (which on one filesystem takes e.g. the folder
            vanishing): the message says which outputs were already in place.
        """
        for temporary, _ in self._staged:
            _fsync(temporary)
        done: list[Path] = []
        with _interrupts_held():
            try:
                for temporary, final in self._staged:
                    existed = final.exists()
                    os.replace(temporary, final)
                    done.append(final)
                    if existed:
                        self.replaced.append(final)
            except OSError as err:
                written = ", ".join(map(str, done)) or "nothing"
                raise RuntimeError(f"could not move the finished output into place as "
                                   f"{err.filename or final}: {err.strerror or err}; already "
                                   f"written: {written}") from err
            finally:
                self._staged = [(t, f) for t, f in self._staged if f not in done]
                self._remove_temporaries()
        for folder in {final.parent for final in done}:
            _fsync(folder, directory=True)
        for final in done:
            logger.info("wrote %s", final)

    def _remove_temporaries(self) -> None:
        for temporary, _ in self._staged:
            try:
                temporary.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:  # pragma: no cover - e.g. the folder became read-only
                logger.warning("could not remove the temporary file %s: %s", temporary, err)
        self._staged = []

    def __enter__(self) -> "OutputFiles":
        return self

    def __exit__(self, *exc_info) -> None:
        with _interrupts_held():
            self._remove_temporaries()


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
        _need_pyarrow()
        frame.to_parquet(path, index=table.has_names)
    elif fmt in ("tsv", "csv"):
        frame.to_csv(path, sep="," if fmt == "csv" else "\t", index=table.has_names)
    else:
        raise ValueError(f"cannot write a table to {str(path)!r}; use {TABLE_FORMATS_HELP}")


def write_array(path: str | Path, shape: tuple[int, int], dtype,
                fill: Callable[[np.ndarray], Any]) -> None:
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


def write_h5ad_copy(source: str | Path, path: str | Path, *, obsm: dict | None = None,
                    uns: dict | None = None) -> None:
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


def write_outputs(outputs: Sequence[tuple[str | None, Callable[[Path], None]]]) -> OutputFiles:
    """Write every ``(path, writer)`` with a path, all or none.

    Each writer writes a temporary file beside its destination; only when all
    have finished are they renamed into place together, so an error or
    Ctrl-C while writing the second output leaves the first untouched too.

    Parameters
    ----------
    outputs
        ``(destination, writer)`` pairs; a destination of None (an optional
        output not asked for) is skipped. ``writer(temporary_path)`` writes
        the whole file.

    Returns
    -------
    OutputFiles
        The committed outputs; its ``replaced`` lists the destinations that
        held a previous file.
    """
    with OutputFiles() as files:
        for path, write in outputs:
            if path is not None:
                write(files.stage(path))
        files.commit()
    return files
