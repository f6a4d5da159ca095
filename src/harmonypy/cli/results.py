"""What the commands say and draw about their results."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from harmonypy.io.outputs import OutputFiles


def replaced(files: OutputFiles, path: str) -> str:
    """``' (replaced the previous file)'`` if the output ``path`` replaced one."""
    final = Path(os.path.realpath(path))
    return " (replaced the previous file)" if final in files.replaced else ""


def outcome(ho) -> str:
    """How the Harmony run ended: converged after N iterations, or stopped."""
    if ho.converged:
        return f"converged after {ho.n_iter} iteration{'s' if ho.n_iter != 1 else ''}"
    return f"stopped after {ho.n_iter} iterations without converging"


def embedding_figure(
    before, after, meta: pd.DataFrame, color: Sequence[str], pcs: tuple[int, int] = (1, 2)
):
    """The before/after scatter plot as a matplotlib Figure (not yet saved)."""
    from harmonypy.plotting import embedding_figsize, plot_embedding, require_pyplot

    require_pyplot()  # the install hint when matplotlib is missing
    from matplotlib.figure import Figure

    # A Figure outside pyplot renders to a file without choosing a GUI backend
    # or keeping the figure alive in pyplot's registry.
    fig = Figure(figsize=embedding_figsize(len(color)), layout="constrained")
    plot_embedding(
        before,
        after,
        meta.reset_index(drop=True),
        list(color),
        dims=(pcs[0] - 1, pcs[1] - 1),
        fig=fig,
    )
    return fig
