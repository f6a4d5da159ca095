"""Reading an ``.npz`` archive whose arrays are checked before they are read.

``np.load`` allocates whatever shape a member's ``.npy`` header declares, and
inflates a compressed member without a bound: a small file (compressed zeros,
or a header declaring terabytes) can exhaust memory before its reader sees
anything wrong. :class:`NpzArchive` instead lists the members from the ZIP
directory, reads each ``.npy`` header alone (:func:`numpy.lib.format.read_magic`
and ``read_array_header_*``) so that the caller can compare the declared
dtypes and shapes with what it expects, and reads an array only then, into an
array of exactly the declared size, from a stream that stops at the member's
declared length. Every size a member declares is bounded by the file: a stored
member by its own bytes, a compressed one by what deflate can produce from its
compressed bytes. Only arrays are read: object arrays (pickles) are refused.

Every refusal is raised through the caller's ``problem(message)``, which
turns a message into the exception to raise (naming the file).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["ArrayHeader", "NpzArchive"]

#: Largest output of deflate per input byte (runs of one byte: 258 bytes per
#: 2 bits of a code, i.e. 1032:1), plus room for the stream's own framing.
_DEFLATE_RATIO = 1032
_DEFLATE_SLACK = 1024

#: Bytes read at once from a member: a bounded temporary that stays in cache
#: (256 KiB, as numpy's own reader; 16 MiB chunks were twice as slow).
_CHUNK = 1 << 18

#: Largest ``.npy`` header read (numpy's own default bound).
_MAX_HEADER = 10_000

_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
    RuntimeError,
)


@dataclass(frozen=True)
class ArrayHeader:
    """What a member's ``.npy`` header declares.

    Attributes
    ----------
    key : str
        The member's name without ``.npy``.
    dtype : numpy.dtype
    shape : tuple of int
    fortran_order : bool
    """

    key: str
    dtype: np.dtype
    shape: tuple
    fortran_order: bool

    @property
    def nbytes(self) -> int:
        """Bytes of the array's data (exact integers: no overflow on a huge shape)."""
        count = 1
        for n in self.shape:
            count *= n
        return count * self.dtype.itemsize


class NpzArchive:
    """The members of an ``.npz`` file, read header first.

    Parameters
    ----------
    path : Path
    problem : callable
        ``problem(message)`` returns the exception to raise for a refused
        file (naming it); messages start with a verb (``"is ..."``,
        ``"has ..."``).

    Use as a context manager; :attr:`keys` lists the members' keys.
    """

    def __init__(self, path: Path, problem: Callable[[str], Exception]):
        self._problem = problem
        size = path.stat().st_size
        try:
            self._zip = zipfile.ZipFile(path)
        except _READ_ERRORS as err:
            raise problem(
                f"cannot be read as a .npz archive ({_reason(err)}); it is "
                f"truncated, corrupt, or not an .npz file"
            ) from None
        try:
            self._members = self._list_members(size)
        except BaseException:
            self._zip.close()
            raise

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, *exc) -> None:
        self._zip.close()

    @property
    def keys(self) -> list[str]:
        return list(self._members)

    def _list_members(self, file_size: int) -> dict[str, zipfile.ZipInfo]:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in self._zip.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if key in members:
                raise self._problem(f"holds the array {key!r} twice; the file is corrupt")
            if info.flag_bits & 0x1:
                raise self._problem(
                    f"holds an encrypted member {key!r}; a reference file is never encrypted"
                )
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise self._problem(
                    f"compresses its member {key!r} with ZIP method {info.compress_type}; "
                    f"numpy writes members stored or deflated (np.savez, np.savez_compressed)"
                )
            if info.compress_type == zipfile.ZIP_STORED:
                most = info.compress_size
            else:
                most = info.compress_size * _DEFLATE_RATIO + _DEFLATE_SLACK
            if info.compress_size > file_size or info.file_size > most:
                raise self._problem(
                    f"has a member {key!r} that declares {info.file_size:,} bytes from "
                    f"{info.compress_size:,} stored bytes (the file has {file_size:,}): more "
                    f"than its data can hold; the file is corrupt"
                )
            members[key] = info
        return members

    def header(self, key: str) -> ArrayHeader:
        """The dtype and shape the member ``key`` declares, its data unread.

        Raises (through ``problem``) for a member that is not a ``.npy``
        array, an object array, or a header whose array does not fill the
        member's declared size exactly.
        """
        info = self._members[key]
        try:
            with self._zip.open(info) as stream:
                dtype, shape, fortran, offset = _read_header(stream)
        except _READ_ERRORS as err:
            raise self._problem(
                f"is truncated or corrupt: the .npy header of array {key!r} "
                f"cannot be read ({_reason(err)})"
            ) from None
        if dtype.hasobject:
            raise self._problem(
                f"has an array {key!r} of Python objects ({dtype}); a "
                f"reference file holds only numbers and text (no pickle)"
            )
        header = ArrayHeader(key, dtype, tuple(int(n) for n in shape), bool(fortran))
        if offset + header.nbytes != info.file_size:
            raise self._problem(
                f"has an array {key!r} whose header declares {dtype} {header.shape} "
                f"({header.nbytes:,} bytes) in a member of {info.file_size - offset:,} bytes; "
                f"the file is corrupt"
            )
        return header

    def read(self, header: ArrayHeader) -> np.ndarray:
        """The array ``header`` declares (as :meth:`header` returned it, checked by
        the caller): exactly its bytes, read in bounded chunks; the member's
        CRC is checked at its end."""
        key = header.key
        order: Literal["C", "F"] = "F" if header.fortran_order else "C"
        array = np.empty(header.shape, dtype=header.dtype, order=order)
        flat = array.reshape(-1, order="A").view(np.uint8)
        try:
            with self._zip.open(self._members[key]) as stream:
                _read_header(stream)
                done = 0
                while done < flat.size:
                    chunk = stream.read(min(_CHUNK, flat.size - done))
                    if not chunk:
                        raise EOFError(f"{flat.size - done:,} bytes missing")
                    flat[done : done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                    done += len(chunk)
                if stream.read(1):
                    raise ValueError("more data than its header declares")
        except _READ_ERRORS as err:
            raise self._problem(
                f"is truncated or corrupt: array {key!r} cannot be read ({_reason(err)})"
            ) from None
        return array


def _read_header(stream) -> tuple[np.dtype, tuple, bool, int]:
    """``(dtype, shape, fortran_order, offset of the data)`` of a ``.npy`` stream."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(
            stream, max_header_size=_MAX_HEADER
        )
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(
            stream, max_header_size=_MAX_HEADER
        )
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not read here")
    return dtype, shape, fortran, stream.tell()


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
