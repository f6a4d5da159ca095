"""``harmonypy evaluate`` (:mod:`harmonypy.cli.evaluate`)."""

from __future__ import annotations

import pandas as pd
import pytest
from cli_support import (
    run_main,
    small,  # noqa: F401 - fixtures
)

import harmonypy as hm


def test_evaluate(small, tmp_path, capsys):
    pcs_path, meta_path, _, _ = small
    out = tmp_path / "lisi.tsv"
    status, stdout, err = run_main(
        [
            "evaluate",
            pcs_path,
            meta_path,
            "--batch",
            "donor",
            "--label",
            "cell_type",
            "--perplexity",
            "20",
            "-o",
            out,
        ],
        capsys,
    )
    assert status == 0, err
    header, ilisi, clisi = stdout.strip().splitlines()
    assert header.split() == [
        "score",
        "column",
        "levels",
        "best",
        "median",
        "scaled",
        "mean",
        "q05",
        "q95",
    ]
    assert ilisi.split()[:4] == ["iLISI", "donor", "3", "3"]
    assert clisi.split()[:4] == ["cLISI", "cell_type", "9", "1"]
    # The medians and scaled scores agree with harmonypy.evaluate.
    scores = hm.evaluate(small[2], small[3], "donor", "cell_type", perplexity=20)
    assert float(ilisi.split()[4]) == pytest.approx(scores.ilisi_median, abs=1e-3)
    assert float(ilisi.split()[5]) == pytest.approx(scores.ilisi_scaled, abs=1e-3)
    assert float(clisi.split()[5]) == pytest.approx(scores.clisi_scaled, abs=1e-3)
    per_cell = pd.read_csv(out, sep="\t", index_col=0)  # named by META's cell_id
    assert list(per_cell.index) == list(small[3]["cell_id"])
    assert list(per_cell.columns) == ["iLISI_donor", "cLISI_cell_type"]
    assert per_cell.shape == (1200, 2) and (per_cell.to_numpy() >= 1 - 1e-9).all()
