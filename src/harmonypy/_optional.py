"""Optional dependencies: importing them when a feature needs them, with the install hint.

Any layer may import this module: it imports nothing from the package, so it
cannot take part in an import circle, and it imports an optional package only
when its helper is called (``import harmonypy`` works without them).
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["ANNDATA_HINT", "require_anndata"]

#: How to install anndata (reading and writing ``.h5ad`` files).
ANNDATA_HINT = "pip install harmonypy[anndata]"


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
