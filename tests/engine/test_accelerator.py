"""The engine on an accelerator (CUDA or Apple MPS): agreement with the CPU and
with R, reproducibility, and the same checks as on the CPU.

Every test is skipped where no accelerator is present (CI has none); they are
run by hand on a GPU machine (``benchmarks/device_check.sh``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_harmony import per_pc_correlation, simulated

import harmonypy as hm
from conftest import read_tsv


def _accelerators():
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found or [
        pytest.param("none", marks=pytest.mark.skip(reason="no CUDA or MPS device on this machine"))
    ]


@pytest.fixture(params=_accelerators())
def device(request):
    return request.param


def _dtypes(device):
    return ["float32"] if device == "mps" else ["float32", "float64"]


@pytest.mark.parametrize("algorithm", ["harmony1", "harmony2"])
def test_agrees_with_cpu(device, algorithm):
    z, meta = simulated(n_cells=3000, n_dims=20, n_batches=4)
    for dtype in _dtypes(device):
        cpu = hm.run_harmony(
            z, meta, "batch", verbose=False, device="cpu", dtype=dtype, algorithm=algorithm
        )
        acc = hm.run_harmony(
            z, meta, "batch", verbose=False, device=device, dtype=dtype, algorithm=algorithm
        )
        assert isinstance(acc.Z_corr, np.ndarray) and acc.Z_corr.shape == (20, 3000)
        assert np.isfinite(acc.Z_corr).all()
        r = per_pc_correlation(cpu.Z_corr.T, acc.Z_corr.T)
        assert r.min() > 0.999, (dtype, r.min())
        assert acc.n_iter == cpu.n_iter or abs(acc.n_iter - cpu.n_iter) <= 1
        np.testing.assert_allclose(acc.R.sum(0), 1.0, atol=1e-4)


def test_several_variables_and_estimated_lambda(device):
    z, meta = simulated(n_cells=2000, n_dims=15, n_batches=5)
    cpu = hm.run_harmony(z, meta, ["batch", "tech"], lamb=-1, verbose=False, device="cpu")
    acc = hm.run_harmony(z, meta, ["batch", "tech"], lamb=-1, verbose=False, device=device)
    assert per_pc_correlation(cpu.Z_corr.T, acc.Z_corr.T).min() > 0.999
    assert acc.Phi.shape == (7, 2000) and acc.lamb.shape == (8,)


def test_reproducible_for_a_fixed_seed(device):
    z, meta = simulated(n_cells=5000, n_dims=20, n_batches=6)
    for algorithm in ["harmony1", "harmony2"]:
        a = hm.run_harmony(
            z, meta, "batch", verbose=False, device=device, random_state=3, algorithm=algorithm
        )
        b = hm.run_harmony(
            z, meta, "batch", verbose=False, device=device, random_state=3, algorithm=algorithm
        )
        np.testing.assert_array_equal(a.Z_corr, b.Z_corr)
        assert a.objective_harmony == b.objective_harmony


def test_matches_r_on_pbmc(device, shared_data):
    meta = read_tsv(shared_data / "pbmc_3500_meta.tsv.gz")
    pcs = read_tsv(shared_data / "pbmc_3500_pcs.tsv.gz")
    for algorithm, name in [
        ("harmony1", "pbmc_3500_pcs_harmonized.tsv.gz"),
        ("harmony2", "pbmc_3500_pcs_harmonized_harmony2.tsv.gz"),
    ]:
        ref = read_tsv(shared_data / name).to_numpy()
        ho = hm.run_harmony(pcs, meta, ["donor"], verbose=False, device=device, algorithm=algorithm)
        r = per_pc_correlation(ho.Z_corr.T, ref)
        assert r.min() >= (0.995 if algorithm == "harmony1" else 0.99), (algorithm, r.min())


def test_tensor_input_on_the_device(device):
    z, meta = simulated(n_cells=1000, n_dims=10)
    on_device = torch.as_tensor(z, dtype=torch.float32, device=device)
    ho = hm.run_harmony(on_device, meta, "batch", verbose=False, device=device)
    ref = hm.run_harmony(z, meta, "batch", verbose=False, device=device)
    np.testing.assert_allclose(ho.Z_corr, ref.Z_corr, rtol=1e-5, atol=1e-5)
