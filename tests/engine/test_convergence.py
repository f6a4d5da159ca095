"""Convergence users can steer: stop reasons, the warning, callbacks, continuing, and the
embedding test."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

import harmonypy as hm
from harmonypy import ConvergenceWarning, IterationReport


@pytest.fixture(scope="module")
def pbmc():
    pcs, meta, _ = hm.datasets.load_pbmc_3500()
    return pcs.to_numpy(), meta


def run(pbmc, **kwargs):
    pcs, meta = pbmc
    return hm.run_harmony(pcs, meta, "donor", verbose=False, ncores=1, **kwargs)


def test_callback_sees_every_iteration_and_stops_the_run(pbmc):
    reports: list[IterationReport] = []

    def stop_at_three(report):
        reports.append(report)
        assert not report.Z_corr.flags.writeable
        with pytest.raises(ValueError):
            report.Z_corr[0, 0] = 0.0
        return report.iteration == 3

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        ho = run(pbmc, callback=stop_at_three, epsilon_harmony=-np.inf)
    assert [r.iteration for r in reports] == [1, 2, 3]
    assert (ho.n_iter, ho.stop_reason, ho.converged) == (3, "callback", False)
    assert [r.objective for r in reports] == ho.objective_harmony[1:]
    assert [r.kmeans_rounds for r in reports] == ho.kmeans_rounds
    assert reports[-1].objective_parts == (
        ho.objective_kmeans_dist[-1],
        ho.objective_kmeans_entropy[-1],
        ho.objective_kmeans_cross[-1],
    )
    np.testing.assert_array_equal(reports[-1].Z_corr, ho.Z_corr)
    assert reports[-1].Z_corr.shape == (pbmc[0].shape[1], pbmc[0].shape[0])


@pytest.mark.parametrize(
    "answer, error", [(1, "got 1 \\(int\\) at iteration 1"), ("stop", "got 'stop'")]
)
def test_callback_answers_other_than_true_false_none_are_refused(pbmc, answer, error):
    with pytest.raises(TypeError, match=f"callback must return True.*{error}"):
        run(pbmc, callback=lambda report: answer, max_iter_harmony=2)


def test_a_callback_that_is_not_callable_is_refused_before_any_work(pbmc):
    with pytest.raises(TypeError, match="callback must be a function.*got list"):
        run(pbmc, callback=[])


def test_iteration_limit_warns_and_says_so(pbmc):
    with pytest.warns(
        ConvergenceWarning,
        match=r"did not converge in 2 iteration\(s\).*"
        r"epsilon_harmony=0.0001.*ho.harmonize\(n\)",
    ):
        ho = run(pbmc, max_iter_harmony=2)
    assert (ho.stop_reason, ho.converged) == ("max_iter_harmony", False)


def test_a_converged_run_does_not_warn(pbmc):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        ho = run(pbmc, algorithm="harmony2")
    assert (ho.stop_reason, ho.converged) == ("objective", True)
    assert ho.n_iter < 10


@pytest.mark.parametrize("algorithm", ["harmony1", "harmony2"])
def test_continuing_a_run_equals_one_longer_run(pbmc, algorithm):
    never = dict(algorithm=algorithm, epsilon_harmony=-np.inf)
    with pytest.warns(ConvergenceWarning):
        continued = run(pbmc, max_iter_harmony=2, **never)
    with pytest.warns(ConvergenceWarning):
        continued.harmonize(3)
    with pytest.warns(ConvergenceWarning):
        longer = run(pbmc, max_iter_harmony=5, **never)
    assert continued.n_iter == 5
    np.testing.assert_array_equal(continued.Z_corr, longer.Z_corr)
    np.testing.assert_array_equal(continued.R, longer.R)
    assert continued.objective_harmony == longer.objective_harmony
    assert continued.kmeans_rounds == longer.kmeans_rounds


def test_embedding_test_stops_early_without_changing_the_trajectory(pbmc):
    ho = run(pbmc, epsilon_embedding=0.02)
    assert (ho.stop_reason, ho.converged) == ("embedding", True)
    assert ho.embedding_change[-1] < 0.02 <= ho.embedding_change[-2]
    with pytest.warns(ConvergenceWarning):
        plain = run(pbmc, max_iter_harmony=ho.n_iter, epsilon_harmony=-np.inf)
    np.testing.assert_array_equal(ho.Z_corr, plain.Z_corr)


def test_embedding_change_is_the_relative_change_of_the_corrected_cells(pbmc):
    seen = []
    with pytest.warns(ConvergenceWarning, match="embedding's relative change"):
        ho = run(
            pbmc,
            epsilon_embedding=1e-12,
            max_iter_harmony=3,
            epsilon_harmony=-np.inf,
            callback=lambda r: seen.append(r.Z_corr.copy()),
        )
    for (before, after), change in zip(
        itertools.pairwise(seen), ho.embedding_change[1:], strict=True
    ):
        assert change == pytest.approx(
            np.linalg.norm(after - before) / np.linalg.norm(before), rel=1e-5
        )


@pytest.mark.parametrize("value", [0, -1e-3, np.nan, "1e-3"])
def test_epsilon_embedding_is_checked(pbmc, value):
    with pytest.raises((ValueError, TypeError), match="epsilon_embedding"):
        run(pbmc, epsilon_embedding=value)


def test_callback_reaches_the_engine_from_the_anndata_front_ends(pbmc):
    anndata = pytest.importorskip("anndata")
    pcs, meta = pbmc
    for front_end in (hm.integrate, hm.harmony_integrate):
        adata = anndata.AnnData(obs=meta.set_axis(meta.index.astype(str)))
        adata.obsm["X_pca"] = pcs
        seen = []
        front_end(
            adata,
            "donor",
            callback=lambda r, seen=seen: seen.append(r.iteration) or r.iteration == 2,
            verbose=False,
        )
        assert seen == [1, 2]


def test_the_convergence_page_runs_as_written(capsys):
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "convergence.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, str(page), "exec"), {"__name__": "__page__"})
    assert capsys.readouterr().out.splitlines() == ["callback 4 4", "True"]


def test_objective_converged_compares_windows_as_r_does():
    from harmonypy.engine.convergence import objective_converged

    # windows of 3: old = 10 + 9 + 8 = 27, new = 9 + 8 + 7.99 = 24.99: a 7 % drop
    trace = [10.0, 9.0, 8.0, 7.99]
    assert not objective_converged(trace, window=3, epsilon=0.05)
    assert objective_converged(trace, window=3, epsilon=0.08)
    # a rise passes R's one-sided test at once, Harmony2's two-sided one only when small
    rising = [1.0, 2.0]
    assert objective_converged(rising, window=1, epsilon=1e-5)
    assert not objective_converged(rising, window=1, epsilon=1e-5, two_sided=True)
    assert objective_converged([1.0, 1.0000001], window=1, epsilon=1e-5, two_sided=True)
