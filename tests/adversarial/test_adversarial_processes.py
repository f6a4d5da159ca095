"""Multi-process runs tried adversarially (#22): interruptions, bad shards,
unguarded scripts, the process group's start, and torchrun's parts.

A catalogue in the style of ``tests/engine/test_validation.py``: each case states the
input or the interruption, the expected exit status or error type, and the
words (regexes) the message must contain. Every case also checks that nothing
is left behind: no process of the run (each CLI run starts in a session of its
own, and ``/proc`` is scanned for that session; a run inside this process must
leave no child of it), no temporary file beside the output, and no file in
``/dev/shm`` that the run's processes held (open or mapped) when they were
interrupted. (Other processes on the machine create and remove ``/dev/shm``
entries of their own meanwhile, so the check follows what the run held rather
than comparing listings.) Every subprocess is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import harmonypy as hm

pytestmark = [
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with gloo is not available",
    ),
    pytest.mark.skipif(
        not Path("/proc/self/stat").exists(),
        reason="needs /proc to find the processes a run leaves",
    ),
]

SRC = str(Path(hm.__file__).resolve().parents[1])
LIMIT = 120  # seconds for any one subprocess: a hang fails the test, it does not block CI
STOPPED_WITHIN = 10.0  # seconds from the signal to the exit of the whole run

# The CLI with Python's own SIGINT handler even when this test runs with SIGINT
# ignored (background jobs of a non-interactive shell), as the user's terminal has it.
_INTERRUPTIBLE = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('harmonypy', run_name='__main__', alter_sys=True)"
)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    return env


# ------------------------------------------------------------ what is left
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0]), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _live(select) -> list[int]:
    """Live (not zombie) processes whose stat fields satisfy ``select``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and fields[0] != "Z" and select(fields):
                pids.append(int(entry))
    return pids


def session_processes(sid: int) -> list[int]:
    return _live(lambda f: int(f[3]) == sid)


def children_of(pid: int) -> list[int]:
    """Live children of ``pid``, oldest first."""
    kids = _live(lambda f: int(f[1]) == pid)
    return sorted(kids, key=lambda k: int((_stat(k) or [0] * 20)[19]))


def _describe(pids) -> str:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}")
        except OSError:
            pass
    return "; ".join(out)


def shm_held(pids) -> set:
    """Named files in /dev/shm that ``pids`` have open or mapped (an unlinked
    file or a memfd has no name left to leak)."""
    held = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # ended meanwhile
            continue
        paths = [line.split(None, 5)[5] for line in maps if len(line.split(None, 5)) == 6]
        held |= {p for p in paths + fds if p.startswith("/dev/shm/") and "(deleted)" not in p}
    return held


def assert_nothing_left(sid: int | None, folder: Path, held: set = frozenset()) -> None:
    """No process of session ``sid`` (or child of this process), no temporary
    file in ``folder``, none of the /dev/shm files ``held`` (a few seconds' grace)."""
    deadline = time.monotonic() + 5
    while True:
        left = session_processes(sid) if sid is not None else children_of(os.getpid())
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in left:  # do not leave them to the next test either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {_describe(left)}"
    temporary = [p.name for p in folder.iterdir() if ".tmp" in p.name]
    assert not temporary, f"temporary files left behind: {temporary}"
    left = [path for path in held if os.path.exists(path)]
    assert not left, f"/dev/shm files left behind: {left}"


# ----------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """20,000 cells x 20 PCs (.npy) with a named metadata table: a run of 50
    iterations (no early stop) lasts long enough to be interrupted mid-run."""
    from harmonypy._simulate import simulate

    folder = tmp_path_factory.mktemp("inputs")
    z, meta = simulate(n_cells=20000, n_pcs=20, n_batches=3, seed=1)
    np.save(folder / "pcs.npy", z.astype(np.float32))
    meta.to_csv(folder / "meta.tsv", sep="\t", index=False)
    return folder / "pcs.npy", folder / "meta.tsv"


LONG = ["--threads", "1", "--max-iter-harmony", "50", "--epsilon-harmony=-inf", "--seed", "3"]


# ----------------------------------------------------- interruptions (CLI)
def _spawned(n):
    return lambda run: len(children_of(run.proc.pid)) >= n


def _running(run) -> bool:
    return "initialised in" in run.stderr()


def _writing(run) -> bool:
    return any(".tmp" in p.name for p in run.folder.iterdir())


class CliRun:
    """``harmonypy run`` in a session of its own, its stderr read as it comes."""

    def __init__(self, argv, folder: Path):
        self.folder = folder
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _INTERRUPTIBLE, *map(str, argv)],
            env=_env(),
            start_new_session=True,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._lines: list[str] = []
        self._reader = threading.Thread(
            target=lambda: self._lines.extend(self.proc.stderr), daemon=True
        )
        self._reader.start()

    def stderr(self) -> str:
        return "".join(self._lines)

    def wait_for(self, moment) -> None:
        deadline = time.monotonic() + LIMIT
        while not moment(self):
            assert self.proc.poll() is None, f"finished before the moment: {self.stderr()}"
            assert time.monotonic() < deadline, f"the moment never came: {self.stderr()}"
            time.sleep(0.005)

    def send(self, signum: int, target: str) -> None:
        pid = self.proc.pid
        if target == "group":  # what the terminal's Ctrl-C, or `timeout`, does
            os.killpg(pid, signum)
            return
        if "rank 1" in target:  # the newest child: rank 1 of 2
            os.kill(children_of(pid)[-1], signum)
        if "launcher" in target:
            os.kill(pid, signum)

    def finish(self) -> tuple[int, str]:
        try:
            status = self.proc.wait(timeout=LIMIT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"the run did not stop within {LIMIT} s: {self.stderr()}")
        self._reader.join(timeout=10)
        return status, self.stderr()


SIGINT, SIGTERM, SIGKILL = signal.SIGINT, signal.SIGTERM, signal.SIGKILL
INTERRUPTED = r"harmonypy: interrupted\s*$"
TERMINATED = r"harmonypy: terminated \(SIGTERM\)\s*$"

# name: (--nproc, output, signal, sent to, when, exit status, words in stderr)
INTERRUPTIONS = {
    "Ctrl-C (terminal group) while the processes import": (
        2,
        "out.npy",
        SIGINT,
        "group",
        _spawned(2),
        130,
        [INTERRUPTED],
    ),
    "Ctrl-C reaching the launcher and rank 1 only (the other past its import; #22's hang)": (
        2,
        "out.npy",
        SIGINT,
        "launcher, rank 1",
        _spawned(2),
        130,
        [INTERRUPTED],
    ),
    "Ctrl-C (terminal group) mid-run": (
        2,
        "out.npy",
        SIGINT,
        "group",
        _running,
        130,
        [INTERRUPTED],
    ),
    "SIGTERM (group, as `timeout` sends it) while the processes import": (
        2,
        "out.npy",
        SIGTERM,
        "group",
        _spawned(1),
        143,
        [TERMINATED],
    ),
    "SIGTERM to the launcher only, mid-run": (
        2,
        "out.npy",
        SIGTERM,
        "launcher",
        _running,
        143,
        [TERMINATED],
    ),
    "SIGTERM while the output is written (2 processes)": (
        2,
        "out.tsv.gz",
        SIGTERM,
        "launcher",
        _writing,
        143,
        [TERMINATED],
    ),
    "SIGTERM while the output is written (1 process)": (
        1,
        "out.tsv.gz",
        SIGTERM,
        "launcher",
        _writing,
        143,
        [TERMINATED],
    ),
    "SIGKILL of the launcher mid-run (no handler can run)": (
        2,
        "out.npy",
        SIGKILL,
        "launcher",
        _running,
        -9,
        [],
    ),
    "SIGKILL of rank 1 while the processes start": (
        2,
        "out.npy",
        SIGKILL,
        "rank 1",
        _spawned(2),
        1,
        [
            r"rank 1 of 2 was killed by signal SIGKILL while starting",
            r"other processes were "
            r"stopped",
        ],
    ),
    "SIGKILL of rank 1 mid-run (e.g. the OOM killer)": (
        2,
        "out.npy",
        SIGKILL,
        "rank 1",
        _running,
        1,
        [r"rank 1 of 2 was killed by signal SIGKILL during the run", r"out of memory"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(INTERRUPTIONS))
def test_interruptions_stop_every_process_within_seconds(inputs, tmp_path, case):
    nproc, output, signum, target, moment, status, words = INTERRUPTIONS[case]
    pcs, meta = inputs
    out = tmp_path / output
    run = CliRun(
        ["run", pcs, meta, "--vars", "batch", "-o", out, "--nproc", nproc, *LONG], tmp_path
    )
    run.wait_for(moment)
    held = shm_held(session_processes(run.proc.pid))
    sent = time.monotonic()
    run.send(signum, target)
    code, err = run.finish()
    took = time.monotonic() - sent
    assert code == status, f"{case}: exit {code}, expected {status}: {err}"
    for word in words:
        assert re.search(word, err), f"{case}: {word!r} not in: {err}"
    assert "Traceback" not in err, err
    assert took < STOPPED_WITHIN, f"{case}: stopped {took:.1f} s after the signal"
    assert not out.exists(), case
    assert_nothing_left(run.proc.pid, tmp_path, held)


# -------------------------------------------------- bad inputs (library)
def _cells(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 5))


def _named(n: int) -> pd.DataFrame:
    return pd.DataFrame({"batch": (["a", "b"] * n)[:n]}, index=[f"cell{i}" for i in range(n)])


def _with(z: np.ndarray, row: int, value) -> np.ndarray:
    z = z.copy()
    z[row] = value
    return z


# name: (data_mat, meta_data, vars_use, nproc, env, error type, words)
BAD_INPUTS = {
    "NaN in global cell 30 (row 10 of rank 1's shard), named cells": (
        _with(_cells(40), (30, 1), np.nan),
        _named(40),
        "batch",
        2,
        {},
        ValueError,
        [r"rank 1 of 2 refused its input", r"1 cell\(s\) 30 \('cell30'\)", r"NaN"],
    ),
    "all-zero global cells 25 and 38, unnamed": (
        _with(_with(_cells(40), 25, 0.0), 38, 0.0),
        _named(40).reset_index(drop=True),
        "batch",
        2,
        {},
        ValueError,
        [r"rank 1 of 2", r"2 all-zero cell\(s\) 25, 38\b"],
    ),
    "5 cells over 2 processes (the total is what counts)": (
        _cells(5),
        _named(5),
        "batch",
        2,
        {},
        ValueError,
        [r"at least 6 cells", r"2 processes hold 5 in all", r"rank 0: 2, rank 1: 3"],
    ),
    "a batch column that is not in meta_data": (
        _cells(40),
        _named(40),
        "nope",
        2,
        {},
        ValueError,
        [
            r"rank 0 of 2 refused its input",
            r"\['nope'\] not found",
            r"available columns: "
            r"\['batch'\]",
        ],
    ),
    "meta_data with one row fewer than the cells (before any process starts)": (
        _cells(40),
        _named(39),
        "batch",
        2,
        {},
        ValueError,
        [r"meta_data has 39 rows", r"40 cells"],
    ),
    "more processes than cells": (
        _cells(6),
        _named(6),
        "batch",
        7,
        {},
        ValueError,
        [r"nproc=7", r"6"],
    ),
    "HARMONYPY_START_TIMEOUT that is not a number of seconds": (
        _cells(40),
        _named(40),
        "batch",
        2,
        {"HARMONYPY_START_TIMEOUT": "soon"},
        ValueError,
        [r"HARMONYPY_START_TIMEOUT", r"positive number of seconds", r"'soon'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_name_the_global_cell_and_leave_nothing(tmp_path, monkeypatch, case):
    from harmonypy.distributed.launch import run_in_processes

    z, meta, vars_use, nproc, env, error, words = BAD_INPUTS[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(error) as info:
        run_in_processes(z, meta, vars_use, nproc, ncores=1, verbose=False)
    message = str(info.value)
    for word in words:
        assert re.search(word, message), f"{case}: {word!r} not in: {message}"
    assert_nothing_left(None, tmp_path)


def test_seven_cells_over_two_processes_are_one_run_of_seven(tmp_path):
    """Each shard holds fewer than 6 cells; the run holds 7 and equals a single process."""
    from harmonypy.distributed.launch import run_in_processes

    z, meta = _cells(7), _named(7)
    run = run_in_processes(z, meta, "batch", 2, ncores=1, verbose=False)
    single = hm.run_harmony(z, meta, "batch", verbose=False, ncores=1)
    np.testing.assert_allclose(run.result(), single.result(), atol=1e-5)
    np.testing.assert_array_equal(run.Z_corr, run.corrected.T)  # Harmony's (d, N) view
    assert_nothing_left(None, tmp_path)


# ------------------------------------------- a script without the guard
UNGUARDED = """\
import numpy as np, pandas as pd, anndata, harmonypy as hm
with open({marker!r}, "a") as f:
    f.write("top level ran\\n")   # a child re-running the script would write it again
rng = np.random.default_rng(0)
adata = anndata.AnnData(obs=pd.DataFrame({{"batch": ["a", "b"] * 50}},
                                         index=[f"c{{i}}" for i in range(100)]))
adata.obsm["X_pca"] = rng.normal(size=(100, 5))
ho = hm.integrate(adata, "batch", nproc=2, ncores=1, verbose=False)
with open({marker!r}, "a") as f:
    f.write(f"done {{adata.obsm['X_pca_harmony'].shape}} {{ho.Z_corr.shape}}\\n")
"""


def test_a_script_without_the_main_guard_runs_once(tmp_path):
    """``integrate(nproc=2)`` at a script's top level, no ``if __name__ ==
    "__main__":``: the processes never import the script, so it runs once and
    gives its result (it used to run again in every process, then fail)."""
    pytest.importorskip("anndata")
    marker = tmp_path / "marker.txt"
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED.format(marker=str(marker)))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the script did not finish within {LIMIT} s")
    assert proc.returncode == 0, err
    assert marker.read_text().splitlines() == ["top level ran", "done (100, 5) (5, 100)"]
    assert_nothing_left(proc.pid, tmp_path)


# ------------------------------------------------ forming the group
def test_a_group_that_cannot_form_gives_up_after_the_start_timeout():
    """Rank 0 of 2 with no rank 1 (it died while importing): refused after the
    start timeout (here 1 s), not torch.distributed's 30 minutes."""
    probe = (
        "import sys, time; from harmonypy.distributed.child import join_group\n"
        "from harmonypy.distributed.launch import _free_port\n"
        "began = time.monotonic()\n"
        "try:\n"
        "    join_group(rank=0, world_size=2, port=_free_port(), backend='gloo', timeout=1)\n"
        "except RuntimeError as err:\n"
        "    print(f'{time.monotonic() - began:.1f}|{err}')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=_env(), capture_output=True, text=True, timeout=LIMIT
    )
    seconds, _, message = done.stdout.partition("|")
    assert message, done.stdout + done.stderr
    assert float(seconds) < 10, seconds
    for word in [
        r"rank 0 of 2 could not form the process group",
        r"within 1 s",
        r"HARMONYPY_START_TIMEOUT",
    ]:
        assert re.search(word, message), message


# ------------------------------------------------- torchrun's parts
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def _torchrun(
    nproc: int, pcs: Path, meta: Path, outdir: Path, *extra
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "harmonypy.shard",
            pcs,
            meta,
            "--vars",
            "batch",
            "-o",
            outdir,
            "--threads",
            "1",
            "-q",
            *extra,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=LIMIT,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A finished two-rank torchrun run over 600 cells, and its single-process result."""
    if TORCHRUN is None:
        pytest.skip("torchrun is not installed beside this Python")
    from harmonypy._simulate import simulate

    folder = tmp_path_factory.mktemp("torchrun")
    z, meta = simulate(n_cells=600, n_pcs=8, n_batches=3, seed=2)
    np.save(folder / "pcs.npy", z.astype(np.float32))
    meta.to_csv(folder / "meta.tsv", sep="\t", index=False)
    done = _torchrun(2, folder / "pcs.npy", folder / "meta.tsv", folder / "out")
    assert done.returncode == 0, done.stderr
    return folder


def test_an_earlier_runs_parts_are_refused_unless_force(parts, tmp_path):
    """A second run into the same folder, with fewer ranks, is refused before any
    work; with --force it removes the old parts (of any world size) first, and
    ``read_parts`` gives one row per cell (#22: 2x the rows)."""
    from harmonypy.shard import read_parts

    outdir = tmp_path / "out"
    shutil.copytree(parts / "out", outdir)
    before = {p.name: p.read_bytes() for p in outdir.iterdir()}
    done = _torchrun(1, parts / "pcs.npy", parts / "meta.tsv", outdir)
    assert done.returncode != 0
    for word in [
        re.escape(str(outdir)),
        r"already holds an earlier run's outputs",
        r"part-00000-of-00002\.npy",
        r"--force",
    ]:
        assert re.search(word, done.stderr), done.stderr
    assert {p.name: p.read_bytes() for p in outdir.iterdir()} == before  # untouched

    done = _torchrun(1, parts / "pcs.npy", parts / "meta.tsv", outdir, "--force")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in outdir.iterdir()) == [
        "manifest.json",
        "part-00000-of-00001.npy",
        "summary.json",
    ]
    assert read_parts(outdir).shape == (600, 8)


def _damaged(parts: Path, tmp_path: Path, damage) -> Path:
    outdir = tmp_path / "out"
    shutil.copytree(parts / "out", outdir)
    damage(outdir)
    return outdir


def _rewrite_part(outdir: Path) -> None:
    """Same size and header, other numbers: as a later run's part would be."""
    path = outdir / "part-00001-of-00002.npy"
    part = np.load(path)
    np.save(path, part[::-1].copy())


def _manifest_field(field, value):
    def damage(outdir: Path) -> None:
        manifest = json.loads((outdir / "manifest.json").read_text())
        manifest[field] = value
        (outdir / "manifest.json").write_text(json.dumps(manifest))

    return damage


# name: (damage to a finished run's folder, error type, words)
DAMAGED_PARTS = {
    "a part missing": (
        lambda d: (d / "part-00001-of-00002.npy").unlink(),
        FileNotFoundError,
        [r"part-00001-of-00002\.npy", r"rank 1 of 2", r"missing", r"/out\b"],
    ),
    "an extra part of another run (world size 3)": (
        lambda d: shutil.copy(d / "part-00000-of-00002.npy", d / "part-00002-of-00003.npy"),
        ValueError,
        [r"part-00002-of-00003\.npy", r"not in manifest\.json", r"--force"],
    ),
    "a truncated part": (
        lambda d: os.truncate(d / "part-00000-of-00002.npy", 1000),
        ValueError,
        [r"part-00000-of-00002\.npy", r"1,000 bytes", r"truncated"],
    ),
    "a part rewritten since the run (same size)": (
        _rewrite_part,
        ValueError,
        [r"part-00001-of-00002\.npy", r"SHA-256"],
    ),
    "no manifest (an unfinished run)": (
        lambda d: (d / "manifest.json").unlink(),
        FileNotFoundError,
        [r"no manifest\.json", r"part-00000-of-00002\.npy", r"did not finish"],
    ),
    "a manifest that is not JSON": (
        lambda d: (d / "manifest.json").write_text("{parts: "),
        ValueError,
        [r"manifest\.json", r"not a readable harmonypy\.shard manifest"],
    ),
    "a manifest whose rows do not cover the cells": (
        _manifest_field("n_cells", 601),
        ValueError,
        [r"manifest\.json", r"row ranges"],
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED_PARTS))
def test_read_parts_refuses_parts_that_do_not_match_the_manifest(parts, tmp_path, case):
    from harmonypy.shard import read_parts

    damage, error, words = DAMAGED_PARTS[case]
    outdir = _damaged(parts, tmp_path, damage)
    with pytest.raises(error) as info:
        read_parts(outdir)
    for word in words:
        assert re.search(word, str(info.value)), f"{case}: {word!r} not in: {info.value}"


def test_read_parts_gives_the_run_in_the_inputs_order(parts):
    from harmonypy.shard import read_parts

    corrected = read_parts(parts / "out")
    manifest = json.loads((parts / "out" / "manifest.json").read_text())
    assert corrected.shape == (600, 8) and corrected.dtype == np.float32
    assert manifest["world_size"] == 2 and manifest["n_cells"] == 600 and manifest["d"] == 8
    assert [p["rows"] for p in manifest["parts"]] == [[0, 300], [300, 600]]
    np.testing.assert_array_equal(
        corrected, np.concatenate([np.load(parts / "out" / p["file"]) for p in manifest["parts"]])
    )
    assert np.isfinite(corrected).all()
