#!/usr/bin/env bash
# Set up .venv and run Harmony on the bundled 3,500-cell PBMC example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/harmonypy demo "$@"
