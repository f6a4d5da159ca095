"""Outputs: checked before the computation, written all together or not at all.

:func:`check_outputs` refuses, before any work, an output with the wrong
format, in a missing or read-only folder, that is an input or another
output, or that exists without ``force``. :class:`OutputFiles` is the one
atomic write of the package: each output goes to a temporary file in its
destination folder, and all are renamed into place together once every one
is complete, with Ctrl-C held back during the renames. An error or Ctrl-C
leaves the previous files untouched and no temporary file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from harmonypy.io.formats import file_format, format_suffix, plot_formats

logger = logging.getLogger(__name__)

__all__ = ["OutputFiles", "OutputSpec", "check_outputs", "write_outputs"]


@dataclass(frozen=True)
class OutputSpec:
    """An output the command will write, for :func:`check_outputs`.

    Attributes
    ----------
    option : str
        The option that names it, for messages (``"-o/--output"``, ``"--plot"``).
    path : str or Path
        The file to write.
    formats : tuple of str, or None
        Accepted :func:`file_format` values; None for a matplotlib figure
        (any extension matplotlib can save).
    """

    option: str
    path: str | Path
    formats: tuple[str, ...] | None


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Same file: same inode when both exist (hard links too), else the same real path."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def check_outputs(
    outputs: Sequence[OutputSpec], inputs: dict[str, str | Path | None], *, force: bool
) -> None:
    """Check that every output can be written, before any computation.

    So that a refused command writes nothing and an accepted one does not
    fail after a long run, each output is checked for: a supported format,
    a destination folder that exists and is writable, not being a folder,
    a device or another special file, not being one of the ``inputs`` (after
    resolving symlinks, or the same inode), not being another output, and
    not existing unless ``force``.

    Parameters
    ----------
    outputs : sequence of OutputSpec
        The files to be written; entries with ``path`` None are skipped.
    inputs : dict
        ``{"EMBEDDING": path, "META": path}``; None values are skipped.
    force : bool
        Whether existing outputs may be replaced (``--force``).

    Raises
    ------
    ValueError
        Unsupported format, an input or another output as destination.
    FileNotFoundError, NotADirectoryError, PermissionError
        Destination folder missing, not a folder, or not writable.
    IsADirectoryError
        The output is an existing folder.
    FileExistsError
        The output exists and ``force`` is False.
    """
    checked: list[OutputSpec] = []
    for spec in outputs:
        if spec.path is None:
            continue
        path = Path(spec.path)
        # First: writing over an input is the costliest mistake, say so whatever else is wrong.
        for what, source in inputs.items():
            if source is not None and _same_file(path, source):
                raise ValueError(
                    f"{spec.option} {path} is the input {what} ({source}); "
                    f"write the result to another file"
                )
        for other in checked:
            if _same_file(path, other.path):
                raise ValueError(f"{spec.option} and {other.option} name the same file: {path}")
        if spec.formats is None:
            _check_plot_format(spec)
        else:
            fmt = file_format(path)
            if fmt not in spec.formats:
                raise ValueError(
                    f"{spec.option} {str(path)!r}: format {fmt!r} not possible here; "
                    f"use one of {', '.join(spec.formats)}"
                )
        if path.is_dir():
            raise IsADirectoryError(f"{spec.option} {path} is a folder; give a file name")
        folder = Path(os.path.realpath(path)).parent
        if not folder.exists():
            raise FileNotFoundError(
                f"output folder does not exist: {path.parent} ({spec.option} {path})"
            )
        if not folder.is_dir():
            raise NotADirectoryError(f"{spec.option} {path}: {path.parent} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{spec.option} {path}: no permission to write in {folder}")
        if path.exists():
            if not stat.S_ISREG(path.stat().st_mode):
                raise ValueError(f"{spec.option} {path} exists and is not a regular file")
            if not force:
                raise FileExistsError(
                    f"{spec.option} {path} already exists; pass --force to replace it"
                )
        checked.append(spec)


def _check_plot_format(spec: OutputSpec) -> None:
    extension = Path(spec.path).suffix.lower().lstrip(".")
    supported = plot_formats()
    if extension not in supported:
        raise ValueError(
            f"{spec.option} {str(spec.path)!r}: matplotlib cannot write "
            f"{'.' + extension if extension else 'a file without extension'}; "
            f"use one of {', '.join(sorted(supported))}"
        )


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM back until the block ends, then deliver them.

    Keeps short critical steps (registering a temporary file, renaming the
    outputs together, removing temporary files) from being cut in half.
    Only the main thread can handle signals; elsewhere this does nothing. A
    signal whose handler was not set from Python is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for s in held:
            signal.signal(s, previous[s])
        for signum in received[:1]:
            handler = previous[signal.Signals(signum)]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL and signum == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)  # its default action, now that the step is done


def _new_file_mode(final: Path) -> int:
    """Permission bits for an output: the replaced file's, else 0o666 less the umask."""
    try:
        return stat.S_IMODE(final.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync(path: str | Path, directory: bool = False) -> None:
    flags = os.O_RDONLY if (directory or os.name != "nt") else os.O_RDWR
    try:
        descriptor = os.open(path, flags)
    except OSError:
        if directory:  # not possible on every system (Windows); the data is synced
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(descriptor)


class OutputFiles:
    """Outputs written to temporary files and renamed into place together.

    Each :meth:`stage` creates an empty temporary file beside its destination
    (same folder, hence same filesystem): ``.NAME.XXXXXXXX.tmp.EXT``, keeping
    the extension so that writers that read the format from the name (pandas'
    compression, ``np.save``, anndata, matplotlib) see the right one. When
    every writer has finished, :meth:`commit` flushes each file to disk
    (fsync) and renames all of them into place with ``os.replace``, holding
    Ctrl-C back during the renames. Leaving the ``with`` block without
    :meth:`commit` (an error, Ctrl-C) removes the temporary files, so the
    destinations keep their previous content, or stay absent.

    Examples
    --------
    >>> with OutputFiles() as files:                                # doctest: +SKIP
    ...     write_table(table, files.stage("out.tsv.gz"))
    ...     save_figure(fig, files.stage("before_after.png"))
    ...     files.commit()
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)
        self.replaced: list[Path] = []  # destinations that held a previous file

    def stage(self, path: str | Path) -> Path:
        """Create the temporary file for the output ``path`` and return its path.

        Symlinks are followed: the file a link points to is the one replaced.
        The temporary file of ``ref.npz`` is ``.ref.XXXXXXXX.tmp.npz``: the
        extension once, at the end, where writers read the format from.

        Raises
        ------
        IsADirectoryError
            ``path`` is a folder (a file name is needed).
        FileNotFoundError
            The folder of ``path`` does not exist.
        """
        final = Path(os.path.realpath(path))
        if final.is_dir():
            raise IsADirectoryError(
                f"cannot write {str(path)!r}: it is a folder; give a file's "
                f"path, e.g. a file name inside it"
            )
        if not final.parent.is_dir():
            raise FileNotFoundError(
                f"cannot write {str(path)!r}: its folder {str(final.parent)!r} does not exist"
            )
        suffix = format_suffix(final)
        name = final.name[: len(final.name) - len(suffix)] if suffix else final.name
        name = name[:100]  # room for the random part within NAME_MAX
        with _interrupts_held():
            descriptor, temporary = tempfile.mkstemp(
                prefix=f".{name}.", suffix=f".tmp{suffix}", dir=final.parent
            )
            self._staged.append((Path(temporary), final))
            os.close(descriptor)
        os.chmod(temporary, _new_file_mode(final))
        logger.debug("writing %s through %s", final, temporary)
        return Path(temporary)

    def commit(self) -> None:
        """Flush every staged file to disk and rename all of them into place.

        Raises
        ------
        RuntimeError
            If a rename fails (which on one filesystem takes e.g. the folder
            vanishing): the message says which outputs were already in place.
        """
        for temporary, _ in self._staged:
            _fsync(temporary)
        done: list[Path] = []
        with _interrupts_held():
            try:
                for temporary, final in self._staged:
                    existed = final.exists()
                    os.replace(temporary, final)
                    done.append(final)
                    if existed:
                        self.replaced.append(final)
            except OSError as err:
                written = ", ".join(map(str, done)) or "nothing"
                raise RuntimeError(
                    f"could not move the finished output into place as "
                    f"{err.filename or final}: {err.strerror or err}; already "
                    f"written: {written}"
                ) from err
            finally:
                self._staged = [(t, f) for t, f in self._staged if f not in done]
                self._remove_temporaries()
        for folder in {final.parent for final in done}:
            _fsync(folder, directory=True)
        for final in done:
            logger.info("wrote %s", final)

    def _remove_temporaries(self) -> None:
        for temporary, _ in self._staged:
            try:
                temporary.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:  # pragma: no cover - e.g. the folder became read-only
                logger.warning("could not remove the temporary file %s: %s", temporary, err)
        self._staged = []

    def __enter__(self) -> OutputFiles:
        return self

    def __exit__(self, *exc_info) -> None:
        with _interrupts_held():
            self._remove_temporaries()


def write_outputs(outputs: Sequence[tuple[str | None, Callable[[Path], None]]]) -> OutputFiles:
    """Write every ``(path, writer)`` with a path, all or none.

    Each writer writes a temporary file beside its destination; only when all
    have finished are they renamed into place together, so an error or
    Ctrl-C while writing the second output leaves the first untouched too.

    Parameters
    ----------
    outputs
        ``(destination, writer)`` pairs; a destination of None (an optional
        output not asked for) is skipped. ``writer(temporary_path)`` writes
        the whole file.

    Returns
    -------
    OutputFiles
        The committed outputs; its ``replaced`` lists the destinations that
        held a previous file.
    """
    with OutputFiles() as files:
        for path, write in outputs:
            if path is not None:
                write(files.stage(path))
        files.commit()
    return files
