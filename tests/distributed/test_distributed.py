"""Distributed Harmony (``run_harmony(..., distributed=True)``) on gloo process
groups spawned on this machine (loopback only, each group bounded in time).

Every process runs ``tests/distributed_worker.py`` on its shard of the cells;
the gathered results are compared with a single-process run on all cells.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_harmony import per_pc_correlation

import harmonypy as hm
from harmonypy._simulate import simulate
from harmonypy.shard import read_parts

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

WORKER = Path(__file__).resolve().parents[1] / "distributed_worker.py"
GROUP_TIMEOUT = 120  # seconds for a whole group; a hang fails the test, it does not block CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(tmp_path, z, meta, shards, **options):
    """Run one process per shard (arrays of cell indices); returns their outputs."""
    port = _free_port()
    procs, outs = [], []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(hm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    for rank, cells in enumerate(shards):
        shard, out = tmp_path / f"shard{rank}.npz", tmp_path / f"out{rank}.npz"
        out.unlink(missing_ok=True)
        np.savez(
            shard,
            z=np.ascontiguousarray(z[cells]),
            batch=meta["batch"].astype(str).to_numpy()[cells].astype("U"),
            tech=meta["tech"].astype(str).to_numpy()[cells].astype("U"),
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    str(shard),
                    str(out),
                    str(rank),
                    str(len(shards)),
                    str(port),
                    json.dumps(options),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
        outs.append(out)
    try:
        logs = [p.communicate(timeout=GROUP_TIMEOUT)[0].decode(errors="replace") for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"distributed group of {len(shards)} did not finish in {GROUP_TIMEOUT} s")
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    return [dict(np.load(out)) for out in outs]


def gathered(z, shards, results, key="z_corr"):
    full = np.empty((z.shape[0], results[0][key].shape[1]), dtype=results[0][key].dtype)
    for cells, res in zip(shards, results, strict=True):
        full[cells] = res[key]
    return full


@pytest.fixture(scope="module")
def data():
    z, meta = simulate(n_cells=6000, n_pcs=20, n_batches=5, seed=1, second_batch=2)
    meta = meta.rename(columns={"batch2": "tech"})
    meta["batch"] = meta["batch"].astype(str)
    # b4 lives on rank 0 only in the shards below.
    return z, meta


def uneven_shards(meta, world, seed=0):
    """Shards of unequal sizes (about 1:2:3...), every cell of level b4 on rank 0."""
    rng = np.random.default_rng(seed)
    only_first = np.flatnonzero(meta["batch"].to_numpy() == "b4")
    rest = rng.permutation(np.setdiff1d(np.arange(len(meta)), only_first))
    weights = np.arange(1, world + 1) / np.arange(1, world + 1).sum()
    cuts = (np.cumsum(weights)[:-1] * len(rest)).astype(int)
    shards = np.split(rest, cuts)
    shards[0] = np.sort(np.concatenate([only_first, shards[0]]))
    return [np.sort(s) for s in shards]


def median_lisi(x, meta):
    return np.median(hm.compute_lisi(x, meta, ["batch", "cell_type"]), axis=0)


@pytest.mark.parametrize("algorithm,world", [("harmony1", 2), ("harmony2", 3)])
def test_agrees_with_a_single_process(tmp_path, data, algorithm, world):
    z, meta = data
    shards = uneven_shards(meta, world)
    assert len({len(s) for s in shards}) == world  # unequal sizes
    results = run_group(tmp_path, z, meta, shards, algorithm=algorithm)
    single = hm.run_harmony(z, meta, "batch", algorithm=algorithm, verbose=False)
    full = gathered(z, shards, results)
    assert per_pc_correlation(full, single.Z_corr.T).min() >= 0.999
    ours, theirs = median_lisi(full, meta), median_lisi(single.Z_corr.T, meta)
    np.testing.assert_allclose(ours, theirs, rtol=0.01)
    # Global attributes: the same on every rank; levels and proportions as one run's.
    for res in results[1:]:
        for key in ["y", "o", "e", "objective", "kmeans", "n_iter", "converged"]:
            np.testing.assert_array_equal(res[key], results[0][key])
    assert list(results[-1]["levels"]) == single.batch_levels  # b4 is absent on that rank
    np.testing.assert_allclose(results[-1]["pr_b"], single.Pr_b)
    assert int(results[1]["n_total"]) == len(meta)
    # Per-cell attributes: each rank's own cells, in its order.
    r_full = gathered(z, shards, results, "r")
    np.testing.assert_allclose(r_full.sum(1), 1.0, atol=1e-5)
    assert r_full.shape == (len(meta), single.K)


@pytest.mark.parametrize("algorithm", ["harmony1", "harmony2"])
def test_communicated_bytes_follow_the_formula(tmp_path, data, algorithm):
    from harmonypy.engine.clustering import n_blocks_of
    from harmonypy.engine.reduce import communicated_bytes

    z, meta = data
    shards = uneven_shards(meta, 2, seed=6)
    results = run_group(tmp_path, z, meta, shards, algorithm=algorithm)
    expected = communicated_bytes(
        algorithm=algorithm,
        rounds=int(results[0]["kmeans_rounds"].sum()),
        iterations=int(results[0]["n_iter"]),
        n_blocks=n_blocks_of(len(meta), 0.05),
        n_levels=5,
        n_clusters=int(results[0]["k"]),
        n_features=z.shape[1],
    )
    assert int(results[0]["bytes"]) == int(results[1]["bytes"]) == expected


def test_several_batch_variables(tmp_path, data):
    z, meta = data
    shards = uneven_shards(meta, 2, seed=1)
    results = run_group(tmp_path, z, meta, shards, vars_use=["batch", "tech"])
    single = hm.run_harmony(z, meta, ["batch", "tech"], verbose=False)
    assert per_pc_correlation(gathered(z, shards, results), single.Z_corr.T).min() >= 0.999
    np.testing.assert_array_equal(results[0]["o"], results[1]["o"])


def test_a_group_of_one_is_a_single_process_run(tmp_path, data):
    z, meta = data
    everything = [np.arange(len(meta))]
    # One thread on both sides: a matrix product's rounding can follow the thread count.
    (result,) = run_group(tmp_path, z, meta, everything, algorithm="harmony1", ncores=1)
    single = hm.run_harmony(z, meta, "batch", verbose=False, ncores=1)
    np.testing.assert_array_equal(result["z_corr"], single.Z_corr.T)
    np.testing.assert_array_equal(result["objective"], single.objective_harmony)


@pytest.mark.filterwarnings("ignore:Harmony did not converge")
def test_a_group_of_one_says_one_process(tmp_path, caplog):
    """A group of one (torchrun --nproc-per-node 1) reports "1 process", not "1 processes"."""
    import logging

    import torch.distributed as dist

    z, meta = simulate(n_cells=300, n_pcs=5, n_batches=2, seed=0)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        with caplog.at_level(logging.INFO, logger="harmonypy"):
            hm.run_harmony(
                z, meta, "batch", distributed=True, verbose=True, max_iter_harmony=1, ncores=1
            )
    finally:
        dist.destroy_process_group()
    assert "; 1 process (gloo)" in caplog.text, caplog.text
    assert "1 processes" not in caplog.text


def test_a_killed_process_is_named_before_the_errors_it_caused():
    """rank 1 killed by a signal: rank 0's error (its peer vanished) is a
    consequence; the launcher names rank 1 and how it ended."""
    from harmonypy.distributed.launch import _group_error

    gloo = ("error", "RuntimeError", "Connection closed by peer [127.0.0.1]:1234", "trace")
    error = _group_error([0, 1], [1, -9], [[("joined",), gloo], [("joined",)]])
    assert type(error) is RuntimeError
    assert str(error).startswith("rank 1 of 2 was killed by signal SIGKILL during the run")
    refused = (
        "error",
        "RuntimeError",
        "distributed Harmony stopped: rank 1 of 2 refused its "
        "input: ValueError: data_mat has 1 non-finite value(s)",
        "trace",
    )
    error = _group_error([0, 1], [1, 1], [[("joined",), refused], [("joined",)]])
    assert type(error) is ValueError and "rank 1 of 2 refused its input" in str(error)
    error = _group_error([1], [None, 1], [[], []])
    assert str(error).startswith(
        "rank 1 of 2 exited with status 1 while starting (before it joined the group)"
    )


def test_rerun_is_bit_identical(tmp_path, data):
    z, meta = data
    shards = uneven_shards(meta, 2, seed=2)
    first = run_group(tmp_path, z, meta, shards, algorithm="harmony2", random_state=7)
    second = run_group(tmp_path, z, meta, shards, algorithm="harmony2", random_state=7)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["z_corr"], b["z_corr"])
        np.testing.assert_array_equal(a["objective"], b["objective"])


def test_a_bad_shard_stops_every_rank_naming_it(tmp_path, data):
    z, meta = data
    z = z.copy()
    shards = uneven_shards(meta, 3, seed=4)
    z[shards[1][5], 2] = np.nan  # one bad value, on rank 1's shard
    results = run_group(tmp_path, z, meta, shards)
    for res in results:
        message = str(res["error"])
        assert "rank 1 of 3" in message, message
        assert "NaN" in message or "finite" in message, message
    assert str(results[1]["error"]).startswith("ValueError")  # its own error's type
    assert str(results[0]["error"]).startswith("RuntimeError")


def test_ranks_that_disagree_on_settings_are_refused(tmp_path, data):
    z, meta = data
    shards = uneven_shards(meta, 2, seed=5)
    results = run_group(tmp_path, z, meta, shards, per_rank={"1": {"theta": 1.0}})
    for res in results:
        message = str(res["error"])
        assert "rank 1 of 2 differs from rank 0 in theta" in message, message
    results = run_group(tmp_path, z, meta, shards, per_rank={"1": {"features": 12}})
    for res in results:
        assert "differs from rank 0 in d" in str(res["error"]), str(res["error"])


def test_needs_an_initialised_group():
    z, meta = simulate(n_cells=300, n_pcs=5, n_batches=2, seed=0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        hm.run_harmony(z, meta, "batch", distributed=True, verbose=False)
    with pytest.raises(ValueError, match="distributed=True"):
        hm.run_harmony(z, meta, "batch", process_group=object(), verbose=False)


# ------------------------------------------------------------------ launchers
def _write_inputs(tmp_path, z, meta):
    np.save(tmp_path / "pcs.npy", z)
    meta.to_csv(tmp_path / "meta.tsv", sep="\t", index=False)
    return tmp_path / "pcs.npy", tmp_path / "meta.tsv"


def _cli(*args, timeout=GROUP_TIMEOUT, module="harmonypy"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(hm.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_nproc_runs_one_group_over_shards(tmp_path, data):
    z, meta = data
    pcs, table = _write_inputs(tmp_path, z, meta)
    done = _cli(
        "run",
        pcs,
        table,
        "--vars",
        "batch",
        "-o",
        tmp_path / "out.npy",
        "--nproc",
        "2",
        "--threads",
        "1",
    )
    assert done.returncode == 0, done.stderr
    assert "2 processes (gloo)" in done.stderr
    corrected = np.load(tmp_path / "out.npy")
    single = hm.run_harmony(z, meta, "batch", verbose=False)
    assert per_pc_correlation(corrected, single.Z_corr.T).min() >= 0.999
    assert not list(tmp_path.glob(".*.tmp*"))  # no temporary file left behind


def test_cli_nproc_names_the_failing_rank(tmp_path, data):
    z, meta = data
    z = z.copy()
    z[-3, 0] = np.inf  # in the last shard
    pcs, table = _write_inputs(tmp_path, z, meta)
    done = _cli(
        "run",
        pcs,
        table,
        "--vars",
        "batch",
        "-o",
        tmp_path / "out.npy",
        "--nproc",
        "2",
        "--threads",
        "1",
    )
    assert done.returncode == 2, done.stderr  # bad input, whichever rank failed first
    assert "rank 1 of 2 refused its input: ValueError" in done.stderr, done.stderr
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.skipif(
    not shutil.which("torchrun", path=os.path.dirname(sys.executable)),
    reason="torchrun is not installed beside this Python",
)
def test_torchrun_recipe_writes_one_part_per_rank(tmp_path, data):
    z, meta = data
    pcs, table = _write_inputs(tmp_path, z, meta)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(hm.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    done = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "harmonypy.shard",
            pcs,
            table,
            "--vars",
            "batch",
            "-o",
            tmp_path / "parts",
            "--threads",
            "1",
            "-q",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=GROUP_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    parts = sorted((tmp_path / "parts").glob("part-*.npy"))
    assert [p.name for p in parts] == ["part-00000-of-00002.npy", "part-00001-of-00002.npy"]
    summary = json.loads((tmp_path / "parts" / "summary.json").read_text())
    assert summary["rows"] == [[0, 3000], [3000, 6000]] and summary["world_size"] == 2
    manifest = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert [(p["file"], p["rows"]) for p in manifest["parts"]] == [
        ("part-00000-of-00002.npy", [0, 3000]),
        ("part-00001-of-00002.npy", [3000, 6000]),
    ]
    assert (manifest["n_cells"], manifest["d"], manifest["dtype"]) == (6000, 20, "float32")
    corrected = read_parts(tmp_path / "parts")  # the README's recipe
    # The same group as `harmonypy run --nproc 2` (same shards, same seeds).
    done = _cli(
        "run",
        pcs,
        table,
        "--vars",
        "batch",
        "-o",
        tmp_path / "out.npy",
        "--nproc",
        "2",
        "--threads",
        "1",
        "-q",
    )
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(corrected, np.load(tmp_path / "out.npy"))


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.distributed.is_nccl_available()),
    reason="no CUDA device with NCCL on this machine",
)
@pytest.mark.parametrize("algorithm", ["harmony1", "harmony2"])
def test_nccl_group_on_every_gpu(data, algorithm):
    """One process per GPU (NCCL): a group of one equals the single CUDA run bit
    for bit; a group of several agrees with it as another draw would."""
    from harmonypy.distributed.launch import run_in_processes

    z, meta = data
    single = hm.run_harmony(z, meta, "batch", device="cuda", algorithm=algorithm, verbose=False)
    gpus = torch.cuda.device_count()
    run = run_in_processes(
        z, meta, "batch", gpus, device="cuda", algorithm=algorithm, verbose=False
    )
    assert run.backend == "nccl"
    if gpus == 1:
        np.testing.assert_array_equal(run.corrected, single.result())
    else:
        assert per_pc_correlation(run.corrected, single.result()).min() >= 0.999


def test_integrate_with_nproc_writes_what_a_single_run_writes(data):
    anndata = pytest.importorskip("anndata")
    z, meta = data
    adata = anndata.AnnData(
        obs=meta.astype({"batch": "category"}).set_axis([f"c{i}" for i in range(len(meta))])
    )
    adata.obsm["X_pca"] = z
    single = adata.copy()
    ho = hm.integrate(adata, "batch", nproc=2, ncores=1, verbose=False)
    hm.integrate(single, "batch", verbose=False)
    assert ho.world_size == 2 and ho.backend == "gloo"
    corrected = adata.obsm["X_pca_harmony"]
    assert corrected.dtype == np.float32 and corrected.shape == z.shape
    assert per_pc_correlation(corrected, single.obsm["X_pca_harmony"]).min() >= 0.999
    assert adata.uns["harmony"]["batch_levels"] == single.uns["harmony"]["batch_levels"]
    assert set(adata.uns["harmony"]) == set(single.uns["harmony"])
    with pytest.raises(ValueError, match="nproc must be an integer >= 1"):
        hm.integrate(adata, "batch", nproc=0, adjusted_basis="other")


def test_launcher_refuses_a_group_that_would_not_fit(monkeypatch, data):
    from harmonypy.distributed.launch import run_in_processes
    from harmonypy.engine import memory as _memory

    z, meta = data
    monkeypatch.setattr(_memory, "available_memory", lambda device="cpu": {"host": 2**20})
    with pytest.raises(
        MemoryError,
        match=r"2 processes over 6,000 cells.*shared memory.*"
        r"check_memory=False",
    ):
        run_in_processes(z, meta, "batch", 2)


def test_child_errors_keep_the_refused_ranks_error_type():
    from harmonypy.distributed.launch import _child_error

    trace = (
        "Traceback (most recent call last):\n  File x\nRuntimeError: distributed "
        "Harmony stopped: rank 1 of 2 refused its input: ValueError: data_mat has NaN"
    )
    error = _child_error(trace)
    assert type(error) is ValueError and "rank 1 of 2" in str(error)
    assert type(_child_error("Traceback\nKeyError: 'x'")) is KeyError
    assert type(_child_error("Traceback\nSomeLibraryError: boom")) is RuntimeError
    assert type(_child_error("no colon here")) is RuntimeError


@pytest.mark.skipif(
    not shutil.which("torchrun", path=os.path.dirname(sys.executable)),
    reason="torchrun is not installed beside this Python",
)
def test_torchrun_recipe_reads_its_rows_of_an_h5ad(tmp_path, data):
    anndata = pytest.importorskip("anndata")
    z, meta = data
    adata = anndata.AnnData(obs=meta.set_axis([f"c{i}" for i in range(len(meta))]))
    adata.obsm["X_pca"] = z
    adata.write_h5ad(tmp_path / "a.h5ad")
    pcs, table = _write_inputs(tmp_path, z, meta)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(hm.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    parts = {}
    for name, inputs in [("h5ad", [tmp_path / "a.h5ad"]), ("npy", [pcs, table])]:
        done = subprocess.run(
            [
                torchrun,
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "harmonypy.shard",
                *inputs,
                "--vars",
                "batch",
                "-o",
                tmp_path / name,
                "--threads",
                "1",
                "-q",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=GROUP_TIMEOUT,
        )
        assert done.returncode == 0, done.stderr
        parts[name] = read_parts(tmp_path / name)
    np.testing.assert_array_equal(parts["h5ad"], parts["npy"])
