#!/usr/bin/env bash
# The README's test command: installs nnsynth with its test extras into .venv and runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/venv.sh test
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MPLBACKEND=Agg
exec "$PY" -m pytest tests -q -ra --durations=15 -p no:cacheprovider "$@"
