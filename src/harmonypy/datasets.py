"""Example data shipped with the package and a simulator of batch effects.

``load_pbmc_3500()`` returns the 3,500-cell PBMC example of the R package
(30 PCs, three donors) together with the R package's own corrected PCs, the
reference every Harmony implementation is compared with.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd

__all__ = ["load_pbmc_3500", "simulate"]


def _read(name: str) -> pd.DataFrame:
    with resources.files("harmonypy").joinpath("data", name).open("rb") as handle:
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
    """
    return (_read("pbmc_3500_pcs.tsv.gz"), _read("pbmc_3500_meta.tsv.gz"),
            _read("pbmc_3500_pcs_harmonized.tsv.gz"))


def simulate(*args, **kwargs) -> tuple[np.ndarray, pd.DataFrame]:
    """Simulated PCA embedding with batch effects; see :func:`harmonypy._simulate.simulate`."""
    from harmonypy._simulate import simulate as _simulate

    return _simulate(*args, **kwargs)
