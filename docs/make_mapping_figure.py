"""Regenerate the figure of docs/mapping-tutorial.md into docs/figures/.

Usage::

    python docs/make_mapping_figure.py

Runs the tutorial's own code blocks (in a temporary folder, up to the block
that draws the figure), so the picture is exactly what the tutorial's code
draws, and writes ``mapping_query_over_reference.png``: the 5' PBMCs (query)
over the two 3' chemistries (reference) in PC1 and PC4, before and after
mapping, and the query coloured by its transferred cell type. The PNG is a
128-colour palette image (~90 dpi), as the figures of ``make_figures.py``.
"""

from __future__ import annotations

import os
import re
import tempfile
from io import BytesIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script that writes files; no window wanted

import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
TUTORIAL = HERE / "mapping-tutorial.md"
OUTPUT = HERE / "figures" / "mapping_query_over_reference.png"
DPI = 90


def tutorial_blocks() -> list[str]:
    """The ```python blocks of the tutorial, in order."""
    return re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(encoding="utf-8"), re.S)


def draw() -> matplotlib.figure.Figure:
    """Run the tutorial up to its figure and return the figure."""
    namespace: dict = {"__name__": "__tutorial__"}
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)  # the tutorial writes its reference file and figure here
        try:
            for block in tutorial_blocks():
                exec(compile(block, str(TUTORIAL), "exec"), namespace)
                if "savefig" in block:
                    return namespace["fig"]
        finally:
            os.chdir(here)
    raise RuntimeError(f"no block of {TUTORIAL} draws a figure")


def main() -> None:
    from PIL import Image  # pillow is a dependency of matplotlib

    fig = draw()
    buffer = BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    plt.close(fig)
    image = Image.open(buffer).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(OUTPUT, optimize=True)
    print(f"wrote {OUTPUT.relative_to(HERE.parent)} ({OUTPUT.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
