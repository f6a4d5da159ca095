"""numba, an optional dependency (``pip install 'harmonypy[fast]'``): the
setting that chooses its kernels, loading them, and their thread count.

The clustering rounds (:mod:`harmonypy.engine.fused`), LISI's scores
(:mod:`harmonypy.metrics.lisi`) and the IVF neighbour search
(:mod:`harmonypy.neighbors.ivf`) each have a numba kernel module beside their
PyTorch/numpy path; one environment variable, :data:`ENV_VARIABLE`, chooses
for all of them. Any layer may import this module: it imports nothing from the
package, and numba only when a kernel module is loaded.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

__all__ = [
    "ENV_VARIABLE",
    "FAST_HINT",
    "KERNEL_LOCK",
    "choose",
    "engine_thread_count",
    "engine_threads",
    "load",
    "setting",
]

#: The environment variable that chooses: unset, ``auto`` or ``1`` (numba's
#: kernels where the work is large enough to repay loading them, when numba
#: imports), ``always`` (at any size) or ``0`` (never).
ENV_VARIABLE = "HARMONYPY_FUSED"
#: How to install numba.
FAST_HINT = "pip install 'harmonypy[fast]'"
_SETTINGS = ("", "auto", "0", "1", "always")

#: Held while a numba kernel runs: numba's workqueue threading layer (its
#: fallback without OpenMP or TBB) aborts the process when two Python threads
#: launch parallel kernels at once, so callers in several threads take turns.
KERNEL_LOCK = threading.Lock()


def setting() -> str:
    """:data:`ENV_VARIABLE`'s value, stripped ('' when unset).

    Raises
    ------
    ValueError
        When it is set to anything but ``auto``, ``1``, ``always`` or ``0``.
    """
    value = os.environ.get(ENV_VARIABLE, "").strip()
    if value not in _SETTINGS:
        raise ValueError(f"{ENV_VARIABLE} must be auto, 1, always or 0 (or unset), got {value!r}")
    return value


def load(module: str) -> ModuleType:
    """Import a numba kernel module (ImportError without numba)."""
    return importlib.import_module(module)


def choose(module: str, *, work: int, min_work: int, unit: str) -> tuple[ModuleType | None, str]:
    """The kernel module to use for ``work`` (``None``: the PyTorch/numpy
    path) and why, in one phrase.

    Parameters
    ----------
    module : str
        The kernel module's import name.
    work : int
        The size of the job, in ``unit``.
    min_work : int
        From which size the kernels run by default: where they save more than
        importing numba and loading the compiled kernels costs (~0.5 s).
    unit : str
        What ``work`` counts, for the phrase (``"cells"``).
    """
    value = setting()
    named = f"{ENV_VARIABLE}={value}" if value else f"{ENV_VARIABLE} unset"
    if value == "0":
        return None, named
    if value != "always" and work < min_work:
        return None, (
            f"{work:,} {unit}, below the {min_work:,} where loading numba pays off; "
            f"{ENV_VARIABLE}=always uses it at any size"
        )
    try:
        return load(module), named
    except ImportError as error:
        return None, f"numba is not available ({error}); {FAST_HINT}"


def engine_thread_count() -> int:
    """The threads numba's kernels run on: as many as PyTorch's, at most
    numba's own limit (``NUMBA_NUM_THREADS``)."""
    import numba

    most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set by numba at import
    return max(1, min(torch.get_num_threads(), most))


@contextmanager
def engine_threads() -> Iterator[None]:
    """numba's kernels on :func:`engine_thread_count` threads in this block;
    the caller's numba setting is restored after."""
    import numba

    caller = numba.get_num_threads()
    numba.set_num_threads(engine_thread_count())
    try:
        yield
    finally:
        numba.set_num_threads(caller)
