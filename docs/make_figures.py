"""Regenerate the figures of docs/tutorial.md into docs/figures/.

Usage::

    python docs/make_figures.py [--data DIR] [--no-umap]

Figures (PNG, ~90 dpi, each well under 150 KB):

* ``pbmc_3500_donor.png``: the bundled PBMC example (3,500 cells, 3 donors),
  PC1 vs PC4 before and after Harmony, coloured by donor.
* ``pbmc_3500_convergence.png``: the objective of that run per clustering round.
* ``pbmcs_small_pcs.png``: 1,200 PBMCs from three 10x chemistries, PC1 vs PC4,
  coloured by donor and by cell type.
* ``pbmcs_small_umap.png``: the same as a UMAP of each embedding (only when
  umap-learn is installed; ``--no-umap`` skips it).

The 1,200-cell data set (``pbmcs_small_pcs.tsv.gz``, ``pbmcs_small_meta.tsv.gz``)
has cell-type labels, which the bundled example lacks. It is read from
``--data``, ``$HARMONYPY_SHARED_DATA`` or ``../shared/data`` beside the
repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script that writes files; no window wanted

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import harmonypy as hm  # noqa: E402
from harmonypy import datasets, plotting  # noqa: E402

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
DPI = 90
SEED = 0


def _save(fig, name: str) -> None:
    """Write ``fig`` as a palette PNG (scatter plots compress poorly in full colour)."""
    from io import BytesIO

    from PIL import Image  # pillow is a dependency of matplotlib

    path = FIGURES / name
    buffer = BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    plt.close(fig)
    image = Image.open(buffer).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path.relative_to(HERE.parent)} ({path.stat().st_size / 1024:.0f} KB)")


def _small_data(data_dir: str | None) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    candidates = [
        data_dir,
        os.environ.get("HARMONYPY_SHARED_DATA"),
        HERE.parents[1] / "shared" / "data",
    ]
    for folder in candidates:
        if folder and (Path(folder) / "pbmcs_small_pcs.tsv.gz").is_file():
            pcs = pd.read_csv(Path(folder) / "pbmcs_small_pcs.tsv.gz", sep="\t")
            meta = pd.read_csv(Path(folder) / "pbmcs_small_meta.tsv.gz", sep="\t")
            return pcs, meta
    return None


def pbmc_3500_figures() -> None:
    pcs, meta, _ = datasets.load_pbmc_3500()
    ho = hm.run_harmony(pcs, meta, "donor", random_state=SEED, verbose=False)
    # The donor effect of this data set lies mostly along PC4.
    fig = plotting.plot_embedding(pcs, ho, meta, ["donor"], dims=(0, 3))
    _save(fig, "pbmc_3500_donor.png")
    ax = plotting.plot_convergence(ho)
    _save(ax.figure, "pbmc_3500_convergence.png")


def pbmcs_small_figures(data_dir: str | None, umap: bool) -> None:
    data = _small_data(data_dir)
    if data is None:
        print("skipped pbmcs_small figures: data not found (use --data DIR)")
        return
    pcs, meta = data
    ho = hm.run_harmony(pcs, meta, "donor", random_state=SEED, verbose=False)
    colors = ["donor", "cell_type"]
    _save(plotting.plot_embedding(pcs, ho, meta, colors, dims=(0, 3)), "pbmcs_small_pcs.png")
    if umap and importlib.util.find_spec("umap") is not None:
        fig = plotting.plot_embedding(pcs, ho, meta, colors, basis="umap", random_state=SEED)
        _save(fig, "pbmcs_small_umap.png")
    elif umap:
        print("skipped pbmcs_small_umap.png: pip install umap-learn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder with pbmcs_small_*.tsv.gz")
    parser.add_argument("--no-umap", action="store_true", help="skip the UMAP figure")
    args = parser.parse_args()
    FIGURES.mkdir(exist_ok=True)
    pbmc_3500_figures()
    pbmcs_small_figures(args.data, umap=not args.no_umap)


if __name__ == "__main__":
    main()
