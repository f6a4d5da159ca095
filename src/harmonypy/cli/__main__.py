"""``python -m harmonypy.cli``: the command line, as ``python -m harmonypy``."""

import sys

from harmonypy.cli import main

if __name__ == "__main__":
    sys.exit(main())
