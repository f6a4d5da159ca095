"""The package's outputs on the bundled data, to store and to compare with.

``python tests/stored_outputs.py`` writes ``tests/data/stored_outputs.npz``
from the code as it is; ``tests/test_stored_outputs.py`` recomputes every
array and compares it with the stored one. Regenerate the file only for a
change that is meant to move results (and say so in the commit); a change
that only moves code must leave every array bit for bit as it was.
"""

from __future__ import annotations

import platform
import warnings
from pathlib import Path

import numpy as np

import harmonypy as hm

STORED = Path(__file__).resolve().parent / "data" / "stored_outputs.npz"


def cpu_model() -> str:
    """The CPU's model name: BLAS may round differently on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def compute() -> dict[str, np.ndarray]:
    """Every stored output, recomputed (one thread: the same bits on the same CPU)."""
    pcs, meta = hm.datasets.load_pbmcs_small()
    X = pcs.to_numpy()
    out: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hm.ConvergenceWarning)
        for algorithm in ("harmony1", "harmony2"):
            ho = hm.run_harmony(X, meta, "donor", algorithm=algorithm, verbose=False, ncores=1)
            out[f"{algorithm}_Z_corr"] = ho.Z_corr
            out[f"{algorithm}_R"] = ho.R
            out[f"{algorithm}_objective"] = np.asarray(ho.objective_harmony)
        corrected = out["harmony1_Z_corr"].T
        out["lisi"] = hm.compute_lisi(corrected, meta, ["donor", "cell_type"])
        scores = hm.evaluate(corrected, meta, "donor", "cell_type")
        out["evaluate"] = np.array([scores.ilisi_median, scores.clisi_median])
        in_query = (meta["donor"] == "5p").to_numpy()
        ho = hm.run_harmony(X[~in_query], meta[~in_query], "donor", verbose=False, ncores=1)
        ref = hm.build_reference(ho, meta[~in_query], labels="cell_type")
        out["reference_Y"], out["reference_Nr"] = ref.Y, ref.Nr
        q = hm.map_query(X[in_query], meta[in_query], ref)
        out["mapped"] = q.result()
        out["confidence"] = np.asarray(q.confidence)
        labels = hm.transfer_labels(q, ref, "cell_type")
        out["labels"] = labels["label"].astype(str).to_numpy().astype("U")
        out["label_probability"] = labels["probability"].to_numpy()
    return out


if __name__ == "__main__":
    STORED.parent.mkdir(exist_ok=True)
    arrays = compute()
    np.savez_compressed(STORED, cpu=np.array(cpu_model()), **arrays)
    print(f"wrote {STORED} ({STORED.stat().st_size:,} bytes, {len(arrays)} arrays)")
