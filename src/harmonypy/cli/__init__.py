"""Command-line interface: ``harmonypy run | reference build | map | evaluate | demo``.

Run ``harmonypy --help`` (or ``python -m harmonypy --help``) for the options.
This package holds the argument parser and thin commands, one module per
command group (:mod:`~harmonypy.cli.run`, :mod:`~harmonypy.cli.reference`,
:mod:`~harmonypy.cli.mapping`, :mod:`~harmonypy.cli.evaluate`,
:mod:`~harmonypy.cli.demo`) on the shared :mod:`~harmonypy.cli.options`,
:mod:`~harmonypy.cli.inputs` and :mod:`~harmonypy.cli.results`; reading,
matching cells by name and writing files is :mod:`harmonypy.io`.

Exit status:

* 0: done, every output written.
* 2: bad input or options, one line on stderr (``harmonypy: error: ...``).
  Everything that can be checked (options, columns, output files) is checked
  before Harmony runs, so nothing was written.
* 1: an unexpected failure (its type and message; ``--debug`` shows the
  traceback). Nothing was written: outputs are renamed into place only when
  all are complete.
* 130: interrupted (Ctrl-C, SIGINT); 143: terminated (SIGTERM, e.g. a
  scheduler's stop or ``timeout``). Every output holds either its previous
  content (or is absent) or, if the signal came during the final renames
  (held back until they are done), its new content; no temporary file is
  left behind, and with ``--nproc`` every process of the group is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from harmonypy.cli import demo, evaluate, mapping, reference, run
from harmonypy.cli.options import PROG, HelpFormatter, Parser

__all__ = ["BAD_INPUT", "Terminated", "build_parser", "main"]

# Errors that mean "the input or the options are wrong": exit status 2, one line.
BAD_INPUT = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    ImportError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    MemoryError,
)
# Per command, the library parameter names its messages may hold, as its options.
_OPTION_NAMES = {
    "run": run.OPTION_NAMES,
    "reference": reference.OPTION_NAMES,
    "map": mapping.OPTION_NAMES,
    "evaluate": evaluate.OPTION_NAMES,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``harmonypy`` argument parser with its subcommands."""
    from harmonypy import __version__

    parser = Parser(
        prog=PROG,
        formatter_class=HelpFormatter,
        description="Harmony integration of single-cell embeddings (PyTorch).",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--debug", action="store_true", default=False, help="show the full traceback on errors"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run.add_run(commands)
    reference.add_reference(commands)
    mapping.add_map(commands)
    demo.add_demo(commands)
    evaluate.add_evaluate(commands)
    demo.add_example_data(commands)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``timeout``, ``kill``), raised where the
    command was. A ``KeyboardInterrupt``, so that everything that cleans up
    after Ctrl-C (temporary files, the processes of ``--nproc``) does so."""


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into :class:`Terminated` while the command runs (main thread).

    Later SIGTERMs are ignored while the first one's cleanup runs (it takes
    at most a few seconds); the previous handler is restored afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        with _sigterm_raises():
            return handler(args)
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `harmonypy demo | head -3`
        sys.stderr.close()
        return 1
    except BAD_INPUT as err:
        if args.debug:
            raise
        print(f"{PROG}: error: {_message(err, args.command)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the last line of defence of a CLI
        if args.debug:
            raise
        print(
            f"{PROG}: error: {type(err).__name__}: {_message(err, args.command)} "
            f"(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _message(err: BaseException, command: str | None = None) -> str:
    """One line for ``err``; library parameter names become the options that set them."""
    # str(KeyError) adds quotes around the message; take it as written.
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(text.split()) or type(err).__name__
    names = {} if command is None else _OPTION_NAMES.get(command, {})
    if names:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
        text = pattern.sub(lambda match: names[match.group(1)], text)
    return text
