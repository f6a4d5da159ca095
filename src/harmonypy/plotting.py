"""Pictures of a Harmony run: convergence and before/after embeddings.

matplotlib is optional (``pip install harmonypy[plot]``) and imported only when
a function here is called. Nothing here calls ``plt.show()`` or changes
matplotlib's global settings: styling is applied through ``rc_context`` and
per-artist arguments, and figures are returned for the caller to show or save.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from harmonypy._optional import PLOT_HINT, import_optional
from harmonypy.engine.cellnames import align_to_names, carries_names, match_order

logger = logging.getLogger(__name__)

_REMEDY = (
    "Give the embeddings and meta the same cells (e.g. meta.loc[ho.cell_names]), or "
    "drop their names to pair rows by position (meta.reset_index(drop=True))"
)

__all__ = ["plot_convergence", "plot_embedding", "embedding_figsize"]

# Small, readable defaults for figures shared in papers and notebooks.
_RC = {
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": "medium",
    "legend.frameon": False,
}
# Categories beyond this are drawn but not listed in the legend.
_MAX_LEGEND = 20


def require_pyplot():
    return import_optional("matplotlib.pyplot", f"plotting needs matplotlib: {PLOT_HINT}")


# ------------------------------------------------------------- convergence
def _round_iterations(ho: Any) -> np.ndarray:
    """Harmony iteration (0 = initialisation) of every entry of ``objective_kmeans``."""
    n_obj = len(ho.objective_kmeans)
    rounds = [int(r) for r in getattr(ho, "kmeans_rounds", [])]
    labels = np.repeat(np.arange(1, len(rounds) + 1), rounds)
    if n_obj == labels.size + 1:  # the initial objective comes first
        return np.concatenate([[0], labels])
    if n_obj == labels.size:
        return labels
    # Unknown layout (e.g. a run stopped part-way): colour nothing wrongly.
    logger.debug("objective_kmeans (%d) does not match kmeans_rounds (%d)", n_obj, labels.size)
    return np.zeros(n_obj, dtype=int)


def plot_convergence(ho: Any, ax=None):
    """Plot the Harmony objective after every clustering round.

    Like the R package's convergence plot: one point per clustering round,
    joined within each Harmony iteration and coloured by iteration (0 is the
    initial clustering). A downward staircase that flattens out means the run
    converged.

    Parameters
    ----------
    ho : Harmony
        A finished run (anything with ``objective_kmeans`` and
        ``kmeans_rounds``; ``n_iter`` and ``converged`` are used in the title
        when present).
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new 5 x 3.2 inch figure.

    Returns
    -------
    matplotlib.axes.Axes
    """
    plt = require_pyplot()
    objective = np.asarray(ho.objective_kmeans, dtype=float)
    if objective.size == 0:
        raise ValueError("the Harmony object has no objective values yet: run it first")
    iterations = _round_iterations(ho)
    with plt.rc_context(_RC):
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
        n_colors = int(iterations.max()) + 1
        cmap = plt.get_cmap("viridis", max(n_colors, 2))
        # Round 0 is the initial clustering when the run recorded it.
        x = np.arange(objective.size) + (0 if iterations[0] == 0 else 1)
        for it in range(n_colors):
            sel = iterations == it
            if not sel.any():
                continue
            label = "init" if it == 0 else str(it)
            ax.plot(x[sel], objective[sel], "-o", color=cmap(it), ms=3.5, lw=1, label=label)
        ax.set_xlabel("clustering round (all iterations)")
        ax.set_ylabel("objective")
        ax.set_title(_convergence_title(ho))
        if n_colors > 1:
            ax.legend(
                title="Harmony\niteration",
                fontsize="small",
                title_fontsize="small",
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                borderaxespad=0,
            )
    return ax


def _convergence_title(ho: Any) -> str:
    n_iter = getattr(ho, "n_iter", None)
    if n_iter is None:
        return "Harmony convergence"
    state = "converged" if getattr(ho, "converged", False) else "not converged"
    return f"Harmony: {n_iter} iteration{'s' if n_iter != 1 else ''}, {state}"


# --------------------------------------------------------------- embedding
def plot_embedding(
    before: Any,
    after: Any,
    meta: pd.DataFrame,
    color: str | Sequence[str],
    *,
    basis: str = "pcs",
    dims: tuple[int, int] = (0, 1),
    fig=None,
    point_size: float | None = None,
    random_state: int = 0,
    titles: tuple[str, str] = ("Before Harmony", "After Harmony"),
):
    """Scatter plots of an embedding before and after Harmony, side by side.

    One row per column in ``color``, two columns (before, after). Cells are
    drawn in a shuffled order so that no batch hides another, which is what
    makes mixing (or its absence) visible.

    Parameters
    ----------
    before : array-like or DataFrame, (N, d)
        Embedding before integration (cells in rows).
    after : array-like or DataFrame, (N, d), or a Harmony object
        Embedding after integration; for a Harmony object ``Z_corr.T`` is used.
    meta : DataFrame with N rows
        Cell metadata holding the ``color`` columns. When the cells are named
        (``ho.cell_names`` of a Harmony object, a DataFrame's index), ``meta``
        and the other embedding are paired with them by name, as
        :func:`~harmonypy.run_harmony` pairs its inputs: the same names in
        another order are reordered, names that disagree are refused (a
        ``ValueError`` naming a few of each side's). Unnamed sides pair by
        row position.
    color : str or list of str
        Column(s) of ``meta`` to colour by, e.g. ``["donor", "cell_type"]``.
        Categorical columns get a legend, numeric ones a colour bar.
    basis : {"pcs", "umap"}, default "pcs"
        ``"pcs"`` plots two coordinates of the embedding (see ``dims``);
        ``"umap"`` computes a 2-D UMAP of each embedding first (needs
        ``pip install umap-learn``).
    dims : (int, int), default (0, 1)
        Zero-based columns plotted with ``basis="pcs"``: (0, 1) is PC1 vs PC2.
        Batch effects often live in later PCs; (0, 3) shows PC1 vs PC4.
    fig : matplotlib.figure.Figure, optional
        Figure to draw into (it should be empty); default a new figure sized
        to the number of rows.
    point_size : float, optional
        Marker area; default scales with the number of cells.
    random_state : int, default 0
        Seed of the drawing order and of UMAP.
    titles : (str, str), default ("Before Harmony", "After Harmony")
        Column titles.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = require_pyplot()
    colors = [color] if isinstance(color, str) else list(color)
    before, after, meta = _paired(before, after, meta)
    before_xy, names = _coordinates(before, basis, dims, random_state)
    after_xy, after_names = _coordinates(after, basis, dims, random_state)
    _check_inputs(before_xy, after_xy, meta, colors)
    order = np.random.default_rng(random_state).permutation(len(meta))
    size = point_size if point_size is not None else float(np.clip(1.2e4 / len(meta), 1.0, 20))

    with plt.rc_context(_RC):
        if fig is None:
            fig = plt.figure(figsize=embedding_figsize(len(colors)), layout="constrained")
        axes = np.asarray(fig.subplots(len(colors), 2, squeeze=False))
        for row, column in enumerate(colors):
            values = meta[column].to_numpy()
            panels = ((before_xy, names), (after_xy, after_names))
            for col, (xy, axis_names) in enumerate(panels):
                ax = axes[row, col]
                handle = _scatter(ax, xy[order], values[order], size, plt)
                ax.set_xlabel(axis_names[0])
                ax.set_ylabel(axis_names[1])
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{titles[col]}: {column}")
            _legend(axes[row, 1], values, handle, column, fig, plt)
    return fig


def embedding_figsize(n_rows: int) -> tuple[float, float]:
    """Default (width, height) in inches of :func:`plot_embedding` with ``n_rows`` colours."""
    return (8.4, 3.4 * n_rows)


def _coordinates(
    data: Any, basis: str, dims: tuple[int, int], random_state: int
) -> tuple[np.ndarray, list[str]]:
    """The two columns to plot, (N, 2), and their axis names."""
    if hasattr(data, "Z_corr") and hasattr(data, "objective_harmony"):
        data = data.Z_corr.T
    columns = None
    if isinstance(data, pd.DataFrame):
        columns = [str(c) for c in data.columns]
        data = data.to_numpy(dtype=float)
    data = np.asarray(data, dtype=float)
    if data.ndim != 2 or data.shape[1] < 2:
        raise ValueError(
            f"an embedding with cells in rows and at least 2 columns is needed, "
            f"got shape {data.shape}"
        )
    if basis == "pcs":
        picked = [int(d) for d in dims]
        if len(picked) != 2 or not all(0 <= d < data.shape[1] for d in picked):
            raise ValueError(
                f"dims must be two column indices below {data.shape[1]}, got {tuple(picked)}"
            )
        names = [columns[d] if columns else f"PC{d + 1}" for d in picked]
        return data[:, picked], names
    if basis == "umap":
        return _umap(data, random_state), ["UMAP1", "UMAP2"]
    raise ValueError(f"basis must be 'pcs' or 'umap', got {basis!r}")


def _names_of(data: Any) -> tuple[pd.Index | None, str]:
    """The cell names of an embedding (a Harmony run's, a DataFrame's index) and their source."""
    if hasattr(data, "Z_corr") and hasattr(data, "objective_harmony"):
        return getattr(data, "cell_names", None), "the Harmony run's cell names (ho.cell_names)"
    if isinstance(data, pd.DataFrame) and carries_names(data.index):
        return data.index, "{}'s index"
    return None, ""


def _paired(before: Any, after: Any, meta: Any) -> tuple[Any, Any, Any]:
    """``before`` and ``meta`` in the order of ``after``'s named cells (or ``after``
    and ``meta`` in ``before``'s): every named side is paired by name, so that
    no cell is drawn with another cell's colour."""
    (after_names, after_from), (before_names, before_from) = _names_of(after), _names_of(before)
    if after_names is None and before_names is None:
        return before, after, meta
    names: pd.Index
    if after_names is not None:
        names, cells_from = after_names, after_from.format("after")
        other, other_names, other_from = before, before_names, before_from.format("before")
    else:
        assert before_names is not None  # both None returned above
        names, cells_from = before_names, before_from.format("before")
        other, other_names, other_from = after, None, ""
    if other_names is not None:
        order = match_order(
            pd.Index(names),
            other_names,
            cells_from=cells_from,
            meta_from=other_from,
            remedy=_REMEDY,
        )
        if order is not None:
            other = other.iloc[order]
    if isinstance(meta, (pd.DataFrame, pd.Series)):
        meta = align_to_names(
            pd.Index(names), meta, cells_from=cells_from, meta_name="meta", remedy=_REMEDY
        )[0]
    return (other, after, meta) if after_names is not None else (before, other, meta)


def _umap(data: np.ndarray, random_state: int) -> np.ndarray:
    try:
        import umap
    except ImportError as err:
        raise ImportError("basis='umap' needs umap-learn: pip install umap-learn") from err
    return umap.UMAP(n_components=2, random_state=random_state).fit_transform(data)


def _check_inputs(before: np.ndarray, after: np.ndarray, meta: Any, colors: list[str]) -> None:
    if not isinstance(meta, pd.DataFrame):
        raise TypeError(f"meta must be a pandas DataFrame, got {type(meta).__name__}")
    if not colors:
        raise ValueError("color must name at least one column of meta")
    if not (len(before) == len(after) == len(meta)):
        raise ValueError(
            f"before ({len(before)} cells), after ({len(after)}) and meta "
            f"({len(meta)} rows) must have the same number of cells"
        )
    missing = [c for c in colors if c not in meta.columns]
    if missing:
        raise KeyError(
            f"color column(s) {', '.join(map(repr, missing))} not in meta; "
            f"available: {', '.join(map(repr, map(str, meta.columns)))}"
        )


def _is_numeric(values: np.ndarray) -> bool:
    # Few distinct integers (cluster ids, donor numbers) read better as categories.
    if values.dtype.kind not in "iuf":
        return False
    return values.dtype.kind == "f" or len(np.unique(values)) > _MAX_LEGEND


def _palette(n: int, plt) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _scatter(ax, xy: np.ndarray, values: np.ndarray, size: float, plt):
    if _is_numeric(values):
        return ax.scatter(
            xy[:, 0], xy[:, 1], c=values, s=size, cmap="viridis", linewidths=0, rasterized=True
        )
    categories, codes = np.unique(values.astype(str), return_inverse=True)
    colors = np.asarray(_palette(len(categories), plt))
    return ax.scatter(xy[:, 0], xy[:, 1], c=colors[codes], s=size, linewidths=0, rasterized=True)


def _legend(ax, values: np.ndarray, handle, column: str, fig, plt) -> None:
    if _is_numeric(values):
        fig.colorbar(handle, ax=ax, label=column, shrink=0.8)
        return
    categories = np.unique(values.astype(str))
    colors = _palette(len(categories), plt)
    shown = list(zip(categories, colors, strict=True))[:_MAX_LEGEND]
    handles = [plt.Line2D([], [], ls="", marker="o", ms=5, color=c) for _, c in shown]
    labels = [str(cat) for cat, _ in shown]
    if len(categories) > _MAX_LEGEND:
        handles.append(plt.Line2D([], [], ls=""))
        labels.append(f"... {len(categories) - _MAX_LEGEND} more")
    ax.legend(
        handles,
        labels,
        title=column,
        fontsize="small",
        title_fontsize="small",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0,
        handletextpad=0.2,
    )
