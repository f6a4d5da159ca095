"""Copies between a caller's arrays and the engine's tensors, in chunks.

The input is wrapped without a copy when it already has the run's dtype and
layout on the CPU, else converted chunk by chunk; :meth:`Harmony.result`
fills a caller's ``out`` the same way. Chunks keep a second full-size copy
from ever existing (a float64 input run in float32, an ``out`` on disk).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

#: Cells copied at once between a caller's array and the engine's (the input
#: converted to the run's dtype, :meth:`Harmony.result` filling ``out``), so
#: that no second full-size copy is ever made.
COPY_CHUNK_ROWS = 65536


def input_used_as_is(z, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`input_tensor` wraps ``z`` instead of copying it."""
    np_dtype = np.dtype(np.float64 if dtype == torch.float64 else np.float32)
    return (
        device.type == "cpu"
        and isinstance(z, np.ndarray)
        and z.dtype == np_dtype
        and z.flags.c_contiguous
        and z.dtype.isnative
    )


def input_tensor(z: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (N, d) input as a tensor of ``dtype`` on ``device``, without a copy
    when it can be used as it is.

    On the CPU a C-contiguous array of the run's dtype (also a read-only one,
    such as a memory-mapped ``.npy``) is wrapped, not copied: the engine never
    writes to it. Anything else is converted in chunks of 65,536 rows, so a
    float64 input run in float32 never has a second float64 copy.
    """
    np_dtype = np.dtype(np.float64 if dtype == torch.float64 else np.float32)
    if input_used_as_is(z, dtype, device):
        with warnings.catch_warnings():  # read-only input: fine, it is only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(z)
    out = torch.empty(z.shape, dtype=dtype, device=device)
    for start in range(0, z.shape[0], COPY_CHUNK_ROWS):
        stop = min(z.shape[0], start + COPY_CHUNK_ROWS)
        chunk = np.ascontiguousarray(z[start:stop], dtype=np_dtype)
        out[start:stop] = torch.from_numpy(chunk).to(device)
    return out


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite: a NaN or inf makes the sum non-finite, and
    the sum is one cheap pass; only an overflowing sum needs the full check."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def write_rows(out: np.ndarray, z: torch.Tensor) -> np.ndarray:
    """Copy ``z`` (N, d) into the caller's array ``out`` in chunks of rows, after
    checking it (a NumPy float array of the same shape, writable); returns ``out``.

    Each chunk is cast to ``out``'s dtype, so an ``out`` on disk or of another
    float dtype never needs a full-size intermediate copy.
    """
    n, d = z.shape
    if not isinstance(out, np.ndarray):
        raise TypeError(
            f"out must be a NumPy array (or np.memmap) of shape "
            f"({n}, {d}), got {type(out).__name__}"
        )
    if out.shape != (n, d):
        raise ValueError(f"out must have shape ({n}, {d}) (cells x features), got {out.shape}")
    if out.dtype.kind != "f":
        raise ValueError(f"out must have a float dtype, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    for start in range(0, n, COPY_CHUNK_ROWS):
        stop = min(n, start + COPY_CHUNK_ROWS)
        out[start:stop] = z[start:stop].detach().cpu().numpy()
    return out


def numerical_failure(*, step: str, what: str, iteration: int) -> FloatingPointError:
    """The error for non-finite values in ``what`` during ``step``."""
    return FloatingPointError(
        f"Harmony produced non-finite values in {what} during the {step} step "
        f"(iteration {iteration}). Usual causes: PCs on an extreme scale, "
        f"duplicated or near-identical cells dominating a cluster, sigma far too "
        f"small, or theta/lamb values far outside the usual range (theta ~ 0-4, "
        f"lamb ~ 0.1-10). Try dtype='float64' or check the input embedding."
    )
