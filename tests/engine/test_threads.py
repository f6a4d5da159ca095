"""CPU threads: the default policy's decisions, and the save/restore of torch's
setting (also from several Python threads at once, on errors and on
KeyboardInterrupt). No timing assertions."""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import pytest
import torch

import harmonypy as hm
from harmonypy._simulate import simulate
from harmonypy.engine import threads as _threads
from harmonypy.engine.threads import PARALLEL_MIN_WORK, AutoThreads, CpuLoad, choose_threads

BIG = PARALLEL_MIN_WORK * 4
CPU = torch.device("cpu")


@pytest.fixture
def threads_3():
    """The process-wide setting is 3 during the test (distinct from 1 and 2), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small():
    X, meta = simulate(240, 8, 3, 3, seed=1)
    return X, meta


def fresh_thread_setting() -> int:
    """What a thread that has never used torch gets (the process-wide value)."""
    out = []
    t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    t.start()
    t.join()
    return out[0]


# --------------------------------------------------------------------------
# the decision function, with injected inputs


def test_choose_threads_one_core_busy_gives_one_thread():
    assert choose_threads(cap=2, cpus=2, foreign=1.0, work=BIG) == 1


def test_choose_threads_idle_uses_all_up_to_the_cap():
    assert choose_threads(cap=2, cpus=2, foreign=0.0, work=BIG) == 2
    assert choose_threads(cap=2, cpus=2, foreign=0.1, work=BIG) == 2  # daemons, noise
    assert choose_threads(cap=4, cpus=16, foreign=0.0, work=BIG) == 4  # never above the caller's
    assert choose_threads(cap=16, cpus=4, foreign=0.0, work=BIG) == 4  # nor above the CPUs


def test_choose_threads_tiny_work_gives_one_thread():
    assert choose_threads(cap=8, cpus=8, foreign=0.0, work=PARALLEL_MIN_WORK - 1) == 1
    assert choose_threads(cap=8, cpus=8, foreign=0.0, work=3500 * 100) == 1  # the PBMC example


def test_choose_threads_counts_partly_busy_cores_as_taken():
    # Sharing a core costs far more than leaving it: a quarter of a core's use takes it.
    assert choose_threads(cap=2, cpus=2, foreign=0.3, work=BIG) == 1
    assert choose_threads(cap=2, cpus=2, foreign=0.2, work=BIG) == 2
    assert choose_threads(cap=8, cpus=8, foreign=2.5, work=BIG) == 5
    assert choose_threads(cap=2, cpus=2, foreign=5.0, work=BIG) == 1  # never below one


def test_choose_threads_shares_free_cores_between_runs_of_this_process():
    assert choose_threads(cap=2, cpus=2, foreign=0.0, work=BIG, concurrent=2) == 1
    assert choose_threads(cap=16, cpus=16, foreign=0.0, work=BIG, concurrent=4) == 4


def test_choose_threads_without_load_information_uses_the_callers_setting():
    assert choose_threads(cap=2, cpus=2, foreign=None, work=BIG) == 2


# --------------------------------------------------------------------------
# measuring other processes' load from /proc/stat (fake file and clocks)


class FakeMachine:
    """Two CPUs: /proc/stat text, wall clock and this process's CPU clock, set by hand."""

    def __init__(self, tmp_path):
        self.path = tmp_path / "stat"
        self.now = 100.0
        self.own = 5.0
        self.idle = [1000, 1000]  # ticks (1/100 s)
        self.write()

    def write(self):
        lines = [f"cpu  1 2 3 {sum(self.idle)} 0 0 0 0 0 0"]
        lines += [f"cpu{i} 1 2 3 {idle} 0 0 0 0 0 0" for i, idle in enumerate(self.idle)]
        self.path.write_text("\n".join(lines + ["intr 5", "ctxt 7"]) + "\n")

    def advance(self, seconds, idle_per_cpu, own):
        self.now += seconds
        self.own += own
        self.idle = [i + round(100 * s) for i, s in zip(self.idle, idle_per_cpu, strict=True)]
        self.write()

    def load(self, cpus=None):
        return CpuLoad(
            cpus=cpus, stat_path=str(self.path), clock=lambda: self.now, own_cpu=lambda: self.own
        )


def test_cpu_load_counts_other_processes_not_this_one(tmp_path):
    m = FakeMachine(tmp_path)
    load = m.load()
    # We use one core, the other core is idle: nothing foreign.
    m.advance(1.0, idle_per_cpu=[0.0, 1.0], own=1.0)
    assert load.foreign() == pytest.approx(0.0)
    # We use one core, a busy loop the other.
    m.advance(0.5, idle_per_cpu=[0.0, 0.0], own=0.5)
    assert load.foreign() == pytest.approx(1.0)
    # We share a core with it (two threads, one core busy): it still shows.
    m.advance(1.0, idle_per_cpu=[0.0, 0.0], own=1.5)
    assert load.foreign() == pytest.approx(0.5)
    assert choose_threads(2, 2, 0.5, BIG) == 1


def test_cpu_load_only_reads_the_usable_cpus(tmp_path):
    m = FakeMachine(tmp_path)
    load = m.load(cpus={1})
    m.advance(1.0, idle_per_cpu=[0.0, 1.0], own=0.0)  # cpu0 busy, but not ours
    assert load.foreign() == pytest.approx(0.0)


def test_cpu_load_unreadable_gives_none(tmp_path):
    load = CpuLoad(stat_path=str(tmp_path / "missing"))
    assert not load.available()
    assert load.foreign() is None


def test_policy_starts_on_one_thread_then_follows_the_load(tmp_path, threads_3):
    m = FakeMachine(tmp_path)
    # No start-of-run count (runnable=None): one thread until measured.
    policy = AutoThreads(None, BIG, CPU, load=m.load(cpus={0, 1}), runnable=lambda: None, cpus=2)
    with policy:
        assert policy.threads == 1 and torch.get_num_threads() == 1
        _threads.checkpoint()  # no time has passed: no decision
        assert torch.get_num_threads() == 1
        m.advance(0.5, idle_per_cpu=[0.0, 0.5], own=0.5)  # the other core idle
        _threads.checkpoint()
        assert policy.threads == 2 and torch.get_num_threads() == 2
        m.advance(0.5, idle_per_cpu=[0.0, 0.0], own=0.75)  # a busy loop shares our second core
        _threads.checkpoint()
        assert policy.threads == 1 and torch.get_num_threads() == 1
        assert fresh_thread_setting() == 3  # the process-wide value is left alone meanwhile
    assert torch.get_num_threads() == 3
    assert [n for _, n, _ in policy.changes] == [1, 2, 1]


@pytest.mark.parametrize("others, expected", [(0.0, 2), (0.1, 2), (1.0, 1), (3.0, 1)])
def test_policy_start_follows_other_processes_runnable_threads(
    tmp_path, threads_3, others, expected
):
    m = FakeMachine(tmp_path)
    with AutoThreads(None, BIG, CPU, load=m.load(), runnable=lambda: others, cpus=2) as policy:
        assert policy.threads == expected == torch.get_num_threads()
    assert torch.get_num_threads() == 3


def test_runnable_others_subtracts_this_process(tmp_path):
    loadavg = tmp_path / "loadavg"
    tasks = tmp_path / "task"
    for tid, state in [(10, "R"), (11, "S"), (12, "R")]:  # this thread + a spinning worker
        (tasks / str(tid)).mkdir(parents=True)
        (tasks / str(tid) / "stat").write_text(f"{tid} (py thon) {state} 1 2 3\n")
    counts = iter([3, 3, 4, 2])  # runnable threads, whole machine
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        loadavg.write_text(f"0.5 0.4 0.3 {next(counts)}/90 123\n")

    sleep(0)
    sleeps.clear()
    got = _threads.runnable_others(
        samples=4, gap=0.001, loadavg_path=str(loadavg), tasks_path=str(tasks), sleep=sleep
    )
    scale = min(1.0, _threads.usable_cpus() / (os.cpu_count() or 1))
    assert got == pytest.approx((1 + 1 + 2 + 0) / 4 * scale)
    assert sleeps == [0.001] * 3
    assert _threads.runnable_others(loadavg_path=str(tmp_path / "none")) is None


def test_policy_small_problem_is_one_thread_without_measuring(threads_3):
    with AutoThreads(None, PARALLEL_MIN_WORK - 1, CPU) as policy:
        assert torch.get_num_threads() == 1
        assert policy.load is None
    assert torch.get_num_threads() == 3


def test_policy_never_exceeds_the_callers_setting(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = FakeMachine(tmp_path)
        with AutoThreads(None, BIG, CPU, load=m.load(), runnable=lambda: 0.0) as policy:
            m.advance(1.0, idle_per_cpu=[1.0, 1.0], own=0.0)
            _threads.checkpoint()
            assert policy.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------
# run_harmony: what was chosen, and the caller's setting left as found


def test_run_harmony_reports_the_choice_without_printing(small, threads_3, caplog, capsys):
    X, meta = small
    with caplog.at_level(logging.INFO, logger="harmonypy"):
        ho = hm.run_harmony(X, meta, "batch", max_iter_harmony=2, verbose=False)
    assert ho.n_threads == 1  # 240 cells x 8 clusters: small
    assert any(r.getMessage().startswith("CPU threads: 1 (small problem") for r in caplog.records)
    assert capsys.readouterr() == ("", "")
    ho = hm.run_harmony(X, meta, "batch", max_iter_harmony=2, verbose=False, ncores=2)
    assert ho.n_threads == 2  # explicit ncores overrides the policy
    assert torch.get_num_threads() == 3


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("ncores", [None, 1, 2])
def test_setting_restored_after_errors(small, threads_3, monkeypatch, error, ncores):
    X, meta = small

    def fail(self, *args, **kwargs):
        assert torch.get_num_threads() in (1, 2)  # inside the run: changed
        raise error()

    monkeypatch.setattr(hm.Harmony, "_iterate", fail)
    with pytest.raises(error):
        hm.run_harmony(X, meta, "batch", verbose=False, ncores=ncores)
    assert torch.get_num_threads() == 3
    assert fresh_thread_setting() == 3
    assert _threads._active == 0 and _threads._runs == 0


def test_concurrent_runs_restore_the_setting(small, threads_3):
    """Two Python threads call run_harmony(ncores=1) at the same moment, many
    times; afterwards every thread, and threads started later, see the setting
    found before. (Each worker is a fresh thread, so it first uses torch while
    the other may be inside its run: that is how the setting used to leak.)"""
    X, meta = small
    errors = []
    seen = []

    def work(barrier):
        try:
            for _ in range(3):
                barrier.wait(timeout=30)
                hm.run_harmony(X, meta, "batch", max_iter_harmony=1, verbose=False, ncores=1)
            seen.append(torch.get_num_threads())
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    for _ in range(8):
        barrier = threading.Barrier(2)
        workers = [threading.Thread(target=work, args=(barrier,)) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert not errors
    assert seen == [3] * 16  # each worker thread's own setting
    assert torch.get_num_threads() == 3  # this thread's
    assert fresh_thread_setting() == 3  # the process-wide value new threads adopt
    assert _threads._active == 0 and _threads._runs == 0


def test_use_threads_nested_and_overlapping(threads_3):
    with _threads.use_threads(2):
        assert torch.get_num_threads() == 2
        with _threads.use_threads(1):
            assert torch.get_num_threads() == 1
            assert fresh_thread_setting() == 3
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 3
    assert fresh_thread_setting() == 3


def test_results_do_not_depend_on_the_thread_count():
    # Blocks of 170 cells x 100 clusters: above the serial limit, so two threads work.
    X, meta = simulate(3400, 10, 3, 5, seed=2)
    one = hm.run_harmony(X, meta, "batch", max_iter_harmony=2, verbose=False, ncores=1)
    two = hm.run_harmony(X, meta, "batch", max_iter_harmony=2, verbose=False, ncores=2)
    # Bit for bit on some CPUs (AMD EPYC here earlier); MKL on Intel Xeon splits a
    # matrix product's sums by thread, so only rounding may differ (1e-6 seen).
    np.testing.assert_allclose(np.asarray(one.Z_corr), np.asarray(two.Z_corr), rtol=0, atol=1e-4)
    assert one.n_iter == two.n_iter
