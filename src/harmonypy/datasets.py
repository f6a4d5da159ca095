"""Example data shipped with the package and a simulator of batch effects.

``load_pbmc_3500()`` returns the 3,500-cell PBMC example of the R package
(30 PCs, three donors) together with the R package's own corrected PCs, the
reference every Harmony implementation is compared with;
``load_pbmc_3500_harmony2_reference()`` the same corrected by R harmony 2.0.4;
``load_pbmcs_small()`` 1,200 PBMCs with cell-type labels.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd

__all__ = ["load_pbmc_3500", "load_pbmc_3500_harmony2_reference", "load_pbmcs_small",
           "simulate"]


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


def load_pbmc_3500_harmony2_reference() -> pd.DataFrame:
    """The PBMC example's PCs corrected by R harmony 2.0.4 with its defaults, (3500, 30)."""
    return _read("pbmc_3500_pcs_harmonized_harmony2.tsv.gz")


def load_pbmcs_small() -> tuple[pd.DataFrame, pd.DataFrame]:
    """1,200 PBMCs from three 10x chemistries, with cell types.

    Returns
    -------
    pcs : DataFrame, (1200, 20)
    meta : DataFrame, (1200, 7)
        Columns include ``donor`` (the chemistry: 3pv1, 3pv2, 5p), ``cell_type``
        (9 types) and ``cell_type_broad``.
    """
    return _read("pbmcs_small_pcs.tsv.gz"), _read("pbmcs_small_meta.tsv.gz")


def simulate(*args, **kwargs) -> tuple[np.ndarray, pd.DataFrame]:
    """Simulated PCA embedding with batch effects; see :func:`harmonypy._simulate.simulate`."""
    from harmonypy._simulate import simulate as _simulate

    return _simulate(*args, **kwargs)
