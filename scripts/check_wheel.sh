#!/usr/bin/env bash
# Test the wheel as users get it: build the sdist and the wheel (python -m build),
# install the wheel into a fresh virtual environment with only its declared
# dependencies (CPU torch first), and run scripts/wheel_smoke.py from a folder
# outside the checkout: the seed example, the demo, a mapping round trip, the
# command line, `python -m harmonypy.shard --help`, every public name. Then each
# optional extra: its feature must fail naming the extra, then work once installed.
#   bash scripts/check_wheel.sh
# Environment: PYTHON (default python3), TORCH (default torch==2.13.0, the pin of
# scripts/setup.sh), TMPDIR (where the work folder goes), KEEP_WHEEL_CHECK=1 keeps it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
torch="${TORCH:-torch==2.13.0}"
# The two environments take ~1.6 GB: on a RAM disk with room (unless TMPDIR is set)
# writing and removing them takes seconds instead of minutes on a slow disk.
parent="${TMPDIR:-/tmp}"
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ] &&
  [ "$(df -Pk /dev/shm | awk 'NR == 2 {print $4}')" -gt 4000000 ]; then
  parent=/dev/shm
fi
work="$(mktemp -d "$parent/harmonypy-wheel.XXXXXX")"
if [ "${KEEP_WHEEL_CHECK:-}" = 1 ]; then
  echo "check_wheel: work folder $work (kept)"
else
  trap 'rm -rf "$work"' EXIT
fi
start=$(date +%s)
step() { echo "check_wheel: $* ($(($(date +%s) - start)) s)"; }

step "building the sdist and the wheel"
"$python" -m venv "$work/build-env"
"$work/build-env/bin/python" -m pip install -q build
if ! "$work/build-env/bin/python" -m build --outdir "$work/dist" "$root" >"$work/build.log" 2>&1; then
  cat "$work/build.log"
  exit 1
fi
wheel=$(ls "$work"/dist/harmonypy-*.whl)
sdist=$(ls "$work"/dist/harmonypy-*.tar.gz)
version=$(basename "$wheel" | cut -d- -f2)
# A copy, so that nothing of the checkout is on the path of the checks.
cp "$root/scripts/wheel_smoke.py" "$work/smoke.py"
"$work/build-env/bin/python" "$work/smoke.py" contents "$wheel" "$sdist" "$root"

step "installing $(basename "$wheel") into a fresh virtual environment"
"$python" -m venv "$work/env"
py="$work/env/bin/python"
# --no-compile: Python compiles what it imports; compiling all of torch takes a minute.
"$py" -m pip install -q --no-compile "$torch"
"$py" -m pip install -q --no-compile "$wheel"
"$py" -m pip check
export MPLBACKEND=Agg  # no display
mkdir "$work/run"
cd "$work/run"
step "smoke checks"
"$py" "$work/smoke.py" core "$version"

step "optional extras"
extras="progress plot parquet anndata faiss fast ann"
# shellcheck disable=SC2086 # a list of words
"$py" "$work/smoke.py" missing $extras
# [ann]'s check spends ~40 s of one core compiling pynndescent's numba code: it runs
# beside the other extras' checks (each of which is mostly one core too).
"$py" -m pip install -q --no-compile "$wheel[ann]"
"$py" "$work/smoke.py" extra ann >"$work/ann.log" 2>&1 &
ann=$!
# If another extra fails, stop the [ann] check too before the work folder goes.
trap 'kill "$ann" 2>/dev/null || true; [ "${KEEP_WHEEL_CHECK:-}" = 1 ] || rm -rf "$work"' EXIT
for extra in progress plot parquet anndata faiss fast; do
  "$py" -m pip install -q --no-compile "$wheel[$extra]"
  "$py" "$work/smoke.py" extra "$extra"
done
if ! wait "$ann"; then
  cat "$work/ann.log"
  exit 1
fi
cat "$work/ann.log"
"$py" -m pip check
step "the wheel of harmonypy $version passed"
