#!/usr/bin/env bash
# The maintainers' checks, as CI runs them: ruff's lint rules and formatting over the
# repository, and mypy over src/ (configuration: pyproject.toml [tool.ruff], [tool.mypy]).
#   bash scripts/lint.sh
# Uses .venv (bash scripts/setup.sh creates it); installs the pinned `dev` extra into it
# when a tool or its pinned version is missing. Exits non-zero when any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
if [ ! -x "$py" ]; then
  echo "scripts/lint.sh: no .venv here; create it first with: bash scripts/setup.sh test" >&2
  exit 2
fi
# The dev extra's pins, read from pyproject.toml (one source of truth).
pins=$("$py" - <<'PY'
import re
text = open("pyproject.toml", encoding="utf-8").read()  # tomllib is Python >= 3.11
block = re.search(r"^dev = \[(.*?)\]", text, re.M | re.S).group(1)
print(" ".join(re.findall(r'"([^"]+)"', block)))
PY
)
missing=$("$py" - $pins <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
out = []
for pin in sys.argv[1:]:
    name, _, wanted = pin.partition("==")
    try:
        if version(name) != wanted:
            out.append(pin)
    except PackageNotFoundError:
        out.append(pin)
print(" ".join(out))
PY
)
if [ -n "$missing" ]; then
  echo "scripts/lint.sh: installing $missing" >&2
  "$py" -m pip install -q $missing
fi
status=0
run() {
  local began=$SECONDS
  echo "== $*"
  "$@" || status=$?
  echo "   ($((SECONDS - began)) s)"
}
run .venv/bin/ruff check .
run .venv/bin/ruff format --check .
run .venv/bin/mypy
exit $status
