"""Optional dependencies: importing them when a feature needs them, with the install hint.

Any layer may import this module: it imports nothing from the package, so it
cannot take part in an import circle, and it imports an optional package only
when its helper is called (``import harmonypy`` works without them).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "ANN_HINT",
    "ANNDATA_HINT",
    "FAISS_HINT",
    "PLOT_HINT",
    "PYARROW_HINT",
    "ZARR_HINT",
    "import_optional",
    "require_anndata",
    "require_pyarrow",
    "require_zarr",
]

#: How to install anndata (reading and writing ``.h5ad`` files).
ANNDATA_HINT = "pip install harmonypy[anndata]"
#: How to install pyarrow (reading and writing ``.parquet`` tables).
PYARROW_HINT = "pip install harmonypy[parquet]"
#: How to install zarr (reading an embedding from a ``.zarr`` store).
ZARR_HINT = "pip install zarr"
#: How to install matplotlib (plots, figure files).
PLOT_HINT = "pip install harmonypy[plot]"
#: How to install pynndescent (approximate neighbour search).
ANN_HINT = "pip install harmonypy[ann]"
#: How to install faiss (its exact neighbour search).
FAISS_HINT = "pip install harmonypy[faiss]"


def import_optional(name: str, message: str) -> ModuleType:
    """Import ``name`` on call (it is optional: ``import harmonypy`` works without it),
    or raise ImportError with ``message``."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(message) from err


def require_anndata() -> ModuleType:
    """Import and return the ``anndata`` module.

    Raises
    ------
    ImportError
        When anndata is not installed; the message gives :data:`ANNDATA_HINT`.
    """
    return import_optional(
        "anndata", f"reading or writing .h5ad files needs the anndata package: {ANNDATA_HINT}"
    )


def require_pyarrow() -> None:
    """Check that pyarrow, which pandas reads and writes Parquet with, is installed.

    Raises
    ------
    ImportError
        When pyarrow is not installed; the message gives :data:`PYARROW_HINT`.
    """
    import_optional("pyarrow", f"Parquet files need pyarrow: {PYARROW_HINT}")


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
    return import_optional("zarr", f"{purpose} needs zarr: {ZARR_HINT}")
