"""``harmonypy demo`` and ``harmonypy example-data`` (:mod:`harmonypy.cli.demo`)."""

from __future__ import annotations

import re

import pandas as pd
from cli_support import harmonypy

from harmonypy import cli


def test_demo():
    proc = harmonypy("demo")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for fragment in ["3,500", "donor: 3 levels", "A (500)", "R agreement", "median"]:
        assert fragment in out, out
    # The run agrees with R and improves donor mixing.
    r_min = float(re.search(r"min (\d\.\d+)", out).group(1))
    assert r_min > 0.95, out
    mixing = re.search(r"median (\d\.\d+) before -> (\d\.\d+) after", out)
    assert mixing, out
    assert float(mixing.group(2)) > float(mixing.group(1)) + 0.5, out


def test_example_data_writes_the_bundled_example_and_keeps_existing_files(tmp_path):
    assert cli.main(["example-data", str(tmp_path)]) == 0
    pcs = pd.read_csv(tmp_path / "pcs.tsv.gz", sep="\t", index_col=0)
    meta = pd.read_csv(tmp_path / "meta.tsv.gz", sep="\t", index_col=0)
    assert pcs.shape == (1200, 20) and pcs.index.equals(meta.index)
    assert {"donor", "cell_type"} <= set(meta.columns)
    before = (tmp_path / "pcs.tsv.gz").read_bytes()
    assert cli.main(["example-data", str(tmp_path)]) == 2  # refused: files exist
    assert (tmp_path / "pcs.tsv.gz").read_bytes() == before
    assert cli.main(["example-data", str(tmp_path), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.tsv.gz", "pcs.tsv.gz"]
