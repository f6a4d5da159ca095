"""Optional dependencies: importing them when a feature needs them, with the install hint.

Any layer may import this module: it imports nothing from the package, so it
cannot take part in an import circle, and it imports an optional package only
when its helper is called (``import harmonypy`` works without them).
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["ANNDATA_HINT", "PYARROW_HINT", "ZARR_HINT", "require_anndata", "require_pyarrow",
           "require_zarr"]

#: How to install anndata (reading and writing ``.h5ad`` files).
ANNDATA_HINT = "pip install harmonypy[anndata]"
#: How to install pyarrow (reading and writing ``.parquet`` tables).
PYARROW_HINT = "pip install pyarrow"
#: How to install zarr (reading an embedding from a ``.zarr`` store).
ZARR_HINT = "pip install zarr"


def require_anndata() -> ModuleType:
    """Import and return the ``anndata`` module.

    Raises
    ------
    ImportError
        When anndata is not installed; the message gives :data:`ANNDATA_HINT`.
    """
    try:
        # Imported on call, not at the top: anndata is optional, and `import
        # harmonypy` must work without it.
        import anndata
    except ImportError as err:
        raise ImportError(
            f"reading or writing .h5ad files needs the anndata package: {ANNDATA_HINT}"
        ) from err
    return anndata


def require_pyarrow() -> None:
    """Check that pyarrow, which pandas reads and writes Parquet with, is installed.

    Raises
    ------
    ImportError
        When pyarrow is not installed; the message gives :data:`PYARROW_HINT`.
    """
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError(f"Parquet files need pyarrow: {PYARROW_HINT}") from None


def require_zarr(purpose: str) -> ModuleType:
    """Import and return the ``zarr`` module.

    Parameters
    ----------
    purpose : str
        What needs it, to begin the message (``"reading PATH"``).

    Raises
    ------
    ImportError
        When zarr is not installed; the message gives :data:`ZARR_HINT`.
    """
    try:
        import zarr
    except ImportError as err:
        raise ImportError(f"{purpose} needs zarr: {ZARR_HINT}") from err
    return zarr
