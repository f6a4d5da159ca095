"""Encoding of batch labels: level order, odd label types, and what is refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import harmonypy as hm
from harmonypy.engine.design import build_design

N = 12
FAST = dict(verbose=False, max_iter_harmony=2, max_iter_kmeans=3, nclust=2)


def design_of(values, name="v"):
    return build_design(pd.DataFrame({name: values}), [name])


def embedding(n_cells: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_cells, 4))


@pytest.mark.parametrize(
    "values, levels",
    [
        (["b", "a", "c", "a"] * 3, ["a", "b", "c"]),  # strings: sorted
        ([10, 2, 1, 2] * 3, [1, 2, 10]),  # numbers: numeric order
        ([2.5, 1.0, 2.5, 1.0] * 3, [1.0, 2.5]),
        ([True, False, True, True] * 3, [False, True]),  # booleans
        (np.array([3, 1, 3, 1] * 3, dtype=np.uint8), [1, 3]),
        (pd.array([2, 1, 1, 2] * 3, dtype="Int64"), [1, 2]),  # nullable ints
        (pd.array(["y", "x", "x", "y"] * 3, dtype="string"), ["x", "y"]),
        (["1", 1, "1", 1] * 3, [1, "1"]),  # mixed: int before str
        ([1, "b", 2.5, "a"] * 3, [2.5, 1, "a", "b"]),  # grouped by type name
    ],
)
def test_level_order(values, levels):
    design = design_of(values)
    assert [type(x)(x) for x in design.levels[0]] == levels
    assert list(design.counts) == [
        list(pd.Series(values).astype(object)).count(lv) for lv in design.levels[0]
    ]


def test_categorical_keeps_order_and_drops_unused_categories():
    values = pd.Categorical(["lo", "hi", "hi", "lo"] * 3, categories=["hi", "none", "lo", "x"])
    design = design_of(values)
    assert design.levels[0] == ["hi", "lo"]
    assert design.counts.tolist() == [6, 6]
    assert design.codes[:4, 0].tolist() == [1, 0, 0, 1]


def test_codes_counts_offsets_and_one_hot():
    meta = pd.DataFrame({"a": ["x", "y", "z"] * 4, "b": [0, 1] * 6})
    design = build_design(meta, ["a", "b"])
    assert design.offsets.tolist() == [0, 3, 5]
    assert design.counts.tolist() == [4, 4, 4, 6, 6]
    assert design.level_names == ["a=x", "a=y", "a=z", "b=0", "b=1"]
    phi = design.one_hot()
    assert phi.shape == (5, N)
    np.testing.assert_array_equal(phi.sum(0), 2)
    np.testing.assert_array_equal(phi[:3].argmax(0), design.codes[:, 0])
    np.testing.assert_allclose(design.proportions, [1 / 3] * 3 + [0.5] * 2)


def test_encoding_is_positional_not_index_based():
    meta = pd.DataFrame({"a": ["x", "y"] * 6}, index=np.arange(N)[::-1] * 7)
    design = build_design(meta, ["a"])
    assert design.codes[:2, 0].tolist() == [0, 1]


def test_non_string_column_names():
    meta = pd.DataFrame({0: ["x", "y"] * 6, ("multi", "name"): [1, 2, 3] * 4})
    design = build_design(meta, [0, ("multi", "name")])
    assert design.n_levels == 5


@pytest.mark.parametrize(
    "values",
    [
        ["b", "a"] * 6,
        [1, 2] * 6,
        [True, False] * 6,
        pd.Categorical(["b", "a"] * 6, categories=["a", "b", "unused"]),
        ["1", 1] * 6,
        [1, "a", 2.5] * 4,
    ],
)
def test_odd_label_types_run(values):
    meta = pd.DataFrame({"v": values, "other": range(N)})
    ho = hm.run_harmony(embedding(), meta, "v", **FAST)
    assert np.isfinite(ho.Z_corr).all()
    assert ho.B == 2 or ho.B == 3


def test_same_partition_same_result_whatever_the_label_type():
    """Relabelling the batches by an order-preserving map does not change the output."""
    z = embedding(30)
    base = np.arange(30) % 3
    outputs = []
    for labels in (
        base,
        base.astype(str),
        np.array(["a", "b", "c"])[base],
        pd.Categorical(np.array(["a", "b", "c", "d"])[base], categories=["a", "b", "c", "d"]),
    ):
        ho = hm.run_harmony(z, pd.DataFrame({"v": labels}), "v", **FAST)
        outputs.append(ho.Z_corr)
    for out in outputs[1:]:
        np.testing.assert_array_equal(out, outputs[0])


def test_column_order_of_meta_data_does_not_matter():
    z = embedding(40)
    rng = np.random.default_rng(3)
    meta = pd.DataFrame(
        {
            "a": rng.choice(["p", "q"], 40),
            "b": rng.integers(0, 3, 40),
            "c": rng.random(40),
            "d": ["x"] * 40,
        }
    )
    first = hm.run_harmony(z, meta, ["a", "b"], **FAST)
    second = hm.run_harmony(z, meta[["d", "c", "b", "a"]], ["a", "b"], **FAST)
    np.testing.assert_array_equal(first.Z_corr, second.Z_corr)
    np.testing.assert_array_equal(first.R, second.R)


def test_unhashable_labels_refused():
    with pytest.raises(TypeError, match=r"'v' holds labels that cannot be compared \(dict\)"):
        design_of([{}] * N)


def test_missing_labels_count_and_rows():
    values = pd.Series(["a", None, "b", np.nan] * 3, index=[f"cell{i}" for i in range(N)])
    with pytest.raises(ValueError, match=r"'v' has 6 missing value.*'cell1', 'cell3'"):
        build_design(pd.DataFrame({"v": values}), ["v"])


def test_large_column_is_encoded_quickly():
    import time

    values = np.random.default_rng(0).integers(0, 50, 1_000_000).astype(str)
    start = time.perf_counter()
    design = design_of(values)
    assert design.n_levels == 50
    assert time.perf_counter() - start < 5


# ------------------------------------------------- cell identifiers as batches
@pytest.mark.parametrize("vars_use", [["cell"], ["donor", "cell"]])
def test_cell_identifier_column_is_refused(vars_use):
    """One level per cell (``--vars "donor, cell"``) is a cell identifier, not a batch."""
    n = 2500
    meta = pd.DataFrame({"donor": np.arange(n) % 4, "cell": [f"c{i}" for i in range(n)]})
    message = (
        r"batch variable 'cell' has 2,500 levels for 2,500 cells \(1\.0 cells per "
        r"level\): it looks like a cell identifier, not a batch; expected at most N/2 "
        r"levels \(1,250 here"
    )
    with pytest.raises(ValueError, match=message):
        build_design(meta, vars_use)
    with pytest.raises(ValueError, match=message):
        hm.run_harmony(embedding(n), meta, vars_use, verbose=False)


@pytest.mark.parametrize(
    "n_cells, n_levels, refused",
    [
        (100, 50, False),  # N/2: two cells per level on average is allowed
        (100, 51, True),
        (3000, 1000, False),
        (20, 16, False),  # up to 16 levels are always allowed (tiny designs)
        (20, 17, True),
        (6, 6, False),
    ],
)
def test_level_count_rule(n_cells, n_levels, refused):
    values = np.arange(n_cells) % n_levels
    for column in (
        values,
        values.astype(str),
        pd.Categorical(values, categories=range(n_levels + 5)),
    ):
        if refused:
            with pytest.raises(ValueError, match="looks like a cell identifier"):
                design_of(column, "v")
        else:
            assert design_of(column, "v").n_levels == n_levels


def test_identifier_check_counts_only_used_categories():
    values = pd.Categorical(np.arange(40) % 2, categories=range(10_000))
    assert design_of(values).n_levels == 2
