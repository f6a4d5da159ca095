"""CPU threads of a run: the default policy, and a thread-safe save/restore.

Why a policy: PyTorch's CPU kernels run on an OpenMP team (libgomp) whose
threads spin at the barrier that ends every operation. When another process
holds one of the cores, the team member sharing that core only runs when the
scheduler gives it a time slice, and every operation waits for it. Harmony
does thousands of short operations: on a 2-core machine, two threads were
2-3x slower than one with one core held by a busy loop, and 10-40x slower
when other processes wanted more than a core (``benchmarks/results/threads.md``).
With both cores idle, two threads were 1.5-1.8x faster than one from 100k
cells, 1.1-1.25x at 7k-10k cells, and no faster at 3.5k cells.
``OMP_WAIT_POLICY=PASSIVE`` also avoids the cliff (3.5k cells, a busy loop
and other processes running: 2.1 s with 2 threads instead of 49 s) but only
takes effect when set before torch is imported, applies to the whole
process, and two passive threads were still slower than one thread (1.7 s
against 1.0 s without the busy loop): not used.

The policy (``ncores=None``), on the CPU device:

* never more threads than the caller's ``torch.get_num_threads()`` nor than
  the usable CPUs (affinity mask, cgroup CPU quota);
* one thread when the problem is small (cells x clusters below
  :data:`PARALLEL_MIN_WORK`): the barriers cost as much as the work;
* otherwise use the cores other processes leave free, shared with any other
  runs in this process; a core counts as taken from :data:`CORE_TAKEN_AT` of
  it. At the start (Linux) the other processes' runnable threads are counted
  10 times over ~10 ms (``/proc/loadavg`` minus this process's threads in
  state R); then, at each clustering round at least :data:`WINDOW_S` seconds
  after the last check, the CPU time they used meanwhile is measured (the
  ``/proc/stat`` idle time of the usable CPUs minus this process's own CPU
  time), so load that appears or goes away mid-run is followed within a
  round. Without ``/proc`` the 1-minute load average decides once at the
  start; without that either, the caller's setting.

The thread count does not change the results (the kernels' reductions do not
split by thread here: outputs with 1 and 2 threads were bit-identical on the
3.5k PBMC data and 100k simulated cells, both algorithms).

Save/restore: torch's setting is per OS thread (OpenMP's ``nthreads-var``)
plus a process-wide value that threads adopt the first time they use torch.
:func:`use_threads` changes the calling thread's setting under a process-wide
lock with a count of active runs; each run restores its thread's setting,
and the process-wide value is kept at the setting found by the first of any
overlapping runs, so that threads starting meanwhile, and every thread after
the last run leaves, see the original setting.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time

import torch

logger = logging.getLogger("harmonypy")

# Cells x clusters below which a run uses one thread (2**19: ~5,200 cells at
# K = 100). Measured idle: 3.5k cells tie, 7k-10k cells gain 1.1-1.25x from two.
PARALLEL_MIN_WORK = 2**19
# Fraction of a core's time other processes must use for the core to count as taken.
CORE_TAKEN_AT = 0.25
# Shortest interval over which the load is measured (seconds).
WINDOW_S = 0.1


def choose_threads(
    cap: int, cpus: int, foreign: float | None, work: int, concurrent: int = 1
) -> int:
    """Threads for a run (the pure decision of the default policy).

    Parameters
    ----------
    cap : the caller's torch thread setting (never exceeded).
    cpus : CPUs this process may use.
    foreign : cores' worth of CPU time other processes used lately; None: unknown.
    work : cells x clusters.
    concurrent : runs active in this process (this one included); they share the free cores.
    """
    if cap <= 1 or work < PARALLEL_MIN_WORK:
        return 1
    if foreign is None:
        return max(1, min(cap, cpus))
    taken = math.floor(max(0.0, foreign) + 1.0 - CORE_TAKEN_AT)
    free = max(1, cpus - taken)
    return max(1, min(cap, free // max(1, concurrent)))


# --------------------------------------------------------------------------
# what the machine offers


def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup v2 quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


class CpuLoad:
    """CPU time used by other processes, measured between two readings.

    ``foreign()`` returns the cores' worth of non-idle time of the usable CPUs
    since the previous reading, minus this process's CPU time, or None where
    ``/proc/stat`` cannot be read. ``stat_path``, ``clock`` and ``own_cpu``
    exist for the tests.
    """

    def __init__(
        self,
        cpus: set[int] | None = None,
        stat_path: str = "/proc/stat",
        clock=time.monotonic,
        own_cpu=time.process_time,
    ):
        if cpus is None:
            try:
                cpus = os.sched_getaffinity(0)
            except (AttributeError, OSError):
                cpus = None
        self.cpus = cpus
        self.stat_path = stat_path
        self.clock = clock
        self.own_cpu = own_cpu
        try:
            self.ticks = os.sysconf("SC_CLK_TCK")
        except (AttributeError, ValueError, OSError):
            self.ticks = 100
        self._last = self._read()

    def _idle(self) -> tuple[float, int] | None:
        """(idle + iowait seconds summed over the usable CPUs, number of CPUs)."""
        try:
            with open(self.stat_path) as fh:
                lines = fh.read().splitlines()
        except OSError:
            return None
        idle, n = 0, 0
        for line in lines:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            try:
                cpu = int(name[3:])
                if self.cpus is not None and cpu not in self.cpus:
                    continue
                idle += int(fields[3]) + int(fields[4])
            except (ValueError, IndexError):
                return None
            n += 1
        return (idle / self.ticks, n) if n else None

    def _read(self):
        idle = self._idle()
        return None if idle is None else (self.clock(), idle[0], idle[1], self.own_cpu())

    def available(self) -> bool:
        return self._last is not None

    def elapsed(self) -> float:
        return 0.0 if self._last is None else self.clock() - self._last[0]

    def foreign(self) -> float | None:
        """Cores' worth of other processes' CPU use since the last reading; starts a new window."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None:
            return None
        wall = now[0] - last[0]
        if wall <= 0 or now[2] != last[2]:
            return None
        idle = now[1] - last[1]
        own = now[3] - last[3]
        return max(0.0, (now[2] * wall - idle - own) / wall)


def runnable_others(
    samples: int = 10,
    gap: float = 0.001,
    loadavg_path: str = "/proc/loadavg",
    tasks_path: str = "/proc/self/task",
    sleep=time.sleep,
) -> float | None:
    """Mean number of other processes' runnable threads, sampled ``samples``
    times ``gap`` seconds apart (Linux; None elsewhere).

    Each sample is the kernel's count of runnable threads (``/proc/loadavg``)
    minus this process's threads in state R (the sampling thread, and OpenMP
    workers still spinning after the last operation). Scaled to the usable
    CPUs when the affinity mask holds only some of them. About 10 ms: the
    start-of-run estimate, before ``/proc/stat`` windows are long enough.
    """
    values = []
    for i in range(samples):
        try:
            with open(loadavg_path) as fh:
                running = int(fh.read().split()[3].split("/")[0])
            own = 0
            for tid in os.listdir(tasks_path):
                try:
                    with open(os.path.join(tasks_path, tid, "stat")) as fh:
                        stat = fh.read()
                except OSError:  # the thread ended meanwhile
                    continue
                own += stat[stat.rindex(")") + 2 :][:1] == "R"
        except (OSError, ValueError, IndexError):
            return None
        values.append(max(0, running - max(1, own)))
        if i + 1 < samples:
            sleep(gap)
    foreign = sum(values) / len(values)
    total = os.cpu_count() or 1
    return foreign * min(1.0, usable_cpus() / total)


# --------------------------------------------------------------------------
# thread-safe save/restore

_lock = threading.Lock()
_active = 0  # entries (runs and serial sections) not yet left, all threads
_runs = 0  # runs (AutoThreads) not yet left, all threads
_original: int | None = None  # the setting found by the first of overlapping entries
_values_set: list[int] = []  # values set by active entries (the process-wide value may hold one)
_local = threading.local()  # the calling thread's active AutoThreads, if any


def _reset_after_fork() -> None:
    global _lock, _active, _runs, _original, _values_set, _local
    _lock, _active, _runs, _original, _values_set = threading.Lock(), 0, 0, None, []
    _local = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _set(n: int) -> None:
    """Set the calling thread's torch threads to ``n`` and keep the process-wide
    value at the original setting (call with ``_lock`` held)."""
    torch.set_num_threads(n)  # sets this thread's value and the process-wide one
    if _original is not None and n != _original:
        # Only a thread whose own setting we do not care about can put the
        # process-wide value back: a short-lived one.
        helper = threading.Thread(
            target=torch.set_num_threads, args=(_original,), name="harmonypy-threads"
        )
        try:
            helper.start()
        except RuntimeError:  # no thread to spare: only new threads would notice
            return
        helper.join()


def _enter(n: int | None) -> int:
    """Count this entry in and set ``n`` threads (None: keep); return the setting to restore."""
    global _active, _original
    with _lock:
        current = torch.get_num_threads()
        depth = getattr(_local, "depth", 0)
        if _active == 0:
            _original = current
            mine = current
        elif (
            depth == 0 and _original is not None and current != _original and current in _values_set
        ):
            # Most likely adopted from another thread's entry when this thread
            # first used torch: its own setting is the original one.
            mine = _original
        else:
            mine = current
        _active += 1
        _local.depth = depth + 1
        try:
            if n is not None and n != current:
                _set(n)
            _values_set.append(n if n is not None else current)
        except BaseException:
            _active -= 1
            _local.depth = depth
            raise
    return mine


def _leave(mine: int, n: int | None) -> None:
    global _active, _original
    with _lock:
        _active -= 1
        _local.depth = getattr(_local, "depth", 1) - 1
        if n is not None:
            with contextlib.suppress(ValueError):
                _values_set.remove(n)
        if torch.get_num_threads() != mine:
            _set(mine)
        if _active == 0:
            _original = None
            _values_set.clear()


def _change(n: int) -> None:
    """Change the calling thread's setting inside an entry (policy decisions)."""
    with _lock:
        if torch.get_num_threads() != n:
            _set(n)
        _values_set.append(n)


@contextlib.contextmanager
def use_threads(n: int | None):
    """Run the block with ``n`` torch threads (None: the current setting) and
    restore the calling thread's setting afterwards, also on errors and
    KeyboardInterrupt; safe when several Python threads overlap."""
    mine = _enter(n)
    try:
        yield
    finally:
        _leave(mine, n)


class AutoThreads:
    """The threads of one run: fixed, or chosen by the default policy.

    ``threads`` is the current count (None on other devices than the CPU,
    where the setting is left alone); ``changes`` lists ``(seconds since the
    start, threads, reason)`` for each decision.
    """

    def __init__(
        self,
        ncores: int | None,
        work: int,
        device: torch.device,
        load: CpuLoad | None = None,
        runnable=runnable_others,
        cpus: int | None = None,
    ):
        self.auto = ncores is None and device.type == "cpu"
        self.fixed = ncores
        self.work = work
        self.device = device
        self.load = load
        self.runnable = runnable
        self._cpus = cpus
        self.threads: int | None = ncores
        self.changes: list[tuple[float, int, str]] = []
        self._start = time.monotonic()

    # entry / exit -----------------------------------------------------------

    def __enter__(self) -> AutoThreads:
        global _runs
        if not self.auto:
            self._mine = _enter(self.fixed)
            if self.fixed is not None:
                self._note(self.fixed, "ncores")
        else:
            self._mine = self.cap = _enter(None)  # the caller's setting: the cap
            try:
                first, reason = self._first_choice()
                _change(first)
            except BaseException:
                _leave(self._mine, None)
                raise
            self.threads = first
            self._note(first, reason)
            self._outer = getattr(_local, "auto", None)
            _local.auto = self
        with _lock:
            _runs += 1
        return self

    def __exit__(self, *exc) -> None:
        global _runs
        with _lock:
            _runs -= 1
        if self.auto:
            _local.auto = self._outer
        _leave(self._mine, self.threads if self.auto else self.fixed)

    def _first_choice(self) -> tuple[int, str]:
        if choose_threads(self.cap, self.cpus, 0.0, self.work) == 1:
            return 1, (
                f"small problem ({self.work:,} cells x clusters < {PARALLEL_MIN_WORK:,})"
                if self.cap > 1
                else "torch's setting is 1 thread"
            )
        if self.load is None:
            self.load = CpuLoad()
        if self.load.available():
            foreign = self.runnable()
            if foreign is None:  # one thread until /proc/stat has measured the load
                return 1, "until the load of other processes is measured"
            n = choose_threads(self.cap, self.cpus, foreign, self.work, _runs + 1)
            return n, f"other processes' runnable threads {foreign:.2f} on {self.cpus} CPUs"
        try:
            foreign = os.getloadavg()[0]
        except (AttributeError, OSError):
            return self.cap, "no load information: torch's setting"
        n = choose_threads(self.cap, self.cpus, foreign, self.work, _runs + 1)
        return n, f"1-minute load average {foreign:.2f} on {self.cpus} CPUs"

    def _note(self, n: int, reason: str) -> None:
        self.changes.append((round(time.monotonic() - self._start, 3), n, reason))
        logger.info("CPU threads: %d (%s)", n, reason)

    @property
    def cpus(self) -> int:
        """CPUs the run may use: as given, else :func:`usable_cpus` (looked up once,
        at the first decision)."""
        if self._cpus is None:
            self._cpus = usable_cpus()
        return self._cpus

    # during the run ---------------------------------------------------------

    def checkpoint(self) -> None:
        """Re-decide from the load measured since the last decision (cheap when too early)."""
        if (
            self.load is None
            or self.work < PARALLEL_MIN_WORK
            or self.cap <= 1
            or self.load.elapsed() < WINDOW_S
        ):
            return
        foreign = self.load.foreign()
        if foreign is None:
            return
        concurrent = max(1, _runs)
        n = choose_threads(self.cap, self.cpus, foreign, self.work, concurrent)
        logger.debug(
            "CPU load of other processes: %.2f of %d CPUs -> %d threads", foreign, self.cpus, n
        )
        if n != self.threads:
            _change(n)
            self.threads = n
            self._note(
                n,
                f"other processes used {foreign:.2f} of {self.cpus} CPUs"
                + (f", {concurrent} runs in this process" if concurrent > 1 else ""),
            )


def checkpoint() -> None:
    """Let the calling thread's running default policy re-decide (no-op otherwise)."""
    auto = getattr(_local, "auto", None)
    if auto is not None:
        auto.checkpoint()


@contextlib.contextmanager
def serial(n_elements: int, limit: int, device: torch.device):
    """One thread for the block when ``n_elements <= limit`` on the CPU; else as is."""
    if device.type != "cpu" or n_elements > limit or torch.get_num_threads() == 1:
        yield
        return
    with use_threads(1):
        yield
