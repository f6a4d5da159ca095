"""Cells meet their own metadata rows: matching by name in the API."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

import harmonypy as hm
from harmonypy.engine.cellnames import align_metadata, carries_names, text_names


@pytest.fixture(scope="module")
def named():
    """A small named embedding with a batch column, and its metadata."""
    pcs, meta = hm.datasets.load_pbmcs_small()
    pcs = pcs.iloc[:300].copy()
    # Without its cell_id column: those barcodes would be a second, different
    # set of names for the same rows.
    meta = meta.iloc[:300].drop(columns="cell_id")
    names = [f"cell{i:04d}" for i in range(len(pcs))]
    pcs.index = names
    meta.index = names
    return pcs, meta


def _run(pcs, meta):
    return hm.run_harmony(pcs, meta, "donor", verbose=False, nclust=5, max_iter_harmony=2)


def test_shuffled_metadata_is_matched_by_name(named, caplog):
    pcs, meta = named
    shuffled = meta.sample(frac=1.0, random_state=1)
    before = shuffled.copy()
    expected = _run(pcs, meta).Z_corr
    with caplog.at_level(logging.INFO, logger="harmonypy"):
        got = _run(pcs, shuffled).Z_corr
    np.testing.assert_array_equal(got, expected)
    assert "reordered" in caplog.text
    pd.testing.assert_frame_equal(shuffled, before)  # the caller's frame is untouched


def test_pcs_by_cells_dataframe_is_matched_by_its_columns(named):
    pcs, meta = named
    shuffled = meta.sample(frac=1.0, random_state=2)
    expected = _run(pcs, meta).Z_corr
    np.testing.assert_array_equal(_run(pcs.T, shuffled).Z_corr, expected)


def test_series_of_labels_is_matched_by_name(named):
    pcs, meta = named
    labels = meta["donor"].sample(frac=1.0, random_state=3)
    expected = _run(pcs, meta).Z_corr
    got = hm.run_harmony(pcs, labels, verbose=False, nclust=5, max_iter_harmony=2).Z_corr
    np.testing.assert_array_equal(got, expected)


def test_name_column_in_metadata_is_used(named):
    pcs, meta = named
    shuffled = meta.sample(frac=1.0, random_state=4)
    with_column = shuffled.reset_index(names="barcode")
    expected = _run(pcs, meta).Z_corr
    np.testing.assert_array_equal(_run(pcs, with_column).Z_corr, expected)


def test_partial_overlap_is_an_error_naming_cells(named):
    pcs, meta = named
    other = meta.copy()
    other.index = [f"other{i}" for i in range(100)] + list(meta.index[100:])
    with pytest.raises(
        ValueError, match=r"200 of the embedding's 300 cells \(67%\).*'cell0000'.*'other0'"
    ):
        _run(pcs, other)


def test_duplicated_names_are_an_error(named):
    pcs, meta = named
    repeated = pcs.copy()
    repeated.index = list(pcs.index[:-1]) + [pcs.index[0]]
    with pytest.raises(ValueError, match=r"more than once.*'cell0000'"):
        _run(repeated, meta)


def test_row_order_when_one_side_has_no_names(named):
    pcs, meta = named
    plain = meta.reset_index(drop=True)
    expected = _run(pcs, meta).Z_corr
    np.testing.assert_array_equal(_run(pcs, plain).Z_corr, expected)
    np.testing.assert_array_equal(_run(pcs.to_numpy(), meta).Z_corr, expected)


# Issue #11: both sides name their cells, but no name is shared.
def _stripped(meta):
    """The metadata with other names (``cell0000`` -> ``c0000``), in reverse order."""
    other = meta.iloc[::-1].copy()
    other.index = [name.replace("cell", "c") for name in other.index]
    return other


@pytest.mark.parametrize("where", ["index", "cell_id", "barcode", "obs_names"])
def test_names_sharing_nothing_are_an_error_not_row_order(named, where):
    pcs, meta = named
    other = _stripped(meta)
    if where != "index":
        other = other.reset_index(names=where)
    source = "meta_data's index" if where == "index" else f"meta_data column {where!r}"
    with pytest.raises(ValueError) as info:
        _run(pcs, other)
    message = str(info.value)
    assert (
        f"data_mat's index and {source} name different cells: 0 of the embedding's 300 "
        f"cells (0%) are in the metadata"
    ) in message
    assert "('cell0000', 'cell0001'," in message and "('c0299', 'c0298'," in message
    assert "reset_index(drop=True)" in message
    # The remedy works: without data_mat's names the rows pair by position.
    expected = _run(pcs.to_numpy(), other).Z_corr
    np.testing.assert_array_equal(_run(pcs.reset_index(drop=True), other).Z_corr, expected)


def test_names_sharing_nothing_are_an_error_in_lisi(named):
    pcs, meta = named
    other = _stripped(meta).reset_index(names="cell")
    with pytest.raises(ValueError, match=r"X's index and metadata column 'cell' name different"):
        hm.compute_lisi(pcs, other, ["donor"], perplexity=10)


def test_positions_are_not_names_against_a_name_column(named):
    pcs, meta = named
    other = _stripped(meta).reset_index(names="cell_id")
    expected = _run(pcs.to_numpy(), other).Z_corr
    for plain in (
        pcs.reset_index(drop=True),  # RangeIndex
        pcs.set_axis(pd.Index(np.arange(300)), axis=0),  # integers 0..N-1
        pcs.set_axis(pd.Index(np.arange(300) * 2), axis=0),  # a filtered frame's
        pcs.set_axis(pd.Index([str(i) for i in range(300)]), axis=0),
    ):  # anndata's
        np.testing.assert_array_equal(_run(plain, other).Z_corr, expected)
    # A "name" column repeating sample names is not cell names.
    samples = meta.assign(name=meta["donor"]).reset_index(drop=True)
    np.testing.assert_array_equal(_run(pcs, samples).Z_corr, _run(pcs.to_numpy(), samples).Z_corr)


def test_bundled_data_pairs_by_position():
    pcs, meta = hm.datasets.load_pbmcs_small()  # RangeIndex, meta has a cell_id column
    assert align_metadata(pcs, meta) is meta
    pcs, meta, _ = hm.datasets.load_pbmc_3500()  # meta has a cell column
    assert align_metadata(pcs, meta) is meta


@pytest.mark.parametrize(
    "names, expected",
    [
        (pd.Index(["AAAC-1", "AAAG-1"]), True),
        (pd.Index(["0", "1", "2"]), False),
        (pd.Index([3, 5, 9]), False),
        (pd.Index(["7", "x"]), True),
        (pd.Index(pd.Categorical(["a", "b"])), True),
        (pd.Index(pd.Categorical([1, 2])), False),
        (pd.Index([], dtype=object), False),
    ],
)
def test_text_names(names, expected):
    assert text_names(names) is expected


def test_lisi_matches_cells_by_name(named):
    pcs, meta = named
    shuffled = meta.sample(frac=1.0, random_state=5)
    expected = hm.compute_lisi(pcs, meta, ["donor", "cell_type"], perplexity=10)
    got = hm.compute_lisi(pcs, shuffled, ["donor", "cell_type"], perplexity=10)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "index, expected",
    [
        (pd.RangeIndex(5), False),
        (pd.Index([0, 1, 2, 3, 4]), False),
        (pd.RangeIndex(5, 10), True),
        (pd.Index([0, 2, 4, 6, 8]), True),
        (pd.Index(list("abcde")), True),
    ],
)
def test_carries_names(index, expected):
    assert carries_names(index) is expected


def test_plain_arrays_are_left_alone():
    meta = pd.DataFrame({"b": list("ab") * 5})
    assert align_metadata(np.zeros((10, 2)), meta) is meta
