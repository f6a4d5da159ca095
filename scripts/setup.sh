#!/usr/bin/env bash
# Create .venv beside the checkout and install harmonypy into it.
#   bash scripts/setup.sh            # the package with progress bars, plots and numba
#   bash scripts/setup.sh test       # ... plus everything the test suite needs
# torch is installed first and pinned to the CPU build this project is tested
# with; an unpinned torch would pull a multi-GB CUDA build. On a GPU machine,
# install the torch build you want into .venv first: a present torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="progress,plot,fast"
if [ "${1:-}" = "test" ]; then extras="test"; fi
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.0"
fi
"$py" -m pip install -q -e ".[$extras]"
"$py" -c "import harmonypy, torch; print('harmonypy', harmonypy.__version__, 'with torch', torch.__version__)"
