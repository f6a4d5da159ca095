"""Tests of harmonypy._numba: the one setting that chooses numba's kernels."""

from __future__ import annotations

import sys

import pytest
import torch

from harmonypy import _numba

MODULE = "harmonypy.metrics._lisi_kernels"


def test_zero_never_loads_the_kernels(monkeypatch):
    monkeypatch.setenv(_numba.ENV_VARIABLE, "0")
    assert _numba.choose(MODULE, work=10**9, min_work=1, unit="cells") == (
        None,
        "HARMONYPY_FUSED=0",
    )


@pytest.mark.parametrize("value", [None, "auto", "1"])
def test_by_default_from_the_size_where_they_pay_off(monkeypatch, value):
    pytest.importorskip("numba")
    if value is None:
        monkeypatch.delenv(_numba.ENV_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(_numba.ENV_VARIABLE, value)
    kernels, why = _numba.choose(MODULE, work=1000, min_work=1000, unit="cells")
    assert kernels is not None and kernels.__name__ == MODULE
    kernels, why = _numba.choose(MODULE, work=999, min_work=1000, unit="cells")
    assert kernels is None
    assert "999 cells, below the 1,000" in why and "HARMONYPY_FUSED=always" in why


def test_always_at_any_size(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setenv(_numba.ENV_VARIABLE, " always ")
    kernels, why = _numba.choose(MODULE, work=1, min_work=1000, unit="cells")
    assert kernels is not None and why == "HARMONYPY_FUSED=always"


def test_without_numba_the_other_path_with_the_install_hint(monkeypatch):
    monkeypatch.setenv(_numba.ENV_VARIABLE, "always")
    monkeypatch.setitem(sys.modules, MODULE, None)  # import fails
    kernels, why = _numba.choose(MODULE, work=1, min_work=1, unit="cells")
    assert kernels is None
    assert "numba is not available" in why and "harmonypy[fast]" in why


@pytest.mark.parametrize("value", ["yes", "2", "on"])
def test_a_bad_setting_is_refused(monkeypatch, value):
    monkeypatch.setenv(_numba.ENV_VARIABLE, value)
    with pytest.raises(ValueError, match=rf"HARMONYPY_FUSED must be .*'{value}'"):
        _numba.choose(MODULE, work=1, min_work=1, unit="cells")


def test_engine_threads_restores_the_callers_setting():
    numba = pytest.importorskip("numba")
    caller = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with _numba.engine_threads():
            assert numba.get_num_threads() == min(
                torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS
            )
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(caller)
