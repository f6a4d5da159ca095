"""Harmony single-cell data integration on PyTorch.

The public entry points are :func:`run_harmony` (returns a :class:`Harmony`
object whose attributes follow the R package's orientation), the integration
scores :func:`compute_lisi` and :func:`evaluate`, the AnnData helpers
:func:`integrate` and :func:`harmony_integrate` (scanpy's signature), and
reference mapping with :func:`build_reference`,
:func:`map_query` and :func:`transfer_labels`.
"""

from __future__ import annotations

# The one source of the version (pyproject.toml reads it: [tool.hatch.version]). Set
# before the imports below: submodules read it when they are imported.
__version__ = "3.0.0.dev0"

from harmonypy import datasets  # noqa: E402
from harmonypy.adapters.anndata import integrate  # noqa: E402
from harmonypy.adapters.mapping_api import build_reference, map_query, transfer_labels  # noqa: E402
from harmonypy.adapters.scanpy import harmony_integrate  # noqa: E402
from harmonypy.engine.convergence import ConvergenceWarning, IterationReport  # noqa: E402
from harmonypy.engine.harmony import Harmony  # noqa: E402
from harmonypy.engine.run import run_harmony  # noqa: E402
from harmonypy.mapping.query import MappedQuery  # noqa: E402
from harmonypy.mapping.reference import Reference  # noqa: E402
from harmonypy.mapping.reference_file import load_reference  # noqa: E402
from harmonypy.metrics.evaluate import IntegrationScores, evaluate  # noqa: E402
from harmonypy.metrics.lisi import compute_lisi  # noqa: E402

__all__ = [
    "ConvergenceWarning",
    "Harmony",
    "IntegrationScores",
    "IterationReport",
    "MappedQuery",
    "Reference",
    "build_reference",
    "compute_lisi",
    "datasets",
    "evaluate",
    "harmony_integrate",
    "integrate",
    "load_reference",
    "map_query",
    "run_harmony",
    "transfer_labels",
    "__version__",
]
