"""The memory estimate against the measured peak, one fresh process per case.

Each case runs ``run_harmony`` in a child process and reports the increase of
the process's peak resident memory (``VmHWM``) over its resident memory just
before the call, beside ``harmonypy.engine.memory.estimate_memory`` for the same
problem, and the whole process's peak. Prints a Markdown table.

    python benchmarks/bench_memory.py            # ~2 min on 2 cores
    python benchmarks/bench_memory.py --quick    # the small cases only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, pandas as pd
import harmonypy as hm
from harmonypy.engine import memory as _memory
from harmonypy.engine.clustering import n_blocks_of

case = json.loads(sys.argv[2])
n, d, levels = case["n"], case["d"], case["levels"]
rng = np.random.default_rng(0)
z = rng.standard_normal((n, d), dtype=np.float64 if case["input"] == "float64" else np.float32)
meta = pd.DataFrame({f"v{i}": pd.Categorical(rng.integers(0, b, n)) for i, b in enumerate(levels)})
kwargs = dict(verbose=False, max_iter_harmony=case.get("iterations", 1), max_iter_kmeans=2,
              dtype=case["dtype"], algorithm=case["algorithm"],
              block_size=case.get("block_size", 0.05))
K = min(100, max(1, round(n / 30)))
import torch
dtype = torch.float64 if case["dtype"] == "float64" else torch.float32
copies = case["input"] != case["dtype"]
estimate = _memory.estimate_memory(
    _memory.RunSize(n, d, K, levels, n_blocks=n_blocks_of(n, kwargs["block_size"])),
    dtype=dtype, algorithm=case["algorithm"], copies_input=copies).peak()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

warm = pd.DataFrame({"b": np.arange(200) % 2})  # torch's first calls, outside the measure
hm.run_harmony(z[:200], warm, "b", **kwargs)
before = status("VmRSS")
hm.run_harmony(z, meta, list(meta.columns), **kwargs)
print(json.dumps(dict(estimate=estimate, increase=status("VmHWM") - before,
                      peak=status("VmHWM"), input=z.nbytes)))
"""

CASES = [
    dict(n=3000, d=20, levels=[1000], dtype="float32", input="float32", algorithm="harmony1"),
    dict(n=3000, d=20, levels=[4, 1000], dtype="float32", input="float32", algorithm="harmony1"),
    dict(
        n=20000,
        d=20,
        levels=[20],
        dtype="float32",
        input="float32",
        algorithm="harmony1",
        block_size=1e-4,
    ),
    dict(n=20000, d=20, levels=[200, 300], dtype="float32", input="float32", algorithm="harmony1"),
    dict(n=20000, d=20, levels=[200, 300], dtype="float64", input="float64", algorithm="harmony2"),
    dict(n=100000, d=50, levels=[20], dtype="float32", input="float32", algorithm="harmony1"),
    dict(n=100000, d=50, levels=[20], dtype="float32", input="float64", algorithm="harmony1"),
    dict(n=100000, d=50, levels=[20], dtype="float64", input="float64", algorithm="harmony1"),
    dict(n=100000, d=50, levels=[20, 500], dtype="float32", input="float32", algorithm="harmony2"),
    dict(n=1000000, d=50, levels=[64], dtype="float32", input="float32", algorithm="harmony1"),
    dict(n=1000000, d=50, levels=[64], dtype="float32", input="float32", algorithm="harmony2"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="skip the 1,000,000-cell cases")
    args = p.parse_args(argv)
    cases = [c for c in CASES if not (args.quick and c["n"] >= 1_000_000)]
    mb = 2**20
    print(
        "| cells x dims | levels | run (input) | estimate (MB) | measured (MB) | "
        "measured / estimate | whole process peak (GB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(ROOT / "src"), json.dumps(case)],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            print(f"| {case} | failed: {out.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        run = case["dtype"] + ("" if case["algorithm"] == "harmony1" else ", harmony2")
        if "block_size" in case:
            run += f", block_size {case['block_size']:g}"
        levels = " + ".join(f"{b:,}" for b in case["levels"])
        print(
            f"| {case['n']:,} x {case['d']} | {levels} | {run} ({case['input']} input) | "
            f"{r['estimate'] / mb:.0f} | {r['increase'] / mb:.0f} | "
            f"{r['increase'] / r['estimate']:.2f} | {r['peak'] / 1e9:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
