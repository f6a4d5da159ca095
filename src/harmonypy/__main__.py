"""``python -m harmonypy``: the command-line interface (see :mod:`harmonypy.cli`)."""

import sys

from harmonypy.cli import main

if __name__ == "__main__":
    sys.exit(main())
