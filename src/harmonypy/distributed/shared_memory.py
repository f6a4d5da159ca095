"""Arrays in shared memory that no file name points to, for the launcher's processes.

The launcher (:mod:`harmonypy.distributed.launch`) puts the embedding and the
result in memory from ``memfd_create`` (or an unlinked temporary file) and
hands the file descriptors to its children (:mod:`harmonypy.distributed.child`),
which map them: nothing is pickled per cell, and nothing is left in
``/dev/shm`` whatever happens, since the memory is freed with its last user.
"""

from __future__ import annotations

import mmap
import os
import tempfile

import numpy as np

__all__ = ["anonymous_fd", "mapped", "shared_array"]


def anonymous_fd() -> int:
    """A file descriptor of memory no file name points to (freed with its last user)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("harmonypy")
    folder = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryFile(dir=folder) as handle:  # unlinked at creation on POSIX
        return os.dup(handle.fileno())


def shared_array(shape: tuple, dtype) -> tuple[int, np.ndarray]:
    """``(fd, array)``: an array in shared memory, and the descriptor children map."""
    descriptor = anonymous_fd()
    try:
        nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        os.ftruncate(descriptor, nbytes)
        return descriptor, mapped(descriptor, shape, dtype)
    except BaseException:
        os.close(descriptor)
        raise


def mapped(descriptor: int, shape: tuple, dtype, *, writable: bool = True) -> np.ndarray:
    """The array of ``shape`` and ``dtype`` in the shared memory ``descriptor``."""
    count = int(np.prod(shape))
    nbytes = max(1, count * np.dtype(dtype).itemsize)
    access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
    return np.frombuffer(
        mmap.mmap(descriptor, nbytes, access=access), dtype=dtype, count=count
    ).reshape(shape)
