"""Progress reporting that never configures logging.

Facts about a run always go to the ``harmonypy`` loggers at INFO. When the
caller asked for ``verbose`` output and has not set logging up to show INFO
messages from this package, the same facts are written to stderr directly: as
a tqdm bar when tqdm is installed and stderr is a terminal, else one line per
Harmony iteration.
"""

from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger("harmonypy")


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """Reporter for one run; use as a context manager so the bar always closes."""

    def __init__(self, verbose: bool, total: int, description: str = "Harmony"):
        self.verbose = bool(verbose)
        self.total = total
        self.description = description
        self.start_time = time.perf_counter()
        # If logging already shows our INFO records, writing them again to
        # stderr would print everything twice.
        self._to_stderr = self.verbose and not (
            logger.isEnabledFor(logging.INFO) and logger.hasHandlers()
        )
        self._bar = None
        stream = sys.stderr
        if self._to_stderr and stream is not None and getattr(stream, "isatty", lambda: False)():
            tqdm = _tqdm()
            if tqdm is not None:
                self._bar = tqdm(
                    total=total, desc=description, unit="iter", file=stream, leave=True
                )

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def message(self, text: str) -> None:
        logger.info(text)
        if self._to_stderr and self._bar is None and sys.stderr is not None:
            sys.stderr.write(f"{self.description}: {text}\n")
            sys.stderr.flush()

    def iteration(self, number: int, objective: float, rounds: int) -> None:
        text = (
            f"iteration {number}/{self.total}: objective {objective:.6g}, "
            f"{rounds} clustering rounds, {self.elapsed():.1f} s"
        )
        logger.info(text)
        if self._bar is not None:
            self._bar.set_postfix(objective=f"{objective:.5g}", rounds=rounds, refresh=False)
            self._bar.update(1)
        elif self._to_stderr and sys.stderr is not None:
            sys.stderr.write(f"{self.description}: {text}\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
