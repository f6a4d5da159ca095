"""Code moves leave results where they were: outputs equal the stored ones.

The stored file comes from ``tests/stored_outputs.py`` (see there when to
regenerate it). On the CPU model that wrote it the comparison is bit for bit;
on another CPU BLAS may round differently, so there it allows float32
rounding (and says so in the skip reason of the exact check).
"""

from __future__ import annotations

import numpy as np
import pytest

from stored_outputs import STORED, compute, cpu_model


@pytest.fixture(scope="module")
def stored():
    with np.load(STORED) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def recomputed():
    return compute()


def test_every_stored_output_is_recomputed(stored, recomputed):
    assert set(stored) - {"cpu"} == set(recomputed)


@pytest.mark.parametrize(
    "name",
    [
        "harmony1_Z_corr",
        "harmony1_R",
        "harmony1_objective",
        "harmony2_Z_corr",
        "harmony2_R",
        "harmony2_objective",
        "lisi",
        "evaluate",
        "reference_Y",
        "reference_Nr",
        "mapped",
        "confidence",
        "labels",
        "label_probability",
    ],
)
def test_output_equals_the_stored_one(stored, recomputed, name):
    if str(stored["cpu"]) == cpu_model() or stored[name].dtype.kind not in "fc":
        np.testing.assert_array_equal(recomputed[name], stored[name])
    else:
        np.testing.assert_allclose(recomputed[name], stored[name], rtol=1e-4, atol=1e-5)
