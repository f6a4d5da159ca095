"""One rank of a distributed Harmony run, for tests/distributed/test_distributed.py.

Usage: python distributed_worker.py SHARD.npz OUT.npz RANK WORLD_SIZE PORT [OPTIONS_JSON]

Reads this rank's shard (``z`` cells x PCs, ``batch`` and ``tech`` labels),
joins a gloo process group on 127.0.0.1:PORT, runs
``run_harmony(..., distributed=True)`` and writes its per-cell and global
results (or the error it raised) to OUT.npz.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

import harmonypy as hm


def main(shard, out, rank, world_size, port, options="{}"):
    rank, world_size = int(rank), int(world_size)
    options = json.loads(options)
    # Settings for one rank only (tests of ranks that disagree).
    options.update(options.pop("per_rank", {}).get(str(rank), {}))
    features = options.pop("features", None)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        data = np.load(shard, allow_pickle=False)
        meta = pd.DataFrame({"batch": data["batch"], "tech": data["tech"]})
        z = data["z"] if features is None else data["z"][:, :features]
        vars_use = options.pop("vars_use", "batch")
        try:
            ho = hm.run_harmony(z, meta, vars_use, verbose=False, distributed=True, **options)
        except Exception as err:  # noqa: BLE001 - reported to the test
            np.savez(out, error=f"{type(err).__name__}: {err}")
            return
        np.savez(
            out,
            z_corr=ho.Z_corr.T,
            r=ho.R.T,
            y=ho.Y,
            o=ho.O,
            e=ho.E,
            objective=np.asarray(ho.objective_harmony),
            kmeans=np.asarray(ho.objective_kmeans),
            n_iter=ho.n_iter,
            converged=ho.converged,
            levels=np.asarray(ho.batch_levels),
            pr_b=ho.Pr_b,
            n_total=ho.N_total,
            bytes=ho.bytes_reduced,
            kmeans_rounds=np.asarray(ho.kmeans_rounds),
            k=ho.K,
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
