#!/usr/bin/env bash
# Build the documentation site (docs/*.md and the API reference from the docstrings)
# into docs/_build/html, with every Sphinx warning an error: a broken link, a
# docstring section numpydoc's validation misses (docs/conf.py), a bad directive.
#   bash scripts/build_docs.sh
# Uses .venv (bash scripts/setup.sh creates it) and installs the [docs] extra into
# it when Sphinx, numpydoc, myst-parser or furo is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
if [ ! -x "$py" ]; then
  echo "no .venv: run 'bash scripts/setup.sh' first" >&2
  exit 1
fi
if ! "$py" -c "import sphinx, numpydoc, myst_parser, furo" 2>/dev/null; then
  "$py" -m pip install -q -e ".[docs]"
fi
# -E: a fresh environment, so that the warnings of pages unchanged since the last
# build are raised again (a cached page is not re-read, and would pass silently).
"$py" -m sphinx -E -W --keep-going -b html docs docs/_build/html
