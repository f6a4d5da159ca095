"""Progress reporting: visible by default, silent on request, never configures logging."""

from __future__ import annotations

import logging

import numpy as np
from test_harmony import simulated

import harmonypy as hm


def _run(**kwargs):
    z, meta = simulated(n_cells=120)
    return hm.run_harmony(z, meta, "batch", max_iter_harmony=3, **kwargs)


def test_verbose_false_prints_nothing(capsys):
    _run(verbose=False)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_verbose_reports_each_iteration_on_stderr(capsys):
    ho = _run(verbose=True)
    out, err = capsys.readouterr()
    assert out == ""
    lines = [line for line in err.splitlines() if "iteration" in line]
    assert len(lines) == ho.n_iter
    assert "objective" in lines[0] and "clustering rounds" in lines[0]
    assert "120 cells" in err
    assert ("converged after" in err) or ("without converging" in err)


def test_configured_logging_receives_records_without_duplicates(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="harmonypy"):
        ho = _run(verbose=True)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("harmonypy")]
    assert sum("iteration" in m for m in messages) == ho.n_iter
    # logging already shows the records, so they are not written to stderr again
    assert "iteration 1/" not in capsys.readouterr().err


def test_logging_configuration_untouched():
    logger = logging.getLogger("harmonypy")
    root = logging.getLogger()
    before = (
        list(logger.handlers),
        logger.level,
        logger.propagate,
        list(root.handlers),
        root.level,
    )
    _run(verbose=True)
    after = (list(logger.handlers), logger.level, logger.propagate, list(root.handlers), root.level)
    assert before == after


def test_repr_summarises_run():
    ho = _run(verbose=False)
    text = repr(ho)
    assert "N=120" in text and "harmony1" in text and np.isfinite(ho.objective_harmony).all()
