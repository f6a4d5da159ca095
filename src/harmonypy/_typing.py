"""Type aliases for the public API's arguments (annotations only; each function's
docstring says what it accepts and why)."""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias

import numpy as np
import pandas as pd
import torch
from numpy.typing import ArrayLike

__all__ = [
    "AnnDataLike",
    "DeviceLike",
    "DtypeLike",
    "MatrixLike",
    "MetadataLike",
    "RandomStateLike",
    "SparseMatrix",
]


class SparseMatrix(Protocol):
    """A SciPy sparse matrix (SciPy is not a dependency, so it is described by shape)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def toarray(self) -> np.ndarray: ...


#: Cells as a matrix: a NumPy array (a memory-mapped one too), a DataFrame, a
#: torch tensor, a SciPy sparse matrix, or anything ``np.asarray`` takes.
MatrixLike: TypeAlias = ArrayLike | pd.DataFrame | torch.Tensor | SparseMatrix
#: The cells' batch variables: a DataFrame, or a Series or array of labels.
MetadataLike: TypeAlias = pd.DataFrame | pd.Series | ArrayLike
#: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, a ``torch.device``; None picks one.
DeviceLike: TypeAlias = str | torch.device | None
#: ``"float32"``, ``"float64"`` or a torch float type; None: the default.
DtypeLike: TypeAlias = str | torch.dtype | None
#: An int seed, a NumPy ``Generator`` or ``RandomState`` (drawn from once), or
#: None (fresh entropy from the operating system).
RandomStateLike: TypeAlias = int | np.random.Generator | np.random.RandomState | None
#: An ``anndata.AnnData`` (or a look-alike with ``obs``/``obsm``/``uns``);
#: anndata is an optional dependency without type information.
AnnDataLike: TypeAlias = Any
